"""Tests of EntryMap in events/projection.py: a hot dict plus an archive.

The map must read like the dict a replay builds (every entry, in creation
order) while it keeps ended entries in chunks that are read only on demand.
Chunks here count their reads, so the tests can assert what stayed unread.
"""

import pytest

import events.entry_map
from events.entry_map import Chunk, ChunkIndex, EntryMap
from events.event_types import RunSpec
from events.projection import Run, is_ended_run


def make_run(run_id: str, name: str | None = None, status: str = "done") -> Run:
    return Run(
        id=run_id,
        name=name or f"job-{run_id}",
        pool="default-pool",
        spec=RunSpec(argv=("true",)),
        user="alice",
        uid=1000,
        submitted_at=0,
        status=status,  # type: ignore[arg-type]
    )


class CountingChunk:
    """Builds a ``Chunk`` whose readers count how often they ran."""

    def __init__(self, runs: list[Run], ranks: list[int]) -> None:
        self.runs = runs
        self.index = ChunkIndex(
            [run.id for run in runs], ranks, [run.name for run in runs]
        )
        self.index_reads = 0
        self.entry_reads = 0
        self.chunk: Chunk[Run] = Chunk(
            read_index=self._read_index, read_entries=self._read_entries
        )

    def _read_index(self) -> ChunkIndex:
        self.index_reads += 1
        return self.index

    def _read_entries(self) -> list[Run]:
        self.entry_reads += 1
        return self.runs


def map_with_archive() -> tuple[EntryMap[Run], CountingChunk, CountingChunk]:
    """Return a map whose ranks interleave hot and archived entries.

    Creation order: a1 (1), h1 (2), a2 (3), b1 (4), h2 (5), b2 (6). The a's
    and b's are archived in two chunks, and the h's are hot and active.
    """
    first = CountingChunk([make_run("a1"), make_run("a2")], [1, 3])
    second = CountingChunk([make_run("b1"), make_run("b2")], [4, 6])
    hot = {
        "h1": make_run("h1", status="running"),
        "h2": make_run("h2", status="submitted"),
    }
    entry_map = EntryMap(hot, [2, 5], [first.chunk, second.chunk])

    return entry_map, first, second


class TestReads:
    def test_hot_lookup_reads_no_archive(self) -> None:
        entry_map, first, second = map_with_archive()

        assert entry_map["h1"].id == "h1"
        assert entry_map.get("h2") is not None
        assert first.index_reads == 0
        assert second.index_reads == 0

    def test_archived_lookup_decodes_only_its_chunk(self) -> None:
        entry_map, first, second = map_with_archive()

        run = entry_map.get("b1")

        assert run is not None
        assert run.id == "b1"
        assert first.entry_reads == 0
        assert second.entry_reads == 1

    def test_missing_key_reads_indexes_but_no_entries(self) -> None:
        entry_map, first, second = map_with_archive()

        assert entry_map.get("nope") is None
        assert "nope" not in entry_map
        assert first.index_reads == 1
        assert first.entry_reads == 0
        assert second.entry_reads == 0

    def test_missing_key_raises_key_error(self) -> None:
        entry_map, _, _ = map_with_archive()

        with pytest.raises(KeyError):
            entry_map["nope"]

    def test_iteration_follows_creation_order(self) -> None:
        entry_map, _, _ = map_with_archive()

        assert list(entry_map) == ["a1", "h1", "a2", "b1", "h2", "b2"]
        assert [run.id for run in entry_map.values()] == list(entry_map)
        assert next(reversed(entry_map.values())).id == "b2"

    def test_len_counts_hot_and_archived(self) -> None:
        entry_map, _, _ = map_with_archive()

        assert len(entry_map) == 6

    def test_hot_values_are_only_the_hot_entries(self) -> None:
        entry_map, first, _ = map_with_archive()

        assert [run.id for run in entry_map.hot_values()] == ["h1", "h2"]
        assert first.index_reads == 0

    def test_equals_dict_of_same_entries(self) -> None:
        entry_map, _, _ = map_with_archive()

        assert entry_map == dict(entry_map.items())


class TestLastNamed:
    @pytest.mark.parametrize(
        ("names", "expected"),
        [
            pytest.param({"a1": "x", "h1": "x"}, "h1", id="hot-newer"),
            pytest.param({"h1": "x", "a2": "x"}, "a2", id="archived-newer"),
            pytest.param({"a1": "x", "b2": "x", "h2": "x"}, "b2", id="newest-of-three"),
            pytest.param({"a1": "y"}, None, id="no-match"),
        ],
    )
    def test_returns_newest_entry_with_name(
        self, names: dict[str, str], expected: str | None
    ) -> None:
        first = CountingChunk(
            [make_run("a1", names.get("a1")), make_run("a2", names.get("a2"))],
            [1, 3],
        )
        second = CountingChunk(
            [make_run("b1", names.get("b1")), make_run("b2", names.get("b2"))],
            [4, 6],
        )
        hot = {
            "h1": make_run("h1", names.get("h1"), status="running"),
            "h2": make_run("h2", names.get("h2"), status="running"),
        }
        entry_map = EntryMap(hot, [2, 5], [first.chunk, second.chunk])

        found = entry_map.last_named("x")

        assert (found.id if found else None) == expected
        assert first.entry_reads + second.entry_reads <= 1


class TestWrites:
    def test_write_to_archived_key_promotes_it(self) -> None:
        entry_map, first, _ = map_with_archive()

        run = entry_map.hot["a2"]
        run.status = "submitted"

        assert "a2" in entry_map.hot
        assert [r.id for r in entry_map.hot_values()] == ["h1", "a2", "h2"]
        assert entry_map["a2"].status == "submitted"
        assert len(entry_map) == 6
        assert list(entry_map) == ["a1", "h1", "a2", "b1", "h2", "b2"]
        assert first.entry_reads == 1

    def test_write_to_unknown_key_raises_key_error(self) -> None:
        entry_map, _, _ = map_with_archive()

        with pytest.raises(KeyError):
            entry_map.hot["nope"]

    def test_archive_ended_moves_ended_hot_entries(self) -> None:
        entry_map, _, _ = map_with_archive()
        entry_map.hot["h1"].status = "done"

        (chunk,) = entry_map.archive_ended(is_ended_run)

        assert chunk.index().keys == ["h1"]
        assert chunk.index().ranks == [2]
        assert list(entry_map.hot) == ["h2"]
        assert entry_map["h1"].status == "done"
        assert list(entry_map) == ["a1", "h1", "a2", "b1", "h2", "b2"]

    def test_rearchived_entry_overrides_its_old_copy(self) -> None:
        entry_map, _, _ = map_with_archive()
        entry_map.hot["a1"].reason = "changed"

        entry_map.archive_ended(is_ended_run)

        assert entry_map["a1"].reason == "changed"
        assert entry_map.rank_of("a1") == 1
        assert len(entry_map) == 6

    def test_archive_ended_splits_into_chunks(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(events.entry_map, "CHUNK_ENTRIES", 2)
        entry_map: EntryMap[Run] = EntryMap()
        for rank, run_id in enumerate(["r1", "r2", "r3"], start=1):
            entry_map.insert(run_id, make_run(run_id), rank)

        chunks = entry_map.archive_ended(is_ended_run)

        assert [chunk.index().keys for chunk in chunks] == [["r1", "r2"], ["r3"]]
        assert list(entry_map) == ["r1", "r2", "r3"]

    def test_insert_of_archived_key_keeps_first_rank(self) -> None:
        entry_map, _, _ = map_with_archive()

        entry_map.insert("a1", make_run("a1", "again", status="submitted"), 7)

        assert entry_map.rank_of("a1") == 1
        assert next(iter(entry_map)) == "a1"
        assert entry_map["a1"].name == "again"
        assert len(entry_map) == 6

    def test_item_assignment_of_new_key_ranks_last(self) -> None:
        entry_map, _, _ = map_with_archive()

        entry_map["z"] = make_run("z", status="running")

        assert list(entry_map)[-1] == "z"
        assert entry_map.rank_of("z") == 7
