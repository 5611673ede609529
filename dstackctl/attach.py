"""``dstackctl attach``: a shell in a dev environment, or where a run's ports are.

For a dev environment the daemon returns the name of the abstract Unix socket
on which the run's own process serves shells (see
``dstackd/dev_environment.py``). dstackctl connects, receives the master side
of the shell's pseudo-terminal as an ``SCM_RIGHTS`` file descriptor, and
copies bytes between it and this terminal, in raw mode when stdin is a
terminal. The exit code is the shell's.

For a run on an SSH host the daemon returns a login instead, and
``dstackctl/ssh_attach.py`` opens the shell and forwards the ports with the
OpenSSH client.
"""

import json
import os
import socket
import sys
import time
from typing import Any

import click

from dstackctl import exit_codes, ssh_attach
from dstackctl.client import Client, ClientError, api_path

# How often a connect is tried again while the dev environment runs its init.
CONNECT_RETRY_INTERVAL_S = 0.1
# How long output is still read after the shell exited, for what it wrote last.
DRAIN_TIMEOUT_S = 0.2
_READ_SIZE = 65536
_ENDED_RUN_STATUSES = frozenset({"done", "failed", "stopped"})


class AttachError(ClientError):
    """The shell could not be opened or the dev environment went away."""


@click.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-p",
    "--port",
    "port_mappings",
    multiple=True,
    metavar="LOCAL:REMOTE",
    help="Forward the run's port REMOTE to port LOCAL of this machine "
    "(remote instances only; by default each port keeps its number).",
)
@click.argument("run_name", metavar="RUN")
@click.argument("command", nargs=-1)
@click.pass_obj
def attach(
    client: Client,
    port_mappings: tuple[str, ...],
    run_name: str,
    command: tuple[str, ...],
) -> int:
    """Open a shell in the dev environment RUN, or run COMMAND there.

    The shell has the run's variables, working directory, CPUs and GPUs, and
    it ends when the run is stopped. For a service or a task with ports, this
    prints where the ports are reached; on this machine they need no
    forwarding. On a remote instance the shell is opened with the OpenSSH
    client, which forwards the run's ports to this machine for as long as it
    is attached (until Ctrl-C for a run without a shell).
    """
    if command[:1] == ("--",):
        # Options end at RUN, so click passes on a "--" written after it.
        command = command[1:]

    mappings = [ssh_attach.parse_port_mapping(text) for text in port_mappings]
    target = client.request("POST", api_path("runs", run_name, "attach"))
    if target.get("method") == "ssh":
        forwards = ssh_attach.remote_forwards(target.get("ports") or [], mappings)
        ssh_attach.describe_forwards(target, forwards)
        if target.get("shell_command") is None and not forwards:
            raise AttachError(
                f"run {target['run']} is a {target['type']} without ports; only dev "
                f"environments open shells (follow its output with 'dstackctl "
                f"logs -f {run_name}')"
            )

        return ssh_attach.attach_over_ssh(target, forwards, list(command))

    if mappings:
        raise click.BadParameter(
            f"run {target['run']} is on this machine, where its ports need no "
            "forwarding",
            param_hint="'-p' / '--port'",
        )

    for port in target.get("ports") or []:
        click.echo(
            f"Port {port} of run {target['run']} is on this machine at "
            f"{target['host']}:{port}; no forwarding is needed.",
            err=True,
        )

    if target.get("url"):
        click.echo(f"Service {target['run']} answers at {target['url']}.", err=True)

    socket_name = target.get("socket")
    if socket_name is None:
        if command or not target.get("ports"):
            raise AttachError(
                f"run {target['run']} is a {target['type']}; only dev environments "
                f"open shells (follow its output with 'dstackctl logs -f {run_name}')"
            )

        return exit_codes.OK

    connection = _connect(client, run_name, socket_name)
    with connection:
        return open_shell(connection, list(command) or None)


def _connect(client: Client, run_name: str, socket_name: str) -> socket.socket:
    """Connect to the run's shell server, waiting while init still runs."""
    waiting = False
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect("\0" + socket_name)
            return connection
        except (ConnectionRefusedError, FileNotFoundError):
            connection.close()

        view = client.request("GET", api_path("runs", run_name))
        if view["status"] in _ENDED_RUN_STATUSES:
            raise AttachError(
                f"run {run_name} {view['status']}: {view.get('reason') or 'it ended'}"
            )

        if not waiting:
            click.echo(
                "Waiting for the dev environment to finish its init...", err=True
            )
            waiting = True

        time.sleep(CONNECT_RETRY_INTERVAL_S)


def open_shell(connection: socket.socket, argv: list[str] | None) -> int:
    """Request a shell (or ``argv``) on ``connection`` and relay this terminal
    to it until it exits; return its exit status."""
    rows, cols = _terminal_size()
    request = {
        "argv": argv,
        "term": os.environ.get("TERM", "xterm"),
        "rows": rows,
        "cols": cols,
    }
    connection.sendall(json.dumps(request).encode() + b"\n")
    message, fds, _, _ = socket.recv_fds(connection, _READ_SIZE, 1)
    reply, pending = _first_line(message)
    if "error" in reply or not fds:
        raise AttachError(
            f"the dev environment refused the shell: {reply.get('error')}"
        )

    master = fds[0]
    try:
        return _relay(connection, master, pending)
    finally:
        os.close(master)


def _first_line(data: bytes) -> tuple[dict[str, Any], bytes]:
    line, _, rest = data.partition(b"\n")
    try:
        message = json.loads(line)
    except ValueError:
        message = None

    if not isinstance(message, dict):
        raise AttachError(f"invalid reply from the dev environment: {line[:200]!r}")

    return message, rest


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return 24, 80

    return size.lines, size.columns


def _relay(connection: socket.socket, master: int, pending: bytes) -> int:
    """Copy stdin to ``master`` and ``master`` to stdout until the shell exits."""
    import termios
    import tty

    stdin = sys.stdin.fileno()
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        # TCSADRAIN keeps what was typed before the shell opened.
        tty.setraw(stdin, termios.TCSADRAIN)
        _follow_window_size(stdin, master)

    try:
        return _copy_until_exit(connection, master, stdin, pending)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _follow_window_size(stdin: int, master: int) -> None:
    import fcntl
    import signal
    import termios

    def resize(signum: int, frame: object) -> None:
        size = fcntl.ioctl(stdin, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)

    signal.signal(signal.SIGWINCH, resize)


def _copy_until_exit(
    connection: socket.socket, master: int, stdin: int, pending: bytes
) -> int:
    import select

    stdout = sys.stdout.fileno()
    sources = [connection.fileno(), master, stdin]
    exit_status: int | None = None
    while exit_status is None:
        readable, _, _ = select.select(sources, [], [])
        if master in readable and not _copy(master, stdout):
            sources.remove(master)

        if stdin in readable and not _copy(stdin, master):
            # End of input that is no terminal: send the terminal's EOF.
            os.write(master, b"\x04")
            sources.remove(stdin)

        if connection.fileno() in readable:
            pending += connection.recv(_READ_SIZE)
            if b"\n" in pending or not pending:
                exit_status = _exit_status(pending)

    _drain(master, stdout)

    return exit_status


def _copy(source: int, target: int) -> bool:
    """Copy what ``source`` has to ``target``; False at end of file."""
    try:
        data = os.read(source, _READ_SIZE)
    except OSError:
        # The shell's side of the terminal closed: EIO on Linux.
        return False

    if not data:
        return False

    view = memoryview(data)
    while view:
        written = os.write(target, view)
        view = view[written:]

    return True


def _drain(master: int, stdout: int) -> None:
    import select

    while select.select([master], [], [], DRAIN_TIMEOUT_S)[0]:
        if not _copy(master, stdout):
            return


def _exit_status(data: bytes) -> int:
    if not data:
        raise AttachError("the dev environment closed the connection; was it stopped?")

    message, _ = _first_line(data)
    status = message.get("exit_status")
    if not isinstance(status, int):
        raise AttachError(f"invalid reply from the dev environment: {message!r}")

    return exit_codes.for_task_exit_status(status)
