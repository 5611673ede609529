"""Reconciliation of the log with the EC2 instances tagged with this daemon's id.

At start and then periodically, the reconciler lists the tagged instances and
compares them with the projection:

- An instance whose record is still provisioning is left alone: the
  provisioning task (started again after a restart) finds it by its tag and
  adopts it instead of launching another.
- A tagged instance with no record is an orphan, which can only come from a
  log that lost records. It is terminated once it is older than the orphan
  grace period.
- A running instance whose record ended (provisioning failed, or terminated)
  is terminated at once, and so is a second instance with the same tag as a
  provisioned one.
- An instance the log believes alive that EC2 no longer lists, or lists as
  shutting down or terminated, is recorded as lost, which fails its run. A
  record younger than the lost grace period is skipped, because
  ``DescribeInstances`` may not list a new instance yet.
"""

import time
from collections.abc import Callable

import anyio
import msgspec
import structlog

from dstackd.backends.aws import BACKEND_NAME, AwsBackend, Ec2Instance
from dstackd.backends.base import BackendError
from dstackd.core import Core
from events.event_types import InstanceLost
from events.model import DAEMON_ACTOR
from events.projection import Instance, State
from events.record import NewEvent

log = structlog.get_logger(__name__)

# Records in these statuses stand for a machine that should exist.
_ALIVE_STATUSES = frozenset({"idle", "busy"})


class ReconcileReport(msgspec.Struct):
    """Findings and actions of one pass, by EC2 instance id or instance id."""

    orphans_terminated: list[str] = []
    orphans_in_grace: list[str] = []
    leftovers_terminated: list[str] = []
    lost: list[str] = []
    fresh_not_listed: list[str] = []


class Reconciler:
    """Compares the log with EC2 and repairs the differences.

    Args:
        interval: seconds between the end of one pass and the next.
        orphan_grace: seconds an untracked instance lives before termination.
        lost_grace: seconds after the provisioned record during which a
            missing instance is not yet declared lost.
        clock: seconds since the Unix epoch.
    """

    def __init__(
        self,
        core: Core,
        backend: AwsBackend,
        *,
        interval: float,
        orphan_grace: float,
        lost_grace: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.backend = backend
        self.interval = interval
        self.orphan_grace = orphan_grace
        self.lost_grace = lost_grace
        self.clock = clock

    async def run(self) -> None:
        """Reconcile now and then every interval, until cancelled."""
        while True:
            try:
                await self.reconcile_once()
            except BackendError as exc:
                log.warning("reconcile_failed", error=str(exc))

            await anyio.sleep(self.interval)

    async def reconcile_once(self) -> ReconcileReport:
        """Run one pass; see the module docstring.

        Raises:
            BackendError: listing the instances failed, so nothing was changed.
        """
        regions = self._regions(self.core.state)
        listed = await self.backend.list_tagged(regions)
        report = ReconcileReport()
        await self._terminate_untracked(listed, report)
        await self._record_lost(listed, report)
        log.info(
            "reconcile_finished",
            listed=len(listed),
            orphans_terminated=len(report.orphans_terminated),
            leftovers_terminated=len(report.leftovers_terminated),
            lost=len(report.lost),
        )

        return report

    def _regions(self, state: State) -> list[str]:
        """Return the configured regions plus those of recorded instances."""
        regions = list(self.backend.config.regions)
        for instance in state.instances.values():
            if (
                instance.backend == BACKEND_NAME
                and instance.offer.region not in regions
            ):
                regions.append(instance.offer.region)

        return regions

    async def _terminate_untracked(
        self, listed: list[Ec2Instance], report: ReconcileReport
    ) -> None:
        """Terminate orphans past their grace period and leftovers of ended records."""
        now = self.clock()
        to_terminate: dict[str, list[str]] = {}
        for ec2 in listed:
            if not ec2.alive:
                continue

            record = self.core.state.instances.get(ec2.instance_id)
            if record is None:
                if now - ec2.launched_at < self.orphan_grace:
                    report.orphans_in_grace.append(ec2.ec2_instance_id)
                    continue

                report.orphans_terminated.append(ec2.ec2_instance_id)
            elif _is_leftover(record, ec2):
                report.leftovers_terminated.append(ec2.ec2_instance_id)
            else:
                continue

            to_terminate.setdefault(ec2.region, []).append(ec2.ec2_instance_id)

        for region, ec2_ids in to_terminate.items():
            log.warning(
                "untracked_instances_terminating",
                region=region,
                ec2_instance_ids=ec2_ids,
            )
            await self.backend.terminate_ec2(region, ec2_ids)

    async def _record_lost(
        self, listed: list[Ec2Instance], report: ReconcileReport
    ) -> None:
        by_ec2_id = {ec2.ec2_instance_id: ec2 for ec2 in listed}
        now_us = int(self.clock() * 1_000_000)
        async with self.core.lock:
            entries: list[NewEvent] = []
            for record in self.core.state.instances.values():
                reason = self._lost_reason(record, by_ec2_id, now_us, report)
                if reason is None:
                    continue

                report.lost.append(record.id)
                entries.append(
                    NewEvent(
                        f"instance/{record.id}",
                        InstanceLost(record.id, reason, record.run_id),
                    )
                )

            if entries:
                await self.core.commit(entries, DAEMON_ACTOR)

        for instance_id in report.lost:
            log.error("instance_lost", instance_id=instance_id)

    def _lost_reason(
        self,
        record: Instance,
        by_ec2_id: dict[str, Ec2Instance],
        now_us: int,
        report: ReconcileReport,
    ) -> str | None:
        """Return why ``record`` is lost, or None while it may still exist."""
        if record.backend != BACKEND_NAME or record.status not in _ALIVE_STATUSES:
            return None

        ec2_instance_id = record.backend_data.get("ec2_instance_id", "")
        ec2 = by_ec2_id.get(ec2_instance_id)
        if ec2 is not None and ec2.alive:
            return None

        provisioned_at = record.provisioned_at or record.requested_at
        if now_us - provisioned_at < self.lost_grace * 1_000_000:
            report.fresh_not_listed.append(record.id)
            return None

        if ec2 is None:
            return f"EC2 no longer lists instance {ec2_instance_id}"

        return f"EC2 reports instance {ec2_instance_id} as {ec2.state}"


def _is_leftover(record: Instance, ec2: Ec2Instance) -> bool:
    """Tell whether a live EC2 instance should not exist for its record.

    That is the case when the record ended, or when the record is provisioned
    with another EC2 instance (a duplicate launch).
    """
    if record.status in ("failed", "terminated"):
        return True

    recorded = record.backend_data.get("ec2_instance_id")

    return recorded is not None and recorded != ec2.ec2_instance_id
