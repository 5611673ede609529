"""Views of the projection for API responses: pools, instances, runs, events."""

import shlex
from datetime import UTC, datetime

import msgspec

from dstackd import api
from dstackd.runs import RunFiles
from events.grammar import format_duration
from events.model import Offer
from events.projection import (
    LIVE_INSTANCE_STATUSES,
    Instance,
    Pool,
    Run,
    RunAttempt,
    State,
    shown_reason,
    shown_status,
)
from events.record import Record, encode_body


def iso(microseconds: int | None) -> str | None:
    if microseconds is None:
        return None

    return datetime.fromtimestamp(microseconds / 1_000_000, UTC).isoformat()


def pool_view(state: State, name: str, pool: Pool | None) -> api.PoolView:
    instances = [
        i for i in state.live_instances() if i.pool == name and i.status in LIVE_INSTANCE_STATUSES
    ]
    return api.PoolView(
        name=name,
        default=state.default_pool_name() == name,
        created_at=iso(pool.created_at) if pool else "",
        instances=len(instances),
        idle=sum(1 for i in instances if i.status == "idle"),
        busy=sum(1 for i in instances if i.status == "busy"),
    )


def instance_view(state: State, instance: Instance, now_us: int) -> api.InstanceView:
    run = state.runs.get(instance.run_id or "")
    idle_seconds = None
    if instance.status == "idle" and instance.idle_since is not None:
        idle_seconds = max(0.0, (now_us - instance.idle_since) / 1_000_000)

    reason = shown_reason(instance)
    return api.InstanceView(
        id=instance.id,
        name=instance.name,
        pool=instance.pool,
        backend=instance.offer.backend,
        region=instance.offer.region,
        instance_type=instance.offer.instance_type,
        resources=instance.resources.describe(),
        spot=instance.offer.spot,
        price=instance.offer.price,
        status=instance.status,
        schedulable=instance.schedulable,
        run=run.name if run else None,
        idle_since=iso(instance.idle_since),
        idle_seconds=idle_seconds,
        idle_duration=format_duration(instance.idle_duration),
        created_at=iso(instance.requested_at) or "",
        reason=reason,
        reachable=instance.reachable,
        termination_attempts=instance.termination_attempts,
    )


def run_view(state: State, run: Run, run_files: RunFiles) -> api.RunView:
    instance = state.instances.get(run.instance_id or "")
    wait_ms = None
    if run.started_at is not None:
        wait_ms = (run.started_at - run.submitted_at) / 1000

    command = shlex.join(run.spec.argv) if run.spec.argv else "; ".join(run.spec.commands)
    if run.spec.type == "dev-environment":
        command = "; ".join(("(dev environment)", *run.spec.init))

    return api.RunView(
        id=run.id,
        name=run.name,
        pool=run.pool,
        type=run.spec.type,
        status=shown_status(run),
        command=command,
        user=run.user,
        instance=instance.name if instance else None,
        submitted_at=iso(run.submitted_at) or "",
        started_at=iso(run.started_at),
        ended_at=iso(run.ended_at),
        exit_status=run.exit_status,
        reason=run.reason,
        wait_ms=wait_ms,
        log_path=str(run_files.log_path(run.id)),
        url=run.url if run.ready else None,
        ports=list(run.spec.ports) or ([run.spec.port] if run.spec.port else []),
        attempt=len(run.history) + 1,
        restarts=run.restarts,
        history=[attempt_view(state, attempt) for attempt in run.history],
    )



def attempt_view(state: State, attempt: RunAttempt) -> api.AttemptView:
    instance = state.instances.get(attempt.instance_id or "")
    return api.AttemptView(
        number=attempt.number,
        trigger=attempt.trigger,
        reason=attempt.reason,
        instance=instance.name if instance else None,
        started_at=iso(attempt.started_at),
        ended_at=iso(attempt.ended_at),
        exit_status=attempt.exit_status,
    )


def offer_view(offer: Offer) -> api.OfferView:
    return api.OfferView(
        backend=offer.backend,
        region=offer.region,
        instance_type=offer.instance_type,
        resources=offer.resources.describe(),
        spot=offer.spot,
        price=offer.price,
        offer=offer,
    )


_event_encoder = msgspec.json.Encoder()


def event_view(record: Record, record_hash: bytes = b"") -> api.EventView:
    actor = record.actor.name if record.actor.uid is None else f"{record.actor.name} (uid {record.actor.uid})"
    return api.EventView(
        position=record.position,
        stream=record.stream,
        version=record.version,
        recorded_at=iso(record.recorded_at) or "",
        actor=actor,
        type=type(record.event).__name__,
        event=msgspec.Raw(_event_encoder.encode(record.event)),
        hash=record_hash.hex(),
    )


__all__ = ["encode_body", "event_view", "instance_view", "offer_view", "pool_view", "run_view"]
