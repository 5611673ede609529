"""Offline, read-only access to an event log file, and the checks both sides share.

This module owns the file's schema (tables ``events``, ``snapshots``,
``snapshot_chunks`` and ``meta``), the hash-chain check that ``EventLog`` and ``LogReader`` both run,
and ``LogReader``: a synchronous reader on the standard library's ``sqlite3``
for offline tools (``dstackctl events verify``, replay, export). It imports
neither anyio nor aiosqlite, so a command-line tool that reads a log starts
fast. Only ``events.log.EventLog`` writes to a log file.
"""

import hashlib
import os
import pathlib
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Literal, NoReturn, Self

import msgspec

from events.errors import DstackdError, LogCorruptedError
from events.record import GENESIS_HASH, Record

SCHEMA_VERSION = 1

# ``state`` is the last column of ``snapshots`` because SQLite reaches the
# columns after a large value by walking its overflow pages: reading the
# headers of a 100 MB snapshot took 85 ms with ``state`` in the middle. For the
# same reason ``entries``, the larger part of an archive chunk, comes last.
#
# ``snapshot_chunks`` contains the archive of ended runs and instances that
# snapshots refer to (see ``events.snapshot``). A chunk is stored once, by the
# snapshot at ``position``, and ``last_position`` is the newest snapshot that
# refers to it; one older than every kept snapshot is deleted. Readers treat a
# file without the table, written before it existed, as having no chunks.
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    hash BLOB NOT NULL,
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    position INTEGER PRIMARY KEY,
    record_hash BLOB NOT NULL,
    state_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    position INTEGER NOT NULL,
    number INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    chunk_index BLOB NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (position, number)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Bytes of a log file that a read-only connection maps into memory; SQLite
# reads the rest with read() calls and caps the map at 2 GiB by default.
MMAP_BYTES = 1 << 30

# Attempts to copy a log whose writer checkpoints it meanwhile.
COPY_ATTEMPTS = 10

# Rows fetched per query or fetchmany call. Large enough that per-call overhead
# vanishes next to hashing and decoding; larger chunks measured slower in
# replay, as they no longer fit the CPU caches.
CHUNK_ROWS = 512

SELECT_ROWS = (
    "SELECT position, stream, version, body, hash FROM events"
    " WHERE position > ? ORDER BY position"
)
SELECT_BODIES = "SELECT body, hash FROM events WHERE position > ? ORDER BY position"
SELECT_BODIES_UNTIL = (
    "SELECT body, hash FROM events WHERE position > ? AND position <= ?"
    " ORDER BY position"
)
SELECT_ROWS_UNTIL = (
    "SELECT position, stream, version, body, hash FROM events"
    " WHERE position > ? AND position <= ? ORDER BY position"
)


class LogSchemaError(DstackdError):
    """A file is not an event log, or was written by a newer schema version."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"cannot use {path} as an event log: {problem}")


class VerifyResult(msgspec.Struct, frozen=True):
    """Outcome of checking a hash chain.

    ``count`` is the number of records that checked out and ``head_hash`` the
    hash of the last of them. When ``ok`` is false, ``bad_position`` is the
    first position that failed and ``problem`` describes the failure.
    """

    ok: bool
    count: int
    head_hash: bytes
    bad_position: int | None = None
    problem: str | None = None


class SnapshotHeader(msgspec.Struct, frozen=True):
    """A row of the ``snapshots`` table without the state bytes."""

    position: int
    record_hash: bytes
    state_hash: bytes
    created_at: int


class SnapshotChunk(msgspec.Struct, frozen=True):
    """A row of the ``snapshot_chunks`` table to write: ``index`` and
    ``entries`` are the chunk's two encoded parts (see ``events.snapshot``)."""

    position: int
    number: int
    index: bytes
    entries: bytes


class ChainBreak(msgspec.Struct, frozen=True):
    """The first position at which a chain check failed, and why."""

    position: int
    problem: str


_decode_record = msgspec.json.Decoder(Record).decode

# SQLite storage class of each Python type that ``sqlite3`` returns. A column
# declared BLOB still stores any class, e.g. after ``CAST(body AS TEXT)``.
_STORAGE_CLASSES = {bytes: "BLOB", str: "TEXT", int: "INTEGER", float: "REAL"}

Row = tuple[int, str, int, bytes, bytes]
CheckedRecord = tuple[Record, bytes, bytes]


def blob_problem(column: str, value: object) -> str | None:
    """Return why ``value``, read from ``column``, is not a BLOB, or None."""
    if isinstance(value, bytes):
        return None

    storage_class = _STORAGE_CLASSES.get(type(value), "NULL")

    return f"{column} is stored as {storage_class}, expected BLOB"


def decode_text(data: bytes) -> str:
    """Decode a TEXT value as UTF-8, keeping invalid bytes as surrogates.

    Every connection that reads a log uses this as its ``text_factory``,
    because ``sqlite3``'s default raises on TEXT that is not UTF-8, such as a
    hash rewritten by ``CAST(hash AS TEXT)``, and a check could then not name
    the position of that record.
    """
    return data.decode("utf-8", "surrogateescape")


def check_rows(
    rows: Sequence[Row], position: int, previous_hash: bytes
) -> tuple[list[CheckedRecord], ChainBreak | None]:
    """Check consecutive ``events`` rows that follow ``position``.

    A row passes when its position is the next one, its body and hash are
    BLOBs, its stored hash is SHA-256 of ``previous_hash`` and its body, and
    the body decodes to a record whose position, stream and version equal the
    row's columns. ``previous_hash`` must be bytes.

    Returns:
        The ``(record, body, hash)`` of every row before the first failure,
        and the failure (``None`` when all rows passed).
    """
    checked: list[CheckedRecord] = []
    append = checked.append
    sha256 = hashlib.sha256
    decode = _decode_record
    for row_position, stream, version, body, stored_hash in rows:
        position += 1
        if row_position != position:
            problem = f"record is missing (the next stored position is {row_position})"
            return checked, ChainBreak(position, problem)

        # A body or hash of another storage class fails one of these two
        # steps, so the hot path checks no types.
        try:
            digest = sha256(previous_hash + body).digest()
        except TypeError:
            digest = None

        if digest is None or digest != stored_hash:
            problem = (
                blob_problem("body", body)
                or blob_problem("hash", stored_hash)
                or "stored hash differs from SHA-256 of the previous hash and body"
            )
            return checked, ChainBreak(position, problem)

        try:
            record = decode(body)
        except msgspec.DecodeError as exc:
            return checked, ChainBreak(position, f"body does not decode: {exc}")

        if (
            record.position != position
            or record.stream != stream
            or record.version != version
        ):
            problem = (
                f"body is {record.stream} version {record.version} at position "
                f"{record.position}, but the row is {stream} version {version}"
            )
            return checked, ChainBreak(position, problem)

        append((record, body, digest))
        previous_hash = digest

    return checked, None


def verify_connection(
    connection: sqlite3.Connection,
    after: int = 0,
    previous_hash: bytes = GENESIS_HASH,
) -> VerifyResult:
    """Check the chain of every record after ``after`` up to the head.

    ``previous_hash`` is the trusted hash of the record at ``after``. An
    SQLite error while reading (a damaged page) counts as a failure at the
    next unchecked position.
    """
    position = after
    count = 0
    try:
        cursor = connection.execute(SELECT_ROWS, (after,))
        while rows := cursor.fetchmany(CHUNK_ROWS):
            checked, broken = check_rows(rows, position, previous_hash)
            count += len(checked)
            if checked:
                position = checked[-1][0].position
                previous_hash = checked[-1][2]

            if broken is not None:
                return VerifyResult(
                    False, count, previous_hash, broken.position, broken.problem
                )
    except sqlite3.DatabaseError as exc:
        problem = f"SQLite could not read the record: {exc}"
        return VerifyResult(False, count, previous_hash, position + 1, problem)

    return VerifyResult(True, count, previous_hash)


def check_schema(connection: sqlite3.Connection, path: str) -> None:
    """Raise ``LogSchemaError`` unless ``connection`` is a log this code reads."""
    tables = {
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    missing = {"events", "snapshots", "meta"} - tables
    if missing:
        problem = f"tables {', '.join(sorted(missing))} are missing"
        raise LogSchemaError(path, problem)

    row = connection.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone()
    if row is None:
        raise LogSchemaError(path, "meta has no schema_version")

    version = int(row[0])
    if version > SCHEMA_VERSION:
        problem = (
            f"schema version {version} is newer than the supported "
            f"{SCHEMA_VERSION}; upgrade dstackd"
        )
        raise LogSchemaError(path, problem)


def read_head(connection: sqlite3.Connection) -> tuple[int, bytes]:
    """Return the position and hash of the newest record, or ``(0, GENESIS_HASH)``."""
    row = connection.execute(
        "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, GENESIS_HASH

    return row[0], row[1]


def read_record_hash(connection: sqlite3.Connection, position: int) -> bytes | None:
    """Return the stored hash at ``position`` (``GENESIS_HASH`` for 0)."""
    if position == 0:
        return GENESIS_HASH

    row = connection.execute(
        "SELECT hash FROM events WHERE position = ?", (position,)
    ).fetchone()

    return None if row is None else row[0]


def read_snapshot_headers(connection: sqlite3.Connection) -> list[SnapshotHeader]:
    """Return every snapshot's header, newest position first."""
    rows = connection.execute(
        "SELECT position, record_hash, state_hash, created_at FROM snapshots"
        " ORDER BY position DESC"
    ).fetchall()

    return [SnapshotHeader(*row) for row in rows]


def read_snapshot_state(connection: sqlite3.Connection, position: int) -> bytes | None:
    """Return the state bytes of the snapshot at ``position``."""
    row = connection.execute(
        "SELECT state FROM snapshots WHERE position = ?", (position,)
    ).fetchone()

    return None if row is None else bytes(row[0])


def read_chunk_part(
    connection: sqlite3.Connection,
    position: int,
    number: int,
    part: Literal["chunk_index", "entries"],
) -> bytes | None:
    """Return one part of the archive chunk stored at ``(position, number)``,
    or ``None`` when the chunk (or the whole table) does not exist."""
    try:
        row = connection.execute(
            f"SELECT {part} FROM snapshot_chunks WHERE position = ? AND number = ?",
            (position, number),
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None

        raise

    return None if row is None else bytes(row[0])


def newest_valid_snapshot(connection: sqlite3.Connection) -> tuple[int, bytes]:
    """Return the position and record hash of the newest snapshot that matches
    the log (its record hash equals the stored hash at its position), or
    ``(0, GENESIS_HASH)`` when none does.

    The state bytes are not checked here; ``events.snapshot`` checks them when
    it loads one.
    """
    for header in read_snapshot_headers(connection):
        if read_record_hash(connection, header.position) == header.record_hash:
            return header.position, header.record_hash

    return 0, GENESIS_HASH


def repair_hint(path: str) -> str:
    """Return the command that cuts the log at its first bad record."""
    data_dir = os.path.dirname(os.path.abspath(path))

    return f"run: dstackd repair-log --data-dir {data_dir}"


class LogReader:
    """A read-only view of a log file for offline tools.

    Opening never changes the file or its directory. Without a ``-wal`` file
    next to it, the database is opened ``immutable=1`` (no locks, no
    ``-shm``). With one, the database and its ``-wal`` are copied into a
    private temporary directory, which ``close`` removes. Not thread-safe.
    """

    def __init__(
        self, path: str, connection: sqlite3.Connection, copy_dir: str | None
    ) -> None:
        self._path = path
        self._connection = connection
        self._copy_dir = copy_dir

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open the log at ``path`` read-only.

        Raises:
            FileNotFoundError: no file at ``path``.
            LogSchemaError: the file is not an event log this code reads.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"event log {path} not found")

        copy_dir = None
        wal_path = path + "-wal"
        if os.path.exists(wal_path) and os.path.getsize(wal_path) > 0:
            # NOTE: this copies the whole database, so opening a log whose
            # writer is running costs time and disk in proportion to its size.
            copy_dir = tempfile.mkdtemp(prefix="dstackd-log-")
            uri = _copy_with_wal(path, copy_dir).as_uri()
        else:
            uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro&immutable=1"

        try:
            connection = sqlite3.connect(uri, uri=True, isolation_level=None)
            connection.text_factory = decode_text
            try:
                connection.execute("PRAGMA query_only = ON")
                # Reading through a memory map instead of one read() call per
                # page made fetching rows about 20% faster. dstackd never
                # shrinks a log file (no VACUUM), which a mapped reader could
                # not survive.
                connection.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
                check_schema(connection, path)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            if copy_dir is not None:
                shutil.rmtree(copy_dir, ignore_errors=True)

            raise

        return cls(path, connection, copy_dir)

    @property
    def path(self) -> str:
        return self._path

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for queries this class does not offer."""
        return self._connection

    def close(self) -> None:
        self._connection.close()
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def head(self) -> tuple[int, bytes]:
        """Return the position and hash of the newest record (0 when empty)."""
        return read_head(self._connection)

    def record_hash(self, position: int) -> bytes | None:
        return read_record_hash(self._connection, position)

    def verify(self) -> VerifyResult:
        """Check the whole chain from the first record to the head."""
        return verify_connection(self._connection)

    def raw(self, after: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """Yield the stored ``(body, hash)`` of each record after ``after``,
        without checking or decoding them."""
        cursor = self._connection.execute(
            "SELECT body, hash FROM events WHERE position > ? ORDER BY position",
            (after,),
        )
        while rows := cursor.fetchmany(CHUNK_ROWS):
            yield from rows

    def records(
        self, after: int = 0, verify: bool = True, until: int | None = None
    ) -> Iterator[Record]:
        """Yield each record after ``after`` (up to ``until``) in position order.

        With ``verify``, each body is checked against the chain from the
        stored hash at ``after`` on, and its position must be the next one.
        ``LogCorruptedError`` is raised at the first bad position, after every
        record before it was yielded. The ``stream`` and ``version`` columns
        are not compared with the bodies here; ``verify`` does that.
        """
        cursor = self._select_bodies(after, until)
        if not verify:
            while rows := cursor.fetchmany(CHUNK_ROWS):
                for body, _ in rows:
                    yield _decode_record(body)

            return

        # This loop bounds replay speed, so it keeps names local and leaves
        # the wording of a failure to ``check_rows`` (``_raise_break``).
        previous_hash = self._start_hash(after)
        position = after
        sha256 = hashlib.sha256
        decode = _decode_record
        while rows := cursor.fetchmany(CHUNK_ROWS):
            for body, stored_hash in rows:
                try:
                    digest = sha256(previous_hash + body).digest()
                except TypeError:
                    # The body is not a BLOB, and ``check_rows`` names that.
                    self._raise_break(position, previous_hash)

                if digest != stored_hash:
                    self._raise_break(position, previous_hash)

                try:
                    record = decode(body)
                except msgspec.DecodeError:
                    self._raise_break(position, previous_hash)

                position += 1
                if record.position != position:
                    self._raise_break(position - 1, previous_hash)

                previous_hash = digest
                yield record

    def records_with_hashes(
        self, after: int = 0, verify: bool = True, until: int | None = None
    ) -> Iterator[tuple[Record, bytes]]:
        """Yield ``(record, hash)`` like ``records``.

        With ``verify``, this also checks each row's ``stream`` and ``version``
        columns against its body, which makes it slower than ``records``.
        """
        previous_hash = self._start_hash(after) if verify else GENESIS_HASH
        if until is None:
            cursor = self._connection.execute(SELECT_ROWS, (after,))
        else:
            cursor = self._connection.execute(SELECT_ROWS_UNTIL, (after, until))

        position = after
        while rows := cursor.fetchmany(CHUNK_ROWS):
            if not verify:
                for row in rows:
                    yield _decode_record(row[3]), row[4]

                continue

            checked, broken = check_rows(rows, position, previous_hash)
            for record, _, digest in checked:
                yield record, digest

            if broken is not None:
                raise LogCorruptedError(
                    self._path, broken.position, broken.problem, repair_hint(self._path)
                )

            position = checked[-1][0].position
            previous_hash = checked[-1][2]

    def snapshot_headers(self) -> list[SnapshotHeader]:
        return read_snapshot_headers(self._connection)

    def snapshot_state(self, position: int) -> bytes | None:
        return read_snapshot_state(self._connection, position)

    def _select_bodies(self, after: int, until: int | None) -> sqlite3.Cursor:
        if until is None:
            return self._connection.execute(SELECT_BODIES, (after,))

        return self._connection.execute(SELECT_BODIES_UNTIL, (after, until))

    def _raise_break(self, position: int, previous_hash: bytes) -> NoReturn:
        """Raise ``LogCorruptedError`` for the record after ``position``, whose
        previous hash is ``previous_hash``, with ``check_rows``'s diagnosis."""
        rows = self._connection.execute(
            SELECT_ROWS + " LIMIT 1", (position,)
        ).fetchall()
        _, broken = check_rows(rows, position, previous_hash)
        if broken is None:
            broken = ChainBreak(position + 1, "record changed while it was read")

        raise LogCorruptedError(
            self._path, broken.position, broken.problem, repair_hint(self._path)
        )

    def _start_hash(self, after: int) -> bytes:
        start_hash = read_record_hash(self._connection, after)
        if start_hash is not None:
            problem = blob_problem("hash", start_hash)
            if problem is not None:
                raise LogCorruptedError(
                    self._path, after, problem, repair_hint(self._path)
                )

            return start_hash

        head_position, head_hash = read_head(self._connection)
        if after >= head_position:
            # Nothing follows ``after``, so no hash is ever compared with it.
            return head_hash

        raise LogCorruptedError(
            self._path, after, "record is missing", repair_hint(self._path)
        )


def _copy_with_wal(path: str, copy_dir: str) -> pathlib.Path:
    """Copy the database at ``path`` and its ``-wal`` into ``copy_dir``.

    Commits only append to the WAL, and SQLite's recovery of the copy drops a
    frame that was cut off mid-write. A checkpoint, however, rewrites database
    pages and may restart the WAL, so a copy taken across one can pair pages
    from different moments. The copy is retried until the database file kept
    its size and modification time throughout.
    """
    target = pathlib.Path(copy_dir) / os.path.basename(path)
    wal_path = path + "-wal"
    for _ in range(COPY_ATTEMPTS):
        before = _file_stamp(path)
        shutil.copyfile(path, target)
        if os.path.exists(wal_path):
            shutil.copyfile(wal_path, str(target) + "-wal")

        if _file_stamp(path) == before:
            return target

    raise OSError(
        f"event log {path} was checkpointed during each of {COPY_ATTEMPTS} "
        "attempts to copy it for reading; retry, or stop its writer"
    )


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None

    return status.st_size, status.st_mtime_ns
