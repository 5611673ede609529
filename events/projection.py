"""Projection of the log into current state: pools, instances and runs.

``apply`` folds one record into a ``State``. It reads times only from the
record, never from the clock, so replaying the same records always gives the
same state. For speed the fold updates ``state`` in place and returns it;
a caller that needs the old state keeps a copy (``copy_state``).

The daemon appends a run's end and its instance's release as two records, in
either order. The first of the two frees the instance, so no record leaves a
busy instance held by an ended run. In the same way, ``InstanceLost`` fails the
run that held the instance. A terminated instance is final: later events about
it change nothing.

Runs and instances live in ``EntryMap``s. Each keeps its active runs or live
instances, and every entry changed since the last snapshot, in a hot dict. A
snapshot moves the ended entries into an archive of chunks, which is decoded
only when something reads history. A daemon therefore opens in time that
depends on what is active, not on how long the log is.
"""

from collections.abc import (
    Callable,
    Iterable,
    Mapping,
)
from typing import Literal, TypeVar

import msgspec

from events.entry_map import (
    Chunk,
    ChunkRef,
    EntryMap,
)
from events.event_types import (
    DefaultPoolSet,
    InstanceClaimed,
    InstanceIdleExpired,
    InstanceLost,
    InstanceProvisioned,
    InstanceProvisioningFailed,
    InstanceReachable,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminated,
    InstanceTerminationFailed,
    InstanceTerminationRequested,
    InstanceUnreachable,
    PoolCreated,
    PoolDeleted,
    RunFailed,
    RunFinished,
    RunMaxDurationExceeded,
    RunReady,
    RunRestarted,
    RunRetried,
    RunSpec,
    RunStarted,
    RunStopped,
    RunStopRequested,
    RunSubmitted,
)
from events.grammar import format_duration
from events.model import Duration, Offer, Resources
from events.record import GENESIS_HASH, Record

DEFAULT_POOL = "default-pool"

InstanceStatus = Literal[
    "provisioning", "idle", "busy", "failed", "terminating", "terminated"
]
RunStatus = Literal["submitted", "provisioning", "running", "done", "failed", "stopped"]

LIVE_INSTANCE_STATUSES = frozenset({"provisioning", "idle", "busy", "terminating"})
SCHEDULABLE_INSTANCE_STATUSES = frozenset({"provisioning", "idle", "busy"})
ENDED_INSTANCE_STATUSES = frozenset({"failed", "terminated"})
ACTIVE_RUN_STATUSES = frozenset({"submitted", "provisioning", "running"})

# Version of ``encode_state``'s format and of the snapshots in events.snapshot.
STATE_FORMAT = 2


# The projection's structs hold no reference cycles, so they opt out of the
# cyclic garbage collector (``gc=False``), which makes a fold allocate less and
# collect faster. ``array_like`` encodes them as arrays, without field names.


class Pool(msgspec.Struct, gc=False, array_like=True):
    name: str
    created_at: int


class Instance(msgspec.Struct, gc=False, array_like=True):
    """An instance as the log describes it.

    ``schedulable`` turns false for good once the idle duration expired or a
    termination was requested, in the same record, so no run lands on an
    instance that is being torn down. ``reachable`` is false from a failed
    health check until a later one succeeds, and placement skips the instance
    meanwhile.
    """

    id: str
    name: str
    pool: str
    offer: Offer
    resources: Resources
    idle_duration: Duration
    requested_at: int
    status: InstanceStatus = "provisioning"
    schedulable: bool = True
    run_id: str | None = None
    idle_since: int | None = None
    for_run: str | None = None
    hostname: str = ""
    backend_data: dict[str, str] = {}
    provisioned_at: int | None = None
    terminating_since: int | None = None
    ended_at: int | None = None
    reason: str | None = None
    termination_attempts: int = 0
    last_error: str | None = None
    reachable: bool = True
    unreachable_since: int | None = None
    unreachable_error: str | None = None

    @property
    def backend(self) -> str:
        return self.offer.backend

    @property
    def price(self) -> float:
        return self.offer.price


class RunAttempt(msgspec.Struct, gc=False, array_like=True):
    """An ended attempt of a retried run; ``number`` counts from 1."""

    number: int
    trigger: str
    reason: str
    instance_id: str | None = None
    started_at: int | None = None
    ended_at: int | None = None
    exit_status: int | None = None


class Run(msgspec.Struct, gc=False, array_like=True):
    """A run as the log describes it.

    ``attempts`` counts the instance claims of the run. ``history`` lists the
    attempts that ended in a retry, oldest first, and the current attempt is
    number ``len(history) + 1``. ``attempt_started_at`` is the first start of the
    current attempt (service restarts keep it), from which ``max_duration``
    counts. A service is ``ready`` once its probe passed since its last start;
    ``url`` is where it was reached. ``retry_at`` delays the next placement of
    a retried run, and ``capacity_wait_since`` is set while a run that found no
    capacity waits for some within its retry duration.
    """

    id: str
    name: str
    pool: str
    spec: RunSpec
    user: str
    uid: int | None
    submitted_at: int
    status: RunStatus = "submitted"
    instance_id: str | None = None
    attempts: int = 0
    pid: int = 0
    pid_start_time: int = 0
    started_at: int | None = None
    ended_at: int | None = None
    exit_status: int | None = None
    reason: str | None = None
    stop_requested: bool = False
    abort: bool = False
    ready: bool = False
    url: str | None = None
    restarts: int = 0
    retry_at: int | None = None
    attempt_started_at: int | None = None
    capacity_wait_since: int | None = None
    history: tuple[RunAttempt, ...] = ()


EntryT = TypeVar("EntryT", Run, Instance)


class State:
    """Everything the log records, as of ``checkpoint`` (the last position applied).

    ``runs`` and ``instances`` accept plain dicts, which become ``EntryMap``s
    whose entries rank before any a record creates.
    """

    __slots__ = (
        "checkpoint",
        "default_pool",
        "head_hash",
        "instances",
        "pools",
        "runs",
    )

    def __init__(
        self,
        checkpoint: int = 0,
        head_hash: bytes = GENESIS_HASH,
        pools: dict[str, Pool] | None = None,
        default_pool: str | None = None,
        instances: Mapping[str, Instance] | None = None,
        runs: Mapping[str, Run] | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.head_hash = head_hash
        self.pools: dict[str, Pool] = {} if pools is None else pools
        self.default_pool = default_pool
        self.instances: EntryMap[Instance] = _as_entry_map(instances)
        self.runs: EntryMap[Run] = _as_entry_map(runs)

    def default_pool_name(self) -> str:
        return self.default_pool or DEFAULT_POOL

    def active_runs(self) -> list[Run]:
        """Return the submitted, provisioning and running runs, oldest first,
        without reading the archive."""
        return [
            run for run in self.runs.hot_values() if run.status in ACTIVE_RUN_STATUSES
        ]

    def live_instances(self) -> list[Instance]:
        """Return the instances that have not failed or terminated, oldest
        first, without reading the archive."""
        return [
            instance
            for instance in self.instances.hot_values()
            if instance.status in LIVE_INSTANCE_STATUSES
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, State):
            return NotImplemented

        return encode_state(self) == encode_state(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"State(checkpoint={self.checkpoint}, pools={len(self.pools)}, "
            f"instances={len(self.instances.hot)} in memory, "
            f"runs={len(self.runs.hot)} in memory)"
        )


def _as_entry_map(entries: Mapping[str, EntryT] | None) -> EntryMap[EntryT]:
    if isinstance(entries, EntryMap):
        return entries

    return EntryMap(entries)


def is_ended_run(run: Run) -> bool:
    return run.status not in ACTIVE_RUN_STATUSES


def is_ended_instance(instance: Instance) -> bool:
    return instance.status in ENDED_INSTANCE_STATUSES


class StateData(msgspec.Struct, array_like=True, gc=False):
    """The stored form of a ``State``, written by ``encode_state`` and by
    snapshots.

    ``runs`` and ``instances`` are the hot entries in creation order, with
    their ranks in ``run_ranks`` and ``instance_ranks``. The chunk lists are
    empty in ``encode_state``'s output, which contains every entry. A snapshot
    lists the archive chunks that it stores beside it.
    """

    format: int
    checkpoint: int
    head_hash: bytes
    pools: dict[str, Pool]
    default_pool: str | None
    runs: dict[str, Run]
    run_ranks: list[int]
    instances: dict[str, Instance]
    instance_ranks: list[int]
    run_chunks: list[ChunkRef] = []
    instance_chunks: list[ChunkRef] = []


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(StateData)


def encode_state(state: State) -> bytes:
    """Encode every entry of ``state``, reading its whole archive.

    Equal states encode to equal bytes, whichever entries are archived.
    """
    runs = dict(state.runs.items())
    instances = dict(state.instances.items())
    data = StateData(
        STATE_FORMAT,
        state.checkpoint,
        state.head_hash,
        state.pools,
        state.default_pool,
        runs,
        [state.runs.rank_of(key) for key in runs],
        instances,
        [state.instances.rank_of(key) for key in instances],
    )

    return _state_encoder.encode(data)


def decode_state(data: bytes) -> State:
    """Decode what ``encode_state`` wrote.

    Raises:
        msgspec.DecodeError: ``data`` is not a state, or one in another format.
    """
    stored = _state_decoder.decode(data)
    if stored.format != STATE_FORMAT or stored.run_chunks or stored.instance_chunks:
        raise msgspec.DecodeError(
            f"state format is {stored.format} with "
            f"{len(stored.run_chunks) + len(stored.instance_chunks)} chunks; "
            f"expected format {STATE_FORMAT} with none"
        )

    return state_from_data(stored, [], [])


def state_from_data(
    stored: StateData,
    run_chunks: list[Chunk[Run]],
    instance_chunks: list[Chunk[Instance]],
) -> State:
    """Build a ``State`` from its stored form and its archive chunks."""
    state = State(
        stored.checkpoint, stored.head_hash, stored.pools, stored.default_pool
    )
    state.runs = EntryMap(stored.runs, stored.run_ranks, run_chunks)
    state.instances = EntryMap(stored.instances, stored.instance_ranks, instance_chunks)

    return state


def copy_state(state: State) -> State:
    return decode_state(encode_state(state))


# Handlers, one per event type. Each gets the state, the event and the
# record's time in microseconds.


def _pool_created(state: State, event: PoolCreated, at: int) -> None:
    _add_pool(state, event.pool, at)


def _add_pool(state: State, name: str, at: int) -> None:
    """Add pool ``name``, which becomes the default pool when none is set."""
    state.pools[name] = Pool(name, at)
    if state.default_pool is None:
        state.default_pool = name


def _pool_deleted(state: State, event: PoolDeleted, at: int) -> None:
    state.pools.pop(event.pool, None)
    if state.default_pool == event.pool:
        state.default_pool = None


def _default_pool_set(state: State, event: DefaultPoolSet, at: int) -> None:
    state.default_pool = event.pool


def _instance_requested(state: State, event: InstanceRequested, at: int) -> None:
    # Positional arguments, because this and ``_run_submitted`` run once per
    # entry in a replay: with keywords, building a Run took about twice as long
    # (200 against 110 ns in a micro-benchmark, CPython 3.11, msgspec 0.23).
    instance = Instance(
        event.instance_id,
        event.name,
        event.pool,
        event.offer,
        event.offer.resources,
        event.idle_duration,
        at,
        "provisioning",
        True,
        None,
        None,
        event.run_id,
    )
    state.instances.insert(event.instance_id, instance, state.checkpoint)
    if event.pool not in state.pools and event.pool == DEFAULT_POOL:
        _add_pool(state, event.pool, at)

    if event.run_id is not None and event.run_id in state.runs.hot:
        run = state.runs.hot[event.run_id]
        if run.status == "submitted":
            run.status = "provisioning"


def _instance_provisioned(state: State, event: InstanceProvisioned, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    instance.resources = event.resources
    instance.hostname = event.hostname
    instance.backend_data = dict(event.backend_data)
    instance.provisioned_at = at
    if instance.status == "provisioning":
        instance.status = "idle"
        instance.idle_since = at


def _instance_provisioning_failed(
    state: State, event: InstanceProvisioningFailed, at: int
) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.status == "terminated":
        return

    instance.status = "failed"
    instance.schedulable = False
    instance.reason = event.reason
    instance.ended_at = at


def _instance_claimed(state: State, event: InstanceClaimed, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    instance.status = "busy"
    instance.run_id = event.run_id
    instance.idle_since = None
    run = state.runs.hot[event.run_id]
    run.instance_id = event.instance_id
    run.attempts += 1
    if run.status == "submitted":
        run.status = "provisioning"


def _instance_released(state: State, event: InstanceReleased, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.run_id != event.run_id:
        # The run's end already freed the instance, which another run may
        # hold by now.
        return

    instance.run_id = None
    if instance.status == "busy":
        instance.status = "idle"
        instance.idle_since = at


def _instance_idle_expired(state: State, event: InstanceIdleExpired, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.status == "terminated":
        return

    instance.schedulable = False
    instance.status = "terminating"
    instance.terminating_since = at
    instance.reason = "idle duration expired"


def _instance_termination_requested(
    state: State, event: InstanceTerminationRequested, at: int
) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.status == "terminated":
        return

    instance.schedulable = False
    instance.status = "terminating"
    if instance.terminating_since is None:
        instance.terminating_since = at

    instance.reason = event.reason


def _instance_termination_failed(
    state: State, event: InstanceTerminationFailed, at: int
) -> None:
    instance = state.instances.hot[event.instance_id]
    instance.termination_attempts = event.attempt
    instance.last_error = event.error


def _instance_terminated(state: State, event: InstanceTerminated, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.status != "terminated":
        _end_instance(instance, at)


def _instance_lost(state: State, event: InstanceLost, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.status == "terminated":
        return

    run = state.runs.hot.get(instance.run_id or "")
    if run is not None and run.status in ACTIVE_RUN_STATUSES:
        run.status = "failed"
        run.reason = f"instance {instance.id} lost: {event.reason}"
        run.ended_at = at

    instance.reason = event.reason
    _end_instance(instance, at)


def _instance_unreachable(state: State, event: InstanceUnreachable, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    if instance.reachable:
        instance.unreachable_since = at

    instance.reachable = False
    instance.unreachable_error = event.error


def _instance_reachable(state: State, event: InstanceReachable, at: int) -> None:
    instance = state.instances.hot[event.instance_id]
    instance.reachable = True
    instance.unreachable_since = None
    instance.unreachable_error = None


def _end_instance(instance: Instance, at: int) -> None:
    instance.status = "terminated"
    instance.schedulable = False
    instance.run_id = None
    instance.idle_since = None
    instance.ended_at = at


def _run_submitted(state: State, event: RunSubmitted, at: int) -> None:
    run = Run(
        event.run_id, event.name, event.pool, event.spec, event.user, event.uid, at
    )
    state.runs.insert(event.run_id, run, state.checkpoint)


def _run_started(state: State, event: RunStarted, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.status = "running"
    run.instance_id = event.instance_id
    run.pid = event.pid
    run.pid_start_time = event.pid_start_time
    run.started_at = at
    run.retry_at = None
    run.capacity_wait_since = None
    if run.attempt_started_at is None:
        run.attempt_started_at = at


def _run_finished(state: State, event: RunFinished, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.exit_status = event.exit_status
    if event.reason is not None:
        run.reason = event.reason
    elif event.exit_status != 0:
        run.reason = f"exited with status {event.exit_status}"

    _end_run(state, run, "done" if event.exit_status == 0 else "failed", at)


def _run_failed(state: State, event: RunFailed, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.reason = event.reason
    run.exit_status = event.exit_status
    _end_run(state, run, "failed", at)


def _run_stop_requested(state: State, event: RunStopRequested, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.stop_requested = True
    run.abort = run.abort or event.abort


def _run_stopped(state: State, event: RunStopped, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.exit_status = event.exit_status
    _end_run(state, run, "stopped", at)


def _run_ready(state: State, event: RunReady, at: int) -> None:
    run = state.runs.hot[event.run_id]
    run.ready = True
    run.url = event.url


def _run_restarted(state: State, event: RunRestarted, at: int) -> None:
    """Put the service back to claimed-but-not-started on its instance."""
    run = state.runs.hot[event.run_id]
    run.restarts = event.restart
    run.ready = False
    run.pid = 0
    run.pid_start_time = 0
    if run.status == "running":
        run.status = "provisioning"


def _run_retried(state: State, event: RunRetried, at: int) -> None:
    """Archive the ended attempt and queue the run again."""
    run = state.runs.hot[event.run_id]
    attempt = RunAttempt(
        number=len(run.history) + 1,
        trigger=event.trigger,
        reason=event.reason,
        instance_id=run.instance_id,
        started_at=run.attempt_started_at,
        ended_at=run.ended_at or at,
        exit_status=event.exit_status,
    )
    run.history = (*run.history, attempt)
    _free_instance(state, run, at)
    run.status = "submitted"
    run.instance_id = None
    run.pid = 0
    run.pid_start_time = 0
    run.started_at = None
    run.ended_at = None
    run.exit_status = None
    run.reason = None
    run.ready = False
    run.attempt_started_at = None
    run.restarts = 0
    run.retry_at = event.retry_at
    run.capacity_wait_since = at if event.trigger == "no-capacity" else None


def _run_max_duration_exceeded(
    state: State, event: RunMaxDurationExceeded, at: int
) -> None:
    run = state.runs.hot[event.run_id]
    run.stop_requested = True
    run.reason = f"exceeded its max duration of {format_duration(event.max_duration)}"


def _end_run(state: State, run: Run, status: RunStatus, at: int) -> None:
    """End ``run`` and free the instance it still holds, idle from ``at``.

    When the ``InstanceReleased`` record came first, the instance is free
    already. When it comes second, it changes nothing.
    """
    run.status = status
    run.ended_at = at
    _free_instance(state, run, at)


def _free_instance(state: State, run: Run, at: int) -> None:
    instance = state.instances.hot.get(run.instance_id or "")
    if instance is not None and instance.status == "busy" and instance.run_id == run.id:
        instance.status = "idle"
        instance.run_id = None
        instance.idle_since = at


_HANDLERS: dict[type, Callable[[State, object, int], None]] = {
    PoolCreated: _pool_created,  # type: ignore[dict-item]
    PoolDeleted: _pool_deleted,  # type: ignore[dict-item]
    DefaultPoolSet: _default_pool_set,  # type: ignore[dict-item]
    InstanceRequested: _instance_requested,  # type: ignore[dict-item]
    InstanceProvisioned: _instance_provisioned,  # type: ignore[dict-item]
    InstanceProvisioningFailed: _instance_provisioning_failed,  # type: ignore[dict-item]
    InstanceClaimed: _instance_claimed,  # type: ignore[dict-item]
    InstanceReleased: _instance_released,  # type: ignore[dict-item]
    InstanceIdleExpired: _instance_idle_expired,  # type: ignore[dict-item]
    InstanceTerminationRequested: _instance_termination_requested,  # type: ignore[dict-item]
    InstanceTerminationFailed: _instance_termination_failed,  # type: ignore[dict-item]
    InstanceTerminated: _instance_terminated,  # type: ignore[dict-item]
    InstanceLost: _instance_lost,  # type: ignore[dict-item]
    InstanceUnreachable: _instance_unreachable,  # type: ignore[dict-item]
    InstanceReachable: _instance_reachable,  # type: ignore[dict-item]
    RunSubmitted: _run_submitted,  # type: ignore[dict-item]
    RunStarted: _run_started,  # type: ignore[dict-item]
    RunFinished: _run_finished,  # type: ignore[dict-item]
    RunFailed: _run_failed,  # type: ignore[dict-item]
    RunStopRequested: _run_stop_requested,  # type: ignore[dict-item]
    RunStopped: _run_stopped,  # type: ignore[dict-item]
    RunReady: _run_ready,  # type: ignore[dict-item]
    RunRestarted: _run_restarted,  # type: ignore[dict-item]
    RunRetried: _run_retried,  # type: ignore[dict-item]
    RunMaxDurationExceeded: _run_max_duration_exceeded,  # type: ignore[dict-item]
}


def apply(state: State, record: Record, record_hash: bytes = b"") -> State:
    """Fold ``record`` into ``state`` and return it.

    ``record_hash`` becomes the state's ``head_hash`` when given, so a snapshot
    of the state names the exact record it ends at. A record that names an
    unknown run or instance raises ``KeyError`` and leaves ``state`` partly
    applied, with ``checkpoint`` at the record.
    """
    event = record.event
    # Set first: a handler that creates an entry ranks it by this position.
    state.checkpoint = record.position
    _HANDLERS[type(event)](state, event, record.recorded_at)
    if record_hash:
        state.head_hash = record_hash

    return state


def replay(records: Iterable[Record], state: State | None = None) -> State:
    """Fold ``records`` into ``state`` (a new one if not given) and return it.

    Faster than calling ``apply`` for each record, which matters for a
    replay of a whole log.
    """
    state = State() if state is None else state
    handlers = _HANDLERS
    for record in records:
        event = record.event
        state.checkpoint = record.position
        handlers[type(event)](state, event, record.recorded_at)

    return state


def replay_with_hashes(records: Iterable[tuple[Record, bytes]], state: State) -> State:
    """Fold ``(record, hash)`` pairs into ``state`` like ``replay``, and set
    ``head_hash`` to the last hash."""
    handlers = _HANDLERS
    record_hash = b""
    for record, record_hash in records:
        event = record.event
        state.checkpoint = record.position
        handlers[type(event)](state, event, record.recorded_at)

    if record_hash:
        state.head_hash = record_hash

    return state


def shown_reason(instance: Instance) -> str | None:
    """Return the note to show with an instance: failed terminations, an
    unreachable host, or why it ended."""
    if instance.last_error and instance.status == "terminating":
        return (
            f"termination failed {instance.termination_attempts} times: "
            f"{instance.last_error}"
        )

    if not instance.reachable and instance.status not in ("terminated", "failed"):
        return f"unreachable: {instance.unreachable_error}"

    return instance.reason


def shown_status(run: Run) -> str:
    """Return the status to show: a running service is ``starting`` until ready."""
    if run.spec.type == "service" and run.status == "running" and not run.ready:
        return "starting"

    return run.status


def check_invariants(state: State) -> list[str]:
    """Return a description of each broken invariant; empty when all hold.

    The invariants: a busy instance is held by one active run, which points
    back at it, and no other instance is held by a run. An idle instance has
    ``idle_since``.
    Only provisioning, idle and busy instances are schedulable. No two active
    runs claim one instance, and an active run's instance has not ended. A
    running run has an instance, and every instance a run names exists. The
    default pool, when set, exists.
    """
    problems: list[str] = []
    for instance in state.instances.values():
        problems.extend(_instance_problems(state, instance))

    problems.extend(_run_problems(state))
    if state.default_pool is not None and state.default_pool not in state.pools:
        problems.append(f"default pool {state.default_pool} does not exist")

    return problems


def _instance_problems(state: State, instance: Instance) -> list[str]:
    problems = []
    label = f"{instance.status} instance {instance.id}"
    if instance.status == "busy":
        problems.extend(_holder_problems(state, instance))
    elif instance.run_id is not None:
        problems.append(f"{label} is still held by run {instance.run_id}")

    if instance.status == "idle" and instance.idle_since is None:
        problems.append(f"{label} has no idle_since")

    if instance.schedulable and instance.status not in SCHEDULABLE_INSTANCE_STATUSES:
        problems.append(f"{label} is schedulable")

    return problems


def _holder_problems(state: State, instance: Instance) -> list[str]:
    """Check that busy ``instance`` is held by an active run that points back."""
    if instance.run_id is None:
        return [f"busy instance {instance.id} is held by no run"]

    run = state.runs.get(instance.run_id)
    if run is None:
        return [f"busy instance {instance.id} is held by unknown run {instance.run_id}"]

    problems = []
    if run.status not in ACTIVE_RUN_STATUSES:
        problems.append(
            f"busy instance {instance.id} is held by run {run.id}, "
            f"which is {run.status}"
        )

    if run.instance_id != instance.id:
        problems.append(
            f"busy instance {instance.id} is held by run {run.id}, "
            f"which points at instance {run.instance_id}"
        )

    return problems


def _run_problems(state: State) -> list[str]:
    problems = []
    claimed_by: dict[str, str] = {}
    for run in state.runs.values():
        instance = state.instances.get(run.instance_id or "")
        if run.instance_id is not None and instance is None:
            problems.append(
                f"run {run.id} points at unknown instance {run.instance_id}"
            )

        if run.status not in ACTIVE_RUN_STATUSES:
            continue

        if run.status == "running" and run.instance_id is None:
            problems.append(f"running run {run.id} has no instance")

        if instance is not None and instance.status in ENDED_INSTANCE_STATUSES:
            problems.append(
                f"{run.status} run {run.id} is on {instance.status} "
                f"instance {instance.id}"
            )

        if run.instance_id is not None:
            holder = claimed_by.setdefault(run.instance_id, run.id)
            if holder != run.id:
                problems.append(
                    f"instance {run.instance_id} is claimed by active runs "
                    f"{holder} and {run.id}"
                )

    return problems
