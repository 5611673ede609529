"""Snapshots of the projection in the log file's ``snapshots`` and
``snapshot_chunks`` tables.

A snapshot has two parts. The row in ``snapshots`` stores the hot part of the
state (``StateData``): pools, the runs and instances kept in memory, and a
reference with SHA-256 hashes to each archive chunk. The chunks in
``snapshot_chunks`` store the ended runs and instances. Saving moves the
entries that ended since the previous snapshot into new chunks and writes
only those, so a save costs what changed, not the whole history.

Loading takes the newest snapshot whose record hash and state hash match the
log, decodes the hot part and applies the records after it. The daemon's
``load_state`` leaves the chunks unread. The state reads them from the file
when something reads history, and checks their hashes then. Offline tools
(``load_state_offline``) and ``decode_snapshot`` read and check every chunk at
once. Snapshots of another format are skipped with a warning.
"""

import contextlib
import dataclasses
import functools
import gc
import hashlib
import pathlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog

from events.entry_map import Chunk, ChunkIndex, ChunkRef, EntryMap
from events.errors import LogCorruptedError
from events.log_reader import (
    CHUNK_ROWS,
    SELECT_ROWS_UNTIL,
    LogReader,
    SnapshotChunk,
    SnapshotHeader,
    check_rows,
    read_chunk_part,
    repair_hint,
)
from events.projection import (
    STATE_FORMAT,
    Instance,
    Run,
    State,
    StateData,
    apply,
    is_ended_instance,
    is_ended_run,
    replay,
    replay_with_hashes,
    state_from_data,
)
from events.record import GENESIS_HASH

if TYPE_CHECKING:
    from events.log import EventLog

logger = structlog.get_logger(__name__)

# Records between snapshots when the daemon's configuration sets none.
DEFAULT_SNAPSHOT_EVERY = 10_000

# Snapshots kept in the file; older ones are deleted when a new one is stored.
KEEP_SNAPSHOTS = 3

Kind = Literal["runs", "instances"]

_encoder = msgspec.msgpack.Encoder()
_data_decoder = msgspec.msgpack.Decoder(StateData)
_index_decoder = msgspec.msgpack.Decoder(ChunkIndex)
_entries_decoders = {
    "runs": msgspec.msgpack.Decoder(list[Run]),
    "instances": msgspec.msgpack.Decoder(list[Instance]),
}


class SnapshotInvalidError(ValueError):
    """A stored snapshot cannot be used, for the reason in ``problem``."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


@dataclasses.dataclass(frozen=True)
class PreparedSnapshot:
    """A snapshot encoded and ready to store.

    ``chunks`` are the rows to store new, ``chunk_refs`` the stored chunks it
    refers to besides them, and ``new_refs`` the reference each new chunk
    gets once the write succeeded.
    """

    position: int
    head_hash: bytes
    data: bytes
    chunks: list[SnapshotChunk]
    chunk_refs: list[tuple[int, int]]
    new_refs: list[tuple[Chunk, ChunkRef]]  # type: ignore[type-arg]


# Saving


async def save_snapshot(
    log: "EventLog", state: State, *, keep: int = KEEP_SNAPSHOTS
) -> int | None:
    """Store ``state`` as a snapshot at ``state.checkpoint``.

    The state is encoded before the first ``await``, so the snapshot is
    consistent even while other tasks keep folding records into ``state``.
    The caller needs no lock for it, and appends wait only for the write of
    the snapshot's transaction. Encoding moves the runs and instances that
    ended since the last snapshot into the state's archive, which changes
    none of its content. In bench/replay.py (1,000,000 records, 2-core VM)
    the first snapshot stored the whole archive in 0.8 to 1.1 s. A later one
    took 120 to 270 ms, and appends meanwhile waited at most 75 to 190 ms.

    Returns:
        The snapshot's position, or ``None`` for a state with no records.

    Raises:
        ValueError: the state does not belong to this log (its checkpoint is
            past the head, or its ``head_hash`` differs from the log's hash at
            its checkpoint).
    """
    if state.checkpoint == 0:
        return None

    if state.head_hash == GENESIS_HASH:
        # The state was folded without record hashes; take the log's. The
        # state must not change during this await.
        record_hash = await log.record_hash(state.checkpoint)
        _check_belongs(state.checkpoint, state.head_hash, record_hash, log.path)
        assert record_hash is not None
        state.head_hash = record_hash

    started = time.perf_counter()
    prepared = prepare_snapshot(state)
    encoded = time.perf_counter()
    record_hash = await log.record_hash(prepared.position)
    _check_belongs(prepared.position, prepared.head_hash, record_hash, log.path)
    assert record_hash is not None
    await log.store_snapshot(
        prepared.position,
        record_hash,
        prepared.data,
        hashlib.sha256(prepared.data).digest(),
        keep=keep,
        chunks=prepared.chunks,
        chunk_refs=prepared.chunk_refs,
    )
    for chunk, ref in prepared.new_refs:
        chunk.ref = ref

    logger.info(
        "snapshot_saved",
        path=log.path,
        position=prepared.position,
        size_bytes=len(prepared.data),
        new_chunks=len(prepared.chunks),
        chunk_bytes=sum(len(c.index) + len(c.entries) for c in prepared.chunks),
        encode_ms=round((encoded - started) * 1000, 1),
        write_ms=round((time.perf_counter() - encoded) * 1000, 1),
    )

    return prepared.position


def prepare_snapshot(state: State) -> PreparedSnapshot:
    """Archive the ended entries of ``state`` and encode its snapshot.

    Chunks that no snapshot stored yet (those just archived, and those of a
    snapshot whose write failed) get new references at the state's
    checkpoint and are encoded as new rows.

    NOTE: chunks are never merged. A daemon that snapshots every 10,000
    records adds one or two small chunks each time, and the first read of
    history after a start reads one row per chunk.
    """
    for kind, entries in (("run", state.runs.hot), ("instance", state.instances.hot)):
        for key, entry in entries.items():
            if key != entry.id:
                raise ValueError(
                    f"cannot snapshot {kind} key {key!r}, whose entry has id "
                    f"{entry.id!r}; a snapshot stores entries by their ids"
                )

    position = state.checkpoint
    state.runs.archive_ended(is_ended_run)
    state.instances.archive_ended(is_ended_instance)
    chunks: list[SnapshotChunk] = []
    chunk_refs: list[tuple[int, int]] = []
    new_refs: list[tuple[Chunk, ChunkRef]] = []  # type: ignore[type-arg]
    refs_by_kind: dict[Kind, list[ChunkRef]] = {"runs": [], "instances": []}
    maps: tuple[tuple[Kind, EntryMap], ...] = (  # type: ignore[type-arg]
        ("runs", state.runs),
        ("instances", state.instances),
    )
    for kind, entry_map in maps:
        for chunk in entry_map.chunks:
            if chunk.ref is not None:
                chunk_refs.append((chunk.ref.position, chunk.ref.number))
                refs_by_kind[kind].append(chunk.ref)
                continue

            index = _encoder.encode(chunk.index())
            entries = _encoder.encode(chunk.entries())
            ref = ChunkRef(position, len(chunks), _sha256(index), _sha256(entries))
            chunks.append(SnapshotChunk(ref.position, ref.number, index, entries))
            new_refs.append((chunk, ref))
            refs_by_kind[kind].append(ref)

    runs = state.runs.hot_values()
    instances = state.instances.hot_values()
    data = StateData(
        STATE_FORMAT,
        position,
        state.head_hash,
        state.pools,
        state.default_pool,
        {run.id: run for run in runs},
        [state.runs.ranks[run.id] for run in runs],
        {instance.id: instance for instance in instances},
        [state.instances.ranks[instance.id] for instance in instances],
        refs_by_kind["runs"],
        refs_by_kind["instances"],
    )
    return PreparedSnapshot(
        position, state.head_hash, _encoder.encode(data), chunks, chunk_refs, new_refs
    )


async def maybe_snapshot(
    log: "EventLog",
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


# Loading


async def load_state(log: "EventLog") -> State:
    """Build the current state from the newest valid snapshot and the tail.

    A snapshot that does not match the log, fails its state hash or does not
    decode is skipped with a warning, and the next older one is tried. With
    none left, the whole log is replayed. The tail's chain is verified. The
    snapshot's archive chunks are read from the file on first use. When a
    chunk fails its hash then, the archive is rebuilt from a replay of the log,
    with a warning.

    Raises:
        LogCorruptedError: a record after the chosen snapshot is bad.
    """
    for header in await log.snapshot_headers():
        problem = _header_problem(header, await log.record_hash(header.position))
        if problem is not None:
            _warn_skipped(log.path, header.position, problem)
            continue

        data = await log.snapshot_state(header.position)
        try:
            stored = _decode_checked(header, data)
        except SnapshotInvalidError as exc:
            _warn_skipped(log.path, header.position, exc.problem)
            continue

        archive = _ArchiveFile(log.path, stored)
        state = state_from_data(
            stored, archive.chunks("runs"), archive.chunks("instances")
        )
        return await _apply_tail(log, state)

    return await _apply_tail(log, State())


def load_state_offline(reader: LogReader, at_position: int | None = None) -> State:
    """Build the state as of ``at_position`` (default: the head) from a reader.

    Uses the newest valid snapshot at or before ``at_position``, with the same
    checks as ``load_state`` and with every archive chunk read and checked,
    then applies the verified records up to it.
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

        try:
            data = reader.snapshot_state(header.position)
            state = _decode_eagerly(reader.connection, _decode_checked(header, data))
        except SnapshotInvalidError as exc:
            _warn_skipped(reader.path, header.position, exc.problem)
            continue

        break

    start = state.checkpoint
    with paused_gc():
        replay(reader.records(start, verify=True, until=limit), state)

    if state.checkpoint != start:
        # ``records`` checked that this stored hash continues the chain.
        head_hash = reader.record_hash(state.checkpoint)
        assert head_hash is not None
        state.head_hash = head_hash

    return state


def decode_snapshot(connection: sqlite3.Connection, data: bytes) -> State:
    """Decode the snapshot state ``data`` with every chunk it refers to.

    The caller has checked ``data`` against its state hash.

    Raises:
        SnapshotInvalidError: ``data`` or a chunk does not decode, or a chunk
            is missing or fails its hash.
    """
    return _decode_eagerly(connection, _decode_data(data))


async def _apply_tail(log: "EventLog", state: State) -> State:
    async for chunk in log.read_chunks(state.checkpoint, verify=True):
        # Paused per chunk only: other tasks run between chunks.
        with paused_gc():
            replay_with_hashes(((record, digest) for record, _, digest in chunk), state)

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


def _check_belongs(
    position: int, head_hash: bytes, record_hash: bytes | None, path: str
) -> None:
    if record_hash is None:
        raise ValueError(
            f"state checkpoint {position} is past the head of event log "
            f"{path}; save snapshots only of state folded from this log"
        )

    if head_hash not in (GENESIS_HASH, record_hash):
        raise ValueError(
            f"state head_hash {head_hash.hex()} differs from the hash "
            f"{record_hash.hex()} of record {position} in event log {path}; "
            "save snapshots only of state folded from this log"
        )


def _header_problem(header: SnapshotHeader, record_hash: bytes | None) -> str | None:
    """Describe why the snapshot does not match the log, or return ``None``."""
    if record_hash is None:
        return "the log has no record at that position"

    if record_hash != header.record_hash:
        return "record hash differs from the log's record at that position"

    return None


def _decode_checked(header: SnapshotHeader, data: bytes | None) -> StateData:
    """Check ``data`` against ``header`` and decode it.

    The hash is compared first, so a damaged state reports its hash, not its
    decode error.

    Raises:
        SnapshotInvalidError: naming the first check that failed.
    """
    if data is None:
        raise SnapshotInvalidError("snapshot row disappeared while loading")

    if _sha256(data) != header.state_hash:
        raise SnapshotInvalidError("state hash differs from SHA-256 of the state bytes")

    stored = _decode_data(data)
    if stored.checkpoint != header.position:
        raise SnapshotInvalidError(f"state checkpoint is {stored.checkpoint}")

    if stored.head_hash != header.record_hash:
        raise SnapshotInvalidError("state head_hash differs from the record hash")

    return stored


def _decode_data(data: bytes) -> StateData:
    # An array starts every format from 2 on; format 1 stored a map.
    if data[:1] and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        raise SnapshotInvalidError(
            f"state is in snapshot format 1, but this version reads only format "
            f"{STATE_FORMAT}"
        )

    with paused_gc():
        try:
            stored = _data_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise SnapshotInvalidError(f"state does not decode: {exc}") from None

    if stored.format != STATE_FORMAT:
        raise SnapshotInvalidError(
            f"state is in snapshot format {stored.format}; expected {STATE_FORMAT}"
        )

    return stored


def _decode_eagerly(connection: sqlite3.Connection, stored: StateData) -> State:
    """Build the state of ``stored`` with every chunk read and checked."""
    run_chunks: list[Chunk[Run]] = [
        _read_chunk(connection, "runs", ref) for ref in stored.run_chunks
    ]
    instance_chunks: list[Chunk[Instance]] = [
        _read_chunk(connection, "instances", ref) for ref in stored.instance_chunks
    ]

    return state_from_data(stored, run_chunks, instance_chunks)


def _read_chunk(connection: sqlite3.Connection, kind: Kind, ref: ChunkRef) -> Chunk:  # type: ignore[type-arg]
    index = _read_index(connection, ref)
    entries = _read_entries(connection, kind, ref)
    if len(entries) != len(index.keys):
        raise SnapshotInvalidError(
            f"chunk {ref.position}/{ref.number} has {len(entries)} entries for "
            f"{len(index.keys)} keys"
        )

    return Chunk(index, entries, ref=ref)


def _read_index(connection: sqlite3.Connection, ref: ChunkRef) -> ChunkIndex:
    data = _read_part(connection, ref, "chunk_index", ref.index_hash)
    try:
        return _index_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SnapshotInvalidError(
            f"chunk {ref.position}/{ref.number} index does not decode: {exc}"
        ) from None


def _read_entries(
    connection: sqlite3.Connection, kind: Kind, ref: ChunkRef
) -> list[Run] | list[Instance]:
    data = _read_part(connection, ref, "entries", ref.entries_hash)
    try:
        with paused_gc():
            return _entries_decoders[kind].decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise SnapshotInvalidError(
            f"chunk {ref.position}/{ref.number} entries do not decode: {exc}"
        ) from None


def _read_part(
    connection: sqlite3.Connection,
    ref: ChunkRef,
    part: Literal["chunk_index", "entries"],
    expected_hash: bytes,
) -> bytes:
    data = read_chunk_part(connection, ref.position, ref.number, part)
    if data is None:
        raise SnapshotInvalidError(f"chunk {ref.position}/{ref.number} is missing")

    if _sha256(data) != expected_hash:
        raise SnapshotInvalidError(
            f"chunk {ref.position}/{ref.number} {part} differs from its hash"
        )

    return data


class _ArchiveFile:
    """Reader of the archive chunks of one loaded snapshot, from the log file.

    Opens its own read-only connection on first use, from the thread that
    reads the state (the daemon's event loop). When a chunk is missing or
    fails its hash, the whole archive of that kind is rebuilt from a verified
    replay of the log up to the snapshot, which every later read then uses.
    """

    def __init__(self, path: str, stored: StateData) -> None:
        self._path = path
        self._position = stored.checkpoint
        self._refs: dict[Kind, list[ChunkRef]] = {
            "runs": stored.run_chunks,
            "instances": stored.instance_chunks,
        }
        self._connection: sqlite3.Connection | None = None
        self._indexes: dict[Kind, list[ChunkIndex]] = {}
        self._rebuilt: dict[Kind, list[list[Run] | list[Instance]]] = {}
        self._replayed: State | None = None

    def chunks(self, kind: Kind) -> list[Chunk]:  # type: ignore[type-arg]
        return [
            Chunk(
                read_index=functools.partial(self._index, kind, number),
                read_entries=functools.partial(self._entries, kind, number),
                ref=ref,
            )
            for number, ref in enumerate(self._refs[kind])
        ]

    def _index(self, kind: Kind, number: int) -> ChunkIndex:
        if kind not in self._indexes:
            self._indexes[kind] = self._read_indexes(kind)

        return self._indexes[kind][number]

    def _read_indexes(self, kind: Kind) -> list[ChunkIndex]:
        """Read and check every index of ``kind`` at once, so that a rebuild
        replaces all of them before any is used."""
        try:
            return [self._with_connection(_read_index, ref) for ref in self._refs[kind]]
        except (SnapshotInvalidError, sqlite3.DatabaseError) as exc:
            return self._rebuild(kind, str(exc))

    def _entries(self, kind: Kind, number: int) -> list[Run] | list[Instance]:
        if kind in self._rebuilt:
            return self._rebuilt[kind][number]

        try:
            return self._with_connection(_read_entries, kind, self._refs[kind][number])
        except (SnapshotInvalidError, sqlite3.DatabaseError) as exc:
            _warn_archive_rebuilt(self._path, self._position, kind, str(exc))
            entries = self._replay()
            keys = self._index(kind, number).keys
            if kind == "runs":
                return [entries.runs[key] for key in keys]

            return [entries.instances[key] for key in keys]

    def _rebuild(self, kind: Kind, problem: str) -> list[ChunkIndex]:
        """Replace the archive of ``kind`` by every entry of a replay: one
        chunk with all of them, then empty ones."""
        _warn_archive_rebuilt(self._path, self._position, kind, problem)
        replayed = self._replay()
        entry_map: EntryMap = replayed.runs if kind == "runs" else replayed.instances  # type: ignore[type-arg]
        entries = list(entry_map.values())
        keys = list(entry_map.keys())
        index = ChunkIndex(
            keys,
            [entry_map.rank_of(key) for key in keys],
            [entry.name for entry in entries],
        )
        count = len(self._refs[kind])
        self._rebuilt[kind] = [entries, *([] for _ in range(count - 1))]

        return [index, *(ChunkIndex([], [], []) for _ in range(count - 1))]

    def _replay(self) -> State:
        if self._replayed is None:
            self._replayed = self._with_connection(
                _replay_file, self._path, self._position
            )

        return self._replayed

    def _with_connection(self, read: Callable[..., object], *args: object) -> object:
        if self._connection is None:
            uri = pathlib.Path(self._path).absolute().as_uri() + "?mode=ro"
            self._connection = sqlite3.connect(uri, uri=True, isolation_level=None)

        return read(self._connection, *args)


def _replay_file(connection: sqlite3.Connection, path: str, position: int) -> State:
    """Return the state of a verified replay of records 1 to ``position``."""
    state = State()
    checked_position = 0
    previous_hash = GENESIS_HASH
    cursor = connection.execute(SELECT_ROWS_UNTIL, (0, position))
    with paused_gc():
        while rows := cursor.fetchmany(CHUNK_ROWS):
            checked, broken = check_rows(rows, checked_position, previous_hash)
            for record, _, digest in checked:
                apply(state, record, digest)

            if broken is not None:
                raise LogCorruptedError(
                    path, broken.position, broken.problem, repair_hint(path)
                )

            checked_position = checked[-1][0].position
            previous_hash = checked[-1][2]

    return state


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _warn_skipped(path: str, position: int, problem: str) -> None:
    logger.warning("snapshot_skipped", path=path, position=position, problem=problem)


def _warn_archive_rebuilt(path: str, position: int, kind: str, problem: str) -> None:
    logger.warning(
        "snapshot_archive_rebuilt",
        path=path,
        position=position,
        kind=kind,
        problem=problem,
    )
