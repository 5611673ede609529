"""End to end: tasks, services and dev environments from YAML files, attach,
max_duration and retry, on the real daemon driven by the real CLI."""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dstackd.scheduler import restart_delay_seconds
from tests.conftest import BIN, DaemonProcess
from tests.dstackd.test_daemon_e2e import add_instance, run_view, wait_run_ended

# A small HTTP server: /health answers 200 once it has listened for a moment,
# and every other path answers 404.
SERVER_SCRIPT = """
import http.server, sys, time
started = time.monotonic()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = time.monotonic() - started > 0.3
        self.send_response(200 if self.path == "/health" and ready else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def write_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def records_of(daemon: DaemonProcess, type_name: str) -> list[dict[str, Any]]:
    return [r for r in daemon.events() if r["type"] == type_name]


def add_pooled_instance(daemon: DaemonProcess) -> dict[str, Any]:
    return add_instance(daemon, "--gpu", "A100:1", "--name", "pooled")


REUSE_RESOURCES = """
creation_policy: reuse
resources:
  cpu: 1
  memory: 1GB
  gpu: A100:1
"""


def assert_reused(daemon: DaemonProcess, pooled: dict[str, Any], run_name: str) -> None:
    run_id = run_view(daemon, run_name)["id"]
    claims = [
        r
        for r in records_of(daemon, "InstanceClaimed")
        if r["event"]["run_id"] == run_id
    ]
    assert claims, f"run {run_name} claimed no instance"
    assert {c["event"]["instance_id"] for c in claims} == {pooled["id"]}
    assert len(records_of(daemon, "InstanceRequested")) == 1


def run_on_terminal(
    args: list[str], env: dict[str, str], send: bytes = b"", timeout: float = 30
) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin, stdout and stderr."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        if send:
            os.write(master, send)

        while time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.1)
            if readable:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break

                if not chunk:
                    break

                output += chunk
            elif process.poll() is not None:
                break

        returncode = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

        os.close(master)

    return returncode, output.decode(errors="replace")


class TestTask:
    def test_task_file_reuses_pooled_instance(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        pooled = add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "task.yml",
            "type: task\nname: hello\n"
            'commands:\n  - echo "GPU=$CUDA_VISIBLE_DEVICES GREETING=$GREETING"\n'
            "  - pwd\n"
            "env:\n  GREETING: hi\n" + REUSE_RESOURCES,
        )

        result = daemon.ctl("apply", "-f", str(config))

        assert result.returncode == 0, result.stderr
        assert re.search(r"GPU=[01] GREETING=hi", result.stdout)
        assert str(short_tmp) in result.stdout
        assert run_view(daemon, "hello")["status"] == "done"
        assert_reused(daemon, pooled, "hello")

    def test_flags_override_file(self, daemon: DaemonProcess, short_tmp: Path) -> None:
        add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "task.yml",
            'type: task\nname: from-file\ncommands:\n  - echo "V=$V"\n'
            "env:\n  V: file\n" + REUSE_RESOURCES,
        )

        result = daemon.ctl(
            "run", "-f", str(config), "--name", "from-flag", "-e", "V=flag"
        )

        assert result.returncode == 0, result.stderr
        assert "V=flag" in result.stdout
        assert run_view(daemon, "from-flag")["status"] == "done"

    def test_invalid_file_names_file_field_and_line(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        config = write_file(
            short_tmp,
            "bad.yml",
            "type: task\ncommands:\n  - true\nresources:\n  gpu: A100:80XB\n",
        )
        before = len(daemon.events())

        result = daemon.ctl("apply", "-f", str(config))

        assert result.returncode == 2
        assert f"{config}:5: resources.gpu: invalid gpu 'A100:80XB'" in result.stderr
        assert len(daemon.events()) == before

    def test_profile_sets_pool_and_idle_duration(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        daemon.ctl_ok("pool", "create", "gpus")
        project = short_tmp / "project"
        (project / ".dstack").mkdir(parents=True)
        write_file(
            project / ".dstack",
            "profiles.yml",
            "profiles:\n  - name: quick\n    pool: gpus\n    idle_duration: 7m\n"
            "  - name: main\n    default: true\n    pool: default-pool\n",
        )
        config = write_file(
            project,
            "task.yml",
            'type: task\nname: profiled\ncommands: ["true"]\n'
            "resources:\n  cpu: 1\n  memory: 1GB\n",
        )

        daemon.ctl_ok("apply", "-f", str(config), "--profile", "quick", cwd=project)

        view = run_view(daemon, "profiled")
        requested = records_of(daemon, "InstanceRequested")
        assert view["pool"] == "gpus"
        assert requested[-1]["event"]["idle_duration"] == 7 * 60


class TestService:
    def test_service_is_running_once_probe_passes(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        pooled = add_pooled_instance(daemon)
        port = free_port()
        write_file(short_tmp, "server.py", SERVER_SCRIPT)
        config = write_file(
            short_tmp,
            "service.yml",
            f"type: service\nname: web\nport: {port}\n"
            "probe:\n  path: /health\n  interval: 1s\n  timeout: 1s\n"
            f"commands:\n  - exec {sys.executable} server.py {port}\n"
            + REUSE_RESOURCES,
        )

        daemon.ctl_ok("apply", "-d", "-f", str(config))
        ready = daemon.wait_for_event("RunReady")

        view = run_view(daemon, "web")
        url = f"http://127.0.0.1:{port}"
        assert ready["event"]["url"] == url
        assert view["status"] == "running"
        assert view["url"] == url
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
        assert_reused(daemon, pooled, "web")

        attach = daemon.ctl("attach", "web")
        assert attach.returncode == 0, attach.stderr
        assert f"127.0.0.1:{port}; no forwarding is needed" in attach.stderr

        daemon.ctl_ok("stop", "web")
        assert wait_run_ended(daemon, "web")["status"] == "stopped"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_failing_service_restarts_up_to_limit(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "crash.yml",
            "type: service\nname: crash\nport: 9\nmax_restarts: 2\n"
            "commands:\n  - exit 4\n" + REUSE_RESOURCES,
        )

        daemon.ctl_ok("apply", "-d", "-f", str(config))
        view = wait_run_ended(daemon, "crash")

        restarts = records_of(daemon, "RunRestarted")
        assert [r["event"]["restart"] for r in restarts] == [1, 2]
        assert [r["event"]["exit_status"] for r in restarts] == [4, 4]
        starts = records_of(daemon, "RunStarted")
        assert len(starts) == 3
        gaps = [
            datetime.fromisoformat(later["recorded_at"])
            - datetime.fromisoformat(earlier["recorded_at"])
            for earlier, later in zip(starts, starts[1:])
        ]
        assert gaps[0].total_seconds() >= restart_delay_seconds(1)
        assert gaps[1].total_seconds() >= restart_delay_seconds(2)
        assert view["status"] == "failed"
        assert view["exit_status"] == 4
        assert [i["status"] for i in daemon.ctl_json("pool", "ps")] == ["idle"]

    def test_service_on_taken_port_fails_with_reason(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_file(
            short_tmp,
            "impostor.yml",
            f"type: service\nname: impostor\nport: {port}\nmax_restarts: 0\n"
            "commands:\n  - sleep 300\n" + REUSE_RESOURCES,
        )

        try:
            daemon.ctl_ok("apply", "-d", "-f", str(config))
            view = wait_run_ended(daemon, "impostor")
        finally:
            taken.close()

        assert view["status"] == "failed"
        assert f"port {port} is already in use" in view["reason"]
        assert records_of(daemon, "RunReady") == []
        assert records_of(daemon, "RunStarted") == []


class TestDevEnvironment:
    def dev_environment(
        self, daemon: DaemonProcess, short_tmp: Path, extra: str = ""
    ) -> Path:
        workdir = short_tmp / "work"
        workdir.mkdir()
        return write_file(
            short_tmp,
            "dev.yml",
            "type: dev-environment\nname: dev\n"
            f"working_dir: {workdir}\n"
            "init:\n  - echo initialized > init-marker\n"
            "env:\n  - PROJECT=dstackd\n" + REUSE_RESOURCES + extra,
        )

    def test_attach_runs_command_with_run_environment(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        pooled = add_pooled_instance(daemon)
        config = self.dev_environment(daemon, short_tmp)
        daemon.ctl_ok("apply", "-d", "-f", str(config))
        daemon.wait_for_event("RunStarted")
        script = 'echo "GPUS=$CUDA_VISIBLE_DEVICES PROJECT=$PROJECT DIR=$(pwd)"; tty'

        code, output = run_on_terminal(
            [
                str(BIN / "dstackctl"),
                "--socket",
                str(daemon.socket),
                "attach",
                "dev",
                "--",
                "sh",
                "-c",
                script,
            ],
            daemon.env(),
        )

        assert code == 0, output
        assert re.search(r"GPUS=[01] PROJECT=dstackd", output), output
        assert f"DIR={short_tmp / 'work'}" in output
        assert "/dev/pts/" in output
        assert (short_tmp / "work" / "init-marker").read_text() == "initialized\n"
        assert run_view(daemon, "dev")["status"] == "running"
        assert_reused(daemon, pooled, "dev")

    def test_interactive_shell_exit_status_comes_back(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = self.dev_environment(daemon, short_tmp)
        daemon.ctl_ok("apply", "-d", "-f", str(config))
        daemon.wait_for_event("RunStarted")

        code, output = run_on_terminal(
            [
                str(BIN / "dstackctl"),
                "--socket",
                str(daemon.socket),
                "attach",
                "dev",
                "--",
                "sh",
            ],
            daemon.env(),
            send=b"echo VALUE=$PROJECT; exit 3\n",
        )

        assert code == 3, output
        assert "VALUE=dstackd" in output

    def test_stop_ends_attached_shell(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = self.dev_environment(daemon, short_tmp)
        daemon.ctl_ok("apply", "-d", "-f", str(config))
        daemon.wait_for_event("RunStarted")
        pid_file = short_tmp / "shell.pid"
        attached = subprocess.Popen(
            [
                str(BIN / "dstackctl"),
                "--socket",
                str(daemon.socket),
                "attach",
                "dev",
                "--",
                "sh",
                "-c",
                f"echo $$ > {pid_file}; exec sleep 300",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=daemon.env(),
        )
        try:
            deadline = time.monotonic() + 20
            while not (pid_file.exists() and pid_file.read_text().strip()):
                assert time.monotonic() < deadline, "the shell never started"
                time.sleep(0.02)

            daemon.ctl_ok("stop", "dev")
            attached.wait(timeout=20)
        finally:
            if attached.poll() is None:
                attached.kill()
                attached.wait()

        assert wait_run_ended(daemon, "dev")["status"] == "stopped"
        assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()

    def test_inactivity_duration_ends_unattached_environment(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = self.dev_environment(daemon, short_tmp, "inactivity_duration: 1s\n")

        daemon.ctl_ok("apply", "-d", "-f", str(config))
        finished = daemon.wait_for_event("RunFinished")

        assert finished["event"]["exit_status"] == 0
        assert "inactivity duration of 1s" in finished["event"]["reason"]
        assert run_view(daemon, "dev")["status"] == "done"


class TestMaxDuration:
    def test_max_duration_stops_run_with_reason(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "long.yml",
            "type: task\nname: long\nmax_duration: 1s\ncommands:\n  - sleep 60\n"
            + REUSE_RESOURCES,
        )

        daemon.ctl_ok("apply", "-d", "-f", str(config))
        exceeded = daemon.wait_for_event("RunMaxDurationExceeded")
        view = wait_run_ended(daemon, "long")

        started = records_of(daemon, "RunStarted")[0]
        assert exceeded["event"]["max_duration"] == 1
        assert exceeded["position"] > started["position"]
        assert view["status"] == "stopped"
        assert view["reason"] == "exceeded its max duration of 1s"

    def test_max_duration_rearmed_after_restart(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "long.yml",
            "type: task\nname: long\nmax_duration: 2s\ncommands:\n  - sleep 60\n"
            + REUSE_RESOURCES,
        )
        daemon.ctl_ok("apply", "-d", "-f", str(config))
        daemon.wait_for_event("RunStarted")

        daemon.kill(signal.SIGKILL)
        time.sleep(2.2)
        daemon.start()
        daemon.wait_for_event("RunMaxDurationExceeded", timeout=10)

        assert wait_run_ended(daemon, "long")["status"] == "stopped"


class TestRetry:
    def test_failed_run_is_retried_until_duration_runs_out(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_pooled_instance(daemon)
        config = write_file(
            short_tmp,
            "flaky.yml",
            "type: task\nname: flaky\ncommands:\n  - exit 2\n"
            "retry:\n  on_events: [error]\n  duration: 2s\n" + REUSE_RESOURCES,
        )

        result = daemon.ctl("apply", "-f", str(config))

        retried = records_of(daemon, "RunRetried")
        view = run_view(daemon, "flaky")
        assert result.returncode == 2
        assert len(retried) >= 1
        assert [r["event"]["attempt"] for r in retried] == list(
            range(2, len(retried) + 2)
        )
        assert {r["event"]["trigger"] for r in retried} == {"error"}
        assert len(records_of(daemon, "RunStarted")) == len(retried) + 1
        assert view["status"] == "failed"
        assert view["attempt"] == len(retried) + 1
        assert [a["exit_status"] for a in view["history"]] == [2] * len(retried)

    def test_run_waits_for_capacity_within_retry_duration(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        config = write_file(
            short_tmp,
            "wait.yml",
            "type: task\nname: patient\ncommands:\n  - echo placed\n"
            "retry:\n  on_events: [no-capacity]\n  duration: 1m\n" + REUSE_RESOURCES,
        )
        daemon.ctl_ok("apply", "-d", "-f", str(config))
        waiting = daemon.wait_for_event("RunRetried")

        pooled = add_pooled_instance(daemon)
        view = wait_run_ended(daemon, "patient")

        assert waiting["event"]["trigger"] == "no-capacity"
        assert view["status"] == "done"
        assert view["history"][0]["trigger"] == "no-capacity"
        assert_reused(daemon, pooled, "patient")

    def test_no_capacity_fails_when_duration_runs_out(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        config = write_file(
            short_tmp,
            "wait.yml",
            "type: task\nname: hopeless\ncommands:\n  - 'true'\n"
            "retry:\n  on_events: [no-capacity]\n  duration: 1s\n" + REUSE_RESOURCES,
        )

        daemon.ctl_ok("apply", "-d", "-f", str(config))
        view = wait_run_ended(daemon, "hopeless", timeout=10)

        assert view["status"] == "failed"
        assert "no capacity within the retry duration of 1s" in view["reason"]
        assert len(records_of(daemon, "RunRetried")) == 1


def test_ps_json_lists_run_fields(daemon: DaemonProcess, short_tmp: Path) -> None:
    add_pooled_instance(daemon)
    config = write_file(
        short_tmp,
        "ports.yml",
        "type: task\nname: ported\nports: [8080, 8081]\ncommands:\n  - 'true'\n"
        + REUSE_RESOURCES,
    )

    daemon.ctl_ok("apply", "-f", str(config))

    view = json.loads(daemon.ctl_ok("ps", "-a", "--json"))[0]
    assert view["ports"] == [8080, 8081]
    assert view["attempt"] == 1
    assert view["history"] == []
