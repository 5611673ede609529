"""The daemon's state and its one way of changing it: ``Core.commit``.

``Core`` owns the open event log, the projection folded from it and the lock
under which every decision is made. A decision reads the projection, appends
its events, and only then do effects on backends follow. Components that react
to changes (the scheduler, the idle reaper, waiting requests) subscribe to
commits instead of polling.
"""

import time
from collections.abc import Callable, Sequence

import anyio
import structlog

from events.log import EventLog
from events.model import Actor
from events.projection import State, apply
from events.record import NewEvent, Record

log = structlog.get_logger("dstackd.core")

CommitListener = Callable[[Sequence[Record]], None]


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class Core:
    """The log, the projection and the decision lock.

    Call ``commit`` only while holding ``lock``, so that what a decision read
    from ``state`` is still true when its events are appended.
    """

    def __init__(self, event_log: EventLog, state: State) -> None:
        self.log = event_log
        self.state = state
        self.lock = anyio.Lock()
        self._listeners: list[CommitListener] = []
        self._changed = anyio.Event()

    def subscribe(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    async def commit(self, entries: Sequence[NewEvent], actor: Actor) -> list[Record]:
        """Append ``entries`` as one atomic batch and fold them into the state."""
        if not self.lock.locked():
            raise RuntimeError("Core.commit called without holding Core.lock")

        records = await self.log.append(entries, actor)
        for record in records:
            apply(self.state, record)

        self.state.head_hash = self.log.head_hash
        for record in records:
            log.debug(
                "event_appended",
                position=record.position,
                stream=record.stream,
                type=type(record.event).__name__,
            )

        for listener in self._listeners:
            listener(records)

        changed, self._changed = self._changed, anyio.Event()
        changed.set()

        return records

    async def wait_changed(self) -> None:
        """Return after the next commit."""
        await self._changed.wait()

    async def stream_version(self, stream: str) -> int:
        return await self.log.stream_version(stream)
