"""Idle reaper: one deadline per idle instance, and termination with retries.

A deadline is the time of the record that made the instance idle plus its
idle duration, so after a restart the same deadlines come back from the log.
An instance whose deadline passed while the daemon was down expires at once.
Expiry is appended (making the instance unschedulable) before the backend is
asked to terminate it.
"""

import heapq
import time
from collections.abc import Callable, Sequence

import anyio
import structlog

from dstackd.backends.base import Backend, BackendError
from dstackd.core import Core
from events.event_types import (
    InstanceIdleExpired,
    InstanceTerminated,
    InstanceTerminationFailed,
)
from events.model import DAEMON_ACTOR
from events.projection import Instance
from events.record import NewEvent, Record

log = structlog.get_logger("dstackd.reaper")

# Backoff between attempts to terminate, in seconds.
TERMINATE_BACKOFF_START = 1.0
TERMINATE_BACKOFF_MAX = 300.0


class IdleReaper:
    """Expires idle instances at their deadlines and terminates instances."""

    def __init__(
        self,
        core: Core,
        backends: dict[str, Backend],
        *,
        clock: Callable[[], float] = time.time,
        before_terminate: Callable[[str], object] | None = None,
    ) -> None:
        self.core = core
        self.backends = backends
        self.clock = clock
        self.before_terminate = before_terminate
        self._deadlines: dict[str, tuple[int, int]] = {}
        self._heap: list[tuple[int, str, int]] = []
        self._wake = anyio.Event()
        self._terminating: set[str] = set()
        self.task_group: anyio.abc.TaskGroup | None = None
        core.subscribe(self._on_commit)

    def _on_commit(self, records: Sequence[Record]) -> None:
        instances = self.core.state.instances
        for record in records:
            instance_id = getattr(record.event, "instance_id", None)
            if instance_id is not None and instance_id in instances:
                self.update(instances[instance_id])

    def update(self, instance: Instance) -> None:
        """Arm or disarm the instance's deadline from its current state."""
        deadline = idle_deadline_us(instance)
        if deadline is None:
            self._deadlines.pop(instance.id, None)
            return

        assert instance.idle_since is not None
        entry = (deadline, instance.idle_since)
        if self._deadlines.get(instance.id) == entry:
            return

        self._deadlines[instance.id] = entry
        heapq.heappush(self._heap, (deadline, instance.id, instance.idle_since))
        self._wake.set()

    def deadline_of(self, instance_id: str) -> int | None:
        entry = self._deadlines.get(instance_id)
        return None if entry is None else entry[0]

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        """Expire instances as their deadlines pass, until cancelled."""
        self.task_group = task_group
        while True:
            now_us = int(self.clock() * 1_000_000)
            while self._heap and self._heap[0][0] <= now_us:
                deadline, instance_id, idle_since = heapq.heappop(self._heap)
                if self._deadlines.get(instance_id) != (deadline, idle_since):
                    continue

                del self._deadlines[instance_id]
                await self.expire(instance_id, idle_since)

            self._wake = anyio.Event()
            timeout = None
            if self._heap:
                timeout = max(0.0, (self._heap[0][0] - now_us) / 1_000_000)

            with anyio.move_on_after(timeout):
                await self._wake.wait()

    async def expire(self, instance_id: str, idle_since: int) -> None:
        """Record the expiry of an instance still idle since ``idle_since``."""
        async with self.core.lock:
            instance = self.core.state.instances.get(instance_id)
            if (
                instance is None
                or instance.status != "idle"
                or not instance.schedulable
                or instance.idle_since != idle_since
                or instance.idle_duration == "off"
            ):
                return

            stream = f"instance/{instance_id}"
            await self.core.commit(
                [
                    NewEvent(
                        stream,
                        InstanceIdleExpired(
                            instance_id, idle_since, int(instance.idle_duration)
                        ),
                        expected_version=await self.core.stream_version(stream),
                    )
                ],
                DAEMON_ACTOR,
            )

        log.info("instance_idle_expired", instance_id=instance_id)
        self.terminate_soon(instance_id)

    def terminate_soon(self, instance_id: str) -> None:
        if instance_id in self._terminating or self.task_group is None:
            return

        self._terminating.add(instance_id)
        self.task_group.start_soon(self.terminate, instance_id)

    async def terminate(self, instance_id: str) -> None:
        """Terminate on the backend until it succeeds, then record it."""
        try:
            await self._terminate(instance_id)
        finally:
            self._terminating.discard(instance_id)

    async def _terminate(self, instance_id: str) -> None:
        instance = self.core.state.instances[instance_id]
        if self.before_terminate is not None:
            await self.before_terminate(instance_id)  # type: ignore[misc]

        backend = self.backends.get(instance.backend)
        attempt = instance.termination_attempts
        backoff = TERMINATE_BACKOFF_START
        while True:
            try:
                if backend is None:
                    raise BackendError(f"backend {instance.backend} is not configured")

                await backend.terminate(instance_id, instance.backend_data)
                break
            except BackendError as error:
                attempt += 1
                log.warning(
                    "instance_termination_failed",
                    instance_id=instance_id,
                    attempt=attempt,
                    error=str(error),
                )
                async with self.core.lock:
                    await self.core.commit(
                        [
                            NewEvent(
                                f"instance/{instance_id}",
                                InstanceTerminationFailed(instance_id, str(error), attempt),
                            )
                        ],
                        DAEMON_ACTOR,
                    )

                await anyio.sleep(backoff)
                backoff = min(backoff * 2, TERMINATE_BACKOFF_MAX)

        async with self.core.lock:
            if self.core.state.instances[instance_id].status == "terminated":
                return

            await self.core.commit(
                [NewEvent(f"instance/{instance_id}", InstanceTerminated(instance_id))],
                DAEMON_ACTOR,
            )

        log.info("instance_terminated", instance_id=instance_id)


def idle_deadline_us(instance: Instance) -> int | None:
    """Return when an idle instance expires, in UTC microseconds, or None."""
    if instance.status != "idle" or not instance.schedulable:
        return None

    if instance.idle_since is None or instance.idle_duration == "off":
        return None

    return instance.idle_since + int(instance.idle_duration) * 1_000_000
