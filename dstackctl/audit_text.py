"""Text for people from the audit reports: verification, replay, cost, explanation.

The functions take the plain JSON objects that the daemon's audit routes
return (and that ``dstackctl --log`` builds the same way) and return text.
Times are shown in the local zone, or in ``tz`` when given.
"""

from datetime import datetime, tzinfo
from typing import Any

from dstackctl import tables
from dstackctl.tables import NONE, format_local_time, format_price, render_table

JsonObject = dict[str, Any]

_COST_COLUMNS = ("provisioning_usd", "idle_usd", "busy_usd", "total_usd")


def format_usd(amount: str) -> str:
    """Format a USD amount given as decimal text with 4 decimals: ``$1.2346``."""
    # Imported here, because decimal adds about 3 ms to every command's start.
    from decimal import ROUND_HALF_EVEN, Decimal

    value = Decimal(amount).quantize(Decimal("0.0001"), ROUND_HALF_EVEN)

    return f"-${-value}" if value < 0 else f"${value}"


def verify_text(report: JsonObject, source: str) -> str:
    """Describe a ``VerifyReport``: the count and head, then each problem."""
    what = "records" if report["records"] != 1 else "record"
    summary = f"{report['records']} {what}"
    if report["source"] == "log":
        snapshots = report["snapshots"]
        summary += f" and {snapshots} snapshot{'s' if snapshots != 1 else ''}"

    head = f"head {report['head_position']}:{report['head_hash']}"
    if report["ok"]:
        return f"OK: {source} verified: {summary}; {head}"

    lines = [f"FAILED: {source}: {summary} verified before the first problem; {head}"]
    lines.extend(
        f"position {problem['position']} ({problem['kind']}): {problem['message']}"
        for problem in report["problems"]
    )

    return "\n".join(lines)


def replay_text(view: JsonObject, tz: tzinfo | None = None) -> str:
    """Render a ``ReplayView`` as the ``pool list``, ``pool ps`` and ``ps`` tables."""
    at = view.get("at")
    now = tables.parse_time(at) if at else datetime.now().astimezone()
    when = format_local_time(at, tz=tz) if at else "the start of the log"
    sections = [
        f"State after position {view['position']} ({when}).",
        tables.pools_table(view["pools"], tz=tz),
    ]
    if view["instances"]:
        sections.append(tables.instances_table(view["instances"], now))
    else:
        sections.append("No instances.")

    if view["runs"]:
        sections.append(tables.runs_table(view["runs"], now, tz=tz))
    else:
        sections.append("No runs.")

    return "\n\n".join(sections)


def cost_text(report: JsonObject, tz: tzinfo | None = None) -> str:
    """Render a ``CostReport``: one row per group, the total, and the what-if."""
    since = report.get("since")
    start = format_local_time(since, tz=tz) if since else "the start of the log"
    title = (
        f"Cost from {start} to {format_local_time(report['until'], tz=tz)}, "
        f"by {report['by']}:"
    )
    with_life = report["by"] == "instance"
    headers = ["GROUP", "NAME", "PROVISIONING", "IDLE", "BUSY", "TOTAL"]
    if with_life:
        headers.append("LIFE")

    rows = [_cost_row(row, with_life) for row in report["rows"]]
    totals = report["totals"]
    total_row = ["TOTAL", "", *(format_usd(totals[column]) for column in _COST_COLUMNS)]
    if with_life:
        total_row.append("")

    rows.append(total_row)
    sections = [title, render_table(headers, rows)]
    if report.get("what_if"):
        sections.append(what_if_text(report["what_if"]))

    return "\n\n".join(sections)


def _cost_row(row: JsonObject, with_life: bool) -> list[str]:
    cells = [
        row["group"],
        row["name"],
        *(format_usd(row[column]) for column in _COST_COLUMNS),
    ]
    if with_life:
        life = row.get("life_usd")
        cells.append(format_usd(life) if life is not None else NONE)

    return cells


def what_if_text(what_if: JsonObject) -> str:
    """Render the what-if of another idle duration next to the actual cost."""
    actual = what_if["actual"]
    simulated = what_if["simulated"]
    headers = ["", "ACTUAL", f"IDLE {what_if['idle_duration']}"]
    rows = [
        [name, format_usd(actual[column]), format_usd(simulated[column])]
        for name, column in (
            ("provisioning", "provisioning_usd"),
            ("idle", "idle_usd"),
            ("busy", "busy_usd"),
            ("total", "total_usd"),
        )
    ]
    for name, column in (
        ("claims reusing an instance", "reused_claims"),
        ("claims provisioning one", "provisioned_claims"),
    ):
        rows.append([name, str(actual[column]), str(simulated[column])])

    difference = what_if["difference_usd"]
    change = "more" if not difference.startswith("-") else "less"
    count = what_if["newly_provisioned_claims"]
    claims = "claim" if count == 1 else "claims"
    summary = (
        f"With an idle duration of {what_if['idle_duration']}, the same history "
        f"would have cost {format_usd(difference.lstrip('-'))} {change}, and "
        f"{count} {claims} that reused an instance would have had to provision "
        "a new one. Each claim stays on the instance it really used."
    )

    return "\n".join([render_table(headers, rows), "", summary])


def explanation_text(explanation: JsonObject, tz: tzinfo | None = None) -> str:
    """Render an ``Explanation``: the run, then each decision with its candidates."""
    submitted = format_local_time(explanation["submitted_at"], tz=tz)
    lines = [
        f"Run {explanation['run_name']} ({explanation['run_id']}) in pool "
        f"{explanation['pool']}, submitted {submitted} by "
        f"{explanation['user'] or NONE}, now {explanation['status']}.",
        f"Requirements: {explanation['requirements']}.",
    ]
    if explanation.get("note"):
        lines.append(f"Note: {explanation['note']}.")

    sections = ["\n".join(lines)]
    for decision in explanation["decisions"]:
        sections.append(_decision_text(decision, tz))

    return "\n\n".join(sections)


def _decision_text(decision: JsonObject, tz: tzinfo | None) -> str:
    when = format_local_time(decision["recorded_at"], tz=tz)
    heading = f"Position {decision['position']} ({when}): {decision['summary']}."
    candidates = decision["candidates"]
    if not candidates:
        return heading

    headers = ["KIND", "NAME", "PRICE", "OUTCOME", "REQUIREMENT", "REASON"]
    rows = [
        [
            candidate["kind"],
            candidate["name"],
            format_price(candidate["price"]),
            candidate["outcome"],
            candidate.get("requirement") or NONE,
            candidate.get("reason") or candidate.get("note") or NONE,
        ]
        for candidate in candidates
    ]

    return f"{heading}\n{render_table(headers, rows)}"
