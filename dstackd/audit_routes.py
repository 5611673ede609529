"""Audit routes of the daemon's API: events, verify, replay, export, cost, explain.

Verify, replay, cost and explain run the same code as ``dstackctl --log FILE``
(``events.audit``), in a worker thread, on a read-only SQLite connection to the
daemon's own log, so requests and appends go on meanwhile. The event listing
and the export read through the open ``EventLog`` and encode lines with the
same functions as the offline commands.

Routes (all ``GET``)::

    /v1/events?after=N&follow=true&since=US&until=US&stream=P,..&type=T,..
                                      -> EventLine per line (JSON lines)
    /v1/events/verify?expect_head=POSITION:HASH -> VerifyReport
    /v1/events/replay?position=N | time=US &all=true -> ReplayView
    /v1/events/export                 -> export lines (JSON lines)
    /v1/cost?since=US&until=US&by=run|pool|user|instance&idle_duration=D
                                      -> CostReport
    /v1/runs/{name}/explain           -> Explanation

Times are UTC microseconds since the Unix epoch; dstackctl parses what the
user typed. A stream that fails after its first line ends with one
``{"error": {"position": N, "message": "..."}}`` line.
"""

import functools
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import anyio.to_thread
import msgspec
import structlog
from aiohttp import web

from dstackd.commands import Commands
from dstackd.core import Core, wall_clock_us
from dstackd.errors import CommandError, InvalidRequestError
from events.audit import service
from events.audit.cost import check_group
from events.audit.explain import explain_run, placement_instances
from events.audit.export import ExportEncoder
from events.audit.records import build_filter, encode_event_line, open_live_reader
from events.audit.replay import ReplayPoint, replay_view
from events.audit.verify import ExpectedHead, parse_expected_head, verify_log
from events.errors import DstackdError, LogCorruptedError
from events.grammar import parse_duration
from events.log_reader import LogReader

log = structlog.get_logger("dstackd.audit_routes")

ResultT = TypeVar("ResultT")

_encoder = msgspec.json.Encoder()


class AuditFailedError(CommandError):
    """The log could not be read to the end for an audit."""

    status = 500
    code = "internal"


class StreamError(msgspec.Struct, frozen=True):
    position: int | None
    message: str


class StreamErrorLine(msgspec.Struct, frozen=True):
    error: StreamError


class AuditRoutes:
    """Handlers of the audit routes; one method per route."""

    def __init__(self, core: Core, commands: Commands) -> None:
        self.core = core
        self.commands = commands

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/events", self.list_events),
            web.get("/v1/events/verify", self.verify),
            web.get("/v1/events/replay", self.replay),
            web.get("/v1/events/export", self.export),
            web.get("/v1/cost", self.cost),
            web.get("/v1/runs/{name}/explain", self.explain),
        ]

    async def _in_thread(self, operation: Callable[[LogReader], ResultT]) -> ResultT:
        """Run ``operation`` on a read-only reader of the log, in a worker thread."""
        return await anyio.to_thread.run_sync(
            functools.partial(_with_reader, self.core.log.path, operation)
        )

    async def list_events(self, request: web.Request) -> web.StreamResponse:
        after = _int_query(request, "after", 0)
        follow = _flag(request, "follow")
        event_filter = build_filter(
            since=_optional_int_query(request, "since"),
            until=_optional_int_query(request, "until"),
            streams=_list_query(request, "stream"),
            types=_list_query(request, "type"),
        )
        if follow:
            source = self.core.log.follow_raw(after)
        else:
            source = self.core.log.read_raw(after, verify=True)

        async def lines() -> AsyncIterator[bytes]:
            async for record, _, record_hash in source:
                if event_filter.is_past(record):
                    return

                if event_filter.matches(record):
                    yield encode_event_line(record, record_hash)

        return await _stream(request, lines(), flush_each=follow)

    async def verify(self, request: web.Request) -> web.Response:
        """Verify the log file, expecting the head this daemon committed last."""
        expected = [ExpectedHead(self.core.log.head_position, self.core.log.head_hash)]
        text = request.query.get("expect_head")
        if text is not None:
            expected.append(parse_expected_head(text))

        if expected[0].position == 0:
            expected.pop(0)

        report = await self._in_thread(lambda reader: verify_log(reader, expected))

        return _json_response(report)

    async def replay(self, request: web.Request) -> web.Response:
        position = _optional_int_query(request, "position")
        time = _optional_int_query(request, "time")
        if (position is None) == (time is None):
            raise InvalidRequestError(
                "give exactly one of the query parameters position and time"
            )

        point = ReplayPoint(position=position, time=time)
        show_all = _flag(request, "all")
        view = await self._in_thread(
            lambda reader: replay_view(reader, point, show_all=show_all)
        )

        return _json_response(view)

    async def export(self, request: web.Request) -> web.StreamResponse:
        encoder = ExportEncoder()

        async def lines() -> AsyncIterator[bytes]:
            async for record, body, record_hash in self.core.log.read_raw(verify=True):
                yield encoder.record_line(record, body, record_hash)

            yield encoder.end_line()

        return await _stream(request, lines(), flush_each=False)

    async def cost(self, request: web.Request) -> web.Response:
        group = check_group(request.query.get("by", "run"))
        idle_text = request.query.get("idle_duration")
        idle_duration = None
        if idle_text is not None:
            idle_duration = parse_duration(idle_text, "idle duration")

        since = _optional_int_query(request, "since")
        until = _optional_int_query(request, "until")
        now = wall_clock_us()
        report = await self._in_thread(
            lambda reader: service.cost_report(
                reader,
                since=since,
                until=until,
                now=now,
                by=group,
                idle_duration=idle_duration,
            )
        )

        return _json_response(report)

    async def explain(self, request: web.Request) -> web.Response:
        run = self.commands.find_run(request.match_info["name"])
        instances = placement_instances(self.core.state, run)
        # A copy, because the event loop keeps changing the run in place.
        run = msgspec.structs.replace(run)
        explanation = await self._in_thread(
            lambda reader: explain_run(reader, run, instances)
        )

        return _json_response(explanation)


def _with_reader(path: str, operation: Callable[[LogReader], ResultT]) -> ResultT:
    try:
        with open_live_reader(path) as reader:
            return operation(reader)
    except LogCorruptedError as error:
        raise AuditFailedError(str(error)) from error


async def _stream(
    request: web.Request, lines: AsyncIterator[bytes], *, flush_each: bool
) -> web.StreamResponse:
    """Send ``lines`` as JSON lines, in batches unless ``flush_each``.

    A failure after the response started is sent as a last error line, since
    the status is already out.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    batch: list[bytes] = []
    try:
        async for line in lines:
            batch.append(line)
            if flush_each or len(batch) >= service.LINES_PER_WRITE:
                await response.write(b"".join(batch))
                batch.clear()
    except DstackdError as error:
        log.error("stream_failed", path=request.path, error=str(error))
        position = error.position if isinstance(error, LogCorruptedError) else None
        batch.append(
            _encoder.encode(StreamErrorLine(StreamError(position, str(error))))
        )
        batch.append(b"\n")

    if batch:
        await response.write(b"".join(batch))

    await response.write_eof()

    return response


def _json_response(body: object) -> web.Response:
    return web.Response(body=_encoder.encode(body), content_type="application/json")


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequestError(
            f"invalid query parameter {name}={value!r}: expected true or false"
        )

    return value in ("true", "1", "yes")

MAX_QUERY_INT = 2**63 - 1


def _optional_int_query(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None

    try:
        value = int(text)
    except ValueError:
        value = -1

    # SQLite integers and file offsets are signed 64-bit, and none of these
    # parameters (positions, offsets, times, seconds) is negative.
    if not 0 <= value <= MAX_QUERY_INT:
        raise InvalidRequestError(
            f"invalid query parameter {name}={text!r}: expected an integer "
            f"from 0 to {MAX_QUERY_INT}"
        ) from None

    return value


def _int_query(request: web.Request, name: str, default: int) -> int:
    value = _optional_int_query(request, name)

    return default if value is None else value


def _list_query(request: web.Request, name: str) -> list[str]:
    """Return a comma-separated query parameter as a list (empty when absent)."""
    return [item for item in request.query.get(name, "").split(",") if item]
