"""Tests of events.log: appends, group commit, follow, corruption and repair."""

import hashlib
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from events.errors import LogClosedError, LogCorruptedError, VersionConflictError
from events.event_types import PoolCreated, RunStopRequested
from events.log import AppendFailedError, EventLog, repair
from events.log_reader import LogReader, LogSchemaError
from events.model import DAEMON_ACTOR, Actor
from events.record import GENESIS_HASH, NewEvent, Record, chain_hash, encode_body
from tests.events.log_fixtures import execute, file_bytes, flip_byte, pool_event

ALICE = Actor(1000, "alice")


@pytest.fixture
def log_path(tmp_path: Path) -> str:
    return str(tmp_path / "events.db")


@pytest.fixture
async def log(log_path: str) -> AsyncIterator[EventLog]:
    opened = await EventLog.open(log_path)
    yield opened
    await opened.close()


async def read_all(log: EventLog, after: int = 0) -> list[Record]:
    return [record async for record in log.read(after)]


async def append_pools(log: EventLog, count: int) -> None:
    """Append ``count`` single-event batches to streams ``pool/p0`` ... ."""
    for index in range(count):
        await log.append([pool_event(f"p{index}")], DAEMON_ACTOR)


class TestAppend:
    async def test_append_returns_written_records(self, log: EventLog) -> None:
        records = await log.append(
            [pool_event("a", 0), NewEvent("run/r1", RunStopRequested("r1"))], ALICE
        )

        assert [record.position for record in records] == [1, 2]
        assert [record.stream for record in records] == ["pool/a", "run/r1"]
        assert records[0].event == PoolCreated("a")
        assert records[1].actor == ALICE

    async def test_positions_are_gapless_and_versions_per_stream(
        self, log: EventLog
    ) -> None:
        for stream in ["pool/a", "pool/b", "pool/a", "pool/a", "pool/b"]:
            await log.append([NewEvent(stream, PoolCreated(stream))], ALICE)

        records = await read_all(log)

        assert [record.position for record in records] == [1, 2, 3, 4, 5]
        assert [record.version for record in records] == [1, 1, 2, 3, 2]
        assert log.head_position == 5
        assert await log.stream_version("pool/a") == 3
        assert await log.stream_version("pool/none") == 0

    async def test_read_returns_what_append_returned(self, log: EventLog) -> None:
        written = []
        for index in range(5):
            written += await log.append([pool_event(f"p{index}")], ALICE)

        assert await read_all(log) == written
        assert await read_all(log, after=3) == written[3:]

    async def test_hash_chain_verifies(self, log: EventLog) -> None:
        await append_pools(log, 4)

        previous_hash = GENESIS_HASH
        async for record, body, stored_hash in log.read_raw(verify=True):
            assert body == encode_body(record)
            assert stored_hash == hashlib.sha256(previous_hash + body).digest()
            previous_hash = stored_hash

        result = await log.verify()

        assert result.ok
        assert result.count == 4
        assert result.head_hash == previous_hash
        assert log.head_hash == previous_hash

    async def test_recorded_at_never_goes_backwards(self, log_path: str) -> None:
        times = iter([2_000_000, 1_000_000, 3_000_000])
        async with await EventLog.open(log_path, clock=lambda: next(times)) as log:
            first = await log.append([pool_event("a")], ALICE)
            second = await log.append([pool_event("b")], ALICE)
            third = await log.append([pool_event("c")], ALICE)

        assert first[0].recorded_at == 2_000_000
        assert second[0].recorded_at == 2_000_000
        assert third[0].recorded_at == 3_000_000

    async def test_reopen_restores_head_and_versions(self, log_path: str) -> None:
        async with await EventLog.open(log_path) as log:
            await log.append([pool_event("a", 0), pool_event("a", 1)], ALICE)
            head_hash = log.head_hash

        async with await EventLog.open(log_path) as log:
            assert log.head_position == 2
            assert log.head_hash == head_hash
            assert await log.stream_version("pool/a") == 2
            records = await log.append([pool_event("a", 2)], ALICE)

        assert records[0].position == 3
        assert records[0].version == 3

    async def test_empty_batch_writes_nothing(self, log: EventLog) -> None:
        assert await log.append([], ALICE) == []
        assert log.head_position == 0
        assert log.commit_count == 0

    async def test_open_without_create_rejects_missing_file(
        self, log_path: str
    ) -> None:
        with pytest.raises(FileNotFoundError, match="events.db not found"):
            await EventLog.open(log_path, create=False)

        assert not os.path.exists(log_path)

    async def test_open_rejects_unknown_synchronous(self, log_path: str) -> None:
        level: Any = "SOMETIMES"

        with pytest.raises(ValueError, match="invalid synchronous 'SOMETIMES'"):
            await EventLog.open(log_path, synchronous=level)


class TestExpectedVersion:
    @pytest.mark.parametrize(
        ("expected", "conflict"),
        [
            pytest.param(None, False, id="unchecked"),
            pytest.param(2, False, id="current"),
            pytest.param(0, True, id="must-not-exist"),
            pytest.param(1, True, id="stale"),
            pytest.param(3, True, id="ahead"),
        ],
    )
    async def test_expected_version_against_stream_at_two(
        self, log: EventLog, expected: int | None, conflict: bool
    ) -> None:
        await log.append([pool_event("a"), pool_event("a")], ALICE)

        if conflict:
            with pytest.raises(VersionConflictError) as raised:
                await log.append([pool_event("a", expected)], ALICE)

            assert raised.value.stream == "pool/a"
            assert raised.value.expected == expected
            assert raised.value.actual == 2
            assert log.head_position == 2
        else:
            records = await log.append([pool_event("a", expected)], ALICE)
            assert records[0].version == 3

    async def test_conflict_writes_nothing_to_the_file(
        self, log: EventLog, log_path: str
    ) -> None:
        await log.append([pool_event("a", 0)], ALICE)
        before = file_bytes(log_path)
        head_hash = log.head_hash
        commits = log.commit_count

        message = "stream pool/a is at version 1, not the expected 0: reload"
        with pytest.raises(VersionConflictError, match=message):
            await log.append([pool_event("a", 0)], ALICE)

        assert file_bytes(log_path) == before
        assert log.head_position == 1
        assert log.head_hash == head_hash
        assert log.commit_count == commits

    async def test_conflict_fails_only_its_batch_in_a_group(
        self, log: EventLog
    ) -> None:
        await log.append([pool_event("a", 0)], ALICE)
        commits = log.commit_count
        outcomes: dict[str, object] = {}

        async def attempt(name: str, entries: list[NewEvent]) -> None:
            try:
                outcomes[name] = await log.append(entries, ALICE)
            except VersionConflictError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as group:
            group.start_soon(attempt, "stale", [pool_event("b", 0), pool_event("a", 0)])
            group.start_soon(attempt, "fresh", [pool_event("c", 0)])

        assert isinstance(outcomes["stale"], VersionConflictError)
        assert isinstance(outcomes["fresh"], list)
        assert log.commit_count == commits + 1
        assert [record.stream for record in await read_all(log)] == [
            "pool/a",
            "pool/c",
        ]
        assert await log.stream_version("pool/b") == 0
        assert (await log.verify()).ok

    async def test_expected_versions_chain_within_a_batch(self, log: EventLog) -> None:
        records = await log.append(
            [pool_event("a", 0), pool_event("a", 1), pool_event("a", 2)], ALICE
        )

        assert [record.version for record in records] == [1, 2, 3]

    async def test_batch_is_atomic(self, log: EventLog) -> None:
        await log.append([pool_event("a", 0)], ALICE)

        with pytest.raises(VersionConflictError):
            await log.append(
                [pool_event("b", 0), pool_event("c", 0), pool_event("a", 0)], ALICE
            )

        assert log.head_position == 1
        assert await log.stream_version("pool/b") == 0
        assert await log.stream_version("pool/c") == 0
        assert len(await read_all(log)) == 1


class TestGroupCommit:
    async def test_concurrent_appends_share_commits(self, log: EventLog) -> None:
        results: list[list[Record]] = []

        async def append_one(index: int) -> None:
            results.append(await log.append([pool_event(f"p{index}", 0)], ALICE))

        async with anyio.create_task_group() as group:
            for index in range(100):
                group.start_soon(append_one, index)

        positions = sorted(records[0].position for records in results)
        assert positions == list(range(1, 101))
        assert log.commit_count <= 10
        assert (await log.verify()).ok

    async def test_failed_commit_fails_whole_group(
        self, log: EventLog, log_path: str
    ) -> None:
        await log.append([pool_event("a")], ALICE)
        head_hash = log.head_hash
        execute(
            log_path,
            "CREATE TRIGGER reject_boom BEFORE INSERT ON events"
            " WHEN NEW.stream = 'pool/boom'"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        errors: list[BaseException] = []

        async def attempt(entries: list[NewEvent]) -> None:
            try:
                await log.append(entries, ALICE)
            except AppendFailedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(attempt, [pool_event("good")])
            group.start_soon(attempt, [pool_event("boom")])

        assert len(errors) == 2
        assert all("injected failure" in str(error) for error in errors)
        assert all(isinstance(e.__cause__, sqlite3.Error) for e in errors)
        assert log.head_position == 1
        assert log.head_hash == head_hash

        records = await log.append([pool_event("good")], ALICE)

        assert records[0].position == 2
        assert records[0].version == 1
        assert (await log.verify()).ok


class TestCancellation:
    """Appends cancelled while a commit waits for SQLite's write lock, which a
    second connection holds until the test releases it."""

    async def test_cancelled_queued_append_writes_nothing(
        self, log: EventLog, log_path: str
    ) -> None:
        blocker = sqlite3.connect(log_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        queued_scope = anyio.CancelScope()
        outcomes: list[str] = []

        async def append_queued() -> None:
            with queued_scope:
                await log.append([pool_event("queued")], ALICE)
                outcomes.append("queued committed")

            outcomes.append("queued returned")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(log.append, [pool_event("leader")], ALICE)
                await anyio.wait_all_tasks_blocked()
                group.start_soon(append_queued)
                await anyio.wait_all_tasks_blocked()
                queued_scope.cancel()
                await anyio.wait_all_tasks_blocked()
                blocker.execute("ROLLBACK")

        blocker.close()
        assert outcomes == ["queued returned"]
        assert [record.stream for record in await read_all(log)] == ["pool/leader"]

        with anyio.fail_after(5):
            records = await log.append([pool_event("after")], ALICE)

        assert records[0].position == 2

    async def test_cancelled_leader_still_commits_its_group(
        self, log: EventLog, log_path: str
    ) -> None:
        blocker = sqlite3.connect(log_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        leader_scope = anyio.CancelScope()

        async def append_leader() -> None:
            with leader_scope:
                await log.append([pool_event("leader")], ALICE)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(append_leader)
                await anyio.wait_all_tasks_blocked()
                group.start_soon(log.append, [pool_event("queued")], ALICE)
                await anyio.wait_all_tasks_blocked()
                leader_scope.cancel()
                blocker.execute("ROLLBACK")

        blocker.close()
        streams = [record.stream for record in await read_all(log)]
        assert streams == ["pool/leader", "pool/queued"]
        assert (await log.verify()).ok


class TestLargeGroups:
    async def test_large_batch_spans_several_statements(self, log: EventLog) -> None:
        batch = [pool_event(f"p{index}", 0) for index in range(2500)]

        records = await log.append(batch, ALICE)

        assert [record.position for record in records] == list(range(1, 2501))
        assert log.commit_count == 1
        assert len(await read_all(log)) == 2500
        assert await read_all(log, after=1000) == records[1000:]
        assert [r.position async for r in log.read(verify=True)] == list(range(1, 2501))
        assert (await log.verify()).ok

    async def test_failure_late_in_large_batch_writes_nothing(
        self, log: EventLog, log_path: str
    ) -> None:
        await log.append([pool_event("first")], ALICE)
        execute(
            log_path,
            "CREATE TRIGGER reject_late BEFORE INSERT ON events"
            " WHEN NEW.position = 2200"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        batch = [pool_event(f"p{index}") for index in range(2500)]

        with pytest.raises(AppendFailedError, match="injected failure"):
            await log.append(batch, ALICE)

        assert log.head_position == 1
        assert len(await read_all(log)) == 1
        execute(log_path, "DROP TRIGGER reject_late")
        records = await log.append(batch[:3], ALICE)
        assert records[0].position == 2

    async def test_snapshot_commits_with_appends(self, log: EventLog) -> None:
        await log.append([pool_event("a")], ALICE)
        record_hash = await log.record_hash(1)
        assert record_hash is not None

        async with anyio.create_task_group() as group:
            group.start_soon(log.append, [pool_event("b")], ALICE)
            group.start_soon(
                partial(log.store_snapshot, keep=3), 1, record_hash, b"s", b"h"
            )

        assert log.commit_count == 2
        assert log.last_snapshot_position == 1
        assert [header.position for header in await log.snapshot_headers()] == [1]
        assert await log.snapshot_state(1) == b"s"


class TestFollow:
    async def test_follow_yields_existing_then_live_records(
        self, log: EventLog
    ) -> None:
        await append_pools(log, 2)
        received: list[int] = []
        send, receive = anyio.create_memory_object_stream[Record](10)

        async def follow() -> None:
            async with send:
                async for record in log.follow(after=0):
                    await send.send(record)

        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            with anyio.fail_after(5):
                for _ in range(2):
                    received.append((await receive.receive()).position)

                await log.append([pool_event("live1"), pool_event("live2")], ALICE)
                for _ in range(2):
                    received.append((await receive.receive()).position)

            group.cancel_scope.cancel()

        assert received == [1, 2, 3, 4]

    async def test_follow_starts_after_the_given_position(self, log: EventLog) -> None:
        await append_pools(log, 3)

        with anyio.fail_after(5):
            follower = log.follow(after=2)
            first = await anext(follower)
            await follower.aclose()

        assert first.position == 3

    async def test_follow_ends_when_the_log_closes(self, log_path: str) -> None:
        log = await EventLog.open(log_path)
        await append_pools(log, 1)
        received: list[int] = []

        async def follow() -> None:
            async for record in log.follow():
                received.append(record.position)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(follow)
                await anyio.wait_all_tasks_blocked()
                await log.close()

        assert received == [1]


def _flip_body(path: str) -> None:
    flip_byte(path, 3)


def _truncate_last_body(path: str) -> None:
    execute(
        path,
        "UPDATE events SET body = substr(body, 1, length(body) - 7) WHERE position = 5",
    )


def _delete_middle_record(path: str) -> None:
    execute(path, "DELETE FROM events WHERE position = 3")


def _replace_body_with_garbage(path: str) -> None:
    with sqlite3.connect(path) as connection:
        (previous_hash,) = connection.execute(
            "SELECT hash FROM events WHERE position = 2"
        ).fetchone()
        body = b"not json"
        connection.execute(
            "UPDATE events SET body = ?, hash = ? WHERE position = 3",
            (body, chain_hash(previous_hash, body)),
        )

    connection.close()


def _change_stream_column(path: str) -> None:
    execute(path, "UPDATE events SET stream = 'pool/other' WHERE position = 3")


def _store_as(column: str, expression: str, position: int) -> Callable[[str], None]:
    """Return a corruption that sets ``column`` to ``expression`` at ``position``.

    A column declared BLOB does not stop SQLite from storing TEXT or INTEGER.
    """
    statement = f"UPDATE events SET {column} = {expression} WHERE position = ?"

    def corrupt(path: str) -> None:
        execute(path, statement, (position,))

    return corrupt


# Each case: a change of a column's storage class, its position and the problem.
STORAGE_CLASS_CORRUPTIONS = [
    pytest.param(
        _store_as("body", "CAST(body AS TEXT)", 3),
        3,
        "body is stored as TEXT, expected BLOB",
        id="body-text",
    ),
    pytest.param(
        _store_as("body", "CAST(body AS TEXT)", 5),
        5,
        "body is stored as TEXT, expected BLOB",
        id="last-body-text",
    ),
    pytest.param(
        _store_as("body", "length(body)", 3),
        3,
        "body is stored as INTEGER, expected BLOB",
        id="body-integer",
    ),
    pytest.param(
        _store_as("hash", "CAST(hash AS TEXT)", 3),
        3,
        "hash is stored as TEXT, expected BLOB",
        id="hash-text-not-utf8",
    ),
    pytest.param(
        _store_as("hash", "hex(hash)", 3),
        3,
        "hash is stored as TEXT, expected BLOB",
        id="hash-hex-text",
    ),
    pytest.param(
        _store_as("hash", "CAST(hash AS TEXT)", 1),
        1,
        "hash is stored as TEXT, expected BLOB",
        id="first-hash-text",
    ),
]

CORRUPTIONS = [
    *STORAGE_CLASS_CORRUPTIONS,
    pytest.param(_flip_body, 3, "stored hash differs", id="flipped-byte"),
    pytest.param(_truncate_last_body, 5, "stored hash differs", id="truncated-last"),
    pytest.param(_delete_middle_record, 3, "record is missing", id="deleted-middle"),
    pytest.param(_replace_body_with_garbage, 3, "does not decode", id="undecodable"),
    pytest.param(_change_stream_column, 3, "but the row is pool/other", id="column"),
]


class TestCorruption:
    @pytest.mark.parametrize(("corrupt", "position", "problem"), CORRUPTIONS)
    async def test_verify_names_first_bad_position(
        self,
        log: EventLog,
        log_path: str,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
    ) -> None:
        await append_pools(log, 5)
        corrupt(log_path)

        result = await log.verify()

        assert not result.ok
        assert result.bad_position == position
        assert result.count == position - 1
        assert result.problem is not None
        assert problem in result.problem

    @pytest.mark.parametrize(("corrupt", "position", "problem"), CORRUPTIONS)
    async def test_open_rejects_corrupted_tail(
        self,
        log_path: str,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
    ) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 5)

        corrupt(log_path)

        with pytest.raises(LogCorruptedError) as raised:
            await EventLog.open(log_path)

        assert raised.value.position == position
        assert problem in raised.value.problem
        assert "dstackd repair-log --data-dir" in str(raised.value)

    async def test_open_rejects_non_database_file(self, log_path: str) -> None:
        Path(log_path).write_bytes(b"plain text, not SQLite" * 100)

        with pytest.raises(LogSchemaError, match="cannot use .* as an event log"):
            await EventLog.open(log_path)


class TestStorageClass:
    """Reads of a record whose body or hash is not a BLOB, before the snapshot
    that the open-time check starts from, so only the read finds it."""

    @pytest.fixture
    async def snapshotted(self, log_path: str) -> str:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 5)
            record_hash = await log.record_hash(5)
            assert record_hash is not None
            await log.store_snapshot(5, record_hash, b"s", b"h", keep=1)

        return log_path

    @pytest.mark.parametrize("verify", [True, False])
    @pytest.mark.parametrize(
        ("corrupt", "position", "problem"), STORAGE_CLASS_CORRUPTIONS
    )
    async def test_read_raises_corrupted(
        self,
        snapshotted: str,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
        verify: bool,
    ) -> None:
        corrupt(snapshotted)

        async with await EventLog.open(snapshotted) as log:
            with pytest.raises(LogCorruptedError) as raised:
                [record async for record in log.read(verify=verify)]

        assert raised.value.position == position
        assert raised.value.problem == problem
        assert "dstackd repair-log --data-dir" in str(raised.value)

    async def test_read_after_text_hash_raises(self, snapshotted: str) -> None:
        _store_as("hash", "hex(hash)", 3)(snapshotted)

        async with await EventLog.open(snapshotted) as log:
            with pytest.raises(LogCorruptedError) as raised:
                [record async for record in log.read(3, verify=True)]

        assert raised.value.position == 3
        assert raised.value.problem == "hash is stored as TEXT, expected BLOB"

    async def test_reload_after_failure_stops_appends(
        self, log: EventLog, log_path: str
    ) -> None:
        await append_pools(log, 2)
        _store_as("hash", "hex(hash)", 2)(log_path)
        execute(
            log_path,
            "CREATE TRIGGER reject_all BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        with pytest.raises(AppendFailedError):
            await log.append([pool_event("first")], ALICE)

        execute(log_path, "DROP TRIGGER reject_all")

        with pytest.raises(AppendFailedError) as raised:
            await log.append([pool_event("second")], ALICE)

        assert isinstance(raised.value.__cause__, LogCorruptedError)
        assert raised.value.__cause__.position == 2
        assert raised.value.__cause__.problem == (
            "hash is stored as TEXT, expected BLOB"
        )

    @pytest.mark.parametrize(
        ("corrupt", "position", "problem"), STORAGE_CLASS_CORRUPTIONS
    )
    async def test_repair_cuts_at_the_record(
        self,
        log_path: str,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
    ) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 5)

        corrupt(log_path)

        result = await repair(log_path)

        assert result.bad_position == position
        assert result.removed == 5 - position + 1
        async with await EventLog.open(log_path) as log:
            assert log.head_position == position - 1
            assert (await log.verify()).ok


class TestRepair:
    async def test_repair_backs_up_and_cuts(self, log_path: str) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 6)

        flip_byte(log_path, 4)
        damaged = Path(log_path).read_bytes()

        result = await repair(log_path)

        assert result.bad_position == 4
        assert result.removed == 3
        assert result.head_position == 3
        assert result.backup_path is not None
        assert os.path.basename(result.backup_path).startswith("events.db.bak-")
        assert Path(result.backup_path).read_bytes() == damaged
        async with await EventLog.open(log_path) as log:
            assert log.head_position == 3
            assert (await log.verify()).ok
            records = await log.append([pool_event("after")], ALICE)

        assert records[0].position == 4

    async def test_repair_backs_up_the_wal_too(
        self, log_path: str, tmp_path: Path
    ) -> None:
        # A copy taken while the writer is open has a -wal, as after a crash,
        # and here the damaged record is only in that -wal.
        live_path = str(tmp_path / "live.db")
        async with await EventLog.open(live_path) as log:
            await append_pools(log, 5)
            flip_byte(live_path, 4)
            for suffix in ("", "-wal"):
                shutil.copyfile(live_path + suffix, log_path + suffix)

        result = await repair(log_path)

        assert result.backup_path is not None
        assert os.path.exists(result.backup_path + "-wal")
        with LogReader.open(result.backup_path) as backup:
            assert backup.verify().bad_position == 4

        with LogReader.open(log_path) as reader:
            assert reader.head()[0] == 3
            assert reader.verify().ok

    async def test_repair_of_an_intact_log_changes_nothing(
        self, log_path: str, tmp_path: Path
    ) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 3)

        before = file_bytes(log_path)
        listing = sorted(os.listdir(tmp_path))

        result = await repair(log_path)

        assert result.backup_path is None
        assert result.removed == 0
        assert result.head_position == 3
        assert file_bytes(log_path) == before
        assert sorted(os.listdir(tmp_path)) == listing

    async def test_repair_removes_snapshots_past_the_cut(self, log_path: str) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 6)
            for position in (2, 5):
                record_hash = await log.record_hash(position)
                assert record_hash is not None
                await log.store_snapshot(position, record_hash, b"s", b"h", keep=3)

        _delete_middle_record(log_path)

        result = await repair(log_path)

        assert result.removed_snapshots == 1
        with LogReader.open(log_path) as reader:
            assert [h.position for h in reader.snapshot_headers()] == [2]


class TestClose:
    async def test_append_after_close_raises(self, log_path: str) -> None:
        log = await EventLog.open(log_path)
        await log.close()

        with pytest.raises(LogClosedError, match="events.db is closed"):
            await log.append([pool_event("a")], ALICE)

    async def test_close_commits_queued_appends(self, log_path: str) -> None:
        log = await EventLog.open(log_path)
        results: list[list[Record]] = []

        async def append_one(index: int) -> None:
            results.append(await log.append([pool_event(f"p{index}")], ALICE))

        async with anyio.create_task_group() as group:
            for index in range(20):
                group.start_soon(append_one, index)

            group.start_soon(log.close)

        assert len(results) == 20
        with LogReader.open(log_path) as reader:
            assert reader.head()[0] == 20

    async def test_close_checkpoints_the_wal(self, log_path: str) -> None:
        async with await EventLog.open(log_path) as log:
            await append_pools(log, 3)

        wal_path = log_path + "-wal"
        assert not os.path.exists(wal_path) or os.path.getsize(wal_path) == 0


# The child appends batches of BATCH_SIZE events, each batch to its own stream,
# from several concurrent tasks, and prints "<stream> <last position>" once
# each batch is acknowledged.
CRASH_WRITER = """
import sys
import anyio
import structlog
from events.event_types import RunStopRequested
from events.log import EventLog
from events.model import DAEMON_ACTOR
from events.record import NewEvent

async def produce(log, producer, batch_size):
    for number in range(1_000_000):
        stream = f"crash/{producer}-{number}"
        batch = [NewEvent(stream, RunStopRequested(stream), expected_version=version)
                 for version in range(batch_size)]
        records = await log.append(batch, DAEMON_ACTOR)
        print(stream, records[-1].position, flush=True)

async def main(path, batch_size):
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    log = await EventLog.open(path)
    async with anyio.create_task_group() as group:
        for producer in range(8):
            group.start_soon(produce, log, producer, batch_size)

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""

BATCH_SIZE = 5


async def test_killed_writer_loses_no_acknowledged_batch(log_path: str) -> None:
    acknowledged: dict[str, int] = {}
    process = await anyio.open_process(
        [sys.executable, "-c", CRASH_WRITER, log_path, str(BATCH_SIZE)],
        stderr=None,
    )
    try:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(30):
            while len(acknowledged) < 300:
                buffer += await process.stdout.receive()
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    stream, position = line.decode().split()
                    acknowledged[stream] = int(position)
    finally:
        process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await process.wait()

        await process.aclose()

    async with await EventLog.open(log_path) as log:
        assert (await log.verify()).ok
        records = await read_all(log)

    versions: dict[str, list[int]] = {}
    positions: dict[str, int] = {}
    for record in records:
        versions.setdefault(record.stream, []).append(record.version)
        positions[record.stream] = record.position

    missing = [stream for stream in acknowledged if stream not in versions]
    partial = {
        stream: found
        for stream, found in versions.items()
        if found != list(range(1, BATCH_SIZE + 1))
    }
    moved = [s for s, p in acknowledged.items() if positions.get(s) != p]
    assert missing == []
    assert partial == {}
    assert moved == []
