"""Readiness probes of services: a service counts as ready once an HTTP GET of
its probe path on its port returns a 2xx status, which ``RunReady`` records.

One probe task runs per start of a service, in this component's own task
group, so a slow or hanging service never holds up the scheduler. Each GET is
bounded by the probe's timeout. Probes start fast (0.1 s, doubling) and slow
down to the probe's interval, because most services bind their port within a
second but some load for minutes. A restarted service is probed again.
"""

import anyio
import anyio.abc
import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout

from dstackd.attach import LOCAL_HOST, service_url
from dstackd.core import Core
from events.event_types import ReadinessProbe, RunReady, RunStarted
from events.model import DAEMON_ACTOR
from events.projection import Run
from events.record import NewEvent, Record

log = structlog.get_logger("dstackd.services")

FIRST_PROBE_DELAY_SECONDS = 0.1


class ServiceProbes:
    """Probes services after each start and records when they are ready."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._task_group: anyio.abc.TaskGroup | None = None
        self._session: ClientSession | None = None
        self._probing: set[tuple[str, int]] = set()
        core.subscribe(self._on_commit)

    def _on_commit(self, records: list[Record] | tuple[Record, ...]) -> None:
        for record in records:
            if isinstance(record.event, RunStarted):
                run = self.core.state.runs.get(record.event.run_id)
                if run is not None:
                    self.probe_soon(run)

    def probe_soon(self, run: Run) -> None:
        """Start probing ``run`` if it is a running service that is not ready."""
        if self._task_group is None or run.spec.type != "service":
            return

        if run.status != "running" or run.ready or run.started_at is None:
            return

        key = (run.id, run.started_at)
        if key not in self._probing:
            self._probing.add(key)
            self._task_group.start_soon(self._probe, run.id, run.started_at)

    async def run(self) -> None:
        """Probe services until cancelled, starting with those already running."""
        async with ClientSession() as session, anyio.create_task_group() as group:
            self._session = session
            self._task_group = group
            for run in self.core.state.active_runs():
                self.probe_soon(run)

            await anyio.sleep_forever()

    async def _probe(self, run_id: str, started_at: int) -> None:
        try:
            await self._probe_until_ready(run_id, started_at)
        finally:
            self._probing.discard((run_id, started_at))

    async def _probe_until_ready(self, run_id: str, started_at: int) -> None:
        delay = FIRST_PROBE_DELAY_SECONDS
        while True:
            run = self._current(run_id, started_at)
            if run is None:
                return

            base_url = self._base_url(run)
            probe = run.spec.probe or ReadinessProbe()
            if base_url is None:
                return

            if await self._get_ok(base_url + probe.path, probe.timeout, run_id):
                await self._record_ready(run_id, started_at, base_url)
                return

            await anyio.sleep(delay)
            delay = min(delay * 2, float(probe.interval))

    def _current(self, run_id: str, started_at: int) -> Run | None:
        """Return the run while it is still in the start being probed."""
        run = self.core.state.runs.get(run_id)
        if run is None or run.status != "running" or run.ready:
            return None

        return run if run.started_at == started_at else None

    def _base_url(self, run: Run) -> str | None:
        instance = self.core.state.instances.get(run.instance_id or "")
        if instance is None:
            return None

        # NOTE: a remote service is probed on its instance's hostname, so its
        # port must be reachable from the daemon's host.
        host = LOCAL_HOST if instance.backend == "local" else instance.hostname
        return service_url(run, host or LOCAL_HOST)

    async def _get_ok(self, url: str, timeout: int, run_id: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(
                url, timeout=ClientTimeout(total=timeout), allow_redirects=False
            ) as response:
                ok = 200 <= response.status < 300
                log.debug(
                    "service_probed", run_id=run_id, url=url, status=response.status
                )
                return ok
        except (ClientError, TimeoutError, OSError) as error:
            log.debug("service_probe_failed", run_id=run_id, url=url, error=repr(error))
            return False

    async def _record_ready(self, run_id: str, started_at: int, url: str) -> None:
        async with self.core.lock:
            if self._current(run_id, started_at) is None:
                return

            await self.core.commit(
                [NewEvent(f"run/{run_id}", RunReady(run_id, url))], DAEMON_ACTOR
            )

        log.info("service_ready", run_id=run_id, url=url)
