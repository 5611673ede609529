"""Tests of the table and value formatting in dstackctl.tables."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from dstackctl import tables

PLUS_TWO = timezone(timedelta(hours=2))
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def make_instance(**fields: object) -> dict[str, object]:
    instance: dict[str, object] = {
        "id": "i-1",
        "name": "local-1",
        "pool": "default-pool",
        "backend": "local",
        "region": "local",
        "instance_type": "local-4cpu",
        "resources": "4xCPU, 16GB",
        "spot": False,
        "price": 0.0,
        "status": "idle",
        "schedulable": True,
        "run": None,
        "idle_since": "2025-03-01T11:59:48Z",
        "idle_seconds": 12.0,
        "idle_duration": "300",
        "created_at": "2025-03-01T11:00:00Z",
    }
    instance.update(fields)
    return instance


def make_run(**fields: object) -> dict[str, object]:
    run: dict[str, object] = {
        "id": "r-1",
        "name": "quiet-fox-1",
        "pool": "default-pool",
        "type": "task",
        "status": "running",
        "command": "python train.py",
        "user": "alice",
        "instance": "local-1",
        "submitted_at": "2025-03-01T11:58:00Z",
        "started_at": "2025-03-01T11:58:01Z",
        "ended_at": None,
        "exit_status": None,
        "reason": None,
        "wait_ms": 850.0,
        "log_path": "/var/lib/dstackd/runs/r-1/output.log",
    }
    run.update(fields)
    return run


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (12, "12s"),
        (59.9, "59s"),
        (60, "1m"),
        (4 * 60 + 59, "4m"),
        (3600, "1h"),
        (2 * 3600 + 10 * 60 + 5, "2h10m"),
        (86400, "1d"),
        (3 * 86400 + 4 * 3600 + 59, "3d4h"),
        (-5, "0s"),
    ],
)
def test_format_duration_uses_two_largest_units(seconds: float, expected: str) -> None:
    assert tables.format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("300", "5m"), (259200, "3d"), ("off", "off"), ("0", "0s"), (None, "-")],
)
def test_format_idle_duration_accepts_seconds_and_off(
    value: str | int | None, expected: str
) -> None:
    assert tables.format_idle_duration(value) == expected


@pytest.mark.parametrize(
    ("wait_ms", "expected"),
    [
        (None, "-"),
        (0, "0ms"),
        (850.4, "850ms"),
        (1234, "1.2s"),
        (59_900, "59.9s"),
        (125_000, "2m"),
    ],
)
def test_format_wait_scales_units(wait_ms: float | None, expected: str) -> None:
    assert tables.format_wait(wait_ms) == expected


def test_format_price_has_four_decimals() -> None:
    assert tables.format_price(1.5) == "$1.5000"
    assert tables.format_price(0.00004) == "$0.0000"


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        ("2025-03-01T10:30:00Z", None, "2025-03-01 12:30:00"),
        ("2025-03-01T10:30:00+00:00", NOW, "12:30:00"),
        ("2025-03-01T10:30:00", NOW, "12:30:00"),
        ("2025-02-28T22:30:00Z", NOW, "00:30:00"),
        ("2025-02-28T21:30:00Z", NOW, "2025-02-28 23:30:00"),
        ("not a time", NOW, "not a time"),
        (None, NOW, "-"),
    ],
)
def test_format_local_time_converts_utc_to_the_zone(
    value: str | None, now: datetime | None, expected: str
) -> None:
    assert tables.format_local_time(value, now=now, tz=PLUS_TWO) == expected


def test_render_table_aligns_columns_without_trailing_blanks() -> None:
    text = tables.render_table(["A", "LONG HEADER", "C"], [["xyz", "1", ""]])

    assert text.splitlines() == ["A    LONG HEADER  C", "xyz  1"]


def test_offers_table_numbers_and_formats_offers() -> None:
    offers = [
        {
            "backend": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "resources": "4xCPU, 16GB, 1xA10G (24GB)",
            "spot": True,
            "price": 0.4,
            "offer": {},
        },
        {
            "backend": "local",
            "region": "local",
            "instance_type": "local-2cpu",
            "resources": "2xCPU, 8GB",
            "spot": False,
            "price": 0.0,
            "offer": {},
        },
    ]

    lines = tables.offers_table(offers).splitlines()

    assert lines[0].split() == [
        "#",
        "BACKEND",
        "REGION",
        "INSTANCE",
        "RESOURCES",
        "SPOT",
        "PRICE",
    ]
    assert lines[1].startswith("1  aws ")
    assert lines[1].endswith("spot       $0.4000")
    assert lines[2].startswith("2  local ")
    assert lines[2].endswith("on-demand  $0.0000")


def test_instances_table_shows_idle_time_with_idle_duration() -> None:
    idle = make_instance()
    busy = make_instance(
        name="local-2",
        status="busy",
        run="quiet-fox-1",
        idle_since=None,
        idle_seconds=None,
        spot=True,
        price=1.25,
    )

    lines = tables.instances_table([idle, busy], NOW).splitlines()

    assert lines[0].split() == [
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
    assert lines[1].split()[-3:] == ["idle", "-", "12s/5m"]
    assert lines[2].split()[-5:] == ["spot", "$1.2500", "busy", "quiet-fox-1", "-"]


def test_format_idle_falls_back_to_idle_since() -> None:
    instance = make_instance(
        idle_seconds=None, idle_since="2025-03-01T09:50:00Z", idle_duration="off"
    )

    assert tables.format_idle(instance, NOW) == "2h10m/off"


def test_runs_table_formats_wait_and_times() -> None:
    run = make_run()
    queued = make_run(
        name="slow-owl-2",
        status="submitted",
        instance=None,
        wait_ms=None,
        submitted_at="2025-02-27T08:00:00Z",
        command="x" * 60,
    )

    lines = tables.runs_table([run, queued], NOW, tz=UTC).splitlines()

    assert lines[0].split() == [
        "RUN",
        "STATUS",
        "INSTANCE",
        "POOL",
        "USER",
        "SUBMITTED",
        "WAIT",
        "COMMAND",
    ]
    assert lines[1].split() == [
        "quiet-fox-1",
        "running",
        "local-1",
        "default-pool",
        "alice",
        "11:58:00",
        "850ms",
        "python",
        "train.py",
    ]
    assert lines[2].split()[2] == "-"
    assert "2025-02-27 08:00:00" in lines[2]
    assert lines[2].endswith("x" * 45 + "...")


def test_pools_table_marks_the_default_pool() -> None:
    pools = [
        {
            "name": "default-pool",
            "default": True,
            "created_at": "2025-03-01T10:00:00Z",
            "instances": 3,
            "idle": 1,
            "busy": 2,
        },
        {
            "name": "gpu",
            "default": False,
            "created_at": "2025-03-01T10:00:00Z",
            "instances": 0,
            "idle": 0,
            "busy": 0,
        },
    ]

    lines = tables.pools_table(pools, tz=UTC).splitlines()

    assert lines[0].split() == [
        "POOL",
        "DEFAULT",
        "INSTANCES",
        "IDLE",
        "BUSY",
        "CREATED",
    ]
    assert lines[1].split() == [
        "default-pool",
        "yes",
        "3",
        "1",
        "2",
        "2025-03-01",
        "10:00:00",
    ]
    assert lines[2].split() == ["gpu", "0", "0", "0", "2025-03-01", "10:00:00"]


def test_event_line_shows_all_fields() -> None:
    record = {
        "position": 42,
        "stream": "instance/i-1",
        "version": 1,
        "recorded_at": "2025-03-01T10:00:00.123456Z",
        "actor": "alice",
        "type": "InstanceRequested",
        "event": {
            "type": "InstanceRequested",
            "instance_id": "i-1",
            "name": "local-1",
            "pool": "default-pool",
            "offer": {"backend": "local", "instance_type": "local-4cpu"},
            "idle_duration": 300,
            "candidates": [{"kind": "offer", "name": "x"}],
        },
        "hash": "ab" * 32,
    }

    line = tables.event_line(record, tz=UTC)

    assert line.split()[:6] == [
        "42",
        "2025-03-01",
        "10:00:00",
        "instance/i-1",
        "InstanceRequested",
        "alice",
    ]
    assert line.endswith(
        "instance_id=i-1 name=local-1 pool=default-pool offer=local-4cpu "
        "idle_duration=300"
    )


def test_summarize_event_quotes_and_cuts() -> None:
    event = {"type": "RunFailed", "run_id": "r-1", "reason": "out of memory" * 20}

    summary = tables.summarize_event(event)

    assert summary.startswith('run_id=r-1 reason="out of memory')
    assert len(summary) == tables.SUMMARY_WIDTH
    assert summary.endswith("...")
