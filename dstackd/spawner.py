"""Fork server for local runs, and the per-run supervisor processes it forks.

The daemon starts this file once, as ``python -I -S spawner.py`` (``python -m
dstackd.spawner`` works too), and keeps it for its lifetime. Starting a run then
costs two forks and an exec instead of a new Python interpreter. It imports
only the standard library.

Protocol: the daemon writes one JSON object per line on stdin; each asks for
one run::

    {"run_id": "r1", "run_dir": "/var/lib/dstackd/runs/r1",
     "argv": ["/bin/sh", "-e", "-c", "make test"], "env": {"A": "1"},
     "cwd": null, "cpu_ids": [0, 1], "gpu_indices": [0], "uid": 1000, "gid": 1000}

The server forks a supervisor for it and reads the next line. The supervisor
writes the answer, one JSON line, to the server's stdout, which it inherited;
lines are far shorter than ``PIPE_BUF``, so concurrent writers never interleave.
Once started: ``{"run_id": "r1", "pid": 4242, "start_time": 1234567,
"task_pid": 4243}`` (``pid`` is the supervisor's, ``start_time`` its field 22 of
``/proc/<pid>/stat``). On failure before the task was forked: ``{"run_id": "r1",
"error": "..."}``. At start-up the server writes ``{"ready": true, "pid": N}``.
It exits when its stdin closes; the supervisors live on.

A supervisor runs in its own session, so signals aimed at the daemon's process
group or session never reach it, and it is a child subreaper, so orphaned
descendants of the task are reparented to it and can be reaped and killed. It
writes the task's output to ``output.log`` and its exit status to
``exit_status`` in the run directory, then kills what is left of the task's
process tree and exits. Signals it handles: SIGTERM is forwarded to the task's
process group and every other descendant, and SIGUSR1 sends SIGKILL to all of
them.
"""

import ctypes
import errno
import gc
import json
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable

OUTPUT_LOG_FILE = "output.log"
EXIT_STATUS_FILE = "exit_status"

# Signal that makes a supervisor kill the whole task tree at once.
KILL_TREE_SIGNAL = signal.SIGUSR1

# Exit statuses given, like a POSIX shell, when the task cannot be started:
# the command was not found, or it (or its working directory) cannot be used.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126

_PR_SET_CHILD_SUBREAPER = 36

_PATH = "/usr/local/bin:/usr/bin:/bin"
_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Signals whose handler or ignored state must not leak into the task: Python
# ignores SIGPIPE and SIGXFSZ, the server ignores SIGINT and SIGCHLD, and an
# ignored signal stays ignored across exec.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGTERM,
    KILL_TREE_SIGNAL,
)

_MAX_ERROR_CHARS = 1000


# Process inspection, shared with the daemon side


def read_start_time(pid: int) -> int | None:
    """Return field 22 of ``/proc/<pid>/stat`` (start time in clock ticks after
    boot), or None if no such process exists."""
    fields = _read_stat_fields(pid)

    return None if fields is None else int(fields[19])


def is_running(pid: int, start_time: int) -> bool:
    """Return whether ``pid`` is the process that started at ``start_time`` and
    has not exited (a zombie has exited)."""
    fields = _read_stat_fields(pid)
    if fields is None:
        return False

    return fields[0] != b"Z" and int(fields[19]) == start_time


def _read_stat_fields(pid: int | str) -> list[bytes] | None:
    """Return the fields of ``/proc/<pid>/stat`` from field 3 (state) on."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None

    # The command name (field 2) may contain spaces and parentheses, so fields
    # are counted from the last closing parenthesis.
    return data[data.rindex(b")") + 2 :].split()


def descendant_pids(root: int) -> list[int]:
    """List the pids of every living descendant of ``root``, parents first.

    The list is a snapshot of ``/proc``: processes forked after the scan are
    missing, so callers that kill descendants repeat until none are left.
    """
    children: dict[int, list[int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                parent = _read_parent_pid(entry.name)
                if parent is not None:
                    children.setdefault(parent, []).append(int(entry.name))

    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        for child in children.get(pid, ()):
            found.append(child)
            pending.append(child)

    return found


def _read_parent_pid(pid: str) -> int | None:
    try:
        fields = _read_stat_fields(pid)
    except OSError:
        return None

    return None if fields is None else int(fields[1])


def signal_tree(root: int, task_pgid: int, signum: int) -> None:
    """Send ``signum`` to the task's process group and every descendant of
    ``root`` outside that group.

    The group gets it once through ``killpg``. Descendants that left the
    group (``setsid``, ``setpgid``, double forks) get it one by one, so no
    process receives the signal twice. SIGKILL goes to every descendant. A
    ``task_pgid`` of 0 or less skips ``killpg`` and signals every descendant.
    """
    if task_pgid > 0:
        _kill_quietly(os.killpg, task_pgid, signum)

    for pid in descendant_pids(root):
        if signum == signal.SIGKILL or _process_group(pid) != task_pgid:
            _kill_quietly(os.kill, pid, signum)


def kill_descendants(root: int) -> None:
    """Send SIGKILL to every living descendant of ``root``."""
    for pid in descendant_pids(root):
        _kill_quietly(os.kill, pid, signal.SIGKILL)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _kill_quietly(kill: Callable[[int, int], None], target: int, signum: int) -> None:
    try:
        kill(target, signum)
    except (ProcessLookupError, PermissionError):
        pass


# The fork server


def serve() -> None:
    """Read spawn requests from stdin until it closes, forking a supervisor each."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    _warm_up()
    _write_line({"ready": True, "pid": os.getpid()})

    pending = b""
    while chunk := os.read(0, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                _handle_request(line, libc)


def _warm_up() -> None:
    """Do once here what every supervisor would otherwise repeat after fork.

    The first user lookup loads the name service modules, and the cyclic
    garbage collector would touch every object and so copy the server's
    memory page by page in each forked supervisor.
    """
    entry = pwd.getpwuid(os.getuid())
    os.getgrouplist(entry.pw_name, entry.pw_gid)
    gc.disable()
    gc.freeze()


def _handle_request(line: bytes, libc: ctypes.CDLL) -> None:
    try:
        request = json.loads(line)
        run_id = str(request["run_id"])
    except (ValueError, KeyError, TypeError) as exc:
        _write_line({"run_id": None, "error": f"invalid spawn request: {exc!r}"})
        return

    try:
        pid = os.fork()
    except OSError as exc:
        _write_line({"run_id": run_id, "error": f"fork failed: {exc}"})
        return

    if pid == 0:
        _supervisor_main(request, run_id, libc)


def _write_line(message: dict[str, object]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


# The supervisor


def _supervisor_main(
    request: dict[str, object], run_id: str, libc: ctypes.CDLL
) -> None:
    """Supervise one run in a forked child of the server; never returns."""
    code = 1
    try:
        _Supervisor(request, run_id, libc).run()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the child must reach os._exit
        _report_failure(run_id, exc)
    finally:
        os._exit(code)


def _report_failure(run_id: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    try:
        _write_line({"run_id": run_id, "error": message})
    except OSError:
        pass


class _Task:
    """A task's command, user, environment, working directory and CPUs."""

    def __init__(self, request: dict[str, object]) -> None:
        self.argv = [str(arg) for arg in _list(request, "argv")]
        if not self.argv:
            raise ValueError("argv is empty")

        self.cpu_ids = {_int(i) for i in _list(request, "cpu_ids")}
        gpu_indices = [str(_int(i)) for i in _list(request, "gpu_indices")]
        self._resolve_user(_optional_int(request, "uid"), _optional_int(request, "gid"))

        # Without a working directory the task starts in the user's home, or
        # in / for users whose home does not exist (Debian's nobody has
        # /nonexistent).
        cwd = request.get("cwd")
        if cwd is not None:
            self.cwd = os.path.join(self.home, str(cwd))
        elif os.path.isdir(self.home):
            self.cwd = self.home
        else:
            self.cwd = "/"

        env = {
            "PATH": _ROOT_PATH if self.uid == 0 else _PATH,
            "HOME": self.home,
            "USER": self.user,
            "LOGNAME": self.user,
            "LANG": "C.UTF-8",
        }
        user_env = request.get("env") or {}
        if not isinstance(user_env, dict):
            raise ValueError(f"env must be an object, got {user_env!r}")

        env.update({str(k): str(v) for k, v in user_env.items()})
        # Set last, so the run's environment cannot widen its GPUs. In PCI bus
        # order CUDA numbers devices as the local backend's GPU detection does.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_indices)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        self.env = env

    def _resolve_user(self, uid: int | None, gid: int | None) -> None:
        # Only root may run a task as someone else. Any other daemon runs tasks
        # as its own user, whatever uid the request contains.
        self.switch_user = os.geteuid() == 0 and uid is not None and uid != 0
        self.uid = uid if self.switch_user and uid is not None else os.getuid()
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(self.uid)
        except KeyError:
            entry = None

        if not self.switch_user:
            self.gid = os.getgid()
        elif gid is not None:
            self.gid = gid
        else:
            self.gid = entry.pw_gid if entry is not None else self.uid

        if entry is None:
            self.user = str(self.uid)
            self.home = "/"
            self.groups = [self.gid]
        else:
            self.user = entry.pw_name
            self.home = entry.pw_dir
            self.groups = os.getgrouplist(entry.pw_name, self.gid)


def _list(request: dict[str, object], key: str) -> list[object]:
    value = request.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, got {value!r}")

    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")

    return value


def _optional_int(request: dict[str, object], key: str) -> int | None:
    value = request.get(key)

    return None if value is None else _int(value)


class _Supervisor:
    def __init__(
        self, request: dict[str, object], run_id: str, libc: ctypes.CDLL
    ) -> None:
        self.request = request
        self.run_id = run_id
        self.run_dir = str(request["run_dir"])
        self.libc = libc
        # The task's pid, which is also its process group id, until the task
        # is reaped. It is 0 after that, because the id may then be reused.
        self.task_pgid = 0

    def run(self) -> None:
        # Step 1: leave the server's session and adopt orphaned descendants.
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")

        # Step 2: prepare everything that can fail before a task exists.
        task = _Task(self.request)
        log_path = os.path.join(self.run_dir, OUTPUT_LOG_FILE)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        _remove_if_present(os.path.join(self.run_dir, EXIT_STATUS_FILE))

        # Step 3: start the task; handlers go in before anyone learns our pid.
        task_pid = _fork_task(task, log_fd)
        self.task_pgid = task_pid
        signal.signal(signal.SIGTERM, self._forward_terminate)
        signal.signal(KILL_TREE_SIGNAL, self._kill_tree)

        # Step 4: reply to the daemon, then close the server's pipes.
        pid = os.getpid()
        _write_line(
            {
                "run_id": self.run_id,
                "pid": pid,
                "start_time": read_start_time(pid),
                "task_pid": task_pid,
            }
        )
        _detach_stdio(log_fd)

        # Step 5: wait for the task, record how it ended, clean up after it.
        status = _wait_for_child(task_pid)
        self.task_pgid = 0
        try:
            write_exit_status(self.run_dir, status)
        finally:
            self._kill_leftovers()

    def _forward_terminate(self, signum: int, frame: object) -> None:
        signal_tree(os.getpid(), self.task_pgid, signal.SIGTERM)

    def _kill_tree(self, signum: int, frame: object) -> None:
        signal_tree(os.getpid(), self.task_pgid, signal.SIGKILL)

    def _kill_leftovers(self) -> None:
        """SIGKILL and reap descendants until the supervisor has no children.

        Killing a process reparents its children here (the supervisor is a
        subreaper), so each round catches what the previous one orphaned.
        """
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return

            if pid == 0:
                kill_descendants(os.getpid())
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return


def _fork_task(task: _Task, log_fd: int) -> int:
    """Fork the task and return its pid once it called exec or gave up.

    The child keeps the write end of a close-on-exec pipe open, so end of file
    on the read end means that exec replaced the child or that the child exited.
    """
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        _exec_task(task, log_fd)

    os.close(ready_write)
    # The child joins its own group too; both calls close the race between them.
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass

    os.read(ready_read, 1)
    os.close(ready_read)

    return pid


def _exec_task(task: _Task, log_fd: int) -> None:
    """Turn the forked child into the task; never returns."""
    code = EXIT_CANNOT_EXECUTE
    try:
        os.setpgid(0, 0)
        for signum in _RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.close(null_fd)
        _apply_affinity(task.cpu_ids)
        if task.switch_user:
            os.setgroups(task.groups)
            os.setgid(task.gid)
            os.setuid(task.uid)

        if _enter_working_dir(task.cwd):
            code = _exec(task.argv, task.env)
    except BaseException as exc:  # noqa: BLE001 - the child must reach os._exit
        _write_task_error(f"cannot start the task: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)


def _apply_affinity(cpu_ids: set[int]) -> None:
    # Ids this machine does not have (an inventory may declare more CPUs than
    # exist) are dropped. If none is left, the task keeps the inherited set.
    usable = cpu_ids & os.sched_getaffinity(0)
    if usable:
        os.sched_setaffinity(0, usable)


def _enter_working_dir(cwd: str) -> bool:
    try:
        os.chdir(cwd)
    except OSError as exc:
        _write_task_error(f"cannot enter working directory {cwd}: {exc.strerror}")
        return False

    return True


def _exec(argv: list[str], env: dict[str, str]) -> int:
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            _write_task_error(f"{argv[0]}: command not found")
            return EXIT_NOT_FOUND

        _write_task_error(f"{argv[0]}: cannot execute: {exc.strerror}")

    return EXIT_CANNOT_EXECUTE


def _write_task_error(message: str) -> None:
    try:
        os.write(2, f"dstackd: {message}\n".encode())
    except OSError:
        pass


def _detach_stdio(log_fd: int) -> None:
    """Drop the server's pipes: stdin and stdout to /dev/null, stderr to the log.

    The daemon gets end of file on the server's stdout only once every process
    that has it open closed it, supervisors included.
    """
    null_fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(null_fd, 0)
    os.dup2(null_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def _wait_for_child(task_pid: int) -> int:
    """Reap children until the task is among them; return its wait status.

    Orphans adopted on the way are reaped too, so none stays a zombie.
    """
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == task_pid:
            return status


# The exit status file


def exit_status_from_wait_status(status: int) -> int:
    """Convert a wait status to a shell-style exit status: 128 + n for signal n."""
    code = os.waitstatus_to_exitcode(status)

    return 128 - code if code < 0 else code


def write_exit_status(run_dir: str, wait_status: int) -> None:
    """Write ``exit_status`` atomically and durably.

    The JSON goes to a temporary file that is fsynced and renamed over the
    final name, and then the directory is fsynced, so a reader sees either no
    file or the whole file, also after a power loss.
    """
    exit_status = exit_status_from_wait_status(wait_status)
    signum = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
    record = {"exit_status": exit_status, "signal": signum, "ended_at": time.time()}
    path = os.path.join(run_dir, EXIT_STATUS_FILE)
    temporary = path + ".tmp"

    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(record).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)

    os.rename(temporary, path)
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    serve()
    sys.exit(0)
