"""Cost of instances from their price and timeline, per run, pool, user or instance.

Each instance's life is cut into segments as the projection shows it after each
record: *provisioning* (requested, not yet provisioned), *busy* (held by a run)
and *idle* (provisioned and held by no run, including the teardown after an
idle expiry or a removal, because the backend bills until the instance is
gone). The segments cover the whole life, from the request to the end
(terminated, lost or failed) or to the end of the report, so for every
instance busy + idle + provisioning equals its whole-life cost exactly.

Busy time is charged to the run that held the instance and that run's user,
idle time to the instance's pool, and provisioning to the run the instance was
requested for (to the pool for ``pool add``). Amounts are kept in exact integer
units (``events.audit.money``) and rounded to micro-USD only in the report.
"""

from collections.abc import Iterable
from typing import Literal, Protocol

import msgspec

from events.audit.money import format_usd, price_units, split_rounded
from events.audit.times import utc_iso
from events.errors import InvalidValueError
from events.projection import Instance, State, apply
from events.record import Record

Category = Literal["provisioning", "idle", "busy"]
CostGroup = Literal["run", "pool", "user", "instance"]
COST_GROUPS: tuple[CostGroup, ...] = ("run", "pool", "user", "instance")

_CATEGORY_INDEX = {"provisioning": 0, "idle": 1, "busy": 2}


class Window(msgspec.Struct, frozen=True):
    """The reported time range in UTC microseconds; ``start`` ``None`` is open."""

    start: int | None
    end: int

    def clip(self, start: int, stop: int) -> tuple[int, int] | None:
        """Return the part of ``[start, stop)`` inside the window, if any."""
        if self.start is not None:
            start = max(start, self.start)

        stop = min(stop, self.end)

        return (start, stop) if stop > start else None


class Segment(msgspec.Struct):
    """An instance's current kind of time since ``start``; ``owner`` is the run
    that claimed a busy instance."""

    category: Category
    owner: str | None
    start: int


class SegmentListener(Protocol):
    """Something that follows every instance's segments as they change."""

    def transition(
        self, instance: Instance, old: Segment | None, at: int, new: Segment | None
    ) -> None: ...

    def finish(self, instance: Instance, open_segment: Segment, end: int) -> None: ...


class Amounts:
    """Exact cost units and microseconds per category, in ``_CATEGORY_INDEX`` order."""

    __slots__ = ("units", "microseconds")

    def __init__(self) -> None:
        self.units = [0, 0, 0]
        self.microseconds = [0, 0, 0]

    def add(self, category: Category, units: int, microseconds: int) -> None:
        index = _CATEGORY_INDEX[category]
        self.units[index] += units
        self.microseconds[index] += microseconds


class CostRow(msgspec.Struct, frozen=True):
    """One group's cost; amounts are USD with 6 decimals, as text.

    ``life_usd`` (instance rows only) is price times the instance's life inside
    the window, computed on its own, so it can be checked against ``total_usd``.
    """

    group: CostGroup
    key: str
    name: str
    provisioning_usd: str
    idle_usd: str
    busy_usd: str
    total_usd: str
    provisioning_seconds: float
    idle_seconds: float
    busy_seconds: float
    life_usd: str | None = None


class CostTotals(msgspec.Struct, frozen=True):
    provisioning_usd: str
    idle_usd: str
    busy_usd: str
    total_usd: str
    provisioning_seconds: float
    idle_seconds: float
    busy_seconds: float
    instances: int


class WhatIfTotals(msgspec.Struct, frozen=True):
    """Cost and claims under one idle policy.

    ``reused_claims`` took an instance that was already there;
    ``provisioned_claims`` had to wait for a new one.
    """

    provisioning_usd: str
    idle_usd: str
    busy_usd: str
    total_usd: str
    claims: int
    reused_claims: int
    provisioned_claims: int


class WhatIf(msgspec.Struct, frozen=True):
    """The same history under ``idle_duration`` next to what it really cost.

    ``newly_provisioned_claims`` reused an instance in reality but would have
    had to provision one under ``idle_duration``.
    """

    idle_duration: str
    actual: WhatIfTotals
    simulated: WhatIfTotals
    difference_usd: str
    newly_provisioned_claims: int


class CostReport(msgspec.Struct, frozen=True):
    """Cost from ``since`` (``None``: the start of the log) to ``until``.

    ``until`` is the requested end or the time of the report, whichever is
    earlier; segments still open are charged up to it.
    """

    by: CostGroup
    since: str | None
    until: str
    rows: tuple[CostRow, ...]
    totals: CostTotals
    what_if: WhatIf | None = None


def check_group(text: str) -> CostGroup:
    """Return ``text`` as a cost grouping, or raise ``InvalidValueError``."""
    for group in COST_GROUPS:
        if text == group:
            return group

    raise InvalidValueError("by", text, "one of " + ", ".join(COST_GROUPS))


def segment_of(instance: Instance) -> tuple[Category, str | None] | None:
    """Return the instance's kind of time and its holder now, or ``None`` once ended."""
    if instance.status in ("terminated", "failed"):
        return None

    if instance.run_id is not None:
        return "busy", instance.run_id

    if instance.provisioned_at is None:
        return "provisioning", None

    return "idle", None


class CostTracker:
    """Folds records into the projection and charges each instance's segments.

    Feed records in log order with ``add``, stopping after the window's end,
    then call ``report`` once.
    """

    def __init__(self, window: Window, listener: SegmentListener | None = None) -> None:
        self.window = window
        self.state = State()
        self._listener = listener
        self._open: dict[str, Segment] = {}
        self._instances: dict[str, Amounts] = {}
        self._pools: dict[str, Amounts] = {}
        self._runs: dict[str, Amounts] = {}
        self._users: dict[str, Amounts] = {}
        # Idle time and the provisioning of ``pool add`` instances, per pool:
        # the part of a pool's cost that no run caused.
        self._pool_overhead: dict[str, Amounts] = {}

    def add(self, record: Record) -> None:
        touched = self._touched_instances(record)
        apply(self.state, record)
        for instance_id in touched:
            self._update(instance_id, record.recorded_at)

    def _touched_instances(self, record: Record) -> tuple[str, ...]:
        instance_id = getattr(record.event, "instance_id", None)
        if instance_id is not None:
            return (instance_id,)

        run = self.state.runs.get(getattr(record.event, "run_id", None) or "")
        if run is not None and run.instance_id is not None:
            return (run.instance_id,)

        return ()

    def _update(self, instance_id: str, at: int) -> None:
        instance = self.state.instances.get(instance_id)
        if instance is None:
            return

        now = segment_of(instance)
        old = self._open.get(instance_id)
        if old is not None and now is not None and (old.category, old.owner) == now:
            return

        new = None if now is None else Segment(now[0], now[1], at)
        if old is not None:
            self._charge(instance, old, at)

        if self._listener is not None and (old is not None or new is not None):
            self._listener.transition(instance, old, at, new)

        if new is None:
            self._open.pop(instance_id, None)
        else:
            self._open[instance_id] = new

    def _charge(self, instance: Instance, segment: Segment, stop: int) -> None:
        clipped = self.window.clip(segment.start, stop)
        if clipped is None:
            return

        duration = clipped[1] - clipped[0]
        units = price_units(instance.offer.price) * duration
        category = segment.category
        for amounts in self._accounts(instance, segment):
            amounts.add(category, units, duration)

    def _accounts(self, instance: Instance, segment: Segment) -> Iterable[Amounts]:
        """Return the accounts a segment of ``instance`` is charged to."""
        yield _account(self._instances, instance.id)
        yield _account(self._pools, instance.pool)
        run_id = segment.owner
        if segment.category == "provisioning":
            run_id = instance.for_run

        run = self.state.runs.get(run_id or "")
        if segment.category == "idle" or run is None:
            yield _account(self._pool_overhead, instance.pool)
            return

        yield _account(self._runs, run.id)
        yield _account(self._users, run.user)

    def report(self, by: CostGroup) -> CostReport:
        """Charge the open segments up to the window's end and build the report."""
        end = self.window.end
        for instance_id, segment in list(self._open.items()):
            instance = self.state.instances[instance_id]
            self._charge(instance, segment, end)
            if self._listener is not None:
                self._listener.finish(instance, segment, end)

        self._open.clear()
        rows = sorted(self._rows(by), key=_row_order)

        return CostReport(
            by=by,
            since=None if self.window.start is None else utc_iso(self.window.start),
            until=utc_iso(end),
            rows=tuple(row for _, row in rows),
            totals=self._totals(),
        )

    def _rows(self, by: CostGroup) -> list[tuple[int, CostRow]]:
        state = self.state
        match by:
            case "instance":
                return [
                    _row(
                        "instance",
                        key,
                        state.instances[key].name,
                        amounts,
                        self._life_units(state.instances[key]),
                    )
                    for key, amounts in self._instances.items()
                ]
            case "pool":
                return [
                    _row("pool", key, key, amounts)
                    for key, amounts in self._pools.items()
                ]
            case "run":
                rows = [
                    _row("run", key, state.runs[key].name, amounts)
                    for key, amounts in self._runs.items()
                ]
            case "user":
                rows = [
                    _row("user", key, key or "-", amounts)
                    for key, amounts in self._users.items()
                ]

        rows.extend(
            _row("pool", key, key, amounts)
            for key, amounts in self._pool_overhead.items()
        )

        return rows

    def _life_units(self, instance: Instance) -> int:
        stop = instance.ended_at if instance.ended_at is not None else self.window.end
        clipped = self.window.clip(instance.requested_at, stop)
        if clipped is None:
            return 0

        return price_units(instance.offer.price) * (clipped[1] - clipped[0])

    def exact_totals(self) -> Amounts:
        """Return the sum over all instances, in exact units."""
        totals = Amounts()
        for amounts in self._instances.values():
            for index in range(3):
                totals.units[index] += amounts.units[index]
                totals.microseconds[index] += amounts.microseconds[index]

        return totals

    def _totals(self) -> CostTotals:
        totals = self.exact_totals()
        microseconds = totals.microseconds
        provisioning, idle, busy = split_rounded(totals.units)

        return CostTotals(
            provisioning_usd=format_usd(provisioning),
            idle_usd=format_usd(idle),
            busy_usd=format_usd(busy),
            total_usd=format_usd(provisioning + idle + busy),
            provisioning_seconds=microseconds[0] / 1_000_000,
            idle_seconds=microseconds[1] / 1_000_000,
            busy_seconds=microseconds[2] / 1_000_000,
            instances=len(self._instances),
        )


def _account(accounts: dict[str, Amounts], key: str) -> Amounts:
    amounts = accounts.get(key)
    if amounts is None:
        amounts = accounts[key] = Amounts()

    return amounts


def _row(
    group: CostGroup,
    key: str,
    name: str,
    amounts: Amounts,
    life_units: int | None = None,
) -> tuple[int, CostRow]:
    """Build a row; returns its exact total units too, for sorting."""
    provisioning, idle, busy = split_rounded(amounts.units)
    seconds = [value / 1_000_000 for value in amounts.microseconds]
    life_usd = None
    if life_units is not None:
        life_usd = format_usd(split_rounded([life_units])[0])

    row = CostRow(
        group=group,
        key=key,
        name=name,
        provisioning_usd=format_usd(provisioning),
        idle_usd=format_usd(idle),
        busy_usd=format_usd(busy),
        total_usd=format_usd(provisioning + idle + busy),
        provisioning_seconds=seconds[0],
        idle_seconds=seconds[1],
        busy_seconds=seconds[2],
        life_usd=life_usd,
    )

    return sum(amounts.units), row


def _row_order(item: tuple[int, CostRow]) -> tuple[int, str, str, str]:
    units, row = item

    return -units, row.group, row.name, row.key
