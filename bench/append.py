"""Benchmark durable appends: group commit, one append per commit, raw SQLite.

Each measurement runs for a few seconds on a fresh log file in a new temporary
directory, with ``synchronous=FULL``:

- group: 64 concurrent producers append one event per call through
  ``EventLog``, so the writer commits their appends in shared transactions;
- single: one producer appends one event per call, one commit each;
- raw: the ceiling, with no asyncio or aiosqlite: stdlib ``sqlite3`` inserts
  with the same schema and the same body encoding and hash chain, in
  transactions of 10,000 rows.

The last line is ``append: group=<events/s> single=<events/s> raw=<events/s>``.
"""

import os
import shutil
import sqlite3
import sys
import tempfile
import time

import anyio
import structlog

from events.event_types import InstanceReleased
from events.log import EventLog
from events.log_reader import SCHEMA
from events.model import Actor
from events.record import GENESIS_HASH, NewEvent, Record, chain_hash, encode_body

PRODUCERS = 64
DURATION_S = 3.0
RAW_TRANSACTION_ROWS = 10_000
ACTOR = Actor(1000, "bench")


def _event(index: int) -> InstanceReleased:
    return InstanceReleased(instance_id=f"i-{index:08x}", run_id=f"r-{index:08x}")


async def _produce(
    log: EventLog, stream: str, deadline: float, counts: list[int]
) -> None:
    version = 0
    while time.perf_counter() < deadline:
        entry = NewEvent(stream, _event(version), expected_version=version)
        await log.append([entry], ACTOR)
        version += 1

    counts.append(version)


async def measure_log(path: str, producers: int) -> float:
    """Return events per second with ``producers`` concurrent appenders."""
    log = await EventLog.open(path)
    counts: list[int] = []
    commits_before = log.commit_count
    started = time.perf_counter()
    deadline = started + DURATION_S
    async with anyio.create_task_group() as group:
        for index in range(producers):
            group.start_soon(_produce, log, f"instance/i-{index}", deadline, counts)

    elapsed = time.perf_counter() - started
    commits = log.commit_count - commits_before
    await log.close()

    events = sum(counts)
    rate = events / elapsed
    print(
        f"  producers={producers} events={events} seconds={elapsed:.2f} "
        f"commits={commits} events_per_commit={events / max(commits, 1):.1f} "
        f"events_per_s={rate:.0f}"
    )

    return rate


def measure_raw(path: str) -> float:
    """Return events per second for stdlib inserts in large transactions."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.executescript(SCHEMA)
    position = 0
    previous_hash = GENESIS_HASH
    started = time.perf_counter()
    while time.perf_counter() - started < DURATION_S:
        rows = []
        recorded_at = time.time_ns() // 1000
        for _ in range(RAW_TRANSACTION_ROWS):
            position += 1
            stream = f"instance/i-{position % PRODUCERS}"
            version = position // PRODUCERS + 1
            event = _event(position)
            record = Record(position, stream, version, recorded_at, ACTOR, event)
            body = encode_body(record)
            previous_hash = chain_hash(previous_hash, body)
            rows.append((position, stream, version, body, previous_hash))

        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO events (position, stream, version, body, hash)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        connection.execute("COMMIT")

    elapsed = time.perf_counter() - started
    connection.close()
    rate = position / elapsed
    print(f"  events={position} seconds={elapsed:.2f} events_per_s={rate:.0f}")

    return rate


def main() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    directory = tempfile.mkdtemp(prefix="dstackd-bench-append-")
    try:
        print(f"group: {PRODUCERS} producers, one event per append")
        group = anyio.run(measure_log, os.path.join(directory, "group.db"), PRODUCERS)
        print("single: one producer, one event per append")
        single = anyio.run(measure_log, os.path.join(directory, "single.db"), 1)
        print(f"raw: sqlite3 executemany, {RAW_TRANSACTION_ROWS} rows per transaction")
        raw = measure_raw(os.path.join(directory, "raw.db"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(f"group/single={group / single:.1f} group/raw={group / raw:.2f}")
    print(f"append: group={group:.0f} single={single:.0f} raw={raw:.0f}")


if __name__ == "__main__":
    sys.exit(main())
