"""An in-process ``Core`` over a real event log, and helpers to record instances."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from dstackd.core import Core
from events.event_types import (
    InstanceProvisioned,
    InstanceRequested,
    RunSpec,
    RunSubmitted,
)
from events.log import EventLog
from events.model import DAEMON_ACTOR, Offer, Resources
from events.projection import State
from events.record import NewEvent

RESOURCES = Resources(cpus=2, memory_gb=4.0, disk_gb=100.0)


@asynccontextmanager
async def open_core(directory: Path) -> AsyncIterator[Core]:
    event_log = await EventLog.open(directory / "log.db")
    try:
        yield Core(event_log, State())
    finally:
        await event_log.close()


async def record_instance(
    core: Core,
    instance_id: str,
    *,
    backend: str,
    backend_data: dict[str, str],
    region: str = "us-east-1",
    instance_type: str = "t3.medium",
    provisioned: bool = True,
    pool: str = "default-pool",
) -> None:
    """Append the requested (and provisioned) records of an instance."""
    offer = Offer(backend, region, instance_type, RESOURCES)
    stream = f"instance/{instance_id}"
    entries = [
        NewEvent(
            stream,
            InstanceRequested(instance_id, instance_id, pool, offer, "off"),
        )
    ]
    if provisioned:
        entries.append(
            NewEvent(
                stream,
                InstanceProvisioned(instance_id, RESOURCES, "", backend_data),
            )
        )

    async with core.lock:
        await core.commit(entries, DAEMON_ACTOR)


async def record_run(core: Core, run_id: str, pool: str = "default-pool") -> None:
    spec = RunSpec(argv=("true",))
    async with core.lock:
        await core.commit(
            [NewEvent(f"run/{run_id}", RunSubmitted(run_id, run_id, pool, spec))],
            DAEMON_ACTOR,
        )
