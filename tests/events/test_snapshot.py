"""Tests of events.snapshot: saving, loading and skipping snapshots."""

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from events.errors import LogCorruptedError
from events.log import EventLog
from events.log_reader import LogReader
from events.model import DAEMON_ACTOR
from events.projection import State, apply, encode_state
from events.snapshot import (
    decode_snapshot,
    load_state,
    load_state_offline,
    maybe_snapshot,
    paused_gc,
    save_snapshot,
)
from tests.events.log_fixtures import execute, flip_byte, pool_event, story


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
