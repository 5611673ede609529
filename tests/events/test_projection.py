"""Tests for the projection in events/projection.py.

Example tests pin each event type's effect on the state. Property tests
generate histories the daemon could append (a small model of pools, instances
and runs decides which events are allowed next) and check invariants after
every record, snapshot plus tail against a full replay, and determinism.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from unittest import mock

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from events.event_types import (
    DefaultPoolSet,
    Event,
    InstanceClaimed,
    InstanceIdleExpired,
    InstanceLost,
    InstanceProvisioned,
    InstanceProvisioningFailed,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminated,
    InstanceTerminationFailed,
    InstanceTerminationRequested,
    PoolCreated,
    PoolDeleted,
    RunFailed,
    RunFinished,
    RunSpec,
    RunStarted,
    RunStopped,
    RunStopRequested,
    RunSubmitted,
)
from events.model import DAEMON_ACTOR, Actor, Duration, Gpu, Offer, Resources
from events.projection import (
    DEFAULT_POOL,
    Instance,
    Run,
    State,
    apply,
    check_invariants,
    copy_state,
    decode_state,
    encode_state,
    replay,
)
from events.record import GENESIS_HASH, Record, chain_hash, decode_body, encode_body

# Times are microseconds since the Unix epoch. Example records are one second
# apart, so the record at position n was recorded at ``at(n)``.
BASE_TIME = 1_700_000_000_000_000
SECOND = 1_000_000

USER = Actor(1000, "alice")

CPU_OFFER = Offer(
    backend="local",
    region="local",
    instance_type="cpu-4",
    resources=Resources(cpus=4, memory_gb=16.0),
)
GPU_OFFER = Offer(
    backend="aws",
    region="us-east-1",
    instance_type="g5.xlarge",
    resources=Resources(
        cpus=4, memory_gb=16.0, gpus=(Gpu("A10G", 24.0),), disk_gb=100.0
    ),
    spot=True,
    price=0.4,
)


def at(position: int) -> int:
    """Return the recorded_at of the example record at ``position``."""
    return BASE_TIME + position * SECOND


def stream_of(event: Event) -> str:
    """Return the stream the daemon appends ``event`` to."""
    match event:
        case PoolCreated() | PoolDeleted() | DefaultPoolSet():
            return f"pool/{event.pool}"
        case (
            RunSubmitted()
            | RunStarted()
            | RunFinished()
            | RunFailed()
            | RunStopRequested()
            | RunStopped()
        ):
            return f"run/{event.run_id}"
        case _:
            return f"instance/{event.instance_id}"


class LogWriter:
    """Builds records the way the log stores them, with their chain hashes.

    Each record goes through its stored JSON body and back, so replay gets
    exactly the records it would read from the log.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.hashes: list[bytes] = []
        self._versions: dict[str, int] = {}
        self._head = GENESIS_HASH

    def append(self, event: Event, recorded_at: int, actor: Actor) -> Record:
        stream = stream_of(event)
        version = self._versions.get(stream, 0) + 1
        self._versions[stream] = version
        record = Record(
            position=len(self.records) + 1,
            stream=stream,
            version=version,
            recorded_at=recorded_at,
            actor=actor,
            event=event,
        )
        body = encode_body(record)
        self._head = chain_hash(self._head, body)
        self.records.append(decode_body(body))
        self.hashes.append(self._head)

        return self.records[-1]


def records_for(events: Sequence[Event]) -> list[Record]:
    """Return ``events`` as log records, the one at position n recorded at at(n)."""
    writer = LogWriter()
    for event in events:
        writer.append(event, at(len(writer.records) + 1), DAEMON_ACTOR)

    return writer.records


def fold(events: Sequence[Event]) -> State:
    return replay(records_for(events))


# Event builders with the values the example tests use.


def pool_created(pool: str) -> PoolCreated:
    return PoolCreated(pool)


def requested(
    instance_id: str = "i1", pool: str = DEFAULT_POOL, run_id: str | None = None
) -> InstanceRequested:
    return InstanceRequested(
        instance_id=instance_id,
        name=f"instance-{instance_id}",
        pool=pool,
        offer=CPU_OFFER,
        idle_duration=300,
        run_id=run_id,
    )


def provisioned(instance_id: str = "i1") -> InstanceProvisioned:
    return InstanceProvisioned(
        instance_id=instance_id,
        resources=CPU_OFFER.resources,
        hostname="localhost",
        backend_data={"cpus": "0-3"},
    )


def submitted(run_id: str = "r1", pool: str = DEFAULT_POOL) -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        name=f"run-{run_id}",
        pool=pool,
        spec=RunSpec(argv=("python", "train.py")),
        user="alice",
        uid=1000,
    )


def claimed(instance_id: str = "i1", run_id: str = "r1") -> InstanceClaimed:
    return InstanceClaimed(instance_id=instance_id, run_id=run_id)


def released(instance_id: str = "i1", run_id: str = "r1") -> InstanceReleased:
    return InstanceReleased(instance_id=instance_id, run_id=run_id)


def started(run_id: str = "r1", instance_id: str = "i1") -> RunStarted:
    return RunStarted(
        run_id=run_id, instance_id=instance_id, pid=4242, pid_start_time=99
    )


def idle_expired(instance_id: str = "i1") -> InstanceIdleExpired:
    return InstanceIdleExpired(
        instance_id=instance_id, idle_since=at(2), idle_duration=300
    )


def termination_requested(instance_id: str = "i1") -> InstanceTerminationRequested:
    return InstanceTerminationRequested(
        instance_id=instance_id, reason="removed by alice"
    )


def lost(instance_id: str = "i1", run_id: str | None = None) -> InstanceLost:
    return InstanceLost(
        instance_id=instance_id, reason="not found by the backend", run_id=run_id
    )


# Histories the example tests start from. The state after each is:
# IDLE: i1 idle since at(2). BUSY: r1 claimed i1 at(4). RUNNING: r1 started
# at(5). TERMINATING: i1 terminating since at(3). TERMINATED: i1 ended at(4).
IDLE: list[Event] = [requested(), provisioned()]
BUSY: list[Event] = [*IDLE, submitted(), claimed()]
RUNNING: list[Event] = [*BUSY, started()]
TERMINATING: list[Event] = [*IDLE, termination_requested()]
TERMINATED: list[Event] = [*TERMINATING, InstanceTerminated("i1")]


class TestPoolEvents:
    def test_empty_state_uses_implicit_default_pool(self) -> None:
        state = State()

        assert state.default_pool_name() == DEFAULT_POOL

    def test_first_created_pool_becomes_default(self) -> None:
        state = fold([pool_created("gpu"), pool_created("cpu")])

        assert state.default_pool_name() == "gpu"

    def test_created_pool_records_its_time(self) -> None:
        state = fold([pool_created("gpu")])

        assert state.pools["gpu"].created_at == at(1)

    def test_default_pool_set_changes_default(self) -> None:
        state = fold([pool_created("gpu"), pool_created("cpu"), DefaultPoolSet("cpu")])

        assert state.default_pool_name() == "cpu"

    def test_deleted_pool_is_gone(self) -> None:
        state = fold([pool_created("gpu"), pool_created("cpu"), PoolDeleted("cpu")])

        assert list(state.pools) == ["gpu"]

    def test_deleted_default_falls_back_to_implicit(self) -> None:
        state = fold([pool_created("gpu"), pool_created("cpu"), PoolDeleted("gpu")])

        assert state.default_pool_name() == DEFAULT_POOL

    def test_instance_request_creates_implicit_default_pool(self) -> None:
        state = fold([requested()])

        assert state.pools[DEFAULT_POOL].created_at == at(1)

    def test_implicit_default_survives_later_pool(self) -> None:
        state = fold([requested(), pool_created("gpu")])

        assert state.default_pool_name() == DEFAULT_POOL

    def test_request_in_named_pool_adds_no_pool(self) -> None:
        state = fold([pool_created("gpu"), requested(pool="gpu")])

        assert list(state.pools) == ["gpu"]


INSTANCE_CASES = [
    pytest.param([requested()], "status", "provisioning", id="requested-status"),
    pytest.param([requested()], "requested_at", at(1), id="requested-time"),
    pytest.param([requested()], "schedulable", True, id="requested-schedulable"),
    pytest.param(
        [submitted(), requested(run_id="r1")], "for_run", "r1", id="requested-for-run"
    ),
    pytest.param(IDLE, "status", "idle", id="provisioned-status"),
    pytest.param(IDLE, "idle_since", at(2), id="provisioned-idle-since"),
    pytest.param(IDLE, "provisioned_at", at(2), id="provisioned-time"),
    pytest.param(IDLE, "hostname", "localhost", id="provisioned-hostname"),
    pytest.param(
        IDLE, "backend_data", {"cpus": "0-3"}, id="provisioned-backend-data"
    ),
    pytest.param(BUSY, "status", "busy", id="claimed-status"),
    pytest.param(BUSY, "run_id", "r1", id="claimed-run"),
    pytest.param(BUSY, "idle_since", None, id="claimed-clears-idle-since"),
    pytest.param([*BUSY, released()], "status", "idle", id="released-status"),
    pytest.param([*BUSY, released()], "idle_since", at(5), id="released-idle-since"),
    pytest.param([*BUSY, released()], "run_id", None, id="released-run"),
    pytest.param(
        [*IDLE, idle_expired()], "status", "terminating", id="idle-expired-status"
    ),
    pytest.param(
        [*IDLE, idle_expired()], "schedulable", False, id="idle-expired-schedulable"
    ),
    pytest.param(
        [*IDLE, idle_expired()], "terminating_since", at(3), id="idle-expired-time"
    ),
    pytest.param(
        [*IDLE, idle_expired()],
        "reason",
        "idle duration expired",
        id="idle-expired-reason",
    ),
    pytest.param(TERMINATING, "status", "terminating", id="termination-status"),
    pytest.param(TERMINATING, "schedulable", False, id="termination-schedulable"),
    pytest.param(TERMINATING, "terminating_since", at(3), id="termination-time"),
    pytest.param(TERMINATING, "reason", "removed by alice", id="termination-reason"),
    pytest.param(
        [*TERMINATING, InstanceTerminationFailed("i1", "throttled", attempt=2)],
        "termination_attempts",
        2,
        id="termination-failed-attempts",
    ),
    pytest.param(
        [*TERMINATING, InstanceTerminationFailed("i1", "throttled", attempt=2)],
        "last_error",
        "throttled",
        id="termination-failed-error",
    ),
    pytest.param(
        [*TERMINATING, InstanceTerminationFailed("i1", "throttled")],
        "status",
        "terminating",
        id="termination-failed-status",
    ),
    pytest.param(TERMINATED, "status", "terminated", id="terminated-status"),
    pytest.param(TERMINATED, "ended_at", at(4), id="terminated-time"),
    pytest.param(TERMINATED, "schedulable", False, id="terminated-schedulable"),
    pytest.param([*IDLE, lost()], "status", "terminated", id="lost-status"),
    pytest.param([*IDLE, lost()], "ended_at", at(3), id="lost-time"),
    pytest.param(
        [*IDLE, lost()], "reason", "not found by the backend", id="lost-reason"
    ),
    pytest.param([*IDLE, lost()], "idle_since", None, id="lost-idle-since"),
    pytest.param(
        [requested(), InstanceProvisioningFailed("i1", "no capacity")],
        "status",
        "failed",
        id="provisioning-failed-status",
    ),
    pytest.param(
        [requested(), InstanceProvisioningFailed("i1", "no capacity")],
        "schedulable",
        False,
        id="provisioning-failed-schedulable",
    ),
    pytest.param(
        [requested(), InstanceProvisioningFailed("i1", "no capacity")],
        "ended_at",
        at(2),
        id="provisioning-failed-time",
    ),
]


@pytest.mark.parametrize(("events", "field_name", "expected"), INSTANCE_CASES)
def test_instance_event_sets_field(
    events: list[Event], field_name: str, expected: object
) -> None:
    state = fold(events)

    assert getattr(state.instances["i1"], field_name) == expected


RUN_CASES = [
    pytest.param([submitted()], "status", "submitted", id="submitted-status"),
    pytest.param([submitted()], "submitted_at", at(1), id="submitted-time"),
    pytest.param([submitted()], "user", "alice", id="submitted-user"),
    pytest.param(
        [submitted(), requested(run_id="r1")],
        "status",
        "provisioning",
        id="instance-requested-for-run-status",
    ),
    pytest.param(BUSY, "status", "provisioning", id="claimed-status"),
    pytest.param(BUSY, "instance_id", "i1", id="claimed-instance"),
    pytest.param(BUSY, "attempts", 1, id="claimed-attempts"),
    pytest.param(RUNNING, "status", "running", id="started-status"),
    pytest.param(RUNNING, "started_at", at(5), id="started-time"),
    pytest.param(RUNNING, "pid", 4242, id="started-pid"),
    pytest.param(RUNNING, "pid_start_time", 99, id="started-pid-start-time"),
    pytest.param(
        [*RUNNING, RunFinished("r1", 0)], "status", "done", id="finished-zero-status"
    ),
    pytest.param(
        [*RUNNING, RunFinished("r1", 0)], "reason", None, id="finished-zero-reason"
    ),
    pytest.param(
        [*RUNNING, RunFinished("r1", 0)], "ended_at", at(6), id="finished-time"
    ),
    pytest.param(
        [*RUNNING, RunFinished("r1", 3)],
        "status",
        "failed",
        id="finished-nonzero-status",
    ),
    pytest.param(
        [*RUNNING, RunFinished("r1", 3)],
        "exit_status",
        3,
        id="finished-nonzero-exit-status",
    ),
    pytest.param(
        [*RUNNING, RunFinished("r1", 3)],
        "reason",
        "exited with status 3",
        id="finished-nonzero-reason",
    ),
    pytest.param(
        [*RUNNING, RunFailed("r1", "out of memory", exit_status=137)],
        "status",
        "failed",
        id="failed-status",
    ),
    pytest.param(
        [*RUNNING, RunFailed("r1", "out of memory", exit_status=137)],
        "reason",
        "out of memory",
        id="failed-reason",
    ),
    pytest.param(
        [*RUNNING, RunFailed("r1", "out of memory", exit_status=137)],
        "ended_at",
        at(6),
        id="failed-time",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1", abort=True)],
        "stop_requested",
        True,
        id="stop-requested-flag",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1", abort=True)],
        "abort",
        True,
        id="stop-requested-abort",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1")],
        "status",
        "running",
        id="stop-requested-status",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1", abort=True), RunStopRequested("r1")],
        "abort",
        True,
        id="stop-requested-keeps-abort",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1"), RunStopped("r1", exit_status=143)],
        "status",
        "stopped",
        id="stopped-status",
    ),
    pytest.param(
        [*RUNNING, RunStopRequested("r1"), RunStopped("r1", exit_status=143)],
        "ended_at",
        at(7),
        id="stopped-time",
    ),
    pytest.param(
        [*RUNNING, lost(run_id="r1")], "status", "failed", id="instance-lost-status"
    ),
    pytest.param(
        [*RUNNING, lost(run_id="r1")],
        "reason",
        "instance i1 lost: not found by the backend",
        id="instance-lost-reason",
    ),
    pytest.param(
        [*RUNNING, lost(run_id="r1")], "ended_at", at(6), id="instance-lost-time"
    ),
]


@pytest.mark.parametrize(("events", "field_name", "expected"), RUN_CASES)
def test_run_event_sets_field(
    events: list[Event], field_name: str, expected: object
) -> None:
    state = fold(events)

    assert getattr(state.runs["r1"], field_name) == expected


class TestRunEndAndRelease:
    """A run's end and its instance's release come in either order."""

    @pytest.mark.parametrize(
        "end",
        [RunFinished("r1", 0), RunFailed("r1", "crashed"), RunStopped("r1")],
        ids=["finished", "failed", "stopped"],
    )
    def test_run_end_frees_instance_it_holds(self, end: Event) -> None:
        state = fold([*RUNNING, end])

        assert state.instances["i1"].status == "idle"
        assert state.instances["i1"].run_id is None
        assert state.instances["i1"].idle_since == at(6)

    def test_release_after_run_end_keeps_idle_since(self) -> None:
        state = fold([*RUNNING, RunFinished("r1", 0), released()])

        assert state.instances["i1"].status == "idle"
        assert state.instances["i1"].idle_since == at(6)

    def test_run_end_after_release_keeps_idle_since(self) -> None:
        state = fold([*RUNNING, released(), RunFinished("r1", 0)])

        assert state.instances["i1"].idle_since == at(6)

    def test_late_run_end_keeps_new_holder(self) -> None:
        events: list[Event] = [
            *RUNNING,
            released(),
            RunFinished("r1", 0),
            submitted("r2"),
            claimed(run_id="r2"),
            RunFailed("r1", "late duplicate"),
        ]

        state = fold(events)

        assert state.instances["i1"].status == "busy"
        assert state.instances["i1"].run_id == "r2"

    def test_stale_release_keeps_new_holder(self) -> None:
        events: list[Event] = [
            *RUNNING,
            RunFinished("r1", 0),
            submitted("r2"),
            claimed(run_id="r2"),
            released(run_id="r1"),
        ]

        state = fold(events)

        assert state.instances["i1"].status == "busy"
        assert state.instances["i1"].run_id == "r2"

    @pytest.mark.parametrize(
        "prefix",
        [
            pytest.param([RunFinished("r1", 0)], id="end-first"),
            pytest.param([released()], id="release-first"),
            pytest.param([], id="end-only"),
        ],
    )
    def test_invariants_hold_between_end_and_release(
        self, prefix: list[Event]
    ) -> None:
        state = fold([*RUNNING, *prefix])

        assert check_invariants(state) == []


class TestInstanceLost:
    def test_lost_instance_is_no_longer_held(self) -> None:
        state = fold([*RUNNING, lost(run_id="r1")])

        assert state.instances["i1"].run_id is None

    def test_lost_idle_instance_leaves_ended_run_alone(self) -> None:
        state = fold([*RUNNING, RunFinished("r1", 0), released(), lost()])

        assert state.runs["r1"].status == "done"
        assert state.runs["r1"].ended_at == at(6)

    def test_lost_requested_instance_leaves_run_waiting(self) -> None:
        state = fold([submitted(), requested(run_id="r1"), lost()])

        assert state.runs["r1"].status == "provisioning"


LATE_EVENTS = [
    pytest.param(idle_expired(), id="idle-expired"),
    pytest.param(termination_requested(), id="termination-requested"),
    pytest.param(InstanceTerminated("i1"), id="terminated-again"),
    pytest.param(lost(), id="lost"),
    pytest.param(InstanceProvisioningFailed("i1", "late"), id="provisioning-failed"),
]


class TestTerminatedIsFinal:
    @pytest.mark.parametrize("late", LATE_EVENTS)
    def test_late_event_keeps_instance_terminated(self, late: Event) -> None:
        state = fold([*TERMINATED, late])

        assert state.instances["i1"].status == "terminated"

    @pytest.mark.parametrize("late", LATE_EVENTS)
    def test_late_event_keeps_first_end_time(self, late: Event) -> None:
        state = fold([*TERMINATED, late])

        assert state.instances["i1"].ended_at == at(4)

    def test_failed_instance_can_still_be_terminated(self) -> None:
        events: list[Event] = [
            requested(),
            InstanceProvisioningFailed("i1", "no capacity"),
            termination_requested(),
            InstanceTerminated("i1"),
        ]

        state = fold(events)

        assert state.instances["i1"].status == "terminated"
        assert state.instances["i1"].ended_at == at(4)


class TestApply:
    def test_apply_advances_checkpoint(self) -> None:
        records = records_for(IDLE)

        state = replay(records)

        assert state.checkpoint == 2

    def test_apply_stores_record_hash_as_head(self) -> None:
        record = records_for([pool_created("gpu")])[0]

        state = apply(State(), record, b"\x01" * 32)

        assert state.head_hash == b"\x01" * 32

    def test_apply_without_hash_keeps_head(self) -> None:
        record = records_for([pool_created("gpu")])[0]

        state = apply(State(head_hash=b"\x02" * 32), record)

        assert state.head_hash == b"\x02" * 32

    def test_copy_state_is_independent(self) -> None:
        state = fold(IDLE)
        copy = copy_state(state)

        apply(copy, records_for([*IDLE, termination_requested()])[2])

        assert state.instances["i1"].status == "idle"


class TestDeterminism:
    def test_replaying_twice_gives_equal_bytes(self) -> None:
        records = records_for([*RUNNING, RunFinished("r1", 0), released()])

        first = encode_state(replay(records))
        second = encode_state(replay(records))

        assert first == second

    def test_replay_ignores_wall_clock(self) -> None:
        records = records_for([*RUNNING, RunFinished("r1", 0), released()])

        with mock.patch.object(time, "time", return_value=0.0):
            early = encode_state(replay(records))

        with mock.patch.object(time, "time", return_value=4_102_444_800.0):
            late = encode_state(replay(records))

        assert early == late


def _break_busy_run(state: State) -> None:
    state.runs["r1"].status = "done"


def _break_idle_since(state: State) -> None:
    state.instances["i1"].status = "idle"
    state.instances["i1"].run_id = None
    state.runs["r1"].status = "done"
    state.instances["i1"].idle_since = None


def _break_second_holder(state: State) -> None:
    second = copy_state(state).runs["r1"]
    second.id = "r2"
    state.runs["r2"] = second


def _break_terminated_holder(state: State) -> None:
    state.instances["i1"].status = "terminated"
    state.instances["i1"].schedulable = False
    state.instances["i1"].run_id = None


def _break_busy_without_run(state: State) -> None:
    state.instances["i1"].run_id = None


def _break_schedulable_terminating(state: State) -> None:
    state.instances["i1"].status = "terminating"
    state.instances["i1"].run_id = None
    state.runs["r1"].status = "done"


def _break_running_without_instance(state: State) -> None:
    state.instances["i1"].status = "idle"
    state.instances["i1"].run_id = None
    state.runs["r1"].instance_id = None


def _break_unknown_instance(state: State) -> None:
    state.runs["r1"].instance_id = "i9"


def _break_default_pool(state: State) -> None:
    state.default_pool = "gpu"


BROKEN_STATES = [
    pytest.param(
        _break_busy_run,
        "busy instance i1 is held by run r1, which is done",
        id="busy-with-ended-run",
    ),
    pytest.param(
        _break_idle_since, "idle instance i1 has no idle_since", id="idle-without-time"
    ),
    pytest.param(
        _break_second_holder,
        "instance i1 is claimed by active runs r1 and r2",
        id="two-holders",
    ),
    pytest.param(
        _break_terminated_holder,
        "running run r1 is on terminated instance i1",
        id="run-on-terminated-instance",
    ),
    pytest.param(
        _break_busy_without_run,
        "busy instance i1 is held by no run",
        id="busy-without-run",
    ),
    pytest.param(
        _break_schedulable_terminating,
        "terminating instance i1 is schedulable",
        id="schedulable-terminating",
    ),
    pytest.param(
        _break_running_without_instance,
        "running run r1 has no instance",
        id="running-without-instance",
    ),
    pytest.param(
        _break_unknown_instance,
        "run r1 points at unknown instance i9",
        id="unknown-instance",
    ),
    pytest.param(
        _break_default_pool,
        "default pool gpu does not exist",
        id="missing-default-pool",
    ),
]


class TestCheckInvariants:
    def test_valid_state_has_no_problems(self) -> None:
        state = fold(RUNNING)

        assert check_invariants(state) == []

    @pytest.mark.parametrize(("corrupt", "problem"), BROKEN_STATES)
    def test_broken_state_is_reported(
        self, corrupt: Callable[[State], None], problem: str
    ) -> None:
        state = fold(RUNNING)
        corrupt(state)

        problems = check_invariants(state)

        assert problem in problems


# Property tests over generated histories.

MAX_POOLS = 3
MAX_INSTANCES = 8
MAX_RUNS = 8
MAX_STEPS = 200

LIVE_STATUSES = ("provisioning", "idle", "busy", "terminating")
SCHEDULABLE_STATUSES = ("provisioning", "idle", "busy")
WAITING_RUN_STATUSES = ("submitted", "provisioning")
ACTIVE_STATUSES = ("submitted", "provisioning", "running")


@dataclass
class ModelInstance:
    id: str
    pool: str
    idle_duration: Duration
    status: str = "provisioning"
    run_id: str | None = None
    idle_since: int | None = None
    termination_attempts: int = 0


@dataclass
class ModelRun:
    id: str
    pool: str
    status: str = "submitted"
    instance_id: str | None = None
    holds_instance: bool = False
    stop_requested: bool = False


class History:
    """Generated records with the state the model expects after them.

    Not a dataclass, so that hypothesis prints a failing history as its
    records, one a line, rather than the whole model.
    """

    def __init__(
        self,
        records: list[Record],
        hashes: list[bytes],
        pools: list[str],
        default_pool: str,
        instances: dict[str, ModelInstance],
        runs: dict[str, ModelRun],
    ) -> None:
        self.records = records
        self.hashes = hashes
        self.pools = pools
        self.default_pool = default_pool
        self.instances = instances
        self.runs = runs

    def __repr__(self) -> str:
        lines = [f"{r.position} {r.recorded_at} {r.event!r}" for r in self.records]
        return "History(\n  " + "\n  ".join(lines) + "\n)"


@dataclass
class HistoryBuilder:
    """Appends only events the daemon could append, tracking their effect.

    Each action method checks nothing itself: ``action_table`` lists which
    actions the model allows. Record times grow strictly, by gaps
    from one microsecond to ten minutes.
    """

    draw: st.DrawFn
    writer: LogWriter = field(default_factory=LogWriter)
    now: int = BASE_TIME
    pools: list[str] = field(default_factory=list)
    pools_created: int = 0
    default_pool: str | None = None
    instances: dict[str, ModelInstance] = field(default_factory=dict)
    runs: dict[str, ModelRun] = field(default_factory=dict)

    def append(self, event: Event, actor: Actor = DAEMON_ACTOR) -> int:
        self.now += self.draw(st.integers(1, 600 * SECOND), label="time_step")
        self.writer.append(event, self.now, actor)

        return self.now

    def history(self) -> History:
        return History(
            records=self.writer.records,
            hashes=self.writer.hashes,
            pools=self.pools,
            default_pool=self.default_pool or DEFAULT_POOL,
            instances=self.instances,
            runs=self.runs,
        )

    # Queries over the model.

    def instances_in(self, *statuses: str) -> list[ModelInstance]:
        return [i for i in self.instances.values() if i.status in statuses]

    def runs_in(self, *statuses: str) -> list[ModelRun]:
        return [r for r in self.runs.values() if r.status in statuses]

    def waiting_runs(self) -> list[ModelRun]:
        return [r for r in self.runs_in(*WAITING_RUN_STATUSES) if r.instance_id is None]

    def claim_pairs(self) -> list[tuple[ModelRun, ModelInstance]]:
        return [
            (run, instance)
            for run in self.waiting_runs()
            for instance in self.instances_in("idle")
            if instance.pool == run.pool
        ]

    def deletable_pools(self) -> list[str]:
        busy_pools = {i.pool for i in self.instances_in(*LIVE_STATUSES)}
        busy_pools |= {r.pool for r in self.runs_in(*ACTIVE_STATUSES)}

        return [p for p in self.pools if p not in busy_pools]

    def draw_pool(self) -> str:
        """Draw a pool for a request: the default pool about half of the time."""
        default = self.default_pool or DEFAULT_POOL
        choices = list(self.pools)
        if DEFAULT_POOL not in choices:
            choices.append(DEFAULT_POOL)

        return self.draw(st.just(default) | st.sampled_from(choices), label="pool")

    def action_table(self) -> list[tuple[bool, Callable[[], None]]]:
        """Return every action, repeated by its weight, with whether it is allowed.

        The table keeps its length and order whatever the model's state, so
        that hypothesis shrinks a failing history by turning steps into
        disabled actions and dropping them. The weights favour the steps that
        take a run from submission to its end on a claimed instance.
        """
        weighted: list[tuple[int, bool, Callable[[], None]]] = [
            (1, self.pools_created < MAX_POOLS, self.create_pool),
            (1, bool(self.pools), self.set_default_pool),
            (1, bool(self.deletable_pools()), self.delete_pool),
            (3, len(self.instances) < MAX_INSTANCES, self.request_instance),
            (3, bool(self.instances_in("provisioning")), self.provision),
            (1, bool(self.instances_in("provisioning")), self.fail_provisioning),
            (3, len(self.runs) < MAX_RUNS, self.submit_run),
            (5, bool(self.claim_pairs()), self.claim),
            (4, bool(self.runs_to_start()), self.start_run),
            (3, bool(self.runs_in(*ACTIVE_STATUSES)), self.end_run),
            (1, bool(self.runs_to_stop()), self.request_stop),
            (1, bool(self.expirable_instances()), self.expire_idle),
            (1, bool(self.instances_in("idle")), self.request_termination),
            (1, bool(self.instances_in("terminating")), self.fail_termination),
            (2, bool(self.instances_in("terminating")), self.terminate),
            (1, bool(self.instances_in(*LIVE_STATUSES)), self.lose_instance),
        ]

        return [
            (enabled, action)
            for weight, enabled, action in weighted
            for _ in range(weight)
        ]

    def runs_to_start(self) -> list[ModelRun]:
        return [r for r in self.runs_in("provisioning") if r.holds_instance]

    def runs_to_stop(self) -> list[ModelRun]:
        return [r for r in self.runs_in(*ACTIVE_STATUSES) if not r.stop_requested]

    def expirable_instances(self) -> list[ModelInstance]:
        return [i for i in self.instances_in("idle") if i.idle_duration != "off"]

    # Pools.

    def create_pool(self) -> None:
        self.pools_created += 1
        name = f"pool-{self.pools_created}"
        self.append(PoolCreated(name), USER)
        self.add_pool(name)

    def add_pool(self, name: str) -> None:
        self.pools.append(name)
        if self.default_pool is None:
            self.default_pool = name

    def set_default_pool(self) -> None:
        name = self.draw(st.sampled_from(self.pools))
        self.append(DefaultPoolSet(name), USER)
        self.default_pool = name

    def delete_pool(self) -> None:
        name = self.draw(st.sampled_from(self.deletable_pools()))
        self.append(PoolDeleted(name), USER)
        self.pools.remove(name)
        if self.default_pool == name:
            self.default_pool = None

    # Instances.

    def request_instance(self) -> None:
        waiting = self.waiting_runs()
        run = self.draw(st.none() | st.sampled_from(waiting)) if waiting else None
        pool = run.pool if run else self.draw_pool()
        instance_id = f"i{len(self.instances) + 1}"
        idle_duration = self.draw(st.sampled_from([0, 300, 259_200, "off"]))
        event = InstanceRequested(
            instance_id=instance_id,
            name=f"instance-{instance_id}",
            pool=pool,
            offer=self.draw(st.sampled_from([CPU_OFFER, GPU_OFFER])),
            idle_duration=idle_duration,
            run_id=run.id if run else None,
        )
        self.append(event)

        self.instances[instance_id] = ModelInstance(instance_id, pool, idle_duration)
        if pool not in self.pools:
            self.add_pool(pool)

        if run is not None:
            run.status = "provisioning"

    def provision(self) -> None:
        instance = self.draw(st.sampled_from(self.instances_in("provisioning")))
        event = InstanceProvisioned(
            instance_id=instance.id,
            resources=CPU_OFFER.resources,
            hostname=f"host-{instance.id}",
        )
        instance.idle_since = self.append(event)
        instance.status = "idle"

    def fail_provisioning(self) -> None:
        instance = self.draw(st.sampled_from(self.instances_in("provisioning")))
        self.append(InstanceProvisioningFailed(instance.id, "no capacity"))
        instance.status = "failed"

    def expire_idle(self) -> None:
        instance = self.draw(st.sampled_from(self.expirable_instances()))
        assert instance.idle_since is not None
        assert instance.idle_duration != "off"
        event = InstanceIdleExpired(
            instance_id=instance.id,
            idle_since=instance.idle_since,
            idle_duration=instance.idle_duration,
        )
        self.append(event)
        instance.status = "terminating"

    def request_termination(self) -> None:
        instance = self.draw(st.sampled_from(self.instances_in("idle")))
        self.append(InstanceTerminationRequested(instance.id, "removed by user"), USER)
        instance.status = "terminating"

    def fail_termination(self) -> None:
        instance = self.draw(st.sampled_from(self.instances_in("terminating")))
        instance.termination_attempts += 1
        event = InstanceTerminationFailed(
            instance.id, "request throttled", attempt=instance.termination_attempts
        )
        self.append(event)

    def terminate(self) -> None:
        instance = self.draw(st.sampled_from(self.instances_in("terminating")))
        self.append(InstanceTerminated(instance.id))
        instance.status = "terminated"

    def lose_instance(self) -> None:
        """Mark a live instance lost, failing the run that held it.

        The daemon may first record the run's failure (which frees the
        instance) or let the loss fail the run in the same record.
        """
        instance = self.draw(st.sampled_from(self.instances_in(*LIVE_STATUSES)))
        run = self.runs[instance.run_id] if instance.run_id else None
        if run is not None and self.draw(st.booleans(), label="run_failed_first"):
            self.end_held_run(run, RunFailed(run.id, "instance lost"), "failed")
            run = None

        self.append(
            InstanceLost(instance.id, "not found", run_id=run.id if run else None)
        )
        instance.status = "terminated"
        instance.run_id = None
        instance.idle_since = None
        if run is not None:
            run.status = "failed"
            run.holds_instance = False

    # Runs.

    def submit_run(self) -> None:
        run_id = f"r{len(self.runs) + 1}"
        pool = self.draw_pool()
        event = RunSubmitted(
            run_id=run_id,
            name=f"run-{run_id}",
            pool=pool,
            spec=RunSpec(commands=("nvidia-smi",)),
            user="alice",
            uid=1000,
        )
        self.append(event, USER)
        self.runs[run_id] = ModelRun(run_id, pool)

    def claim(self) -> None:
        run, instance = self.draw(st.sampled_from(self.claim_pairs()))
        self.append(InstanceClaimed(instance_id=instance.id, run_id=run.id))
        instance.status = "busy"
        instance.run_id = run.id
        instance.idle_since = None
        run.status = "provisioning"
        run.instance_id = instance.id
        run.holds_instance = True

    def start_run(self) -> None:
        run = self.draw(st.sampled_from(self.runs_to_start()))
        assert run.instance_id is not None
        pid = self.draw(st.integers(2, 4_194_304), label="pid")
        self.append(RunStarted(run.id, run.instance_id, pid=pid, pid_start_time=1))
        run.status = "running"

    def request_stop(self) -> None:
        run = self.draw(st.sampled_from(self.runs_to_stop()))
        abort = self.draw(st.booleans(), label="abort")
        self.append(RunStopRequested(run.id, abort=abort), USER)
        run.stop_requested = True

    def end_run(self) -> None:
        run = self.draw(st.sampled_from(self.runs_in(*ACTIVE_STATUSES)))
        outcome = self.draw(st.sampled_from(["finished", "failed", "stopped"]))
        end: Event
        match outcome:
            case "finished":
                exit_status = self.draw(st.sampled_from([0, 1, 137]))
                end = RunFinished(run.id, exit_status)
                status = "done" if exit_status == 0 else "failed"
            case "failed":
                end = RunFailed(run.id, "command not found", exit_status=127)
                status = "failed"
            case _:
                end = RunStopped(run.id, exit_status=143)
                status = "stopped"

        if run.holds_instance:
            self.end_held_run(run, end, status)
        else:
            self.append(end)
            run.status = status

    def end_held_run(self, run: ModelRun, end: Event, status: str) -> None:
        """Record a run's end and its instance's release, in a drawn order."""
        assert run.instance_id is not None
        instance = self.instances[run.instance_id]
        release = InstanceReleased(instance_id=instance.id, run_id=run.id)
        if self.draw(st.booleans(), label="release_first"):
            instance.idle_since = self.append(release)
            self.append(end)
        else:
            instance.idle_since = self.append(end)
            self.append(release)

        instance.status = "idle"
        instance.run_id = None
        run.status = status
        run.holds_instance = False


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Generate a history of records that the daemon could append."""
    builder = HistoryBuilder(draw)
    steps = draw(st.integers(0, MAX_STEPS), label="steps")
    for _ in range(steps):
        table = builder.action_table()
        enabled, action = table[draw(st.integers(0, len(table) - 1), label="action")]
        if enabled:
            action()

    return builder.history()


def fold_with_hashes(
    records: Sequence[Record], hashes: Sequence[bytes], state: State
) -> State:
    for record, record_hash in zip(records, hashes, strict=True):
        apply(state, record, record_hash)

    return state


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


@PROPERTY_SETTINGS
@given(history=histories())
def test_invariants_hold_after_every_record(history: History) -> None:
    state = State()
    ended_at: dict[str, int | None] = {}
    for record in history.records:
        apply(state, record)

        assert check_invariants(state) == [], f"after position {record.position}"
        for instance_id, first_end in ended_at.items():
            instance = state.instances[instance_id]
            assert instance.status == "terminated", f"{instance_id} came back"
            assert instance.ended_at == first_end, f"{instance_id} ended twice"

        for instance in state.instances.values():
            if instance.status == "terminated":
                ended_at.setdefault(instance.id, instance.ended_at)


@PROPERTY_SETTINGS
@given(history=histories(), data=st.data())
def test_snapshot_plus_tail_equals_full_replay(
    history: History, data: st.DataObject
) -> None:
    records, hashes = history.records, history.hashes
    cut = data.draw(st.integers(0, len(records)), label="cut")
    full = fold_with_hashes(records, hashes, State())

    head = fold_with_hashes(records[:cut], hashes[:cut], State())
    snapshot = encode_state(head)
    resumed = fold_with_hashes(records[cut:], hashes[cut:], decode_state(snapshot))

    assert encode_state(resumed) == encode_state(full)


@PROPERTY_SETTINGS
@given(history=histories())
def test_replay_is_deterministic(history: History) -> None:
    first = encode_state(replay(history.records))
    second = encode_state(replay(iter(history.records)))

    assert first == second


def _instance_view(instance: Instance | ModelInstance) -> tuple[object, ...]:
    idle_since = instance.idle_since if instance.status == "idle" else None

    return (instance.pool, instance.status, instance.run_id, idle_since)


def _run_view(run: Run | ModelRun) -> tuple[object, ...]:
    return (run.pool, run.status, run.instance_id, run.stop_requested)


@PROPERTY_SETTINGS
@given(history=histories())
def test_replay_matches_model_of_history(history: History) -> None:
    state = replay(history.records)

    assert sorted(state.pools) == sorted(history.pools)
    assert state.default_pool_name() == history.default_pool
    for instance_id, expected in history.instances.items():
        actual = _instance_view(state.instances[instance_id])
        assert actual == _instance_view(expected), instance_id

    for run_id, expected_run in history.runs.items():
        assert _run_view(state.runs[run_id]) == _run_view(expected_run), run_id

    expected_schedulable = {
        i.id for i in history.instances.values() if i.status in SCHEDULABLE_STATUSES
    }
    schedulable = {i.id for i in state.instances.values() if i.schedulable}
    assert schedulable == expected_schedulable


@pytest.mark.parametrize(
    ("run_type", "status", "ready", "shown"),
    [
        ("service", "running", False, "starting"),
        ("service", "running", True, "running"),
        ("service", "failed", False, "failed"),
        ("task", "running", False, "running"),
        ("dev-environment", "running", False, "running"),
    ],
)
def test_shown_status_of_unready_service(
    run_type: str, status: str, ready: bool, shown: str
) -> None:
    from events.event_types import RunSpec
    from events.projection import Run, shown_status

    run = Run(
        id="r1",
        name="web",
        pool="p",
        spec=RunSpec(type=run_type),  # type: ignore[arg-type]
        user="u",
        uid=0,
        submitted_at=0,
    )
    run.status = status  # type: ignore[assignment]
    run.ready = ready

    assert shown_status(run) == shown
