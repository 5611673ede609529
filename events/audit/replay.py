"""Replay of a log to a position or a time, and the pools, instances and runs then.

The state comes from the newest valid snapshot at or before the point plus the
verified records after it, streamed in chunks. The rows have the field names of
the daemon's ``PoolView``, ``InstanceView`` and ``RunView``, so the tables of
``pool ps`` and ``ps`` print them. Idle times are measured up to the replay
point, not up to the wall clock.
"""

import shlex

import msgspec

from events.audit.times import utc_iso
from events.errors import InvalidValueError
from events.grammar import format_duration
from events.log_reader import LogReader
from events.projection import (
    ACTIVE_RUN_STATUSES,
    LIVE_INSTANCE_STATUSES,
    Instance,
    Run,
    State,
    apply,
    shown_reason,
    shown_status,
)
from events.record import Record, decode_body
from events.snapshot import load_state_offline


class ReplayPoint(msgspec.Struct, frozen=True):
    """The point to replay to: ``position``, or the last record at or before
    ``time`` (UTC microseconds). Exactly one of them is set."""

    position: int | None = None
    time: int | None = None


class PoolRow(msgspec.Struct, frozen=True):
    name: str
    default: bool
    created_at: str
    instances: int
    idle: int
    busy: int


class InstanceRow(msgspec.Struct, frozen=True):
    """An instance at the replay point; ``idle_seconds`` is measured up to it."""

    id: str
    name: str
    pool: str
    backend: str
    region: str
    instance_type: str
    resources: str
    spot: bool
    price: float
    status: str
    schedulable: bool
    run: str | None
    idle_since: str | None
    idle_seconds: float | None
    idle_duration: str
    created_at: str
    reason: str | None = None


class RunRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    pool: str
    type: str
    status: str
    command: str
    user: str
    instance: str | None
    submitted_at: str
    started_at: str | None
    ended_at: str | None
    exit_status: int | None
    reason: str | None
    wait_ms: float | None


class ReplayView(msgspec.Struct, frozen=True):
    """The state after record ``position``; ``at`` is the time idle times run to.

    ``at`` is the requested time for a replay to a time, else the time of the
    record at ``position`` (``None`` for position 0).
    """

    position: int
    at: str | None
    pools: tuple[PoolRow, ...]
    instances: tuple[InstanceRow, ...]
    runs: tuple[RunRow, ...]


def replay_state(reader: LogReader, point: ReplayPoint) -> tuple[State, int | None]:
    """Return the state at ``point`` and the time idle times are measured to.

    Raises:
        InvalidValueError: the position is past the head of the log.
        LogCorruptedError: a record up to the point is bad.
    """
    if point.time is not None:
        return _replay_to_time(reader, point.time), point.time

    position = point.position or 0
    head_position, _ = reader.head()
    if position > head_position:
        raise InvalidValueError(
            "position", position, f"a position from 0 to the head {head_position}"
        )

    state = load_state_offline(reader, position)
    record = read_record(reader, position)

    return state, None if record is None else record.recorded_at


def _replay_to_time(reader: LogReader, time_us: int) -> State:
    start = 0
    for header in reader.snapshot_headers():
        record = read_record(reader, header.position)
        if record is not None and record.recorded_at <= time_us:
            start = header.position
            break

    state = load_state_offline(reader, start) if start else State()
    for record, digest in reader.records_with_hashes(state.checkpoint, verify=True):
        if record.recorded_at > time_us:
            break

        apply(state, record, digest)

    return state


def read_record(reader: LogReader, position: int) -> Record | None:
    """Return the record at ``position``, unchecked (``None`` when there is none)."""
    row = reader.connection.execute(
        "SELECT body FROM events WHERE position = ?", (position,)
    ).fetchone()

    return None if row is None else decode_body(row[0])


def replay_view(
    reader: LogReader, point: ReplayPoint, *, show_all: bool = False
) -> ReplayView:
    """Replay to ``point`` and build the rows of the pools, instances and runs.

    Without ``show_all``, ended instances and runs are left out, as in the live
    ``pool ps`` and ``ps``.
    """
    state, at = replay_state(reader, point)

    return state_view(state, at, show_all=show_all)


def state_view(state: State, at: int | None, *, show_all: bool = False) -> ReplayView:
    instances = [
        instance_row(state, instance, at)
        for instance in state.instances.values()
        if show_all or instance.status not in ("terminated", "failed")
    ]
    runs = [
        run_row(state, run)
        for run in state.runs.values()
        if show_all or run.status in ACTIVE_RUN_STATUSES
    ]

    return ReplayView(
        position=state.checkpoint,
        at=None if at is None else utc_iso(at),
        pools=tuple(pool_rows(state)),
        instances=tuple(instances),
        runs=tuple(runs),
    )


def pool_rows(state: State) -> list[PoolRow]:
    """Build the pool rows in the order of the live ``pool list``."""
    names = list(state.pools)
    default = state.default_pool_name()
    if default not in names:
        names.insert(0, default)

    rows = []
    for name in names:
        pool = state.pools.get(name)
        live = [
            instance
            for instance in state.instances.values()
            if instance.pool == name and instance.status in LIVE_INSTANCE_STATUSES
        ]
        rows.append(
            PoolRow(
                name=name,
                default=name == default,
                created_at=utc_iso(pool.created_at) if pool else "",
                instances=len(live),
                idle=sum(1 for instance in live if instance.status == "idle"),
                busy=sum(1 for instance in live if instance.status == "busy"),
            )
        )

    return rows


def instance_row(state: State, instance: Instance, at: int | None) -> InstanceRow:
    run = state.runs.get(instance.run_id or "")
    idle_seconds = None
    if instance.status == "idle" and instance.idle_since is not None and at is not None:
        idle_seconds = max(0.0, (at - instance.idle_since) / 1_000_000)

    reason = shown_reason(instance)

    return InstanceRow(
        id=instance.id,
        name=instance.name,
        pool=instance.pool,
        backend=instance.offer.backend,
        region=instance.offer.region,
        instance_type=instance.offer.instance_type,
        resources=instance.resources.describe(),
        spot=instance.offer.spot,
        price=instance.offer.price,
        status=instance.status,
        schedulable=instance.schedulable,
        run=run.name if run else None,
        idle_since=None
        if instance.idle_since is None
        else utc_iso(instance.idle_since),
        idle_seconds=idle_seconds,
        idle_duration=format_duration(instance.idle_duration),
        created_at=utc_iso(instance.requested_at),
        reason=reason,
    )


def run_row(state: State, run: Run) -> RunRow:
    instance = state.instances.get(run.instance_id or "")
    wait_ms = None
    if run.started_at is not None:
        wait_ms = (run.started_at - run.submitted_at) / 1000

    if run.spec.argv:
        command = shlex.join(run.spec.argv)
    else:
        command = "; ".join(run.spec.commands)

    return RunRow(
        id=run.id,
        name=run.name,
        pool=run.pool,
        type=run.spec.type,
        status=shown_status(run),
        command=command,
        user=run.user,
        instance=instance.name if instance else None,
        submitted_at=utc_iso(run.submitted_at),
        started_at=None if run.started_at is None else utc_iso(run.started_at),
        ended_at=None if run.ended_at is None else utc_iso(run.ended_at),
        exit_status=run.exit_status,
        reason=run.reason,
        wait_ms=wait_ms,
    )
