"""Wire schema of the daemon's HTTP API on its Unix socket.

Requests and responses are JSON. The daemon decodes request bodies into these
Structs, rejecting unknown fields, and encodes responses from them. dstackctl
does not import this module (it must start fast), so it builds plain JSON
objects with the same field names.

Routes (all under ``/v1``)::

    GET    /pools                         -> list[PoolView]
    POST   /pools            CreatePool   -> PoolView
    DELETE /pools/{name}?force=true       -> PoolView
    POST   /pools/{name}/default          -> PoolView
    POST   /offers           ListOffers   -> list[OfferView]
    GET    /instances?pool=P&all=true     -> list[InstanceView]
    POST   /instances        AddInstance  -> InstanceView
    POST   /instances/ssh    AddSshHosts  -> list[InstanceView]
    DELETE /instances/{name}?force=true   -> InstanceView
    GET    /runs?all=true                 -> list[RunView]
    POST   /runs             SubmitRun    -> RunView
    GET    /runs/{name}                   -> RunView
    GET    /runs/{name}/wait?timeout=S    -> RunView (when the run ended, or at timeout)
    POST   /runs/{name}/stop StopRun      -> RunView
    POST   /runs/{name}/attach            -> AttachTarget
    GET    /runs/{name}/logs?follow=true&offset=N -> the log bytes, streamed
    GET    /events?after=N&follow=true    -> EventView per line (JSON lines)

Runs and instances are named by name or id. Errors come with a 4xx or 5xx
status and an ``ErrorBody``.
"""

from typing import Literal

import msgspec

from events.model import Offer

# Exit codes of dstackctl, one per kind of failure.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4

ErrorCode = Literal[
    "invalid_request", "invalid_value", "not_found", "conflict", "forbidden", "internal"
]


class ErrorBody(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str


class _Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ResourceArgs(_Request):
    """Resource options in their text forms, parsed by ``events.grammar``."""

    cpu: str | None = None
    memory: str | None = None
    disk: str | None = None
    gpu: str | None = None
    spot_policy: str | None = None
    max_price: str | None = None
    backends: list[str] | None = None


class CreatePool(_Request):
    name: str


class AddSshHosts(_Request):
    """Add hosts reached over SSH, each as ``USER@HOST[:PORT]``.

    ``identity_file`` is the path of the private key on the daemon's machine,
    used for every host; without it the daemon user's default keys are tried.
    ``name`` applies only when one host is added.
    """

    hosts: list[str]
    identity_file: str | None = None
    pool: str | None = None
    idle_duration: str | None = None
    name: str | None = None


class ListOffers(_Request):
    pool: str | None = None
    resources: ResourceArgs = ResourceArgs()
    max_offers: int | None = None


class AddInstance(_Request):
    """Add an instance to a pool from an offer.

    ``offer`` is the offer the user confirmed; the daemon checks that it still
    fits. Without it, the cheapest fitting offer is taken.
    """

    pool: str | None = None
    resources: ResourceArgs = ResourceArgs()
    idle_duration: str | None = None
    name: str | None = None
    offer: Offer | None = None


class ConfigFile(_Request):
    """A YAML file read by the client: its absolute path and its text."""

    path: str
    text: str


class ProbeArgs(_Request):
    path: str | None = None
    interval: str | None = None
    timeout: str | None = None


class RetryArgs(_Request):
    """``on_events`` names retry events; ``duration`` is a duration text."""

    on_events: list[str] | None = None
    duration: str | None = None


class SubmitRun(_Request):
    """Submit a run. Exactly one of ``argv`` and ``commands`` is non-empty,
    except for a dev environment, which has neither.

    ``config`` is a run configuration file and ``profiles`` are profile files
    (the first one wins on a name found in several). Fields given here override
    the file, the file overrides the profile, and ``profile`` names the profile
    to use instead of the one marked ``default``.
    """

    argv: list[str] = []
    commands: list[str] = []
    type: str = "task"
    name: str | None = None
    pool: str | None = None
    resources: ResourceArgs = ResourceArgs()
    env: dict[str, str] = {}
    working_dir: str | None = None
    idle_duration: str | None = None
    max_duration: str | None = None
    reuse: bool = False
    instance: str | None = None
    config: ConfigFile | None = None
    profiles: list[ConfigFile] = []
    profile: str | None = None
    creation_policy: str | None = None
    ports: list[int] = []
    port: int | None = None
    probe: ProbeArgs | None = None
    max_restarts: int | None = None
    retry: RetryArgs | None = None
    init: list[str] = []
    inactivity_duration: str | None = None


class StopRun(_Request):
    abort: bool = False


class PoolView(msgspec.Struct, frozen=True):
    name: str
    default: bool
    created_at: str
    instances: int
    idle: int
    busy: int


class OfferView(msgspec.Struct, frozen=True):
    backend: str
    region: str
    instance_type: str
    resources: str
    spot: bool
    price: float
    offer: Offer


class InstanceView(msgspec.Struct, frozen=True):
    """An instance for tables; times are ISO 8601 in UTC."""

    id: str
    name: str
    pool: str
    backend: str
    region: str
    instance_type: str
    resources: str
    spot: bool
    price: float
    status: str
    schedulable: bool
    run: str | None
    idle_since: str | None
    idle_seconds: float | None
    idle_duration: str
    created_at: str
    reason: str | None = None
    reachable: bool = True
    termination_attempts: int = 0


class AttemptView(msgspec.Struct, frozen=True):
    """An ended attempt of a retried run; times are ISO 8601 in UTC."""

    number: int
    trigger: str
    reason: str
    instance: str | None
    started_at: str | None
    ended_at: str | None
    exit_status: int | None


class RunView(msgspec.Struct, frozen=True):
    """A run for tables; times are ISO 8601 in UTC.

    ``wait_ms`` is the time from submission to the process start. ``status``
    is ``starting`` for a service whose readiness probe has not passed yet.
    ``url`` is where a ready service passed its probe. ``attempt`` counts from 1 and
    ``history`` lists the attempts that ended in a retry.
    """

    id: str
    name: str
    pool: str
    type: str
    status: str
    command: str
    user: str
    instance: str | None
    submitted_at: str
    started_at: str | None
    ended_at: str | None
    exit_status: int | None
    reason: str | None
    wait_ms: float | None
    log_path: str
    url: str | None = None
    ports: list[int] = []
    attempt: int = 1
    restarts: int = 0
    history: list[AttemptView] = []


class SshAccess(msgspec.Struct, frozen=True):
    """How a client logs in to a run's host with OpenSSH.

    ``key_path`` is a path on the daemon's machine, empty for the client's
    default keys. ``host_key`` is the host's public key in OpenSSH format,
    pinned when the host was added, or empty when none was pinned.
    """

    host: str
    port: int
    user: str
    key_path: str = ""
    host_key: str = ""


class AttachTarget(msgspec.Struct, frozen=True):
    """How ``dstackctl attach`` reaches a run.

    ``method`` is ``local`` for runs on this machine: ports are reachable on
    ``host`` as they are, and ``socket`` (an abstract Unix socket name, or
    ``None`` for runs other than dev environments) serves shells in the run.

    ``method`` is ``ssh`` for runs on a remote host: ``ssh`` gives the login
    details, ports are forwarded over that login, and for a dev environment
    ``shell_command`` is the remote command line that opens a shell in the
    run. The argv of a command to run in place of the shell is appended to
    it, quoted for ``sh``.
    """

    run: str
    type: str
    status: str
    backend: str
    method: str
    host: str
    ports: list[int] = []
    url: str | None = None
    socket: str | None = None
    ssh: SshAccess | None = None
    shell_command: str | None = None


class EventView(msgspec.Struct, frozen=True):
    position: int
    stream: str
    version: int
    recorded_at: str
    actor: str
    type: str
    event: msgspec.Raw
    hash: str
