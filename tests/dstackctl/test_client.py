"""Tests of the Unix-socket HTTP client against a fake daemon."""

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstackctl import exit_codes
from dstackctl.client import (
    ApiError,
    Client,
    DaemonGoneError,
    DaemonTimeoutError,
    DaemonUnreachableError,
    ProtocolError,
    Response,
    api_path,
    default_socket_path,
    encode_query,
)
from tests.dstackctl.fake_daemon import FakeDaemon

# The head of a chunked 200 response.
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
def client(fake_daemon: FakeDaemon) -> Client:
    return Client(fake_daemon.socket_path)


class TestRequests:
    def test_post_sends_json_body_with_content_length(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route("POST", "/v1/pools", {"name": "gpu"})

        result = client.request("POST", "/v1/pools", body={"name": "gpu"})

        assert result == {"name": "gpu"}
        [request] = fake_daemon.requests
        assert request.headers["content-type"] == "application/json"
        assert request.headers["content-length"] == str(len(request.body))
        assert request.headers["host"] == "localhost"
        assert request.headers["connection"] == "close"
        assert request.json() == {"name": "gpu"}

    def test_get_sends_query_and_no_body(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route("GET", "/v1/instances", [])

        client.request(
            "GET", "/v1/instances", query={"pool": "a b", "all": True, "x": None}
        )

        [request] = fake_daemon.requests
        assert request.query == {"pool": "a b", "all": "true"}
        assert "content-length" not in request.headers
        assert request.body == b""

    def test_post_without_body_sends_zero_content_length(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route("POST", "/v1/pools/gpu/default", {"name": "gpu"})

        client.request("POST", "/v1/pools/gpu/default")

        assert fake_daemon.requests[0].headers["content-length"] == "0"


class TestBodies:
    def test_chunked_body_is_decoded_with_extensions_and_trailers(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route(
            "GET",
            "/v1/runs",
            raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;name=value\r\n[1,\r\nA\r\n 2, 3]    \r\n0\r\nX-Trailer: 1\r\n\r\n",
        )

        assert client.request("GET", "/v1/runs") == [1, 2, 3]

    def test_body_without_length_ends_when_the_connection_closes(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route("GET", "/v1/runs", raw=b"HTTP/1.1 200 OK\r\n\r\n[4, 5]")

        assert client.request("GET", "/v1/runs") == [4, 5]

    def test_interim_100_response_is_skipped(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route(
            "GET",
            "/v1/runs",
            raw=b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
        )

        assert client.request("GET", "/v1/runs") == []

    def test_stream_yields_chunks_as_they_arrive(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        release = threading.Event()
        fake_daemon.route(
            "GET", "/v1/runs/a/logs", chunks=[b"first\n", release, b"second\n"]
        )

        with client.open("GET", "/v1/runs/a/logs", timeout=5) as response:
            chunks = response.iter_chunks()
            first = next(chunks)
            release.set()
            rest = list(chunks)

        assert first == b"first\n"
        assert rest == [b"second\n"]

    def test_iter_lines_joins_lines_split_across_chunks(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route(
            "GET", "/v1/events", chunks=[b'{"a"', b': 1}\n{"b": 2}\n\n{"c"', b": 3}"]
        )

        with client.open("GET", "/v1/events") as response:
            lines = list(response.iter_lines())

        assert lines == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "code", "exit_code"),
        [
            (400, "invalid_value", exit_codes.USAGE),
            (400, "invalid_request", exit_codes.USAGE),
            (404, "not_found", exit_codes.NOT_FOUND),
            (409, "conflict", exit_codes.FAILED),
            (500, "internal", exit_codes.FAILED),
        ],
    )
    def test_error_body_becomes_api_error_with_exit_code(
        self,
        fake_daemon: FakeDaemon,
        client: Client,
        status: int,
        code: str,
        exit_code: int,
    ) -> None:
        fake_daemon.error("GET", "/v1/runs", status, code, "bad thing:\nsecond line")

        with pytest.raises(ApiError) as caught:
            client.request("GET", "/v1/runs")

        assert caught.value.status == status
        assert caught.value.code == code
        assert caught.value.exit_code == exit_code
        assert str(caught.value) == "bad thing: second line"

    def test_error_without_json_body_uses_the_body_text(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route(
            "GET",
            "/v1/runs",
            raw=b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 8\r\n\r\nupstream",
        )

        with pytest.raises(ApiError, match=r"^upstream$"):
            client.request("GET", "/v1/runs")

    def test_error_with_empty_body_names_the_status(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        fake_daemon.route(
            "GET",
            "/v1/runs",
            raw=b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n",
        )

        with pytest.raises(ApiError, match=r"^dstackd responded 503 Unavailable$"):
            client.request("GET", "/v1/runs")

    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            (b"SMTP ready\r\n\r\n", "malformed status line"),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n[]",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n[]\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]]\r\n",
                "chunk data is longer than its size",
            ),
            (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnot", "body is not JSON"),
        ],
        ids=[
            "not-http",
            "header-without-colon",
            "negative-length",
            "conflicting-lengths",
            "hex-prefix-chunk-size",
            "overlong-chunk",
            "too-many-headers",
            "not-json",
        ],
    )
    def test_broken_response_raises_protocol_error(
        self, fake_daemon: FakeDaemon, client: Client, raw: bytes, problem: str
    ) -> None:
        fake_daemon.route("GET", "/v1/runs", raw=raw)

        with pytest.raises(ProtocolError) as caught:
            client.request("GET", "/v1/runs")

        assert problem in str(caught.value)
        assert fake_daemon.socket_path in str(caught.value)
        assert caught.value.exit_code == exit_codes.FAILED

    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            pytest.param(b"", "connection closed before the status line", id="empty"),
            pytest.param(
                b"HTTP/1.1 2",
                "connection closed while reading the status line",
                id="in-status-line",
            ),
            pytest.param(
                b"HTTP/1.1 200 OK\r\n",
                "connection closed before the end of the headers",
                id="after-status-line",
            ),
            pytest.param(
                b"HTTP/1.1 200 OK\r\nContent-",
                "connection closed while reading the end of the headers",
                id="in-header-line",
            ),
            pytest.param(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1,",
                "connection closed after 3 of 10 body bytes",
                id="in-body",
            ),
            pytest.param(
                CHUNKED + b"2\r\n[]\r\n",
                "connection closed before the chunk size",
                id="before-chunk-size",
            ),
            pytest.param(
                CHUNKED + b"2\r\n[",
                "connection closed after 1 of 2 body bytes",
                id="in-chunk",
            ),
            pytest.param(
                CHUNKED + b"2\r\n[]",
                "connection closed before the end of a chunk",
                id="before-chunk-end",
            ),
            pytest.param(
                CHUNKED + b"0\r\n",
                "connection closed before the end of the headers",
                id="in-trailers",
            ),
        ],
    )
    def test_closed_connection_raises_daemon_gone(
        self, fake_daemon: FakeDaemon, client: Client, raw: bytes, problem: str
    ) -> None:
        fake_daemon.route("GET", "/v1/runs", raw=raw)

        with pytest.raises(DaemonGoneError) as caught:
            client.request("GET", "/v1/runs")

        assert str(caught.value) == _gone_message(fake_daemon.socket_path, problem)
        assert caught.value.exit_code == exit_codes.UNREACHABLE
        assert isinstance(caught.value, DaemonUnreachableError)

    @pytest.mark.parametrize(
        "sent",
        [
            pytest.param(b"", id="before-status-line"),
            pytest.param(CHUNKED + b"2\r\n[]\r\n", id="in-chunked-body"),
            pytest.param(b"HTTP/1.1 200 OK\r\n\r\n[1,", id="in-body-until-close"),
        ],
    )
    def test_reset_connection_raises_daemon_gone(
        self, socket_dir: str, sent: bytes
    ) -> None:
        path = os.path.join(socket_dir, "reset.sock")

        with _resetting_daemon(path, sent), pytest.raises(DaemonGoneError) as caught:
            Client(path).request("GET", "/v1/runs")

        assert str(caught.value) == _gone_message(path, "Connection reset by peer")
        assert caught.value.exit_code == exit_codes.UNREACHABLE

    def test_closed_connection_while_sending_raises_daemon_gone(self) -> None:
        local, remote = socket.socketpair()
        remote.close()

        with local, pytest.raises(DaemonGoneError) as caught:
            Client("/nowhere.sock")._send(local, "GET", "/v1/runs", None)

        assert str(caught.value) == _gone_message(
            "/nowhere.sock", "connection closed while sending the request: Broken pipe"
        )

    def test_silent_daemon_raises_timeout(
        self, fake_daemon: FakeDaemon, client: Client
    ) -> None:
        release = threading.Event()
        fake_daemon.route("GET", "/v1/runs", chunks=[release, b"late"])

        try:
            with (
                pytest.raises(DaemonTimeoutError, match=r"timed out after 0\.2s"),
                client.open("GET", "/v1/runs", timeout=0.2) as response,
            ):
                response.read()
        finally:
            release.set()

    def test_missing_socket_is_unreachable_and_names_the_path(
        self, socket_dir: str
    ) -> None:
        path = os.path.join(socket_dir, "missing.sock")

        with pytest.raises(DaemonUnreachableError) as caught:
            Client(path).request("GET", "/v1/runs")

        assert caught.value.exit_code == exit_codes.UNREACHABLE
        assert str(caught.value) == (
            f"cannot reach dstackd at {path}: No such file or directory. "
            "Start it with 'dstackd serve' or set DSTACKD_SOCKET."
        )

    def test_refused_connection_is_unreachable(self, socket_dir: str) -> None:
        path = os.path.join(socket_dir, "bound.sock")
        with socket.socket(socket.AF_UNIX) as bound_only:
            bound_only.bind(path)

            with pytest.raises(DaemonUnreachableError) as caught:
                Client(path).request("GET", "/v1/runs")

        assert f"at {path}: Connection refused." in str(caught.value)


def _gone_message(socket_path: str, problem: str) -> str:
    return (
        f"lost the connection to dstackd at {socket_path} ({problem}). "
        "The daemon stopped or restarted."
    )


@contextmanager
def _resetting_daemon(path: str, sent: bytes) -> Iterator[None]:
    """Serve one connection on ``path``: send ``sent``, then close it with the
    request unread, which makes Linux reset the client's side (ECONNRESET)."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(5)
                connection.sendall(sent)
                # Wait for the request without reading it.
                connection.recv(1, socket.MSG_PEEK)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join(5)


@pytest.mark.parametrize(
    ("environ", "uid", "expected"),
    [
        ({"DSTACKD_SOCKET": "/x/d.sock", "XDG_RUNTIME_DIR": "/r"}, 0, "/x/d.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 0, "/run/dstackd/dstackd.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/dstackd.sock"),
        ({}, 1000, "/tmp/dstackd-1000/dstackd.sock"),
        (
            {"XDG_RUNTIME_DIR": "", "DSTACKD_SOCKET": ""},
            7,
            "/tmp/dstackd-7/dstackd.sock",
        ),
    ],
    ids=["env-wins", "root", "user-runtime-dir", "user-fallback", "empty-values"],
)
def test_default_socket_path_follows_the_daemon_rule(
    environ: dict[str, str], uid: int, expected: str
) -> None:
    assert default_socket_path(environ, uid) == expected


def test_api_path_percent_encodes_each_segment() -> None:
    assert api_path("runs", "a/b c", "logs") == "/v1/runs/a%2Fb%20c/logs"


def test_encode_query_skips_none_and_spells_booleans() -> None:
    query = {"after": 5, "follow": True, "all": False, "pool": None, "q": "a&b"}

    assert encode_query(query) == "after=5&follow=true&all=false&q=a%26b"


def parse_response(wire: bytes) -> Response:
    """Parse ``wire`` as a response that arrives on a connected socket pair."""
    reader, writer = socket.socketpair(socket.AF_UNIX)
    with writer:
        writer.sendall(wire)

    return Response(reader, "socketpair", "GET", timeout=5)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=10))
def test_chunked_decoding_restores_any_body(chunks: list[bytes]) -> None:
    framed = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    )

    with parse_response(wire) as response:
        body = response.read()

    assert body == b"".join(chunks)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=2000))
def test_iter_lines_splits_like_bytes_split(body: bytes) -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    with parse_response(wire) as response:
        lines = list(response.iter_lines())

    expected = body.split(b"\n")
    if expected[-1] == b"":
        expected.pop()

    assert lines == expected
