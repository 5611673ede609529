"""A guided tour: a throwaway daemon, one pooled instance, two tasks, the log.

Run with ``make demo`` or ``python -m dstackd.demo``. Everything lives in a
temporary directory that is removed at the end; the daemon uses this
machine's local backend with its detected CPUs, memory and GPUs.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 20.0


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="dstackd-demo-", dir="/tmp"))
    sock = root / "dstackd.sock"
    env = dict(os.environ, DSTACKD_SOCKET=str(sock))
    daemon_log = open(root / "daemon.log", "wb")
    print(f"Starting a throwaway dstackd in {root}")
    daemon = subprocess.Popen(
        [str(BIN / "dstackd"), "serve", "--data-dir", str(root / "data"), "--socket", str(sock)],
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        _wait_serving(daemon, sock)
        return _tour(env)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        daemon_log.close()
        print(f"\nStopped the daemon (exit status {daemon.returncode}).")
        shutil.rmtree(root, ignore_errors=True)


def _tour(env: dict[str, str]) -> int:
    _step("Create a pool and make it the default", env, "pool", "create", "demo")
    _step(
        "Add an instance to the pool: the offers table, then the instance (-y skips the prompt)",
        env, "pool", "add", "-y", "--cpu", "1", "--memory", "1GB", "--idle-duration", "10m",
    )
    _step(
        "Run a first task on it and stream its output",
        env, "run", "--name", "first", "--cpu", "1", "--memory", "1GB", "--",
        "python3", "-c",
        "import os; print('hello from pid', os.getpid(), 'on CPUs', sorted(os.sched_getaffinity(0)))",
    )
    _step(
        "Run a second task: it reuses the idle instance instead of creating one",
        env, "run", "--name", "second", "--cpu", "1", "--memory", "1GB", "--",
        "sh", "-c", "echo CUDA_VISIBLE_DEVICES=\"$CUDA_VISIBLE_DEVICES\"; uname -sr",
    )
    runs = json.loads(_capture(env, "ps", "-a", "--json"))
    print("\nWhere each run went and how long it waited to start:")
    for run in runs:
        wait = run["wait_ms"]
        waited = "-" if wait is None else f"{wait:.1f} ms"
        print(f"  {run['name']:<8} instance={run['instance']:<10} waited={waited}")

    instances = {run["instance"] for run in runs}
    print(
        "  both runs used the same instance"
        if len(instances) == 1
        else "  the runs used different instances"
    )
    _step("The pool now", env, "pool", "ps")
    _step("Every change, from the event log", env, "events")

    return 0 if len(instances) == 1 else 1


def _step(title: str, env: dict[str, str], *args: str) -> None:
    print(f"\n== {title}\n$ dstackctl {shlex.join(args)}", flush=True)
    result = subprocess.run([str(BIN / "dstackctl"), *args], env=env, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"dstackctl {shlex.join(args)} failed with {result.returncode}")


def _capture(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(BIN / "dstackctl"), *args], env=env, check=True, capture_output=True, text=True
    ).stdout


def _wait_serving(daemon: subprocess.Popen[bytes], sock: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"dstackd exited early with status {daemon.returncode}")

        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return
        except OSError:
            time.sleep(0.02)

    raise SystemExit(f"dstackd did not start serving within {START_TIMEOUT_SECONDS}s")


if __name__ == "__main__":
    sys.exit(main())
