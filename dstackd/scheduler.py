"""Scheduler: places queued runs on instances, provisions, starts and watches runs.

It wakes on commits that can change a placement (a run submitted, an instance
released or provisioned), never on a timer. One pass places every queued run
in submission order under the decision lock and appends all its claims in one
batch. Starting the processes and provisioning new instances happen after the
lock is released.
"""

import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial

import anyio
import msgspec
import structlog

from dstackd.backends.base import Backend, BackendError
from dstackd.core import Core, wall_clock_us
from dstackd.placement import Placement, choose_instance, choose_offer, describe_rejections
from dstackd.run_limits import decide_end, decide_no_capacity, is_placeable
from dstackd.runs import RunFiles
from events.event_types import (
    InstanceClaimed,
    InstanceProvisioned,
    InstanceProvisioningFailed,
    InstanceReachable,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminationRequested,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    RunSubmitted,
)
from events.model import DAEMON_ACTOR, RUN_CREATED_IDLE_DURATION, Offer, Requirements
from events.projection import Run
from events.record import NewEvent, Record

log = structlog.get_logger("dstackd.scheduler")

_WAKING_EVENTS = (
    RunSubmitted,
    InstanceReleased,
    InstanceProvisioned,
    InstanceProvisioningFailed,
    InstanceReachable,
)


class PassRequests(msgspec.Struct):
    """Instances requested so far in one scheduling pass, not yet committed."""

    names: set[str]
    serial_backends_busy: set[str]


class Scheduler:
    """Places runs and owns their processes' lifetimes."""

    def __init__(
        self,
        core: Core,
        backends: dict[str, Backend],
        runner: "RunnerLike",
        run_files: RunFiles,
        *,
        stop_grace_seconds: float = 10.0,
        runners: Mapping[str, "RunnerLike"] | None = None,
    ) -> None:
        self.core = core
        self.backends = backends
        self.runner = runner
        # Runners by backend name; a backend without one uses ``runner``.
        self.runners = dict(runners or {})
        self.run_files = run_files
        self.stop_grace_seconds = stop_grace_seconds
        self._wake = anyio.Event()
        self._handles: dict[str, object] = {}
        self.task_group: anyio.abc.TaskGroup | None = None
        self.terminate_soon: Callable[[str], None] = lambda instance_id: None
        core.subscribe(self._on_commit)

    def _on_commit(self, records: Sequence[Record]) -> None:
        if any(isinstance(record.event, _WAKING_EVENTS) for record in records):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        """Place runs whenever a commit may allow it, until cancelled."""
        self.task_group = task_group
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.schedule_once()
            except Exception:
                log.exception("scheduling_failed")

    def start_soon(
        self, func: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        assert self.task_group is not None
        self.task_group.start_soon(func, *args)

    # Placement

    async def schedule_once(self) -> None:
        """Place every queued run that can go somewhere now."""
        to_launch: list[str] = []
        to_provision: list[str] = []
        async with self.core.lock:
            state = self.core.state
            now = wall_clock_us()
            queued = [
                run
                for run in state.active_runs()
                if run.status == "submitted" and is_placeable(run, now)
            ]
            if not queued:
                return

            taken: set[str] = set()
            entries: list[NewEvent] = []
            requests = PassRequests(
                names=set(),
                serial_backends_busy={
                    instance.backend
                    for instance in state.live_instances()
                    if instance.status == "provisioning"
                    and self._provisions_serially(instance.backend)
                },
            )
            for run in queued:
                placement = choose_instance(state, run, exclude=taken)
                if placement.instance_id is not None:
                    taken.add(placement.instance_id)
                    stream = f"instance/{placement.instance_id}"
                    entries.append(
                        NewEvent(
                            stream,
                            InstanceClaimed(
                                placement.instance_id, run.id, placement.candidates
                            ),
                            expected_version=await self.core.stream_version(stream),
                        )
                    )
                    to_launch.append(run.id)
                    continue

                reuse_only = (
                    run.spec.creation_policy == "reuse" or run.spec.instance is not None
                )
                if placement.wait and reuse_only:
                    continue

                entry = await self._decide_without_instance(run, placement, requests)
                if entry is not None:
                    entries.append(entry)
                    if isinstance(entry.event, InstanceRequested):
                        to_provision.append(entry.event.instance_id)

            if entries:
                await self.core.commit(entries, DAEMON_ACTOR)

        for run_id in to_launch:
            self.start_soon(self.launch, run_id)

        for instance_id in to_provision:
            self.start_soon(self.provision, instance_id)

    async def _decide_without_instance(
        self, run: Run, placement: Placement, requests: "PassRequests"
    ) -> NewEvent | None:
        """Provision for ``run`` or fail it; None leaves it queued.

        A run that may create instances provisions even while a fitting one is
        busy; it waits only when no backend offers one. A backend whose offers
        are its free capacity (the local one) gets one request at a time,
        because its offers do not count requests that are not created yet.
        """
        if run.spec.creation_policy == "reuse" or run.spec.instance is not None:
            reason = "no instance in pool {} fits: {}".format(
                run.pool, describe_rejections(placement.candidates)
            )
            return self._no_capacity(run, reason)

        offers = await self.list_offers(run.spec.requirements)
        decision = choose_offer(run, offers, placement.candidates)
        if decision.offer is None and placement.wait:
            return None

        if decision.offer is None:
            reason = "no idle instance in pool {} fits and no backend offers one: {}".format(
                run.pool, describe_rejections(decision.candidates)
            )
            return self._no_capacity(run, reason)

        backend = decision.offer.backend
        if backend in requests.serial_backends_busy:
            return None

        if self._provisions_serially(backend):
            requests.serial_backends_busy.add(backend)

        name = self.next_instance_name(backend, also_taken=requests.names)
        requests.names.add(name)
        instance_id = new_instance_id()
        idle = run.spec.idle_duration
        event = InstanceRequested(
            instance_id=instance_id,
            name=name,
            pool=run.pool,
            offer=decision.offer,
            idle_duration=RUN_CREATED_IDLE_DURATION if idle is None else idle,
            requirements=run.spec.requirements,
            run_id=run.id,
            candidates=decision.candidates,
        )
        return NewEvent(f"instance/{instance_id}", event, expected_version=0)

    def _no_capacity(self, run: Run, reason: str) -> NewEvent | None:
        """Fail ``run`` for lack of capacity, or let its retry policy keep it queued."""
        event = decide_no_capacity(run, RunFailed(run.id, reason), wall_clock_us())

        return None if event is None else NewEvent(f"run/{run.id}", event)

    async def list_offers(self, requirements: Requirements) -> list[Offer]:
        """Collect the fitting offers of every allowed backend, cheapest first."""
        offers: list[Offer] = []
        for name, backend in self.backends.items():
            if requirements.backends is not None and name not in requirements.backends:
                continue

            try:
                offers.extend(await backend.list_offers(requirements))
            except BackendError as error:
                log.warning("offers_failed", backend=name, error=str(error))

        offers.sort(key=lambda offer: offer.price)

        return offers

    def _provisions_serially(self, backend: str) -> bool:
        return bool(getattr(self.backends.get(backend), "provisions_serially", False))

    def next_instance_name(
        self, backend: str, also_taken: set[str] | frozenset[str] = frozenset()
    ) -> str:
        """Return ``<backend>-<n>`` with the smallest n no live instance uses."""
        taken = {
            instance.name
            for instance in self.core.state.live_instances()
            if instance.status not in ("terminated", "failed")
        }
        taken |= also_taken
        number = 1
        while f"{backend}-{number}" in taken:
            number += 1

        return f"{backend}-{number}"

    # Provisioning

    async def provision(self, instance_id: str) -> None:
        """Create a requested instance and claim it for the run that asked."""
        instance = self.core.state.instances[instance_id]
        backend = self.backends.get(instance.backend)
        log.info("instance_provisioning", instance_id=instance_id, backend=instance.backend)
        try:
            if backend is None:
                raise BackendError(f"backend {instance.backend} is not configured")

            provisioned = await backend.create(instance_id, instance.offer)
        except BackendError as error:
            log.error("instance_provisioning_failed", instance_id=instance_id, error=str(error))
            async with self.core.lock:
                entries = [
                    NewEvent(
                        f"instance/{instance_id}",
                        InstanceProvisioningFailed(instance_id, str(error)),
                    )
                ]
                run = self.core.state.runs.get(instance.for_run or "")
                if run is not None and run.status == "provisioning":
                    reason = f"provisioning instance {instance.name} failed: {error}"
                    failure = RunFailed(run.id, reason)
                    event = decide_no_capacity(
                        run, failure, wall_clock_us(), provisioning_failed=True
                    )
                    entries.append(NewEvent(f"run/{run.id}", event or failure))

                await self.core.commit(entries, DAEMON_ACTOR)
            return

        claim_for: str | None = None
        async with self.core.lock:
            entries = [
                NewEvent(
                    f"instance/{instance_id}",
                    InstanceProvisioned(
                        instance_id,
                        provisioned.resources,
                        provisioned.hostname,
                        dict(provisioned.backend_data),
                    ),
                )
            ]
            current = self.core.state.instances[instance_id]
            run = self.core.state.runs.get(current.for_run or "")
            if current.status == "terminating":
                pass
            elif run is not None and run.status == "provisioning" and not run.stop_requested:
                entries.append(
                    NewEvent(f"instance/{instance_id}", InstanceClaimed(instance_id, run.id))
                )
                claim_for = run.id
            elif run is not None and run.status == "provisioning":
                entries.append(NewEvent(f"run/{run.id}", RunStopped(run.id)))

            await self.core.commit(entries, DAEMON_ACTOR)
            terminating = current.status == "terminating"

        log.info("instance_provisioned", instance_id=instance_id, run_id=claim_for)
        if claim_for is not None:
            await self.launch(claim_for)

        if terminating:
            self.terminate_soon(instance_id)

    # Runs

    async def launch(self, run_id: str) -> None:
        """Start a claimed run's process and watch it."""
        state = self.core.state
        run = state.runs[run_id]
        instance = state.instances[run.instance_id or ""]
        if run.stop_requested:
            await self.record_exit(run_id, None)
            return

        port = run.spec.port
        if run.spec.type == "service" and port and instance.backend == "local":
            if local_port_in_use(port):
                reason = (
                    f"port {port} is already in use on this machine, so the "
                    "service's readiness probe would reach another process"
                )
                log.error("run_start_failed", run_id=run_id, port=port, error=reason)
                await self.record_exit(run_id, None, reason=reason)
                return

        try:
            runner = self.runner_for(instance.backend)
            handle = await runner.start(self.run_files.launch_for(run, instance))
        except Exception as error:
            log.error("run_start_failed", run_id=run_id, error=str(error))
            await self.record_exit(run_id, None, reason=f"failed to start: {error}")
            return

        async with self.core.lock:
            await self.core.commit(
                [
                    NewEvent(
                        f"run/{run_id}",
                        RunStarted(
                            run_id, instance.id, handle.pid, handle.pid_start_time
                        ),
                    )
                ],
                DAEMON_ACTOR,
            )

        log.info("run_started", run_id=run_id, instance_id=instance.id, pid=handle.pid)
        await self.watch(run_id, handle)

    async def watch(self, run_id: str, handle) -> None:  # type: ignore[no-untyped-def]
        self._handles[run_id] = handle
        if self.core.state.runs[run_id].stop_requested:
            # The stop came while no handle was known, e.g. during recovery.
            self.start_soon(partial(self.stop, run_id, abort=False))

        try:
            status = await self._runner_of_run(run_id).wait(handle)
        except Exception as error:
            log.error("run_lost", run_id=run_id, error=str(error))
            await self.record_exit(run_id, None, reason=str(error))
            return
        finally:
            self._handles.pop(run_id, None)

        await self.record_exit(run_id, status)

    async def record_exit(
        self, run_id: str, exit_status: int | None, *, reason: str | None = None
    ) -> None:
        """Record how a run ended and release its instance, in one batch."""
        async with self.core.lock:
            state = self.core.state
            run = state.runs[run_id]
            if run.status not in ("submitted", "provisioning", "running"):
                return

            instance = state.instances.get(run.instance_id or "")
            end = self._end_event(run, exit_status, reason)
            decision = decide_end(state, run, end, wall_clock_us())
            entries = [NewEvent(f"run/{run_id}", event) for event in decision.events]
            if decision.release and instance is not None and instance.run_id == run_id:
                entries.append(
                    NewEvent(f"instance/{instance.id}", InstanceReleased(instance.id, run_id))
                )

            await self.core.commit(entries, DAEMON_ACTOR)

        if decision.relaunch:
            delay = restart_delay_seconds(self.core.state.runs[run_id].restarts)
            log.info(
                "run_restarting",
                run_id=run_id,
                exit_status=exit_status,
                reason=reason,
                delay_s=delay,
            )
            self.start_soon(self._launch_after, run_id, delay)
            return

        log.info("run_ended", run_id=run_id, exit_status=exit_status, reason=reason)

    async def _launch_after(self, run_id: str, delay: float) -> None:
        await anyio.sleep(delay)
        await self.launch(run_id)

    def _end_event(
        self, run: Run, exit_status: int | None, reason: str | None
    ) -> RunFinished | RunFailed | RunStopped:
        instance = self.core.state.instances.get(run.instance_id or "")
        if run.stop_requested:
            return RunStopped(run.id, exit_status)

        if instance is not None and instance.status == "terminating":
            why = instance.reason or "terminated"
            return RunFailed(
                run.id, f"instance {instance.name} was removed: {why}", exit_status
            )

        if reason is not None or exit_status is None:
            return RunFailed(run.id, reason or "exit status unknown", exit_status)

        return RunFinished(run.id, exit_status)

    async def stop(self, run_id: str, *, abort: bool) -> None:
        """Stop a run's process tree; its watcher records the end."""
        handle = self._handles.get(run_id)
        if handle is None:
            return

        grace = 0.0 if abort else self.stop_grace_seconds
        await self._runner_of_run(run_id).stop(handle, grace_seconds=grace, abort=abort)

    def has_process(self, run_id: str) -> bool:
        return run_id in self._handles

    def runner_for(self, backend: str) -> "RunnerLike":
        """Return the runner that starts runs on instances of ``backend``."""
        return self.runners.get(backend, self.runner)

    def _runner_of_run(self, run_id: str) -> "RunnerLike":
        state = self.core.state
        instance = state.instances.get(state.runs[run_id].instance_id or "")

        return self.runner if instance is None else self.runner_for(instance.backend)


class RunnerLike:
    """What the scheduler needs from a runner (see ``dstackd.runner`` and
    ``dstackd.ssh_runner``).

    A runner also has ``adopt(run_id, pid, pid_start_time, run_dir,
    backend_data)``, which the daemon calls on start-up for runs that were
    running, and which returns a handle for ``wait`` or None.
    """

    async def start(self, launch):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def wait(self, handle) -> int:  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def stop(self, handle, *, grace_seconds: float, abort: bool) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError


# Delay before a service's n-th restart: RESTART_DELAY_START * 2**(n - 1),
# at most RESTART_DELAY_MAX, so a service that fails at once does not
# restart hundreds of times a second.
RESTART_DELAY_START = 0.5
RESTART_DELAY_MAX = 30.0


def restart_delay_seconds(restarts: int) -> float:
    """Return how long to wait before a service's ``restarts``-th restart."""
    exponent = min(max(restarts - 1, 0), 16)

    return min(RESTART_DELAY_START * 2**exponent, RESTART_DELAY_MAX)


def local_port_in_use(port: int) -> bool:
    """Return whether some process on this machine listens on TCP ``port``.

    Binding the wildcard address fails while the port is bound on any address.
    SO_REUSEADDR lets connections of a stopped process in TIME_WAIT pass.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True

    return False


def new_instance_id() -> str:
    return "i-" + uuid.uuid4().hex[:12]


def new_run_id() -> str:
    return "r-" + uuid.uuid4().hex[:12]


__all__ = ["InstanceTerminationRequested", "Scheduler", "new_instance_id", "new_run_id"]
