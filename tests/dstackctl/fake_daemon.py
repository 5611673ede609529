"""A stand-in for dstackd in tests: an HTTP/1.1 server on a Unix socket in a thread.

It records every request and sends the canned response registered for its
method and path. Responses can be JSON with a Content-Length, chunked pieces
sent one by one, or raw bytes, so the client's parsing of each framing and of
broken responses can be tested.
"""

import json
import socketserver
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# Bound on every wait inside the server thread, in seconds.
WAIT_TIMEOUT_S = 5.0


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class CannedResponse:
    """What the server sends for one route.

    ``chunks`` items are sent as separate HTTP chunks; a ``threading.Event``
    among them makes the server wait for it before sending the next item.
    ``raw`` bytes are sent verbatim, followed by closing the connection.
    """

    status: int = 200
    json_body: Any = None
    chunks: list[bytes | threading.Event] | None = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeDaemon:
    """Serves canned responses on ``socket_path`` and records the requests."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.requests: list[RecordedRequest] = []
        self._routes: dict[tuple[str, str], list[CannedResponse]] = {}
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingUnixStreamServer(
            socket_path, self._handler_class()
        )
        self._server.daemon_threads = True
        # A short poll interval makes ``stop`` return quickly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT_TIMEOUT_S)

    def route(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        status: int = 200,
        chunks: list[bytes | threading.Event] | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue a response for ``method path``; the last one queued repeats."""
        response = CannedResponse(status, json_body, chunks, raw, headers or {})
        with self._lock:
            self._routes.setdefault((method, path), []).append(response)

    def error(
        self, method: str, path: str, status: int, code: str, message: str
    ) -> None:
        """Queue an ``ErrorBody`` response, as the daemon sends for a failed request."""
        self.route(method, path, {"code": code, "message": message}, status=status)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def _next_response(self, method: str, path: str) -> CannedResponse:
        with self._lock:
            queue = self._routes.get((method, path))
            if not queue:
                body = {"code": "not_found", "message": f"no route {method} {path}"}
                return CannedResponse(404, body)

            return queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler_class(self) -> type[socketserver.StreamRequestHandler]:
        daemon = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = _read_request(self.rfile)
                if request is None:
                    return

                daemon.requests.append(request)
                response = daemon._next_response(request.method, request.path)
                _write_response(self.wfile, response)

        return Handler


def _read_request(rfile: Any) -> RecordedRequest | None:
    request_line = rfile.readline().decode("latin-1").rstrip("\r\n")
    if not request_line:
        return None

    method, target, version = request_line.split(" ")
    assert version == "HTTP/1.1", request_line
    headers = {}
    while (line := rfile.readline().decode("latin-1").rstrip("\r\n")) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()

    body = rfile.read(int(headers.get("content-length", "0")))
    url = urlsplit(target)
    query = dict(parse_qsl(url.query, keep_blank_values=True))

    return RecordedRequest(method, url.path, query, headers, body)


def _write_response(wfile: Any, response: CannedResponse) -> None:
    if response.raw is not None:
        wfile.write(response.raw)
        return

    head = [f"HTTP/1.1 {response.status} Canned", "Connection: close"]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    if response.chunks is not None:
        head.append("Transfer-Encoding: chunked")
        wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for item in response.chunks:
            if isinstance(item, threading.Event):
                assert item.wait(WAIT_TIMEOUT_S), "the test never released the stream"
                continue

            wfile.write(f"{len(item):x}\r\n".encode() + item + b"\r\n")

        wfile.write(b"0\r\n\r\n")
        return

    body = json.dumps(response.json_body).encode()
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
