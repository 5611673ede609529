"""Tests of the audit commands: requests to a fake daemon, and --log on a file.

The fake daemon checks what dstackctl sends and how it prints the responses;
the offline cases read a scripted log through the real ``events.audit`` code.
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner, Result

from dstackctl import exit_codes
from dstackctl.main import cli
from tests.dstackctl.fake_daemon import FakeDaemon
from tests.events.audit_history import T0, write_history

HOUR_US = 3_600_000_000
VERIFIED = {
    "ok": True,
    "source": "log",
    "records": 3,
    "head_position": 3,
    "head_hash": "ab" * 32,
    "snapshots": 1,
    "problems": [],
}
BROKEN = {
    **VERIFIED,
    "ok": False,
    "records": 1,
    "head_position": 1,
    "problems": [
        {
            "position": 2,
            "kind": "missing",
            "message": "record 2 is missing (the next record is 3)",
        }
    ],
}
REPLAY = {
    "position": 5,
    "at": "2025-03-01T12:10:00+00:00",
    "pools": [
        {
            "name": "main",
            "default": True,
            "created_at": "2025-03-01T12:00:00+00:00",
            "instances": 1,
            "idle": 0,
            "busy": 1,
        }
    ],
    "instances": [
        {
            "id": "a",
            "name": "a",
            "pool": "main",
            "backend": "local",
            "region": "local",
            "instance_type": "local-8cpu",
            "resources": "8xCPU, 32GB",
            "spot": False,
            "price": 1.2,
            "status": "busy",
            "schedulable": True,
            "run": "train-1",
            "idle_since": None,
            "idle_seconds": None,
            "idle_duration": "72h",
            "created_at": "2025-03-01T12:00:00+00:00",
            "reason": None,
        }
    ],
    "runs": [],
}
COST = {
    "by": "run",
    "since": None,
    "until": "2025-03-01T15:20:00+00:00",
    "rows": [
        {
            "group": "run",
            "key": "r1",
            "name": "train-1",
            "provisioning_usd": "0.000000",
            "idle_usd": "0.000000",
            "busy_usd": "0.600000",
            "total_usd": "0.600000",
            "provisioning_seconds": 0.0,
            "idle_seconds": 0.0,
            "busy_seconds": 1800.0,
            "life_usd": None,
        }
    ],
    "totals": {
        "provisioning_usd": "0.000000",
        "idle_usd": "0.000000",
        "busy_usd": "0.600000",
        "total_usd": "0.600000",
        "provisioning_seconds": 0.0,
        "idle_seconds": 0.0,
        "busy_seconds": 1800.0,
        "instances": 1,
    },
    "what_if": None,
}


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.db"
    anyio.run(write_history, path)
    return path


@pytest.fixture
def utc_plus_two() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "TST-2"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved

    time.tzset()


def invoke(fake_daemon: FakeDaemon, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["--socket", fake_daemon.socket_path, *args], catch_exceptions=False
    )


def only_query(fake_daemon: FakeDaemon, path: str) -> dict[str, str]:
    [request] = fake_daemon.requests_to("GET", path)
    return request.query


class TestEvents:
    def test_filters_are_sent_as_query(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events", chunks=[])

        result = invoke(
            fake_daemon,
            "events",
            "--since",
            "2025-03-01T12:00:00Z",
            "--until",
            "2025-03-01 13:00+00:00",
            "--stream",
            "run/*",
            "--stream",
            "pool/main",
            "--type",
            "InstanceClaimed",
        )

        assert result.exit_code == 0
        assert only_query(fake_daemon, "/v1/events") == {
            "since": str(T0),
            "until": str(T0 + HOUR_US),
            "stream": "run/*,pool/main",
            "type": "InstanceClaimed",
        }

    def test_relative_since_counts_back_from_now(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events", chunks=[])
        before = time.time_ns() // 1000

        invoke(fake_daemon, "events", "--since", "-2h")

        after = time.time_ns() // 1000
        since = int(only_query(fake_daemon, "/v1/events")["since"])
        assert before - 2 * HOUR_US <= since <= after - 2 * HOUR_US

    def test_invalid_time_is_usage_error(self, fake_daemon: FakeDaemon) -> None:
        result = invoke(fake_daemon, "events", "--since", "last tuesday")

        assert result.exit_code == exit_codes.USAGE
        assert "expected an ISO 8601 time" in result.stderr
        assert fake_daemon.requests == []

    @pytest.mark.usefixtures("utc_plus_two")
    @pytest.mark.parametrize(
        ("flag", "clock"), [([], "14:00:00"), (["--utc"], "12:00:00")]
    )
    def test_times_are_local_unless_utc(
        self, fake_daemon: FakeDaemon, flag: list[str], clock: str
    ) -> None:
        line = {
            "position": 1,
            "stream": "pool/main",
            "version": 1,
            "recorded_at": "2025-03-01T12:00:00+00:00",
            "actor": "alice (uid 1000)",
            "type": "PoolCreated",
            "event": {"type": "PoolCreated", "pool": "main"},
            "hash": "00" * 32,
        }
        fake_daemon.route(
            "GET", "/v1/events", chunks=[json.dumps(line).encode() + b"\n"]
        )

        result = invoke(fake_daemon, "events", *flag)

        assert result.stdout.split()[2] == clock

    def test_error_line_ends_with_exit_1(self, fake_daemon: FakeDaemon) -> None:
        error = {
            "error": {
                "position": 7,
                "message": "event log x is corrupted at position 7",
            }
        }
        fake_daemon.route(
            "GET", "/v1/events", chunks=[json.dumps(error).encode() + b"\n"]
        )

        result = invoke(fake_daemon, "events", "--json")

        assert result.exit_code == exit_codes.FAILED
        assert result.stderr == "error: event log x is corrupted at position 7\n"

    @pytest.mark.parametrize(
        "args",
        [
            ["events", "--follow", "--log", "x.db"],
            ["events", "--since", "-1h", "verify"],
            ["events", "--type", "PoolCreated", "export"],
        ],
        ids=lambda args: " ".join(args),
    )
    def test_conflicting_options_are_usage_errors(
        self, fake_daemon: FakeDaemon, args: list[str]
    ) -> None:
        result = invoke(fake_daemon, *args)

        assert result.exit_code == exit_codes.USAGE
        assert fake_daemon.requests == []


class TestVerify:
    def test_ok_report_exits_0_with_count_and_head(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("GET", "/v1/events/verify", VERIFIED)

        result = invoke(fake_daemon, "events", "verify")

        assert result.exit_code == 0
        assert result.stdout == (
            "OK: the daemon's log verified: 3 records and 1 snapshot; "
            f"head 3:{'ab' * 32}\n"
        )

    def test_failed_report_exits_1_naming_position(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("GET", "/v1/events/verify", BROKEN)

        result = invoke(fake_daemon, "events", "verify")

        assert result.exit_code == exit_codes.FAILED
        assert result.stdout.splitlines()[1] == (
            "position 2 (missing): record 2 is missing (the next record is 3)"
        )

    def test_expect_head_is_sent(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events/verify", VERIFIED)

        invoke(fake_daemon, "events", "verify", "--expect-head", "3:" + "ab" * 32)

        assert only_query(fake_daemon, "/v1/events/verify") == {
            "expect_head": "3:" + "ab" * 32
        }

    def test_json_prints_the_report(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events/verify", BROKEN)

        result = invoke(fake_daemon, "events", "--json", "verify")

        assert json.loads(result.stdout) == BROKEN
        assert result.exit_code == exit_codes.FAILED


class TestReplay:
    @pytest.mark.parametrize(
        ("at", "query"),
        [
            ("42", {"position": "42"}),
            ("2025-03-01T12:00:00Z", {"time": str(T0)}),
        ],
    )
    def test_at_is_a_position_or_a_time(
        self, fake_daemon: FakeDaemon, at: str, query: dict[str, str]
    ) -> None:
        fake_daemon.route("GET", "/v1/events/replay", REPLAY)

        invoke(fake_daemon, "events", "replay", "--at", at)

        assert only_query(fake_daemon, "/v1/events/replay") == query

    @pytest.mark.usefixtures("utc_plus_two")
    def test_replay_prints_the_live_tables(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events/replay", REPLAY)

        result = invoke(fake_daemon, "events", "replay", "--at", "5", "-a")

        lines = result.stdout.splitlines()
        assert lines[0] == "State after position 5 (2025-03-01 14:10:00)."
        assert lines[2].split() == [
            "POOL",
            "DEFAULT",
            "INSTANCES",
            "IDLE",
            "BUSY",
            "CREATED",
        ]
        assert lines[5].split()[:2] == ["INSTANCE", "BACKEND"]
        assert lines[6].split()[-3:] == ["busy", "train-1", "-"]
        assert lines[-1] == "No runs."
        assert only_query(fake_daemon, "/v1/events/replay") == {
            "position": "5",
            "all": "true",
        }


class TestExportAndCost:
    def test_export_writes_lines_unchanged(self, fake_daemon: FakeDaemon) -> None:
        lines = [b'{"position":1,"body":{"a":1}}', b'{"end":{"records":1}}']
        fake_daemon.route(
            "GET",
            "/v1/events/export",
            chunks=[lines[0][:9], lines[0][9:] + b"\n" + lines[1] + b"\n"],
        )

        result = invoke(fake_daemon, "events", "export")

        assert result.stdout_bytes == b"\n".join(lines) + b"\n"

    def test_cost_sends_window_group_and_policy(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/cost", COST)

        invoke(
            fake_daemon,
            "cost",
            "--since",
            "2025-03-01T12:00Z",
            "--by",
            "user",
            "--idle-duration",
            "30m",
        )

        assert only_query(fake_daemon, "/v1/cost") == {
            "since": str(T0),
            "by": "user",
            "idle_duration": "30m",
        }

    def test_cost_prints_rows_and_total(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/cost", COST)

        result = invoke(fake_daemon, "cost", "--utc")

        lines = result.stdout.splitlines()
        assert (
            lines[0] == "Cost from the start of the log to 2025-03-01 15:20:00, by run:"
        )
        assert lines[3].split() == [
            "run",
            "train-1",
            "$0.0000",
            "$0.0000",
            "$0.6000",
            "$0.6000",
        ]
        assert lines[4].split() == ["TOTAL", "$0.0000", "$0.0000", "$0.6000", "$0.6000"]

    def test_unknown_grouping_is_usage_error(self, fake_daemon: FakeDaemon) -> None:
        result = invoke(fake_daemon, "cost", "--by", "team")

        assert result.exit_code == exit_codes.USAGE
        assert fake_daemon.requests == []

    def test_explain_asks_for_the_run(self, fake_daemon: FakeDaemon) -> None:
        explanation = {
            "run_id": "r/1",
            "run_name": "r/1",
            "pool": "main",
            "user": "alice",
            "status": "done",
            "submitted_at": "2025-03-01T12:00:00+00:00",
            "requirements": "2xCPU, 8GB, on-demand",
            "decisions": [],
            "note": "no placement decision is recorded for this run",
        }
        fake_daemon.route("GET", "/v1/runs/r%2F1/explain", explanation)

        result = invoke(fake_daemon, "explain", "r/1", "--json")

        assert json.loads(result.stdout) == explanation


class TestOffline:
    def test_group_log_option_applies_to_verify(
        self, fake_daemon: FakeDaemon, log_file: Path
    ) -> None:
        result = invoke(fake_daemon, "events", "--log", str(log_file), "verify")

        assert result.exit_code == 0
        assert result.stdout.startswith(f"OK: {log_file} verified: 26 records")
        assert fake_daemon.requests == []

    def test_explain_names_the_failed_requirement(
        self, fake_daemon: FakeDaemon, log_file: Path
    ) -> None:
        result = invoke(fake_daemon, "explain", "train-2", "--log", str(log_file))

        rejected = result.stdout.splitlines()[-1].split()
        assert rejected == [
            "instance",
            "b",
            "$0.6000",
            "rejected",
            "cpu",
            "4..",
            "cpu",
            "2",
            "is",
            "outside",
            "4..",
        ]

    @pytest.mark.parametrize(
        ("args", "code", "message"),
        [
            (
                ["events", "verify", "--log", "/nonexistent/x.db"],
                exit_codes.FAILED,
                "error: cannot read log /nonexistent/x.db",
            ),
            (
                ["explain", "nope", "--log", "{log}"],
                exit_codes.NOT_FOUND,
                "error: run 'nope' not found",
            ),
            (
                ["events", "replay", "--at", "99", "--log", "{log}"],
                exit_codes.USAGE,
                "error: invalid position 99",
            ),
            (
                ["cost", "--idle-duration", "soon", "--log", "{log}"],
                exit_codes.USAGE,
                "error: invalid idle duration 'soon'",
            ),
        ],
        ids=["missing-file", "unknown-run", "past-head", "bad-duration"],
    )
    def test_errors_print_one_line_and_exit_code(
        self,
        fake_daemon: FakeDaemon,
        log_file: Path,
        args: list[str],
        code: int,
        message: str,
    ) -> None:
        result = invoke(fake_daemon, *(arg.format(log=log_file) for arg in args))

        assert result.exit_code == code
        assert result.stderr.startswith(message)
        assert result.stderr.count("\n") == 1

    def test_cost_from_file_prints_total(
        self, fake_daemon: FakeDaemon, log_file: Path
    ) -> None:
        result = invoke(
            fake_daemon,
            "cost",
            "--log",
            str(log_file),
            "--until",
            "2025-03-01T15:20Z",
            "--json",
        )

        report: dict[str, Any] = json.loads(result.stdout)
        assert report["totals"]["total_usd"] == "4.410000"
