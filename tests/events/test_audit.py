"""Tests of the audit operations in events/audit on a scripted log.

The history in ``tests.events.audit_history`` has known prices and times, so
costs are checked against amounts computed by hand in the comments below.
Tampering is done on the SQLite file (or the export text) directly, and each
case must be reported at its position with its kind.
"""

import hashlib
import io
import shutil
import sqlite3
import tracemalloc
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from events.audit import offline, service
from events.audit.cost import CostReport
from events.audit.explain import (
    RunNotFoundError,
    failed_requirement,
)
from events.audit.money import format_usd, micro_usd, price_units, split_rounded
from events.audit.records import build_filter
from events.audit.replay import ReplayPoint, replay_view
from events.audit.times import parse_time, utc_iso
from events.audit.verify import (
    ExpectedHead,
    VerifyReport,
    verify_export,
    verify_log,
)
from events.errors import InvalidValueError
from events.event_types import (
    InstanceClaimed,
    InstanceIdleExpired,
    InstanceProvisioned,
    InstanceReleased,
    InstanceRequested,
    InstanceTerminated,
    PoolCreated,
    RunFinished,
    RunSpec,
    RunSubmitted,
)
from events.grammar import build_requirements
from events.log import EventLog
from events.log_reader import LogReader
from events.matching import mismatch
from events.model import Actor, Gpu, Offer, Resources
from events.projection import decode_state, encode_state
from events.record import NewEvent
from tests.events.audit_history import (
    OFFER_B,
    SMALL,
    SPEC_SMALL,
    T0,
    ScriptedLog,
    add_snapshot,
    at,
    rows,
    write_history,
)

HEAD = 26


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "events.db"
    positions = anyio.run(write_history, path)
    assert positions["head"] == HEAD

    return path, positions


@pytest.fixture
def log_path(history: tuple[Path, dict[str, int]]) -> Path:
    return history[0]


def verify(path: Path, expected: tuple[ExpectedHead, ...] = ()) -> VerifyReport:
    with LogReader.open(path) as reader:
        return verify_log(reader, expected)


def edit(path: Path, change: Callable[[sqlite3.Connection], None]) -> None:
    """Change the file with sqlite3, as someone tampering with it would."""
    connection = sqlite3.connect(path)
    try:
        with connection:
            change(connection)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def body_at(connection: sqlite3.Connection, position: int) -> bytes:
    row = connection.execute(
        "SELECT body FROM events WHERE position = ?", (position,)
    ).fetchone()
    return bytes(row[0])


def set_body(connection: sqlite3.Connection, position: int, body: bytes) -> None:
    connection.execute(
        "UPDATE events SET body = ? WHERE position = ?", (body, position)
    )


# Verification of a log file


def change_one_byte(connection: sqlite3.Connection) -> None:
    body = body_at(connection, 7)
    set_body(connection, 7, body.replace(b'"r1"', b'"r7"', 1))


def break_json(connection: sqlite3.Connection) -> None:
    body = body_at(connection, 7)
    set_body(connection, 7, body[:-1] + b"!")


def change_stored_hash(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE events SET hash = ? WHERE position = 5", (bytes(32),))


def delete_record(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM events WHERE position = 9")


def delete_and_renumber(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM events WHERE position = 9")
    for position in range(10, HEAD + 1):
        connection.execute(
            "UPDATE events SET position = ? WHERE position = ?",
            (position - 1, position),
        )


def swap_records(connection: sqlite3.Connection) -> None:
    first, second = connection.execute(
        "SELECT position, stream, version, body, hash FROM events"
        " WHERE position IN (11, 12) ORDER BY position"
    ).fetchall()
    connection.execute("DELETE FROM events WHERE position IN (11, 12)")
    connection.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (11, *second[1:]))
    connection.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (12, *first[1:]))


def cut_tail(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM events WHERE position > 20")


class TestVerifyLog:
    def test_untouched_log_verifies(self, log_path: Path) -> None:
        report = verify(log_path)

        assert report.ok
        assert report.records == HEAD
        assert report.head_position == HEAD
        assert report.head_hash == bytes(rows(log_path)[-1][4]).hex()
        assert report.problems == ()

    @pytest.mark.parametrize(
        ("change", "position", "kind"),
        [
            (change_one_byte, 7, "changed"),
            (break_json, 7, "changed"),
            (change_stored_hash, 5, "changed"),
            (delete_record, 9, "missing"),
            (delete_and_renumber, 9, "missing"),
            (swap_records, 11, "reordered"),
        ],
        ids=lambda value: getattr(value, "__name__", None),
    )
    def test_tampered_record_is_found_at_its_position(
        self,
        log_path: Path,
        change: Callable[[sqlite3.Connection], None],
        position: int,
        kind: str,
    ) -> None:
        edit(log_path, change)

        report = verify(log_path)

        assert not report.ok
        assert report.problems[0].position == position
        assert report.problems[0].kind == kind
        assert report.records == position - 1

    def test_swap_names_both_records(self, log_path: Path) -> None:
        edit(log_path, swap_records)

        report = verify(log_path)

        assert report.problems[0].message == "records 11 and 12 were swapped"

    def test_cut_tail_is_found_by_snapshot_past_head(self, log_path: Path) -> None:
        add_snapshot(log_path, 24)
        edit(log_path, cut_tail)

        report = verify(log_path)

        assert not report.ok
        assert report.problems[0].position == 21
        assert report.problems[0].kind == "truncated"
        assert report.head_position == 20

    def test_cut_tail_is_found_by_expected_head(self, log_path: Path) -> None:
        head = ExpectedHead(HEAD, bytes(rows(log_path)[-1][4]))
        edit(log_path, cut_tail)

        report = verify(log_path, (head,))

        assert report.problems[0].position == 21
        assert report.problems[0].kind == "truncated"

    def test_cut_tail_without_witness_verifies(self, log_path: Path) -> None:
        # The chain alone cannot tell a cut tail from a shorter history; the
        # head hash that verify prints is what catches it later.
        edit(log_path, cut_tail)

        report = verify(log_path)

        assert report.ok
        assert report.head_position == 20

    def test_rewritten_history_fails_expected_head(self, log_path: Path) -> None:
        head = ExpectedHead(10, bytes(32))

        report = verify(log_path, (head,))

        assert report.problems[0].position == 10
        assert report.problems[0].kind == "changed"

    def test_cut_file_is_reported_truncated(
        self, log_path: Path, tmp_path: Path
    ) -> None:
        copy = tmp_path / "cut.db"
        shutil.copyfile(log_path, copy)
        with open(copy, "r+b") as file:
            file.truncate(copy.stat().st_size // 2)

        report = offline.verify_file(str(copy))

        assert not report["ok"]
        assert report["problems"][0]["kind"] == "truncated"
        assert report["problems"][0]["position"] == 1


def flip_state_byte(connection: sqlite3.Connection) -> None:
    state = bytearray(
        connection.execute(
            "SELECT state FROM snapshots WHERE position = 12"
        ).fetchone()[0]
    )
    state[len(state) // 2] ^= 0x01
    connection.execute(
        "UPDATE snapshots SET state = ? WHERE position = 12", (bytes(state),)
    )


def forge_state(connection: sqlite3.Connection) -> None:
    """Change the content of the snapshot and recompute its state hash to match."""
    data = connection.execute(
        "SELECT state FROM snapshots WHERE position = 12"
    ).fetchone()[0]
    state = decode_state(data)
    state.runs["r1"].user = "mallory"
    forged = encode_state(state)
    connection.execute(
        "UPDATE snapshots SET state = ?, state_hash = ? WHERE position = 12",
        (forged, hashlib.sha256(forged).digest()),
    )


def change_record_hash(connection: sqlite3.Connection) -> None:
    connection.execute(
        "UPDATE snapshots SET record_hash = ? WHERE position = 12", (bytes(32),)
    )


class TestVerifySnapshots:
    def test_matching_snapshots_are_counted(self, log_path: Path) -> None:
        add_snapshot(log_path, 12)
        add_snapshot(log_path, 20)

        report = verify(log_path)

        assert report.ok
        assert report.snapshots == 2

    @pytest.mark.parametrize(
        ("change", "words"),
        [
            (flip_state_byte, "SHA-256 of its state differs"),
            (forge_state, "differs from a replay of records 1 to 12: run r1 differs"),
            (change_record_hash, "names record hash"),
        ],
        ids=["state-byte", "forged-state", "record-hash"],
    )
    def test_edited_snapshot_is_named_by_position(
        self,
        log_path: Path,
        change: Callable[[sqlite3.Connection], None],
        words: str,
    ) -> None:
        add_snapshot(log_path, 12)
        add_snapshot(log_path, 20)
        edit(log_path, change)

        report = verify(log_path)

        assert not report.ok
        assert [problem.position for problem in report.problems] == [12]
        assert report.problems[0].kind == "snapshot"
        assert words in report.problems[0].message
        assert report.snapshots == 1
        assert report.records == HEAD


# Export and its verification


def export_lines(path: Path) -> list[bytes]:
    with LogReader.open(path) as reader:
        return list(service.export_lines(reader))


def verify_text(lines: list[bytes]) -> VerifyReport:
    return verify_export(io.BytesIO(b"".join(lines)))


def changed_body(lines: list[bytes]) -> list[bytes]:
    shown, key, body = lines[6].partition(b'"body":')
    lines[6] = shown + key + body.replace(b'"r1"', b'"r7"', 1)
    return lines


def changed_shown_field(lines: list[bytes]) -> list[bytes]:
    lines[6] = lines[6].replace(
        b'"actor":"alice (uid 1000)"', b'"actor":"bob (uid 1001)"', 1
    )
    return lines


def deleted_line(lines: list[bytes]) -> list[bytes]:
    del lines[8]
    return lines


def swapped_lines(lines: list[bytes]) -> list[bytes]:
    lines[10], lines[11] = lines[11], lines[10]
    return lines


def cut_mid_line(lines: list[bytes]) -> list[bytes]:
    return [*lines[:-2], lines[-2][:40]]


def cut_at_line(lines: list[bytes]) -> list[bytes]:
    return lines[:-2]


def end_line_dropped(lines: list[bytes]) -> list[bytes]:
    return lines[:-1]


def line_after_end(lines: list[bytes]) -> list[bytes]:
    return [*lines, lines[0]]


class TestExport:
    def test_export_verifies_on_its_own(self, log_path: Path) -> None:
        report = verify_text(export_lines(log_path))

        assert report.ok
        assert report.records == HEAD
        assert report.head_hash == verify(log_path).head_hash

    def test_export_carries_stored_bytes(self, log_path: Path) -> None:
        lines = export_lines(log_path)

        stored = [bytes(row[3]) for row in rows(log_path)]
        bodies = [
            bytes(msgspec.json.decode(line, type=_Body).body) for line in lines[:-1]
        ]
        assert bodies == stored

    def test_end_line_names_count_and_head(self, log_path: Path) -> None:
        end = msgspec.json.decode(export_lines(log_path)[-1])

        assert end == {
            "end": {
                "records": HEAD,
                "head_position": HEAD,
                "head_hash": verify(log_path).head_hash,
            }
        }

    @pytest.mark.parametrize(
        ("change", "position", "kind"),
        [
            (changed_body, 7, "changed"),
            (changed_shown_field, 7, "changed"),
            (deleted_line, 9, "missing"),
            (swapped_lines, 11, "reordered"),
            (cut_mid_line, HEAD, "truncated"),
            (cut_at_line, HEAD, "truncated"),
            (end_line_dropped, HEAD + 1, "truncated"),
            (line_after_end, HEAD + 1, "changed"),
        ],
        ids=lambda value: getattr(value, "__name__", None),
    )
    def test_tampered_export_is_found_at_its_position(
        self,
        log_path: Path,
        change: Callable[[list[bytes]], list[bytes]],
        position: int,
        kind: str,
    ) -> None:
        report = verify_text(change(export_lines(log_path)))

        assert not report.ok
        assert report.problems[0].position == position
        assert report.problems[0].kind == kind

    def test_empty_export_is_truncated(self) -> None:
        report = verify_text([])

        assert report.problems[0].kind == "truncated"
        assert report.problems[0].message == "the export is empty"

    def test_export_stops_without_end_line_at_corruption(self, log_path: Path) -> None:
        edit(log_path, change_one_byte)
        written: list[bytes] = []

        with (
            LogReader.open(log_path) as reader,
            pytest.raises(Exception, match="position 7"),
        ):
            written.extend(service.export_lines(reader))

        assert len(written) == 6


class _Body(msgspec.Struct):
    body: msgspec.Raw


# Replay


class TestReplay:
    def instance(self, path: Path, point: ReplayPoint, name: str) -> dict[str, Any]:
        with LogReader.open(path) as reader:
            view = replay_view(reader, point, show_all=True)

        return next(
            msgspec.to_builtins(row) for row in view.instances if row.name == name
        )

    def test_just_before_claim_instance_is_idle(
        self, history: tuple[Path, dict[str, int]]
    ) -> None:
        path, positions = history

        before = self.instance(
            path, ReplayPoint(position=positions["claim_r2"] - 1), "a"
        )

        assert before["status"] == "idle"
        assert before["run"] is None
        assert before["idle_since"] == utc_iso(at(40))
        assert before["idle_seconds"] == 3600.0

    def test_just_after_claim_instance_is_busy_with_run(
        self, history: tuple[Path, dict[str, int]]
    ) -> None:
        path, positions = history

        after = self.instance(path, ReplayPoint(position=positions["claim_r2"]), "a")

        assert after["status"] == "busy"
        assert after["run"] == "train-2"
        assert after["idle_seconds"] is None

    def test_replay_to_time_stops_before_later_records(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            view = replay_view(reader, ReplayPoint(time=at(60)))

        assert view.position == 12
        assert view.at == utc_iso(at(60))
        assert [(row.name, row.status) for row in view.instances] == [
            ("a", "idle"),
            ("b", "busy"),
        ]
        assert view.instances[0].idle_seconds == 1200.0

    def test_replay_hides_ended_unless_all(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            live = replay_view(reader, ReplayPoint(position=HEAD))
            everything = replay_view(reader, ReplayPoint(position=HEAD), show_all=True)

        assert live.instances == ()
        assert live.runs == ()
        assert [row.name for row in everything.instances] == ["a", "b", "c"]
        assert [row.status for row in everything.runs] == [
            "done",
            "done",
            "done",
            "failed",
        ]

    @pytest.mark.parametrize(
        "point",
        [
            ReplayPoint(position=15),
            ReplayPoint(time=at(95)),
            ReplayPoint(position=HEAD),
        ],
        ids=["position", "time", "head"],
    )
    def test_snapshot_and_full_replay_agree(
        self, log_path: Path, tmp_path: Path, point: ReplayPoint
    ) -> None:
        plain = tmp_path / "plain.db"
        shutil.copyfile(log_path, plain)
        add_snapshot(log_path, 12)

        with LogReader.open(log_path) as reader, LogReader.open(plain) as other:
            assert replay_view(reader, point, show_all=True) == replay_view(
                other, point, show_all=True
            )

    def test_position_past_head_is_rejected(self, log_path: Path) -> None:
        with (
            LogReader.open(log_path) as reader,
            pytest.raises(InvalidValueError, match="a position from 0 to the head 26"),
        ):
            replay_view(reader, ReplayPoint(position=27))


# Cost


def cost(
    path: Path,
    by: str = "instance",
    *,
    since: float | None = None,
    until: float = 200,
    idle_duration: int | str | None = None,
) -> CostReport:
    with LogReader.open(path) as reader:
        return service.cost_report(
            reader,
            since=None if since is None else at(since),
            until=at(until),
            now=at(1000),
            by=by,  # type: ignore[arg-type]
            idle_duration=idle_duration,  # type: ignore[arg-type]
        )


def amounts(report: CostReport) -> dict[str, tuple[str, str, str, str]]:
    return {
        row.name: (row.provisioning_usd, row.idle_usd, row.busy_usd, row.total_usd)
        for row in report.rows
    }


class TestCost:
    def test_instances_cost_by_hand(self, log_path: Path) -> None:
        report = cost(log_path, "instance")

        # a at $1.20/h: 2m provisioning, idle 8m + 60m + 61m (incl. the 1m
        # teardown), busy 30m + 30m. b at $0.60/h: 3m, idle 6m, busy 30m.
        # c at $2.40/h: 5m provisioning, then failed.
        assert amounts(report) == {
            "a": ("0.040000", "2.580000", "1.200000", "3.820000"),
            "b": ("0.030000", "0.060000", "0.300000", "0.390000"),
            "c": ("0.200000", "0.000000", "0.000000", "0.200000"),
        }
        assert report.totals.total_usd == "4.410000"

    def test_parts_add_up_to_whole_life(self, log_path: Path) -> None:
        report = cost(log_path, "instance", since=7.5, until=187.25)

        for row in report.rows:
            parts = (
                Decimal(row.provisioning_usd)
                + Decimal(row.idle_usd)
                + Decimal(row.busy_usd)
            )
            assert parts == Decimal(row.total_usd), row.name
            assert row.life_usd == row.total_usd, row.name

    @pytest.mark.parametrize(
        ("by", "expected"),
        [
            (
                "run",
                {
                    "main": "2.680000",
                    "train-1": "0.600000",
                    "train-2": "0.600000",
                    "eval-3": "0.330000",
                    "big-4": "0.200000",
                },
            ),
            (
                "user",
                {
                    "main": "2.680000",
                    "alice": "0.800000",
                    "bob": "0.600000",
                    "carol": "0.330000",
                },
            ),
            ("pool", {"main": "4.410000"}),
        ],
    )
    def test_groups_reconcile_with_total(
        self, log_path: Path, by: str, expected: dict[str, str]
    ) -> None:
        report = cost(log_path, by)

        assert {row.name: row.total_usd for row in report.rows} == expected
        assert sum(Decimal(row.total_usd) for row in report.rows) == Decimal("4.41")
        assert report.totals.total_usd == "4.410000"

    def test_run_rows_charge_busy_and_provisioning(self, log_path: Path) -> None:
        report = cost(log_path, "run")

        assert amounts(report)["eval-3"] == (
            "0.030000",
            "0.000000",
            "0.300000",
            "0.330000",
        )
        assert amounts(report)["main"] == (
            "0.040000",
            "2.640000",
            "0.000000",
            "2.680000",
        )

    def test_window_clips_segments(self, log_path: Path) -> None:
        report = cost(log_path, "instance", since=60, until=120)

        # a: idle 60..100, busy 100..120; b: busy 60..83, idle 83..89.
        assert amounts(report) == {
            "a": ("0.000000", "0.800000", "0.400000", "1.200000"),
            "b": ("0.000000", "0.060000", "0.230000", "0.290000"),
        }
        assert report.since == utc_iso(at(60))
        assert report.until == utc_iso(at(120))

    def test_open_segments_run_to_until(self, log_path: Path) -> None:
        report = cost(log_path, "instance", until=150)

        # a is idle from 130 and still there at 150: 8m + 60m + 20m idle.
        assert amounts(report)["a"] == ("0.040000", "1.760000", "1.200000", "3.000000")

    def test_since_after_until_is_rejected(self, log_path: Path) -> None:
        with pytest.raises(InvalidValueError, match="expected a time before --until"):
            cost(log_path, since=120, until=60)

    def test_until_is_capped_at_now(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            report = service.cost_report(
                reader, since=None, until=at(5000), now=at(150), by="pool"
            )

        assert report.until == utc_iso(at(150))


class TestMoney:
    @pytest.mark.parametrize(
        ("price", "units"),
        [
            (0.1, 100_000),
            (1.2, 1_200_000),
            (0.000001, 1),
            (0.0000004, 0),
            (12.345678, 12_345_678),
        ],
    )
    def test_price_units_are_exact_micro_usd(self, price: float, units: int) -> None:
        assert price_units(price) == units

    @pytest.mark.parametrize(
        ("units", "micro"),
        [(1_800_000_000, 0), (5_400_000_000, 2), (3_600_000_001, 1), (-1, 0)],
    )
    def test_micro_usd_rounds_half_to_even(self, units: int, micro: int) -> None:
        assert micro_usd(units) == micro

    def test_split_parts_add_up_to_rounded_sum(self) -> None:
        parts = [1_799_999_999, 1_800_000_001, 1_799_999_999]

        rounded = split_rounded(parts)

        assert sum(rounded) == micro_usd(sum(parts))

    @pytest.mark.parametrize(
        ("micro", "text"), [(0, "0.000000"), (1_250_000, "1.250000"), (-3, "-0.000003")]
    )
    def test_format_usd(self, micro: int, text: str) -> None:
        assert format_usd(micro) == text


# Idle-policy what-if


class TestIdlePolicy:
    def test_30m_policy_matches_hand_computation(self, log_path: Path) -> None:
        what_if = cost(log_path, "run", idle_duration=1800).what_if
        assert what_if is not None

        # a: gap 60m > 30m, so it idles 30m, is torn down (1m), and r2 waits
        # for a new one (2m provisioning); its last stretch 130..190 is cut to
        # 30m + 1m teardown: idle 8 + 30 + 1 + 31 = 70m = $1.40.
        # b: expired for real, so it now idles 30m + 1m teardown = $0.31.
        assert what_if.simulated.idle_usd == "1.710000"
        assert what_if.simulated.provisioning_usd == "0.310000"
        assert what_if.simulated.busy_usd == "1.500000"
        assert what_if.simulated.total_usd == "3.520000"
        assert what_if.actual.total_usd == "4.410000"
        assert what_if.difference_usd == "-0.890000"
        assert what_if.newly_provisioned_claims == 1
        assert (what_if.actual.reused_claims, what_if.actual.provisioned_claims) == (
            2,
            1,
        )
        assert (
            what_if.simulated.reused_claims,
            what_if.simulated.provisioned_claims,
        ) == (1, 2)

    @pytest.mark.parametrize(
        ("idle_duration", "total", "newly_provisioned"),
        [(300, "2.270000", 2), (0, "1.920000", 2), ("off", "5.520000", 0)],
        ids=["5m", "0", "off"],
    )
    def test_other_policies_match_hand_computation(
        self,
        log_path: Path,
        idle_duration: int | str,
        total: str,
        newly_provisioned: int,
    ) -> None:
        # 5m: a idles 5+1+5+1+6 = 18m ($0.36) and provisions twice more
        # ($0.08); b is unchanged. 0: a idles only its three 1m teardowns
        # ($0.06), provisions twice more, and b idles its 1m teardown ($0.01).
        # off: b never expires and idles from 83 to the end at 200 ($1.17).
        what_if = cost(log_path, "run", idle_duration=idle_duration).what_if
        assert what_if is not None

        assert what_if.simulated.total_usd == total
        assert what_if.newly_provisioned_claims == newly_provisioned

    def test_real_policy_reproduces_real_cost(self, tmp_path: Path) -> None:
        path = tmp_path / "events.db"
        anyio.run(_write_expiring_history, path)

        what_if = cost(path, "pool", idle_duration=300).what_if
        assert what_if is not None

        assert what_if.simulated == what_if.actual
        assert what_if.actual.total_usd == "0.310000"


async def _write_expiring_history(path: Path) -> None:
    """One $0.60/h instance with a 5m idle duration, claimed twice 3m apart."""
    log = await ScriptedLog.open(path)
    try:
        await log.append(0, [("pool/main", PoolCreated("main"))])
        await log.append(0, [("run/r1", RunSubmitted("r1", "one", "main", SPEC_SMALL))])
        await log.append(
            0,
            [
                (
                    "instance/b",
                    InstanceRequested("b", "b", "main", OFFER_B, 300, run_id="r1"),
                )
            ],
        )
        await log.append(
            1,
            [
                ("instance/b", InstanceProvisioned("b", SMALL)),
                ("instance/b", InstanceClaimed("b", "r1")),
            ],
        )
        await log.append(
            11,
            [
                ("run/r1", RunFinished("r1", 0)),
                ("instance/b", InstanceReleased("b", "r1")),
            ],
        )
        await log.append(
            14, [("run/r2", RunSubmitted("r2", "two", "main", SPEC_SMALL))]
        )
        await log.append(14, [("instance/b", InstanceClaimed("b", "r2"))])
        await log.append(
            24,
            [
                ("run/r2", RunFinished("r2", 0)),
                ("instance/b", InstanceReleased("b", "r2")),
            ],
        )
        await log.append(29, [("instance/b", InstanceIdleExpired("b", at(24), 300))])
        await log.append(31, [("instance/b", InstanceTerminated("b"))])
    finally:
        await log.close()


# Explain


class TestExplain:
    def test_names_failed_requirement_of_each_rejected_candidate(
        self, log_path: Path
    ) -> None:
        with LogReader.open(log_path) as reader:
            explanation = service.explain(reader, "train-2")

        [decision] = explanation.decisions
        assert decision.event == "InstanceClaimed"
        assert decision.summary == "claimed idle instance a"
        assert [
            (c.name, c.outcome, c.requirement, c.reason) for c in decision.candidates
        ] == [
            ("a", "chosen", None, None),
            ("b", "rejected", "cpu 4..", "cpu 2 is outside 4.."),
        ]

    def test_provisioned_run_shows_offers_then_claim(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            explanation = service.explain(reader, "r3")

        requested, claimed = explanation.decisions
        assert requested.event == "InstanceRequested"
        assert [(c.kind, c.outcome, c.requirement) for c in requested.candidates] == [
            ("instance", "rejected", "an idle instance"),
            ("offer", "chosen", None),
            ("offer", "rejected", "cpu 2"),
        ]
        assert claimed.summary == "claimed instance b, provisioned for this run"

    def test_failed_run_shows_its_reason(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            explanation = service.explain(reader, "big-4")

        assert [d.summary for d in explanation.decisions][-1] == (
            "failed: provisioning instance c failed: no capacity"
        )

    def test_unknown_run_is_not_found(self, log_path: Path) -> None:
        with (
            LogReader.open(log_path) as reader,
            pytest.raises(RunNotFoundError, match="run 'nope' not found"),
        ):
            service.explain(reader, "nope")


GPU_OFFER = Offer(
    "local",
    "local",
    "gpu",
    Resources(cpus=8, memory_gb=64.0, gpus=(Gpu("T4", 16.0),), disk_gb=100.0),
    spot=True,
    price=3.0,
)


@pytest.mark.parametrize(
    ("requirements", "expected"),
    [
        ({"backends": ("aws",)}, "backends aws"),
        ({"spot_policy": "on-demand"}, "spot policy on-demand"),
        ({"spot_policy": "auto", "cpu": "16.."}, "cpu 16.."),
        ({"spot_policy": "auto", "memory": "128GB.."}, "memory 128GB.."),
        ({"spot_policy": "auto", "gpu": "A100"}, "gpu A100:1"),
        ({"spot_policy": "auto", "gpu": "2"}, "gpu 2"),
        ({"spot_policy": "auto", "gpu": "40GB.."}, "gpu 40GB..:1"),
        ({"spot_policy": "auto", "disk": "500GB.."}, "disk 500GB.."),
        ({"spot_policy": "auto", "max_price": "1.5"}, "max price $1.5/h"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_failed_requirement_names_each_matching_field(
    requirements: dict[str, Any], expected: str
) -> None:
    fields = {"cpu": "1..", "memory": "1GB..", **requirements}
    spec = RunSpec(requirements=build_requirements(**fields))
    reason = mismatch(spec.requirements, GPU_OFFER)
    assert reason is not None

    assert failed_requirement(reason, spec) == expected


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("busy with run r-1", "an idle instance"),
        ("busy with run placed in the same pass", "an idle instance"),
        ("provisioning", "an idle instance"),
        ("terminating: idle duration expired", "a schedulable instance"),
        ("not the requested instance local-2", "instance local-2"),
        ("unreachable: connect timed out", "a reachable instance"),
        ("something new", None),
    ],
)
def test_failed_requirement_names_placement_rules(
    reason: str, expected: str | None
) -> None:
    spec = RunSpec(instance="local-2")

    assert failed_requirement(reason, spec) == expected


# Event listing


class TestEventLines:
    @pytest.mark.parametrize(
        ("since", "until", "streams", "types", "positions"),
        [
            (None, None, (), ("InstanceClaimed",), [5, 12, 18]),
            (None, None, ("run/r3",), (), [9, 13]),
            (None, None, ("instance/*",), ("InstanceTerminated",), [16, 26]),
            (at(100), at(130), (), (), [17, 18, 19, 20]),
            (at(88), None, ("instance/b",), (), [15, 16]),
        ],
    )
    def test_filter_selects_records(
        self,
        log_path: Path,
        since: int | None,
        until: int | None,
        streams: tuple[str, ...],
        types: tuple[str, ...],
        positions: list[int],
    ) -> None:
        event_filter = build_filter(since, until, streams, types)

        with LogReader.open(log_path) as reader:
            lines = list(service.event_lines(reader, event_filter))

        assert [msgspec.json.decode(line)["position"] for line in lines] == positions

    @pytest.mark.parametrize(
        ("after", "count"), [(0, HEAD), (20, 6), (HEAD, 0), (99, 0)]
    )
    def test_after_skips_records(self, log_path: Path, after: int, count: int) -> None:
        with LogReader.open(log_path) as reader:
            lines = list(service.event_lines(reader, build_filter(), after))

        assert len(lines) == count

    def test_line_shows_record_fields(self, log_path: Path) -> None:
        with LogReader.open(log_path) as reader:
            first = next(service.event_lines(reader, build_filter()))

        line = msgspec.json.decode(first)
        assert line["recorded_at"] == "2025-03-01T12:00:00+00:00"
        assert line["actor"] == "alice (uid 1000)"
        assert line["type"] == "PoolCreated"
        assert line["event"] == {"type": "PoolCreated", "pool": "main"}
        assert line["hash"] == bytes(rows(log_path)[0][4]).hex()

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"types": ["InstanceClaimd"]}, "invalid event type 'InstanceClaimd'"),
            ({"since": at(10), "until": at(5)}, "expected a time before --until"),
        ],
    )
    def test_filter_rejects_invalid_values(
        self, kwargs: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(InvalidValueError, match=message):
            build_filter(**kwargs)


# Time options


class TestTimes:
    NOW = T0 + 123

    @pytest.mark.parametrize(
        ("text", "utc", "expected"),
        [
            ("now", False, NOW),
            ("-2h", False, NOW - 7200 * 1_000_000),
            ("-1h30m", False, NOW - 5400 * 1_000_000),
            ("-90", False, NOW - 90 * 1_000_000),
            ("2025-03-01T12:00:00Z", False, T0),
            ("2025-03-01 14:00+02:00", False, T0),
            ("2025-03-01T12:00:00.000001+00:00", False, T0 + 1),
            ("2025-03-01T12:00", True, T0),
        ],
    )
    def test_parse_time_accepts_iso_and_relative(
        self, text: str, utc: bool, expected: int
    ) -> None:
        assert parse_time(text, self.NOW, utc=utc) == expected

    @pytest.mark.parametrize("text", ["yesterday", "-off", "-2x", "-", "2025-13-01"])
    def test_parse_time_rejects_other_text(self, text: str) -> None:
        with pytest.raises(InvalidValueError, match="expected an ISO 8601 time"):
            parse_time(text, self.NOW, field="--since")

    def test_naive_time_is_local(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TZ", "TST-2")
        import time

        time.tzset()
        try:
            parsed = parse_time("2025-03-01T14:00", self.NOW)
        finally:
            monkeypatch.undo()
            time.tzset()

        assert parsed == T0

    def test_utc_iso_keeps_every_microsecond(self) -> None:
        assert utc_iso(1_740_830_400_123_457) == "2025-03-01T12:00:00.123457+00:00"


# Offline access and memory


class TestOffline:
    def test_export_file_is_not_opened_as_log(
        self, log_path: Path, tmp_path: Path
    ) -> None:
        export = tmp_path / "events.jsonl"
        export.write_bytes(b"".join(export_lines(log_path)))

        with pytest.raises(Exception, match="it is not an SQLite file"):
            offline.replay_file(str(export), ReplayPoint(position=1))

    def test_verify_file_tells_exports_from_logs(
        self, log_path: Path, tmp_path: Path
    ) -> None:
        export = tmp_path / "events.jsonl"
        export.write_bytes(b"".join(export_lines(log_path)))

        assert offline.verify_file(str(export))["source"] == "export"
        assert offline.verify_file(str(log_path))["source"] == "log"


def _write_cycles(path: Path, cycles: int) -> None:
    """A log of ``cycles`` claim and release pairs on one instance."""

    async def write() -> None:
        log = await EventLog.open(path, synchronous="OFF")
        actor = Actor(None, "dstackd")
        try:
            await log.append(
                [
                    NewEvent("pool/p", PoolCreated("p")),
                    NewEvent(
                        "instance/i", InstanceRequested("i", "i", "p", OFFER_B, 300)
                    ),
                    NewEvent("instance/i", InstanceProvisioned("i", SMALL)),
                    NewEvent("run/r", RunSubmitted("r", "r", "p", SPEC_SMALL)),
                ],
                actor,
            )
            batch: list[NewEvent] = []
            for _ in range(cycles):
                batch.append(NewEvent("instance/i", InstanceClaimed("i", "r")))
                batch.append(NewEvent("instance/i", InstanceReleased("i", "r")))
                if len(batch) >= 4000:
                    await log.append(batch, actor)
                    batch = []

            if batch:
                await log.append(batch, actor)
        finally:
            await log.close()

    anyio.run(write)


def _peak_bytes(operation: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        operation()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _drain(lines: Iterator[bytes]) -> None:
    for _ in lines:
        pass


@pytest.fixture(scope="module")
def cycle_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cycles")
    short, long = directory / "short.db", directory / "long.db"
    _write_cycles(short, 2_500)
    _write_cycles(long, 10_000)

    return short, long


@pytest.mark.parametrize(
    "operation",
    [
        lambda reader: verify_log(reader),
        lambda reader: replay_view(reader, ReplayPoint(position=reader.head()[0])),
        lambda reader: _drain(service.export_lines(reader)),
        lambda reader: _drain(service.event_lines(reader, build_filter())),
    ],
    ids=["verify", "replay", "export", "events"],
)
def test_memory_stays_flat_with_log_length(
    cycle_logs: tuple[Path, Path], operation: Callable[[LogReader], object]
) -> None:
    # 5,004 and 20,004 records: rows are read 4,096 at a time, so a log four
    # times as long must not need more memory (measured: about 1 MB for both).
    peaks = []
    for path in cycle_logs:
        with LogReader.open(path) as reader:
            peaks.append(_peak_bytes(lambda: operation(reader)))

    short, long = peaks
    assert long < short * 1.25
