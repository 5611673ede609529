"""Audit of a log file with no daemon running: what ``dstackctl --log FILE`` calls.

Each function opens the file with ``LogReader`` (which never writes to the
file or its directory), runs the operation of ``events.audit.service`` and
returns plain JSON values, equal to what the daemon's routes send.
"""

import sqlite3
from collections.abc import Iterator
from typing import Any

import msgspec

from events.audit import service
from events.audit.cost import check_group
from events.audit.records import EventFilter
from events.audit.replay import ReplayPoint, replay_view
from events.audit.verify import (
    is_sqlite_file,
    parse_expected_head,
    unreadable_file_report,
    verify_export,
    verify_log,
)
from events.grammar import parse_duration
from events.log_reader import LogReader, LogSchemaError

_NOT_A_LOG = (
    "it is not an SQLite file; an export (JSON lines) can only be checked, "
    "with 'dstackctl events verify --log FILE'"
)


def open_log(path: str) -> LogReader:
    """Open a log file read-only.

    Raises:
        FileNotFoundError: no file at ``path``.
        LogSchemaError: the file is no event log, or it is an export.
    """
    if not is_sqlite_file(path):
        raise LogSchemaError(path, _NOT_A_LOG)

    return LogReader.open(path)


def verify_file(path: str, expected_head: str | None = None) -> dict[str, Any]:
    """Verify a log file, or an export file when ``path`` lacks the SQLite magic."""
    expected = () if expected_head is None else (parse_expected_head(expected_head),)
    if not is_sqlite_file(path):
        with open(path, "rb") as file:
            report = verify_export(file)
    else:
        try:
            with LogReader.open(path) as reader:
                report = verify_log(reader, expected)
        except sqlite3.DatabaseError as exc:
            report = unreadable_file_report(path, exc)

    return msgspec.to_builtins(report)  # type: ignore[no-any-return]


def event_lines(
    path: str, event_filter: EventFilter, after: int = 0
) -> Iterator[bytes]:
    """Yield the selected records as JSON lines, joined into chunks."""
    with open_log(path) as reader:
        yield from service.batched(service.event_lines(reader, event_filter, after))


def export_lines(path: str) -> Iterator[bytes]:
    """Yield the export of the log file, joined into chunks."""
    with open_log(path) as reader:
        yield from service.batched(service.export_lines(reader))


def replay_file(
    path: str, point: ReplayPoint, show_all: bool = False
) -> dict[str, Any]:
    with open_log(path) as reader:
        view = replay_view(reader, point, show_all=show_all)

    return msgspec.to_builtins(view)  # type: ignore[no-any-return]


def cost_file(
    path: str,
    *,
    since: int | None,
    until: int | None,
    now: int,
    by: str,
    idle_duration: str | None = None,
) -> dict[str, Any]:
    """Compute the cost report; ``idle_duration`` is text such as ``30m``."""
    group = check_group(by)
    policy = None
    if idle_duration is not None:
        policy = parse_duration(idle_duration, "idle duration")

    with open_log(path) as reader:
        report = service.cost_report(
            reader, since=since, until=until, now=now, by=group, idle_duration=policy
        )

    return msgspec.to_builtins(report)  # type: ignore[no-any-return]


def explain_file(path: str, run_name: str) -> dict[str, Any]:
    with open_log(path) as reader:
        explanation = service.explain(reader, run_name)

    return msgspec.to_builtins(explanation)  # type: ignore[no-any-return]
