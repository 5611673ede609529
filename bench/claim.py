"""Measure how fast a submitted run lands on an instance and starts.

Starts a throwaway dstackd, then:
- warm path: a pool of idle local instances, runs of ``true`` submitted one
  after another, each claiming an idle instance;
- cold path: runs in an empty pool, each provisioning a new local instance;
- floor: starting ``true`` with ``subprocess.Popen`` from this process.

Times inside the daemon come from the event log: submit is the RunSubmitted
record's time, claimed the InstanceClaimed record's, started the RunStarted
record's (appended right after the process was spawned). The last line is

    claim: warm_p50_ms=<n> warm_p99_ms=<n> cold_p50_ms=<n> floor_ms=<n>

where the warm and cold values are submit-to-process-started.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dstackctl.client import Client

BIN = Path(sys.executable).parent
CONFIG = """
[daemon]
stop_grace_seconds = 2

[local]
cpus = 64
memory = "256GB"
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def measure_floor(count: int) -> list[float]:
    """Return the times, in ms, to start ``true`` from Python."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        process = subprocess.Popen(["true"])
        times.append((time.perf_counter() - started) * 1000)
        process.wait()

    return times


def submit_and_wait(client: Client, body: dict[str, Any]) -> str:
    run = client.request("POST", "/v1/runs", body=body)
    done = client.request("GET", f"/v1/runs/{run['id']}/wait", query={"timeout": 60})
    if done["status"] != "done":
        raise SystemExit(f"run {run['name']} ended {done['status']}: {done['reason']}")

    return str(run["id"])


def run_timings(client: Client, run_ids: set[str]) -> tuple[list[float], list[float]]:
    """Return submit-to-claimed and submit-to-started times, in ms, from the log."""
    submitted: dict[str, int] = {}
    claimed: dict[str, int] = {}
    started: dict[str, int] = {}
    with client.open("GET", "/v1/events", timeout=120) as response:
        for line in response.iter_lines():
            record = json.loads(line)
            event = record["event"]
            run_id = event.get("run_id")
            if run_id not in run_ids:
                continue

            at = _microseconds(record["recorded_at"])
            kind = record["type"]
            if kind == "RunSubmitted":
                submitted[run_id] = at
            elif kind == "InstanceClaimed":
                claimed[run_id] = at
            elif kind == "RunStarted":
                started[run_id] = at

    to_claim = [(claimed[r] - submitted[r]) / 1000 for r in run_ids]
    to_start = [(started[r] - submitted[r]) / 1000 for r in run_ids]

    return to_claim, to_start


def _microseconds(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm-runs", type=int, default=200)
    parser.add_argument("--cold-runs", type=int, default=40)
    parser.add_argument("--instances", type=int, default=4)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dsd-bench-", dir="/tmp"))
    sock = root / "d.sock"
    (root / "dstackd.toml").write_text(CONFIG)
    output = open(root / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [str(BIN / "dstackd"), "serve", "--data-dir", str(root / "data"),
         "--socket", str(sock), "--config", str(root / "dstackd.toml")],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_serving(daemon, sock)
        client = Client(str(sock))
        resources = {"cpu": "1", "memory": "1GB"}
        client.request("POST", "/v1/pools", body={"name": "warm"})
        client.request("POST", "/v1/pools", body={"name": "cold"})
        for _ in range(args.instances):
            client.request(
                "POST", "/v1/instances",
                body={"pool": "warm", "resources": resources, "idle_duration": "off"},
                timeout=60,
            )

        run = {"argv": ["true"], "resources": resources, "working_dir": "/"}
        warm_ids = {
            submit_and_wait(client, {**run, "pool": "warm", "reuse": True})
            for _ in range(args.warm_runs)
        }
        cold_ids = {
            submit_and_wait(client, {**run, "pool": "cold", "idle_duration": "0"})
            for _ in range(args.cold_runs)
        }
        warm_claim, warm_start = run_timings(client, warm_ids)
        _cold_claim, cold_start = run_timings(client, cold_ids)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        output.close()
        shutil.rmtree(root, ignore_errors=True)

    floor = measure_floor(200)
    print(f"runs: warm={len(warm_ids)} cold={len(cold_ids)} cpus={os.cpu_count()}")
    print(
        f"warm submit-to-claimed: p50={statistics.median(warm_claim):.2f} ms "
        f"p99={percentile(warm_claim, 0.99):.2f} ms"
    )
    print(
        f"warm submit-to-started: p50={statistics.median(warm_start):.2f} ms "
        f"p99={percentile(warm_start, 0.99):.2f} ms"
    )
    print(f"cold submit-to-started: p50={statistics.median(cold_start):.2f} ms")
    print(f"floor (Popen true): p50={statistics.median(floor):.2f} ms")
    print(
        f"claim: warm_p50_ms={statistics.median(warm_start):.2f} "
        f"warm_p99_ms={percentile(warm_start, 0.99):.2f} "
        f"cold_p50_ms={statistics.median(cold_start):.2f} "
        f"floor_ms={statistics.median(floor):.2f}"
    )


def _wait_serving(daemon: subprocess.Popen[bytes], sock: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"dstackd exited with status {daemon.returncode}")

        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return
        except OSError:
            time.sleep(0.02)

    raise SystemExit("dstackd did not start serving within 20 s")


if __name__ == "__main__":
    main()
