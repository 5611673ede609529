"""End to end: the AWS backend through the real daemon and CLI, against moto's
server on 127.0.0.1 (through a fault proxy where a test injects faults)."""

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from dstackd.backends.aws import TAG_DAEMON_ID, TAG_INSTANCE_ID, TAG_POOL
from tests.conftest import BIN, DaemonProcess
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    aws_env,
    fault_proxy,
    moto_server,
)

AWS_CONFIG = """
[daemon]
stop_grace_seconds = 2

[local]
enabled = false

[aws]
regions = ["us-east-1"]
endpoint_url = "{endpoint_url}"
poll_interval_seconds = 0.1
running_timeout_seconds = 20
terminate_timeout_seconds = 5
reconcile_interval_seconds = 0.5
orphan_grace_seconds = 0
"""

ADD_AWS = ("pool", "add", "--backend", "aws", "--cpu", "2", "--memory", "4GB", "-y")


@pytest.fixture
def aws_daemon(
    aws_env: None, short_tmp: Path, fault_proxy: FaultProxy
) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp, AWS_CONFIG.format(endpoint_url=fault_proxy.url))
    process.start()
    yield process
    process.stop()


def tagged_instances(moto: MotoServer, instance_id: str) -> list[dict[str, Any]]:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)
    filters = [{"Name": f"tag:{TAG_INSTANCE_ID}", "Values": [instance_id]}]
    reservations = ec2.describe_instances(Filters=filters)["Reservations"]

    return [item for r in reservations for item in r["Instances"]]


def types_of(daemon: DaemonProcess) -> list[str]:
    return [record["type"] for record in daemon.events()]


def test_offers_add_and_confirmed_removal(
    aws_daemon: DaemonProcess, moto_server: MotoServer
) -> None:
    offers = aws_daemon.ctl_ok(
        "offer", "--backend", "aws", "--cpu", "2", "--memory", "4GB"
    )
    added = aws_daemon.ctl_ok(*ADD_AWS)
    instance = aws_daemon.ctl_json("pool", "ps")[0]
    launched = tagged_instances(moto_server, instance["id"])
    tags = {tag["Key"]: tag["Value"] for tag in launched[0]["Tags"]}

    aws_daemon.ctl_ok("pool", "remove", instance["name"])
    aws_daemon.wait_for_event("InstanceTerminated", instance_id=instance["id"])

    header, first_offer = offers.splitlines()[:2]
    assert header.split()[:4] == ["#", "BACKEND", "REGION", "INSTANCE"]
    assert first_offer.split()[:4] == ["1", "aws", "us-east-1", "t3.medium"]
    assert "t3.medium" in added
    assert instance["backend"] == "aws"
    assert instance["status"] == "idle"
    assert len(launched) == 1
    assert tags[TAG_POOL] == "default-pool"
    assert (
        tagged_instances(moto_server, instance["id"])[0]["State"]["Name"]
        == "terminated"
    )
    assert aws_daemon.ctl_json("pool", "ps") == []


def test_failing_terminations_show_in_pool_ps_until_confirmed(
    aws_daemon: DaemonProcess, fault_proxy: FaultProxy, moto_server: MotoServer
) -> None:
    aws_daemon.ctl_ok(*ADD_AWS)
    instance = aws_daemon.ctl_json("pool", "ps")[0]
    fault_proxy.fail("TerminateInstances", 2)

    aws_daemon.ctl_ok("pool", "remove", instance["name"])
    aws_daemon.wait_for_event("InstanceTerminationFailed", instance_id=instance["id"])
    table = aws_daemon.ctl_ok("pool", "ps")
    aws_daemon.wait_for_event("InstanceTerminated", instance_id=instance["id"])

    types = types_of(aws_daemon)
    assert (
        "terminating (1 failed attempt)" in table
        or "terminating (2 failed attempts)" in table
    )
    assert types.count("InstanceTerminationFailed") == 2
    assert types.index("InstanceTerminated") > types.index("InstanceTerminationFailed")
    assert (
        tagged_instances(moto_server, instance["id"])[0]["State"]["Name"]
        == "terminated"
    )


def test_daemon_killed_after_run_instances_adopts_on_restart(
    aws_daemon: DaemonProcess, fault_proxy: FaultProxy, moto_server: MotoServer
) -> None:
    fault_proxy.hold("RunInstances")
    client = subprocess.Popen(
        [str(BIN / "dstackctl"), "--socket", str(aws_daemon.socket), *ADD_AWS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=aws_daemon.env(),
    )
    try:
        assert fault_proxy.held.wait(timeout=30), "RunInstances never reached EC2"
        aws_daemon.kill(signal.SIGKILL)
    finally:
        client.kill()
        client.wait()
        fault_proxy.release()

    aws_daemon.start()
    requested = [r for r in aws_daemon.events() if r["type"] == "InstanceRequested"]
    instance_id = requested[0]["event"]["instance_id"]
    aws_daemon.wait_for_event("InstanceProvisioned", instance_id=instance_id)

    launched = tagged_instances(moto_server, instance_id)
    assert len(requested) == 1
    assert fault_proxy.count("RunInstances") == 1
    assert len(launched) == 1
    assert launched[0]["State"]["Name"] == "running"
    assert [i["status"] for i in aws_daemon.ctl_json("pool", "ps")] == ["idle"]


def test_reconciliation_terminates_an_orphan(
    aws_daemon: DaemonProcess, moto_server: MotoServer
) -> None:
    daemon_id = (aws_daemon.data_dir / "daemon_id").read_text().strip()
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_server.url)
    image = ec2.describe_images(Owners=["099720109477"])["Images"][0]["ImageId"]
    tags = [
        {"Key": TAG_DAEMON_ID, "Value": daemon_id},
        {"Key": TAG_INSTANCE_ID, "Value": "i-norecord0001"},
    ]

    ec2.run_instances(
        ImageId=image,
        InstanceType="t3.medium",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )

    deadline = time.monotonic() + 20
    states = [
        i["State"]["Name"] for i in tagged_instances(moto_server, "i-norecord0001")
    ]
    while states != ["terminated"] and time.monotonic() < deadline:
        time.sleep(0.1)
        states = [
            i["State"]["Name"] for i in tagged_instances(moto_server, "i-norecord0001")
        ]

    assert states == ["terminated"]
    assert "untracked_instances_terminating" in aws_daemon.log_text()
