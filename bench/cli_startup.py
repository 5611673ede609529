"""Benchmark: wall time of a ``dstackctl pool ps`` process over ``python -c pass``.

Both commands run with this script's interpreter and a bytecode cache,
interleaved so that load from other processes affects both alike. ``pool ps``
talks to a stand-in daemon that this script serves on a Unix socket in a
thread. The time covers start-up, argument parsing, one request and the table,
but not the daemon's own work.

Usage: python bench/cli_startup.py [--runs N]

The last line is ``cli: pool_ps_ms=<n> python_pass_ms=<n> ratio=<x>``, with
median times in milliseconds.
"""

import argparse
import json
import os
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

INSTANCE = {
    "id": "0b0c6d3e-54e1-4f0c-9d43-8f7f3d1f9a10",
    "name": "local-1",
    "pool": "default-pool",
    "backend": "local",
    "region": "local",
    "instance_type": "local-4cpu",
    "resources": "4xCPU, 16GB, 1xA100 (80GB)",
    "spot": False,
    "price": 0.0,
    "status": "idle",
    "schedulable": True,
    "run": None,
    "idle_since": "2025-01-01T12:00:00+00:00",
    "idle_seconds": 42.0,
    "idle_duration": "300",
    "created_at": "2025-01-01T11:00:00+00:00",
    "reason": None,
}
INSTANCES_BODY = json.dumps(
    [{**INSTANCE, "name": f"local-{i}"} for i in range(10)]
).encode()


class _InstancesHandler(socketserver.StreamRequestHandler):
    """Responds to any request with the instance list, as ``GET /v1/instances`` does."""

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass

        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(INSTANCES_BODY)}\r\nConnection: close\r\n\r\n"
        )
        self.wfile.write(head.encode() + INSTANCES_BODY)


def _time_ms(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)

    return (time.perf_counter() - start) * 1000


def _bytecode_cache_env(cache_dir: str) -> dict[str, str]:
    """Return an environment in which both commands cache bytecode under ``cache_dir``.

    An installed command runs from cached bytecode, so a PYTHONDONTWRITEBYTECODE
    set in this environment would measure compiling every module on each run.
    The cache goes to a temporary directory to leave the source tree untouched.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache_dir

    return env


def _dstackctl_argv(socket_path: str) -> list[str]:
    """Run the installed console script with this interpreter, as a user would."""
    script = os.path.join(os.path.dirname(sys.executable), "dstackctl")
    if os.path.exists(script):
        entry = [script]
    else:
        entry = ["-c", "from dstackctl.main import main; main()"]

    return [sys.executable, *entry, "--socket", socket_path, "pool", "ps"]


def _summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return (
        f"{name}: min={ordered[0]:.1f}ms median={statistics.median(ordered):.1f}ms "
        f"p90={p90:.1f}ms runs={len(ordered)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="Runs of each command.")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="dctl-bench-", dir="/tmp")
    socket_path = os.path.join(directory, "d.sock")
    env = _bytecode_cache_env(os.path.join(directory, "pycache"))
    server = socketserver.ThreadingUnixStreamServer(socket_path, _InstancesHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pool_ps = _dstackctl_argv(socket_path)
        python_pass = [sys.executable, "-c", "pass"]
        output = subprocess.run(
            pool_ps, check=True, capture_output=True, text=True, env=env
        )
        if not output.stdout.startswith("INSTANCE"):
            sys.exit(f"unexpected pool ps output: {output.stdout!r}")

        # Warm the page cache and the bytecode caches before measuring.
        for _ in range(3):
            _time_ms(python_pass, env)
            _time_ms(pool_ps, env)

        pass_times = []
        ps_times = []
        for _ in range(args.runs):
            pass_times.append(_time_ms(python_pass, env))
            ps_times.append(_time_ms(pool_ps, env))
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(directory)

    print(f"interpreter: {sys.executable} (Python {sys.version.split()[0]})")
    print(_summary("python -c pass", pass_times))
    print(_summary("dstackctl pool ps", ps_times))
    ps_ms = statistics.median(ps_times)
    pass_ms = statistics.median(pass_times)
    ratio = ps_ms / pass_ms
    print(f"cli: pool_ps_ms={ps_ms:.1f} python_pass_ms={pass_ms:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
