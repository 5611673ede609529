"""The ``AddSshHosts`` command: connect to hosts, detect them, record them.

Each host is contacted before anything is appended, because a host that cannot
be reached or logged into should not join a pool. Detection runs for all hosts
at once, and either every host is added or none is. A host (address and port)
may be a live instance only once, in any pool, so two pools never place runs
on the same machine.
"""

import os

import anyio
import structlog

from dstackd import api
from dstackd.backends.base import BackendError
from dstackd.backends.ssh import (
    BACKEND_NAME,
    SshBackend,
    SshTarget,
    host_offer,
    parse_ssh_target,
)
from dstackd.commands import Commands, check_name, is_privileged
from dstackd.errors import (
    CommandError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
)
from dstackd.scheduler import new_instance_id
from events.event_types import InstanceProvisioned, InstanceRequested
from events.grammar import parse_duration
from events.model import Actor, Duration, Resources
from events.projection import LIVE_INSTANCE_STATUSES
from events.record import NewEvent

log = structlog.get_logger(__name__)


class HostUnreachableError(CommandError):
    """One or more hosts could not be reached, logged into or detected."""

    status = 502
    code = "internal"

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__(
            "no host was added because "
            + "; ".join(failures)
            + ". Check the address, the key and that sshd runs, then add again"
        )


async def add_ssh_hosts(
    commands: Commands, request: api.AddSshHosts, actor: Actor
) -> list[str]:
    """Add every host of ``request`` to its pool and return the instance ids.

    Raises:
        InvalidRequestError: no hosts, a malformed target, a duplicate in the
            request, a missing identity file, or a name given for several hosts.
        ConflictError: a host is already a live instance, or the name is taken.
        HostUnreachableError: a host could not be reached or detected.
    """
    _check_key_access(request.identity_file, actor)
    targets = _parse_targets(request)
    idle_duration: Duration = "off"
    if request.idle_duration is not None:
        idle_duration = parse_duration(request.idle_duration, "idle duration")

    if request.name is not None:
        check_name("instance", request.name)

    backend = commands.backends.get(BACKEND_NAME)
    if not isinstance(backend, SshBackend):
        raise InvalidRequestError("the ssh backend is not enabled in this daemon")

    _check_not_added(commands, targets)
    detected = await _detect_all(backend, targets)

    async with commands.core.lock:
        pool = commands.resolve_pool(request.pool)
        _check_not_added(commands, targets)
        _check_host_keys_not_added(commands, targets, detected)
        names = _instance_names(commands, request.name, len(targets))
        entries = commands._pool_creation(pool)
        instance_ids = []
        for target, name in zip(targets, names, strict=True):
            resources, host_key = detected[target.address]
            instance_id = new_instance_id()
            instance_ids.append(instance_id)
            entries += _host_events(
                instance_id, name, pool, idle_duration, target, resources, host_key
            )

        await commands.core.commit(entries, actor)

    for target, instance_id in zip(targets, instance_ids, strict=True):
        log.info(
            "ssh_host_added",
            instance_id=instance_id,
            host=target.address,
            pool=pool,
        )

    return instance_ids


def _check_key_access(key_path: str | None, actor: Actor) -> None:
    """Keep a caller from using keys the daemon can read but the caller cannot.

    Root and the daemon's user may name any key, or none (then the daemon's
    own default keys are tried). Anyone else must name a key file they own,
    and the error is the same whether the file is missing or someone else's.
    """
    if is_privileged(actor):
        return

    if not key_path:
        raise ForbiddenError(
            "only root or the daemon's user may add hosts with the daemon's own "
            "keys; pass -i with a private key you own"
        )

    try:
        owner = os.stat(key_path).st_uid
    except OSError:
        owner = None

    if owner != actor.uid:
        raise ForbiddenError(
            f"identity file {key_path} is not a file owned by uid {actor.uid}; "
            "pass a private key you own"
        )


def _parse_targets(request: api.AddSshHosts) -> list[SshTarget]:
    if not request.hosts:
        raise InvalidRequestError("no hosts given; pass at least one USER@HOST")

    if request.name is not None and len(request.hosts) > 1:
        raise InvalidRequestError(
            f"a name applies to one host, but {len(request.hosts)} hosts were "
            "given; add them without a name or one at a time"
        )

    key_path = request.identity_file or ""
    if key_path and not os.path.isabs(key_path):
        raise InvalidRequestError(
            f"invalid identity file {key_path!r}: expected an absolute path"
        )

    if key_path and not os.path.isfile(key_path):
        raise InvalidRequestError(
            f"identity file {key_path} not found on the daemon's machine; give "
            "the path of a private key that the daemon's user can read"
        )

    targets = [parse_ssh_target(text, key_path) for text in request.hosts]
    seen: set[tuple[str, int]] = set()
    for target in targets:
        key = (target.host.lower(), target.port)
        if key in seen:
            raise InvalidRequestError(f"host {target.address} is given twice")

        seen.add(key)

    return targets


def _check_not_added(commands: Commands, targets: list[SshTarget]) -> None:
    """Reject a target whose host and port a live SSH instance already has."""
    live = {}
    for instance in commands.core.state.live_instances():
        if instance.backend != BACKEND_NAME:
            continue

        if instance.status not in LIVE_INSTANCE_STATUSES:
            continue

        data = instance.backend_data
        live[(data.get("host", "").lower(), data.get("port", ""))] = instance

    for target in targets:
        instance = live.get((target.host.lower(), str(target.port)))
        if instance is not None:
            raise ConflictError(
                f"host {target.address} is already instance {instance.name} in "
                f"pool {instance.pool}; remove it there first with "
                f"'dstackctl pool remove {instance.name}'"
            )


def _check_host_keys_not_added(
    commands: Commands,
    targets: list[SshTarget],
    detected: dict[str, tuple[Resources, str]],
) -> None:
    """Reject a host already added under another name or address.

    ``localhost`` and ``127.0.0.1``, or a DNS name and its address, are one
    machine with one SSH host key, so the key identifies the host where the
    address does not. Two targets of one request are compared too.
    """
    owners: dict[str, str] = {}
    for instance in commands.core.state.live_instances():
        key = instance.backend_data.get("host_key", "")
        if instance.backend == BACKEND_NAME and key:
            owners[key] = f"instance {instance.name} in pool {instance.pool}"

    for target in targets:
        key = detected[target.address][1]
        if not key:
            continue

        owner = owners.get(key)
        if owner is not None:
            raise ConflictError(
                f"host {target.address} has the same SSH host key as {owner}, so it "
                "is the same machine; remove that instance first or add the host once"
            )

        owners[key] = f"{target.address} earlier in this request"


async def _detect_all(
    backend: SshBackend, targets: list[SshTarget]
) -> dict[str, tuple[Resources, str]]:
    """Detect every target concurrently; raise one error naming all failures."""
    detected: dict[str, tuple[Resources, str]] = {}
    failures: list[str] = []

    async def detect(target: SshTarget) -> None:
        try:
            detected[target.address] = await backend.detect(target)
        except BackendError as exc:
            failures.append(str(exc))

    async with anyio.create_task_group() as task_group:
        for target in targets:
            task_group.start_soon(detect, target)

    if failures:
        raise HostUnreachableError(sorted(failures))

    return detected


def _instance_names(commands: Commands, name: str | None, count: int) -> list[str]:
    taken = {
        instance.name
        for instance in commands.core.state.live_instances()
        if instance.status in LIVE_INSTANCE_STATUSES
    }
    if name is not None:
        if name in taken:
            raise ConflictError(
                f"instance name {name!r} is taken; choose another --name"
            )

        return [name]

    names: list[str] = []
    number = 1
    while len(names) < count:
        candidate = f"{BACKEND_NAME}-{number}"
        if candidate not in taken:
            names.append(candidate)

        number += 1

    return names


def _host_events(
    instance_id: str,
    name: str,
    pool: str,
    idle_duration: Duration,
    target: SshTarget,
    resources: Resources,
    host_key: str,
) -> list[NewEvent]:
    """Record the host as requested and provisioned in one batch."""
    pinned = SshTarget(
        user=target.user,
        host=target.host,
        port=target.port,
        key_path=target.key_path,
        host_key=host_key,
    )
    stream = f"instance/{instance_id}"

    return [
        NewEvent(
            stream,
            InstanceRequested(
                instance_id=instance_id,
                name=name,
                pool=pool,
                offer=host_offer(target, resources),
                idle_duration=idle_duration,
            ),
            expected_version=0,
        ),
        NewEvent(
            stream,
            InstanceProvisioned(
                instance_id=instance_id,
                resources=resources,
                hostname=target.host,
                backend_data=pinned.to_backend_data(),
            ),
        ),
    ]
