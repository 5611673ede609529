"""Event types: one frozen, tagged Struct per fact recorded in the log.

Events are named in the past tense and carry what replay and audit need. The
schema only grows: a new field gets a default, and no field is renamed or given
a new meaning, because old records are decoded with these same types.

Streams: ``pool/<name>`` for pool events, ``instance/<id>`` for instance events
(claims and releases included, so the instance stream's version guards against
two runs claiming one instance), and ``run/<id>`` for run events.
"""

from typing import Literal

import msgspec

from events.model import (
    CreationPolicy,
    Duration,
    Offer,
    Requirements,
    Resources,
    RunType,
)


class _Event(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    """Base of every event; the tag is the class name."""


# Pools


class PoolCreated(_Event):
    pool: str


class PoolDeleted(_Event):
    pool: str


class DefaultPoolSet(_Event):
    pool: str


# Instances


class Candidate(msgspec.Struct, frozen=True, omit_defaults=True):
    """An instance or an offer considered for a run, and why it was rejected.

    ``rejected`` is ``None`` for the candidate that was chosen and for fitting
    candidates that lost on price or idle time (then ``note`` gives that reason).
    """

    kind: Literal["instance", "offer"]
    name: str
    price: float = 0.0
    rejected: str | None = None
    note: str | None = None


class InstanceRequested(_Event):
    """The intent to create an instance, recorded before any backend call.

    ``instance_id`` doubles as the idempotency token sent to the backend.
    ``run_id`` is set when a run's placement caused the request.
    """

    instance_id: str
    name: str
    pool: str
    offer: Offer
    idle_duration: Duration
    requirements: Requirements | None = None
    run_id: str | None = None
    candidates: tuple[Candidate, ...] = ()


class InstanceProvisioned(_Event):
    """The backend created the instance and it can take runs.

    ``backend_data`` holds what the backend needs to reach or release it again
    (for the local backend, the reserved CPU ids and GPU indices).
    """

    instance_id: str
    resources: Resources
    hostname: str = ""
    backend_data: dict[str, str] = {}


class InstanceProvisioningFailed(_Event):
    instance_id: str
    reason: str


class InstanceClaimed(_Event):
    """A run took the instance; ``candidates`` explains the placement."""

    instance_id: str
    run_id: str
    candidates: tuple[Candidate, ...] = ()


class InstanceReleased(_Event):
    """The run that held the instance ended; the instance is idle from now."""

    instance_id: str
    run_id: str


class InstanceIdleExpired(_Event):
    """The idle duration passed; the instance takes no more runs from here on."""

    instance_id: str
    idle_since: int
    idle_duration: int


class InstanceTerminationRequested(_Event):
    instance_id: str
    reason: str


class InstanceTerminationFailed(_Event):
    """A backend call to terminate failed; the daemon retries it later."""

    instance_id: str
    error: str
    attempt: int = 1


class InstanceTerminated(_Event):
    instance_id: str


class InstanceLost(_Event):
    """The backend no longer lists the instance, though it was alive here.

    ``run_id`` names the run that held the instance, which fails in this same
    record. Replay finds that run from the instance itself, so the field is for
    readers of the log who want to see which run failed without a replay.
    """

    instance_id: str
    reason: str
    run_id: str | None = None


class InstanceUnreachable(_Event):
    """A health check of the instance failed, so it takes no new runs.

    The instance stays in its pool and takes runs again after an
    ``InstanceReachable``. ``error`` names the failure, e.g. a connect timeout.
    """

    instance_id: str
    error: str


class InstanceReachable(_Event):
    """A health check of an unreachable instance succeeded again."""

    instance_id: str


# Runs


class ReadinessProbe(msgspec.Struct, frozen=True, omit_defaults=True):
    """An HTTP GET of ``path`` on a service's port that must return 2xx.

    ``interval`` and ``timeout`` are in seconds: the time between probes and
    the time one probe may take.
    """

    path: str = "/"
    interval: int = 10
    timeout: int = 5


RetryEvent = Literal["no-capacity", "error", "interruption"]


class RetryPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """When a run is placed again, and for how long after its submission.

    ``no-capacity``: nothing fits or provisioning failed; ``error``: the run
    failed; ``interruption``: its instance was removed or lost. ``duration`` is
    in seconds from the submission, or ``"off"`` for no limit.
    """

    on_events: tuple[RetryEvent, ...] = ("no-capacity", "error", "interruption")
    duration: Duration = 3600


class RunSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a run executes and where it may go.

    Either ``argv`` (executed directly) or ``commands`` (shell lines run one
    after the other by ``/bin/sh -e``) is set, except for a dev environment,
    which runs its ``init`` lines and then waits for ``dstackctl attach``.
    ``env_names`` lists the variables the run sets; their values are kept out of
    the log, in the run's directory.

    Services listen on ``port``, count as ready once ``probe`` passes and are
    restarted in place up to ``max_restarts`` times when their process exits.
    ``ports`` are ports a task or dev environment listens on. Durations are
    seconds or ``"off"``; ``inactivity_duration`` ends a dev environment that
    had no client attached for that long.
    """

    type: RunType = "task"
    argv: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()
    working_dir: str | None = None
    requirements: Requirements = Requirements()
    creation_policy: CreationPolicy = "reuse-or-create"
    instance: str | None = None
    idle_duration: Duration | None = None
    max_duration: Duration | None = None
    ports: tuple[int, ...] = ()
    port: int | None = None
    probe: ReadinessProbe | None = None
    max_restarts: int = 0
    retry: RetryPolicy | None = None
    init: tuple[str, ...] = ()
    inactivity_duration: Duration | None = None


class RunSubmitted(_Event):
    run_id: str
    name: str
    pool: str
    spec: RunSpec
    user: str = ""
    uid: int | None = None


class RunStarted(_Event):
    """The run's process started on its instance.

    ``pid`` and ``pid_start_time`` identify the supervising process across a
    daemon restart (the start time guards against a reused pid).
    """

    run_id: str
    instance_id: str
    pid: int = 0
    pid_start_time: int = 0


class RunFinished(_Event):
    """The run's process exited by itself; ``reason`` gives the cause, when known."""

    run_id: str
    exit_status: int
    reason: str | None = None


class RunFailed(_Event):
    run_id: str
    reason: str
    exit_status: int | None = None


class RunStopRequested(_Event):
    run_id: str
    abort: bool = False


class RunStopped(_Event):
    run_id: str
    exit_status: int | None = None


class RunReady(_Event):
    """A service's readiness probe returned 2xx; ``url`` is where it listens."""

    run_id: str
    url: str


class RunRestarted(_Event):
    """A service's process exited and is started again on the same instance.

    ``restart`` counts the restarts within the current attempt, from 1. The
    instance stays claimed, so no other run can take it in between.
    """

    run_id: str
    restart: int
    exit_status: int | None = None
    reason: str = ""


class RunRetried(_Event):
    """An attempt of the run ended (or found no capacity) and it waits to be
    placed again, within its retry duration.

    ``attempt`` is the number of the attempt that starts next, from 2.
    ``trigger`` is the retry event that applied. The run is not placed before
    ``retry_at`` (UTC microseconds).
    """

    run_id: str
    attempt: int
    trigger: RetryEvent
    reason: str
    exit_status: int | None = None
    retry_at: int | None = None


class RunMaxDurationExceeded(_Event):
    """The run ran longer than its max duration (seconds), so it is stopped."""

    run_id: str
    max_duration: int


Event = (
    PoolCreated
    | PoolDeleted
    | DefaultPoolSet
    | InstanceRequested
    | InstanceProvisioned
    | InstanceProvisioningFailed
    | InstanceClaimed
    | InstanceReleased
    | InstanceIdleExpired
    | InstanceTerminationRequested
    | InstanceTerminationFailed
    | InstanceTerminated
    | InstanceLost
    | InstanceUnreachable
    | InstanceReachable
    | RunSubmitted
    | RunStarted
    | RunFinished
    | RunFailed
    | RunStopRequested
    | RunStopped
    | RunReady
    | RunRestarted
    | RunRetried
    | RunMaxDurationExceeded
)

EVENT_TYPES: tuple[type[_Event], ...] = Event.__args__  # type: ignore[attr-defined]

EVENT_TYPE_NAMES = frozenset(cls.__name__ for cls in EVENT_TYPES)
