"""End to end: pools, instance removal, GPUs, callers and secrets, with the real daemon."""

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, DaemonProcess
from tests.dstackd.test_daemon_e2e import add_instance, run_view, wait_run_ended


def wait_running(daemon: DaemonProcess, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while run_view(daemon, name)["status"] != "running":
        assert time.monotonic() < deadline, f"run {name} did not start"
        time.sleep(0.02)


class TestPools:
    def test_first_pool_created_becomes_default(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "create", "alpha")
        daemon.ctl_ok("pool", "create", "beta")

        pools = {pool["name"]: pool for pool in daemon.ctl_json("pool", "list")}

        assert pools["alpha"]["default"] is True
        assert pools["beta"]["default"] is False

    def test_set_default_routes_new_runs(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "create", "alpha")
        daemon.ctl_ok("pool", "create", "beta")
        daemon.ctl_ok("pool", "set-default", "beta")

        daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "job", "--", "true")

        assert run_view(daemon, "job")["pool"] == "beta"

    def test_delete_refused_with_live_instances(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "create", "alpha")
        add_instance(daemon, "--pool", "alpha")

        result = daemon.ctl("pool", "delete", "alpha")

        assert result.returncode == 1
        assert "--force" in result.stderr
        assert [p["name"] for p in daemon.ctl_json("pool", "list")] == ["alpha"]

    def test_forced_delete_terminates_instances_first(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "create", "alpha")
        instance = add_instance(daemon, "--pool", "alpha")

        daemon.ctl_ok("pool", "delete", "--force", "alpha")

        types = [r["type"] for r in daemon.events()]
        assert types.index("InstanceTerminated") < types.index("PoolDeleted")
        statuses = {i["id"]: i["status"] for i in daemon.ctl_json("pool", "ps", "-a")}
        assert statuses[instance["id"]] == "terminated"


class TestRemove:
    def test_busy_instance_needs_force(self, daemon: DaemonProcess) -> None:
        instance = add_instance(daemon)
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "long",
                      "--", "sleep", "300")
        wait_running(daemon, "long")

        refused = daemon.ctl("pool", "remove", instance["name"])
        assert refused.returncode == 1
        assert "--force" in refused.stderr
        assert run_view(daemon, "long")["status"] == "running"

        daemon.ctl_ok("pool", "remove", "--force", instance["name"])
        view = wait_run_ended(daemon, "long")
        assert view["status"] == "failed"
        assert f"instance {instance['name']} was removed" in view["reason"]
        daemon.wait_for_event("InstanceTerminated", instance_id=instance["id"])

    def test_idle_instance_removed_while_other_busy(self, daemon: DaemonProcess) -> None:
        busy = add_instance(daemon, "--name", "busy-box")
        idle = add_instance(daemon, "--name", "idle-box")
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--instance", "busy-box",
                      "--name", "long", "--", "sleep", "300")
        wait_running(daemon, "long")

        daemon.ctl_ok("pool", "remove", "idle-box")

        daemon.wait_for_event("InstanceTerminated", instance_id=idle["id"])
        statuses = {i["name"]: i["status"] for i in daemon.ctl_json("pool", "ps")}
        assert statuses == {"busy-box": "busy"}
        assert busy["name"] == "busy-box"
        daemon.ctl_ok("stop", "--abort", "long")
        assert wait_run_ended(daemon, "long")["status"] == "stopped"


class TestRuns:
    def test_abort_stops_at_once(self, daemon: DaemonProcess) -> None:
        add_instance(daemon)
        script = "trap '' TERM; sleep 300"
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "stubborn",
                      "--", "sh", "-c", script)
        wait_running(daemon, "stubborn")

        started = time.monotonic()
        daemon.ctl_ok("stop", "--abort", "stubborn")

        assert wait_run_ended(daemon, "stubborn")["status"] == "stopped"
        assert time.monotonic() - started < 2

    def test_reuse_waits_for_busy_instance(self, daemon: DaemonProcess) -> None:
        add_instance(daemon)
        daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--name", "first",
                      "--", "sleep", "0.5")
        daemon.ctl_ok("run", "-d", "--reuse", "--cpu", "1", "--memory", "1GB",
                      "--name", "second", "--", "true")

        assert wait_run_ended(daemon, "second")["status"] == "done"
        assert run_view(daemon, "second")["instance"] == run_view(daemon, "first")["instance"]
        requested = [r for r in daemon.events() if r["type"] == "InstanceRequested"]
        assert len(requested) == 1

    def test_gpu_runs_get_their_own_devices(self, daemon: DaemonProcess) -> None:
        outputs = []
        for name in ("g0", "g1"):
            daemon.ctl_ok("run", "-d", "--cpu", "1", "--memory", "1GB", "--gpu", "A100:1",
                          "--name", name, "--", "sh", "-c",
                          'echo "$CUDA_VISIBLE_DEVICES"; sleep 0.5')

        for name in ("g0", "g1"):
            assert wait_run_ended(daemon, name)["status"] == "done"
            outputs.append(daemon.ctl_ok("logs", name).strip())

        assert sorted(outputs) == ["0", "1"]
        no_gpu = daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--gpu", "0",
                               "--", "sh", "-c",
                               'echo "[$CUDA_VISIBLE_DEVICES]"')
        assert no_gpu.strip() == "[]"

    def test_env_values_stay_out_of_log(self, daemon: DaemonProcess) -> None:
        secret = "s3cr3t-value-1234"

        output = daemon.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "-e",
                               f"API_TOKEN={secret}", "--", "sh", "-c", 'echo "$API_TOKEN"')

        assert output.strip() == secret
        log_bytes = b"".join(
            path.read_bytes()
            for path in daemon.data_dir.iterdir()
            if path.name.startswith("events.db")
        )
        assert secret.encode() not in log_bytes
        assert secret not in daemon.log_text()
        submitted = [r for r in daemon.events() if r["type"] == "RunSubmitted"]
        assert submitted[0]["event"]["spec"]["env_names"] == ["API_TOKEN"]


class TestCallers:
    def test_socket_is_private(self, daemon: DaemonProcess) -> None:
        mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)

        assert mode == 0o600

    def test_actor_is_the_caller(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "create", "mine")

        created = [r for r in daemon.events() if r["type"] == "PoolCreated"][0]

        assert f"uid {os.getuid()}" in created["actor"]


def test_socket_activation_serves_inherited_socket(short_tmp: Path) -> None:
    daemon = DaemonProcess(short_tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.socket))
    listener.listen(16)
    launcher = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "os.dup2(fd, 3)\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno()), str(BIN / "dstackd"),
         "serve", "--data-dir", str(daemon.data_dir), "--socket", str(daemon.socket),
         "--config", str(daemon.config)],
        pass_fds=(listener.fileno(),),
        stdout=open(daemon.output, "ab"),
        stderr=subprocess.STDOUT,
    )
    listener.close()
    daemon.process = process
    try:
        result = daemon.ctl("pool", "list")
        assert result.returncode == 0, daemon.log_text()
        assert "default-pool" in result.stdout
    finally:
        assert daemon.stop() == 0

    assert daemon.socket.exists()


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_clean_shutdown_on_signal(short_tmp: Path, signum: str) -> None:
    import signal

    daemon = DaemonProcess(short_tmp)
    daemon.start()
    daemon.ctl_ok("pool", "create", "kept")

    daemon.kill(getattr(signal, signum))

    assert daemon.process is not None
    assert daemon.process.returncode == 0
    assert not daemon.socket.exists()
    daemon.start()
    assert [p["name"] for p in daemon.ctl_json("pool", "list")] == ["kept"]
    daemon.stop()


SMALL_MACHINE = """
[daemon]
stop_grace_seconds = 2

[local]
cpus = 4
memory = "8GB"
"""


@pytest.mark.parametrize("burst", [2, 6])
def test_burst_of_runs_never_overcommits(short_tmp: Path, burst: int) -> None:
    import threading

    daemon = DaemonProcess(short_tmp, config=SMALL_MACHINE)
    daemon.start()
    try:
        from dstackctl.client import Client

        results: list[str] = []
        barrier = threading.Barrier(burst)

        def submit(index: int) -> None:
            body = {
                "argv": ["sleep", "0.3"],
                "name": f"b{index}",
                "resources": {"cpu": "1", "memory": "1GB"},
            }
            barrier.wait(timeout=30)
            run = Client(str(daemon.socket)).request("POST", "/v1/runs", body=body)
            results.append(run["status"])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(burst)]
        for thread in threads:
            thread.start()

        for thread in threads:
            thread.join(timeout=60)

        assert len(results) == burst
        statuses = [wait_run_ended(daemon, f"b{i}")["status"] for i in range(burst)]
        assert statuses == ["done"] * burst
        names = [
            r["event"]["name"] for r in daemon.events() if r["type"] == "InstanceRequested"
        ]
        assert len(names) == len(set(names))
        assert len(names) == min(burst, 4)
        failed = [r for r in daemon.events() if r["type"] == "InstanceProvisioningFailed"]
        assert failed == []
    finally:
        daemon.stop_active_runs()
        daemon.stop()


def test_run_whose_supervisor_dies_is_killed(daemon: DaemonProcess, short_tmp: Path) -> None:
    add_instance(daemon)
    pid_file = short_tmp / "task.pid"
    script = f"echo $$ > {pid_file}; kill -9 $PPID; sleep 300"

    daemon.ctl("run", "--cpu", "1", "--memory", "1GB", "--name", "escape",
               "--", "sh", "-c", script)

    view = wait_run_ended(daemon, "escape")
    assert view["status"] == "failed", view
    assert "lost" in view["reason"], view
    task = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(task):
        assert time.monotonic() < deadline, "the task outlived its supervisor"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False

    return state != "Z"


def test_log_files_private_in_open_data_dir(short_tmp: Path) -> None:
    daemon = DaemonProcess(short_tmp)
    daemon.data_dir.mkdir(mode=0o755)
    os.chmod(daemon.data_dir, 0o755)
    daemon.start()
    try:
        daemon.ctl_ok("pool", "create", "main")

        log_files = [p for p in daemon.data_dir.iterdir() if p.name.startswith("events.db")]
        assert {p.name for p in log_files} >= {"events.db", "events.db-wal"}
        for path in log_files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        daemon.stop()
