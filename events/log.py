"""The event log file and its writer: group commit, expected versions, follow.

``EventLog`` owns one SQLite database in WAL mode (schema in
``events.log_reader``) and is the only code that writes to it. Appends are
queued, and one task at a time takes the writer role and commits everything
queued so far in one transaction (group commit). Each append thus waits for
one durable commit, which a burst of appends shares. Records are read on a
second connection, which reads only committed data.
"""

import asyncio
import datetime
import functools
import itertools
import os
import pathlib
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Literal, Self

import aiosqlite
import anyio
import anyio.lowlevel
import msgspec
import structlog

from events.errors import (
    DstackdError,
    LogClosedError,
    LogCorruptedError,
    VersionConflictError,
)
from events.log_reader import (
    CHUNK_ROWS,
    MMAP_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    SELECT_ROWS,
    ChainBreak,
    CheckedRecord,
    LogSchemaError,
    Row,
    SnapshotChunk,
    SnapshotHeader,
    VerifyResult,
    blob_problem,
    check_rows,
    check_schema,
    decode_text,
    newest_valid_snapshot,
    repair_hint,
    verify_connection,
)
from events.model import Actor
from events.record import (
    GENESIS_HASH,
    NewEvent,
    Record,
    chain_hash,
    decode_body,
    encode_body,
)

logger = structlog.get_logger(__name__)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
SYNCHRONOUS_LEVELS: tuple[Synchronous, ...] = ("OFF", "NORMAL", "FULL", "EXTRA")

# Events per transaction. A group stops growing past this, but a single batch
# larger than it still goes in whole, because a batch is atomic.
MAX_GROUP_EVENTS = 8192

# WAL size in pages at which a commit also checkpoints the WAL into the
# database. SQLite's default of 1000 made grouped appends about 15% slower in
# bench/append.py, because each checkpoint copies and syncs the pages that the
# commits since the last one rewrote (every commit rewrites the index page of
# each stream it touches).
WAL_CHECKPOINT_PAGES = 4096

# Streams per version query; well below SQLite's limit on bound parameters.
_STREAMS_PER_QUERY = 500

# Rows per INSERT statement: 5 parameters each, far below SQLite's limit of
# 32,766 bound parameters (since 3.32).
_ROWS_PER_INSERT = 1000
_INSERT_SNAPSHOT = (
    "INSERT OR REPLACE INTO snapshots"
    " (position, record_hash, state, state_hash, created_at) VALUES (?, ?, ?, ?, ?)"
)
_PRUNE_SNAPSHOTS = (
    "DELETE FROM snapshots WHERE position NOT IN"
    " (SELECT position FROM snapshots ORDER BY position DESC LIMIT ?)"
)
_INSERT_CHUNK = (
    "INSERT OR REPLACE INTO snapshot_chunks"
    " (position, number, last_position, chunk_index, entries) VALUES (?, ?, ?, ?, ?)"
)
_REFER_CHUNK = (
    "UPDATE snapshot_chunks SET last_position = ? WHERE position = ? AND number = ?"
)
_PRUNE_CHUNKS = (
    "DELETE FROM snapshot_chunks"
    " WHERE last_position < (SELECT MIN(position) FROM snapshots)"
)


class AppendFailedError(DstackdError):
    """A group commit failed; every append of that group failed with it."""

    def __init__(self, path: str, cause: BaseException) -> None:
        self.path = path
        super().__init__(
            f"append to event log {path} failed: {cause}; the batch was not "
            "acknowledged, so reload the state before retrying"
        )


class RepairResult(msgspec.Struct, frozen=True):
    """What ``repair`` did.

    ``backup_path`` is ``None`` when the log was intact and nothing changed.
    Otherwise the database was copied there, and its ``-wal`` to the same
    name with the ``-wal`` suffix, before the ``removed`` records from
    ``bad_position`` on were deleted.
    """

    backup_path: str | None
    head_position: int
    removed: int
    removed_snapshots: int = 0
    bad_position: int | None = None
    problem: str | None = None


def default_clock() -> int:
    """Return the current UTC time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


_QUEUED = 0
_LEADING = 1
_TAKEN = 2
_DONE = 3


class _Request:
    """Something queued for the writer.

    Its task waits on ``waiter`` until the request is done or the task is to
    take over the writer role, and ``state`` records which. ``waiter`` is a
    bare asyncio future rather than an ``anyio.Event`` because aiosqlite binds
    the log to asyncio anyway, and the lighter future raised grouped appends by
    about 10% in bench/append.py.
    """

    __slots__ = ("error", "state", "waiter")

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.state = _QUEUED
        self.error: BaseException | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Append(_Request):
    __slots__ = ("actor", "entries", "records")

    def __init__(self, entries: tuple[NewEvent, ...], actor: Actor) -> None:
        super().__init__()
        self.entries = entries
        self.actor = actor
        self.records: list[Record] = []


class _SnapshotWrite(_Request):
    __slots__ = (
        "chunk_refs",
        "chunks",
        "data",
        "keep",
        "position",
        "record_hash",
        "state_hash",
    )

    def __init__(
        self,
        position: int,
        record_hash: bytes,
        data: bytes,
        state_hash: bytes,
        keep: int,
        chunks: Sequence[SnapshotChunk],
        chunk_refs: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__()
        self.position = position
        self.record_hash = record_hash
        self.data = data
        self.state_hash = state_hash
        self.keep = keep
        self.chunks = chunks
        self.chunk_refs = chunk_refs


class _Barrier(_Request):
    """Completes once everything queued before it is done."""

    __slots__ = ()


class _FileState(msgspec.Struct, frozen=True):
    head_position: int
    head_hash: bytes
    last_recorded_at: int
    last_snapshot_position: int
    verified: int


class EventLog:
    """An append-only, hash-chained event log in one SQLite file.

    Create it with ``await EventLog.open(path)`` and close it with ``close()``
    (or use it as an async context manager). Methods must be called from the
    event loop that opened it; aiosqlite ties the log to asyncio.
    """

    def __init__(
        self,
        path: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        clock: Callable[[], int],
        file_state: _FileState,
    ) -> None:
        self._path = path
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self._head_position = file_state.head_position
        self._head_hash = file_state.head_hash
        self._last_recorded_at = file_state.last_recorded_at
        self._last_snapshot_position = file_state.last_snapshot_position
        # NOTE: one entry per stream appended to or checked since open; a
        # daemon that touches millions of streams keeps them all in memory.
        self._versions: dict[str, int] = {}
        self._queue: deque[_Request] = deque()
        self._writing = False
        self._closed = False
        self._closed_event = anyio.Event()
        self._committed = anyio.Event()
        self._broken: BaseException | None = None
        self._commit_count = 0

    # Opening and closing

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], int] | None = None,
        create: bool = True,
    ) -> Self:
        """Open the log at ``path`` for appending, creating it if ``create``.

        The chain is verified from the newest snapshot that matches the log
        (or from the first record when there is none) to the head, so a torn
        or corrupt tail is found here rather than by a later replay.

        NOTE: without a snapshot that means the whole log. In bench/replay.py
        that took about 3 s for 1,000,000 records, against 5 to 80 ms with a
        snapshot at the head.

        Args:
            synchronous: SQLite's ``synchronous`` level. ``FULL`` makes an
                acknowledged append survive power loss.
            clock: returns UTC microseconds; ``recorded_at`` comes from it and
                never goes backwards.

        Raises:
            FileNotFoundError: the file (with ``create=False``) or its
                directory does not exist.
            LogCorruptedError: a record in the verified tail is bad.
            LogSchemaError: the file is not a log this code can write.
        """
        path = os.fspath(path)
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(
                f"invalid synchronous {synchronous!r}: expected one of "
                f"{', '.join(SYNCHRONOUS_LEVELS)}"
            )

        started = time.perf_counter()
        file_state = await anyio.to_thread.run_sync(_prepare_file, path, create)
        # Autocommit: the writer opens its transactions explicitly (``_write``).
        writer = await aiosqlite.connect(path, timeout=30.0, isolation_level=None)
        reader = None
        try:
            await writer.execute(f"PRAGMA synchronous = {synchronous}")
            await writer.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            reader = await aiosqlite.connect(
                _as_uri(path, "ro"), uri=True, timeout=30.0, isolation_level=None
            )
            await reader.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            reader.text_factory = decode_text
        except BaseException:
            # aiosqlite's threads are not daemon threads: an unclosed connection
            # keeps the process from exiting.
            with anyio.CancelScope(shield=True):
                if reader is not None:
                    await reader.close()

                await writer.close()

            raise

        logger.info(
            "log_opened",
            path=path,
            head_position=file_state.head_position,
            verified_records=file_state.verified,
            snapshot_position=file_state.last_snapshot_position,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

        return cls(path, writer, reader, clock or default_clock, file_state)

    async def close(self) -> None:
        """Commit what is queued, checkpoint the WAL into the database and close.

        Appends made after ``close`` began raise ``LogClosedError``, and running
        ``follow`` iterators end. Closing is shielded from cancellation, so it
        completes inside a cancelled scope too, as in a ``finally`` block.
        """
        if self._closed:
            await self._closed_event.wait()
            return

        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._enqueue(_Barrier())
            finally:
                self._notify_followers()
                await self._close_connections()
                self._closed_event.set()

        logger.info("log_closed", path=self._path, head_position=self._head_position)

    async def _close_connections(self) -> None:
        try:
            await self._reader.close()
            await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            logger.warning("log_checkpoint_failed", path=self._path, error=str(exc))
        finally:
            await self._writer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # State

    @property
    def path(self) -> str:
        return self._path

    @property
    def head_position(self) -> int:
        """Position of the newest committed record (0 for an empty log)."""
        return self._head_position

    @property
    def head_hash(self) -> bytes:
        """Hash of the newest committed record (``GENESIS_HASH`` when empty)."""
        return self._head_hash

    @property
    def commit_count(self) -> int:
        """Transactions committed since open; lower than the append count when
        appends were grouped."""
        return self._commit_count

    @property
    def last_snapshot_position(self) -> int:
        """Position of the newest snapshot in the file, valid or not (0: none)."""
        return self._last_snapshot_position

    @property
    def closed(self) -> bool:
        return self._closed

    async def stream_version(self, stream: str) -> int:
        """Return the committed version of ``stream`` (0 when it has no events)."""
        version = self._versions.get(stream)
        if version is not None:
            return version

        # Reading through the writer's cache would race with a commit in
        # flight, so an uncached stream is read from the file and not cached.
        rows = await self._read_query(
            "SELECT MAX(version) FROM events WHERE stream = ?", (stream,)
        )

        return next(iter(rows))[0] or 0

    # Appending

    async def append(self, entries: Sequence[NewEvent], actor: Actor) -> list[Record]:
        """Append ``entries`` as one atomic batch and wait until it is durable.

        Returns the records as written, in order. An append cancelled after its
        group started committing may still be committed.

        Raises:
            VersionConflictError: an entry's ``expected_version`` is not the
                stream's version; nothing of this batch was written.
            AppendFailedError: the group's commit failed; nothing of this batch
                was acknowledged.
            LogClosedError: the log is closed.
        """
        if not entries:
            return []

        request = _Append(tuple(entries), actor)
        await self._submit(request)

        return request.records

    async def store_snapshot(
        self,
        position: int,
        record_hash: bytes,
        state: bytes,
        state_hash: bytes,
        *,
        keep: int,
        chunks: Sequence[SnapshotChunk] = (),
        chunk_refs: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Store a snapshot row and its new archive ``chunks`` in the next
        group's transaction, and delete all but the newest ``keep`` snapshots.

        ``chunk_refs`` lists the ``(position, number)`` of every stored chunk
        the snapshot refers to besides ``chunks``. Chunks that no kept snapshot
        refers to any more are deleted. ``events.snapshot.save_snapshot``
        validates and encodes the state; call that instead of this.
        """
        if keep < 1:
            raise ValueError(f"invalid keep {keep}: expected at least 1")

        request = _SnapshotWrite(
            position, record_hash, state, state_hash, keep, chunks, chunk_refs
        )
        await self._submit(request)

    async def _submit(self, request: _Request) -> None:
        if self._closed:
            raise LogClosedError(self._path)

        if self._broken is not None:
            raise AppendFailedError(self._path, self._broken) from self._broken

        await self._enqueue(request)

    async def _enqueue(self, request: _Request) -> None:
        """Queue ``request`` and return when it is done, taking the writer role
        when no task has it or when it is handed over."""
        self._queue.append(request)
        if self._writing:
            try:
                request.waiter = asyncio.get_running_loop().create_future()
                await request.waiter
            except BaseException:
                self._abandon(request)
                raise
        else:
            self._writing = True
            request.state = _LEADING

        if request.state == _LEADING:
            await self._lead()

        if request.error is not None:
            raise request.error

    async def _lead(self) -> None:
        """Commit one group, which contains this task's own request, then pass
        the writer role on.

        The commit is shielded from cancellation: the other tasks of the group
        wait for its outcome.
        """
        try:
            with anyio.CancelScope(shield=True):
                # Let the tasks that are ready to run queue their appends, so
                # they join this group instead of waiting for the next one.
                await anyio.lowlevel.checkpoint()
                await self._commit_group(self._take_group())
        finally:
            self._hand_off()

    def _abandon(self, request: _Request) -> None:
        """Forget a request whose task was cancelled before it was committed."""
        if request.state in (_QUEUED, _LEADING):
            self._queue.remove(request)
            if request.state == _LEADING:
                self._hand_off()

    def _hand_off(self) -> None:
        """Pass the writer role to the oldest queued request's task, if any."""
        if self._queue:
            successor = self._queue[0]
            successor.state = _LEADING
            successor.wake()
        else:
            self._writing = False

    def _take_group(self) -> list[_Request]:
        group: list[_Request] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            request_size = len(request.entries) if isinstance(request, _Append) else 0
            if group and size + request_size > MAX_GROUP_EVENTS:
                break

            self._queue.popleft()
            request.state = _TAKEN
            group.append(request)
            size += request_size

        return group

    async def _commit_group(self, group: list[_Request]) -> None:
        """Write every request of ``group`` in one transaction and finish them.

        A batch with a stale expected version fails alone; a failed commit
        fails the whole group and reloads the head from the file.
        """
        appends = [request for request in group if isinstance(request, _Append)]
        snapshots = [
            request for request in group if isinstance(request, _SnapshotWrite)
        ]
        try:
            # Step 1: load the versions of streams not seen since open.
            await self._load_versions(appends)

            # Step 2: check expected versions and build the rows, batch by batch.
            builder = _GroupBuilder(
                self._head_position, self._head_hash, self._versions
            )
            recorded_at = self._last_recorded_at
            if appends:
                recorded_at = max(recorded_at, self._clock())

            rows = builder.build(appends, recorded_at)

            # Step 3: write and commit everything that passed.
            if rows or snapshots:
                await self._write(rows, snapshots)
                self._publish(builder, recorded_at, snapshots)
        except Exception as exc:  # noqa: BLE001
            # Any failure must end in failed appends, never in waiters that
            # are never woken.
            await self._fail_group(group, exc)
        finally:
            for request in group:
                request.state = _DONE
                request.wake()

    async def _load_versions(self, appends: list[_Append]) -> None:
        unknown = sorted(
            {
                entry.stream
                for request in appends
                for entry in request.entries
                if entry.stream not in self._versions
            }
        )
        for start in range(0, len(unknown), _STREAMS_PER_QUERY):
            streams = unknown[start : start + _STREAMS_PER_QUERY]
            placeholders = ", ".join("?" * len(streams))
            rows = await self._writer.execute_fetchall(
                "SELECT stream, MAX(version) FROM events"
                f" WHERE stream IN ({placeholders}) GROUP BY stream",
                streams,
            )
            found = dict(rows)  # type: ignore[arg-type]
            for stream in streams:
                self._versions[stream] = found.get(stream, 0)

    async def _write(self, rows: list[Row], snapshots: list[_SnapshotWrite]) -> None:
        """Write ``rows`` and ``snapshots`` in one transaction and commit it.

        A group that fits one statement is written as one multi-row INSERT in
        autocommit mode, which SQLite runs as one transaction. The group then
        needs one round trip to the connection's thread, not one for the
        insert and one for the COMMIT. In bench/append.py on a 2-core VM that
        raised grouped appends from about 38,000 to 42,000 events/s. Larger
        groups and snapshots use BEGIN ... COMMIT.
        """
        writer = self._writer
        if not snapshots and len(rows) <= _ROWS_PER_INSERT:
            await writer.execute(_insert_statement(len(rows)), _flatten(rows))
            return

        await writer.execute("BEGIN IMMEDIATE")
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            await writer.execute(_insert_statement(len(chunk)), _flatten(chunk))

        for snapshot in snapshots:
            await self._write_snapshot(snapshot)

        await writer.execute("COMMIT")

    async def _write_snapshot(self, snapshot: _SnapshotWrite) -> None:
        """Write a snapshot and its chunks inside the open transaction."""
        writer = self._writer
        position = snapshot.position
        await writer.executemany(
            _INSERT_CHUNK,
            [
                (chunk.position, chunk.number, position, chunk.index, chunk.entries)
                for chunk in snapshot.chunks
            ],
        )
        await writer.executemany(
            _REFER_CHUNK,
            [(position, *chunk_ref) for chunk_ref in snapshot.chunk_refs],
        )
        await writer.execute(
            _INSERT_SNAPSHOT,
            (
                position,
                snapshot.record_hash,
                snapshot.data,
                snapshot.state_hash,
                self._clock(),
            ),
        )
        await writer.execute(_PRUNE_SNAPSHOTS, (snapshot.keep,))
        await writer.execute(_PRUNE_CHUNKS)

    def _publish(
        self,
        builder: "_GroupBuilder",
        recorded_at: int,
        snapshots: list[_SnapshotWrite],
    ) -> None:
        """Make a committed group visible: head, versions, followers."""
        if builder.position != self._head_position:
            self._head_position = builder.position
            self._head_hash = builder.previous_hash
            self._last_recorded_at = recorded_at

        self._versions.update(builder.versions)
        for snapshot in snapshots:
            self._last_snapshot_position = max(
                self._last_snapshot_position, snapshot.position
            )

        self._commit_count += 1
        self._notify_followers()

    async def _fail_group(self, group: list[_Request], exc: Exception) -> None:
        logger.error(
            "append_failed",
            path=self._path,
            error=str(exc),
            error_type=type(exc).__name__,
            group_size=len(group),
        )
        for request in group:
            if request.error is None and not isinstance(request, _Barrier):
                error = AppendFailedError(self._path, exc)
                error.__cause__ = exc
                request.error = error

            if isinstance(request, _Append):
                request.records = []

        await self._reload_head()

    async def _reload_head(self) -> None:
        """Read the head back from the file after a failed commit, so that the
        next group chains from what is really stored."""
        try:
            if self._writer.in_transaction:
                await self._writer.execute("ROLLBACK")

            rows = list(
                await self._writer.execute_fetchall(
                    "SELECT position, hash, body FROM events"
                    " ORDER BY position DESC LIMIT 1"
                )
            )
            snapshot_rows = list(
                await self._writer.execute_fetchall(
                    "SELECT MAX(position) FROM snapshots"
                )
            )
        except (sqlite3.Error, ValueError) as exc:
            # Without a trustworthy head, later appends could fork the chain.
            self._broken = exc
            logger.error("log_reload_failed", path=self._path, error=str(exc))
            return

        self._versions.clear()
        self._last_snapshot_position = snapshot_rows[0][0] or 0
        previous_head = self._head_position
        if rows:
            position, head_hash, body = rows[0]
            problem = blob_problem("hash", head_hash)
            if problem is not None:
                self._broken = LogCorruptedError(
                    self._path, position, problem, repair_hint(self._path)
                )
                logger.error("log_reload_failed", path=self._path, error=problem)
                return

            self._head_position = position
            self._head_hash = head_hash
            self._last_recorded_at = max(
                self._last_recorded_at, decode_body(body).recorded_at
            )
        else:
            self._head_position = 0
            self._head_hash = GENESIS_HASH

        if self._head_position != previous_head:
            # The commit reached the file although SQLite reported a failure.
            self._notify_followers()

    def _notify_followers(self) -> None:
        committed = self._committed
        self._committed = anyio.Event()
        committed.set()

    # Reading

    async def read(
        self, after: int = 0, *, verify: bool = False
    ) -> AsyncIterator[Record]:
        """Yield the committed records after position ``after`` in order.

        With ``verify``, the chain is checked from the stored hash at ``after``
        and ``LogCorruptedError`` is raised at the first bad position.
        """
        async for record, _, _ in self.read_raw(after, verify=verify):
            yield record

    async def read_raw(
        self, after: int = 0, *, verify: bool = False
    ) -> AsyncIterator[CheckedRecord]:
        """Yield ``(record, body, hash)`` for each committed record after ``after``.

        ``body`` is the stored JSON, byte for byte; export and the socket API
        send it as is.
        """
        async for chunk in self.read_chunks(after, verify=verify):
            for item in chunk:
                yield item

    async def read_chunks(
        self, after: int = 0, *, verify: bool = False
    ) -> AsyncIterator[list[CheckedRecord]]:
        """Yield the ``(record, body, hash)`` of the records after ``after`` in
        lists of up to ``CHUNK_ROWS``, one query each.

        With ``verify``, a list ends before the first bad record, and
        ``LogCorruptedError`` is raised after it.
        """
        position = after
        previous_hash = await self._start_hash(after) if verify else GENESIS_HASH
        while True:
            rows = await self._fetch(position)
            if verify:
                checked, broken = check_rows(rows, position, previous_hash)
            else:
                checked, broken = _decode_rows(rows)

            if checked:
                yield checked

            if broken is not None:
                raise LogCorruptedError(
                    self._path, broken.position, broken.problem, repair_hint(self._path)
                )

            if len(rows) < CHUNK_ROWS:
                return

            position = rows[-1][0]
            previous_hash = rows[-1][4]

    async def follow(self, after: int = 0) -> AsyncIterator[Record]:
        """Yield the records after ``after``, then each new one once committed.

        The iterator waits for commits (no polling) and ends when the log
        closes.
        """
        async for record, _, _ in self.follow_raw(after):
            yield record

    async def follow_raw(self, after: int = 0) -> AsyncIterator[CheckedRecord]:
        """Yield ``(record, body, hash)`` like ``follow``."""
        position = after
        while not self._closed:
            try:
                async for item in self.read_raw(position):
                    yield item
                    position = item[0].position
            except LogClosedError:
                return

            # No await between this check and taking the event, so a commit
            # cannot slip in unnoticed.
            if self._head_position <= position and not self._closed:
                await self._committed.wait()

    async def record_hash(self, position: int) -> bytes | None:
        """Return the stored hash at ``position`` (``GENESIS_HASH`` for 0)."""
        if position == 0:
            return GENESIS_HASH

        rows = list(
            await self._read_query(
                "SELECT hash FROM events WHERE position = ?", (position,)
            )
        )

        return rows[0][0] if rows else None

    async def snapshot_headers(self) -> list[SnapshotHeader]:
        """Return every snapshot's header, newest position first."""
        rows = await self._read_query(
            "SELECT position, record_hash, state_hash, created_at FROM snapshots"
            " ORDER BY position DESC",
            (),
        )

        return [SnapshotHeader(*row) for row in rows]

    async def snapshot_state(self, position: int) -> bytes | None:
        rows = list(
            await self._read_query(
                "SELECT state FROM snapshots WHERE position = ?", (position,)
            )
        )

        return bytes(rows[0][0]) if rows else None

    async def verify(self) -> VerifyResult:
        """Check the whole chain from the first record to the head.

        Runs on its own connection in a worker thread, so appends and reads
        continue meanwhile. Records committed during the check may or may not
        be included.
        """
        return await anyio.to_thread.run_sync(_verify_file, self._path)

    async def _start_hash(self, after: int) -> bytes:
        start_hash = await self.record_hash(after)
        if start_hash is not None:
            problem = blob_problem("hash", start_hash)
            if problem is not None:
                raise LogCorruptedError(
                    self._path, after, problem, repair_hint(self._path)
                )

            return start_hash

        if after >= self._head_position:
            # Nothing follows ``after``, so no hash is ever compared with it.
            return self._head_hash

        raise LogCorruptedError(
            self._path, after, "record is missing", repair_hint(self._path)
        )

    async def _fetch(self, after: int) -> list[Row]:
        # Each chunk is its own query, so no statement stays open between
        # chunks to hold back WAL checkpoints while a consumer is slow.
        rows = await self._read_query(SELECT_ROWS + " LIMIT ?", (after, CHUNK_ROWS))

        return list(rows)  # type: ignore[arg-type]

    async def _read_query(
        self, query: str, parameters: tuple[object, ...]
    ) -> Iterable[sqlite3.Row]:
        try:
            return await self._reader.execute_fetchall(query, parameters)
        except (ValueError, sqlite3.ProgrammingError):
            # aiosqlite raises ValueError once its connection is closed.
            if self._closed:
                raise LogClosedError(self._path) from None

            raise


class _GroupBuilder:
    """Turns the batches of one group into rows, checking expected versions.

    ``position``, ``previous_hash`` and ``versions`` advance only past batches
    that passed, so a failed batch leaves no gap and no trace.
    """

    def __init__(
        self, position: int, previous_hash: bytes, committed_versions: dict[str, int]
    ) -> None:
        self.position = position
        self.previous_hash = previous_hash
        self.versions: dict[str, int] = {}
        self._committed_versions = committed_versions

    def build(self, appends: list[_Append], recorded_at: int) -> list[Row]:
        rows: list[Row] = []
        for request in appends:
            try:
                batch_rows, records = self._build_batch(request, recorded_at)
            except (VersionConflictError, msgspec.EncodeError, TypeError) as exc:
                request.error = exc
                continue

            rows.extend(batch_rows)
            request.records = records

        return rows

    def _build_batch(
        self, request: _Append, recorded_at: int
    ) -> tuple[list[Row], list[Record]]:
        position = self.position
        previous_hash = self.previous_hash
        versions: dict[str, int] = {}
        rows = []
        records = []
        for entry in request.entries:
            stream = entry.stream
            current = versions.get(stream)
            if current is None:
                current = self.versions.get(stream)
            if current is None:
                current = self._committed_versions[stream]

            expected = entry.expected_version
            if expected is not None and expected != current:
                raise VersionConflictError(stream, expected, current)

            position += 1
            version = current + 1
            record = Record(
                position, stream, version, recorded_at, request.actor, entry.event
            )
            body = encode_body(record)
            previous_hash = chain_hash(previous_hash, body)
            versions[stream] = version
            rows.append((position, stream, version, body, previous_hash))
            records.append(record)

        self.position = position
        self.previous_hash = previous_hash
        self.versions.update(versions)

        return rows, records


def _decode_rows(rows: list[Row]) -> tuple[list[CheckedRecord], ChainBreak | None]:
    """Decode rows without checking the chain, up to the first body or hash
    that is not a BLOB, because readers send bodies on as bytes and chain from
    the hashes."""
    decoded: list[CheckedRecord] = []
    for position, _, _, body, stored_hash in rows:
        problem = blob_problem("body", body) or blob_problem("hash", stored_hash)
        if problem is not None:
            return decoded, ChainBreak(position, problem)

        decoded.append((decode_body(body), body, stored_hash))

    return decoded, None


# File-level work that runs in worker threads on its own stdlib connection.


@functools.cache
def _insert_statement(row_count: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * row_count)

    return f"INSERT INTO events (position, stream, version, body, hash) VALUES {values}"


def _flatten(rows: list[Row]) -> list[object]:
    return list(itertools.chain.from_iterable(rows))


def _as_uri(path: str, mode: str) -> str:
    return pathlib.Path(path).absolute().as_uri() + f"?mode={mode}"


def _prepare_file(path: str, create: bool) -> _FileState:
    """Create or check the schema, then verify the tail of the chain.

    Raises:
        LogCorruptedError: naming the first bad position after the newest
            snapshot that matches the log.
    """
    if not create and not os.path.isfile(path):
        raise FileNotFoundError(f"event log {path} not found")

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory} of event log {path} not found")

    connection = sqlite3.connect(
        _as_uri(path, "rwc" if create else "rw"), uri=True, isolation_level=None
    )
    connection.text_factory = decode_text
    try:
        _create_schema(connection, path)

        snapshot_position, snapshot_hash = newest_valid_snapshot(connection)
        result = verify_connection(connection, snapshot_position, snapshot_hash)
        if not result.ok:
            assert result.bad_position is not None
            raise LogCorruptedError(
                path, result.bad_position, result.problem or "", repair_hint(path)
            )

        row = connection.execute(
            "SELECT body FROM events ORDER BY position DESC LIMIT 1"
        ).fetchone()
        last_recorded_at = decode_body(row[0]).recorded_at if row else 0
        last_snapshot = connection.execute("SELECT MAX(position) FROM snapshots")

        return _FileState(
            head_position=snapshot_position + result.count,
            head_hash=result.head_hash,
            last_recorded_at=last_recorded_at,
            last_snapshot_position=last_snapshot.fetchone()[0] or 0,
            verified=result.count,
        )
    finally:
        connection.close()


def _create_schema(connection: sqlite3.Connection, path: str) -> None:
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(SCHEMA)
        connection.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:
        # Raised for a file that is not an SQLite database at all.
        raise LogSchemaError(path, str(exc)) from exc

    check_schema(connection, path)


def _verify_file(path: str) -> VerifyResult:
    connection = sqlite3.connect(_as_uri(path, "ro"), uri=True, isolation_level=None)
    connection.text_factory = decode_text
    try:
        return verify_connection(connection)
    finally:
        connection.close()


async def repair(path: str | os.PathLike[str]) -> RepairResult:
    """Cut the log at its first bad record, keeping a backup of the file.

    Checks the whole chain; when it is intact nothing changes. Otherwise the
    database (and its ``-wal``) is copied to ``<name>.bak-<UTC time>`` and
    every record from the first bad position on is deleted, with the
    snapshots at or past it. Run it with no writer open on the log: it takes
    the write lock and fails with ``sqlite3.OperationalError`` when a writer
    holds it.
    """
    return await anyio.to_thread.run_sync(repair_file, os.fspath(path))


def repair_file(path: str) -> RepairResult:
    """Do what ``repair`` does, synchronously, for callers without an event loop."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"event log {path} not found")

    connection = sqlite3.connect(_as_uri(path, "rw"), uri=True, isolation_level=None)
    connection.text_factory = decode_text
    try:
        check_schema(connection, path)
        # Hold the write lock from the check through the delete, so that the
        # backup and the cut describe the same file.
        connection.execute("BEGIN IMMEDIATE")
        result = verify_connection(connection)
        if result.ok:
            connection.execute("ROLLBACK")
            return RepairResult(backup_path=None, head_position=result.count, removed=0)

        assert result.bad_position is not None
        backup_path = _backup_files(path)
        removed = connection.execute(
            "DELETE FROM events WHERE position >= ?", (result.bad_position,)
        ).rowcount
        removed_snapshots = connection.execute(
            "DELETE FROM snapshots WHERE position >= ?", (result.bad_position,)
        ).rowcount
        if _has_table(connection, "snapshot_chunks"):
            # Chunks stored at or after the cut belong only to removed snapshots.
            connection.execute(
                "DELETE FROM snapshot_chunks WHERE position >= ?",
                (result.bad_position,),
            )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")

        raise
    finally:
        connection.close()

    logger.warning(
        "log_repaired",
        path=path,
        backup_path=backup_path,
        bad_position=result.bad_position,
        problem=result.problem,
        removed=removed,
        removed_snapshots=removed_snapshots,
    )

    return RepairResult(
        backup_path=backup_path,
        head_position=result.bad_position - 1,
        removed=removed,
        removed_snapshots=removed_snapshots,
        bad_position=result.bad_position,
        problem=result.problem,
    )


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    row = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()

    return row is not None


def _backup_files(path: str) -> str:
    """Copy the database and its ``-wal`` to a new backup name, durably."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = f"{path}.bak-{stamp}"
    suffix = 1
    while os.path.exists(backup):
        suffix += 1
        backup = f"{path}.bak-{stamp}-{suffix}"

    for source, target in ((path, backup), (path + "-wal", backup + "-wal")):
        if not os.path.exists(source):
            continue

        shutil.copyfile(source, target)
        with open(target, "rb") as copied:
            os.fsync(copied.fileno())

    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

    return backup
