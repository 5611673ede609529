"""The export format: one JSON object per record, then one end line.

A record line has the fields of ``EventLine`` (position, stream, version,
recorded_at, actor, type, event, hash) plus ``body``: the record exactly as
stored, embedded as a JSON value byte for byte. A record's hash is SHA-256 of
the previous hash and those bytes, so ``events.audit.verify.verify_export``
checks an export on its own, without re-encoding anything. The last line is
``{"end": {"records": N, "head_position": N, "head_hash": "..."}}``; an export
without it was cut short.
"""

from collections.abc import Iterable, Iterator

import msgspec

from events.audit.records import actor_text, event_type_name
from events.audit.times import utc_iso
from events.log_reader import CheckedRecord
from events.record import GENESIS_HASH, Record

_encoder = msgspec.json.Encoder()


class ExportLine(msgspec.Struct, frozen=True):
    """One record of an export; ``body`` is the stored record, verbatim."""

    position: int
    stream: str
    version: int
    recorded_at: str
    actor: str
    type: str
    event: msgspec.Raw
    hash: str
    body: msgspec.Raw


class ExportEnd(msgspec.Struct, frozen=True):
    """The summary on the last line: how many records, and the last one's hash."""

    records: int
    head_position: int
    head_hash: str


class ExportEndLine(msgspec.Struct, frozen=True):
    end: ExportEnd


class ExportEncoder:
    """Encodes records as export lines and remembers what the end line needs."""

    def __init__(self) -> None:
        self.records = 0
        self.head_position = 0
        self.head_hash = GENESIS_HASH

    def record_line(self, record: Record, body: bytes, record_hash: bytes) -> bytes:
        line = ExportLine(
            position=record.position,
            stream=record.stream,
            version=record.version,
            recorded_at=utc_iso(record.recorded_at),
            actor=actor_text(record.actor),
            type=event_type_name(record),
            event=msgspec.Raw(_encoder.encode(record.event)),
            hash=record_hash.hex(),
            body=msgspec.Raw(body),
        )
        self.records += 1
        self.head_position = record.position
        self.head_hash = record_hash

        return _encoder.encode(line) + b"\n"

    def end_line(self) -> bytes:
        end = ExportEnd(self.records, self.head_position, self.head_hash.hex())

        return _encoder.encode(ExportEndLine(end)) + b"\n"


def iter_export(records: Iterable[CheckedRecord]) -> Iterator[bytes]:
    """Yield the export lines of ``records``, then the end line.

    An error raised by ``records`` (a corrupted log) propagates before the end
    line, so a failed export never looks complete.
    """
    encoder = ExportEncoder()
    for record, body, record_hash in records:
        yield encoder.record_line(record, body, record_hash)

    yield encoder.end_line()
