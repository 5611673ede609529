"""The daemon's side of local runs: starting them through the fork server,
waiting for them, stopping them and adopting them again after a restart.

``LocalRunner`` owns one fork server process (``dstackd.spawner``). Each run is
owned by its supervisor process, which outlives the daemon and the fork server.
The daemon identifies a supervisor by pid and start time (recorded in
``RunStarted``) and waits for it through a pidfd, which works for processes
that are not the daemon's children. The supervisor writes ``output.log`` and
``exit_status`` in the run directory, and the daemon writes ``env.json`` there.
"""

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType

import anyio
import anyio.abc
import msgspec
import structlog

from dstackd import spawner
from dstackd.spawner import (
    EXIT_STATUS_FILE,
    KILL_TREE_SIGNAL,
    OUTPUT_LOG_FILE,
    is_running,
    kill_descendants,
    read_start_time,
)
from events.errors import DstackdError, InvalidValueError

log = structlog.get_logger(__name__)

# Bound on one round trip to the fork server. A start normally takes a few
# milliseconds; user lookups through a slow name service can take longer.
START_TIMEOUT_SECONDS = 30.0

# How long a supervisor may take to exit after receiving the kill signal
# before the daemon kills the tree itself.
KILL_TIMEOUT_SECONDS = 5.0

# How long the fork server may take to exit once its stdin is closed before it
# is killed. Killing it does not affect runs, which belong to supervisors.
SPAWNER_EXIT_TIMEOUT_SECONDS = 5.0


class RunStartError(DstackdError):
    """The fork server or the supervisor could not start a run."""

    def __init__(self, run_id: str, reason: str) -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"run {run_id} could not start: {reason}")


class RunLostError(DstackdError):
    """A run's supervisor ended without recording the run's exit status."""

    def __init__(self, run_id: str, reason: str) -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"run {run_id} was lost: {reason}")


class SpawnerError(DstackdError):
    """The fork server failed to start, exited, or sent an invalid reply."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the run fork server failed: {reason}")


class _SpawnerExited(Exception):
    """End of file on the fork server's stdout: it exited."""


class RunLaunch(msgspec.Struct, frozen=True, kw_only=True):
    """A run's command, environment, working directory, devices and user.

    Exactly one of ``argv`` (executed directly, with PATH lookup) and
    ``commands`` (shell lines run by ``/bin/sh -e``, so the first failing line
    ends the run) is non-empty. ``env`` goes on top of a minimal environment
    (PATH, HOME, USER, LOGNAME, LANG) of the user the run executes as, so the
    daemon can pass the caller's PATH and LANG here. ``working_dir`` defaults to
    that user's home (``/`` if it does not exist); a relative one is taken from
    the home.

    ``cpu_ids`` become the task's CPU affinity, less ids this machine does not
    have; with none left (or none given) the task keeps the daemon's affinity.
    ``gpu_indices`` become ``CUDA_VISIBLE_DEVICES``, empty for none, so CUDA
    finds no device in a run without GPUs.

    ``uid`` and ``gid`` apply only when the daemon runs as root, and
    ``uid=None`` runs as the daemon's user. A daemon that is not root runs
    every task as its own user. ``gid=None`` takes the user's primary group.

    ``backend_data`` is the instance's, from which a remote runner reads the
    host to reach; the local runner ignores it.
    """

    run_id: str
    argv: Sequence[str] = ()
    commands: Sequence[str] = ()
    env: Mapping[str, str] = {}
    working_dir: str | None = None
    cpu_ids: Sequence[int] = ()
    gpu_indices: Sequence[int] = ()
    uid: int | None = None
    gid: int | None = None
    run_dir: str
    backend_data: Mapping[str, str] = {}


class RunHandle(msgspec.Struct, frozen=True):
    """A started run: its supervisor's pid and start time, and its files."""

    run_id: str
    pid: int
    pid_start_time: int
    log_path: str
    run_dir: str
    task_pgid: int = 0


class _SpawnReply(msgspec.Struct, frozen=True):
    """A line from the fork server: a start, a failure, or the ready line."""

    run_id: str | None = None
    pid: int = 0
    start_time: int | None = None
    task_pid: int = 0
    error: str | None = None


def read_exit_status(run_dir: str) -> int | None:
    """Return the exit status a supervisor recorded, or None if there is none.

    Statuses follow the shell: the exit code, or 128 + n for signal n.
    """
    path = os.path.join(run_dir, EXIT_STATUS_FILE)
    try:
        with open(path, "rb") as status_file:
            data = status_file.read()
    except FileNotFoundError:
        return None

    try:
        return int(json.loads(data)["exit_status"])
    except (ValueError, KeyError, TypeError) as exc:
        log.error("exit_status_unreadable", path=path, error=repr(exc))
        return None


def shell_argv(commands: Sequence[str]) -> list[str]:
    """Build the argv that runs shell lines one after the other, stopping at
    the first that fails."""
    return ["/bin/sh", "-e", "-c", "\n".join(commands)]


class LocalRunner:
    """Starts, waits for, stops and adopts runs on this machine.

    Create it with ``await LocalRunner.start_spawner()`` and close it with
    ``aclose()`` (or use it as an async context manager). Closing stops only
    the fork server: runs keep going and can be adopted by another runner.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._process: anyio.abc.Process | None = None
        self._pending = b""
        self._lock = anyio.Lock()
        self._reply_decoder = msgspec.json.Decoder(_SpawnReply)

    @classmethod
    async def start_spawner(cls, python: str = sys.executable) -> "LocalRunner":
        """Start the fork server and return a runner that uses it."""
        runner = cls(python)
        async with runner._lock:
            await runner._start_spawner_locked()

        return runner

    @property
    def spawner_pid(self) -> int | None:
        """The fork server's pid, or None when none is running."""
        return None if self._process is None else self._process.pid

    async def aclose(self) -> None:
        """Stop the fork server by closing its stdin; runs are not touched."""
        async with self._lock:
            await self._close_spawner_locked()

    async def __aenter__(self) -> "LocalRunner":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self, launch: RunLaunch) -> RunHandle:
        """Start a run and return once its task called exec.

        A task that cannot be executed (command not found, bad working
        directory) still starts: its log contains the reason, and it ends with
        127 or 126.

        Raises:
            InvalidValueError: ``argv`` and ``commands`` are both set or both
                empty.
            RunStartError: the run directory or the user is unusable, or the
                fork server failed or timed out.
        """
        request = _spawn_request(launch)
        try:
            os.makedirs(launch.run_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise RunStartError(
                launch.run_id, f"cannot create run directory {launch.run_dir}: {exc}"
            ) from exc

        try:
            with anyio.fail_after(START_TIMEOUT_SECONDS):
                reply = await self._round_trip(launch.run_id, request)
        except TimeoutError:
            # NOTE: the supervisor may still start the task after this, and
            # the daemon never learns its pid: its late reply is discarded.
            raise RunStartError(
                launch.run_id,
                f"no reply from the fork server within {START_TIMEOUT_SECONDS:g}s",
            ) from None
        except SpawnerError as exc:
            raise RunStartError(launch.run_id, exc.reason) from exc

        if reply.error is not None or reply.start_time is None:
            raise RunStartError(
                launch.run_id, reply.error or "the fork server's reply has no pid"
            )

        log.debug(
            "run_process_started",
            run_id=launch.run_id,
            supervisor_pid=reply.pid,
            task_pid=reply.task_pid,
        )

        return RunHandle(
            run_id=launch.run_id,
            pid=reply.pid,
            pid_start_time=reply.start_time,
            task_pgid=reply.task_pid,
            log_path=os.path.join(launch.run_dir, OUTPUT_LOG_FILE),
            run_dir=launch.run_dir,
        )

    async def wait(self, handle: RunHandle) -> int:
        """Wait until the run's supervisor exited and return the exit status.

        Raises:
            RunLostError: the supervisor is gone and wrote no exit status.
        """
        pidfd = _open_pidfd(handle)
        if pidfd is not None:
            try:
                await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)

        status = read_exit_status(handle.run_dir)
        if status is None:
            _kill_orphaned_task(handle)
            raise RunLostError(
                handle.run_id,
                f"supervisor process {handle.pid} exited without writing "
                f"{os.path.join(handle.run_dir, EXIT_STATUS_FILE)}",
            )

        return status

    def adopt(
        self,
        run_id: str,
        pid: int,
        pid_start_time: int,
        run_dir: str,
        backend_data: Mapping[str, str] | None = None,
    ) -> RunHandle | None:
        """Return a handle for a run started before a restart, or None if its
        supervisor is no longer alive (then ``read_exit_status`` returns the
        run's exit status). ``backend_data`` is ignored on this machine."""
        if not is_running(pid, pid_start_time):
            return None

        return RunHandle(
            run_id=run_id,
            pid=pid,
            pid_start_time=pid_start_time,
            log_path=os.path.join(run_dir, OUTPUT_LOG_FILE),
            run_dir=run_dir,
            task_pgid=_find_task_group(pid),
        )

    async def stop(
        self, handle: RunHandle, *, grace_seconds: float = 10, abort: bool = False
    ) -> None:
        """Stop the run's whole process tree; return when its supervisor exited.

        SIGTERM goes to the task's process group and every descendant, then
        SIGKILL after ``grace_seconds`` (at once with ``abort``). If the
        supervisor does not exit within ``KILL_TIMEOUT_SECONDS`` of that, the
        daemon kills the tree and the supervisor itself. The run then has no
        exit status, so ``wait`` raises ``RunLostError``.
        """
        pidfd = _open_pidfd(handle)
        if pidfd is None:
            return

        try:
            await self._stop_with_pidfd(handle, pidfd, grace_seconds, abort)
        finally:
            os.close(pidfd)

    async def _stop_with_pidfd(
        self, handle: RunHandle, pidfd: int, grace_seconds: float, abort: bool
    ) -> None:
        if not abort:
            if not _send_signal(pidfd, signal.SIGTERM):
                return

            with anyio.move_on_after(grace_seconds):
                await anyio.wait_readable(pidfd)
                return

            log.info(
                "run_stop_escalated", run_id=handle.run_id, grace_seconds=grace_seconds
            )

        if not _send_signal(pidfd, KILL_TREE_SIGNAL):
            return

        with anyio.move_on_after(KILL_TIMEOUT_SECONDS):
            await anyio.wait_readable(pidfd)
            return

        log.error(
            "run_supervisor_unresponsive",
            run_id=handle.run_id,
            supervisor_pid=handle.pid,
            timeout_seconds=KILL_TIMEOUT_SECONDS,
        )
        _kill_tree_directly(handle.pid, pidfd)
        with anyio.fail_after(KILL_TIMEOUT_SECONDS):
            await anyio.wait_readable(pidfd)

    # The fork server

    async def _round_trip(self, run_id: str, request: bytes) -> _SpawnReply:
        async with self._lock:
            await self._send_locked(request)
            try:
                return await self._read_reply_locked(run_id)
            except _SpawnerExited:
                pass

            # A supervisor keeps the server's stdout open until it replied, so
            # end of file without a reply means the server died before forking
            # one, and sending the request again is safe.
            # NOTE: a supervisor killed between starting the task and replying
            # also ends in end of file; its task then runs twice.
            await self._send_locked(request)
            try:
                return await self._read_reply_locked(run_id)
            except _SpawnerExited as exc:
                raise SpawnerError("it exited twice without a reply") from exc

    async def _read_reply_locked(self, run_id: str) -> _SpawnReply:
        while True:
            reply = self._decode_reply(await self._read_line_locked())
            if reply.run_id == run_id:
                return reply

            log.warning(
                "spawner_reply_discarded", run_id=reply.run_id, error=reply.error
            )

    def _decode_reply(self, line: bytes) -> _SpawnReply:
        try:
            return self._reply_decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise SpawnerError(f"invalid reply {line[:200]!r}: {exc}") from exc

    async def _send_locked(self, request: bytes) -> None:
        # A request that could not be written forked nothing, so it is safe to
        # send it again to a fresh fork server.
        if self._process is None or self._process.returncode is not None:
            await self._restart_spawner_locked("not running")

        try:
            await self._stdin.send(request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            await self._restart_spawner_locked(repr(exc))
            await self._stdin.send(request)

    async def _read_line_locked(self) -> bytes:
        while b"\n" not in self._pending:
            try:
                chunk = await self._stdout.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                # The next request starts a new fork server.
                await self._close_spawner_locked()
                raise _SpawnerExited from exc

            self._pending += chunk

        line, _, self._pending = self._pending.partition(b"\n")

        return line

    async def _start_spawner_locked(self) -> None:
        # Run by path, isolated and without site: the fork server imports only
        # the standard library, so it needs no sys.path entries, PYTHON*
        # variables or site-packages.
        self._process = await anyio.open_process(
            [self._python, "-I", "-S", spawner.__file__], stderr=None
        )
        self._pending = b""
        try:
            with anyio.fail_after(START_TIMEOUT_SECONDS):
                ready = self._decode_reply(await self._read_line_locked())
        except _SpawnerExited as exc:
            raise SpawnerError("it exited before it was ready") from exc

        log.info("spawner_started", pid=ready.pid)

    async def _restart_spawner_locked(self, reason: str) -> None:
        log.warning("spawner_restarted", reason=reason)
        await self._close_spawner_locked()
        await self._start_spawner_locked()

    async def _close_spawner_locked(self) -> None:
        process = self._process
        if process is None:
            return

        self._process = None
        # On timeout, aclose kills the process and waits for it.
        with anyio.move_on_after(SPAWNER_EXIT_TIMEOUT_SECONDS) as scope:
            await process.aclose()

        if scope.cancelled_caught:
            log.warning(
                "spawner_killed",
                pid=process.pid,
                timeout_seconds=SPAWNER_EXIT_TIMEOUT_SECONDS,
            )

        log.info("spawner_exited", pid=process.pid, returncode=process.returncode)

    @property
    def _stdin(self) -> anyio.abc.ByteSendStream:
        assert self._process is not None and self._process.stdin is not None
        return self._process.stdin

    @property
    def _stdout(self) -> anyio.abc.ByteReceiveStream:
        assert self._process is not None and self._process.stdout is not None
        return self._process.stdout


def _spawn_request(launch: RunLaunch) -> bytes:
    if bool(launch.argv) == bool(launch.commands):
        raise InvalidValueError(
            "argv and commands",
            {"argv": launch.argv, "commands": launch.commands},
            "exactly one of them non-empty",
        )

    argv = list(launch.argv) if launch.argv else shell_argv(launch.commands)
    request = {
        "run_id": launch.run_id,
        "run_dir": launch.run_dir,
        "argv": argv,
        "env": dict(launch.env),
        "cwd": launch.working_dir,
        "cpu_ids": list(launch.cpu_ids),
        "gpu_indices": list(launch.gpu_indices),
        "uid": launch.uid,
        "gid": launch.gid,
    }

    return msgspec.json.encode(request) + b"\n"


def _find_task_group(supervisor_pid: int) -> int:
    """Return the task's process group: the supervisor's child that leads one."""
    for pid in spawner.descendant_pids(supervisor_pid):
        try:
            if os.getpgid(pid) == pid:
                return pid
        except ProcessLookupError:
            continue

    return 0


def _kill_orphaned_task(handle: RunHandle) -> None:
    """Kill the task group of a supervisor that died, so the run stops with it.

    The group is killed only if its leader started after the supervisor, so a
    group id reused by an unrelated process is left alone.
    NOTE: descendants that left the task's group are not found here, since
    the dead supervisor was the one that tracked them.
    """
    pgid = handle.task_pgid
    if pgid <= 0:
        return

    started = read_start_time(pgid)
    if started is None or started < handle.pid_start_time:
        return

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return

    log.warning("orphaned_task_killed", run_id=handle.run_id, pgid=pgid)


def _open_pidfd(handle: RunHandle) -> int | None:
    """Open a pidfd for the run's supervisor, or return None if it is gone.

    The start time is checked after opening, so the pidfd cannot refer to an
    unrelated process that reused the pid.
    """
    try:
        pidfd = os.pidfd_open(handle.pid)
    except ProcessLookupError:
        return None

    if read_start_time(handle.pid) != handle.pid_start_time:
        os.close(pidfd)
        return None

    return pidfd


def _send_signal(pidfd: int, signum: int) -> bool:
    """Signal through the pidfd; return False if the process already exited."""
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False

    return True


def _kill_tree_directly(supervisor_pid: int, pidfd: int) -> None:
    # NOTE: a process forked between the scan and the supervisor's death is
    # reparented to init and survives; only a live supervisor closes that gap.
    kill_descendants(supervisor_pid)
    _send_signal(pidfd, signal.SIGKILL)
