"""End to end: the real daemon process on a real socket, driven by the real CLI."""

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess


def add_instance(daemon: DaemonProcess, *args: str) -> dict[str, Any]:
    """Add a 1-CPU, 1GB local instance and return it as ``pool ps`` shows it."""
    before = {i["id"] for i in daemon.ctl_json("pool", "ps", "-a")}
    daemon.ctl_ok("pool", "add", "-y", "--cpu", "1", "--memory", "1GB", *args)
    added = [i for i in daemon.ctl_json("pool", "ps", "-a") if i["id"] not in before]
    assert len(added) == 1
    return added[0]


def event_types(daemon: DaemonProcess) -> list[str]:
    return [record["type"] for record in daemon.events()]


def run_view(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    runs = daemon.ctl_json("ps", "-a")
    return next(run for run in runs if run["name"] == name)


def wait_run_ended(daemon: DaemonProcess, name: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = run_view(daemon, name)
        # "starting" is a service that is up but not yet ready.
        if view["status"] not in ("submitted", "provisioning", "starting", "running"):
            return view

        time.sleep(0.05)

    raise AssertionError(f"run {name} did not end within {timeout}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False

    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


class TestReuse:
    def test_second_run_reuses_first_instance(self, daemon: DaemonProcess) -> None:
        add_instance(daemon)

        daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "first", "--", "true")
        daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "second", "--", "true")

        records = daemon.events()
        requested = [r for r in records if r["type"] == "InstanceRequested"]
        claims = [r for r in records if r["type"] == "InstanceClaimed"]
        assert len(requested) == 1
        assert len(claims) == 2
        assert claims[0]["event"]["instance_id"] == claims[1]["event"]["instance_id"]
        assert claims[0]["event"]["instance_id"] == requested[0]["event"]["instance_id"]

    def test_run_without_idle_instance_provisions_one(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "cold", "--", "true")

        records = daemon.events()
        requested = [r for r in records if r["type"] == "InstanceRequested"]
        assert len(requested) == 1
        assert requested[0]["event"]["idle_duration"] == 300
        instances = daemon.ctl_json("pool", "ps")
        assert [i["status"] for i in instances] == ["idle"]

    def test_run_without_gpu_avoids_gpu_instance(self, daemon: DaemonProcess) -> None:
        gpu_instance = add_instance(daemon, "--gpu", "A100:1", "--name", "gpu-box")
        plain_instance = add_instance(daemon, "--name", "plain-box")

        daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "cpu-job", "--", "true")

        assert gpu_instance["name"] == "gpu-box"
        assert run_view(daemon, "cpu-job")["instance"] == plain_instance["name"]


class TestConcurrency:
    def test_fifty_runs_on_five_instances_never_share(
        self, daemon: DaemonProcess
    ) -> None:
        for index in range(5):
            add_instance(daemon, "--name", f"box-{index}")

        errors: list[str] = []

        def submit(index: int) -> None:
            result = daemon.ctl(
                "run", "-d", "--reuse", "--cpu", "1", "--memory", "1GB",
                "--name", f"job-{index}", "--", "sh", "-c", "sleep 0.05",
            )
            if result.returncode != 0:
                errors.append(result.stderr)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()

        for thread in threads:
            thread.join(timeout=120)

        assert errors == []
        for index in range(50):
            assert wait_run_ended(daemon, f"job-{index}", timeout=120)["status"] == "done"

        holder: dict[str, str | None] = {}
        for record in daemon.events():
            event = record["event"]
            if record["type"] == "InstanceClaimed":
                assert holder.get(event["instance_id"]) is None, record
                holder[event["instance_id"]] = event["run_id"]
            elif record["type"] == "InstanceReleased":
                assert holder.get(event["instance_id"]) == event["run_id"], record
                holder[event["instance_id"]] = None

        instances = daemon.ctl_json("pool", "ps")
        assert len(instances) == 5
        assert {i["status"] for i in instances} == {"idle"}
        assert Counter(r["type"] for r in daemon.events())["InstanceRequested"] == 5


class TestRunOutcomes:
    def test_exit_code_and_output_come_through(self, daemon: DaemonProcess) -> None:
        add_instance(daemon)

        result = daemon.ctl(
            "run", "--cpu", "1", "--memory", "1GB", "--", "sh", "-c", "echo hello; exit 3"
        )

        assert result.returncode == 3
        assert "hello" in result.stdout

    @pytest.mark.parametrize("command,status", [("true", "done"), ("false", "failed")])
    def test_instance_idle_after_run_ends(
        self, daemon: DaemonProcess, command: str, status: str
    ) -> None:
        add_instance(daemon)

        daemon.ctl("run", "--cpu", "1", "--memory", "1GB", "--name", "job", "--", command)

        assert wait_run_ended(daemon, "job")["status"] == status
        assert [i["status"] for i in daemon.ctl_json("pool", "ps")] == ["idle"]

    def test_stop_kills_grandchildren(self, daemon: DaemonProcess, short_tmp: Path) -> None:
        add_instance(daemon)
        pid_file = short_tmp / "grandchild.pid"
        script = f"sleep 300 & echo $! > {pid_file}; wait"

        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "long",
                      "--", "sh", "-c", script)
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the run never wrote its child's pid"
            time.sleep(0.02)

        grandchild = int(pid_file.read_text())
        assert pid_alive(grandchild)
        daemon.ctl_ok("stop", "long")

        view = wait_run_ended(daemon, "long")
        assert view["status"] == "stopped"
        assert not pid_alive(grandchild)
        assert [i["status"] for i in daemon.ctl_json("pool", "ps")] == ["idle"]


class TestIdleExpiry:
    def test_short_idle_duration_terminates_instance(self, daemon: DaemonProcess) -> None:
        instance = add_instance(daemon, "--idle-duration", "1s")

        record = daemon.wait_for_event("InstanceTerminated", instance_id=instance["id"])

        expired = [r for r in daemon.events() if r["type"] == "InstanceIdleExpired"]
        assert len(expired) == 1
        assert expired[0]["position"] < record["position"]
        assert expired[0]["event"]["idle_duration"] == 1

    def test_zero_expires_at_once_and_off_never(self, daemon: DaemonProcess) -> None:
        kept = add_instance(daemon, "--idle-duration", "off", "--name", "kept")
        gone = add_instance(daemon, "--idle-duration", "0", "--name", "gone")

        daemon.wait_for_event("InstanceTerminated", instance_id=gone["id"])
        timed = add_instance(daemon, "--idle-duration", "1s", "--name", "timed")
        daemon.wait_for_event("InstanceTerminated", instance_id=timed["id"])

        statuses = {i["name"]: i["status"] for i in daemon.ctl_json("pool", "ps", "-a")}
        assert statuses["kept"] == "idle"
        assert statuses["gone"] == "terminated"
        assert kept["idle_duration"] == "off"

    def test_restart_after_deadline_terminates_at_once(
        self, daemon: DaemonProcess
    ) -> None:
        instance = add_instance(daemon, "--idle-duration", "2s")
        deadline = time.time() + 2

        daemon.kill(signal.SIGKILL)
        while time.time() < deadline + 0.2:
            time.sleep(0.05)
        daemon.start()

        record = daemon.wait_for_event("InstanceTerminated", timeout=5, instance_id=instance["id"])
        assert record["type"] == "InstanceTerminated"


class TestRestart:
    def test_run_survives_daemon_kill(self, daemon: DaemonProcess, short_tmp: Path) -> None:
        add_instance(daemon)
        go = short_tmp / "go"
        script = f"while [ ! -e {go} ]; do sleep 0.02; done; exit 7"
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "survivor",
                      "--", "sh", "-c", script)
        daemon.wait_for_event("RunStarted")

        daemon.kill(signal.SIGKILL)
        daemon.start()
        assert run_view(daemon, "survivor")["status"] == "running"
        go.touch()

        view = wait_run_ended(daemon, "survivor")
        assert view["status"] == "failed"
        assert view["exit_status"] == 7

    def test_run_ending_while_daemon_down_keeps_exit_status(
        self, daemon: DaemonProcess, short_tmp: Path
    ) -> None:
        add_instance(daemon)
        go = short_tmp / "go"
        script = f"while [ ! -e {go} ]; do sleep 0.02; done; exit 5"
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "ended",
                      "--", "sh", "-c", script)
        daemon.wait_for_event("RunStarted")
        run_id = run_view(daemon, "ended")["id"]

        daemon.kill(signal.SIGKILL)
        go.touch()
        status_file = daemon.data_dir / "runs" / run_id / "exit_status"
        deadline = time.monotonic() + 20
        while not status_file.exists():
            assert time.monotonic() < deadline, "the supervisor wrote no exit status"
            time.sleep(0.02)
        daemon.start()

        view = wait_run_ended(daemon, "ended")
        assert view["exit_status"] == 5
        assert [i["status"] for i in daemon.ctl_json("pool", "ps")] == ["idle"]
