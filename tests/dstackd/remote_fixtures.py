"""Servers that remote-backend tests start on 127.0.0.1, and their fixtures.

- ``SshServer``: the asyncssh server of ``tests/ssh_test_server.py`` in its own
  process, which SIGSTOP pauses to play a host that stops answering.
- ``HangingServer``: a listening socket that never accepts, so an SSH client
  hangs at connect.
- ``MotoServer``: moto's EC2 server in its own process.
- ``FaultProxy``: an HTTP proxy in front of moto that fails or holds chosen EC2
  actions.

Nothing here contacts an address other than 127.0.0.1. ``aws_env`` sets dummy
credentials and turns the instance metadata lookup off, so botocore never
looks for real credentials.
"""

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TESTS_DIR = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 30.0

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/dstackd-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/dstackd-test-aws-credentials",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SshServer:
    """The test SSH server, with a client key and a home directory of its own."""

    def __init__(self, root: Path) -> None:
        import asyncssh

        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.key_path = root / "client_key"
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(root / "host_key"))
        client_key.write_private_key(str(self.key_path))
        client_key.write_public_key(str(root / "authorized_keys"))
        os.chmod(self.key_path, 0o600)
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(TESTS_DIR / "ssh_test_server.py"),
                str(self.root / "host_key"),
                str(self.root / "authorized_keys"),
                str(self.home),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            raise AssertionError(f"the SSH test server did not start: {line!r}")

        self.port = int(line)

    @property
    def address(self) -> str:
        return f"{os.environ.get('USER') or 'root'}@127.0.0.1:{self.port}"

    def backend_data(self) -> dict[str, str]:
        return {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": os.environ.get("USER") or "root",
            "key_path": str(self.key_path),
        }

    def pause(self) -> None:
        """Stop the server process: connects and open sessions hang."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def remote_run_dir(self, run_id: str) -> Path:
        return self.home / ".dstackd" / "runs" / run_id

    def kill_remote_runs(self) -> None:
        """Kill the process groups of runs left on the host (the tasks' pids)."""
        runs = self.home / ".dstackd" / "runs"
        if not runs.exists():
            return

        for task_pid_file in runs.glob("*/task_pid"):
            try:
                os.killpg(int(task_pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass

    def stop(self) -> None:
        self.kill_remote_runs()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


class HangingServer:
    """A TCP port on 127.0.0.1 that completes handshakes and never says a word."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])

    def backend_data(self, key_path: str) -> dict[str, str]:
        return {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": "nobody",
            "key_path": key_path,
        }

    def close(self) -> None:
        self.socket.close()


class MotoServer:
    """moto's server on a free port of 127.0.0.1, in a process of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **AWS_TEST_ENV},
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=1
                )
                connection.request("GET", "/moto-api/")
                connection.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)

        self.stop()
        raise AssertionError(
            f"moto_server did not answer within {START_TIMEOUT_SECONDS}s"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class FaultProxy:
    """Forwards HTTP requests to moto, failing or holding chosen EC2 actions.

    ``fail(action, times)`` answers the next ``times`` requests for ``action``
    with an ``UnauthorizedOperation`` error, which botocore does not retry.
    ``hold(action)`` forwards the next request for ``action`` to moto and then
    holds the response until ``release()``, and ``held`` is set once moto
    responded. ``calls`` and ``params`` record every request.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.failures: dict[str, int] = {}
        self.calls: list[str] = []
        self.params: list[dict[str, list[str]]] = []
        self.hold_action: str | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                proxy.handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, action: str, times: int) -> None:
        with self._lock:
            self.failures[action] = times

    def hold(self, action: str) -> None:
        self.hold_action = action
        self.held.clear()
        self._released.clear()

    def release(self) -> None:
        self.hold_action = None
        self._released.set()

    def count(self, action: str) -> int:
        with self._lock:
            return self.calls.count(action)

    def requests_of(self, action: str) -> list[dict[str, list[str]]]:
        """Return the form parameters of every request for ``action`` so far."""
        with self._lock:
            return [p for p in self.params if p.get("Action") == [action]]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length", "0")))
        params = urllib.parse.parse_qs(body.decode())
        action = params.get("Action", [""])[0]
        with self._lock:
            self.calls.append(action)
            self.params.append(params)
            failing = self.failures.get(action, 0) > 0
            if failing:
                self.failures[action] -= 1

        if failing:
            self._send(request, 403, _ec2_error("UnauthorizedOperation", action))
            return

        status, headers, payload = self._forward(request, body)
        if action == self.hold_action:
            self.held.set()
            self._released.wait(timeout=120)

        self._send(request, status, payload, headers)

    def _forward(
        self, request: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.upstream_port, timeout=60
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        connection.request("POST", request.path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        kept = {
            k: v
            for k, v in response.getheaders()
            if k.lower() not in ("content-length", "transfer-encoding", "connection")
        }

        return response.status, kept, payload

    def _send(
        self,
        request: BaseHTTPRequestHandler,
        status: int,
        payload: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            request.send_response(status)
            for name, value in (headers or {"Content-Type": "text/xml"}).items():
                request.send_header(name, value)

            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
        except OSError:
            pass

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _ec2_error(code: str, action: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
        f"<Code>{code}</Code><Message>injected failure of {action}</Message>"
        "</Error></Errors><RequestID>test</RequestID></Response>"
    ).encode()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials; no metadata lookups, no shared config files."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)

    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def ssh_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dsh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ssh_server(ssh_root: Path) -> Iterator[SshServer]:
    """An SSH server of the test's own, which the test may pause."""
    server = SshServer(ssh_root / "server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.close()
