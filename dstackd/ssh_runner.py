"""Runs on remote hosts over SSH: start, output streaming, exit status, stop, adopt.

Each run gets a directory ``~/.dstackd/runs/<run id>/`` on its host. A small
``sh`` supervisor, detached with ``setsid -f`` so it outlives the SSH session,
starts the task in a process group of its own. It writes its own pid and start
time to ``pid`` and the task's pid to ``task_pid``. When the task ends, it
writes the exit status to ``exit_status``. The daemon therefore never needs to
stay connected, and a restarted daemon re-adopts the run from the pid recorded
in ``RunStarted`` and the files on the host.

The task's output goes to ``output.log`` on the host, and ``wait`` copies it
into the run's local log file with ``tail --pid``, continuing from the local
file's size after a reconnect or a restart. Environment values travel on the
SSH channel's stdin into a file of mode 0600, never on a command line.

The host needs a POSIX ``sh``, ``setsid`` (util-linux), GNU ``tail``,
``base64`` and ``/proc``.
"""

import base64
import math
import os
import shlex
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog

from dstackd.backends.base import BackendError
from dstackd.backends.ssh import (
    SshCommandError,
    SshError,
    SshTarget,
    connect,
    run_command,
)
from dstackd.runner import RunLaunch, RunLostError, RunStartError, shell_argv
from events.errors import InvalidValueError

if TYPE_CHECKING:
    import asyncssh

log = structlog.get_logger(__name__)

OUTPUT_LOG_FILE = "output.log"
REMOTE_RUNS_DIR = ".dstackd/runs"

# Bound on the start script, which returns once the supervisor wrote its pid.
START_TIMEOUT_SECONDS = 30.0
# Extra time a stop may take on the host after the grace period.
STOP_MARGIN_SECONDS = 30.0
# Backoff between reconnects while a run's host does not answer.
RECONNECT_BACKOFF_START_SECONDS = 1.0
RECONNECT_BACKOFF_MAX_SECONDS = 30.0
READ_SIZE = 64 * 1024

# $1 is the run directory. The task gets a session and process group of its
# own, so a stop signals the whole tree and leaves the supervisor alive to
# record the exit status.
SUPERVISOR_SCRIPT = r"""
d="$1"
setsid sh "$d/task.sh" "$d" >>"$d/output.log" 2>&1 </dev/null &
task=$!
echo "$task" >"$d/task_pid"
start=$(cut -d' ' -f22 "/proc/$$/stat")
echo "$$ $start" >"$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"
wait "$task"
status=$?
echo "$status" >"$d/exit_status.tmp" && mv "$d/exit_status.tmp" "$d/exit_status"
"""


class SshRunHandle(msgspec.Struct, frozen=True):
    """A run started on a host: its supervisor's pid and start time, its files.

    ``log_path`` and ``run_dir`` are local, ``remote_dir`` is relative to the
    SSH user's home on the host.
    """

    run_id: str
    pid: int
    pid_start_time: int
    log_path: str
    run_dir: str
    target: SshTarget
    remote_dir: str


class SshRunner:
    """Starts, waits for, stops and adopts runs on SSH hosts.

    The host comes from the launch's ``backend_data`` (``SshTarget``'s keys),
    so one runner serves every SSH host and every cloud instance reached over
    SSH.

    Args:
        connect_timeout: seconds for one connect, login included.
        keepalive_interval: seconds between keepalive requests while ``wait``
            copies output, which notice a host that stopped answering.
        lost_after_seconds: how long ``wait`` keeps reconnecting to a host that
            does not answer before it gives the run up as lost.
        start_retry_seconds: how long ``start`` retries a host that cannot be
            reached before the run fails to start.
        is_active: tells whether the log still has the run as active; ``wait``
            stops reconnecting once it is not, e.g. after its instance was lost.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 15.0,
        lost_after_seconds: float = 3600.0,
        start_retry_seconds: float = 120.0,
        is_active: Callable[[str], bool] = lambda run_id: True,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.lost_after_seconds = lost_after_seconds
        self.start_retry_seconds = start_retry_seconds
        self.is_active = is_active
        self._abandoned: set[str] = set()

    async def start(self, launch: RunLaunch) -> SshRunHandle:
        """Start the run on its host and return once the supervisor is up.

        Raises:
            InvalidValueError: ``argv`` and ``commands`` are both set or both
                empty.
            RunStartError: the host stayed unreachable for
                ``start_retry_seconds``, or the start script failed.
        """
        task_script = _task_script(launch)
        try:
            target = SshTarget.from_backend_data(dict(launch.backend_data))
        except BackendError as exc:
            raise RunStartError(launch.run_id, str(exc)) from exc

        remote_dir = f"{REMOTE_RUNS_DIR}/{launch.run_id}"
        script = _start_script(remote_dir, launch.env, task_script)
        os.makedirs(launch.run_dir, mode=0o750, exist_ok=True)
        output = await self._run_start_script(launch.run_id, target, script)
        pid, start_time = _parse_pid_line(launch.run_id, output)
        log.debug(
            "ssh_run_started",
            run_id=launch.run_id,
            host=target.address,
            supervisor_pid=pid,
        )

        return SshRunHandle(
            run_id=launch.run_id,
            pid=pid,
            pid_start_time=start_time,
            log_path=os.path.join(launch.run_dir, OUTPUT_LOG_FILE),
            run_dir=launch.run_dir,
            target=target,
            remote_dir=remote_dir,
        )

    async def _run_start_script(
        self, run_id: str, target: SshTarget, script: str
    ) -> str:
        """Run the start script, retrying while the host cannot be reached.

        A fresh cloud instance may run before its sshd accepts logins, so
        connection failures are retried for ``start_retry_seconds``. Running
        the script twice is safe, because a second start finds the pid file.
        """
        started = anyio.current_time()
        backoff = RECONNECT_BACKOFF_START_SECONDS
        while True:
            try:
                connection = await connect(target, timeout=self.connect_timeout)
                async with connection:
                    return await run_command(
                        connection,
                        target.address,
                        "sh -s",
                        input=script,
                        timeout=START_TIMEOUT_SECONDS,
                    )
            except SshCommandError as exc:
                raise RunStartError(run_id, str(exc)) from exc
            except SshError as exc:
                if anyio.current_time() - started >= self.start_retry_seconds:
                    raise RunStartError(run_id, str(exc)) from exc

                log.warning(
                    "ssh_run_start_retried",
                    run_id=run_id,
                    host=target.address,
                    error=exc.reason,
                    retry_seconds=backoff,
                )

            await anyio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_SECONDS)

    def adopt(
        self,
        run_id: str,
        pid: int,
        pid_start_time: int,
        run_dir: str,
        backend_data: Mapping[str, str] | None = None,
    ) -> SshRunHandle | None:
        """Return a handle for a run started before a restart.

        The host is not contacted here, so the handle is returned even when
        the run ended meanwhile: ``wait`` then returns its recorded status.
        None means ``backend_data`` does not name a host.
        """
        try:
            target = SshTarget.from_backend_data(dict(backend_data or {}))
        except BackendError as exc:
            log.error("ssh_run_adopt_failed", run_id=run_id, error=str(exc))
            return None

        return SshRunHandle(
            run_id=run_id,
            pid=pid,
            pid_start_time=pid_start_time,
            log_path=os.path.join(run_dir, OUTPUT_LOG_FILE),
            run_dir=run_dir,
            target=target,
            remote_dir=f"{REMOTE_RUNS_DIR}/{run_id}",
        )

    async def wait(self, handle: SshRunHandle) -> int:
        """Copy the run's output until it ends, then return its exit status.

        A lost connection is retried with backoff. A host that does not answer
        for ``lost_after_seconds``, or a stop that could not reach the host,
        ends the wait.

        Raises:
            RunLostError: the supervisor ended without an exit status, the host
                stayed unreachable, or the run was stopped while unreachable.
        """
        backoff = RECONNECT_BACKOFF_START_SECONDS
        unreachable_since: float | None = None
        while True:
            if handle.run_id in self._abandoned:
                self._abandoned.discard(handle.run_id)
                raise RunLostError(
                    handle.run_id,
                    f"it was stopped while {handle.target.address} was unreachable; "
                    "its processes may still run there",
                )

            try:
                return await self._follow(handle)
            except SshError as exc:
                now = anyio.current_time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.lost_after_seconds:
                    raise RunLostError(
                        handle.run_id,
                        f"{handle.target.address} was unreachable for "
                        f"{self.lost_after_seconds:g}s: {exc.reason}",
                    ) from exc

                if not self.is_active(handle.run_id):
                    raise RunLostError(
                        handle.run_id,
                        f"it ended in the log while {handle.target.address} was "
                        f"unreachable: {exc.reason}",
                    ) from exc

                log.warning(
                    "ssh_run_connection_lost",
                    run_id=handle.run_id,
                    host=handle.target.address,
                    error=exc.reason,
                    retry_seconds=backoff,
                )

            await anyio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_SECONDS)

    async def _follow(self, handle: SshRunHandle) -> int:
        """Copy output until the supervisor exits, then read the exit status."""
        connection = await connect(
            handle.target,
            timeout=self.connect_timeout,
            keepalive_interval=self.keepalive_interval,
        )
        async with connection:
            await self._copy_output(connection, handle)
            status_text = await run_command(
                connection,
                handle.target.address,
                _status_command(handle.remote_dir),
                timeout=self.connect_timeout * 3,
            )

        status_text = status_text.strip()
        if not status_text.isdigit():
            raise RunLostError(
                handle.run_id,
                f"its supervisor on {handle.target.address} ended without "
                f"writing ~/{handle.remote_dir}/exit_status",
            )

        return int(status_text)

    async def _copy_output(
        self, connection: "asyncssh.SSHClientConnection", handle: SshRunHandle
    ) -> None:
        import asyncssh

        offset = _file_size(handle.log_path)
        command = _follow_command(handle, offset)
        try:
            process = await connection.create_process(command, encoding=None)
            async with process:
                with open(handle.log_path, "ab") as log_file:
                    while chunk := await process.stdout.read(READ_SIZE):
                        log_file.write(chunk)
                        log_file.flush()

                await process.wait()
        except (OSError, asyncssh.Error) as exc:
            raise SshError(
                handle.target.address, "following the output on", str(exc)
            ) from None

        if connection.is_closed():
            raise SshError(
                handle.target.address, "following the output on", "connection lost"
            )

    async def stop(
        self, handle: SshRunHandle, *, grace_seconds: float = 10, abort: bool = False
    ) -> None:
        """Stop the task's process group: SIGTERM, then SIGKILL after the grace.

        With ``abort`` SIGKILL goes at once. The supervisor survives the signal
        and records the exit status, so the run's ``wait`` returns it. When the
        host cannot be reached, the stop is logged and ``wait`` gives the run up.
        """
        grace = 0 if abort else math.ceil(grace_seconds)
        command = _stop_command(handle.remote_dir, grace)
        try:
            connection = await connect(handle.target, timeout=self.connect_timeout)
            async with connection:
                await run_command(
                    connection,
                    handle.target.address,
                    command,
                    timeout=grace + STOP_MARGIN_SECONDS,
                )
        except SshError as exc:
            log.error(
                "ssh_run_stop_failed",
                run_id=handle.run_id,
                host=handle.target.address,
                error=exc.reason,
            )
            self._abandoned.add(handle.run_id)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _task_script(launch: RunLaunch) -> str:
    """Build the script that enters the working directory and execs the task."""
    if bool(launch.argv) == bool(launch.commands):
        raise InvalidValueError(
            "argv and commands",
            {"argv": launch.argv, "commands": launch.commands},
            "exactly one of them non-empty",
        )

    argv = list(launch.argv) if launch.argv else shell_argv(launch.commands)
    lines = ['. "$1/env"', 'cd "$HOME"']
    if launch.working_dir:
        directory = shlex.quote(launch.working_dir)
        lines.append(
            f'cd {directory} 2>/dev/null || echo "dstackd: working directory '
            f"{_escape_for_double_quotes(launch.working_dir)} does not exist on "
            'this host; running in $HOME" >&2'
        )

    lines.append("exec " + shlex.join(argv))

    return "\n".join(lines) + "\n"


def _escape_for_double_quotes(text: str) -> str:
    return "".join("\\" + char if char in '\\"$`' else char for char in text)


def _env_file(env: Mapping[str, str]) -> str:
    return "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items())
    )


def _start_script(remote_dir: str, env: Mapping[str, str], task_script: str) -> str:
    """Build the script, sent on stdin, that writes the run's files and starts it.

    A second start of the same run finds the pid file and starts nothing.
    """
    files = {
        "env": _env_file(env),
        "task.sh": task_script,
        "supervisor.sh": SUPERVISOR_SCRIPT,
    }
    lines = [
        "set -e",
        "umask 077",
        f'd="$HOME/{remote_dir}"',
        'mkdir -p "$d"',
        'if [ ! -s "$d/pid" ]; then',
    ]
    for name, content in files.items():
        encoded = base64.b64encode(content.encode()).decode()
        lines.append(f'  echo {encoded} | base64 -d >"$d/{name}"')

    lines += [
        '  setsid -f sh "$d/supervisor.sh" "$d" </dev/null >/dev/null 2>&1',
        "fi",
        "i=0",
        'while [ ! -s "$d/pid" ]; do',
        "  i=$((i + 1))",
        '  if [ "$i" -gt 1000 ]; then',
        '    echo "the run supervisor wrote no pid file within 10s" >&2',
        "    exit 1",
        "  fi",
        "  sleep 0.01",
        "done",
        'cat "$d/pid"',
    ]

    return "\n".join(lines) + "\n"


def _parse_pid_line(run_id: str, output: str) -> tuple[int, int]:
    parts = output.split()
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise RunStartError(
            run_id, f"invalid pid line from the supervisor: {output[:200]!r}"
        )

    return int(parts[0]), int(parts[1])


def _follow_command(handle: SshRunHandle, offset: int) -> str:
    """Build the command that prints the log from ``offset`` until the run ends.

    ``tail --pid`` follows a watcher child of the script instead of the
    supervisor itself, because ``tail`` counts a zombie as alive, and a
    supervisor that nobody reaps at once stays a zombie for a while. The
    watcher treats a zombie, a missing process and a pid reused by another
    process (a different start time) as ended. A supervisor that already
    ended gets a plain copy of the rest of the log.
    """
    # After "set --" on the fields that follow the command name, $1 is the
    # state (field 3 of /proc/PID/stat) and ${20} the start time (field 22).
    start_time = handle.pid_start_time
    script = (
        f'd="$HOME/{handle.remote_dir}"\n'
        "alive() {\n"
        f"  s=$(cat /proc/{handle.pid}/stat 2>/dev/null) || return 1\n"
        "  s=${s##*) }\n"
        "  set -- $s\n"
        f'  [ "$1" != Z ] && [ "$1" != X ] && [ "${{20}}" = "{start_time}" ]\n'
        "}\n"
        "if alive; then\n"
        "  (while alive; do sleep 0.2; done) &\n"
        f'  tail -c +{offset + 1} --pid=$! -s 0.2 -f "$d/output.log"\n'
        "else\n"
        f'  tail -c +{offset + 1} "$d/output.log"\n'
        "fi\n"
    )

    return "sh -c " + shlex.quote(script)


def _status_command(remote_dir: str) -> str:
    script = f'cat "$HOME/{remote_dir}/exit_status" 2>/dev/null || true'

    return "sh -c " + shlex.quote(script)


def _stop_command(remote_dir: str, grace_seconds: int) -> str:
    """Build the command that signals the task's process group and waits.

    The group id is the task's pid, because the supervisor starts it with
    ``setsid``.
    """
    script = (
        f'd="$HOME/{remote_dir}"\n'
        'p=$(cat "$d/task_pid" 2>/dev/null) || exit 0\n'
        '[ -e "$d/exit_status" ] && exit 0\n'
        f"if [ {grace_seconds} -gt 0 ]; then\n"
        '  kill -s TERM -- "-$p" 2>/dev/null || true\n'
        f"  end=$(( $(date +%s) + {grace_seconds} ))\n"
        '  while [ ! -e "$d/exit_status" ] && [ "$(date +%s)" -lt "$end" ]; do\n'
        "    sleep 0.1\n"
        "  done\n"
        "fi\n"
        'if [ ! -e "$d/exit_status" ]; then\n'
        '  kill -s KILL -- "-$p" 2>/dev/null || true\n'
        "fi\n"
    )

    return "sh -c " + shlex.quote(script)
