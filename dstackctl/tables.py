"""Text formatting of the daemon's JSON views for people: tables, times, durations.

The functions take the plain JSON objects that the daemon returns, with the
field names of ``PoolView``, ``OfferView``, ``InstanceView``, ``RunView`` and
``EventView``. They return text and never print or call the daemon.
"""

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any

JsonObject = dict[str, Any]

# A missing value in a table cell.
NONE = "-"
COMMAND_WIDTH = 48
SUMMARY_WIDTH = 120

# Nested event fields that are summarized by one of their own fields.
_NESTED_SUMMARY_FIELDS = {"offer": "instance_type"}


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Render left-aligned columns separated by two spaces, without trailing blanks."""
    all_rows = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(headers))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())

    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """Format a duration in its two largest units: ``12s``, ``4m``, ``2h10m``, ``3d4h``.

    Smaller units are truncated, not rounded, so an idle time never reads as
    longer than it is. Negative durations (clock skew) read as ``0s``.
    """
    total = max(int(seconds), 0)
    if total < 60:
        return f"{total}s"

    if total < 3600:
        return f"{total // 60}m"

    if total < 86400:
        hours, minutes = divmod(total // 60, 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"

    days, hours = divmod(total // 3600, 24)

    return f"{days}d{hours}h" if hours else f"{days}d"


def format_idle_duration(value: str | int | None) -> str:
    """Format an idle duration: a count of seconds as a duration, ``off`` as is."""
    if value is None:
        return NONE

    text = str(value)

    return format_duration(int(text)) if text.isdigit() else text


def format_wait(wait_ms: float | None) -> str:
    """Format a wait in milliseconds: ``850ms``, ``1.2s``, then as a duration."""
    if wait_ms is None:
        return NONE

    if wait_ms < 1000:
        return f"{wait_ms:.0f}ms"

    if wait_ms < 60_000:
        return f"{wait_ms / 1000:.1f}s"

    return format_duration(wait_ms / 1000)


def format_price(price: float) -> str:
    """Format an hourly price in USD with four decimals, e.g. ``$0.0042``."""
    return f"${price:.4f}"


def format_spot(spot: bool) -> str:
    return "spot" if spot else "on-demand"


def parse_time(value: str) -> datetime:
    """Parse an ISO 8601 time from the daemon; a time without an offset is UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)

    return parsed


def format_local_time(
    value: str | None, now: datetime | None = None, tz: tzinfo | None = None
) -> str:
    """Format a daemon time in the local zone (or ``tz``).

    A time on the same local day as ``now`` shows only ``HH:MM:SS``; without
    ``now`` the date is always shown. Text that is not ISO 8601 is shown as is.
    """
    if value is None:
        return NONE

    try:
        local = parse_time(value).astimezone(tz)
    except ValueError:
        return value

    if now is not None and now.astimezone(tz).date() == local.date():
        return local.strftime("%H:%M:%S")

    return local.strftime("%Y-%m-%d %H:%M:%S")


def shorten(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` characters, ending with ``...`` when cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def pools_table(pools: Iterable[JsonObject], tz: tzinfo | None = None) -> str:
    headers = ["POOL", "DEFAULT", "INSTANCES", "IDLE", "BUSY", "CREATED"]
    rows = [
        [
            pool["name"],
            "yes" if pool["default"] else "",
            str(pool["instances"]),
            str(pool["idle"]),
            str(pool["busy"]),
            format_local_time(pool["created_at"], tz=tz),
        ]
        for pool in pools
    ]

    return render_table(headers, rows)


def offers_table(offers: Iterable[JsonObject]) -> str:
    """Render offers numbered from 1 in the order given (the daemon sorts by price)."""
    headers = ["#", "BACKEND", "REGION", "INSTANCE", "RESOURCES", "SPOT", "PRICE"]
    rows = [
        [
            str(number),
            offer["backend"],
            offer["region"],
            offer["instance_type"],
            offer["resources"],
            format_spot(offer["spot"]),
            format_price(offer["price"]),
        ]
        for number, offer in enumerate(offers, start=1)
    ]

    return render_table(headers, rows)


def format_idle(instance: JsonObject, now: datetime) -> str:
    """Format how long an instance has been idle and its idle duration: ``12s/5m``.

    Uses the daemon's ``idle_seconds`` when present, else ``idle_since`` and
    ``now``; an instance that is not idle shows ``-``.
    """
    idle_seconds = instance.get("idle_seconds")
    if idle_seconds is None and (idle_since := instance.get("idle_since")):
        try:
            idle_seconds = (now - parse_time(idle_since)).total_seconds()
        except ValueError:
            idle_seconds = None

    if idle_seconds is None:
        return NONE

    limit = format_idle_duration(instance.get("idle_duration"))

    return f"{format_duration(idle_seconds)}/{limit}"


def format_instance_status(instance: JsonObject) -> str:
    """Format an instance's status with what needs attention.

    Examples: ``idle``, ``idle (unreachable)``, ``terminating (3 failed attempts)``.
    """
    status = str(instance["status"])
    attempts = instance.get("termination_attempts") or 0
    if status == "terminating" and attempts:
        noun = "attempt" if attempts == 1 else "attempts"
        return f"{status} ({attempts} failed {noun})"

    if instance.get("reachable") is False and status not in ("terminated", "failed"):
        return f"{status} (unreachable)"

    return status


def instances_table(instances: Iterable[JsonObject], now: datetime) -> str:
    """Render the ``pool ps`` table; ``now`` must be timezone-aware."""
    headers = [
        "INSTANCE",
        "BACKEND",
        "REGION",
        "RESOURCES",
        "SPOT",
        "PRICE",
        "STATUS",
        "RUN",
        "IDLE",
    ]
    rows = [
        [
            instance["name"],
            instance["backend"],
            instance["region"],
            instance["resources"],
            format_spot(instance["spot"]),
            format_price(instance["price"]),
            format_instance_status(instance),
            instance.get("run") or NONE,
            format_idle(instance, now),
        ]
        for instance in instances
    ]

    return render_table(headers, rows)


def runs_table(
    runs: Iterable[JsonObject], now: datetime, tz: tzinfo | None = None
) -> str:
    """Render the ``ps`` table; ``now`` decides whether SUBMITTED shows the date.

    An ENDPOINT column, where a service or a run's ports are reached, is added
    when some run has one.
    """
    headers = [
        "RUN",
        "STATUS",
        "INSTANCE",
        "POOL",
        "USER",
        "SUBMITTED",
        "WAIT",
        "COMMAND",
    ]
    runs = list(runs)
    rows = [
        [
            run["name"],
            format_run_status(run),
            run.get("instance") or NONE,
            run["pool"],
            run["user"],
            format_local_time(run["submitted_at"], now=now, tz=tz),
            format_wait(run.get("wait_ms")),
            shorten(run["command"], COMMAND_WIDTH),
        ]
        for run in runs
    ]
    endpoints = [format_endpoint(run) for run in runs]
    if any(endpoint != NONE for endpoint in endpoints):
        headers.insert(3, "ENDPOINT")
        for row, endpoint in zip(rows, endpoints, strict=True):
            row.insert(3, endpoint)

    return render_table(headers, rows)


def format_run_status(run: JsonObject) -> str:
    """Format a run's status with its attempt and restarts when there were any.

    Examples: ``running``, ``running (attempt 2)``, ``failed (2 restarts)``.
    """
    notes = []
    attempt = run.get("attempt") or 1
    if attempt > 1:
        notes.append(f"attempt {attempt}")

    restarts = run.get("restarts") or 0
    if restarts:
        notes.append(f"{restarts} restart" + ("s" if restarts > 1 else ""))

    status = str(run["status"])

    return f"{status} ({', '.join(notes)})" if notes else status


def format_endpoint(run: JsonObject) -> str:
    """Format where a run is reached: a ready service's URL, else its ports."""
    if run.get("url"):
        return str(run["url"])

    ports = run.get("ports") or []
    if ports and run["status"] in ("starting", "running"):
        return "ports " + ",".join(str(port) for port in ports)

    return NONE


def summarize_event(event: JsonObject) -> str:
    """Summarize an event's fields as ``name=value`` pairs, cut to one short line.

    The ``type`` tag is left out (the line shows it already), and so are nested
    objects, except an offer, which shows its instance type.
    """
    parts = []
    for name, value in event.items():
        if name == "type":
            continue

        if isinstance(value, dict):
            if (field := _NESTED_SUMMARY_FIELDS.get(name)) and field in value:
                parts.append(f"{name}={value[field]}")

            continue

        if isinstance(value, list):
            continue

        text = str(value)
        parts.append(
            f'{name}="{text}"' if " " in text or not text else f"{name}={text}"
        )

    return shorten(" ".join(parts), SUMMARY_WIDTH)


def event_line(record: JsonObject, tz: tzinfo | None = None) -> str:
    """Format one ``EventView`` as one line for people.

    The line shows the position, local time, stream, event type, actor and a
    summary of the event's fields.
    """
    event = record.get("event")
    summary = summarize_event(event) if isinstance(event, dict) else ""
    fields = [
        f"{record['position']:>6}",
        format_local_time(record["recorded_at"], tz=tz),
        f"{record['stream']:<24}",
        f"{record['type']:<28}",
        f"{record['actor']:<10}",
        summary,
    ]

    return " ".join(fields).rstrip()
