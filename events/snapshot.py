"""Snapshots of the projection in the log file's ``snapshots`` table.

A snapshot stores ``encode_state(state)`` at ``state.checkpoint``, with the
hash of the record at that position and SHA-256 of the state bytes. Loading
takes the newest snapshot that still matches the log and applies the records
after it, so startup costs the snapshot plus the tail, not the whole log. The
daemon (through ``EventLog``) and offline tools (through ``LogReader``) load
state with the same checks.
"""

import concurrent.futures
import contextlib
import gc
import hashlib
import time
from collections.abc import Iterator

import msgspec
import structlog

from events.log import EventLog
from events.log_reader import LogReader, SnapshotHeader
from events.projection import State, apply, decode_state, encode_state
from events.record import GENESIS_HASH

logger = structlog.get_logger(__name__)

# Records between snapshots when the daemon's configuration sets none.
DEFAULT_SNAPSHOT_EVERY = 10_000

# Snapshots kept in the file; older ones are deleted when a new one is stored.
KEEP_SNAPSHOTS = 3


async def save_snapshot(
    log: EventLog, state: State, *, keep: int = KEEP_SNAPSHOTS
) -> int | None:
    """Store ``state`` as a snapshot at ``state.checkpoint``.

    Encoding runs on the event loop because ``apply`` changes the state in
    place, so an encoder elsewhere could catch it half-applied. For the state
    of the 1,000,000 records of bench/replay.py (107 MB) encoding took about
    160 ms. The write joins the next group commit, and appends wait for it.
    NOTE: for that state, appends waited 0.8 to 1.6 s in total while the
    snapshot was encoded, committed and checkpointed.

    Returns:
        The snapshot's position, or ``None`` for a state with no records.

    Raises:
        ValueError: the state does not belong to this log (its checkpoint is
            past the head, or its ``head_hash`` differs from the log's hash at
            its checkpoint).
    """
    position = state.checkpoint
    if position == 0:
        return None

    record_hash = await log.record_hash(position)
    _check_belongs(state, record_hash, log.path)
    assert record_hash is not None
    if state.head_hash == GENESIS_HASH:
        # The state was folded without record hashes; take the log's.
        state.head_hash = record_hash

    started = time.perf_counter()
    data = encode_state(state)
    state_hash = hashlib.sha256(data).digest()
    encoded = time.perf_counter()
    await log.store_snapshot(position, record_hash, data, state_hash, keep=keep)
    logger.info(
        "snapshot_saved",
        path=log.path,
        position=position,
        size_bytes=len(data),
        encode_ms=round((encoded - started) * 1000, 1),
        write_ms=round((time.perf_counter() - encoded) * 1000, 1),
    )

    return position


async def maybe_snapshot(
    log: EventLog,
    state: State,
    *,
    every: int = DEFAULT_SNAPSHOT_EVERY,
    keep: int = KEEP_SNAPSHOTS,
) -> bool:
    """Save a snapshot when ``every`` records or more passed since the newest.

    Returns whether a snapshot was saved.
    """
    if every < 1:
        raise ValueError(f"invalid snapshot_every {every}: expected at least 1")

    if state.checkpoint - log.last_snapshot_position < every:
        return False

    return await save_snapshot(log, state, keep=keep) is not None


async def load_state(log: EventLog) -> State:
    """Build the current state from the newest valid snapshot and the tail.

    A snapshot that does not match the log, fails its state hash or does not
    decode is skipped with a warning, and the next older one is tried. With
    none left, the whole log is replayed. The tail's chain is verified.

    Raises:
        LogCorruptedError: a record after the chosen snapshot is bad.
    """
    for header in await log.snapshot_headers():
        problem = _header_problem(header, await log.record_hash(header.position))
        if problem is not None:
            _warn_skipped(log.path, header.position, problem)
            continue

        data = await log.snapshot_state(header.position)
        state = _decode_snapshot(log.path, header, data)
        if state is not None:
            return await _apply_tail(log, state)

    return await _apply_tail(log, State())


def load_state_offline(reader: LogReader, at_position: int | None = None) -> State:
    """Build the state as of ``at_position`` (default: the head) from a reader.

    Uses the newest valid snapshot at or before ``at_position``, with the same
    checks as ``load_state``, then applies the verified records up to it.
    """
    head_position, _ = reader.head()
    limit = head_position if at_position is None else min(at_position, head_position)
    state = State()
    for header in reader.snapshot_headers():
        if header.position > limit:
            continue

        problem = _header_problem(header, reader.record_hash(header.position))
        if problem is not None:
            _warn_skipped(reader.path, header.position, problem)
            continue

        data = reader.snapshot_state(header.position)
        snapshot_state = _decode_snapshot(reader.path, header, data)
        if snapshot_state is not None:
            state = snapshot_state
            break

    start = state.checkpoint
    with paused_gc():
        for record in reader.records(start, verify=True, until=limit):
            apply(state, record)

    if state.checkpoint != start:
        # ``records`` checked that this stored hash continues the chain.
        head_hash = reader.record_hash(state.checkpoint)
        assert head_hash is not None
        state.head_hash = head_hash

    return state


async def _apply_tail(log: EventLog, state: State) -> State:
    async for chunk in log.read_chunks(state.checkpoint, verify=True):
        # Paused per chunk only: other tasks run between chunks.
        with paused_gc():
            for record, _, digest in chunk:
                apply(state, record, digest)

    return state


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk fold.

    A fold allocates objects that live on in the state, and each full
    collection while the state grows walks all of them again. With the
    collector running, a verified replay of 1,000,000 records in
    bench/replay.py took 1.3 to 1.9 times as long. Neither records nor the
    state form reference cycles, so reference counting still frees all the
    garbage of the fold. The collector's previous setting is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_belongs(state: State, record_hash: bytes | None, path: str) -> None:
    if record_hash is None:
        raise ValueError(
            f"state checkpoint {state.checkpoint} is past the head of event log "
            f"{path}; save snapshots only of state folded from this log"
        )

    if state.head_hash not in (GENESIS_HASH, record_hash):
        raise ValueError(
            f"state head_hash {state.head_hash.hex()} differs from the hash "
            f"{record_hash.hex()} of record {state.checkpoint} in event log {path}; "
            "save snapshots only of state folded from this log"
        )


def _header_problem(header: SnapshotHeader, record_hash: bytes | None) -> str | None:
    """Describe why the snapshot does not match the log, or return ``None``."""
    if record_hash is None:
        return "the log has no record at that position"

    if record_hash != header.record_hash:
        return "record hash differs from the log's record at that position"

    return None


def _decode_snapshot(
    path: str, header: SnapshotHeader, data: bytes | None
) -> State | None:
    """Return the snapshot's state, or ``None`` (with a warning) when invalid.

    The header must already match the log (``_header_problem``).
    """
    if data is None:
        problem: str | None = "snapshot row disappeared while loading"
        state = None
    else:
        state, problem = _decode_checked(header, data)

    if problem is not None:
        _warn_skipped(path, header.position, problem)
        return None

    return state


def _decode_checked(
    header: SnapshotHeader, data: bytes
) -> tuple[State | None, str | None]:
    """Decode ``data`` and check it against ``header``.

    A large state is hashed in a worker thread while it decodes: hashlib
    releases the GIL for large inputs, which saved the 90 ms that SHA-256 of
    a 107 MB state took in bench/replay.py. The hash is compared first, so a
    damaged state reports its hash, not its decode error.
    """
    decode_error = None
    state = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(_sha256, data)
        try:
            with paused_gc():
                state = decode_state(data)
        except msgspec.DecodeError as exc:
            decode_error = f"state does not decode: {exc}"

        digest = hashing.result()

    if digest != header.state_hash:
        return None, "state hash differs from SHA-256 of the state bytes"

    if state is None:
        return None, decode_error

    if state.checkpoint != header.position:
        return None, f"state checkpoint is {state.checkpoint}"

    if state.head_hash != header.record_hash:
        return None, "state head_hash differs from the record hash"

    return state, None


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _warn_skipped(path: str, position: int, problem: str) -> None:
    logger.warning("snapshot_skipped", path=path, position=position, problem=problem)
