"""Tests of events.log_reader: offline reads that leave the file untouched."""

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from events.errors import LogCorruptedError
from events.log import EventLog
from events.log_reader import LogReader, LogSchemaError
from events.model import DAEMON_ACTOR
from events.record import GENESIS_HASH, Record
from tests.events.log_fixtures import execute, flip_byte, pool_event
from tests.events.test_log import STORAGE_CLASS_CORRUPTIONS


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()

    return directory


async def write_log(path: str, count: int) -> list[Record]:
    """Write ``count`` single-event batches and close the log cleanly."""
    records = []
    async with await EventLog.open(path) as log:
        for index in range(count):
            records += await log.append([pool_event(f"p{index}")], DAEMON_ACTOR)

    return records


def snapshot_files(directory: Path) -> tuple[list[str], dict[str, bytes]]:
    names = sorted(os.listdir(directory))
    contents = {name: (directory / name).read_bytes() for name in names}

    return names, contents


def read_everything(path: str) -> int:
    """Use every reading method once; return the number of records."""
    with LogReader.open(path) as reader:
        count = sum(1 for _ in reader.records())
        assert reader.verify().ok
        assert len(list(reader.raw())) == count
        assert reader.head()[0] == count
        reader.snapshot_headers()

    return count


class TestOpenLeavesFileUnchanged:
    async def test_cleanly_closed_log(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        assert not os.path.exists(path + "-wal")
        before = snapshot_files(log_dir)

        count = read_everything(path)

        assert count == 5
        assert snapshot_files(log_dir) == before

    async def test_log_with_its_writer_open(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        async with await EventLog.open(path) as log:
            await log.append([pool_event("a"), pool_event("b")], DAEMON_ACTOR)
            assert os.path.getsize(path + "-wal") > 0
            before = snapshot_files(log_dir)

            count = read_everything(path)

            after = snapshot_files(log_dir)

        assert count == 2
        assert after == before

    async def test_wal_left_by_a_killed_writer(
        self, log_dir: Path, tmp_path: Path
    ) -> None:
        # A copy taken while the writer is open has a -wal and no writer,
        # as after a crash.
        source = str(tmp_path / "live.db")
        async with await EventLog.open(source) as log:
            await log.append([pool_event("a"), pool_event("b")], DAEMON_ACTOR)
            for suffix in ("", "-wal"):
                shutil.copyfile(source + suffix, str(log_dir / "events.db") + suffix)

        path = str(log_dir / "events.db")
        before = snapshot_files(log_dir)

        count = read_everything(path)

        assert count == 2
        assert snapshot_files(log_dir) == before
        assert sorted(os.listdir(log_dir)) == ["events.db", "events.db-wal"]


class TestRecords:
    async def test_records_equal_what_was_appended(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        written = await write_log(path, 6)

        with LogReader.open(path) as reader:
            assert list(reader.records()) == written
            assert list(reader.records(after=2)) == written[2:]
            assert list(reader.records(after=2, until=4)) == written[2:4]
            assert list(reader.records(verify=False)) == written

    async def test_records_with_hashes_match_raw(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 4)

        with LogReader.open(path) as reader:
            pairs = list(reader.records_with_hashes())
            raw = list(reader.raw())
            head = reader.head()

        assert [record.position for record, _ in pairs] == [1, 2, 3, 4]
        assert [digest for _, digest in pairs] == [digest for _, digest in raw]
        assert head == (4, raw[-1][1])

    async def test_records_raise_at_first_bad_position(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        flip_byte(path, 3)
        seen: list[int] = []

        with LogReader.open(path) as reader, pytest.raises(LogCorruptedError) as raised:
            for record in reader.records():
                seen.append(record.position)

        assert seen == [1, 2]
        assert raised.value.position == 3
        assert "stored hash differs" in raised.value.problem

    @pytest.mark.parametrize("method", ["records", "records_with_hashes"])
    async def test_missing_record_is_named(self, log_dir: Path, method: str) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        execute(path, "DELETE FROM events WHERE position = 3")

        with LogReader.open(path) as reader, pytest.raises(LogCorruptedError) as raised:
            list(getattr(reader, method)())

        assert raised.value.position == 3
        assert "record is missing" in raised.value.problem

    async def test_records_after_a_missing_start_raise(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        execute(path, "DELETE FROM events WHERE position = 3")

        with (
            LogReader.open(path) as reader,
            pytest.raises(LogCorruptedError, match="at position 3"),
        ):
            list(reader.records(after=3))

    async def test_verify_matches_the_event_log(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        async with await EventLog.open(path, create=False) as log:
            flip_byte(path, 4)
            online = await log.verify()

        with LogReader.open(path) as reader:
            offline = reader.verify()

        assert offline == online
        assert offline.bad_position == 4
        assert offline.count == 3

    @pytest.mark.parametrize("bad_position", [1, 512, 513, 700, 1100])
    async def test_bad_record_found_across_chunks(
        self, log_dir: Path, bad_position: int
    ) -> None:
        path = str(log_dir / "events.db")
        async with await EventLog.open(path) as log:
            batch = [pool_event(f"p{index}") for index in range(1100)]
            await log.append(batch, DAEMON_ACTOR)

        flip_byte(path, bad_position)

        with LogReader.open(path) as reader:
            seen = 0
            with pytest.raises(LogCorruptedError) as raised:
                for _ in reader.records():
                    seen += 1

            result = reader.verify()
            with pytest.raises(LogCorruptedError) as raised_with_hashes:
                list(reader.records_with_hashes())

        assert seen == bad_position - 1
        assert raised.value.position == bad_position
        assert result.bad_position == bad_position
        assert result.count == bad_position - 1
        assert raised_with_hashes.value.position == bad_position

    async def test_empty_log(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 0)

        with LogReader.open(path) as reader:
            assert reader.head() == (0, GENESIS_HASH)
            assert list(reader.records()) == []
            assert reader.verify().ok


class TestStorageClass:
    """A body or hash that is not a BLOB is a changed record at its position."""

    @pytest.mark.parametrize(
        ("corrupt", "position", "problem"), STORAGE_CLASS_CORRUPTIONS
    )
    async def test_verify_names_the_record(
        self,
        log_dir: Path,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
    ) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        corrupt(path)

        with LogReader.open(path) as reader:
            result = reader.verify()

        assert not result.ok
        assert result.bad_position == position
        assert result.count == position - 1
        assert result.problem == problem

    @pytest.mark.parametrize("method", ["records", "records_with_hashes"])
    @pytest.mark.parametrize(
        ("corrupt", "position", "problem"), STORAGE_CLASS_CORRUPTIONS
    )
    async def test_read_raises_corrupted(
        self,
        log_dir: Path,
        corrupt: Callable[[str], None],
        position: int,
        problem: str,
        method: str,
    ) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        corrupt(path)
        seen: list[int] = []

        with LogReader.open(path) as reader, pytest.raises(LogCorruptedError) as raised:
            for item in getattr(reader, method)():
                record = item[0] if isinstance(item, tuple) else item
                seen.append(record.position)

        assert seen == list(range(1, position))
        assert raised.value.position == position
        assert raised.value.problem == problem
        assert "dstackd repair-log --data-dir" in str(raised.value)

    @pytest.mark.parametrize("method", ["records", "records_with_hashes"])
    async def test_read_after_text_hash_raises(
        self, log_dir: Path, method: str
    ) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 5)
        execute(path, "UPDATE events SET hash = hex(hash) WHERE position = 3")

        with LogReader.open(path) as reader, pytest.raises(LogCorruptedError) as raised:
            list(getattr(reader, method)(after=3))

        assert raised.value.position == 3
        assert raised.value.problem == "hash is stored as TEXT, expected BLOB"


class TestOpenErrors:
    def test_missing_file_raises(self, log_dir: Path) -> None:
        with pytest.raises(FileNotFoundError, match="events.db not found"):
            LogReader.open(log_dir / "events.db")

        assert os.listdir(log_dir) == []

    def test_database_without_log_tables_raises(self, log_dir: Path) -> None:
        path = str(log_dir / "other.db")
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE things (id INTEGER)")

        connection.close()

        with pytest.raises(LogSchemaError, match="events, meta, snapshots are missing"):
            LogReader.open(path)

    async def test_newer_schema_version_raises(self, log_dir: Path) -> None:
        path = str(log_dir / "events.db")
        await write_log(path, 1)
        execute(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")

        with pytest.raises(LogSchemaError, match="schema version 99 is newer"):
            LogReader.open(path)
