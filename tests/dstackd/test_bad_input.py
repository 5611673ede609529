"""Bad input through the real CLI and the raw socket: a clear error, the right
exit code, nothing appended to the log, and a daemon that keeps serving."""

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, DaemonProcess

USAGE = 2
FAILED = 1
UNREACHABLE = 3
NOT_FOUND = 4

CLI_CASES = [
    pytest.param(
        ["pool", "add", "-y", "--idle-duration", "5x"], USAGE, "5x", id="bad-duration"
    ),
    pytest.param(
        ["pool", "add", "-y", "--idle-duration", "-5m"], USAGE, "-5m", id="negative-duration"
    ),
    pytest.param(["pool", "add", "-y", "--cpu", "4..2"], USAGE, "4..2", id="reversed-range"),
    pytest.param(["pool", "add", "-y", "--cpu", "1...3"], USAGE, "1...3", id="three-dots"),
    pytest.param(["pool", "add", "-y", "--memory", "8XB"], USAGE, "8XB", id="bad-size"),
    pytest.param(["pool", "add", "-y", "--gpu", "A100::2"], USAGE, "A100::2", id="empty-gpu-token"),
    pytest.param(["pool", "add", "-y", "--max-price", "cheap"], USAGE, "cheap", id="bad-price"),
    pytest.param(["pool", "add", "-y", "--pool", "nosuch"], NOT_FOUND, "nosuch", id="unknown-pool-add"),
    pytest.param(["pool", "create", "Bad Name"], USAGE, "Bad Name", id="bad-pool-name"),
    pytest.param(["pool", "delete", "nosuch"], NOT_FOUND, "nosuch", id="delete-unknown-pool"),
    pytest.param(["pool", "set-default", "nosuch"], NOT_FOUND, "nosuch", id="default-unknown-pool"),
    pytest.param(["pool", "remove", "nosuch"], NOT_FOUND, "nosuch", id="remove-unknown-instance"),
    pytest.param(["run", "--pool", "nosuch", "--", "true"], NOT_FOUND, "nosuch", id="run-unknown-pool"),
    pytest.param(
        ["run", "--instance", "nosuch", "--", "true"], NOT_FOUND, "nosuch", id="run-unknown-instance"
    ),
    pytest.param(["run", "--idle-duration", "1H", "--", "true"], USAGE, "1H", id="run-upper-unit"),
    pytest.param(["run", "--gpu", "A100:2:4", "--", "true"], USAGE, "A100:2:4", id="run-two-counts"),
    pytest.param(["run", "-e", "1X=2", "--", "true"], USAGE, "1X", id="run-bad-env-name"),
    pytest.param(["run", "--reuse", "--", "true"], FAILED, "--reuse", id="reuse-without-instance"),
    pytest.param(
        ["run", "--name", "r-0123456789ab", "--", "true"], USAGE, "r-0123456789ab", id="id-shaped-run"
    ),
    pytest.param(
        ["pool", "add", "-y", "--cpu", "1", "--memory", "1GB", "--name", "i-0123456789ab"],
        USAGE,
        "i-0123456789ab",
        id="id-shaped-instance",
    ),
    pytest.param(["run", "--profile", "nosuch", "--", "true"], NOT_FOUND, "nosuch", id="unknown-profile"),
    pytest.param(["logs", "nosuch"], NOT_FOUND, "nosuch", id="logs-unknown-run"),
    pytest.param(["stop", "nosuch"], NOT_FOUND, "nosuch", id="stop-unknown-run"),
]


def head_position(daemon: DaemonProcess) -> int:
    records = daemon.events()
    return records[-1]["position"] if records else 0


@pytest.fixture
def seeded(daemon: DaemonProcess) -> DaemonProcess:
    """A daemon with one pool and one idle instance, so the log is not empty."""
    daemon.ctl_ok("pool", "create", "main")
    daemon.ctl_ok("pool", "add", "-y", "--cpu", "1", "--memory", "1GB")
    return daemon


@pytest.mark.parametrize("args,exit_code,value", CLI_CASES)
def test_cli_bad_input_changes_nothing(
    seeded: DaemonProcess, args: list[str], exit_code: int, value: str
) -> None:
    before = head_position(seeded)

    result = seeded.ctl(*args)

    assert result.returncode == exit_code, result.stderr
    assert value in result.stderr
    assert "error: " in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert head_position(seeded) == before
    assert seeded.ctl("pool", "list").returncode == 0


def raw_request(path: Path, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes on the socket and return the status code and body."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)

    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    return status, response.partition(b"\r\n\r\n")[2]


def http(method: str, path: str, body: bytes) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: dstackd\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


SOCKET_CASES = [
    pytest.param(http("POST", "/v1/runs", b"{not json"), 400, b"malformed JSON", id="bad-json"),
    pytest.param(
        http("POST", "/v1/runs", b'{"argv": ["true"], "colour": "red"}'),
        400,
        b"colour",
        id="unknown-field",
    ),
    pytest.param(http("POST", "/v1/runs", b'{"argv": "true"}'), 400, b"argv", id="wrong-type"),
    pytest.param(http("POST", "/v1/runs", b"{}"), 400, b"argv", id="no-command"),
    pytest.param(http("POST", "/v1/pools", b'{"name": 5}'), 400, b"name", id="pool-name-type"),
    pytest.param(http("GET", "/v1/nothing", b""), 404, b"", id="unknown-route"),
    pytest.param(
        http("GET", "/v1/runs?all=maybe", b""), 400, b"maybe", id="bad-query-flag"
    ),
    pytest.param(b"HELLO THERE\r\n\r\n", 400, b"", id="not-http"),
    pytest.param(http("GET", "/v1/events?after=-5", b""), 400, b"-5", id="negative-position"),
    pytest.param(
        http("POST", "/v1/runs", b'{"argv": ["true"], "working_dir": "rel/dir"}'),
        400,
        b"rel/dir",
        id="relative-working-dir",
    ),
    pytest.param(
        http("POST", "/v1/runs", b'{"argv": ["a\\u0000b"]}'), 400, b"NUL", id="nul-in-argv"
    ),
    pytest.param(
        http("POST", "/v1/runs", b'{"argv": ["true"], "env": {"A": "x\\u0000y"}}'),
        400,
        b"NUL",
        id="nul-in-env",
    ),
    pytest.param(
        http("POST", "/v1/runs", b'{"argv": ["' + b"x" * 200_000 + b'"]}'),
        400,
        b"allowed",
        id="huge-argv",
    ),
    pytest.param(
        http("GET", "/v1/events?after=99999999999999999999999", b""),
        400,
        b"99999999999999999999999",
        id="position-past-int64",
    ),
    pytest.param(
        http("GET", "/v1/events/replay?position=-1", b""), 400, b"-1", id="negative-replay"
    ),
]


@pytest.mark.parametrize("data,status,needle", SOCKET_CASES)
def test_socket_bad_request_changes_nothing(
    seeded: DaemonProcess, data: bytes, status: int, needle: bytes
) -> None:
    before = head_position(seeded)

    code, body = raw_request(seeded.socket, data)

    assert code == status
    assert needle in body
    if status != 404 and body.startswith(b"{"):
        assert json.loads(body)["code"] in ("invalid_request", "invalid_value")
    assert head_position(seeded) == before
    assert seeded.ctl("pool", "list").returncode == 0


def test_unreachable_daemon_names_socket(short_tmp: Path) -> None:
    missing = short_tmp / "absent.sock"

    result = subprocess.run(
        [str(BIN / "dstackctl"), "--socket", str(missing), "pool", "ps"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == UNREACHABLE
    assert str(missing) in result.stderr
    assert "dstackd serve" in result.stderr


@pytest.mark.parametrize(
    "config,needle",
    [
        pytest.param("[daemon]\nsnapshot_evry = 5\n", "snapshot_evry", id="unknown-key"),
        pytest.param("[local]\ncpus = 'many'\n", "cpus", id="wrong-type"),
        pytest.param("[local]\nmemory = '8XB'\n", "8XB", id="bad-size"),
        pytest.param("[nosuch]\n", "nosuch", id="unknown-table"),
    ],
)
def test_bad_config_refuses_to_start(short_tmp: Path, config: str, needle: str) -> None:
    daemon = DaemonProcess(short_tmp, config=config)

    result = subprocess.run(
        [str(BIN / "dstackd"), "serve", "--data-dir", str(daemon.data_dir),
         "--socket", str(daemon.socket), "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not daemon.socket.exists()


def test_second_daemon_on_same_socket_refuses(daemon: DaemonProcess) -> None:
    result = subprocess.run(
        [str(BIN / "dstackd"), "serve", "--data-dir", str(daemon.data_dir),
         "--socket", str(daemon.socket), "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert "holds the lock" in result.stderr
    assert daemon.ctl("pool", "list").returncode == 0


@pytest.mark.parametrize("offset", ["-1", "99999999999999999999999", "ten"])
def test_log_offset_rejected_before_streaming(seeded: DaemonProcess, offset: str) -> None:
    seeded.ctl_ok("run", "--cpu", "1", "--memory", "1GB", "--name", "done", "--", "true")

    code, body = raw_request(
        seeded.socket, http("GET", f"/v1/runs/done/logs?offset={offset}", b"")
    )

    assert code == 400
    assert offset.encode() in body
    assert b"HTTP/1.1 500" not in body
