"""Verification of a log file (hash chain and snapshots) and of an export file.

The chain check finds the first record whose stored hash is not SHA-256 of the
previous hash and its body, and reports what went wrong there: a record was
changed, is missing, or sits at another record's position. A cut-off log is
found through what outlives the cut: a snapshot past the last record, a head
the caller knew before (the daemon knows its own), an export's end line, or an
SQLite file shorter than its header declares.

A snapshot is checked against the record hash at its position, its state
hash, and a replay of the records up to it. The state hash alone proves
nothing, because anyone who edits a snapshot can recompute it.
"""

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, Literal

import msgspec

from events.audit.export import ExportEnd
from events.audit.records import actor_text, event_type_name
from events.audit.times import utc_iso
from events.errors import InvalidValueError
from events.event_types import Event
from events.log_reader import (
    CHUNK_ROWS,
    SELECT_ROWS,
    ChainBreak,
    LogReader,
    Row,
    SnapshotHeader,
    check_rows,
    read_snapshot_headers,
    read_snapshot_state,
)
from events.projection import State, apply
from events.record import GENESIS_HASH, Record, decode_body
from events.snapshot import SnapshotInvalidError, decode_snapshot

ProblemKind = Literal[
    "changed", "missing", "reordered", "truncated", "unreadable", "snapshot"
]

SQLITE_MAGIC = b"SQLite format 3\x00"

# Lines an export check reads past a misplaced record to tell a reordered
# record from a missing one.
MAX_LOOKAHEAD_LINES = 100_000


class Problem(msgspec.Struct, frozen=True):
    """A problem found at one position of a log or an export."""

    position: int
    kind: ProblemKind
    message: str


class VerifyReport(msgspec.Struct, frozen=True):
    """The outcome of a verification.

    ``records`` counts the records that checked out from the first one on, and
    ``head_position`` and ``head_hash`` (hex) name the last of them.
    ``snapshots`` counts the snapshots that checked out. ``problems`` is
    sorted by position, so the first one is the first bad position.
    """

    ok: bool
    source: Literal["log", "export"]
    records: int
    head_position: int
    head_hash: str
    snapshots: int = 0
    problems: tuple[Problem, ...] = ()


class ExpectedHead(msgspec.Struct, frozen=True):
    """A head the caller saw before: the log must still hold this hash here."""

    position: int
    hash: bytes


def parse_expected_head(text: str) -> ExpectedHead:
    """Parse ``POSITION:HASH`` as ``events verify`` prints it.

    Raises:
        InvalidValueError: the text is not a position, a colon and 64 hex digits.
    """
    forms = "POSITION:HASH, e.g. 42:9f86d08... with the 64 hex digits of the hash"
    position_text, colon, hash_text = text.strip().partition(":")
    if not colon or not position_text.isdigit() or len(hash_text) != 64:
        raise InvalidValueError("expected head", text, forms)

    try:
        digest = bytes.fromhex(hash_text)
    except ValueError:
        raise InvalidValueError("expected head", text, forms) from None

    return ExpectedHead(int(position_text), digest)


# Log files


def verify_log(
    reader: LogReader, expected_heads: Sequence[ExpectedHead] = ()
) -> VerifyReport:
    """Check the whole chain and every snapshot of the log behind ``reader``.

    Everything is read in one read transaction, so records a writer appends
    meanwhile are left out consistently. Memory stays flat in the number of
    records: rows are read in chunks, and the projection that snapshots are
    compared with grows only with the pools, instances and runs.
    """
    connection = reader.connection
    connection.execute("BEGIN")
    try:
        return _verify_log(reader, connection, expected_heads)
    finally:
        connection.execute("COMMIT")


def _verify_log(
    reader: LogReader,
    connection: sqlite3.Connection,
    expected_heads: Sequence[ExpectedHead],
) -> VerifyReport:
    headers = sorted(read_snapshot_headers(connection), key=lambda h: h.position)
    snapshots = _SnapshotChecker(connection, headers)
    heads = _HeadWatcher(expected_heads)
    walk = _walk_chain(reader.path, connection, snapshots, heads)

    problems = list(snapshots.problems)
    problems.extend(heads.problems)
    if walk.problem is not None:
        problems.append(walk.problem)
    else:
        problems.extend(_cut_tail_problems(walk.head_position, headers, heads))

    problems.sort(key=lambda problem: problem.position)

    return VerifyReport(
        ok=not problems,
        source="log",
        records=walk.records,
        head_position=walk.head_position,
        head_hash=walk.head_hash.hex(),
        snapshots=snapshots.checked,
        problems=tuple(problems),
    )


class _Walk(msgspec.Struct):
    records: int = 0
    head_position: int = 0
    head_hash: bytes = GENESIS_HASH
    problem: Problem | None = None


def _walk_chain(
    path: str,
    connection: sqlite3.Connection,
    snapshots: "_SnapshotChecker",
    heads: "_HeadWatcher",
) -> _Walk:
    walk = _Walk()
    cursor = connection.cursor()
    try:
        cursor.execute(SELECT_ROWS, (0,))
        while rows := cursor.fetchmany(CHUNK_ROWS):
            checked, broken = check_rows(rows, walk.head_position, walk.head_hash)
            for record, _, digest in checked:
                snapshots.apply(record, digest)
                heads.see(record.position, digest)

            walk.records += len(checked)
            if checked:
                walk.head_position = checked[-1][0].position
                walk.head_hash = checked[-1][2]

            if broken is not None:
                walk.problem = _diagnose(connection, broken, rows[len(checked)])
                return walk
    except sqlite3.DatabaseError as exc:
        walk.problem = _unreadable(path, walk.head_position + 1, exc)
    finally:
        cursor.close()

    return walk


def _diagnose(connection: sqlite3.Connection, broken: ChainBreak, row: Row) -> Problem:
    """Say what is wrong with ``row``, the first one that failed the chain check."""
    position = broken.position
    row_position, stream, version, body, _ = row
    if row_position != position:
        return _missing(position, row_position)

    try:
        record = decode_body(body)
    except msgspec.DecodeError as exc:
        message = (
            f"record {position} was changed: its body is not a valid record ({exc})"
        )
        return Problem(position, "changed", message)

    if record.position != position:
        other = connection.execute(
            "SELECT body FROM events WHERE position = ?", (record.position,)
        ).fetchone()
        swapped = other is not None and _body_position(other[0]) == position
        return _misplaced(position, record.position, swapped)

    if (record.stream, record.version) != (stream, version):
        message = (
            f"record {position} was changed: its row is {stream} version {version} "
            f"but its body is {record.stream} version {record.version}"
        )
        return Problem(position, "changed", message)

    message = (
        f"record {position} was changed: SHA-256 of the previous hash and its body "
        "differs from its stored hash"
    )

    return Problem(position, "changed", message)


def _missing(position: int, next_position: int) -> Problem:
    if next_position == position + 1:
        what = f"record {position} is missing"
    else:
        what = f"records {position} to {next_position - 1} are missing"

    return Problem(position, "missing", f"{what} (the next record is {next_position})")


def _misplaced(position: int, found: int, swapped: bool) -> Problem:
    """Describe record ``found`` stored where record ``position`` belongs."""
    if swapped:
        message = f"records {position} and {found} were swapped"
        return Problem(position, "reordered", message)

    if found > position:
        message = (
            f"record {position} is missing: record {found} is stored in its place, "
            "so the records after it were moved up"
        )
        return Problem(position, "missing", message)

    message = f"record {found} is stored again at position {position}"

    return Problem(position, "reordered", message)


def _body_position(body: bytes) -> int | None:
    try:
        return decode_body(body).position
    except msgspec.DecodeError:
        return None


def unreadable_file_report(path: str, exc: sqlite3.DatabaseError) -> VerifyReport:
    """Report a log file that SQLite cannot open at all, so no record checks out.

    SQLite rejects a file shorter than its header declares before reading any
    record, so a cut-off file ends up here, at position 1.
    """
    return VerifyReport(
        ok=False,
        source="log",
        records=0,
        head_position=0,
        head_hash=GENESIS_HASH.hex(),
        problems=(_unreadable(path, 1, exc),),
    )


def _unreadable(path: str, position: int, exc: sqlite3.DatabaseError) -> Problem:
    shortfall = _file_shortfall(path)
    if shortfall is not None:
        message = f"the file was cut short ({shortfall}): {exc}"
        return Problem(position, "truncated", message)

    message = f"SQLite could not read record {position}: {exc}"

    return Problem(position, "unreadable", message)


def _file_shortfall(path: str) -> str | None:
    """Compare the file's size with the size in its SQLite header, if valid.

    The header stores the page size at offset 16 and the database size in
    pages at offset 28. That size is valid when it is non-zero and the change
    counter at offset 24 equals the version-valid-for number at offset 92
    (SQLite's file format, "In-header database size":
    https://www.sqlite.org/fileformat2.html).
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
        size = os.path.getsize(path)
    except OSError:
        return None

    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return None

    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] != header[92:96] or size >= page_size * pages:
        return None

    return (
        f"its header declares {pages} pages of {page_size} bytes but it has "
        f"{size} bytes"
    )


def _cut_tail_problems(
    head_position: int, headers: Sequence[SnapshotHeader], heads: "_HeadWatcher"
) -> list[Problem]:
    """Find a cut-off tail from snapshots and expected heads past the last record."""
    beyond = [header.position for header in headers if header.position > head_position]
    beyond.extend(
        expected.position
        for expected in heads.expected
        if expected.position > head_position
    )
    if not beyond:
        return []

    first_missing = head_position + 1
    furthest = max(beyond)
    message = (
        f"the log ends at position {head_position}, but a snapshot or a known head "
        f"is at position {furthest}: records {first_missing} to {furthest} are "
        "missing, so the log was truncated"
    )

    return [Problem(first_missing, "truncated", message)]


class _HeadWatcher:
    """Checks that the chain passes through each expected head."""

    def __init__(self, expected: Sequence[ExpectedHead]) -> None:
        self.expected = tuple(expected)
        self._by_position = {head.position: head for head in expected}
        self.problems: list[Problem] = []

    def see(self, position: int, digest: bytes) -> None:
        expected = self._by_position.get(position)
        if expected is None or expected.hash == digest:
            return

        message = (
            f"record {position} has hash {digest.hex()}, not the expected "
            f"{expected.hash.hex()}: the log up to it was rewritten"
        )
        self.problems.append(Problem(position, "changed", message))


class _SnapshotChecker:
    """Replays the records up to the newest snapshot and compares each snapshot."""

    def __init__(
        self, connection: sqlite3.Connection, headers: Sequence[SnapshotHeader]
    ) -> None:
        self._connection = connection
        self._pending = {header.position: header for header in headers}
        self._last = max(self._pending, default=0)
        self._state = State()
        self.checked = 0
        self.problems: list[Problem] = []

    def apply(self, record: Record, digest: bytes) -> None:
        if record.position > self._last:
            return

        apply(self._state, record, digest)
        header = self._pending.get(record.position)
        if header is None:
            return

        problem = self._check(header, digest)
        if problem is None:
            self.checked += 1
        else:
            self.problems.append(Problem(header.position, "snapshot", problem))

    def _check(self, header: SnapshotHeader, digest: bytes) -> str | None:
        position = header.position
        prefix = f"snapshot at position {position}"
        if header.record_hash != digest:
            return (
                f"{prefix} names record hash {header.record_hash.hex()}, but record "
                f"{position} has hash {digest.hex()}"
            )

        data = read_snapshot_state(self._connection, position)
        if data is None:
            return f"{prefix} has no state"

        if hashlib.sha256(data).digest() != header.state_hash:
            return (
                f"{prefix} is corrupted: SHA-256 of its state differs from its "
                "state hash"
            )

        try:
            snapshot = decode_snapshot(self._connection, data)
        except SnapshotInvalidError as exc:
            return f"{prefix} cannot be read: {exc.problem}"

        difference = describe_difference(snapshot, self._state)
        if difference is not None:
            return (
                f"{prefix} differs from a replay of records 1 to {position}: "
                f"{difference}"
            )

        return None


def describe_difference(snapshot: State, replayed: State) -> str | None:
    """Name the first part of ``snapshot`` that differs from ``replayed``."""
    if snapshot.checkpoint != replayed.checkpoint:
        return f"its checkpoint is {snapshot.checkpoint}"

    if snapshot.head_hash != replayed.head_hash:
        return "its head hash differs"

    if snapshot.default_pool != replayed.default_pool:
        return f"its default pool is {snapshot.default_pool}"

    parts: tuple[tuple[str, dict[str, object], dict[str, object]], ...] = (
        ("pool", dict(snapshot.pools), dict(replayed.pools)),
        ("instance", dict(snapshot.instances), dict(replayed.instances)),
        ("run", dict(snapshot.runs), dict(replayed.runs)),
    )
    for kind, stored, expected in parts:
        for key in sorted(stored.keys() | expected.keys()):
            if key not in stored:
                return f"{kind} {key} is missing from it"

            if key not in expected:
                return f"it has {kind} {key}, which the records never created"

            if stored[key] != expected[key]:
                return f"{kind} {key} differs"

    return None


# Export files


class _LineIn(msgspec.Struct, frozen=True):
    """An export line as read back; ``end`` is set only on the end line.

    An empty ``Raw`` stands for a missing ``event`` or ``body``.
    """

    position: int | None = None
    stream: str | None = None
    version: int | None = None
    recorded_at: str | None = None
    actor: str | None = None
    type: str | None = None
    event: msgspec.Raw = msgspec.Raw()
    hash: str | None = None
    body: msgspec.Raw = msgspec.Raw()
    end: ExportEnd | None = None


_line_decoder = msgspec.json.Decoder(_LineIn)
_event_decoder = msgspec.json.Decoder(Event)


def is_sqlite_file(path: str) -> bool:
    """Return whether ``path`` starts with the SQLite file magic."""
    with open(path, "rb") as file:
        return file.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def verify_export(file: BinaryIO) -> VerifyReport:
    """Check an export read from ``file``, line by line, in constant memory."""
    checker = _ExportChecker(file)
    problem = checker.run()

    return VerifyReport(
        ok=problem is None,
        source="export",
        records=checker.records,
        head_position=checker.position,
        head_hash=checker.previous_hash.hex(),
        problems=() if problem is None else (problem,),
    )


class _ExportChecker:
    def __init__(self, file: BinaryIO) -> None:
        self._lines: Iterator[bytes] = iter(file)
        self.line_number = 0
        self.records = 0
        self.position = 0
        self.previous_hash = GENESIS_HASH

    def run(self) -> Problem | None:
        end: ExportEnd | None = None
        for line in self._lines:
            self.line_number += 1
            expected = self.position + 1
            if end is not None:
                message = f"line {self.line_number} follows the end line"
                return Problem(expected, "changed", message)

            if not line.endswith(b"\n"):
                message = (
                    f"line {self.line_number} is cut off: the export was truncated "
                    f"after record {self.position}"
                )
                return Problem(expected, "truncated", message)

            try:
                item = _line_decoder.decode(line)
            except msgspec.DecodeError as exc:
                message = f"line {self.line_number} is not a valid export line: {exc}"
                return Problem(expected, "changed", message)

            if item.end is not None:
                end = item.end
                continue

            problem = self._check_record(item)
            if problem is not None:
                return problem

        return self._check_end(end)

    def _check_record(self, item: _LineIn) -> Problem | None:
        expected = self.position + 1
        if not item.body or item.hash is None:
            message = f"line {self.line_number} has no body or no hash"
            return Problem(expected, "changed", message)

        body = bytes(item.body)
        try:
            record = decode_body(body)
        except msgspec.DecodeError as exc:
            message = (
                f"record {expected} was changed: its body is not a valid record ({exc})"
            )
            return Problem(expected, "changed", message)

        if record.position != expected:
            return self._misplaced(expected, record.position)

        digest = hashlib.sha256(self.previous_hash + body).digest()
        if item.hash != digest.hex():
            message = (
                f"record {expected} was changed: SHA-256 of the previous hash and its "
                "body differs from its hash"
            )
            return Problem(expected, "changed", message)

        field = _mismatched_field(item, record)
        if field is not None:
            message = (
                f"record {expected} was changed: its {field} differs from its body"
            )
            return Problem(expected, "changed", message)

        self.records += 1
        self.position = expected
        self.previous_hash = digest

        return None

    def _misplaced(self, position: int, found: int) -> Problem:
        if found < position or not self._comes_later(position):
            return _misplaced(position, found, swapped=False)

        message = (
            f"record {found} comes before record {position}: the records are out "
            "of order"
        )

        return Problem(position, "reordered", message)

    def _comes_later(self, position: int) -> bool:
        """Read ahead for the line of record ``position`` (the check stops anyway)."""
        for _, line in zip(range(MAX_LOOKAHEAD_LINES), self._lines, strict=False):
            try:
                item = _line_decoder.decode(line)
            except msgspec.DecodeError:
                continue

            if item.body and _body_position(bytes(item.body)) == position:
                return True

        return False

    def _check_end(self, end: ExportEnd | None) -> Problem | None:
        expected = self.position + 1
        if end is None:
            if self.line_number == 0:
                return Problem(expected, "truncated", "the export is empty")

            message = (
                f"the export ends after record {self.position} without its end line, "
                "so it was truncated"
            )
            return Problem(expected, "truncated", message)

        actual = (self.records, self.position, self.previous_hash.hex())
        if (end.records, end.head_position, end.head_hash) == actual:
            return None

        message = (
            f"the end line names {end.records} records ending at position "
            f"{end.head_position} with hash {end.head_hash}, but the export has "
            f"{self.records} ending at position {self.position} with hash "
            f"{self.previous_hash.hex()}"
        )
        kind: ProblemKind = (
            "truncated" if end.head_position > self.position else "changed"
        )

        return Problem(expected, kind, message)


def _mismatched_field(item: _LineIn, record: Record) -> str | None:
    """Name the first readable field of an export line that its body contradicts."""
    expected: Iterable[tuple[str, object, object]] = (
        ("position", item.position, record.position),
        ("stream", item.stream, record.stream),
        ("version", item.version, record.version),
        ("recorded_at", item.recorded_at, utc_iso(record.recorded_at)),
        ("actor", item.actor, actor_text(record.actor)),
        ("type", item.type, event_type_name(record)),
    )
    for name, shown, stored in expected:
        if shown != stored:
            return name

    if not item.event:
        return "event"

    try:
        event = _event_decoder.decode(item.event)
    except msgspec.DecodeError:
        return "event"

    return None if event == record.event else "event"
