"""End to end: SSH hosts added and used through the real daemon and CLI."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    HangingServer,
    SshServer,
    hanging_server,
    ssh_root,
    ssh_server,
)

SSH_CONFIG = """
[daemon]
stop_grace_seconds = 2

[local]
cpus = 4
memory = "8GB"
disk = "100GB"
gpus = []

[ssh]
connect_timeout_seconds = 2
keepalive_interval_seconds = 0.5
health_check_interval_seconds = 0.5
health_check_timeout_seconds = 1
"""

RUN_ON_SSH = ("run", "--backend", "ssh", "--cpu", "1..", "--memory", "1GB..")


@pytest.fixture
def ssh_daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp, SSH_CONFIG)
    process.start()
    yield process
    process.stop_active_runs()
    process.stop()


def add_host(daemon: DaemonProcess, server: SshServer, *args: str) -> dict[str, object]:
    daemon.ctl_ok(
        "pool", "add", "--ssh", server.address, "-i", str(server.key_path), *args
    )
    instances = [i for i in daemon.ctl_json("pool", "ps") if i["backend"] == "ssh"]
    assert len(instances) == 1

    return instances[0]


def events_of(daemon: DaemonProcess, type_name: str) -> list[dict[str, object]]:
    return [record for record in daemon.events() if record["type"] == type_name]


def test_pool_add_ssh_records_detected_host(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    instance = add_host(ssh_daemon, ssh_server)

    provisioned = events_of(ssh_daemon, "InstanceProvisioned")[0]["event"]
    log_text = json.dumps(ssh_daemon.events())
    assert instance["status"] == "idle"
    assert instance["idle_duration"] == "off"
    assert instance["region"] == "127.0.0.1"
    assert provisioned["backend_data"]["key_path"] == str(ssh_server.key_path)  # type: ignore[index]
    assert provisioned["backend_data"]["host_key"].startswith("ssh-ed25519 ")  # type: ignore[index]
    assert "PRIVATE KEY" not in log_text
    assert "PRIVATE KEY" not in ssh_daemon.log_text()


def test_task_runs_twice_on_the_same_host(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    add_host(ssh_daemon, ssh_server)

    first = ssh_daemon.ctl(
        *RUN_ON_SSH, "--name", "first", "--", "sh", "-c", 'echo "home=$HOME"; exit 3'
    )
    second = ssh_daemon.ctl(*RUN_ON_SSH, "--name", "second", "--", "echo", "again")

    claims = events_of(ssh_daemon, "InstanceClaimed")
    assert first.returncode == 3
    assert first.stdout == f"home={ssh_server.home}\n"
    assert second.returncode == 0
    assert second.stdout == "again\n"
    assert len(events_of(ssh_daemon, "InstanceRequested")) == 1
    assert len(claims) == 2
    assert claims[0]["event"]["instance_id"] == claims[1]["event"]["instance_id"]  # type: ignore[index]
    assert [i["status"] for i in ssh_daemon.ctl_json("pool", "ps")] == ["idle"]


def test_removing_host_only_forgets_it(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    instance = add_host(ssh_daemon, ssh_server)

    ssh_daemon.ctl_ok("pool", "remove", str(instance["name"]))
    ssh_daemon.wait_for_event("InstanceTerminated", instance_id=instance["id"])

    assert ssh_daemon.ctl_json("pool", "ps") == []
    assert ssh_server.process is not None and ssh_server.process.poll() is None
    add_host(ssh_daemon, ssh_server)


def test_same_host_cannot_join_two_pools(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    add_host(ssh_daemon, ssh_server)
    ssh_daemon.ctl_ok("pool", "create", "other")

    result = ssh_daemon.ctl(
        "pool",
        "add",
        "--pool",
        "other",
        "--ssh",
        ssh_server.address,
        "-i",
        str(ssh_server.key_path),
    )

    assert result.returncode == 1
    assert "is already instance ssh-1 in pool default-pool" in result.stderr


def test_host_hanging_at_connect_fails_pool_add(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, hanging_server: HangingServer
) -> None:
    started = time.monotonic()

    result = ssh_daemon.ctl(
        "pool",
        "add",
        "--ssh",
        f"nobody@127.0.0.1:{hanging_server.port}",
        "-i",
        str(ssh_server.key_path),
    )

    assert result.returncode == 1
    assert "timed out after 2s" in result.stderr
    assert time.monotonic() - started < 10
    assert ssh_daemon.ctl_json("pool", "ps") == []


def test_unreachable_host_gets_no_runs_until_it_answers(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    instance = add_host(ssh_daemon, ssh_server)

    ssh_server.pause()
    try:
        ssh_daemon.wait_for_event("InstanceUnreachable", instance_id=instance["id"])
        listed = ssh_daemon.ctl_json("pool", "ps")
        table = ssh_daemon.ctl_ok("pool", "ps")
        refused = ssh_daemon.ctl(*RUN_ON_SSH, "--reuse", "--", "true")
    finally:
        ssh_server.resume()

    ssh_daemon.wait_for_event("InstanceReachable", instance_id=instance["id"])
    accepted = ssh_daemon.ctl(*RUN_ON_SSH, "--reuse", "--", "echo", "back")

    assert listed[0]["reachable"] is False
    assert listed[0]["status"] == "idle"
    assert "idle (unreachable)" in table
    assert refused.returncode == 1
    assert "unreachable" in refused.stderr
    assert accepted.returncode == 0
    assert accepted.stdout == "back\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (("--ssh", "{host}", "--ssh", "{host}"), "is given twice"),
        (
            ("--ssh", "{host}", "--ssh", "other@127.0.0.1:1", "--name", "box"),
            "a name applies to one host",
        ),
        (("--ssh", "no-user-here"), "invalid ssh host 'no-user-here'"),
        (("--ssh", "{host}", "--idle-duration", "soon"), "invalid idle duration"),
    ],
    ids=["twice", "name-for-two", "no-user", "idle-duration"],
)
def test_invalid_pool_add_ssh_is_rejected(
    ssh_daemon: DaemonProcess,
    ssh_server: SshServer,
    args: tuple[str, ...],
    message: str,
) -> None:
    filled = [arg.format(host=ssh_server.address) for arg in args]

    result = ssh_daemon.ctl("pool", "add", *filled, "-i", str(ssh_server.key_path))

    assert result.returncode == 2
    assert message in result.stderr
    assert ssh_daemon.ctl_json("pool", "ps") == []


def test_identity_file_without_ssh_is_a_usage_error(
    ssh_daemon: DaemonProcess, ssh_server: SshServer
) -> None:
    result = ssh_daemon.ctl("pool", "add", "-y", "-i", str(ssh_server.key_path))

    assert result.returncode == 2
    assert "applies only with --ssh" in result.stderr


@pytest.mark.parametrize("alias", ["localhost", "LOCALHOST"])
def test_same_host_under_another_address_is_rejected(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, alias: str
) -> None:
    add_host(ssh_daemon, ssh_server)
    user, _, host_port = ssh_server.address.partition("@")
    port = host_port.rsplit(":", 1)[1]

    result = ssh_daemon.ctl(
        "pool", "add", "--ssh", f"{user}@{alias}:{port}", "-i", str(ssh_server.key_path)
    )

    assert result.returncode == 1
    assert "same SSH host key as instance ssh-1" in result.stderr
    instances = [i for i in ssh_daemon.ctl_json("pool", "ps") if i["backend"] == "ssh"]
    assert [i["name"] for i in instances] == ["ssh-1"]
