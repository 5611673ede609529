"""The SSH backend: target grammar, resource detection, host keys, timeouts."""

import time
from pathlib import Path

import anyio
import pytest

from dstackd.backends.base import BackendError
from dstackd.backends.ssh import (
    SshBackend,
    SshError,
    SshTarget,
    parse_detection,
    parse_ssh_target,
)
from events.errors import InvalidValueError
from events.model import Gpu
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    HangingServer,
    SshServer,
    hanging_server,
    ssh_root,
    ssh_server,
)


@pytest.mark.parametrize(
    "text,user,host,port",
    [
        ("ubuntu@10.0.0.5", "ubuntu", "10.0.0.5", 22),
        ("ubuntu@gpu-box.example.com:2222", "ubuntu", "gpu-box.example.com", 2222),
        ("root@[::1]:2200", "root", "::1", 2200),
        ("deploy_user@host", "deploy_user", "host", 22),
        ("  a@b:1  ", "a", "b", 1),
    ],
)
def test_parse_ssh_target_accepts(text: str, user: str, host: str, port: int) -> None:
    target = parse_ssh_target(text, "/keys/id")

    assert target.user == user
    assert target.host == host
    assert target.port == port
    assert target.key_path == "/keys/id"


@pytest.mark.parametrize(
    "text",
    [
        "host",
        "@host",
        "user@",
        "user@host:",
        "user@host:70000",
        "user@host:0",
        "user@::1",
        "user@ho st",
        "user@host:22:22",
    ],
)
def test_parse_ssh_target_rejects(text: str) -> None:
    with pytest.raises(InvalidValueError, match="ssh"):
        parse_ssh_target(text)


def test_target_round_trips_through_backend_data() -> None:
    target = SshTarget("u", "h", 2022, "/k", "ssh-ed25519 AAAA")

    assert SshTarget.from_backend_data(target.to_backend_data()) == target


def test_backend_data_without_host_is_rejected() -> None:
    with pytest.raises(BackendError, match="expected host, port and user"):
        SshTarget.from_backend_data({"user": "u"})


def test_parse_detection_reads_every_line() -> None:
    output = (
        "cpus=16\nmemory_kb=65802240\ndisk_free_kb=104857600\n"
        "gpu=NVIDIA A100-SXM4-80GB, 81920\ngpu=NVIDIA A100-SXM4-80GB, 81920\n"
    )

    resources = parse_detection(output)

    assert resources.cpus == 16
    assert resources.memory_gb == 62.7
    assert resources.disk_gb == 100.0
    assert resources.gpus == (Gpu("A100", 80.0, 0), Gpu("A100", 80.0, 1))


@pytest.mark.parametrize(
    "output,problem",
    [
        ("memory_kb=100\n", "cpus"),
        ("cpus=four\nmemory_kb=100\n", "four"),
        ("cpus=2\nmemory_kb=100\ngpu=T4\n", "NAME, MEMORY_MIB"),
    ],
)
def test_parse_detection_rejects_bad_output(output: str, problem: str) -> None:
    with pytest.raises(BackendError, match=problem):
        parse_detection(output)


async def test_detect_reads_host_resources_and_key(ssh_server: SshServer) -> None:
    target = SshTarget.from_backend_data(ssh_server.backend_data())

    resources, host_key = await SshBackend().detect(target)

    assert resources.cpus >= 1
    assert resources.memory_gb > 0
    assert resources.disk_gb > 0
    assert host_key.startswith("ssh-ed25519 ")


async def test_pinned_host_key_rejects_another_host(ssh_server: SshServer) -> None:
    import asyncssh

    other_key = asyncssh.generate_private_key("ssh-ed25519")
    pinned = other_key.export_public_key().decode().strip()
    data = {**ssh_server.backend_data(), "host_key": pinned}

    with pytest.raises(SshError, match="host key differs"):
        await SshBackend().check(SshTarget.from_backend_data(data), timeout=5)


async def test_pinned_host_key_accepts_same_host(ssh_server: SshServer) -> None:
    backend = SshBackend()
    target = SshTarget.from_backend_data(ssh_server.backend_data())
    _, host_key = await backend.detect(target)
    data = {**ssh_server.backend_data(), "host_key": host_key}

    await backend.check(SshTarget.from_backend_data(data), timeout=5)


async def test_wrong_key_fails_login(ssh_server: SshServer, ssh_root: Path) -> None:
    import asyncssh

    stranger = ssh_root / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    data = {**ssh_server.backend_data(), "key_path": str(stranger)}

    with pytest.raises(SshError, match="connecting to"):
        await SshBackend().check(SshTarget.from_backend_data(data), timeout=5)


async def test_check_of_hanging_host_times_out(
    hanging_server: HangingServer, ssh_server: SshServer
) -> None:
    data = hanging_server.backend_data(str(ssh_server.key_path))
    started = time.monotonic()

    with anyio.fail_after(10):
        with pytest.raises(SshError, match="timed out after 1s"):
            await SshBackend().check(SshTarget.from_backend_data(data), timeout=1)

    assert time.monotonic() - started < 3
