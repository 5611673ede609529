"""The process of a dev environment run: it runs the init lines, then serves
interactive shells to ``dstackctl attach`` until it is stopped or no client was
attached for the inactivity duration.

The daemon starts this file as the run's command, as ``python -I -S
dev_environment.py --socket NAME [--inactivity SECONDS] [--init SCRIPT]``, so
it imports only the standard library. Being the run's process, it inherits
everything the run has: the variables, the working directory, the CPU
affinity and ``CUDA_VISIBLE_DEVICES``. Each shell it starts is its child, so a
shell belongs to the run's process tree and ends when the run is stopped.

Protocol on the abstract Unix socket ``NAME``: the client sends one JSON line,
``{"argv": null or [...], "term": "xterm", "rows": 24, "cols": 80}``. The
server checks with ``SO_PEERCRED`` that the client runs as the same user (or
root), opens a pseudo-terminal, starts the shell (or ``argv``) on its slave
side, and replies ``{"pid": N}`` with the master side attached as an
``SCM_RIGHTS`` file descriptor. When the shell exits it sends
``{"exit_status": N}`` (128 + n for signal n) and closes the connection. An
error is ``{"error": "..."}``. The process exits with 0 when the inactivity
duration passed with no shell open, and with the init's status when init
failed.
"""

import argparse
import fcntl
import json
import os
import pwd
import selectors
import socket
import struct
import subprocess
import sys
import termios
import time

_PEERCRED = struct.Struct("3i")
_WINSIZE = struct.Struct("4H")
_MAX_REQUEST_BYTES = 64 * 1024
# How long a client may take to send its request after connecting.
REQUEST_TIMEOUT_SECONDS = 5.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dev_environment")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--inactivity", type=int, default=None)
    parser.add_argument("--init", default="")
    args = parser.parse_args(argv)

    if args.init:
        _say("running init")
        status = subprocess.call(["/bin/sh", "-e", "-c", args.init])
        if status != 0:
            _say(f"init failed with status {status}")
            return status if status > 0 else 128 - status

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + args.socket)
    server.listen(16)
    _say("ready; open a shell with 'dstackctl attach'")

    return ShellServer(server, args.inactivity).serve()


def _say(message: str) -> None:
    print(f"dstackd: dev environment {message}", flush=True)


class _Session:
    def __init__(self, connection: socket.socket, pid: int, pidfd: int) -> None:
        self.connection = connection
        self.pid = pid
        self.pidfd = pidfd


class ShellServer:
    """Accepts attach requests and reaps the shells; see the module docstring."""

    def __init__(self, server: socket.socket, inactivity_seconds: int | None) -> None:
        self.server = server
        self.inactivity_seconds = inactivity_seconds
        self.selector = selectors.DefaultSelector()
        self.selector.register(server, selectors.EVENT_READ, None)
        self.sessions: dict[int, _Session] = {}
        self.idle_since = time.monotonic()

    def serve(self) -> int:
        """Serve until the inactivity duration passes with no shell open."""
        while True:
            timeout = self._idle_timeout()
            if timeout is not None and timeout <= 0:
                _say(f"ends: no client was attached for {self.inactivity_seconds}s")
                return 0

            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._reap(key.data)

    def _idle_timeout(self) -> float | None:
        if self.sessions or self.inactivity_seconds is None:
            return None

        return self.idle_since + self.inactivity_seconds - time.monotonic()

    def _accept(self) -> None:
        connection, _ = self.server.accept()
        try:
            self._start_session(connection)
        except (OSError, ValueError) as exc:
            _say(f"rejected an attach request: {exc}")
            _reply(connection, {"error": str(exc)})
            connection.close()

    def _start_session(self, connection: socket.socket) -> None:
        uid = _peer_uid(connection)
        if uid not in (os.getuid(), 0):
            raise ValueError(f"uid {uid} may not attach to a run of uid {os.getuid()}")

        request = _read_request(connection)
        argv = request.get("argv") or [_login_shell()]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a list of strings, got {argv!r}")

        master, slave = os.openpty()
        try:
            _set_window_size(master, request.get("rows"), request.get("cols"))
            env = dict(os.environ)
            env["TERM"] = str(request.get("term") or "xterm")
            env.setdefault("SHELL", _login_shell())
            pid = os.fork()
            if pid == 0:
                _exec_on_terminal(slave, argv, env)

            os.close(slave)
            slave = -1
            pidfd = os.pidfd_open(pid)
            socket.send_fds(connection, [_line({"pid": pid})], [master])
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

        session = _Session(connection, pid, pidfd)
        self.sessions[pidfd] = session
        self.selector.register(pidfd, selectors.EVENT_READ, session)

    def _reap(self, session: _Session) -> None:
        self.selector.unregister(session.pidfd)
        os.close(session.pidfd)
        del self.sessions[session.pidfd]
        _, wait_status = os.waitpid(session.pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        _reply(session.connection, {"exit_status": code if code >= 0 else 128 - code})
        session.connection.close()
        self.idle_since = time.monotonic()


def _peer_uid(connection: socket.socket) -> int:
    data = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(data)

    return int(uid)


def _read_request(connection: socket.socket) -> dict[str, object]:
    connection.settimeout(REQUEST_TIMEOUT_SECONDS)
    data = b""
    while b"\n" not in data:
        chunk = connection.recv(4096)
        if not chunk or len(data) > _MAX_REQUEST_BYTES:
            raise ValueError("the attach request ended before its newline")

        data += chunk

    connection.settimeout(None)
    request = json.loads(data.split(b"\n", 1)[0])
    if not isinstance(request, dict):
        raise ValueError(f"the attach request is not a JSON object: {request!r}")

    return request


def _login_shell() -> str:
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""

    return shell if shell and os.access(shell, os.X_OK) else "/bin/sh"


def _set_window_size(fd: int, rows: object, cols: object) -> None:
    if isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, cols, 0, 0))


def _exec_on_terminal(slave: int, argv: list[str], env: dict[str, str]) -> None:
    """In the forked child: make ``slave`` the controlling terminal and exec."""
    try:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)

        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"dstackd: cannot start {argv[0]}: {exc.strerror}\r\n".encode())
    finally:
        os._exit(127)


def _line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _reply(connection: socket.socket, message: dict[str, object]) -> None:
    try:
        connection.sendall(_line(message))
    except OSError:
        # The client went away, and so its shell ended already.
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
