"""An SSH server for tests: asyncssh on 127.0.0.1, running commands with sh.

Run as ``python tests/ssh_test_server.py HOST_KEY AUTHORIZED_KEYS HOME``. It
listens on a free port of 127.0.0.1, prints that port on one line of stdout,
and serves until killed. Each exec request runs ``sh -c COMMAND`` in a new
session with ``HOME`` set to ``HOME``, as sshd runs a user's commands, on a
pseudo-terminal when the client requested one. Local port forwards
(``ssh -L``) may reach loopback addresses only. When a
channel closes, the command's process group is killed, so a client that goes
away leaves no ``tail -f`` behind. Processes that start a session of their own
(the run supervisor does) survive that, as they do under sshd.
"""

import asyncio
import fcntl
import os
import signal
import struct
import sys
import termios

import asyncssh


class _Server(asyncssh.SSHServer):
    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        """Allow ``ssh -L`` forwards to loopback addresses only."""
        return dest_host in ("127.0.0.1", "::1", "localhost")


async def _handle(process: asyncssh.SSHServerProcess[bytes], home: str) -> None:
    command = process.command
    if command is None:
        process.stderr.write(b"this test server runs commands only\n")
        process.exit(1)
        return

    if process.term_type is not None:
        await _handle_on_terminal(process, command, home)
        return

    local = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=home,
        env=dict(os.environ, HOME=home),
        start_new_session=True,
    )
    assert local.stdin and local.stdout and local.stderr
    feeding = asyncio.ensure_future(_feed(process.stdin, local.stdin))
    copies = [
        asyncio.ensure_future(_copy(local.stdout, process.stdout)),
        asyncio.ensure_future(_copy(local.stderr, process.stderr)),
    ]
    exited = asyncio.ensure_future(local.wait())
    closed = asyncio.ensure_future(process.wait_closed())
    try:
        await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            await asyncio.gather(*copies)
            status = exited.result()
            process.exit(status if status >= 0 else 128 - status)
    except (asyncssh.Error, OSError):
        pass
    finally:
        for task in (feeding, *copies, exited, closed):
            task.cancel()

        if local.returncode is None:
            try:
                os.killpg(local.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _handle_on_terminal(
    process: asyncssh.SSHServerProcess[bytes], command: str, home: str
) -> None:
    """Run ``command`` on a pseudo-terminal, as sshd does after a pty request."""
    master, slave = os.openpty()
    width, height, _, _ = process.term_size
    if width and height:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("4H", height, width, 0, 0))

    local = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=home,
        env=dict(os.environ, HOME=home, TERM=process.term_type or "xterm"),
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    output_ended = asyncio.Event()

    def read_output() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""

        if data:
            process.stdout.write(data)
        else:
            loop.remove_reader(master)
            output_ended.set()

    loop.add_reader(master, read_output)

    async def feed() -> None:
        while chunk := await process.stdin.read(65536):
            os.write(master, chunk)

    feeding = asyncio.ensure_future(feed())
    closed = asyncio.ensure_future(process.wait_closed())
    ended = asyncio.ensure_future(output_ended.wait())
    try:
        await asyncio.wait({ended, closed}, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():
            status = await local.wait()
            process.exit(status if status >= 0 else 128 - status)
    except (asyncssh.Error, OSError):
        pass
    finally:
        loop.remove_reader(master)
        for task in (feeding, closed, ended):
            task.cancel()

        if local.returncode is None:
            try:
                os.killpg(local.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

        os.close(master)


async def _feed(
    source: asyncssh.SSHReader[bytes], target: asyncio.StreamWriter
) -> None:
    try:
        while chunk := await source.read(65536):
            target.write(chunk)
            await target.drain()
    finally:
        target.close()


async def _copy(
    source: asyncio.StreamReader, target: asyncssh.SSHWriter[bytes]
) -> None:
    while chunk := await source.read(65536):
        target.write(chunk)
        await target.drain()


async def serve(host_key: str, authorized_keys: str, home: str) -> None:
    server = await asyncssh.create_server(
        _Server,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized_keys,
        process_factory=lambda process: _handle(process, home),
        encoding=None,
        line_editor=False,
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[1:4]))
