"""Tests of the single-instance locks, across real processes."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstackd.lockfile import (
    AlreadyRunningError,
    LockFailedError,
    NotASocketError,
    acquire_lock,
    read_lock_pid,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 20

# Takes the lock given as argv[1], reports it on stdout and holds it until
# stdin closes or the process is killed.
HOLDER = """
import sys
from dstackd.lockfile import acquire_lock
lock = acquire_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""

# Tries once to take the lock given as argv[1] and prints the error.
TAKER = """
import sys
from dstackd.lockfile import AlreadyRunningError, acquire_lock
try:
    acquire_lock(sys.argv[1])
except AlreadyRunningError as error:
    print(error)
    sys.exit(3)
print("locked")
"""


@pytest.fixture
def lock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dsl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def _start_holder(lock_file: Path) -> subprocess.Popen[str]:
    holder = _python(
        HOLDER, str(lock_file), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None
    # readline returns "" if the holder dies first, so this wait is bounded.
    assert holder.stdout.readline() == "locked\n"

    return holder


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)

    process.wait(timeout=TIMEOUT_SECONDS)


class TestAcquireLock:
    def test_records_pid_in_lock_file(self, lock_dir: Path) -> None:
        lock_file = lock_dir / "dstackd.lock"

        with acquire_lock(str(lock_file)) as lock:
            assert lock.held
            assert read_lock_pid(str(lock_file)) == os.getpid()

    def test_second_acquire_in_process_fails(self, lock_dir: Path) -> None:
        lock_file = lock_dir / "dstackd.lock"

        with acquire_lock(str(lock_file)):
            with pytest.raises(AlreadyRunningError) as caught:
                acquire_lock(str(lock_file))

        assert caught.value.lock_file == str(lock_file)
        assert caught.value.pid == os.getpid()

    def test_release_allows_next_acquire(self, lock_dir: Path) -> None:
        lock_file = str(lock_dir / "dstackd.lock")
        first = acquire_lock(lock_file)

        first.release()
        first.release()
        second = acquire_lock(lock_file)

        assert not first.held
        assert second.held
        second.release()

    def test_other_process_fails_with_holder_pid(self, lock_dir: Path) -> None:
        lock_file = lock_dir / "dstackd.lock"

        with acquire_lock(str(lock_file)):
            taker = _python(TAKER, str(lock_file), stdout=subprocess.PIPE)
            output, _ = taker.communicate(timeout=TIMEOUT_SECONDS)

        assert taker.returncode == 3
        assert f"another dstackd (pid {os.getpid()})" in output
        assert f"holds the lock {lock_file}" in output

    def test_lock_of_killed_holder_can_be_taken(self, lock_dir: Path) -> None:
        lock_file = lock_dir / "dstackd.lock"
        holder = _start_holder(lock_file)
        try:
            with pytest.raises(AlreadyRunningError, match=f"pid {holder.pid}"):
                acquire_lock(str(lock_file))
        finally:
            _kill(holder)

        with acquire_lock(str(lock_file)) as lock:
            assert lock.held
            assert read_lock_pid(str(lock_file)) == os.getpid()

    def test_lock_not_inherited_by_children(self, lock_dir: Path) -> None:
        lock_file = str(lock_dir / "dstackd.lock")
        lock = acquire_lock(lock_file)
        child = _python(
            "import sys; print('started', flush=True); sys.stdin.read()",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=False,
        )
        try:
            # Linux resumes the parent of a vfork before the child's exec closes
            # its close-on-exec descriptors, so wait until the child runs.
            assert child.stdout is not None
            assert child.stdout.readline() == "started\n"
            lock.release()

            with acquire_lock(lock_file) as again:
                assert again.held
        finally:
            _kill(child)

    def test_socket_lock_blocks_second_data_dir(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")

        with acquire_lock(str(lock_dir / "a.lock"), socket_path):
            with pytest.raises(AlreadyRunningError) as caught:
                acquire_lock(str(lock_dir / "b.lock"), socket_path)

        assert caught.value.lock_file == socket_path + ".lock"
        assert caught.value.pid == os.getpid()

    def test_data_dir_lock_blocks_second_socket(self, lock_dir: Path) -> None:
        data_lock = str(lock_dir / "a.lock")

        with acquire_lock(data_lock, str(lock_dir / "one.sock")):
            with pytest.raises(AlreadyRunningError) as caught:
                acquire_lock(data_lock, str(lock_dir / "two.sock"))

        assert caught.value.lock_file == data_lock

    def test_socket_conflict_releases_data_lock(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")
        data_lock = str(lock_dir / "b.lock")

        with acquire_lock(str(lock_dir / "a.lock"), socket_path):
            with pytest.raises(AlreadyRunningError):
                acquire_lock(data_lock, socket_path)

            with acquire_lock(data_lock) as lock:
                assert lock.held

    def test_handle_lists_both_lock_files(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")

        with acquire_lock(str(lock_dir / "a.lock"), socket_path) as lock:
            assert lock.paths == (str(lock_dir / "a.lock"), socket_path + ".lock")

    def test_missing_directory_fails_with_reason(self, lock_dir: Path) -> None:
        lock_file = str(lock_dir / "missing" / "dstackd.lock")

        with pytest.raises(LockFailedError) as caught:
            acquire_lock(lock_file)

        message = str(caught.value)
        assert message == f"cannot lock {lock_file}: No such file or directory"

    def test_pid_unknown_while_file_empty(self, lock_dir: Path) -> None:
        lock_file = lock_dir / "dstackd.lock"
        lock_file.write_text("")

        error = AlreadyRunningError(str(lock_file), read_lock_pid(str(lock_file)))

        assert error.pid is None
        assert "a process with unknown pid" in str(error)


class TestRemoveStaleSocket:
    def test_removes_socket_of_killed_daemon(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(socket_path)

        with acquire_lock(str(lock_dir / "a.lock"), socket_path) as lock:
            removed = lock.remove_stale_socket(socket_path)

        assert removed is True
        assert not os.path.lexists(socket_path)

    def test_missing_socket_is_not_an_error(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")

        with acquire_lock(str(lock_dir / "a.lock"), socket_path) as lock:
            removed = lock.remove_stale_socket(socket_path)

        assert removed is False

    def test_keeps_regular_file(self, lock_dir: Path) -> None:
        socket_path = lock_dir / "d.sock"
        socket_path.write_text("data")

        with acquire_lock(str(lock_dir / "a.lock"), str(socket_path)) as lock:
            with pytest.raises(NotASocketError, match="exists and is not a socket"):
                lock.remove_stale_socket(str(socket_path))

        assert socket_path.read_text() == "data"

    def test_requires_held_lock(self, lock_dir: Path) -> None:
        socket_path = str(lock_dir / "d.sock")
        lock = acquire_lock(str(lock_dir / "a.lock"), socket_path)
        lock.release()

        with pytest.raises(RuntimeError, match="needs the locks held"):
            lock.remove_stale_socket(socket_path)
