"""Health checks of SSH hosts: reachability events, timeouts, placement."""

import time
from pathlib import Path

import anyio

from dstackd.backends.ssh import SshBackend
from dstackd.health import HealthChecker
from dstackd.placement import choose_instance
from events.event_types import InstanceReachable, InstanceUnreachable, RunSpec
from events.model import DAEMON_ACTOR, Range, Requirements
from events.projection import Run
from events.record import NewEvent, Record
from tests.dstackd.core_fixtures import open_core, record_instance
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    HangingServer,
    SshServer,
    hanging_server,
    ssh_root,
    ssh_server,
)

TIMEOUT_SECONDS = 1.5


def probe_run() -> Run:
    requirements = Requirements(cpu=Range(1, None), memory=Range(1, None))
    spec = RunSpec(argv=("true",), requirements=requirements)
    return Run(
        id="r-probe",
        name="probe",
        pool="default-pool",
        spec=spec,
        user="",
        uid=None,
        submitted_at=0,
    )


async def test_hanging_host_does_not_delay_other_hosts(
    ssh_server: SshServer, hanging_server: HangingServer, ssh_root: Path
) -> None:
    async with open_core(ssh_root) as core:
        await record_instance(
            core, "i-good", backend="ssh", backend_data=ssh_server.backend_data()
        )
        await record_instance(
            core,
            "i-hangs",
            backend="ssh",
            backend_data=hanging_server.backend_data(str(ssh_server.key_path)),
        )
        async with core.lock:
            await core.commit(
                [
                    NewEvent(
                        "instance/i-good",
                        InstanceUnreachable("i-good", "earlier outage"),
                    )
                ],
                DAEMON_ACTOR,
            )

        recorded: list[tuple[float, Record]] = []
        core.subscribe(
            lambda records: recorded.extend((time.monotonic(), r) for r in records)
        )
        checker = HealthChecker(
            core, SshBackend(), interval=60, timeout=TIMEOUT_SECONDS
        )

        started = time.monotonic()
        with anyio.fail_after(TIMEOUT_SECONDS * 3):
            await checker.check_once()
        elapsed = time.monotonic() - started

        events = {type(r.event).__name__: (at - started, r) for at, r in recorded}
        state = core.state
        assert state.instances["i-good"].reachable
        assert not state.instances["i-hangs"].reachable
        assert "timed out" in (state.instances["i-hangs"].unreachable_error or "")
        assert events["InstanceReachable"][0] < TIMEOUT_SECONDS / 2
        assert events["InstanceUnreachable"][0] >= TIMEOUT_SECONDS
        assert elapsed < TIMEOUT_SECONDS + 1


async def test_host_comes_back_after_outage(
    ssh_server: SshServer, ssh_root: Path
) -> None:
    async with open_core(ssh_root) as core:
        await record_instance(
            core, "i-host", backend="ssh", backend_data=ssh_server.backend_data()
        )
        checker = HealthChecker(core, SshBackend(), interval=60, timeout=1)
        recorded: list[Record] = []
        core.subscribe(recorded.extend)

        ssh_server.pause()
        try:
            await checker.check_once()
            await checker.check_once()
        finally:
            ssh_server.resume()

        unreachable = core.state.instances["i-host"].reachable
        await checker.check_once()

        types = [type(r.event) for r in recorded]
        assert unreachable is False
        assert types == [InstanceUnreachable, InstanceReachable]
        assert core.state.instances["i-host"].status == "idle"
        assert core.state.instances["i-host"].reachable


async def test_placement_skips_unreachable_instance(ssh_root: Path) -> None:
    async with open_core(ssh_root) as core:
        await record_instance(core, "i-host", backend="ssh", backend_data={})
        async with core.lock:
            await core.commit(
                [
                    NewEvent(
                        "instance/i-host", InstanceUnreachable("i-host", "timed out")
                    )
                ],
                DAEMON_ACTOR,
            )

        down = choose_instance(core.state, probe_run())
        async with core.lock:
            await core.commit(
                [NewEvent("instance/i-host", InstanceReachable("i-host"))], DAEMON_ACTOR
            )

        up = choose_instance(core.state, probe_run())

        assert down.instance_id is None
        assert down.candidates[0].rejected == "unreachable: timed out"
        assert up.instance_id == "i-host"
