"""The audit operations over one ``LogReader``, as the daemon and dstackctl call them.

The daemon runs these on a read-only connection to its own log, in a worker
thread; ``events.audit.offline`` runs them on a log file. Both get the same
results from the same records.
"""

from collections.abc import Iterator

import msgspec

from events.audit.cost import CostGroup, CostReport, CostTracker, Window
from events.audit.explain import (
    Explanation,
    explain_run,
    find_run,
    placement_instances,
)
from events.audit.export import iter_export
from events.audit.idle_policy import IdlePolicySimulation
from events.audit.records import EventFilter, encode_event_line, iter_checked
from events.audit.times import utc_iso
from events.errors import InvalidValueError
from events.log_reader import LogReader
from events.model import Duration
from events.snapshot import load_state_offline

# Lines joined into one write when streaming event lines or an export.
LINES_PER_WRITE = 512


def cost_report(
    reader: LogReader,
    *,
    since: int | None,
    until: int | None,
    now: int,
    by: CostGroup,
    idle_duration: Duration | None = None,
) -> CostReport:
    """Compute the cost from ``since`` to ``until`` (default and cap: ``now``).

    With ``idle_duration``, the report also contains what the same history would
    have cost under that idle duration. Reads every record up to the window's
    end, verified, in chunks.

    Raises:
        InvalidValueError: ``since`` is after ``until``.
    """
    if since is not None and until is not None and since > until:
        raise InvalidValueError(
            "since", utc_iso(since), f"a time before --until {utc_iso(until)}"
        )

    end = now if until is None else min(until, now)
    window = Window(since, end)
    simulation = None
    if idle_duration is not None:
        simulation = IdlePolicySimulation(window, idle_duration)

    tracker = CostTracker(window, simulation)
    for record in reader.records(verify=True):
        if record.recorded_at > end:
            break

        tracker.add(record)

    report = tracker.report(by)
    if simulation is None:
        return report

    what_if = simulation.what_if(tracker.exact_totals())

    return msgspec.structs.replace(report, what_if=what_if)


def explain(reader: LogReader, run_name: str) -> Explanation:
    """Explain the placement of the run with this id, or the newest with this name.

    Raises:
        RunNotFoundError: no such run in the log.
    """
    state = load_state_offline(reader)
    run = find_run(state, run_name)

    return explain_run(reader, run, placement_instances(state, run))


def event_lines(
    reader: LogReader, event_filter: EventFilter, after: int = 0
) -> Iterator[bytes]:
    """Yield the JSON line of each record after ``after`` that the filter selects."""
    for record, _, record_hash in iter_checked(reader, after):
        if event_filter.is_past(record):
            return

        if event_filter.matches(record):
            yield encode_event_line(record, record_hash)


def export_lines(reader: LogReader) -> Iterator[bytes]:
    """Yield the export of the whole log, line by line, verifying as it goes."""
    return iter_export(iter_checked(reader))


def batched(lines: Iterator[bytes], size: int = LINES_PER_WRITE) -> Iterator[bytes]:
    """Join up to ``size`` consecutive lines into one chunk."""
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield b"".join(batch)
            batch.clear()

    if batch:
        yield b"".join(batch)
