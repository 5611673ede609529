"""Audit commands: ``events`` (list, verify, replay, export), ``cost``, ``explain``.

Each command sends a request to the daemon, or with ``--log FILE`` reads a log
file itself, read-only, with no daemon running. The offline path and the time
options import ``events`` (and with it msgspec and SQLite) inside the command,
so that the other commands keep starting fast.
"""

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, tzinfo
from typing import Any

import click

from dstackctl import audit_text, exit_codes, tables, terminal
from dstackctl.client import (
    DEFAULT_TIMEOUT_S,
    Client,
    ClientError,
    ProtocolError,
    api_path,
)

# Read timeout of an audit request, in seconds: verifying or costing a long log
# takes the daemon a while before the first byte.
AUDIT_TIMEOUT_S = 600.0
COST_GROUPS = ("run", "pool", "user", "instance")

_POSITION_RE = re.compile(r"[0-9]{1,18}")
_ERROR_LINE_PREFIX = b'{"error"'


class AuditError(ClientError):
    """An audit of a log file failed; the message names the file and the cause."""

    def __init__(self, message: str, exit_code: int = exit_codes.FAILED) -> None:
        self.exit_code = exit_code
        super().__init__(message)


log_option = click.option(
    "--log",
    "log_path",
    metavar="FILE",
    help="Read this log file (e.g. a copy of events.db) instead of asking the "
    "daemon; the file and its directory are never written.",
)
utc_option = click.option(
    "--utc",
    is_flag=True,
    help="Show times in UTC, and read times without an offset as UTC "
    "[default: the local zone].",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts."
)
_SINCE_HELP = (
    "From TIME on: ISO 8601 (2025-03-01T12:00, 2025-03-01 12:00Z) or relative "
    "to now (-2h, -30m)."
)
_UNTIL_HELP = "Up to TIME, in the same forms as --since."


# Options and the offline path


def _timezone(utc: bool) -> tzinfo | None:
    return UTC if utc else None


def now_us() -> int:
    """Return the current UTC time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def parse_time_option(text: str | None, name: str, utc: bool, now: int) -> int | None:
    """Parse a time option into UTC microseconds (``None`` stays ``None``).

    Raises:
        click.BadParameter: the text is no time; exit code 2.
    """
    if text is None:
        return None

    from events.audit.times import parse_time
    from events.errors import InvalidValueError

    try:
        return parse_time(text, now, field=name, utc=utc)
    except InvalidValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def parse_at(text: str, utc: bool, now: int) -> dict[str, int]:
    """Parse ``--at`` as ``{"position": N}`` or ``{"time": microseconds}``."""
    stripped = text.strip()
    if _POSITION_RE.fullmatch(stripped):
        return {"position": int(stripped)}

    time_us = parse_time_option(text, "--at", utc, now)
    assert time_us is not None

    return {"time": time_us}


@contextlib.contextmanager
def offline_errors(path: str) -> Iterator[None]:
    """Turn the errors of reading a log file into one line and an exit code.

    Also sends the events package's log messages (a skipped snapshot) to
    stderr, so that stdout keeps only the command's output.
    """
    import sqlite3

    import structlog

    from events.audit.explain import RunNotFoundError
    from events.errors import DstackdError, InvalidValueError

    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    try:
        yield
    except InvalidValueError as exc:
        raise AuditError(str(exc), exit_codes.USAGE) from None
    except RunNotFoundError as exc:
        raise AuditError(str(exc), exit_codes.NOT_FOUND) from None
    except DstackdError as exc:
        raise AuditError(str(exc)) from None
    except FileNotFoundError as exc:
        raise AuditError(f"cannot read log {path}: {exc.strerror or exc}") from None
    except (OSError, sqlite3.Error) as exc:
        raise AuditError(f"cannot read log {path}: {exc}") from None


def _check_line(client: Client, line: bytes) -> None:
    """Raise the error that the daemon sent as the last line of a stream."""
    if not line.startswith(_ERROR_LINE_PREFIX):
        return

    error = _decode_line(client, line).get("error")
    message = error.get("message") if isinstance(error, dict) else None
    raise AuditError(str(message or line[:200]))


def _decode_line(client: Client, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None

    if not isinstance(record, dict):
        raise ProtocolError(
            client.socket_path, f"event line is not a JSON object: {line[:200]!r}"
        )

    return record


def _write_event_lines(
    client: Client, lines: Iterable[bytes], as_json: bool, tz: tzinfo | None
) -> None:
    stdout = sys.stdout.buffer
    for line in lines:
        if not line.strip():
            continue

        _check_line(client, line)
        if as_json:
            stdout.write(line + b"\n")
            stdout.flush()
        else:
            click.echo(tables.event_line(_decode_line(client, line), tz=tz))


def _lines_of(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield from chunk.splitlines()


# events


@click.group(invoke_without_command=True)
@click.option("--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    metavar="POSITION",
    help="Start after this log position.",
)
@click.option("--since", metavar="TIME", help=_SINCE_HELP)
@click.option("--until", metavar="TIME", help=_UNTIL_HELP)
@click.option(
    "--stream",
    "streams",
    multiple=True,
    metavar="PATTERN",
    help="Only streams matching PATTERN, e.g. run/r-1 or 'instance/*'; repeatable.",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    metavar="TYPE",
    help="Only events of TYPE, e.g. InstanceClaimed; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines for scripts.")
@log_option
@utc_option
@click.pass_context
def events(
    ctx: click.Context,
    follow: bool,
    after: int | None,
    since: str | None,
    until: str | None,
    streams: tuple[str, ...],
    types: tuple[str, ...],
    as_json: bool,
    log_path: str | None,
    utc: bool,
) -> int:
    """Print the event log, one line per record, or verify, replay or export it.

    --log, --json and --utc given here also apply to the subcommands.
    """
    if ctx.invoked_subcommand is not None:
        listing_only = follow or after is not None or since or until or streams or types
        if listing_only:
            raise click.UsageError(
                "--follow, --after, --since, --until, --stream and --type list "
                f"events; they do not apply to 'events {ctx.invoked_subcommand}'"
            )

        ctx.meta["audit"] = {"log_path": log_path, "as_json": as_json, "utc": utc}
        return exit_codes.OK

    if follow and log_path is not None:
        raise click.UsageError(
            "--follow reads the daemon's log; it cannot be used with --log"
        )

    client: Client = ctx.obj
    now = now_us()
    since_us = parse_time_option(since, "--since", utc, now)
    until_us = parse_time_option(until, "--until", utc, now)
    tz = _timezone(utc)
    try:
        if log_path is not None:
            _list_offline(
                client,
                log_path,
                after or 0,
                since_us,
                until_us,
                streams,
                types,
                as_json,
                tz,
            )
        else:
            query = {
                "after": after,
                "follow": True if follow else None,
                "since": since_us,
                "until": until_us,
                "stream": ",".join(streams) or None,
                "type": ",".join(types) or None,
            }
            timeout = None if follow else DEFAULT_TIMEOUT_S
            with client.open(
                "GET", "/v1/events", query=query, timeout=timeout
            ) as response:
                _write_event_lines(client, response.iter_lines(), as_json, tz)
    except KeyboardInterrupt:
        # Ctrl-C is the normal way to stop following, not a failure.
        pass

    return exit_codes.OK


def _list_offline(
    client: Client,
    log_path: str,
    after: int,
    since: int | None,
    until: int | None,
    streams: tuple[str, ...],
    types: tuple[str, ...],
    as_json: bool,
    tz: tzinfo | None,
) -> None:
    with offline_errors(log_path):
        from events.audit import offline
        from events.audit.records import build_filter

        event_filter = build_filter(since, until, streams, types)
        chunks = offline.event_lines(log_path, event_filter, after)
        if as_json:
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
        else:
            _write_event_lines(client, _lines_of(chunks), as_json, tz)


def _inherited(ctx: click.Context, name: str, value: Any) -> Any:
    """Return an option's value, falling back to the one given to ``events``."""
    if value:
        return value

    return ctx.meta.get("audit", {}).get(name, value)


@events.command("verify")
@log_option
@click.option(
    "--expect-head",
    metavar="POSITION:HASH",
    help="Also fail unless the record at POSITION still has HASH, as an earlier "
    "verify printed it; this finds a log cut off or rewritten since then.",
)
@json_option
@click.pass_context
def verify(
    ctx: click.Context, log_path: str | None, expect_head: str | None, as_json: bool
) -> int:
    """Check the hash chain and the snapshots of the log, or of an export file.

    Exits 0 when everything checks out, and 1 naming the first bad position
    and what is wrong there (changed, missing, reordered, truncated).
    """
    log_path = _inherited(ctx, "log_path", log_path)
    as_json = _inherited(ctx, "as_json", as_json)
    if log_path is not None:
        with offline_errors(log_path):
            from events.audit import offline

            report = offline.verify_file(log_path, expect_head)

        source = log_path
    else:
        client: Client = ctx.obj
        query = {"expect_head": expect_head}
        report = client.request(
            "GET", "/v1/events/verify", query=query, timeout=AUDIT_TIMEOUT_S
        )
        source = "the daemon's log"

    if as_json:
        terminal.echo_json(report)
    else:
        click.echo(audit_text.verify_text(report, source))

    return exit_codes.OK if report["ok"] else exit_codes.FAILED


@events.command("replay")
@click.option(
    "--at",
    "at_text",
    required=True,
    metavar="POSITION|TIME",
    help="Replay up to this log position (42), or up to TIME as ISO 8601 or "
    "relative to now (-2h).",
)
@click.option(
    "-a", "--all", "show_all", is_flag=True, help="Include ended instances and runs."
)
@json_option
@log_option
@utc_option
@click.pass_context
def replay(
    ctx: click.Context,
    at_text: str,
    show_all: bool,
    as_json: bool,
    log_path: str | None,
    utc: bool,
) -> int:
    """Show the pools, instances and runs as they were at a position or time."""
    log_path = _inherited(ctx, "log_path", log_path)
    as_json = _inherited(ctx, "as_json", as_json)
    utc = _inherited(ctx, "utc", utc)
    point = parse_at(at_text, utc, now_us())
    if log_path is not None:
        with offline_errors(log_path):
            from events.audit import offline
            from events.audit.replay import ReplayPoint

            view = offline.replay_file(log_path, ReplayPoint(**point), show_all)
    else:
        client: Client = ctx.obj
        query: dict[str, int | bool | None] = {
            **point,
            "all": True if show_all else None,
        }
        view = client.request(
            "GET", "/v1/events/replay", query=query, timeout=AUDIT_TIMEOUT_S
        )

    if as_json:
        terminal.echo_json(view)
    else:
        click.echo(audit_text.replay_text(view, _timezone(utc)))

    return exit_codes.OK


@events.command("export")
@log_option
@click.pass_context
def export(ctx: click.Context, log_path: str | None) -> int:
    """Print every record as a JSON line, with its hash and stored bytes.

    The output checks out on its own: dstackctl events verify --log FILE.
    """
    log_path = _inherited(ctx, "log_path", log_path)
    stdout = sys.stdout.buffer
    if log_path is not None:
        with offline_errors(log_path):
            from events.audit import offline

            for chunk in offline.export_lines(log_path):
                stdout.write(chunk)

        return exit_codes.OK

    client: Client = ctx.obj
    with client.open("GET", "/v1/events/export", timeout=AUDIT_TIMEOUT_S) as response:
        for line in response.iter_lines():
            _check_line(client, line)
            stdout.write(line + b"\n")

    return exit_codes.OK


# cost and explain


@click.command()
@click.option("--since", metavar="TIME", help=_SINCE_HELP)
@click.option("--until", metavar="TIME", help=_UNTIL_HELP + " [default: now]")
@click.option(
    "--by",
    type=click.Choice(COST_GROUPS),
    default="run",
    show_default=True,
    help="Group by run (busy and provisioning time; idle time stays with its "
    "pool), pool, user or instance.",
)
@click.option(
    "--idle-duration",
    metavar="DURATION",
    help="Also show what the same history would have cost if instances expired "
    "after DURATION idle, e.g. 30m or off.",
)
@json_option
@log_option
@utc_option
@click.pass_obj
def cost(
    client: Client,
    since: str | None,
    until: str | None,
    by: str,
    idle_duration: str | None,
    as_json: bool,
    log_path: str | None,
    utc: bool,
) -> int:
    """Show what instances cost, from their hourly price and timeline.

    Busy time is charged to the run that held the instance (and its user),
    idle time to the pool, and provisioning to the run it was for.
    """
    now = now_us()
    since_us = parse_time_option(since, "--since", utc, now)
    until_us = parse_time_option(until, "--until", utc, now)
    if log_path is not None:
        with offline_errors(log_path):
            from events.audit import offline

            report = offline.cost_file(
                log_path,
                since=since_us,
                until=until_us,
                now=now,
                by=by,
                idle_duration=idle_duration,
            )
    else:
        query = {
            "since": since_us,
            "until": until_us,
            "by": by,
            "idle_duration": idle_duration,
        }
        report = client.request("GET", "/v1/cost", query=query, timeout=AUDIT_TIMEOUT_S)

    if as_json:
        terminal.echo_json(report)
    else:
        click.echo(audit_text.cost_text(report, _timezone(utc)))

    return exit_codes.OK


@click.command()
@click.argument("run_name", metavar="RUN")
@json_option
@log_option
@utc_option
@click.pass_obj
def explain(
    client: Client, run_name: str, as_json: bool, log_path: str | None, utc: bool
) -> int:
    """Show why RUN (a name or id) was placed where it was.

    Lists the instances and offers considered when the decision was made, and
    for each one rejected the requirement it failed.
    """
    if log_path is not None:
        with offline_errors(log_path):
            from events.audit import offline

            explanation = offline.explain_file(log_path, run_name)
    else:
        path = api_path("runs", run_name, "explain")
        explanation = client.request("GET", path, timeout=AUDIT_TIMEOUT_S)

    if as_json:
        terminal.echo_json(explanation)
    else:
        click.echo(audit_text.explanation_text(explanation, _timezone(utc)))

    return exit_codes.OK
