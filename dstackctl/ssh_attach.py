"""``dstackctl attach`` for runs on SSH hosts, through the OpenSSH client.

The daemon returns how to log in (host, port, user, key path, pinned host
key) and, for a dev environment, the remote command that opens a shell in the
run (see ``dstackd/ssh_attach.py``). This module runs ``ssh`` with that
command on a pseudo-terminal, forwarding the run's ports with ``-L`` on the
same login, or runs ``ssh -N`` to forward the ports alone until ssh exits or
the user presses Ctrl-C. A pinned host key goes into a known_hosts file of
this attach alone, with strict checking, so a replaced host is refused as it
is by the daemon.
"""

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from dstackctl import exit_codes
from dstackctl.client import ClientError

LOOPBACK = "127.0.0.1"
# Seconds between keepalives, so a forward to a host that stops responding
# ends after about three of them (OpenSSH's ServerAliveCountMax defaults to 3).
SERVER_ALIVE_INTERVAL_SECONDS = 15


class SshAttachError(ClientError):
    """ssh could not be started for an attach."""


def attach_over_ssh(
    target: dict[str, Any], forwards: Sequence[tuple[int, int]], argv: list[str]
) -> int:
    """Open the run's shell (or ``argv``) over SSH, forwarding ``forwards``.

    ``forwards`` are (local port, remote port) pairs. Without a shell command
    in ``target`` the ports alone are forwarded until ssh ends. Returns the
    exit code to leave with: the remote command's, or ssh's 255 when the
    login failed.
    """
    ssh = shutil.which("ssh")
    if ssh is None:
        raise SshAttachError(
            "the OpenSSH client 'ssh' was not found in PATH; install it (the "
            "openssh-client package on Debian and Ubuntu) to attach to runs on "
            "remote instances"
        )

    access = target["ssh"]
    shell = target.get("shell_command")
    if shell is None and argv:
        raise SshAttachError(
            f"run {target['run']} is a {target['type']}; only dev environments "
            "run commands through attach"
        )

    with tempfile.TemporaryDirectory(prefix="dstackctl-") as directory:
        known_hosts = _write_known_hosts(Path(directory), access)
        command = None
        if shell is not None:
            command = shell + (" " + shlex.join(argv) if argv else "")

        args = ssh_argv(ssh, access, known_hosts, forwards, command)
        if command is None:
            return _forward_until_interrupted(args, target["run"])

        return _run_shell(args)


def ssh_argv(
    ssh: str,
    access: dict[str, Any],
    known_hosts: Path | None,
    forwards: Sequence[tuple[int, int]],
    command: str | None,
) -> list[str]:
    """Build the ssh command line; ``command`` None forwards ports only."""
    args = [
        ssh,
        "-p",
        str(access["port"]),
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_SECONDS}",
    ]
    if access.get("key_path"):
        args += ["-i", access["key_path"], "-o", "IdentitiesOnly=yes"]

    if known_hosts is not None:
        args += [
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    for local, remote in forwards:
        args += ["-L", f"{LOOPBACK}:{local}:{LOOPBACK}:{remote}"]

    # -tt gives the command a pseudo-terminal even when stdin is not a
    # terminal, as a shell in a dev environment on a local instance always has.
    args += ["-N"] if command is None else ["-tt"]
    args += [f"{access['user']}@{access['host']}"]
    if command is not None:
        args.append(command)

    return args


def _write_known_hosts(directory: Path, access: dict[str, Any]) -> Path | None:
    """Write the pinned host key as a known_hosts file; None when none is pinned."""
    host_key = access.get("host_key") or ""
    if not host_key:
        return None

    host = access["host"]
    port = int(access["port"])
    name = host if port == 22 else f"[{host}]:{port}"
    path = directory / "known_hosts"
    path.write_text(f"{name} {host_key}\n")

    return path


def _run_shell(args: list[str]) -> int:
    process = subprocess.Popen(args)
    while True:
        try:
            status = process.wait()
            break
        except KeyboardInterrupt:
            # Without a terminal in raw mode, Ctrl-C reaches ssh as well,
            # which decides whether the session ends.
            continue

    return exit_codes.for_task_exit_status(status)


def _forward_until_interrupted(args: list[str], run: str) -> int:
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    click.echo(f"Forwarding the ports of run {run}; press Ctrl-C to stop.", err=True)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return exit_codes.OK

    if status != 0:
        raise SshAttachError(
            f"ssh exited with status {status} while forwarding the ports of run "
            f"{run}; a local port may be in use (choose another with -p "
            "LOCAL:REMOTE)"
        )

    return exit_codes.OK


def parse_port_mapping(text: str) -> tuple[int, int]:
    """Parse ``LOCAL:REMOTE`` or ``PORT`` (the same port on both sides).

    Raises:
        click.BadParameter: a part is not a port number from 1 to 65535.
    """
    local_text, _, remote_text = text.partition(":")
    try:
        local = int(local_text)
        remote = int(remote_text or local_text)
    except ValueError:
        local = remote = 0

    if not (1 <= local <= 65535 and 1 <= remote <= 65535):
        raise click.BadParameter(
            f"invalid port mapping {text!r}; expected LOCAL:REMOTE or PORT, with "
            "port numbers from 1 to 65535"
        )

    return local, remote


def remote_forwards(
    ports: Sequence[int], mappings: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Pair each of the run's ports with the local port it is forwarded to.

    A mapping picks the local port of a remote port. The run's other ports
    keep their number on this machine.

    Raises:
        click.BadParameter: a mapping names a port the run does not have.
    """
    chosen = {remote: local for local, remote in mappings}
    unknown = sorted(set(chosen) - set(ports))
    if unknown:
        raise click.BadParameter(
            f"run has no port {unknown[0]}; its ports are "
            f"{', '.join(map(str, ports)) or 'none'}"
        )

    return [(chosen.get(port, port), port) for port in ports]


def describe_forwards(target: dict[str, Any], forwards: list[tuple[int, int]]) -> None:
    """Print where each forwarded port and the service URL are on this machine."""
    access = target["ssh"]
    for local, remote in forwards:
        click.echo(
            f"Port {remote} of run {target['run']} on {access['host']} is forwarded "
            f"to {LOOPBACK}:{local} on this machine.",
            err=True,
        )

    url_ports = {remote: local for local, remote in forwards}
    if target.get("url") and target.get("ports"):
        service_port = target["ports"][-1]
        local = url_ports.get(service_port, service_port)
        click.echo(
            f"Service {target['run']} answers at http://{LOOPBACK}:{local} while "
            "attached.",
            err=True,
        )
