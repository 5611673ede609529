"""Why a run was placed where it was, from what the scheduler recorded at the time.

The scheduler stores the instances and offers it considered in the event that
carries its decision: ``InstanceClaimed`` (an idle instance taken) or
``InstanceRequested`` (a new instance from an offer). A run that nothing fits
ends its attempt with the rejections in the reason text.

Each rejected candidate carries the reason that ``events.matching`` or the
placement rules gave, such as ``cpu 1 is outside 2..``. This module adds which
of the run's requirements that reason is about. Nothing is recomputed from
today's instances or offers.
"""

from collections.abc import Callable, Mapping
from typing import Literal

import msgspec

from events.audit.times import utc_iso
from events.errors import DstackdError
from events.event_types import Candidate, InstanceClaimed, InstanceRequested, RunSpec
from events.grammar import format_gpu, format_range
from events.log_reader import LogReader
from events.matching import describe_requirements
from events.projection import Run, State
from events.record import Record, decode_body

Outcome = Literal["chosen", "fits", "rejected"]

# Instance statuses as placement reports them when an instance takes no run now.
_STATUSES = ("provisioning", "idle", "busy", "terminating", "failed", "terminated")

# Run events that end an attempt, by type name, with the verb shown for them. A
# failure to place a run is recorded this way, with the rejections in its text.
_ATTEMPT_ENDS = {"RunFailed": "failed", "RunRetried": "queued for a retry"}


class RunNotFoundError(DstackdError):
    """No run has the name or id given."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"run {name!r} not found; list runs with 'dstackctl ps -a'")


class CandidateView(msgspec.Struct, frozen=True):
    """A candidate as recorded, with the run requirement a rejection is about.

    ``requirement`` is the run's requirement in its text form (``cpu 2..``,
    ``an idle instance``), or ``None`` when the recorded reason names none.
    """

    kind: str
    name: str
    price: float
    outcome: Outcome
    requirement: str | None = None
    reason: str | None = None
    note: str | None = None


class Decision(msgspec.Struct, frozen=True):
    """One placement decision: the record that carries it and what it chose."""

    position: int
    recorded_at: str
    event: str
    summary: str
    candidates: tuple[CandidateView, ...] = ()


class Explanation(msgspec.Struct, frozen=True):
    run_id: str
    run_name: str
    pool: str
    user: str
    status: str
    submitted_at: str
    requirements: str
    decisions: tuple[Decision, ...]
    note: str | None = None


def find_run(state: State, name: str) -> Run:
    """Return the run with id ``name``, else the newest run named ``name``."""
    if name in state.runs:
        return state.runs[name]

    for run in reversed(state.runs.values()):
        if run.name == name:
            return run

    raise RunNotFoundError(name)


def placement_instances(state: State, run: Run) -> dict[str, str]:
    """Return the ids and names of the instances whose streams hold the run's
    placement decisions: the ones requested for it, the one it has now, and the
    ones earlier attempts held."""
    instances = {
        instance.id: instance.name
        for instance in state.instances.values()
        if instance.for_run == run.id
    }
    held = [run.instance_id]
    held.extend(attempt.instance_id for attempt in run.history)
    for instance_id in held:
        instance = state.instances.get(instance_id or "")
        if instance is not None:
            instances[instance.id] = instance.name

    return instances


def explain_run(
    reader: LogReader, run: Run, instances: Mapping[str, str]
) -> Explanation:
    """Collect the placement decisions of ``run`` from its stream and those of
    ``instances`` (ids to names, from ``placement_instances``).

    Reads only those streams, through the ``(stream, version)`` index.
    NOTE: these reads do not verify the hash chain; ``events verify`` does.
    """
    records = _decision_records(reader, run, instances)
    decisions = [_decision(record, run.spec, instances) for record in records]
    note = None
    if not decisions:
        if run.status == "submitted":
            note = "the run is queued: no placement decision is recorded yet"
        else:
            note = "no placement decision is recorded for this run"

    return Explanation(
        run_id=run.id,
        run_name=run.name,
        pool=run.pool,
        user=run.user,
        status=run.status,
        submitted_at=utc_iso(run.submitted_at),
        requirements=describe_run_requirements(run.spec),
        decisions=tuple(decisions),
        note=note,
    )


def _decision_records(
    reader: LogReader, run: Run, instances: Mapping[str, str]
) -> list[Record]:
    streams = [f"run/{run.id}", *(f"instance/{key}" for key in sorted(instances))]
    found: list[Record] = []
    for stream in streams:
        rows = reader.connection.execute(
            "SELECT body FROM events WHERE stream = ? ORDER BY version", (stream,)
        )
        for (body,) in rows:
            record = decode_body(body)
            if _is_decision(record, run.id):
                found.append(record)

    return sorted(found, key=lambda record: record.position)


def _is_decision(record: Record, run_id: str) -> bool:
    """Return whether ``record`` placed the run, or ended an attempt of it."""
    event = record.event
    if isinstance(event, InstanceClaimed | InstanceRequested):
        return event.run_id == run_id

    return type(event).__name__ in _ATTEMPT_ENDS


def _decision(record: Record, spec: RunSpec, instances: Mapping[str, str]) -> Decision:
    event = record.event
    candidates: tuple[Candidate, ...] = ()
    match event:
        case InstanceClaimed():
            name = instances.get(event.instance_id, event.instance_id)
            candidates = event.candidates
            if candidates:
                summary = f"claimed idle instance {name}"
            else:
                summary = f"claimed instance {name}, provisioned for this run"
        case InstanceRequested():
            offer = event.offer
            summary = (
                f"requested new instance {event.name} from offer {offer.backend}/"
                f"{offer.region}/{offer.instance_type} at ${offer.price:g}/h"
            )
            candidates = event.candidates
        case _:
            reason = getattr(event, "reason", "") or "no reason recorded"
            summary = f"{_ATTEMPT_ENDS[type(event).__name__]}: {reason}"

    return Decision(
        position=record.position,
        recorded_at=utc_iso(record.recorded_at),
        event=type(event).__name__,
        summary=summary,
        candidates=tuple(candidate_view(candidate, spec) for candidate in candidates),
    )


def candidate_view(candidate: Candidate, spec: RunSpec) -> CandidateView:
    outcome: Outcome = "fits"
    if candidate.rejected is not None:
        outcome = "rejected"
    elif candidate.note == "chosen":
        outcome = "chosen"

    requirement = None
    if candidate.rejected is not None:
        requirement = failed_requirement(candidate.rejected, spec)

    return CandidateView(
        kind=candidate.kind,
        name=candidate.name,
        price=candidate.price,
        outcome=outcome,
        requirement=requirement,
        reason=candidate.rejected,
        note=candidate.note,
    )


def failed_requirement(reason: str, spec: RunSpec) -> str | None:
    """Return the requirement of ``spec`` that a rejection ``reason`` is about.

    ``reason`` is the text ``events.matching.mismatch`` or the placement rules
    produced; it starts with the field it checks (``cpu 1 is outside 2..``).
    Returns ``None`` for a reason this function does not know.
    """
    for prefix, describe in _REQUIREMENTS:
        if reason.startswith(prefix):
            return describe(spec)

    status, colon, _ = reason.partition(":")
    if status in _STATUSES:
        return "a schedulable instance" if colon else "an idle instance"

    if " spot policy is " in reason:
        return f"spot policy {spec.requirements.spot_policy}"

    return None


def _backends(spec: RunSpec) -> str:
    return "backends " + ", ".join(spec.requirements.backends or ())


def _gpu(spec: RunSpec) -> str:
    gpu = spec.requirements.gpu
    return "gpu" if gpu is None else f"gpu {format_gpu(gpu)}"


def _disk(spec: RunSpec) -> str:
    disk = spec.requirements.disk
    return "disk" if disk is None else f"disk {format_range(disk, 'size')}"


def _max_price(spec: RunSpec) -> str:
    return f"max price ${spec.requirements.max_price:g}/h"


_REQUIREMENTS: tuple[tuple[str, Callable[[RunSpec], str]], ...] = (
    ("backend ", _backends),
    ("cpu ", lambda spec: f"cpu {format_range(spec.requirements.cpu, 'count')}"),
    (
        "memory ",
        lambda spec: f"memory {format_range(spec.requirements.memory, 'size')}",
    ),
    ("gpu ", _gpu),
    ("disk ", _disk),
    ("price ", _max_price),
    ("not the requested instance", lambda spec: f"instance {spec.instance}"),
    ("busy with run", lambda spec: "an idle instance"),
    ("unreachable", lambda spec: "a reachable instance"),
)


def describe_run_requirements(spec: RunSpec) -> str:
    """Format every requirement of a run, e.g. ``2..xCPU, 8GB.., on-demand``."""
    requirements = spec.requirements
    parts = [describe_requirements(requirements), requirements.spot_policy]
    if requirements.max_price is not None:
        parts.append(f"max price ${requirements.max_price:g}/h")

    if requirements.backends is not None:
        parts.append(_backends(spec))

    if spec.instance is not None:
        parts.append(f"instance {spec.instance}")

    return ", ".join(parts)
