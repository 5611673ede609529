"""HTTP API on the daemon's Unix socket (aiohttp): routing, callers, errors.

Every request's caller is read from the socket with SO_PEERCRED and becomes
the actor of the events the request causes. Each request is logged once, with
its outcome and duration.
"""

import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec
import structlog
from aiohttp import web

from dstackd import api, views
from dstackd.attach import attach_target
from dstackd.audit_routes import AuditRoutes
from dstackd.commands import Commands
from dstackd.core import Core, wall_clock_us
from dstackd.errors import CommandError, InvalidRequestError
from events.errors import InvalidValueError
from events.model import Actor
from events.projection import ACTIVE_RUN_STATUSES

log = structlog.get_logger("dstackd.server")

RequestT = TypeVar("RequestT")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_encoder = msgspec.json.Encoder()
_PEERCRED = struct.Struct("3i")
# How often a followed log file is re-read while its run is still active.
LOG_FOLLOW_INTERVAL_SECONDS = 0.05
MAX_WAIT_SECONDS = 3600.0
# Largest request body: a run file of up to 1 MiB (dstackctl's limit) plus
# profiles and JSON escaping fit well within it.
MAX_BODY_BYTES = 4 * 1024 * 1024


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json"
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response(api.ErrorBody(code, message), status)  # type: ignore[arg-type]


def caller_of(request: web.Request) -> Actor:
    """Identify the process on the other end of the socket."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return Actor(None, "unknown")

    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)

    return Actor(uid, name)


async def decode(request: web.Request, kind: type[RequestT]) -> RequestT:
    body = await request.read()
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as error:
        raise InvalidRequestError(f"invalid {kind.__name__} request: {error}") from None
    except msgspec.DecodeError as error:
        raise InvalidRequestError(f"malformed JSON body: {error}") from None


def flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequestError(f"invalid query parameter {name}={value!r}: expected true or false")

    return value in ("true", "1", "yes")

MAX_QUERY_INT = 2**63 - 1


def int_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default

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


@web.middleware
async def handle_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    actor = caller_of(request)
    request["actor"] = actor
    outcome = "ok"
    try:
        response = await handler(request)
    except (CommandError, InvalidValueError) as error:
        status = getattr(error, "status", 400)
        code = getattr(error, "code", "invalid_value")
        outcome = code
        response = error_response(status, code, str(error))
    except web.HTTPException as error:
        outcome = "http_error"
        response = error_response(
            error.status, "not_found" if error.status == 404 else "invalid_request", error.reason
        )
    except Exception as error:
        log.exception("request_failed", method=request.method, path=request.path)
        outcome = "internal"
        response = error_response(500, "internal", f"internal error: {error}")

    log.info(
        "request_handled",
        method=request.method,
        path=request.path,
        status=response.status,
        outcome=outcome,
        uid=actor.uid,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )
    return response


class Api:
    """Route handlers; one method per route."""

    def __init__(self, core: Core, commands: Commands) -> None:
        self.core = core
        self.commands = commands

    def app(self) -> web.Application:
        app = web.Application(middlewares=[handle_errors], client_max_size=MAX_BODY_BYTES)
        app.add_routes(
            [
                web.get("/v1/pools", self.list_pools),
                web.post("/v1/pools", self.create_pool),
                web.delete("/v1/pools/{name}", self.delete_pool),
                web.post("/v1/pools/{name}/default", self.set_default_pool),
                web.post("/v1/offers", self.list_offers),
                web.get("/v1/instances", self.list_instances),
                web.post("/v1/instances", self.add_instance),
                web.post("/v1/instances/ssh", self.add_ssh_hosts),
                web.delete("/v1/instances/{name}", self.remove_instance),
                web.get("/v1/runs", self.list_runs),
                web.post("/v1/runs", self.submit_run),
                web.get("/v1/runs/{name}", self.get_run),
                web.get("/v1/runs/{name}/wait", self.wait_run),
                web.post("/v1/runs/{name}/stop", self.stop_run),
                web.post("/v1/runs/{name}/attach", self.attach_run),
                web.get("/v1/runs/{name}/logs", self.run_logs),
            ]
        )
        app.add_routes(AuditRoutes(self.core, self.commands).routes())
        return app

    # Pools

    def _pool_view(self, name: str) -> api.PoolView:
        state = self.core.state
        return views.pool_view(state, name, state.pools.get(name))

    async def list_pools(self, request: web.Request) -> web.Response:
        names = list(self.core.state.pools)
        default = self.core.state.default_pool_name()
        if default not in names:
            names.insert(0, default)

        return json_response([self._pool_view(name) for name in names])

    async def create_pool(self, request: web.Request) -> web.Response:
        body = await decode(request, api.CreatePool)
        name = await self.commands.create_pool(body, request["actor"])
        return json_response(self._pool_view(name), 201)

    async def delete_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        view = self._pool_view(self.commands.resolve_pool(name))
        await self.commands.delete_pool(name, flag(request, "force"), request["actor"])
        return json_response(view)

    async def set_default_pool(self, request: web.Request) -> web.Response:
        name = await self.commands.set_default_pool(
            request.match_info["name"], request["actor"]
        )
        return json_response(self._pool_view(name))

    # Instances

    async def list_offers(self, request: web.Request) -> web.Response:
        body = await decode(request, api.ListOffers)
        offers = await self.commands.list_offers(body)
        return json_response([views.offer_view(offer) for offer in offers])

    async def list_instances(self, request: web.Request) -> web.Response:
        state = self.core.state
        pool = request.query.get("pool")
        if pool is not None:
            self.commands.resolve_pool(pool)

        show_all = flag(request, "all")
        now = wall_clock_us()
        # Without --all only live instances, which need no archive read.
        candidates = state.instances.values() if show_all else state.live_instances()
        instances = [
            views.instance_view(state, instance, now)
            for instance in candidates
            if (pool is None or instance.pool == pool)
            and (show_all or instance.status not in ("terminated", "failed"))
        ]
        return json_response(instances)

    async def add_instance(self, request: web.Request) -> web.Response:
        body = await decode(request, api.AddInstance)
        instance_id = await self.commands.add_instance(body, request["actor"])
        instance = self.core.state.instances[instance_id]
        view = views.instance_view(self.core.state, instance, wall_clock_us())
        status = 201 if instance.status != "failed" else 502
        if instance.status == "failed":
            return error_response(
                502, "internal", f"provisioning instance {instance.name} failed: {instance.reason}"
            )

        return json_response(view, status)

    async def add_ssh_hosts(self, request: web.Request) -> web.Response:
        body = await decode(request, api.AddSshHosts)
        instance_ids = await self.commands.add_ssh_hosts(body, request["actor"])
        now = wall_clock_us()
        state = self.core.state
        instance_views = [
            views.instance_view(state, state.instances[instance_id], now)
            for instance_id in instance_ids
        ]
        return json_response(instance_views, 201)

    async def remove_instance(self, request: web.Request) -> web.Response:
        instance_id = await self.commands.remove_instance(
            request.match_info["name"], flag(request, "force"), request["actor"]
        )
        instance = self.core.state.instances[instance_id]
        return json_response(views.instance_view(self.core.state, instance, wall_clock_us()))

    # Runs

    def _run_view(self, run_id: str) -> api.RunView:
        state = self.core.state
        return views.run_view(state, state.runs[run_id], self.commands.run_files)

    async def list_runs(self, request: web.Request) -> web.Response:
        show_all = flag(request, "all")
        state = self.core.state
        # Without --all only active runs, which need no archive read.
        candidates = state.runs.values() if show_all else state.active_runs()
        runs = [
            self._run_view(run.id)
            for run in candidates
            if show_all or run.status in ACTIVE_RUN_STATUSES
        ]
        return json_response(runs)

    async def submit_run(self, request: web.Request) -> web.Response:
        body = await decode(request, api.SubmitRun)
        run_id = await self.commands.submit_run(body, request["actor"])
        return json_response(self._run_view(run_id), 201)

    async def get_run(self, request: web.Request) -> web.Response:
        run = self.commands.find_run(request.match_info["name"])
        return json_response(self._run_view(run.id))

    async def wait_run(self, request: web.Request) -> web.Response:
        run = self.commands.find_run(request.match_info["name"])
        timeout = min(float(int_query(request, "timeout", 60)), MAX_WAIT_SECONDS)
        with anyio.move_on_after(timeout):
            while self.core.state.runs[run.id].status in ACTIVE_RUN_STATUSES:
                await self.core.wait_changed()

        return json_response(self._run_view(run.id))

    async def attach_run(self, request: web.Request) -> web.Response:
        run = self.commands.find_run(request.match_info["name"])
        run_dir = self.commands.run_files.run_dir(run.id)
        target = attach_target(self.core.state, run, run_dir, request["actor"])
        return json_response(target)

    async def stop_run(self, request: web.Request) -> web.Response:
        body = await decode(request, api.StopRun)
        run_id = await self.commands.stop_run(
            request.match_info["name"], body.abort, request["actor"]
        )
        return json_response(self._run_view(run_id))

    async def run_logs(self, request: web.Request) -> web.StreamResponse:
        """Send a run's output; with follow, keep sending until the run ends."""
        run = self.commands.find_run(request.match_info["name"])
        self.commands.check_run_access(run, request["actor"])
        follow = flag(request, "follow")
        offset = int_query(request, "offset", 0)
        path = self.commands.run_files.log_path(run.id)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            await response.write_eof()
            return response

        with file:
            file.seek(offset)
            while True:
                chunk = file.read(256 * 1024)
                if chunk:
                    await response.write(chunk)
                    continue

                if not follow:
                    break

                if self.core.state.runs[run.id].status not in ACTIVE_RUN_STATUSES:
                    rest = file.read()
                    if rest:
                        await response.write(rest)
                    break

                # NOTE: the supervisor writes the file directly, so new output is
                # found by re-reading at a short interval or when the run ends.
                with anyio.move_on_after(LOG_FOLLOW_INTERVAL_SECONDS):
                    await self.core.wait_changed()

        await response.write_eof()
        return response
