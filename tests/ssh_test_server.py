"""An SSH server for tests: asyncssh on 127.0.0.1, running commands with sh.

Run as ``python tests/ssh_test_server.py HOST_KEY AUTHORIZED_KEYS HOME``. It
listens on a free port of 127.0.0.1, prints that port on one line of stdout,
and serves until killed. Each exec request runs ``sh -c COMMAND`` in a new
session with ``HOME`` set to ``HOME``, as sshd runs a user's commands. When a
channel closes, the command's process group is killed, so a client that goes
away leaves no ``tail -f`` behind. Processes that start a session of their own
(the run supervisor does) survive that, as they do under sshd.
"""

import asyncio
import os
import signal
import sys

import asyncssh


async def _handle(process: asyncssh.SSHServerProcess[bytes], home: str) -> None:
    command = process.command
    if command is None:
        process.stderr.write(b"this test server runs commands only\n")
        process.exit(1)
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
        asyncssh.SSHServer,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized_keys,
        process_factory=lambda process: _handle(process, home),
        encoding=None,
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[1:4]))
