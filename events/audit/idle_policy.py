"""What-if of another idle duration: the same history of claims, other expiries.

The model keeps every claim on the instance it really used, at the time it
really happened, and replays each instance's timeline under idle duration D:

- Provisioning and busy time stay as they were.
- An idle gap of at most D before a claim stays as it was. A longer gap
  costs D idle, then the instance expires and is torn down.
- The claim after such a gap needs a new instance, provisioned just in time.
  It costs the instance's own provisioning time and counts as a claim that
  had to provision.
- The last idle stretch lasts D when the instance really ended by idle expiry
  (to the report's end for ``off``), and otherwise until its real removal or
  loss, or D if that is shorter.
- Each expiry is followed by a teardown as long as the instance's real one.

With D equal to the real idle duration, the simulation reproduces the real
cost. NOTE: claims never move to another instance. So with a longer D, an
instance that really expired is not reused by a later claim that really got a
new instance, and the simulation overstates what a longer D costs.
"""

from events.audit.cost import Amounts, Category, Segment, WhatIf, WhatIfTotals, Window
from events.audit.money import format_usd, micro_usd, price_units, split_rounded
from events.grammar import format_duration
from events.model import Duration
from events.projection import Instance

_IDLE_EXPIRED_REASON = "idle duration expired"


class _Lineage:
    """One instance and the replacements the simulation gave it."""

    __slots__ = ("price", "provisioning_us", "claims", "expiries", "teardown_us")

    def __init__(self, price: int) -> None:
        self.price = price
        self.provisioning_us = 0
        self.claims = 0
        self.expiries: list[int] = []
        self.teardown_us = 0


class IdlePolicySimulation:
    """Follows the cost tracker's segments and charges them under idle duration D."""

    def __init__(self, window: Window, idle_duration: Duration) -> None:
        self._window = window
        self._idle_duration = idle_duration
        self._limit = None if idle_duration == "off" else idle_duration * 1_000_000
        self._lineages: dict[str, _Lineage] = {}
        self._amounts = Amounts()
        self.claims = 0
        self.reused_claims = 0
        self.newly_provisioned_claims = 0

    def transition(
        self, instance: Instance, old: Segment | None, at: int, new: Segment | None
    ) -> None:
        lineage = self._lineage(instance)
        expired = False
        if old is not None:
            expired = self._close(instance, lineage, old, at, new)

        if new is not None and new.category == "busy":
            self._count_claim(instance, lineage, new, at, expired)

        if new is None:
            self._end(lineage)

    def finish(self, instance: Instance, open_segment: Segment, end: int) -> None:
        lineage = self._lineage(instance)
        if open_segment.category == "idle":
            self._tail(instance, lineage, open_segment.start, end)
        else:
            self._charge(lineage, open_segment.category, open_segment.start, end)

        self._end(lineage)

    def what_if(self, actual: Amounts) -> WhatIf:
        """Compare the simulated cost with ``actual``, the tracker's exact totals."""
        provisioned = self.claims - self.reused_claims
        actual_totals = _totals(actual, self.claims, self.reused_claims, provisioned)
        reused = self.reused_claims - self.newly_provisioned_claims
        simulated = _totals(self._amounts, self.claims, reused, self.claims - reused)
        difference = micro_usd(sum(self._amounts.units)) - micro_usd(sum(actual.units))

        return WhatIf(
            idle_duration=format_duration(self._idle_duration),
            actual=actual_totals,
            simulated=simulated,
            difference_usd=format_usd(difference),
            newly_provisioned_claims=self.newly_provisioned_claims,
        )

    def _lineage(self, instance: Instance) -> _Lineage:
        lineage = self._lineages.get(instance.id)
        if lineage is None:
            lineage = _Lineage(price_units(instance.offer.price))
            self._lineages[instance.id] = lineage

        return lineage

    def _close(
        self,
        instance: Instance,
        lineage: _Lineage,
        old: Segment,
        at: int,
        new: Segment | None,
    ) -> bool:
        """Charge the segment that ended at ``at``; return whether the instance
        would have expired before the claim that ended it."""
        if old.category == "provisioning":
            lineage.provisioning_us = at - old.start

        if old.category != "idle":
            self._charge(lineage, old.category, old.start, at)
            return False

        if new is not None and new.category == "busy":
            return self._gap(lineage, old.start, at)

        self._tail(instance, lineage, old.start, at)

        return False

    def _gap(self, lineage: _Lineage, start: int, claimed_at: int) -> bool:
        """Charge an idle gap that a claim ended; return whether it expired."""
        limit = self._limit
        if limit is None or claimed_at - start <= limit:
            self._charge(lineage, "idle", start, claimed_at)
            return False

        self._charge(lineage, "idle", start, start + limit)
        lineage.expiries.append(start + limit)
        self._charge(
            lineage, "provisioning", claimed_at - lineage.provisioning_us, claimed_at
        )

        return True

    def _tail(
        self, instance: Instance, lineage: _Lineage, start: int, stop: int
    ) -> None:
        """Charge the last idle stretch, from ``start`` to the real end ``stop``."""
        limit = self._limit
        teardown_from = instance.terminating_since
        if teardown_from is not None:
            teardown_from = max(start, teardown_from)
            lineage.teardown_us = stop - teardown_from

        if instance.reason == _IDLE_EXPIRED_REASON and teardown_from is not None:
            if limit is None:
                self._charge(lineage, "idle", start, self._window.end)
                return

            expiry = start + limit
            self._charge(lineage, "idle", start, expiry + lineage.teardown_us)
            return

        removal = stop if teardown_from is None else teardown_from
        if limit is None or start + limit >= removal:
            self._charge(lineage, "idle", start, stop)
            return

        self._charge(lineage, "idle", start, start + limit + lineage.teardown_us)

    def _end(self, lineage: _Lineage) -> None:
        """Charge the teardowns after the expiries in the middle of the timeline."""
        for expiry in lineage.expiries:
            self._charge(lineage, "idle", expiry, expiry + lineage.teardown_us)

        lineage.expiries.clear()

    def _count_claim(
        self,
        instance: Instance,
        lineage: _Lineage,
        new: Segment,
        at: int,
        expired: bool,
    ) -> None:
        first_for_its_run = lineage.claims == 0 and instance.for_run == new.owner
        lineage.claims += 1
        window = self._window
        if (window.start is not None and at < window.start) or at > window.end:
            return

        self.claims += 1
        if first_for_its_run:
            return

        self.reused_claims += 1
        if expired:
            self.newly_provisioned_claims += 1

    def _charge(
        self, lineage: _Lineage, category: Category, start: int, stop: int
    ) -> None:
        clipped = self._window.clip(start, stop)
        if clipped is None:
            return

        duration = clipped[1] - clipped[0]
        self._amounts.add(category, lineage.price * duration, duration)


def _totals(
    amounts: Amounts, claims: int, reused: int, provisioned: int
) -> WhatIfTotals:
    provisioning, idle, busy = split_rounded(amounts.units)

    return WhatIfTotals(
        provisioning_usd=format_usd(provisioning),
        idle_usd=format_usd(idle),
        busy_usd=format_usd(busy),
        total_usd=format_usd(provisioning + idle + busy),
        claims=claims,
        reused_claims=reused,
        provisioned_claims=provisioned,
    )
