"""Records as the audit commands read and show them: checked reads, filters, lines.

``EventLine`` is the JSON object that ``dstackctl events --json`` prints for one
record, the same from the daemon and from a log file. ``EventFilter`` selects
records by time, stream and event type. ``iter_checked`` streams verified
records with their stored body bytes, in chunks.
"""

import fnmatch
import pathlib
import sqlite3
from collections.abc import Iterable, Iterator

import msgspec

from events.audit.times import utc_iso
from events.errors import InvalidValueError, LogCorruptedError
from events.event_types import EVENT_TYPE_NAMES
from events.log_reader import (
    CHUNK_ROWS,
    SELECT_ROWS,
    CheckedRecord,
    LogReader,
    check_rows,
    check_schema,
    read_head,
    read_record_hash,
)
from events.model import Actor
from events.record import Record

_encoder = msgspec.json.Encoder()


class EventLine(msgspec.Struct, frozen=True):
    """One record for people and scripts; ``recorded_at`` is ISO 8601 in UTC.

    ``actor`` is the caller's name with its uid, or ``dstackd``; ``event`` is
    the event as stored, with its ``type`` tag; ``hash`` is hex.
    """

    position: int
    stream: str
    version: int
    recorded_at: str
    actor: str
    type: str
    event: msgspec.Raw
    hash: str


def actor_text(actor: Actor) -> str:
    """Format an actor as ``alice (uid 1000)``, or its bare name without a uid."""
    if actor.uid is None:
        return actor.name

    return f"{actor.name} (uid {actor.uid})"


def event_type_name(record: Record) -> str:
    return type(record.event).__name__


def event_line(record: Record, record_hash: bytes) -> EventLine:
    return EventLine(
        position=record.position,
        stream=record.stream,
        version=record.version,
        recorded_at=utc_iso(record.recorded_at),
        actor=actor_text(record.actor),
        type=event_type_name(record),
        event=msgspec.Raw(_encoder.encode(record.event)),
        hash=record_hash.hex(),
    )


def encode_event_line(record: Record, record_hash: bytes) -> bytes:
    """Encode ``event_line`` as one JSON line, newline included."""
    return _encoder.encode(event_line(record, record_hash)) + b"\n"


class EventFilter(msgspec.Struct, frozen=True):
    """A selection of records by time, stream and event type.

    ``since`` and ``until`` are inclusive bounds on ``recorded_at`` in UTC
    microseconds. ``streams`` are shell-style patterns (``run/*``); ``types``
    are event type names. An empty tuple selects everything.
    """

    since: int | None = None
    until: int | None = None
    streams: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def matches(self, record: Record) -> bool:
        if self.since is not None and record.recorded_at < self.since:
            return False

        if self.until is not None and record.recorded_at > self.until:
            return False

        if self.types and event_type_name(record) not in self.types:
            return False

        return not self.streams or any(
            fnmatch.fnmatchcase(record.stream, pattern) for pattern in self.streams
        )

    def is_past(self, record: Record) -> bool:
        """Return whether ``record`` and every later one are after ``until``.

        Relies on ``recorded_at`` never going backwards in a log, which
        ``EventLog`` guarantees for what it writes.
        """
        return self.until is not None and record.recorded_at > self.until


def build_filter(
    since: int | None = None,
    until: int | None = None,
    streams: Iterable[str] = (),
    types: Iterable[str] = (),
) -> EventFilter:
    """Build an ``EventFilter``, checking the type names and the time bounds.

    Raises:
        InvalidValueError: an unknown event type, or ``since`` after ``until``.
    """
    type_names = tuple(name.strip() for name in types if name.strip())
    for name in type_names:
        if name not in EVENT_TYPE_NAMES:
            known = ", ".join(sorted(EVENT_TYPE_NAMES))
            raise InvalidValueError("event type", name, f"one of {known}")

    if since is not None and until is not None and since > until:
        raise InvalidValueError(
            "since", utc_iso(since), f"a time before --until {utc_iso(until)}"
        )

    patterns = tuple(pattern.strip() for pattern in streams if pattern.strip())

    return EventFilter(since, until, patterns, type_names)


def iter_checked(reader: LogReader, after: int = 0) -> Iterator[CheckedRecord]:
    """Yield ``(record, body, hash)`` for each record after ``after``, verified.

    ``body`` is the stored JSON, byte for byte.

    Raises:
        LogCorruptedError: at the first bad position, after every record before
            it was yielded.
    """
    connection = reader.connection
    previous_hash = read_record_hash(connection, after)
    if previous_hash is None:
        head_position, _ = read_head(connection)
        if after >= head_position:
            # Nothing follows ``after``, so there is nothing to check or yield.
            return

        raise LogCorruptedError(reader.path, after, "record is missing")

    cursor = connection.execute(SELECT_ROWS, (after,))
    position = after
    while rows := cursor.fetchmany(CHUNK_ROWS):
        checked, broken = check_rows(rows, position, previous_hash)
        yield from checked
        if broken is not None:
            raise LogCorruptedError(reader.path, broken.position, broken.problem)

        position = checked[-1][0].position
        previous_hash = checked[-1][2]


def open_live_reader(path: str) -> LogReader:
    """Open a read-only reader on a log that its writer has open right now.

    ``LogReader.open`` copies a log that has a write-ahead log. The writer
    itself (the daemon) can instead read its own file in place through SQLite's
    WAL. The connection may be used from one thread at a time, not necessarily
    the thread that opened it.
    """
    uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
    connection = sqlite3.connect(
        uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
    )
    try:
        connection.execute("PRAGMA query_only = ON")
        check_schema(connection, path)
    except BaseException:
        connection.close()
        raise

    return LogReader(path, connection, None)
