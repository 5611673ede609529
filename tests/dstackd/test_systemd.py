"""Tests of sd_notify, the watchdog and socket activation against real sockets."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from dstackd import systemd
from dstackd.systemd import SocketActivationError, listen_fds, watchdog_interval

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 20

# Plays systemd's part: moves the descriptors named in argv[1] (comma-separated)
# to 3, 4, ..., sets LISTEN_PID to its own pid (which exec keeps) and execs the
# rest of argv.
LAUNCHER = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",")]
# Move the sources out of the way first, so that no dup2 overwrites one.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(high)))
env["LISTEN_FDNAMES"] = ":".join(["api"] * len(high))
os.execve(sys.executable, [sys.executable, "-c", sys.argv[2]], env)
"""

# Adopts the passed sockets, reports what it got, accepts one connection on the
# first socket and writes to the second.
ACTIVATED = """
import fcntl, json, os, socket, sys
import structlog
from dstackd.systemd import listen_fds
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
sockets = listen_fds()
report = {
    "fds": [s.fileno() for s in sockets],
    "families": [int(s.family) for s in sockets],
    "types": [int(s.type) for s in sockets],
    "cloexec": [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                for s in sockets],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
connection, _ = sockets[0].accept()
connection.sendall(b"accepted")
sockets[1].sendall(b"paired")
"""

# Reports the error listen_fds raises for a descriptor that is not a socket.
NOT_A_SOCKET = """
from dstackd.systemd import SocketActivationError, listen_fds
try:
    listen_fds()
except SocketActivationError as error:
    print(error)
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dss-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    path = str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(TIMEOUT_SECONDS)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield receiver


def _received(receiver: socket.socket) -> str:
    return receiver.recv(4096).decode()


class TestSdNotify:
    def test_without_notify_socket_sends_nothing(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

        assert systemd.notify_ready() is False

    def test_ready_reaches_socket(self, notify_socket: socket.socket) -> None:
        sent = systemd.notify_ready()

        assert sent is True
        assert _received(notify_socket) == "READY=1"

    def test_ready_with_status(self, notify_socket: socket.socket) -> None:
        systemd.notify_ready("serving")

        assert _received(notify_socket) == "READY=1\nSTATUS=serving"

    def test_stopping_reaches_socket(self, notify_socket: socket.socket) -> None:
        systemd.notify_stopping()

        assert _received(notify_socket) == "STOPPING=1"

    def test_status_is_one_line(self, notify_socket: socket.socket) -> None:
        systemd.notify_status("3 runs\n2 idle")

        assert _received(notify_socket) == "STATUS=3 runs 2 idle"

    def test_abstract_socket_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        name = f"dstackd-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind("\0" + name)
            receiver.settimeout(TIMEOUT_SECONDS)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

            sent = systemd.sd_notify("READY=1")

            assert sent is True
            assert _received(receiver) == "READY=1"

    def test_missing_socket_is_logged(
        self, short_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = str(short_dir / "gone")
        monkeypatch.setenv("NOTIFY_SOCKET", path)

        with capture_logs() as logs:
            sent = systemd.sd_notify("READY=1")

        assert sent is False
        assert logs[0]["event"] == "sd_notify_failed"
        assert logs[0]["notify_socket"] == path
        assert "No such file or directory" in logs[0]["error"]

    def test_vsock_address_is_not_supported(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")

        with capture_logs() as logs:
            sent = systemd.sd_notify("READY=1")

        assert sent is False
        assert logs[0]["error"] == "unsupported address family"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 30.0, id="thirty-seconds"),
        pytest.param({"WATCHDOG_USEC": "1500"}, 0.0015, id="microseconds"),
        pytest.param(
            {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0, id="own-pid"
        ),
        pytest.param(
            {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None, id="other-pid"
        ),
        pytest.param(
            {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None, id="bad-pid"
        ),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "-5"}, None, id="negative"),
        pytest.param({"WATCHDOG_USEC": "30s"}, None, id="not-a-number"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_checks_own_pid_by_default() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}

    assert watchdog_interval(env) == 2.0


class _StopLoop(Exception):
    pass


class _FakeSleep:
    """Records the requested sleeps and stops the loop after ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.periods: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.periods.append(seconds)
        if len(self.periods) >= self.limit:
            raise _StopLoop


class TestWatchdogLoop:
    async def test_pings_at_half_interval(self, notify_socket: socket.socket) -> None:
        sleep = _FakeSleep(limit=3)

        with anyio.fail_after(TIMEOUT_SECONDS), pytest.raises(_StopLoop):
            await systemd.watchdog_loop(30.0, sleep=sleep)

        assert sleep.periods == [15.0, 15.0, 15.0]
        assert [_received(notify_socket) for _ in range(3)] == ["WATCHDOG=1"] * 3

    async def test_logs_failure_once_per_outage(
        self, short_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
        sleep = _FakeSleep(limit=5)

        with capture_logs() as logs, anyio.fail_after(TIMEOUT_SECONDS):
            with pytest.raises(_StopLoop):
                await systemd.watchdog_loop(2.0, sleep=sleep)

        events = [entry["event"] for entry in logs]
        assert events == ["watchdog_started", "watchdog_ping_failed"]
        assert len(sleep.periods) == 5

    async def test_logs_recovery_with_failure_count(
        self, short_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = str(short_dir / "late")
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        calls: list[float] = []

        async def bind_after_two_pings(seconds: float) -> None:
            calls.append(seconds)
            if len(calls) == 2:
                receiver.bind(path)

            if len(calls) == 3:
                raise _StopLoop

        with receiver, capture_logs() as logs, anyio.fail_after(TIMEOUT_SECONDS):
            with pytest.raises(_StopLoop):
                await systemd.watchdog_loop(2.0, sleep=bind_after_two_pings)

        assert logs[-1]["event"] == "watchdog_ping_recovered"
        assert logs[-1]["failed_pings"] == 2


def _activate(code: str, *sockets: socket.socket) -> subprocess.Popen[str]:
    fds = [sock.fileno() for sock in sockets]
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), code],
        pass_fds=fds,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )


class TestListenFds:
    def test_adopts_passed_sockets(self, short_dir: Path) -> None:
        path = str(short_dir / "api.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT_SECONDS)
        with listener, ours, theirs:
            child = _activate(ACTIVATED, listener, theirs)
            try:
                assert child.stdout is not None
                report = json.loads(child.stdout.readline())
                with socket.socket(socket.AF_UNIX) as client:
                    client.settimeout(TIMEOUT_SECONDS)
                    client.connect(path)
                    accepted = client.recv(100)

                paired = ours.recv(100)
            finally:
                child.kill()
                child.wait(timeout=TIMEOUT_SECONDS)

        assert report["fds"] == [3, 4]
        assert report["families"] == [socket.AF_UNIX, socket.AF_UNIX]
        assert report["types"] == [socket.SOCK_STREAM, socket.SOCK_STREAM]
        assert report["cloexec"] == [True, True]
        assert report["env_left"] == []
        assert accepted == b"accepted"
        assert paired == b"paired"

    def test_rejects_descriptor_that_is_not_a_socket(self) -> None:
        read_end, write_end = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(read_end), NOT_A_SOCKET],
                pass_fds=[read_end],
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                stdout=subprocess.PIPE,
                text=True,
            )
            output, _ = child.communicate(timeout=TIMEOUT_SECONDS)
        finally:
            os.close(read_end)
            os.close(write_end)

        assert output.startswith("socket activation failed: descriptor 3 is not")

    def test_other_pid_gets_nothing(self) -> None:
        env = {
            "LISTEN_PID": str(os.getpid() + 1),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "api",
            "PATH": "/bin",
        }

        sockets = listen_fds(env)

        assert sockets == []
        assert env == {"PATH": "/bin"}

    def test_unset_variables_give_nothing(self) -> None:
        env: dict[str, str] = {}

        assert listen_fds(env) == []

    def test_keeps_variables_when_asked(self) -> None:
        env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}

        listen_fds(env, unset_environment=False)

        assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}

    @pytest.mark.parametrize(
        ("pid", "count", "message"),
        [
            pytest.param("abc", "1", "LISTEN_PID='abc' is not a process id", id="pid"),
            pytest.param(None, "one", "LISTEN_FDS='one' is not a count", id="count"),
        ],
    )
    def test_rejects_malformed_variables(
        self, pid: str | None, count: str, message: str
    ) -> None:
        env = {"LISTEN_PID": pid or str(os.getpid()), "LISTEN_FDS": count}

        with pytest.raises(SocketActivationError, match=message):
            listen_fds(env)

    def test_zero_descriptors_give_nothing(self) -> None:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}

        assert listen_fds(env) == []
