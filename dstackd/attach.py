"""Attach: how ``dstackctl attach`` reaches a run's shells and ports.

A dev environment's process is ``dstackd/dev_environment.py``, which serves
shells on an abstract Unix socket whose name contains a random token. The
daemon picks the name at each launch and keeps it in the run's directory
(``attach_socket``, mode 0600), never in the log. ``attach_target`` gives the
name only to the run's own user, root or the daemon's user. The shell server
checks the caller's uid with ``SO_PEERCRED`` as well.

Design: the client receives the master side of a pseudo-terminal whose shell
the dev environment process forked, so the shell is part of the run's process
tree: it has the run's variables, working directory, CPU affinity and GPUs,
and it ends when the run is stopped, whoever started it.

A run on an SSH host gets method ``ssh`` instead: the host's login from the
instance's ``backend_data`` and, for a dev environment, the remote command
that opens a shell in the run (``dstackd/ssh_attach.py``).
"""

import os
import secrets
import sys
from pathlib import Path

import msgspec

from dstackd import api, dev_environment, ssh_attach
from dstackd.backends.base import BackendError
from dstackd.backends.ssh import SshTarget
from dstackd.errors import ConflictError, InvalidRequestError
from dstackd.runner import RunLaunch
from events.model import Actor
from events.projection import Instance, Run, State

ATTACH_SOCKET_FILE = "attach_socket"
LOCAL_HOST = "127.0.0.1"


def dev_environment_launch(launch: RunLaunch, run: Run) -> RunLaunch:
    """Turn a dev environment's launch into one of its shell server process.

    A new socket name is chosen and written to the run directory first.
    """
    name = f"dstackd-attach-{run.id}-{secrets.token_hex(16)}"
    path = Path(launch.run_dir) / ATTACH_SOCKET_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(name)

    argv = [sys.executable, "-I", "-S", dev_environment.__file__, "--socket", name]
    inactivity = run.spec.inactivity_duration
    if inactivity is not None and inactivity != "off":
        argv += ["--inactivity", str(inactivity)]

    if run.spec.init:
        argv += ["--init", "\n".join(run.spec.init)]

    # The command names this daemon's Python and file, so it suits the local
    # runner only; ``ssh_attach`` builds the launch for SSH hosts.
    return msgspec.structs.replace(launch, argv=argv, commands=[])


def read_attach_socket(run_dir: Path) -> str | None:
    try:
        return (run_dir / ATTACH_SOCKET_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def attach_target(
    state: State, run: Run, run_dir: Path, actor: Actor
) -> api.AttachTarget:
    """Describe how ``actor`` reaches ``run``.

    Raises:
        ConflictError: the run is not running, or it is on a backend that
            attach does not reach.
        InvalidRequestError: the caller is not the run's user, nor root, nor
            the daemon's user.
    """
    if actor.uid not in (run.uid, 0, os.getuid()):
        raise InvalidRequestError(
            f"run {run.name} belongs to uid {run.uid}; uid {actor.uid} may not attach"
        )

    instance = state.instances.get(run.instance_id or "")
    if run.status != "running" or instance is None:
        raise ConflictError(
            f"run {run.name} is {run.status}; attach works while it is running"
        )

    ports = list(run.spec.ports)
    if run.spec.port is not None:
        ports.append(run.spec.port)

    if instance.backend in ssh_attach.SSH_BACKENDS:
        return _ssh_attach_target(run, instance, ports)

    if instance.backend != "local":
        raise ConflictError(
            f"attach to runs on backend {instance.backend} is not supported"
        )

    socket_name = None
    if run.spec.type == "dev-environment":
        socket_name = read_attach_socket(run_dir)

    return api.AttachTarget(
        run=run.name,
        type=run.spec.type,
        status=run.status,
        backend=instance.backend,
        method="local",
        host=LOCAL_HOST,
        ports=ports,
        url=run.url or service_url(run, LOCAL_HOST),
        socket=socket_name,
    )


def _ssh_attach_target(
    run: Run, instance: Instance, ports: list[int]
) -> api.AttachTarget:
    try:
        target = SshTarget.from_backend_data(dict(instance.backend_data))
    except BackendError as exc:
        raise ConflictError(
            f"run {run.name} cannot be attached: instance {instance.name} has no "
            f"SSH login yet ({exc})"
        ) from exc

    shell = None
    if run.spec.type == "dev-environment":
        shell = ssh_attach.shell_command(run)

    return api.AttachTarget(
        run=run.name,
        type=run.spec.type,
        status=run.status,
        backend=instance.backend,
        method="ssh",
        host=target.host,
        ports=ports,
        url=run.url or service_url(run, instance.hostname or target.host),
        ssh=api.SshAccess(
            host=target.host,
            port=target.port,
            user=target.user,
            key_path=target.key_path,
            host_key=target.host_key,
        ),
        shell_command=shell,
    )


def service_url(run: Run, host: str) -> str | None:
    """Return the base URL of a service on ``host``, or None for other runs."""
    if run.spec.type != "service" or run.spec.port is None:
        return None

    return f"http://{host}:{run.spec.port}"
