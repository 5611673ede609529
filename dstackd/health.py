"""Health checks of SSH hosts, and the reachability events they record.

Every interval each idle or busy SSH instance gets one check (connect, log in,
run ``true``) bounded by a timeout. Checks run concurrently and each records
its own outcome as soon as it has one, so a host that hangs delays neither the
checks of other hosts nor placement, which only reads the projection. A failed
check appends ``InstanceUnreachable`` (placement then skips the instance), and
the next successful one appends ``InstanceReachable``. An outage never removes
a host: that takes ``pool remove``.
"""

import time
from collections.abc import Callable

import anyio
import anyio.abc
import structlog

from dstackd.backends.base import BackendError
from dstackd.backends.ssh import BACKEND_NAME, SshBackend, SshTarget
from dstackd.core import Core
from events.event_types import InstanceReachable, InstanceUnreachable
from events.model import DAEMON_ACTOR
from events.projection import Instance
from events.record import NewEvent

log = structlog.get_logger(__name__)

CHECKED_STATUSES = frozenset({"idle", "busy"})


class HealthChecker:
    """Checks SSH instances and records changes of their reachability.

    Args:
        interval: seconds between the starts of two rounds of checks.
        timeout: seconds one check of one host may take.
        clock: monotonic seconds, for the ``duration_ms`` of log lines.
    """

    def __init__(
        self,
        core: Core,
        backend: SshBackend,
        *,
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.backend = backend
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self._in_flight: set[str] = set()

    def instances_to_check(self) -> list[Instance]:
        """Return the live SSH instances that a check may mark (un)reachable."""
        return [
            instance
            for instance in self.core.state.live_instances()
            if instance.backend == BACKEND_NAME
            and instance.status in CHECKED_STATUSES
            and instance.provisioned_at is not None
        ]

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start a round of checks every interval, until cancelled.

        A host whose previous check has not finished is skipped in this round.
        """
        while True:
            for instance in self.instances_to_check():
                if instance.id not in self._in_flight:
                    self._in_flight.add(instance.id)
                    task_group.start_soon(self._check_and_release, instance.id)

            await anyio.sleep(self.interval)

    async def check_once(self) -> None:
        """Check every host concurrently and return when all checks ended."""
        async with anyio.create_task_group() as task_group:
            for instance in self.instances_to_check():
                task_group.start_soon(self.check, instance.id)

    async def _check_and_release(self, instance_id: str) -> None:
        try:
            await self.check(instance_id)
        finally:
            self._in_flight.discard(instance_id)

    async def check(self, instance_id: str) -> None:
        """Check one host and record a change of its reachability."""
        instance = self.core.state.instances.get(instance_id)
        if instance is None:
            return

        started = self.clock()
        error: str | None = None
        try:
            target = SshTarget.from_backend_data(instance.backend_data)
            await self.backend.check(target, self.timeout)
        except BackendError as exc:
            error = str(exc)

        duration_ms = round((self.clock() - started) * 1000, 1)
        await self._record(instance_id, error, duration_ms)

    async def _record(
        self, instance_id: str, error: str | None, duration_ms: float
    ) -> None:
        async with self.core.lock:
            instance = self.core.state.instances.get(instance_id)
            if instance is None or instance.status not in CHECKED_STATUSES:
                return

            if error is None and instance.reachable:
                return

            if error is not None and not instance.reachable:
                log.debug("health_check_failed", instance_id=instance_id, error=error)
                return

            event: InstanceReachable | InstanceUnreachable
            if error is None:
                event = InstanceReachable(instance_id)
            else:
                event = InstanceUnreachable(instance_id, error)

            await self.core.commit(
                [NewEvent(f"instance/{instance_id}", event)], DAEMON_ACTOR
            )

        if error is None:
            log.info(
                "instance_reachable", instance_id=instance_id, duration_ms=duration_ms
            )
        else:
            log.warning(
                "instance_unreachable",
                instance_id=instance_id,
                error=error,
                duration_ms=duration_ms,
            )
