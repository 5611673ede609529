"""Reconciliation against moto's server: adoption, orphans, leftovers, lost
instances and fresh ones that EC2 does not list yet."""

import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from dstackd.backends.aws import TAG_DAEMON_ID, TAG_INSTANCE_ID, AwsBackend
from dstackd.config import AwsConfig
from dstackd.core import Core
from dstackd.reconcile import Reconciler
from events.event_types import (
    InstanceClaimed,
    InstanceLost,
    InstanceProvisioningFailed,
    InstanceRequested,
    RunStarted,
)
from events.grammar import build_requirements
from events.model import DAEMON_ACTOR, Offer
from events.record import NewEvent, Record
from tests.dstackd.core_fixtures import open_core, record_instance, record_run
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    aws_env,
    fault_proxy,
    moto_server,
    ssh_root,
)

pytestmark = pytest.mark.usefixtures("aws_env")

ORPHAN_GRACE = 600.0
LOST_GRACE = 120.0


def make_backend(endpoint_url: str, key_dir: Path) -> AwsBackend:
    config = AwsConfig(
        endpoint_url=endpoint_url,
        poll_interval_seconds=0.05,
        running_timeout_seconds=10,
        terminate_timeout_seconds=2,
    )
    return AwsBackend(
        config, daemon_id="d-" + uuid.uuid4().hex[:12], key_dir=str(key_dir)
    )


def make_reconciler(core: Core, backend: AwsBackend, now: float) -> Reconciler:
    return Reconciler(
        core,
        backend,
        interval=60,
        orphan_grace=ORPHAN_GRACE,
        lost_grace=LOST_GRACE,
        clock=lambda: now,
    )


def ec2_client(moto: MotoServer) -> Any:
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)


def launch_tagged(
    moto: MotoServer, daemon_id: str, instance_id: str
) -> tuple[str, float]:
    """Launch an instance with this daemon's tags behind its back."""
    ec2 = ec2_client(moto)
    image = ec2.describe_images(Owners=["099720109477"])["Images"][0]["ImageId"]
    tags = [
        {"Key": TAG_DAEMON_ID, "Value": daemon_id},
        {"Key": TAG_INSTANCE_ID, "Value": instance_id},
    ]
    response = ec2.run_instances(
        ImageId=image,
        InstanceType="t3.medium",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    instance = response["Instances"][0]

    return instance["InstanceId"], instance["LaunchTime"].timestamp()


def ec2_state(moto: MotoServer, ec2_instance_id: str) -> str:
    reservations = ec2_client(moto).describe_instances(InstanceIds=[ec2_instance_id])
    return str(reservations["Reservations"][0]["Instances"][0]["State"]["Name"])


async def cheapest_offer(backend: AwsBackend) -> Offer:
    offers = await backend.list_offers(build_requirements(cpu="2", memory="4GB"))
    return offers[0]


async def test_intent_without_record_is_adopted_not_duplicated(
    fault_proxy: FaultProxy, moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(fault_proxy.url, ssh_root)
    offer = await cheapest_offer(backend)
    async with open_core(ssh_root) as core:
        async with core.lock:
            await core.commit(
                [
                    NewEvent(
                        "instance/i-intent000001",
                        InstanceRequested("i-intent000001", "aws-1", "p", offer, "off"),
                    )
                ],
                DAEMON_ACTOR,
            )

        # The daemon died after RunInstances: the instance exists, no record says so.
        ec2_id, launched_at = launch_tagged(
            moto_server, backend.daemon_id, "i-intent000001"
        )
        report = await make_reconciler(
            core, backend, launched_at + ORPHAN_GRACE * 2
        ).reconcile_once()
        provisioned = await backend.create("i-intent000001", offer)

    assert report.orphans_terminated == []
    assert report.leftovers_terminated == []
    assert provisioned.backend_data["ec2_instance_id"] == ec2_id
    assert fault_proxy.count("RunInstances") == 0
    assert ec2_state(moto_server, ec2_id) == "running"


async def test_orphan_is_terminated_after_grace_period(
    moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(moto_server.url, ssh_root)
    ec2_id, launched_at = launch_tagged(moto_server, backend.daemon_id, "i-unknown0001")
    async with open_core(ssh_root) as core:
        early = await make_reconciler(core, backend, launched_at + 10).reconcile_once()
        state_in_grace = ec2_state(moto_server, ec2_id)
        late = await make_reconciler(
            core, backend, launched_at + ORPHAN_GRACE + 1
        ).reconcile_once()

    assert early.orphans_in_grace == [ec2_id]
    assert state_in_grace == "running"
    assert late.orphans_terminated == [ec2_id]
    assert ec2_state(moto_server, ec2_id) == "terminated"


async def test_other_daemons_instances_are_left_alone(
    moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(moto_server.url, ssh_root)
    ec2_id, launched_at = launch_tagged(moto_server, "d-0123456789ab", "i-theirs00001")
    async with open_core(ssh_root) as core:
        report = await make_reconciler(
            core, backend, launched_at + ORPHAN_GRACE * 2
        ).reconcile_once()

    assert report.orphans_terminated == []
    assert ec2_state(moto_server, ec2_id) == "running"


async def test_instance_of_failed_record_is_terminated(
    moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(moto_server.url, ssh_root)
    async with open_core(ssh_root) as core:
        await record_instance(
            core, "i-failed00001", backend="aws", backend_data={}, provisioned=False
        )
        async with core.lock:
            await core.commit(
                [
                    NewEvent(
                        "instance/i-failed00001",
                        InstanceProvisioningFailed("i-failed00001", "timed out"),
                    )
                ],
                DAEMON_ACTOR,
            )

        ec2_id, launched_at = launch_tagged(
            moto_server, backend.daemon_id, "i-failed00001"
        )
        report = await make_reconciler(core, backend, launched_at).reconcile_once()

    assert report.leftovers_terminated == [ec2_id]
    assert ec2_state(moto_server, ec2_id) == "terminated"


async def test_instance_gone_from_ec2_is_lost_and_fails_its_run(
    moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(moto_server.url, ssh_root)
    provisioned = await backend.create("i-lost0000001", await cheapest_offer(backend))
    async with open_core(ssh_root) as core:
        await record_instance(
            core, "i-lost0000001", backend="aws", backend_data=provisioned.backend_data
        )
        await record_run(core, "r-onlost00001")
        async with core.lock:
            await core.commit(
                [
                    NewEvent(
                        "instance/i-lost0000001",
                        InstanceClaimed("i-lost0000001", "r-onlost00001"),
                    ),
                    NewEvent(
                        "run/r-onlost00001",
                        RunStarted("r-onlost00001", "i-lost0000001"),
                    ),
                ],
                DAEMON_ACTOR,
            )

        # A spot interruption, as far as the daemon can tell.
        ec2_client(moto_server).terminate_instances(
            InstanceIds=[provisioned.backend_data["ec2_instance_id"]]
        )
        recorded: list[Record] = []
        core.subscribe(recorded.extend)
        report = await make_reconciler(
            core, backend, time.time() + LOST_GRACE + 1
        ).reconcile_once()
        run = core.state.runs["r-onlost00001"]
        instance = core.state.instances["i-lost0000001"]

    lost = [r.event for r in recorded if isinstance(r.event, InstanceLost)]
    assert report.lost == ["i-lost0000001"]
    assert len(lost) == 1
    assert lost[0].run_id == "r-onlost00001"
    assert "as terminated" in lost[0].reason
    assert instance.status == "terminated"
    assert run.status == "failed"
    assert (run.reason or "").startswith("instance i-lost0000001 lost:")


async def test_fresh_instance_not_listed_yet_is_not_lost(
    moto_server: MotoServer, ssh_root: Path
) -> None:
    backend = make_backend(moto_server.url, ssh_root)
    data = {"ec2_instance_id": "i-0aaaaaaaaaaaaaaaa", "region": "us-east-1"}
    async with open_core(ssh_root) as core:
        await record_instance(core, "i-fresh000001", backend="aws", backend_data=data)
        provisioned_at = (
            core.state.instances["i-fresh000001"].provisioned_at or 0
        ) / 1e6

        fresh = await make_reconciler(
            core, backend, provisioned_at + 5
        ).reconcile_once()
        status_when_fresh = core.state.instances["i-fresh000001"].status
        stale = await make_reconciler(
            core, backend, provisioned_at + LOST_GRACE + 1
        ).reconcile_once()

    assert fresh.lost == []
    assert fresh.fresh_not_listed == ["i-fresh000001"]
    assert status_when_fresh == "idle"
    assert stale.lost == ["i-fresh000001"]
