"""The AWS EC2 backend against moto's server: catalog, offers, create, terminate,
and termination retried by the reaper across a restart."""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from dstackd import reaper as reaper_module
from dstackd.backends.aws import (
    TAG_DAEMON_ID,
    TAG_INSTANCE_ID,
    TAG_POOL,
    AwsBackend,
    Ec2Instance,
    load_catalog,
)
from dstackd.backends.base import BackendError
from dstackd.config import AwsConfig
from dstackd.core import Core
from dstackd.reaper import IdleReaper
from dstackd.views import instance_view
from events.event_types import (
    InstanceProvisioned,
    InstanceRequested,
    InstanceTerminated,
    InstanceTerminationFailed,
    InstanceTerminationRequested,
)
from events.grammar import build_requirements
from events.log import EventLog
from events.model import DAEMON_ACTOR, Offer
from events.record import NewEvent, Record
from events.snapshot import load_state
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    aws_env,
    fault_proxy,
    moto_server,
    ssh_root,
)

pytestmark = pytest.mark.usefixtures("aws_env")


def make_backend(endpoint_url: str, key_dir: Path, **config: Any) -> AwsBackend:
    settings: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "poll_interval_seconds": 0.05,
        "running_timeout_seconds": 10,
        "terminate_timeout_seconds": 2,
        **config,
    }
    return AwsBackend(
        AwsConfig(**settings),
        daemon_id="d-" + uuid.uuid4().hex[:12],
        key_dir=str(key_dir),
        labels=lambda instance_id: {"pool": "gpus", "name": "aws-1"},
    )


async def cheapest_offer(backend: AwsBackend) -> Offer:
    offers = await backend.list_offers(build_requirements(cpu="2..", memory="4GB.."))
    return offers[0]


class TestCatalog:
    def test_shipped_catalog_has_prices_and_date(self) -> None:
        catalog = load_catalog()

        assert catalog.prices_taken_at
        assert len(catalog.instance_types) >= 10
        for entry in catalog.instance_types:
            assert entry.prices.get("us-east-1", 0) > 0, entry.instance_type

    def test_gpu_types_list_their_gpus(self) -> None:
        entries = {e.instance_type: e for e in load_catalog().instance_types}

        assert entries["g5.xlarge"].gpus[0].name == "A10G"
        assert entries["g5.xlarge"].gpus[0].memory_gb == 24
        assert entries["p4d.24xlarge"].gpus[0].count == 8


class TestOffers:
    @pytest.mark.parametrize(
        "requirements,expected_types,spot",
        [
            ({"gpu": "A10G", "cpu": "4", "memory": "16GB"}, {"g5.xlarge"}, {False}),
            ({"gpu": "H100:8"}, {"p5.48xlarge"}, {False}),
            (
                {"cpu": "2", "memory": "4GB", "spot_policy": "spot"},
                {"t3.medium"},
                {True},
            ),
            (
                {"cpu": "2", "memory": "4GB", "spot_policy": "auto"},
                {"t3.medium"},
                {True, False},
            ),
            (
                {"cpu": "2..", "memory": "8GB..", "max_price": "0.09"},
                {"t3.large"},
                {False},
            ),
        ],
        ids=["gpu", "gpu-count", "spot", "auto", "max-price"],
    )
    async def test_offers_follow_requirements(
        self,
        moto_server: MotoServer,
        ssh_root: Path,
        requirements: dict[str, str],
        expected_types: set[str],
        spot: set[bool],
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root)

        offers = await backend.list_offers(build_requirements(**requirements))

        assert {offer.instance_type for offer in offers} == expected_types
        assert {offer.spot for offer in offers} == spot
        assert {offer.region for offer in offers} == {"us-east-1"}

    async def test_offers_are_cheapest_first_across_regions(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(
            moto_server.url, ssh_root, regions=("eu-west-1", "us-west-2")
        )

        offers = await backend.list_offers(
            build_requirements(cpu="2..", memory="4GB..")
        )

        prices = [offer.price for offer in offers]
        assert prices == sorted(prices)
        assert {offer.region for offer in offers} == {"eu-west-1", "us-west-2"}
        assert offers[0].instance_type == "t3.medium"
        assert offers[0].region == "us-west-2"

    async def test_disk_requirement_sizes_the_root_volume(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root, instance_types=("t3.medium",))

        default = await backend.list_offers(build_requirements(cpu="2", memory="4GB"))
        larger = await backend.list_offers(
            build_requirements(cpu="2", memory="4GB", disk="500GB..")
        )

        assert default[0].resources.disk_gb == 100
        assert larger[0].resources.disk_gb == 500

    async def test_configured_types_limit_the_catalog(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root, instance_types=("m5.large",))

        offers = await backend.list_offers(
            build_requirements(cpu="2..", memory="1GB..")
        )

        assert [offer.instance_type for offer in offers] == ["m5.large"]


class TestCreate:
    async def test_create_tags_instance_and_sends_client_token(
        self, fault_proxy: FaultProxy, ssh_root: Path
    ) -> None:
        backend = make_backend(fault_proxy.url, ssh_root)
        offer = await cheapest_offer(backend)

        provisioned = await backend.create("i-tagged00001", offer)

        listed = await backend.list_tagged()
        run_request = fault_proxy.requests_of("RunInstances")[0]
        tags = _tags(run_request)
        assert [i.ec2_instance_id for i in listed] == [
            provisioned.backend_data["ec2_instance_id"]
        ]
        assert listed[0].state == "running"
        assert run_request["ClientToken"] == ["i-tagged00001"]
        assert tags[TAG_INSTANCE_ID] == "i-tagged00001"
        assert tags[TAG_DAEMON_ID] == backend.daemon_id
        assert tags[TAG_POOL] == "gpus"
        assert provisioned.backend_data["user"] == "ubuntu"
        assert provisioned.backend_data["key_path"] == str(ssh_root / "id_ed25519")
        assert "PRIVATE" not in repr(provisioned)

    async def test_create_again_adopts_instead_of_launching(
        self, fault_proxy: FaultProxy, ssh_root: Path
    ) -> None:
        backend = make_backend(fault_proxy.url, ssh_root)
        offer = await cheapest_offer(backend)

        first = await backend.create("i-adopted0001", offer)
        second = await make_backend_like(backend, fault_proxy.url).create(
            "i-adopted0001", offer
        )

        assert fault_proxy.count("RunInstances") == 1
        assert second.backend_data == first.backend_data

    async def test_key_pair_and_group_are_created_once(
        self, fault_proxy: FaultProxy, ssh_root: Path
    ) -> None:
        backend = make_backend(fault_proxy.url, ssh_root)
        offer = await cheapest_offer(backend)

        await backend.create("i-keyonce0001", offer)
        await make_backend_like(backend, fault_proxy.url).create("i-keyonce0002", offer)

        assert fault_proxy.count("ImportKeyPair") == 1
        assert fault_proxy.count("CreateSecurityGroup") == 1
        assert (ssh_root / "id_ed25519").stat().st_mode & 0o077 == 0

    async def test_failed_run_instances_raises_backend_error(
        self, fault_proxy: FaultProxy, ssh_root: Path
    ) -> None:
        backend = make_backend(fault_proxy.url, ssh_root)
        offer = await cheapest_offer(backend)
        fault_proxy.fail("RunInstances", 1)

        with pytest.raises(BackendError, match="RunInstances in us-east-1 failed"):
            await backend.create("i-fails000001", offer)


class TestTerminate:
    async def test_terminate_returns_once_ec2_reports_terminated(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root)
        provisioned = await backend.create(
            "i-term0000001", await cheapest_offer(backend)
        )

        await backend.terminate("i-term0000001", provisioned.backend_data)

        listed = await backend.list_tagged()
        assert [i.state for i in listed] == ["terminated"]

    async def test_terminate_without_record_finds_instance_by_tag(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root)
        await backend.create("i-bytag000001", await cheapest_offer(backend))

        await backend.terminate("i-bytag000001", {})

        assert [i.state for i in await backend.list_tagged()] == ["terminated"]

    async def test_terminate_of_unknown_instance_succeeds(
        self, moto_server: MotoServer, ssh_root: Path
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root)

        await backend.terminate(
            "i-gone00000001",
            {"ec2_instance_id": "i-0123456789abcdef0", "region": "us-east-1"},
        )

    async def test_terminate_raises_until_ec2_confirms(
        self, moto_server: MotoServer, ssh_root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend = make_backend(moto_server.url, ssh_root, terminate_timeout_seconds=0.3)
        provisioned = await backend.create(
            "i-slow0000001", await cheapest_offer(backend)
        )

        async def shutting_down(region: str, ec2_ids: list[str]) -> list[Ec2Instance]:
            return [
                Ec2Instance(ec2_id, region, "shutting-down", "i-slow0000001", "", 0.0)
                for ec2_id in ec2_ids
            ]

        monkeypatch.setattr(backend, "describe", shutting_down)

        with pytest.raises(BackendError, match="shutting-down after 0.3s; will retry"):
            await backend.terminate("i-slow0000001", provisioned.backend_data)


class TestTerminationRetries:
    async def test_failed_terminations_are_retried_across_restart(
        self,
        fault_proxy: FaultProxy,
        ssh_root: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(reaper_module, "TERMINATE_BACKOFF_START", 0.01)
        backend = make_backend(fault_proxy.url, ssh_root)
        offer = await cheapest_offer(backend)
        fault_proxy.fail("TerminateInstances", 5)
        log_path = ssh_root / "log.db"

        async with opened_core(log_path) as core:
            await provision_and_remove(core, backend, "i-retry000001", offer)
            failures = await terminate_until_failures(core, backend, count=2)
            status = core.state.instances["i-retry000001"].status

        async with opened_core(log_path) as core:
            view = instance_view(core.state, core.state.instances["i-retry000001"], 0)
            restored_attempts = core.state.instances[
                "i-retry000001"
            ].termination_attempts
            recorded: list[Record] = []
            core.subscribe(recorded.extend)
            reaper = IdleReaper(core, {"aws": backend})
            with anyio.fail_after(20):
                await reaper.terminate("i-retry000001")

        attempts = [
            r.event.attempt
            for r in recorded
            if isinstance(r.event, InstanceTerminationFailed)
        ]
        assert failures == [1, 2]
        assert status == "terminating"
        assert restored_attempts == 2
        assert view.status == "terminating"
        assert view.termination_attempts == 2
        assert "UnauthorizedOperation" in (view.reason or "")
        assert attempts == [3, 4, 5]
        assert isinstance(recorded[-1].event, InstanceTerminated)
        assert [i.state for i in await backend.list_tagged()] == ["terminated"]


def make_backend_like(backend: AwsBackend, endpoint_url: str) -> AwsBackend:
    """A second backend of the same daemon, as after a restart."""
    return AwsBackend(
        backend.config,
        daemon_id=backend.daemon_id,
        key_dir=backend.key_dir,
        labels=backend.labels,
    )


def _tags(params: dict[str, list[str]]) -> dict[str, str]:
    """Read the instance tags of a RunInstances form."""
    tags: dict[str, str] = {}
    prefix = "TagSpecification.1.Tag."
    for name, values in params.items():
        if name.startswith(prefix) and name.endswith(".Key"):
            number = name[len(prefix) : -len(".Key")]
            tags[values[0]] = params[f"{prefix}{number}.Value"][0]

    return tags


@asynccontextmanager
async def opened_core(path: Path) -> AsyncIterator[Core]:
    """Open the log at ``path`` and yield a Core with the state loaded from it."""
    event_log = await EventLog.open(path)
    try:
        yield Core(event_log, await load_state(event_log))
    finally:
        await event_log.close()


async def provision_and_remove(
    core: Core, backend: AwsBackend, instance_id: str, offer: Offer
) -> None:
    """Record an instance, create it on EC2, then request its termination."""
    stream = f"instance/{instance_id}"
    async with core.lock:
        await core.commit(
            [
                NewEvent(
                    stream,
                    InstanceRequested(instance_id, "aws-1", "gpus", offer, "off"),
                )
            ],
            DAEMON_ACTOR,
        )

    provisioned = await backend.create(instance_id, offer)
    async with core.lock:
        await core.commit(
            [
                NewEvent(
                    stream,
                    InstanceProvisioned(
                        instance_id, provisioned.resources, "", provisioned.backend_data
                    ),
                ),
                NewEvent(stream, InstanceTerminationRequested(instance_id, "removed")),
            ],
            DAEMON_ACTOR,
        )


async def terminate_until_failures(
    core: Core, backend: AwsBackend, count: int
) -> list[int]:
    """Run the reaper's termination until ``count`` failures are recorded, then
    stop it, as a daemon killed while retrying."""
    failures: list[int] = []
    done = anyio.Event()

    def on_commit(records: Any) -> None:
        for record in records:
            if isinstance(record.event, InstanceTerminationFailed):
                failures.append(record.event.attempt)
                if len(failures) >= count:
                    done.set()

    core.subscribe(on_commit)
    reaper = IdleReaper(core, {"aws": backend})
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(reaper.terminate, "i-retry000001")
        with anyio.fail_after(20):
            await done.wait()

        task_group.cancel_scope.cancel()

    return failures
