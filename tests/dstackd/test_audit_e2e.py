"""End to end: the audit commands against the real daemon, and on a copy of its log.

The daemon runs with a declared machine price, so instances have prices. A
copy of its log file (with the write-ahead log) must give the same results
offline as the daemon gives live, without a byte of the copy changing.
"""

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEFAULT_CONFIG, DaemonProcess

# 16 CPUs, 64GB and 2 GPUs at $1.60/h: a 1-CPU slice costs $0.10/h.
PRICED_CONFIG = DEFAULT_CONFIG.replace("[local]\n", "[local]\nprice_per_hour = 1.6\n")
SMALL = ("--cpu", "1", "--memory", "1GB")
MEDIUM = ("--cpu", "4", "--memory", "4GB")


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp, PRICED_CONFIG)
    process.start()
    yield process
    process.stop_active_runs()
    process.stop()


def run_task(daemon: DaemonProcess, name: str, *resources: str) -> None:
    daemon.ctl_ok(
        "run", *resources, "--idle-duration", "1h", "--name", name, "--", "true"
    )


def json_of(daemon: DaemonProcess, *args: str) -> Any:
    return json.loads(daemon.ctl_ok(*args, "--json"))


def claim_of(daemon: DaemonProcess, run_name: str) -> dict[str, Any]:
    runs = {run["name"]: run["id"] for run in json_of(daemon, "ps", "-a")}
    return next(
        record
        for record in daemon.events()
        if record["type"] == "InstanceClaimed"
        and record["event"]["run_id"] == runs[run_name]
    )


def instance_named(view: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in view["instances"] if row["name"] == name)


def micro_usd(amount: str) -> int:
    """Convert a USD amount with 6 decimals, as reports give it, to micro-USD."""
    whole, _, fraction = amount.lstrip("-").partition(".")
    value = int(whole) * 1_000_000 + int(fraction.ljust(6, "0"))

    return -value if amount.startswith("-") else value


def file_state(directory: Path) -> dict[str, str]:
    """Map each file name in ``directory`` to the SHA-256 of its bytes."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


@pytest.fixture
def busy_history(daemon: DaemonProcess) -> DaemonProcess:
    """Two pool instances, a run on one, and a run that provisions a third."""
    daemon.ctl_ok("pool", "add", "-y", *SMALL, "--name", "small")
    daemon.ctl_ok("pool", "add", "-y", *MEDIUM, "--name", "medium")
    run_task(daemon, "fits-medium", *MEDIUM)
    run_task(daemon, "needs-new", "--cpu", "2", "--memory", "2GB")

    return daemon


class TestOffline:
    def test_copy_matches_live_and_stays_unchanged(
        self, busy_history: DaemonProcess, short_tmp: Path
    ) -> None:
        daemon = busy_history
        copy_dir = short_tmp / "copy"
        copy_dir.mkdir()
        for name in ("events.db", "events.db-wal"):
            source = daemon.data_dir / name
            if source.exists():
                shutil.copyfile(source, copy_dir / name)

        before = file_state(copy_dir)
        copy = str(copy_dir / "events.db")
        records = daemon.events()
        claim = claim_of(daemon, "fits-medium")
        head_time = records[-1]["recorded_at"]
        commands = [
            ["events", "--json"],
            ["events", "--type", "InstanceClaimed", "--stream", "instance/*", "--json"],
            ["events", "--since", claim["recorded_at"], "--json"],
            ["events", "verify", "--json"],
            ["events", "replay", "--at", str(claim["position"]), "-a", "--json"],
            ["events", "replay", "--at", claim["recorded_at"], "--json"],
            ["events", "export"],
            ["cost", "--until", head_time, "--by", "run", "--json"],
            ["cost", "--until", head_time, "--by", "user", "--json"],
            ["cost", "--until", head_time, "--by", "pool", "--json"],
            ["cost", "--until", head_time, "--by", "instance", "--json"],
            ["cost", "--until", head_time, "--idle-duration", "0", "--json"],
            ["explain", "needs-new", "--json"],
        ]

        for command in commands:
            live = daemon.ctl_ok(*command)
            offline = daemon.ctl_ok(*command, "--log", copy)
            assert offline == live, " ".join(command)

        assert file_state(copy_dir) == before
        assert (
            len(records)
            == json.loads(daemon.ctl_ok("events", "verify", "--json"))["records"]
        )

    def test_export_verifies_on_its_own(
        self, busy_history: DaemonProcess, short_tmp: Path
    ) -> None:
        daemon = busy_history
        export = short_tmp / "events.jsonl"
        export.write_text(daemon.ctl_ok("events", "export"))

        report = json.loads(
            daemon.ctl_ok("events", "verify", "--log", str(export), "--json")
        )

        assert report["ok"]
        assert report["source"] == "export"
        assert report["head_hash"] == daemon.events()[-1]["hash"]


class TestLive:
    def test_replay_before_and_after_claim(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "add", "-y", *SMALL, "--name", "small")
        run_task(daemon, "job", *SMALL)
        claim = claim_of(daemon, "job")

        before = json_of(
            daemon, "events", "replay", "--at", str(claim["position"] - 1), "-a"
        )
        after = json_of(
            daemon, "events", "replay", "--at", str(claim["position"]), "-a"
        )

        assert instance_named(before, "small")["status"] == "idle"
        assert instance_named(before, "small")["run"] is None
        assert instance_named(after, "small")["status"] == "busy"
        assert instance_named(after, "small")["run"] == "job"

    def test_replay_prints_pool_ps_table(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "add", "-y", *SMALL, "--name", "small")
        run_task(daemon, "job", *SMALL)
        claim = claim_of(daemon, "job")

        text = daemon.ctl_ok("events", "replay", "--at", str(claim["position"]))

        row = next(line for line in text.splitlines() if line.startswith("small "))
        assert row.split()[-3:] == ["busy", "job", "-"]

    def test_explain_names_failed_requirement(
        self, busy_history: DaemonProcess
    ) -> None:
        daemon = busy_history

        claimed = json_of(daemon, "explain", "fits-medium")
        provisioned = json_of(daemon, "explain", "needs-new")

        [claim] = claimed["decisions"]
        assert claim["summary"] == "claimed idle instance medium"
        assert [
            (c["name"], c["outcome"], c["requirement"], c["reason"])
            for c in claim["candidates"]
        ] == [
            ("medium", "chosen", None, None),
            ("small", "rejected", "cpu 4", "cpu 1 is outside 4"),
        ]
        request = provisioned["decisions"][0]
        assert request["event"] == "InstanceRequested"
        rejected = [c for c in request["candidates"] if c["outcome"] == "rejected"]
        assert {(c["name"], c["requirement"]) for c in rejected} == {
            ("small", "cpu 2"),
            ("medium", "cpu 2"),
        }

    def test_cost_parts_add_up_for_each_instance(
        self, busy_history: DaemonProcess
    ) -> None:
        daemon = busy_history

        report = json_of(daemon, "cost", "--by", "instance")

        for row in report["rows"]:
            parts = (
                micro_usd(row["provisioning_usd"])
                + micro_usd(row["idle_usd"])
                + micro_usd(row["busy_usd"])
            )
            assert parts == micro_usd(row["total_usd"]), row["name"]
            assert row["life_usd"] == row["total_usd"], row["name"]

        # Each row is rounded to the micro-dollar on its own.
        rows_total = sum(micro_usd(row["total_usd"]) for row in report["rows"])
        assert abs(rows_total - micro_usd(report["totals"]["total_usd"])) <= len(
            report["rows"]
        )
        assert {row["name"] for row in report["rows"]} == {"small", "medium", "local-1"}

    def test_verify_finds_cut_tail_by_daemon_head(self, daemon: DaemonProcess) -> None:
        daemon.ctl_ok("pool", "add", "-y", *SMALL, "--name", "small")
        run_task(daemon, "job", *SMALL)
        head = daemon.events()[-1]["position"]
        assert json_of(daemon, "events", "verify")["ok"]

        connection = sqlite3.connect(daemon.data_dir / "events.db", timeout=10)
        try:
            with connection:
                connection.execute("DELETE FROM events WHERE position > ?", (head - 3,))
        finally:
            connection.close()

        result = daemon.ctl("events", "verify")

        assert result.returncode == 1
        assert f"position {head - 2} (truncated)" in result.stdout

    def test_daemon_snapshots_match_replay(self, short_tmp: Path) -> None:
        root = short_tmp / "snapshots"
        root.mkdir()
        config = PRICED_CONFIG.replace("[daemon]\n", "[daemon]\nsnapshot_every = 4\n")
        daemon = DaemonProcess(root, config)
        daemon.start()
        try:
            daemon.ctl_ok("pool", "add", "-y", *SMALL, "--name", "small")
            for number in range(3):
                run_task(daemon, f"job-{number}", *SMALL)

            report = json_of(daemon, "events", "verify")
        finally:
            daemon.stop_active_runs()
            daemon.stop()

        assert report["ok"]
        assert report["snapshots"] >= 2
