"""Measure how long starting a local run takes, against subprocess.Popen(["true"]).

A run counts as started when ``LocalRunner.start`` returns, which is after the
task called exec. ``Popen`` likewise returns after its child called exec. Runs
start one after the other, each after the previous one ended, as on an idle
instance.

Usage: python bench/run_start.py [--runs N]
"""

import argparse
import logging
import shutil
import statistics
import subprocess
import tempfile
import time

import anyio
import structlog

from dstackd.runner import LocalRunner, RunLaunch


def measure_popen(runs: int) -> list[float]:
    """Return the seconds each ``Popen(["true"])`` took to return."""
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        process = subprocess.Popen(["true"])
        durations.append(time.perf_counter() - started)
        process.wait()

    return durations


async def measure_runner(runs: int, root: str) -> list[float]:
    """Return the seconds each ``LocalRunner.start`` of ``true`` took."""
    durations = []
    async with await LocalRunner.start_spawner() as runner:
        for number in range(runs):
            launch = RunLaunch(
                run_id=f"r{number}", argv=["true"], run_dir=f"{root}/r{number}"
            )
            started = time.perf_counter()
            handle = await runner.start(launch)
            durations.append(time.perf_counter() - started)
            with anyio.fail_after(10):
                await runner.wait(handle)

    return durations


def describe(name: str, durations: list[float]) -> str:
    milliseconds = sorted(d * 1000 for d in durations)
    p90 = milliseconds[int(len(milliseconds) * 0.9)]

    return (
        f"{name:<24} median {statistics.median(milliseconds):6.2f} ms  "
        f"p90 {p90:6.2f} ms  min {milliseconds[0]:6.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=200, help="number of starts to time (each way)"
    )
    args = parser.parse_args()
    # Debug lines printed to a terminal would add to the time measured, and the
    # daemon logs at info level anyway.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )

    root = tempfile.mkdtemp(prefix="dsd-bench-", dir="/tmp")
    try:
        popen = measure_popen(args.runs)
        runner = anyio.run(measure_runner, args.runs, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(describe('Popen(["true"])', popen))
    print(describe("LocalRunner.start(true)", runner))
    extra = statistics.median(runner) - statistics.median(popen)
    print(f"extra per start (median): {extra * 1000:.2f} ms")


if __name__ == "__main__":
    main()
