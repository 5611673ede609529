"""Placement: which idle instance or which offer a run goes to, and why.

Pure functions over the projection. The scheduler calls them under the
decision lock and records the outcome, candidates included, in the claim or
request event, so ``explain`` can show it later.
"""

import msgspec

from events.event_types import Candidate
from events.matching import mismatch
from events.model import Offer, Requirements
from events.projection import Instance, Run, State

# How many losing candidates of each kind are recorded with a placement.
MAX_RECORDED_CANDIDATES = 20


class Placement(msgspec.Struct, frozen=True):
    """The outcome for one run.

    Exactly one of ``instance_id`` and ``offer`` is set when the run can go
    somewhere now. ``wait`` means a fitting instance exists but is busy, so the
    run stays queued. Otherwise ``reason`` gives the reason nothing fits.
    """

    candidates: tuple[Candidate, ...]
    instance_id: str | None = None
    offer: Offer | None = None
    wait: bool = False
    reason: str | None = None


def instance_offer(instance: Instance) -> Offer:
    """Describe a live instance as an offer, so one matcher serves both."""
    return Offer(
        backend=instance.offer.backend,
        region=instance.offer.region,
        instance_type=instance.offer.instance_type,
        resources=instance.resources,
        spot=instance.offer.spot,
        price=instance.offer.price,
    )


def _wants_gpu(requirements: Requirements) -> bool:
    gpu = requirements.gpu
    return gpu is not None and not (gpu.count.max == 0)


def _instance_rejection(instance: Instance, run: Run) -> str | None:
    """Return why ``instance`` cannot take ``run`` now, or None if it can."""
    if run.spec.instance is not None and run.spec.instance not in (
        instance.name,
        instance.id,
    ):
        return f"not the requested instance {run.spec.instance}"

    reason = mismatch(run.spec.requirements, instance_offer(instance))
    if reason is not None:
        return reason

    if not instance.schedulable:
        return f"{instance.status}: {instance.reason or 'takes no new runs'}"

    if not instance.reachable:
        return f"unreachable: {instance.unreachable_error or 'health check failed'}"

    if instance.status == "busy":
        return f"busy with run {instance.run_id}"

    if instance.status != "idle":
        return instance.status

    return None


def choose_instance(
    state: State, run: Run, exclude: set[str] | frozenset[str] = frozenset()
) -> Placement:
    """Pick the idle instance for ``run`` in its pool, if one fits.

    Order: a run that requests no GPU avoids GPU instances while a GPU-less one
    fits; then the cheapest; then the one idle longest. Instances in
    ``exclude`` were claimed earlier in the same pass and count as busy.
    """
    fitting: list[Instance] = []
    rejected: list[Candidate] = []
    busy_but_fitting = False
    for instance in state.live_instances():
        if instance.pool != run.pool or instance.status in ("terminated", "failed"):
            continue

        reason = _instance_rejection(instance, run)
        if reason is None and instance.id in exclude:
            reason = "busy with run placed in the same pass"

        if reason is None:
            fitting.append(instance)
            continue

        if reason.startswith("busy with run"):
            busy_but_fitting = True

        rejected.append(
            Candidate("instance", instance.name, instance.offer.price, rejected=reason)
        )

    wants_gpu = _wants_gpu(run.spec.requirements)
    fitting.sort(
        key=lambda i: (
            0 if wants_gpu or not i.resources.gpus else 1,
            i.offer.price,
            i.idle_since or 0,
        )
    )
    candidates = [
        Candidate(
            "instance",
            instance.name,
            instance.offer.price,
            note="chosen" if index == 0 else "fits, but ranked lower",
        )
        for index, instance in enumerate(fitting)
    ]
    candidates = candidates[:MAX_RECORDED_CANDIDATES] + rejected[:MAX_RECORDED_CANDIDATES]
    if fitting:
        return Placement(tuple(candidates), instance_id=fitting[0].id)

    return Placement(tuple(candidates), wait=busy_but_fitting)


def choose_offer(
    run: Run, offers: list[Offer], instance_candidates: tuple[Candidate, ...]
) -> Placement:
    """Pick the cheapest offer that fits ``run``, keeping why others failed.

    ``offers`` come from the backends already filtered by the requirements;
    they are checked again here so the record names any mismatch.
    """
    fitting: list[Offer] = []
    rejected: list[Candidate] = []
    for offer in offers:
        reason = mismatch(run.spec.requirements, offer)
        if reason is None:
            fitting.append(offer)
        else:
            rejected.append(
                Candidate("offer", _offer_name(offer), offer.price, rejected=reason)
            )

    fitting.sort(key=lambda offer: offer.price)
    chosen = [
        Candidate(
            "offer",
            _offer_name(offer),
            offer.price,
            note="chosen" if index == 0 else "fits, but costs more",
        )
        for index, offer in enumerate(fitting[:MAX_RECORDED_CANDIDATES])
    ]
    candidates = instance_candidates + tuple(chosen) + tuple(rejected[:MAX_RECORDED_CANDIDATES])
    if fitting:
        return Placement(candidates, offer=fitting[0])

    return Placement(candidates, reason="no offer fits")


def _offer_name(offer: Offer) -> str:
    return f"{offer.backend}/{offer.region}/{offer.instance_type}"


def describe_rejections(candidates: tuple[Candidate, ...]) -> str:
    """Summarise rejected candidates for an error message."""
    reasons = [f"{c.name}: {c.rejected}" for c in candidates if c.rejected]
    if not reasons:
        return "no instances in the pool"

    shown = "; ".join(reasons[:5])
    if len(reasons) > 5:
        shown += f"; and {len(reasons) - 5} more"

    return shown
