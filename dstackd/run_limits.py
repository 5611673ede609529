"""Run limits: max_duration timers, retries of failed runs and restarts of
services, decided over the projection.

The ``decide_*`` functions are pure. The scheduler calls them under the
decision lock when a run's process ends or when nothing fits a run. It appends
what they return in the same batch as the end, so no reader ever sees a
retried run as ended. ``RunLimits`` owns the timers: one deadline per running
run with a max duration, counted from the ``RunStarted`` record of its current
attempt, and wake-ups for retried runs whose delay passed or that wait for
capacity. After a restart the timers come back from the log, so a run whose
max duration passed while the daemon was down is stopped at once.
"""

import heapq
import time
from collections.abc import Callable, Sequence
from typing import Literal

import anyio
import anyio.abc
import msgspec
import structlog

from dstackd.core import Core
from events.event_types import (
    Event,
    RunFailed,
    RunFinished,
    RunMaxDurationExceeded,
    RunRestarted,
    RunRetried,
    RunSpec,
    RunStopped,
)
from events.grammar import format_duration
from events.model import DAEMON_ACTOR
from events.projection import Run, State
from events.record import NewEvent, Record

log = structlog.get_logger("dstackd.run_limits")

RetryTrigger = Literal["no-capacity", "error", "interruption"]

# Delay before a retried attempt, doubling from the start value per retry.
RETRY_BACKOFF_START_US = 1_000_000
RETRY_BACKOFF_MAX_US = 300_000_000

# How often a run that waits for capacity is placed again even when no
# instance was released or provisioned, so that new backend offers are seen.
CAPACITY_RECHECK_US = 30_000_000

_ENDED_INSTANCE_STATUSES = frozenset({"terminating", "terminated", "failed"})


def retries_on(spec: RunSpec, trigger: RetryTrigger) -> bool:
    return spec.retry is not None and trigger in spec.retry.on_events


def retry_deadline_us(run: Run) -> int | None:
    """Return when the run's retry duration runs out, or None for never."""
    retry = run.spec.retry
    if retry is None or retry.duration == "off":
        return None

    return run.submitted_at + int(retry.duration) * 1_000_000


def max_duration_deadline_us(run: Run) -> int | None:
    """Return when the running ``run`` exceeds its max duration, or None."""
    limit = run.spec.max_duration
    if limit is None or limit == "off" or run.attempt_started_at is None:
        return None

    if run.status not in ("running", "provisioning") or run.stop_requested:
        return None

    return run.attempt_started_at + int(limit) * 1_000_000


def is_placeable(run: Run, now_us: int) -> bool:
    """Return whether a queued run may be placed now (its retry delay passed)."""
    return run.retry_at is None or run.retry_at <= now_us


class EndDecision(msgspec.Struct, frozen=True):
    """What to append for a run whose process ended.

    ``events`` go to the run's stream. ``release`` is true when the instance is
    released, and ``relaunch`` when the process is started again on it.
    """

    events: list[Event]
    release: bool = True
    relaunch: bool = False


EndEvent = RunFinished | RunFailed | RunStopped


def decide_end(state: State, run: Run, end: EndEvent, now_us: int) -> EndDecision:
    """Decide between ending ``run`` with ``end``, restarting it or retrying it.

    A stopped run just ends. A service restarts in place while it has
    restarts left and its instance is live. A dev environment whose process
    exited with 0 ended because no client was attached for its inactivity
    duration. A failure is retried when the run's retry policy covers it and
    its retry duration has not run out.
    """
    if isinstance(end, RunStopped) or run.stop_requested:
        return EndDecision([end])

    instance = state.instances.get(run.instance_id or "")
    interrupted = instance is None or instance.status in _ENDED_INSTANCE_STATUSES
    exit_status = end.exit_status
    reason = _end_reason(end)
    if (
        run.spec.type == "service"
        and not interrupted
        and run.restarts < run.spec.max_restarts
    ):
        restart = RunRestarted(run.id, run.restarts + 1, exit_status, reason)
        return EndDecision([restart], release=False, relaunch=True)

    if run.spec.type == "dev-environment" and isinstance(end, RunFinished):
        if end.exit_status == 0:
            inactivity = format_duration(run.spec.inactivity_duration)
            reason = (
                f"no client was attached for its inactivity duration of {inactivity}"
            )
            return EndDecision([RunFinished(run.id, 0, reason)])

    trigger = _failure_trigger(end, interrupted)
    if trigger is None or not retries_on(run.spec, trigger):
        return EndDecision([end])

    retried = _retry_event(run, trigger, reason, exit_status, now_us, backoff=True)
    if retried is None:
        return EndDecision([end])

    return EndDecision([end, retried])


def decide_no_capacity(
    run: Run, failure: RunFailed, now_us: int, *, provisioning_failed: bool = False
) -> Event | None:
    """Decide what to append when nothing fits ``run`` or provisioning failed.

    Returns ``failure`` when the retry policy does not cover it or its duration
    ran out. Otherwise returns a ``RunRetried`` that starts a wait for capacity,
    or that queues the run again after a delay when provisioning failed. None
    means that the run already waits.
    """
    if not retries_on(run.spec, "no-capacity"):
        return failure

    deadline = retry_deadline_us(run)
    if deadline is not None and now_us >= deadline:
        duration = format_duration(run.spec.retry.duration if run.spec.retry else None)
        return RunFailed(
            run.id,
            f"{failure.reason}; no capacity within the retry duration of {duration}",
        )

    if run.capacity_wait_since is not None and not provisioning_failed:
        return None

    return _retry_event(
        run, "no-capacity", failure.reason, None, now_us, backoff=provisioning_failed
    )


def _retry_event(
    run: Run,
    trigger: RetryTrigger,
    reason: str,
    exit_status: int | None,
    now_us: int,
    *,
    backoff: bool,
) -> RunRetried | None:
    deadline = retry_deadline_us(run)
    if deadline is not None and now_us >= deadline:
        return None

    retry_at = None
    if backoff:
        delay = min(
            RETRY_BACKOFF_START_US << min(len(run.history), 20), RETRY_BACKOFF_MAX_US
        )
        retry_at = now_us + delay if deadline is None else min(now_us + delay, deadline)

    return RunRetried(
        run_id=run.id,
        attempt=len(run.history) + 2,
        trigger=trigger,
        reason=reason,
        exit_status=exit_status,
        retry_at=retry_at,
    )


def _failure_trigger(end: EndEvent, interrupted: bool) -> RetryTrigger | None:
    if isinstance(end, RunFinished) and end.exit_status == 0:
        return None

    return "interruption" if interrupted else "error"


def _end_reason(end: EndEvent) -> str:
    if isinstance(end, RunFailed):
        return end.reason

    if end.exit_status is None:
        return "stopped"

    return end.reason or f"exited with status {end.exit_status}"


class _Timer(msgspec.Struct, frozen=True, order=True):
    """A pending deadline; ``key`` identifies the state it was armed for."""

    at_us: int
    run_id: str
    kind: Literal["max_duration", "wake"]
    key: int


class RunLimits:
    """Stops runs past their max duration and wakes the scheduler for retries.

    ``stop_run`` stops a run's process (the scheduler's ``stop``), and
    ``wake_scheduler`` starts a placement pass.
    """

    def __init__(
        self,
        core: Core,
        stop_run: Callable[[str], object],
        wake_scheduler: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.stop_run = stop_run
        self.wake_scheduler = wake_scheduler
        self.clock = clock
        self._armed: dict[tuple[str, str], _Timer] = {}
        self._heap: list[_Timer] = []
        self._wake = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        core.subscribe(self._on_commit)

    def now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    def _on_commit(self, records: Sequence[Record]) -> None:
        runs = self.core.state.runs
        for record in records:
            run_id = getattr(record.event, "run_id", None)
            if run_id is not None and run_id in runs:
                self.update(runs[run_id])

    def update(self, run: Run) -> None:
        """Arm or disarm the run's timers from its current state."""
        self._set(run.id, "max_duration", _max_duration_timer(run))
        self._set(run.id, "wake", _wake_timer(run, self.now_us()))

    def deadline_of(self, run_id: str) -> int | None:
        """Return the max duration deadline armed for ``run_id``, if any."""
        timer = self._armed.get((run_id, "max_duration"))
        return None if timer is None else timer.at_us

    def _set(self, run_id: str, kind: str, timer: _Timer | None) -> None:
        slot = (run_id, kind)
        if timer is None:
            self._armed.pop(slot, None)
            return

        if self._armed.get(slot) == timer:
            return

        self._armed[slot] = timer
        heapq.heappush(self._heap, timer)
        self._wake.set()

    async def run(self) -> None:
        """Act on timers as they come due, until cancelled.

        Stops runs in their own tasks, so a run that takes its grace period to
        exit does not delay the other timers.
        """
        async with anyio.create_task_group() as self._task_group:
            await self._run_timers()

    async def _run_timers(self) -> None:
        # Ended runs arm no timers, and reading only active ones keeps the
        # archive of ended runs unread.
        for run in self.core.state.active_runs():
            self.update(run)

        while True:
            now = self.now_us()
            while self._heap and self._heap[0].at_us <= now:
                timer = heapq.heappop(self._heap)
                if self._armed.get((timer.run_id, timer.kind)) != timer:
                    continue

                del self._armed[(timer.run_id, timer.kind)]
                await self._fire(timer)

            self._wake = anyio.Event()
            timeout = None
            if self._heap:
                timeout = max(0.0, (self._heap[0].at_us - now) / 1_000_000)

            with anyio.move_on_after(timeout):
                await self._wake.wait()

    async def _fire(self, timer: _Timer) -> None:
        if timer.kind == "max_duration":
            await self.expire(timer.run_id, timer.key)
            return

        self.wake_scheduler()
        run = self.core.state.runs.get(timer.run_id)
        if run is not None:
            # A run still waiting for capacity gets its next recheck.
            self.update(run)

    async def expire(self, run_id: str, attempt_started_at: int) -> None:
        """Record that the run exceeded its max duration, then stop it."""
        async with self.core.lock:
            run = self.core.state.runs.get(run_id)
            if (
                run is None
                or run.attempt_started_at != attempt_started_at
                or max_duration_deadline_us(run) is None
            ):
                return

            limit = int(run.spec.max_duration or 0)
            await self.core.commit(
                [NewEvent(f"run/{run_id}", RunMaxDurationExceeded(run_id, limit))],
                DAEMON_ACTOR,
            )

        log.info("run_max_duration_exceeded", run_id=run_id, max_duration_s=limit)
        if self._task_group is None:
            await self.stop_run(run_id)  # type: ignore[misc]
        else:
            self._task_group.start_soon(self.stop_run, run_id)  # type: ignore[arg-type]


def _max_duration_timer(run: Run) -> _Timer | None:
    deadline = max_duration_deadline_us(run)
    if deadline is None or run.attempt_started_at is None:
        return None

    return _Timer(deadline, run.id, "max_duration", run.attempt_started_at)


def _wake_timer(run: Run, now_us: int) -> _Timer | None:
    """Wake the scheduler when a queued run's retry delay passes, and now and
    then (and at its retry deadline) while it waits for capacity."""
    if run.status != "submitted":
        return None

    if run.retry_at is not None and run.retry_at > now_us:
        return _Timer(run.retry_at, run.id, "wake", run.retry_at)

    if run.capacity_wait_since is None:
        return None

    at = now_us + CAPACITY_RECHECK_US
    deadline = retry_deadline_us(run)
    if deadline is not None:
        if deadline <= now_us:
            # The pass woken at the deadline fails the run.
            return None

        at = min(at, deadline)

    return _Timer(at, run.id, "wake", run.capacity_wait_since)
