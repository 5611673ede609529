"""End to end: a member of the socket's group acts only on its own runs and keys."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess
from tests.dstackd.test_pools_e2e import wait_running

GROUP_CONFIG = """
[daemon]
socket_group = "nogroup"
stop_grace_seconds = 2

[local]
cpus = 4
memory = "8GB"
"""

# Runs as the unprivileged user with the system Python, which that user can
# execute, and sends one HTTP request on the daemon's socket.
REQUEST_SCRIPT = """
import json, socket, sys
method, path, body = sys.argv[2], sys.argv[3], sys.argv[4].encode()
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect(sys.argv[1])
sock.sendall(
    f"{method} {path} HTTP/1.1\\r\\nHost: d\\r\\nContent-Type: application/json\\r\\n"
    f"Content-Length: {len(body)}\\r\\nConnection: close\\r\\n\\r\\n".encode() + body
)
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(data.split(b" ", 2)[1].decode())
print(data.partition(b"\\r\\n\\r\\n")[2].decode(errors="replace"))
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/sbin/runuser").exists(),
    reason="needs root and runuser to act as another user",
)


def as_nobody(daemon: DaemonProcess, method: str, path: str, body: str = "") -> tuple[int, str]:
    result = subprocess.run(
        ["/usr/sbin/runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c",
         REQUEST_SCRIPT, str(daemon.socket), method, path, body],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    status, _, text = result.stdout.partition("\n")
    return int(status), text


@pytest.fixture
def shared_daemon(short_tmp: Path):  # type: ignore[no-untyped-def]
    os.chmod(short_tmp, 0o755)
    daemon = DaemonProcess(short_tmp, config=GROUP_CONFIG)
    daemon.start()
    yield daemon
    daemon.stop_active_runs()
    daemon.stop()


def test_group_member_cannot_read_or_stop_others_runs(shared_daemon: DaemonProcess) -> None:
    daemon = shared_daemon
    daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "rootjob",
                  "-e", "ROOT_TOKEN=not-for-nobody", "--", "sh", "-c",
                  'echo "token=$ROOT_TOKEN"; sleep 300')
    wait_running(daemon, "rootjob")

    logs_status, logs_text = as_nobody(daemon, "GET", "/v1/runs/rootjob/logs")
    stop_status, stop_text = as_nobody(daemon, "POST", "/v1/runs/rootjob/stop", "{}")

    assert logs_status == 403
    assert "not-for-nobody" not in logs_text
    assert json.loads(logs_text)["code"] == "forbidden"
    assert stop_status == 403
    assert "uid 65534" in json.loads(stop_text)["message"]
    runs = daemon.ctl_json("ps")
    assert [(r["name"], r["status"]) for r in runs] == [("rootjob", "running")]
    assert "RunStopRequested" not in [r["type"] for r in daemon.events()]


@pytest.mark.parametrize("key_path", ["/root/.bashrc", "/root/no-such-key", None])
def test_group_member_cannot_use_daemon_keys(
    shared_daemon: DaemonProcess, key_path: str | None
) -> None:
    body: dict[str, object] = {"hosts": ["someone@127.0.0.1:1"]}
    if key_path is not None:
        body["identity_file"] = key_path

    status, text = as_nobody(shared_daemon, "POST", "/v1/instances/ssh", json.dumps(body))

    assert status == 403
    message = json.loads(text)["message"]
    assert "uid 65534" in message or "-i" in message
    assert "not found" not in message
