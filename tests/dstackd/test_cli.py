"""Tests of the ``dstackd`` command line: what ``repair-log`` prints and exits."""

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from dstackd.cli import main
from events.log import EventLog
from events.model import DAEMON_ACTOR
from tests.events.log_fixtures import execute, flip_byte, pool_event


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo the logging setup of ``repair-log``, which writes to a captured stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)

    root.setLevel(level)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()

    return directory


async def write_log(path: Path, count: int) -> None:
    async with await EventLog.open(str(path)) as log:
        for index in range(count):
            await log.append([pool_event(f"p{index}")], DAEMON_ACTOR)


def repair_log(data_dir: Path) -> Result:
    return CliRunner().invoke(main, ["repair-log", "--data-dir", str(data_dir)])


def backups(data_dir: Path) -> list[str]:
    """Return the names of the database backups, without their -wal files."""
    names = os.listdir(data_dir)

    return sorted(name for name in names if ".bak-" in name and "-wal" not in name)


async def test_repair_of_intact_log_prints_head(data_dir: Path) -> None:
    log_path = data_dir / "events.db"
    await write_log(log_path, 3)

    result = repair_log(data_dir)

    assert result.exit_code == 0
    assert result.stdout == (
        f"Event log {log_path} is intact up to its head at position 3. "
        "Nothing was changed.\n"
    )
    assert backups(data_dir) == []


# Each case: the corruption, then the position, problem, records and snapshots
# removed, written as the output names them.
DAMAGE_CASES = [
    pytest.param(
        lambda path: flip_byte(path, 4),
        4,
        "stored hash differs from SHA-256 of the previous hash and body",
        "3 records",
        "0 snapshots",
        id="changed-body",
    ),
    pytest.param(
        lambda path: execute(
            path, "UPDATE events SET body = CAST(body AS TEXT) WHERE position = 6"
        ),
        6,
        "body is stored as TEXT, expected BLOB",
        "1 record",
        "0 snapshots",
        id="text-body",
    ),
]


@pytest.mark.parametrize(
    ("corrupt", "position", "problem", "records", "snapshots"), DAMAGE_CASES
)
async def test_repair_of_damaged_log_prints_sentences(
    data_dir: Path,
    corrupt: Callable[[str], None],
    position: int,
    problem: str,
    records: str,
    snapshots: str,
) -> None:
    log_path = data_dir / "events.db"
    await write_log(log_path, 6)
    corrupt(str(log_path))

    result = repair_log(data_dir)

    [backup] = backups(data_dir)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        f"Event log {log_path} was damaged at position {position}: {problem}.",
        f"Backed up the damaged log to {data_dir / backup}.",
        f"Kept the records up to position {position - 1}, the new head.",
        f"Removed {records} from position {position} on, and {snapshots}.",
    ]
    assert "RepairResult" not in result.output
    assert '"event": "log_repaired"' in result.stderr


@pytest.mark.parametrize("missing", ["log", "data-dir"])
def test_repair_of_missing_log_fails(data_dir: Path, missing: str) -> None:
    directory = data_dir if missing == "log" else data_dir / "absent"
    log_path = directory / "events.db"

    result = repair_log(directory)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"dstackd: event log {log_path} not found: check --data-dir\n"
    )


def test_repair_of_non_log_file_fails(data_dir: Path) -> None:
    (data_dir / "events.db").write_bytes(b"plain text, not SQLite" * 100)

    result = repair_log(data_dir)

    assert result.exit_code == 1
    assert result.stderr == (
        f"dstackd: cannot repair event log {data_dir / 'events.db'}: "
        "file is not a database\n"
    )
