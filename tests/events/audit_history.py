"""A scripted history with known prices and times, written through ``EventLog``.

Times are minutes after ``T0``; the log's clock is set before each append, so
every record carries exactly the time the script gives it. The expected costs
in the audit tests are computed by hand from this script.
"""

import hashlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from events.event_types import (
    Candidate,
    Event,
    InstanceClaimed,
    InstanceIdleExpired,
    InstanceProvisioned,
    InstanceProvisioningFailed,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminated,
    InstanceTerminationRequested,
    PoolCreated,
    RunFailed,
    RunFinished,
    RunSpec,
    RunStarted,
    RunSubmitted,
)
from events.grammar import build_requirements
from events.log import EventLog
from events.log_reader import LogReader
from events.model import Actor, Offer, Resources
from events.projection import State, apply, encode_state
from events.record import NewEvent

T0 = int(datetime(2025, 3, 1, 12, 0, tzinfo=UTC).timestamp()) * 1_000_000
MINUTE = 60_000_000
ALICE = Actor(1000, "alice")
BOB = Actor(1001, "bob")
CAROL = Actor(1002, "carol")

SMALL = Resources(cpus=2, memory_gb=8.0)
LARGE = Resources(cpus=8, memory_gb=32.0)
# Pool-added instance A: $1.20/h. Run-created B: $0.60/h. C fails: $2.40/h.
OFFER_A = Offer("local", "local", "local-8cpu", LARGE, price=1.2)
OFFER_B = Offer("local", "local", "local-2cpu", SMALL, price=0.6)
OFFER_C = Offer("local", "local", "local-8cpu-b", LARGE, price=2.4)

SPEC_SMALL = RunSpec(
    argv=("true",), requirements=build_requirements(cpu="2", memory="8GB")
)
SPEC_LARGE = RunSpec(
    argv=("true",), requirements=build_requirements(cpu="4..", memory="16GB..")
)


def at(minutes: float) -> int:
    return T0 + int(minutes * MINUTE)


class ScriptedLog:
    """An ``EventLog`` whose clock reads whatever the script set last."""

    def __init__(self, log: EventLog, clock: list[int]) -> None:
        self.log = log
        self._clock = clock

    @classmethod
    async def open(cls, path: Path) -> "ScriptedLog":
        clock = [T0]
        log = await EventLog.open(path, synchronous="OFF", clock=lambda: clock[0])
        return cls(log, clock)

    async def append(
        self, minutes: float, entries: Sequence[tuple[str, Event]], actor: Actor = ALICE
    ) -> int:
        """Append ``(stream, event)`` pairs at ``minutes`` after T0; return the
        position of the last one."""
        self._clock[0] = at(minutes)
        records = await self.log.append(
            [NewEvent(stream, event) for stream, event in entries], actor
        )
        return records[-1].position

    async def close(self) -> None:
        await self.log.close()


CLAIM_A_REJECTS_B = (
    Candidate("instance", "a", 1.2, note="chosen"),
    Candidate("instance", "b", 0.6, rejected="cpu 2 is outside 4.."),
)


async def write_history(path: Path) -> dict[str, int]:
    """Write the scripted history; return the positions the tests refer to.

    Pool ``main``. Instance ``a`` ($1.20/h) is added to the pool at 0, ready at
    2, held by run r1 (alice) from 10 to 40 and by r2 (bob) from 100 to 130,
    removed at 190 and gone at 191. Instance ``b`` ($0.60/h) is requested for
    run r3 (carol) at 50, ready and claimed at 53, released at 83, expires
    idle at 88 and is gone at 89. Instance ``c`` ($2.40/h) is requested for r4
    (alice) at 140 and fails to provision at 145.
    """
    scripted = await ScriptedLog.open(path)
    positions: dict[str, int] = {}
    try:
        await _write(scripted, positions)
    finally:
        await scripted.close()

    return positions


async def _write(log: ScriptedLog, positions: dict[str, int]) -> None:
    append = log.append
    await append(0, [("pool/main", PoolCreated("main"))])
    positions["a_requested"] = await append(
        0, [("instance/a", InstanceRequested("a", "a", "main", OFFER_A, 72 * 3600))]
    )
    await append(
        2, [("instance/a", InstanceProvisioned("a", LARGE))], Actor(None, "dstackd")
    )

    await append(
        10,
        [("run/r1", RunSubmitted("r1", "train-1", "main", SPEC_LARGE, "alice", 1000))],
    )
    positions["claim_r1"] = await append(
        10, [("instance/a", InstanceClaimed("a", "r1", CLAIM_A_REJECTS_B))]
    )
    await append(11, [("run/r1", RunStarted("r1", "a", 4242))])
    await append(
        40,
        [("run/r1", RunFinished("r1", 0)), ("instance/a", InstanceReleased("a", "r1"))],
    )

    await append(
        50,
        [("run/r3", RunSubmitted("r3", "eval-3", "main", SPEC_SMALL, "carol", 1002))],
        CAROL,
    )
    offer_candidates = (
        Candidate("instance", "a", 1.2, rejected="busy with run r9"),
        Candidate("offer", "local/local/local-2cpu", 0.6, note="chosen"),
        Candidate(
            "offer", "local/local/local-1cpu", 0.3, rejected="cpu 1 is outside 2"
        ),
    )
    positions["b_requested"] = await append(
        50,
        [
            (
                "instance/b",
                InstanceRequested(
                    "b",
                    "b",
                    "main",
                    OFFER_B,
                    300,
                    SPEC_SMALL.requirements,
                    "r3",
                    offer_candidates,
                ),
            )
        ],
    )
    await append(
        53,
        [
            ("instance/b", InstanceProvisioned("b", SMALL)),
            ("instance/b", InstanceClaimed("b", "r3")),
        ],
    )
    await append(
        83,
        [("run/r3", RunFinished("r3", 0)), ("instance/b", InstanceReleased("b", "r3"))],
    )
    await append(88, [("instance/b", InstanceIdleExpired("b", at(83), 300))])
    await append(89, [("instance/b", InstanceTerminated("b"))])

    positions["submit_r2"] = await append(
        100,
        [("run/r2", RunSubmitted("r2", "train-2", "main", SPEC_LARGE, "bob", 1001))],
        BOB,
    )
    positions["claim_r2"] = await append(
        100, [("instance/a", InstanceClaimed("a", "r2", CLAIM_A_REJECTS_B))]
    )
    await append(
        130,
        [("run/r2", RunFinished("r2", 0)), ("instance/a", InstanceReleased("a", "r2"))],
    )

    await append(
        140,
        [("run/r4", RunSubmitted("r4", "big-4", "main", SPEC_LARGE, "alice", 1000))],
    )
    await append(
        140,
        [
            (
                "instance/c",
                InstanceRequested("c", "c", "main", OFFER_C, 300, run_id="r4"),
            )
        ],
    )
    await append(
        145,
        [
            ("instance/c", InstanceProvisioningFailed("c", "no capacity")),
            ("run/r4", RunFailed("r4", "provisioning instance c failed: no capacity")),
        ],
    )

    await append(
        190, [("instance/a", InstanceTerminationRequested("a", "removed by alice"))]
    )
    positions["head"] = await append(191, [("instance/a", InstanceTerminated("a"))])


def add_snapshot(path: Path, position: int) -> None:
    """Store a valid snapshot of the state after ``position``.

    The row is written with sqlite3, the way ``EventLog.store_snapshot`` lays
    it out, so the tests fix exactly which snapshots the file contains.
    """
    state = State()
    with LogReader.open(path) as reader:
        for record, digest in reader.records_with_hashes(until=position):
            apply(state, record, digest)

    data = encode_state(state)
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(
                "INSERT INTO snapshots (position, record_hash, state, state_hash,"
                " created_at) VALUES (?, ?, ?, ?, ?)",
                (position, state.head_hash, data, hashlib.sha256(data).digest(), T0),
            )
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def rows(path: Path) -> list[tuple[int, str, int, bytes, bytes]]:
    """Return every row of the events table, in position order."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT position, stream, version, body, hash FROM events ORDER BY position"
        ).fetchall()
    finally:
        connection.close()
