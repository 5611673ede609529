"""Benchmark replay: verified full replay of 1,000,000 events and open with snapshot.

Steps, on a new file in a temporary directory:

1. build a log of 1,000,000 plausible events with stdlib ``sqlite3`` inserts
   and a correct hash chain (``synchronous=OFF``, since this is only setup).
   The events create pools, request, provision, claim, release, expire and
   terminate instances, and submit, start and finish runs;
2. replay it: ``LogReader.records(verify=True)`` folded through
   ``events.projection.replay``, timed, and the same read without the fold to
   show how the time splits between reading and folding;
3. save a snapshot at the head through ``EventLog``, the first one, which
   archives every ended run and instance. Then append a tail of 1,000 more
   events and save a second snapshot halfway, while another task appends,
   timing how long those appends waited;
4. time what a daemon start costs: ``EventLog.open`` (which verifies the
   chain after the snapshot) plus ``load_state`` (snapshot plus tail).

The last line is ``replay: events_per_s=<n> open_with_snapshot_ms=<n>``.
"""

import gc
import itertools
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import structlog

from events.event_types import (
    Event,
    InstanceClaimed,
    InstanceIdleExpired,
    InstanceProvisioned,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminated,
    PoolCreated,
    RunFinished,
    RunSpec,
    RunStarted,
    RunSubmitted,
)
from events.log import EventLog
from events.log_reader import SCHEMA, LogReader
from events.model import Actor, Gpu, Offer, Requirements, Resources
from events.projection import State, apply, encode_state
from events.projection import replay as fold
from events.record import GENESIS_HASH, NewEvent, Record, chain_hash, encode_body
from events.snapshot import load_state, paused_gc, save_snapshot

EVENTS = 1_000_000
TAIL_EVENTS = 1_000
POOLS = 8
USERS = [Actor(1000 + index, f"user{index}") for index in range(20)]
DAEMON = Actor(None, "dstackd")

OFFERS = [
    Offer("local", "local", "cpu-8", Resources(8, 32.0, disk_gb=200.0), price=0.0),
    Offer(
        "aws",
        "us-east-1",
        "g5.xlarge",
        Resources(4, 16.0, (Gpu("A10G", 24.0, 0),), 200.0),
        price=1.006,
    ),
    Offer(
        "aws",
        "us-west-2",
        "p4d.24xlarge",
        Resources(96, 1152.0, tuple(Gpu("A100", 40.0, i) for i in range(8)), 8000.0),
        spot=True,
        price=9.83,
    ),
]


def generate(count: int, seed: int = 7) -> Iterator[tuple[str, Event, Actor]]:
    """Yield ``count`` events of a plausible history, valid for the projection.

    Each run is submitted by a user and lands on an idle instance of its pool
    (four times in five when one is idle) or on a new one. It starts and
    finishes (one in ten fails), and its instance goes back to idle. One
    release in twenty is followed by the idle duration expiring and the
    instance being terminated.
    """
    rng = random.Random(seed)
    produced = 0
    pools = [f"pool-{index}" for index in range(POOLS)]
    for pool in pools:
        yield f"pool/{pool}", PoolCreated(pool), DAEMON

    produced += len(pools)
    idle: dict[str, list[str]] = {pool: [] for pool in pools}
    instances = 0
    runs = 0
    while True:
        batch: list[tuple[str, Event, Actor]] = []
        runs += 1
        run_id = f"run-{runs:08d}"
        pool = rng.choice(pools)
        user = rng.choice(USERS)
        spec = RunSpec(
            commands=(
                "pip install -r requirements.txt",
                f"python train.py --run {runs}",
            ),
            requirements=Requirements(),
        )
        run_stream = f"run/{run_id}"
        submitted = RunSubmitted(run_id, f"job-{runs}", pool, spec, user.name, user.uid)
        batch.append((run_stream, submitted, user))
        if idle[pool] and rng.random() < 0.8:
            instance_id = idle[pool].pop()
        else:
            instances += 1
            instance_id = f"i-{instances:08x}"
            offer = rng.choice(OFFERS)
            stream = f"instance/{instance_id}"
            name = f"{pool}-{instances}"
            requested = InstanceRequested(
                instance_id, name, pool, offer, 300, run_id=run_id
            )
            hostname = f"10.0.{instances % 250}.7"
            provisioned = InstanceProvisioned(
                instance_id, offer.resources, hostname=hostname
            )
            batch.append((stream, requested, DAEMON))
            batch.append((stream, provisioned, DAEMON))

        stream = f"instance/{instance_id}"
        exit_status = 1 if rng.random() < 0.1 else 0
        batch += [
            (stream, InstanceClaimed(instance_id, run_id), DAEMON),
            (run_stream, RunStarted(run_id, instance_id, pid=4000 + runs), DAEMON),
            (run_stream, RunFinished(run_id, exit_status), DAEMON),
            (stream, InstanceReleased(instance_id, run_id), DAEMON),
        ]
        if rng.random() < 0.05:
            batch += [
                (stream, InstanceIdleExpired(instance_id, 0, 300), DAEMON),
                (stream, InstanceTerminated(instance_id), DAEMON),
            ]
        else:
            idle[pool].append(instance_id)

        for item in batch:
            if produced == count:
                return

            yield item
            produced += 1


def build_log(
    path: str, source: Iterator[tuple[str, Event, Actor]], count: int
) -> None:
    """Write ``count`` events from ``source`` with a correct chain, 50,000 per
    commit."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = OFF")
    connection.executescript(SCHEMA)
    connection.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    versions: dict[str, int] = {}
    previous_hash = GENESIS_HASH
    recorded_at = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
    rows = []
    events = itertools.islice(source, count)
    for position, (stream, event, actor) in enumerate(events, start=1):
        version = versions.get(stream, 0) + 1
        versions[stream] = version
        recorded_at += 1_000 + position % 5_000
        record = Record(position, stream, version, recorded_at, actor, event)
        body = encode_body(record)
        previous_hash = chain_hash(previous_hash, body)
        rows.append((position, stream, version, body, previous_hash))
        if len(rows) == 50_000:
            _insert(connection, rows)
            rows = []

    _insert(connection, rows)
    connection.close()


def _insert(connection: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    connection.execute("BEGIN")
    connection.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
    connection.execute("COMMIT")


def replay(path: str, mode: str) -> tuple[State, float]:
    """Return the state after a verified replay, and the seconds it took.

    ``mode`` is one of:

    - ``read``: read and verify without folding.
    - ``collected``: fold with ``apply`` per record and the garbage
      collector running.
    - ``paused``: fold with ``replay`` inside ``paused_gc`` as
      ``load_state_offline`` does. The timing includes the collection of new
      objects that the pause put off.
    """
    state = State()
    with LogReader.open(path) as reader:
        gc.collect()
        started = time.perf_counter()
        if mode == "read":
            for _ in reader.records(verify=True):
                pass
        elif mode == "collected":
            for record in reader.records(verify=True):
                apply(state, record)
        else:
            with paused_gc():
                fold(reader.records(verify=True), state)

            gc.collect(0)

        seconds = time.perf_counter() - started

    return state, seconds


async def snapshot_and_tail(
    path: str, state: State, tail: Iterator[tuple[str, Event, Actor]]
) -> float:
    """Save a snapshot of ``state``, append ``tail``; return the open time in s.

    Halfway through the tail, a second snapshot is saved while another task
    keeps appending, as the daemon's snapshot task does. The longest wait of
    those appends is printed.
    """
    started = time.perf_counter()
    log = await EventLog.open(path)
    open_seconds = time.perf_counter() - started
    try:
        saving = time.perf_counter()
        await save_snapshot(log, state)
        print(
            "first save_snapshot (archives all ended entries): "
            f"{(time.perf_counter() - saving) * 1000:.0f} ms"
        )
        batches: list[list[NewEvent]] = [[]]
        for stream, event, _ in tail:
            if len(batches[-1]) == 100:
                batches.append([])

            batches[-1].append(NewEvent(stream, event))

        half = len(batches) // 2
        for batch in batches[:half]:
            await append_and_fold(log, state, batch)

        saved_ms, waits = await save_while_appending(log, state, batches[half:])
        print(
            f"second save_snapshot: {saved_ms:.0f} ms; appends meanwhile waited "
            f"at most {max(waits, default=0.0):.0f} ms"
        )
    finally:
        await log.close()

    return open_seconds


async def append_and_fold(log: EventLog, state: State, batch: list[NewEvent]) -> float:
    """Append ``batch``, fold it into ``state``; return the append's ms."""
    started = time.perf_counter()
    for record in await log.append(batch, DAEMON):
        apply(state, record)

    state.head_hash = log.head_hash

    return (time.perf_counter() - started) * 1000


async def save_while_appending(
    log: EventLog, state: State, batches: list[list[NewEvent]]
) -> tuple[float, list[float]]:
    """Save a snapshot while another task appends ``batches`` one by one.

    Returns the save's ms and the ms of each append that ran meanwhile.
    """
    waits: list[float] = []
    saved = anyio.Event()

    async def append_all() -> None:
        for batch in batches:
            wait_ms = await append_and_fold(log, state, batch)
            if not saved.is_set():
                waits.append(wait_ms)

    async with anyio.create_task_group() as group:
        group.start_soon(append_all)
        await anyio.lowlevel.checkpoint()
        started = time.perf_counter()
        await save_snapshot(log, state)
        saved_ms = (time.perf_counter() - started) * 1000
        saved.set()

    return saved_ms, waits


async def open_with_snapshot(path: str) -> tuple[State, float, float]:
    """Return the loaded state, and the seconds for open and for load_state."""
    started = time.perf_counter()
    log = await EventLog.open(path)
    opened = time.perf_counter()
    try:
        state = await load_state(log)
        loaded = time.perf_counter()
    finally:
        await log.close()

    return state, opened - started, loaded - opened


def main() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)  # warnings and up
    )
    directory = tempfile.mkdtemp(prefix="dstackd-bench-replay-")
    path = os.path.join(directory, "events.db")
    try:
        started = time.perf_counter()
        source = generate(EVENTS + TAIL_EVENTS)
        build_log(path, source, EVENTS)
        size_mb = os.path.getsize(path) / 1e6
        print(
            f"built {EVENTS} events in {time.perf_counter() - started:.1f} s "
            f"({size_mb:.0f} MB)"
        )

        _, read_seconds = replay(path, "read")
        state, collected_seconds = replay(path, "collected")
        del state
        state, seconds = replay(path, "paused")
        rate = EVENTS / seconds
        print(
            f"verified read alone: {EVENTS / read_seconds:.0f} events/s; "
            f"with apply: {EVENTS / collected_seconds:.0f} events/s with the "
            f"collector running, {rate:.0f} events/s with it paused "
            f"(apply and its collection take {1 - read_seconds / seconds:.0%})"
        )
        print(
            f"state: {len(state.runs)} runs, {len(state.instances)} instances, "
            f"{len(encode_state(state)) / 1e6:.1f} MB encoded in full"
        )

        open_seconds = anyio.run(snapshot_and_tail, path, state, source)
        print(f"open without snapshot (verifies all): {open_seconds * 1000:.0f} ms")

        loaded, open_seconds, load_seconds = anyio.run(open_with_snapshot, path)
        total_ms = (open_seconds + load_seconds) * 1000
        print(
            f"open with snapshot: EventLog.open {open_seconds * 1000:.0f} ms + "
            f"load_state {load_seconds * 1000:.0f} ms (tail {TAIL_EVENTS}) "
            f"= {total_ms:.0f} ms; checkpoint {loaded.checkpoint}; "
            f"{len(loaded.active_runs())} active runs and "
            f"{len(loaded.live_instances())} live instances in memory"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(f"replay: events_per_s={rate:.0f} open_with_snapshot_ms={total_ms:.0f}")


if __name__ == "__main__":
    sys.exit(main())
