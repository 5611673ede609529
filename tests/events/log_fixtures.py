"""Helpers for the event log tests: a plausible event story and file edits."""

import random
import sqlite3
from collections.abc import Iterator

from events.event_types import (
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
from events.model import Offer, Resources
from events.record import NewEvent

RESOURCES = Resources(cpus=4, memory_gb=16.0, disk_gb=100.0)
OFFER = Offer("local", "local", "cpu-4", RESOURCES, price=0.25)


def story(runs: int, *, seed: int = 0, chapter: str = "a") -> Iterator[list[NewEvent]]:
    """Yield batches that tell a valid story for the projection.

    There are two pools. Each run is submitted, placed on an idle instance or
    a new one, started, finished and released, and now and then an idle
    instance expires and is terminated. Chapter ``a`` creates the pools. Any
    other chapter continues a log that has them, with its own run and
    instance ids.
    """
    rng = random.Random(seed)
    pools = ["main", "gpu"]
    if chapter == "a":
        for pool in pools:
            yield [NewEvent(f"pool/{pool}", PoolCreated(pool), expected_version=0)]

    idle: list[tuple[str, str]] = []
    next_instance = 0
    for index in range(runs):
        run_id = f"{chapter}-run-{index}"
        pool = rng.choice(pools)
        run_stream = f"run/{run_id}"
        spec = RunSpec(argv=("python", "train.py", f"--seed={index}"))
        submitted = RunSubmitted(run_id, f"job-{index}", pool, spec, user="alice")
        yield [NewEvent(run_stream, submitted, expected_version=0)]

        fitting = [entry for entry in idle if entry[1] == pool]
        if fitting:
            instance_id = fitting[0][0]
            idle.remove(fitting[0])
        else:
            instance_id = f"{chapter}-instance-{next_instance}"
            next_instance += 1
            stream = f"instance/{instance_id}"
            requested = InstanceRequested(
                instance_id, instance_id, pool, OFFER, 300, run_id=run_id
            )
            yield [NewEvent(stream, requested, expected_version=0)]
            yield [NewEvent(stream, InstanceProvisioned(instance_id, RESOURCES))]

        stream = f"instance/{instance_id}"
        yield [NewEvent(stream, InstanceClaimed(instance_id, run_id))]
        yield [NewEvent(run_stream, RunStarted(run_id, instance_id, pid=1000 + index))]
        yield [
            NewEvent(run_stream, RunFinished(run_id, rng.choice([0, 0, 0, 1]))),
            NewEvent(stream, InstanceReleased(instance_id, run_id)),
        ]
        idle.append((instance_id, pool))

        if len(idle) > 2 and rng.random() < 0.2:
            expired_id, _ = idle.pop(0)
            stream = f"instance/{expired_id}"
            yield [
                NewEvent(stream, InstanceIdleExpired(expired_id, 0, 300)),
                NewEvent(stream, InstanceTerminated(expired_id)),
            ]


def pool_event(name: str, expected_version: int | None = None) -> NewEvent:
    return NewEvent(f"pool/{name}", PoolCreated(name), expected_version)


def flip_byte(path: str, position: int, offset: int = 10) -> None:
    """Flip one bit in the stored body at ``position`` (the hash stays)."""
    with sqlite3.connect(path) as connection:
        (body,) = connection.execute(
            "SELECT body FROM events WHERE position = ?", (position,)
        ).fetchone()
        changed = bytearray(body)
        changed[offset] ^= 0x01
        connection.execute(
            "UPDATE events SET body = ? WHERE position = ?", (bytes(changed), position)
        )

    connection.close()


def execute(path: str, statement: str, parameters: tuple[object, ...] = ()) -> None:
    """Run one statement on the file through a separate connection."""
    with sqlite3.connect(path) as connection:
        connection.execute(statement, parameters)

    connection.close()


def file_bytes(path: str) -> dict[str, bytes]:
    """Return the bytes of the database and of its -wal and -shm, when present."""
    contents = {}
    for suffix in ("", "-wal", "-shm"):
        try:
            with open(path + suffix, "rb") as file:
                contents[suffix] = file.read()
        except FileNotFoundError:
            continue

    return contents
