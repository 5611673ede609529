"""Tests of events.snapshot: saving, loading and skipping snapshots."""

import functools
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings
from structlog.testing import capture_logs

import events.snapshot
from events.entry_map import Chunk, ChunkIndex, ChunkRef
from events.errors import LogCorruptedError
from events.event_types import (
    Event,
    InstanceProvisioningFailed,
    InstanceTerminated,
    InstanceTerminationFailed,
    RunFinished,
    RunRetried,
)
from events.log import EventLog
from events.log_reader import LogReader, SnapshotChunk
from events.model import DAEMON_ACTOR
from events.projection import (
    ACTIVE_RUN_STATUSES,
    LIVE_INSTANCE_STATUSES,
    Instance,
    Run,
    State,
    StateData,
    apply,
    check_invariants,
    encode_state,
    replay,
    state_from_data,
)
from events.record import Record
from events.snapshot import (
    decode_snapshot,
    load_state,
    load_state_offline,
    maybe_snapshot,
    paused_gc,
    prepare_snapshot,
    save_snapshot,
)
from tests.events.log_fixtures import execute, flip_byte, pool_event, story
from tests.events.test_projection import (
    BUSY,
    TERMINATED,
    History,
    fold_with_hashes,
    histories,
    pool_created,
    released,
    requested,
    started,
)


@pytest.fixture
def log_path(tmp_path: Path) -> str:
    return str(tmp_path / "events.db")


@pytest.fixture
async def log(log_path: str) -> AsyncIterator[EventLog]:
    opened = await EventLog.open(log_path)
    yield opened
    await opened.close()


async def append_story(
    log: EventLog, runs: int, seed: int = 0, chapter: str = "a"
) -> None:
    for batch in story(runs, seed=seed, chapter=chapter):
        await log.append(batch, DAEMON_ACTOR)


async def replay_all(log: EventLog, until: int | None = None) -> State:
    """Fold the records up to ``until`` (default: all) with their hashes."""
    state = State()
    async for record, _, record_hash in log.read_raw(verify=True):
        if until is not None and record.position > until:
            break

        apply(state, record, record_hash)

    return state


async def snapshot_at(log: EventLog, position: int) -> State:
    """Save a snapshot of the state at ``position``; return that state."""
    state = await replay_all(log, until=position)
    assert await save_snapshot(log, state) == position

    return state


class TestLoadState:
    @pytest.mark.parametrize("cut", [1, 17, 60, 99])
    async def test_snapshot_plus_tail_equals_full_replay(
        self, log: EventLog, cut: int
    ) -> None:
        await append_story(log, 20)
        assert log.head_position >= 100
        await snapshot_at(log, cut)
        await append_story(log, 5, seed=1, chapter="b")

        loaded = await load_state(log)
        replayed = await replay_all(log)

        assert loaded.checkpoint == log.head_position
        assert loaded.head_hash == log.head_hash
        assert encode_state(loaded) == encode_state(replayed)

    async def test_without_snapshot_replays_everything(self, log: EventLog) -> None:
        await append_story(log, 5)

        loaded = await load_state(log)

        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_empty_log_loads_empty_state(self, log: EventLog) -> None:
        loaded = await load_state(log)

        assert encode_state(loaded) == encode_state(State())

    async def test_edited_snapshot_is_skipped(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 10)
        await snapshot_at(log, 20)
        await snapshot_at(log, 40)
        execute(
            log_path,
            "UPDATE snapshots SET state = CAST(? || substr(state, 2) AS BLOB)"
            " WHERE position = 40",
            (b"\x00",),
        )

        with capture_logs() as logs:
            loaded = await load_state(log)

        skipped = [entry for entry in logs if entry["event"] == "snapshot_skipped"]
        assert [entry["position"] for entry in skipped] == [40]
        assert "state hash differs" in skipped[0]["problem"]
        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_snapshot_of_another_history_is_skipped(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 10)
        await snapshot_at(log, 30)
        execute(
            log_path,
            "UPDATE snapshots SET record_hash = ? WHERE position = 30",
            (bytes(32),),
        )

        with capture_logs() as logs:
            loaded = await load_state(log)

        problems = [e["problem"] for e in logs if e["event"] == "snapshot_skipped"]
        assert problems == [
            "record hash differs from the log's record at that position"
        ]
        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_corrupt_tail_after_snapshot_raises(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 10)
        await snapshot_at(log, 20)
        flip_byte(log_path, 25)

        with pytest.raises(LogCorruptedError) as raised:
            await load_state(log)

        assert raised.value.position == 25


class TestSaveSnapshot:
    async def test_saved_snapshot_stores_hashes_and_state(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 3)
        state = await snapshot_at(log, 10)

        with LogReader.open(log_path) as reader:
            (header,) = reader.snapshot_headers()
            data = reader.snapshot_state(10)
            assert data is not None
            stored = decode_snapshot(reader.connection, data)

        assert header.position == 10
        assert header.record_hash == await log.record_hash(10)
        assert header.state_hash == hashlib.sha256(data).digest()
        assert encode_state(stored) == encode_state(state)
        assert log.last_snapshot_position == 10

    async def test_only_the_newest_snapshots_are_kept(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 5)
        for position in (5, 10, 15, 20, 25):
            await snapshot_at(log, position)

        with LogReader.open(log_path) as reader:
            positions = [header.position for header in reader.snapshot_headers()]

        assert positions == [25, 20, 15]

    async def test_unhashed_state_takes_log_hash(self, log: EventLog) -> None:
        await append_story(log, 2)
        state = State()
        async for record in log.read():
            apply(state, record)

        await save_snapshot(log, state)

        assert state.head_hash == log.head_hash
        assert (await load_state(log)).head_hash == log.head_hash

    async def test_state_of_another_log_is_rejected(
        self, log: EventLog, tmp_path: Path
    ) -> None:
        await append_story(log, 2)
        async with await EventLog.open(tmp_path / "other.db") as other:
            await other.append([pool_event("x")], DAEMON_ACTOR)
            foreign = await replay_all(other)

        with pytest.raises(ValueError, match="differs from the hash"):
            await save_snapshot(log, foreign)

    async def test_state_past_the_head_is_rejected(self, log: EventLog) -> None:
        await append_story(log, 1)

        with pytest.raises(ValueError, match="past the head of event log"):
            await save_snapshot(log, State(checkpoint=1000))

    async def test_empty_state_saves_nothing(self, log: EventLog) -> None:
        assert await save_snapshot(log, State()) is None
        assert log.last_snapshot_position == 0

    async def test_maybe_snapshot_waits_for_every_records(self, log: EventLog) -> None:
        await append_story(log, 2)
        state = await replay_all(log)
        head = log.head_position

        assert await maybe_snapshot(log, state, every=head + 1) is False
        assert await maybe_snapshot(log, state, every=head) is True
        assert log.last_snapshot_position == head
        assert await maybe_snapshot(log, state, every=1) is False

    async def test_maybe_snapshot_rejects_zero_every(self, log: EventLog) -> None:
        with pytest.raises(ValueError, match="invalid snapshot_every 0"):
            await maybe_snapshot(log, State(), every=0)


class TestOfflineLoad:
    async def test_offline_load_equals_online_load(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 10)
        await snapshot_at(log, 30)
        await append_story(log, 3, seed=2, chapter="b")
        online = await load_state(log)

        with LogReader.open(log_path) as reader:
            offline = load_state_offline(reader)

        assert encode_state(offline) == encode_state(online)

    @pytest.mark.parametrize("position", [0, 12, 30, 31, 55])
    async def test_offline_load_at_position_equals_prefix_replay(
        self, log: EventLog, log_path: str, position: int
    ) -> None:
        await append_story(log, 10)
        await snapshot_at(log, 30)
        expected = await replay_all(log, until=position)

        with LogReader.open(log_path) as reader:
            loaded = load_state_offline(reader, at_position=position)

        assert loaded.checkpoint == position
        assert encode_state(loaded) == encode_state(expected)


class TestOpenWithSnapshot:
    async def test_open_verifies_after_newest_snapshot(self, log_path: str) -> None:
        async with await EventLog.open(log_path) as log:
            await append_story(log, 10)
            await snapshot_at(log, 30)

        flip_byte(log_path, 12)

        async with await EventLog.open(log_path) as log:
            result = await log.verify()

        assert result.bad_position == 12

    async def test_open_ignores_snapshot_that_does_not_match(
        self, log_path: str
    ) -> None:
        async with await EventLog.open(log_path) as log:
            await append_story(log, 10)
            await snapshot_at(log, 30)

        flip_byte(log_path, 12)
        execute(log_path, "UPDATE snapshots SET record_hash = zeroblob(32)")

        with pytest.raises(LogCorruptedError) as raised:
            await EventLog.open(log_path)

        assert raised.value.position == 12


def test_paused_gc_restores_the_collector() -> None:
    import gc

    with paused_gc():
        assert not gc.isenabled()

    assert gc.isenabled()


# Snapshots through the archive: the hot part and chunks, as stored.


def reload_through_snapshot(
    state: State, stored_rows: dict[tuple[int, int], SnapshotChunk]
) -> State:
    """Encode ``state`` as ``save_snapshot`` does, keep its new chunk rows in
    ``stored_rows``, and return the state decoded from those bytes with
    chunks that read ``stored_rows`` on first use."""
    prepared = prepare_snapshot(state)
    for row in prepared.chunks:
        stored_rows[(row.position, row.number)] = row

    for chunk, ref in prepared.new_refs:
        chunk.ref = ref

    stored = msgspec.msgpack.decode(prepared.data, type=StateData)

    def chunks(refs: list[ChunkRef], entry_type: type) -> list[Chunk]:  # type: ignore[type-arg]
        result = []
        for ref in refs:
            row = stored_rows[(ref.position, ref.number)]
            read_index = functools.partial(
                msgspec.msgpack.decode, row.index, type=ChunkIndex
            )
            read_entries = functools.partial(
                msgspec.msgpack.decode, row.entries, type=list[entry_type]
            )
            result.append(
                Chunk(read_index=read_index, read_entries=read_entries, ref=ref)
            )

        return result

    return state_from_data(
        stored, chunks(stored.run_chunks, Run), chunks(stored.instance_chunks, Instance)
    )


@settings(max_examples=150, deadline=None)
@given(history=histories(), data=st.data())
def test_archived_snapshots_plus_tail_equal_full_replay(
    history: History, data: st.DataObject
) -> None:
    records, hashes = history.records, history.hashes
    cuts = data.draw(
        st.lists(st.integers(1, max(1, len(records))), max_size=3), label="cuts"
    )
    full = fold_with_hashes(records, hashes, State())
    state = State()
    done = 0
    stored_rows: dict[tuple[int, int], SnapshotChunk] = {}
    for cut in sorted(cut for cut in cuts if cut <= len(records)):
        fold_with_hashes(records[done:cut], hashes[done:cut], state)
        done = cut
        state = reload_through_snapshot(state, stored_rows)

    fold_with_hashes(records[done:], hashes[done:], state)

    assert [run.id for run in state.active_runs()] == [
        run.id for run in full.runs.values() if run.status in ACTIVE_RUN_STATUSES
    ]
    assert [instance.id for instance in state.live_instances()] == [
        instance.id
        for instance in full.instances.values()
        if instance.status in LIVE_INSTANCE_STATUSES
    ]
    for name in {run.name for run in full.runs.values()}:
        newest = [run for run in full.runs.values() if run.name == name][-1]
        found = state.runs.last_named(name)
        assert found is not None and found.id == newest.id, name

    assert len(state.runs) == len(full.runs)
    assert encode_state(state) == encode_state(full)
    assert check_invariants(state) == []


class TestArchive:
    async def test_load_state_reads_no_chunk(
        self, log: EventLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await append_story(log, 20)
        await snapshot_at(log, log.head_position)
        await append_story(log, 3, seed=1, chapter="b")
        reads: list[tuple[int, int, str]] = []
        real_read = events.snapshot.read_chunk_part

        def counting_read(
            connection: sqlite3.Connection, position: int, number: int, part: str
        ) -> bytes | None:
            reads.append((position, number, part))
            return real_read(connection, position, number, part)  # type: ignore[arg-type]

        monkeypatch.setattr(events.snapshot, "read_chunk_part", counting_read)

        loaded = await load_state(log)
        active = loaded.active_runs()
        live = loaded.live_instances()

        assert reads == []
        assert loaded.runs.chunks != []
        assert active == [
            run for run in loaded.runs.values() if run.status in ACTIVE_RUN_STATUSES
        ]
        assert live == [
            instance
            for instance in loaded.instances.values()
            if instance.status in LIVE_INSTANCE_STATUSES
        ]
        assert reads != []
        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_damaged_chunk_is_rebuilt_from_replay(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 20)
        await snapshot_at(log, log.head_position)
        execute(
            log_path,
            "UPDATE snapshot_chunks SET entries = CAST(? || substr(entries, 2) AS BLOB)",
            (b"\x00",),
        )
        loaded = await load_state(log)

        with capture_logs() as logs:
            encoded = encode_state(loaded)

        rebuilt = [e for e in logs if e["event"] == "snapshot_archive_rebuilt"]
        assert rebuilt != []
        assert "differs from its hash" in rebuilt[0]["problem"]
        assert encoded == encode_state(await replay_all(log))

    async def test_missing_chunk_index_is_rebuilt_from_replay(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 20)
        await snapshot_at(log, log.head_position)
        execute(log_path, "DELETE FROM snapshot_chunks")
        loaded = await load_state(log)

        with capture_logs() as logs:
            encoded = encode_state(loaded)

        problems = [
            e["problem"] for e in logs if e["event"] == "snapshot_archive_rebuilt"
        ]
        assert problems != []
        assert "is missing" in problems[0]
        assert encoded == encode_state(await replay_all(log))

    async def test_offline_load_skips_snapshot_with_missing_chunk(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 20)
        await snapshot_at(log, log.head_position)
        execute(log_path, "DELETE FROM snapshot_chunks")

        with capture_logs() as logs, LogReader.open(log_path) as reader:
            offline = load_state_offline(reader)

        problems = [e["problem"] for e in logs if e["event"] == "snapshot_skipped"]
        assert len(problems) == 1
        assert "is missing" in problems[0]
        assert encode_state(offline) == encode_state(await replay_all(log))

    async def test_format_1_snapshot_is_skipped(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 5)
        await snapshot_at(log, 10)
        old_format = msgspec.msgpack.encode({"checkpoint": 10, "runs": {}})
        execute(
            log_path,
            "UPDATE snapshots SET state = ?, state_hash = ? WHERE position = 10",
            (old_format, hashlib.sha256(old_format).digest()),
        )

        with capture_logs() as logs:
            loaded = await load_state(log)

        problems = [e["problem"] for e in logs if e["event"] == "snapshot_skipped"]
        assert len(problems) == 1
        assert "snapshot format 1" in problems[0]
        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_second_snapshot_stores_only_new_chunks(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 20)
        state = await replay_all(log)
        await save_snapshot(log, state)
        first_position = state.checkpoint
        async for record, _, digest in log.read_raw(state.checkpoint, verify=True):
            apply(state, record, digest)

        await append_story(log, 5, seed=1, chapter="b")
        async for record, _, digest in log.read_raw(state.checkpoint, verify=True):
            apply(state, record, digest)

        await save_snapshot(log, state)

        rows = execute_query(
            log_path, "SELECT position, last_position FROM snapshot_chunks"
        )
        positions = sorted({position for position, _ in rows})
        assert positions == [first_position, state.checkpoint]
        assert {last for _, last in rows} == {state.checkpoint}
        loaded = await load_state(log)
        assert encode_state(loaded) == encode_state(await replay_all(log))

    async def test_chunks_of_dropped_snapshots_are_deleted(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_story(log, 20)
        await snapshot_at(log, 30)
        # A second lineage: a fresh replay archives everything anew.
        await save_snapshot(log, await replay_all(log), keep=1)

        rows = execute_query(log_path, "SELECT DISTINCT position FROM snapshot_chunks")

        assert rows == [(log.head_position,)]

    async def test_appends_continue_while_snapshot_is_written(
        self, log: EventLog
    ) -> None:
        await append_story(log, 10)
        state = await replay_all(log)

        async with anyio.create_task_group() as group:
            group.start_soon(append_story, log, 3, 1, "b")
            await save_snapshot(log, state)

        loaded = await load_state(log)
        assert encode_state(loaded) == encode_state(await replay_all(log))


def execute_query(path: str, statement: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(statement).fetchall()
    finally:
        connection.close()


# Records that change an entry after a snapshot archived it. Each cut is the
# number of records after which a snapshot is saved and the state reloaded.
ARCHIVED_CHANGES = [
    pytest.param(
        [
            requested(),
            InstanceProvisioningFailed("i1", "quota"),
            InstanceTerminated("i1"),
            pool_created("gpu"),
        ],
        [2, 3],
        id="failed-instance-terminated",
    ),
    pytest.param(
        [*TERMINATED, InstanceTerminationFailed("i1", "timeout", 2), pool_created("x")],
        [4, 5],
        id="terminated-instance-changed",
    ),
    pytest.param(
        [
            *BUSY,
            started(),
            RunFinished("r1", 1),
            released(),
            RunRetried("r1", 2, "error", "exited with status 1"),
            pool_created("x"),
        ],
        [7, 8],
        id="ended-run-retried",
    ),
]


def stream_for(event: Event) -> str:
    """Return a stream for ``event``; the projection does not read it."""
    for field in ("run_id", "instance_id", "pool"):
        value = getattr(event, field, None)
        if value is not None:
            return f"{field}/{value}"

    raise AssertionError(f"no stream for {event!r}")


@pytest.mark.parametrize(("events", "cuts"), ARCHIVED_CHANGES)
def test_change_to_archived_entry_survives_snapshots(
    events: list[Event], cuts: list[int]
) -> None:
    records = [
        Record(position, stream_for(event), 1, position, DAEMON_ACTOR, event)
        for position, event in enumerate(events, start=1)
    ]
    full = replay(records)
    state = State()
    done = 0
    stored_rows: dict[tuple[int, int], SnapshotChunk] = {}
    for cut in cuts:
        replay(records[done:cut], state)
        done = cut
        state = reload_through_snapshot(state, stored_rows)

    replay(records[done:], state)
    state = reload_through_snapshot(state, stored_rows)

    assert encode_state(state) == encode_state(full)
    assert [run.id for run in state.active_runs()] == [
        run.id for run in full.runs.values() if run.status in ACTIVE_RUN_STATUSES
    ]
