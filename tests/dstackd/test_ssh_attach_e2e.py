"""End to end: dev environments, attach and port forwards on an SSH host.

The real daemon and CLI run against the asyncssh test server on 127.0.0.1,
and ``dstackctl attach`` logs in with the OpenSSH client.
"""

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, DaemonProcess
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    SshServer,
    free_port,
    ssh_root,
    ssh_server,
)
from tests.dstackd.test_daemon_e2e import run_view, wait_run_ended
from tests.dstackd.test_run_config_e2e import SERVER_SCRIPT, run_on_terminal
from tests.dstackd.test_ssh_e2e import SSH_CONFIG, add_host

pytestmark = pytest.mark.skipif(
    shutil.which("ssh") is None, reason="the OpenSSH client is not installed"
)

ON_SSH_HOST = """
creation_policy: reuse
backends: [ssh]
resources:
  cpu: 1..
  memory: 1GB..
"""


@pytest.fixture
def ssh_daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp, SSH_CONFIG)
    process.start()
    yield process
    process.stop_active_runs()
    process.stop()


def wait_run(
    daemon: DaemonProcess, name: str, field: str, timeout: float = 20
) -> dict[str, object]:
    """Poll ``ps`` until run ``name`` has a true ``field``; return its view."""
    deadline = time.monotonic() + timeout
    while True:
        view = run_view(daemon, name)
        if view.get(field):
            return view

        assert time.monotonic() < deadline, f"run {name} has no {field}: {view}"
        time.sleep(0.05)


def ctl_argv(daemon: DaemonProcess, *args: str) -> list[str]:
    return [str(BIN / "dstackctl"), "--socket", str(daemon.socket), *args]


def apply_dev_environment(
    daemon: DaemonProcess, server: SshServer, directory: Path, extra: str = ""
) -> Path:
    """Add the host and start a dev environment on it; return its working dir."""
    add_host(daemon, server)
    workdir = directory / "work"
    workdir.mkdir()
    config = directory / "dev.yml"
    config.write_text(
        "type: dev-environment\nname: dev\n"
        f"working_dir: {workdir}\n"
        "init:\n  - echo initialized > init-marker\n"
        "env:\n  - PROJECT=dstackd\n" + ON_SSH_HOST + extra
    )
    daemon.ctl_ok("apply", "-d", "-f", str(config))
    wait_run(daemon, "dev", "started_at")

    return workdir


def test_attach_runs_command_in_run_environment(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, short_tmp: Path
) -> None:
    workdir = apply_dev_environment(ssh_daemon, ssh_server, short_tmp)
    script = 'echo "PROJECT=$PROJECT DIR=$(pwd)"; tty'

    code, output = run_on_terminal(
        ctl_argv(ssh_daemon, "attach", "dev", "--", "sh", "-c", script),
        ssh_daemon.env(),
    )

    assert code == 0, output
    assert "PROJECT=dstackd" in output
    assert f"DIR={workdir}" in output
    assert "/dev/pts/" in output
    assert (workdir / "init-marker").read_text() == "initialized\n"
    assert run_view(ssh_daemon, "dev")["status"] == "running"
    assert run_view(ssh_daemon, "dev")["instance"] == "ssh-1"


def test_interactive_shell_exit_status_comes_back(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, short_tmp: Path
) -> None:
    apply_dev_environment(ssh_daemon, ssh_server, short_tmp)

    code, output = run_on_terminal(
        ctl_argv(ssh_daemon, "attach", "dev", "--", "sh"),
        ssh_daemon.env(),
        send=b"echo VALUE=$PROJECT; exit 3\n",
    )

    assert code == 3, output
    assert "VALUE=dstackd" in output


def test_stop_ends_attached_shell(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, short_tmp: Path
) -> None:
    apply_dev_environment(ssh_daemon, ssh_server, short_tmp)
    pid_file = short_tmp / "shell.pid"
    attached = subprocess.Popen(
        ctl_argv(
            ssh_daemon,
            "attach",
            "dev",
            "--",
            "sh",
            "-c",
            f"echo $$ > {pid_file}; exec sleep 300",
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ssh_daemon.env(),
    )
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the shell never started"
            time.sleep(0.02)

        ssh_daemon.ctl_ok("stop", "dev")
        attached.wait(timeout=20)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()

    assert wait_run_ended(ssh_daemon, "dev")["status"] == "stopped"
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()


def test_inactivity_counts_remote_attach(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, short_tmp: Path
) -> None:
    apply_dev_environment(
        ssh_daemon, ssh_server, short_tmp, "inactivity_duration: 3s\n"
    )

    attach = subprocess.run(
        ctl_argv(ssh_daemon, "attach", "dev", "--", "sleep", "5"),
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=ssh_daemon.env(),
        timeout=30,
    )
    status_after_attach = run_view(ssh_daemon, "dev")["status"]
    finished = wait_run_ended(ssh_daemon, "dev")

    assert attach.returncode == 0, attach.stderr
    assert status_after_attach == "running"
    assert finished["status"] == "done"
    assert finished["exit_status"] == 0
    assert "inactivity duration of 3s" in str(finished["reason"])


def test_service_port_is_forwarded(
    ssh_daemon: DaemonProcess, ssh_server: SshServer, short_tmp: Path
) -> None:
    add_host(ssh_daemon, ssh_server)
    remote_port = free_port()
    local_port = free_port()
    (short_tmp / "server.py").write_text(SERVER_SCRIPT)
    config = short_tmp / "service.yml"
    config.write_text(
        f"type: service\nname: web\nport: {remote_port}\nworking_dir: {short_tmp}\n"
        "probe:\n  path: /health\n  interval: 1s\n  timeout: 1s\n"
        f"commands:\n  - exec {sys.executable} server.py {remote_port}\n" + ON_SSH_HOST
    )
    ssh_daemon.ctl_ok("apply", "-d", "-f", str(config))
    ready = wait_run(ssh_daemon, "web", "url")

    attached = subprocess.Popen(
        ctl_argv(ssh_daemon, "attach", "-p", f"{local_port}:{remote_port}", "web"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ssh_daemon.env(),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", local_port), timeout=1).close()
                break
            except OSError:
                assert attached.poll() is None, attached.communicate()
                assert time.monotonic() < deadline, "the forward never opened"
                time.sleep(0.05)

        url = f"http://127.0.0.1:{local_port}/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
            body = response.read()
    finally:
        attached.send_signal(signal.SIGINT)
        _, stderr = attached.communicate(timeout=20)

    assert ready["url"] == f"http://127.0.0.1:{remote_port}"
    assert status == 200
    assert body == b"ok"
    assert attached.returncode == 0, stderr
    assert f"forwarded to 127.0.0.1:{local_port}" in stderr
    assert run_view(ssh_daemon, "web")["instance"] == "ssh-1"
