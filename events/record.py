"""Log records: the envelope around an event, its stored bytes and its hash.

A record is stored as the JSON encoding of ``Record`` (the *body*), and its
hash is ``SHA-256(previous hash + body)``; the first record chains to 32 zero
bytes. The body bytes are kept verbatim, never re-encoded, so a record written
by an older version keeps its hash after the schema gains fields.
"""

import hashlib

import msgspec

from events.event_types import Event
from events.model import Actor

GENESIS_HASH = bytes(32)


class Record(msgspec.Struct, frozen=True, gc=False):
    """One row of the log.

    ``position`` is global and gapless from 1; ``version`` counts the events of
    ``stream`` from 1; ``recorded_at`` is UTC in microseconds since the Unix
    epoch.
    """

    position: int
    stream: str
    version: int
    recorded_at: int
    actor: Actor
    event: Event


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append to ``stream``.

    With ``expected_version`` set, the append fails unless the stream is at
    that version now (0: the stream must not exist yet).
    """

    stream: str
    event: Event
    expected_version: int | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def encode_body(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_body(body: bytes) -> Record:
    return _decoder.decode(body)


def chain_hash(previous_hash: bytes, body: bytes) -> bytes:
    return hashlib.sha256(previous_hash + body).digest()
