"""Fork server for local runs, and the per-run supervisor processes it forks.

The daemon starts this file once, as ``python -I -S spawner.py`` (``python -m
dstackd.spawner`` works too), and keeps it for its lifetime. Starting a run then
costs a fork of this small process and a spawn of the task, instead of a new
Python interpreter. It imports only the standard library.

Protocol: the daemon writes one JSON object per line on stdin, each a request
for one run::

    {"run_id": "r1", "run_dir": "/var/lib/dstackd/runs/r1",
     "argv": ["/bin/sh", "-e", "-c", "make test"], "env": {"A": "1"},
     "cwd": null, "cpu_ids": [0, 1], "gpu_indices": [0], "uid": 1000, "gid": 1000}

The server forks a supervisor for it and reads the next line. The supervisor
writes the reply, one JSON line, to the server's stdout, which it inherited.
Lines are far shorter than ``PIPE_BUF``, so concurrent writers never interleave.
Once the task called exec: ``{"run_id": "r1", "pid": 4242, "start_time":
1234567, "task_pid": 4243}`` (``pid`` is the supervisor's, ``start_time`` its
field 22 of ``/proc/<pid>/stat``). A task that cannot be executed gets the same
reply with ``task_pid`` 0, and its run ends at once with status 127 or 126. On
a failure before that (an unusable run directory or request): ``{"run_id":
"r1", "error": "..."}``. At start-up the server writes ``{"ready": true, "pid":
N}``. It exits when its stdin closes, and the supervisors live on.

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
import subprocess
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
        # Kept referenced so that Popen.__del__ never runs: it would reap the
        # task behind the supervisor's back.
        self.task_process: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        # Step 1: leave the server's session and adopt orphaned descendants.
        os.setsid()
        _reset_ignored_signals()
        if self.libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")

        # Step 2: prepare everything that can fail before a task exists.
        task = _Task(self.request)
        log_path = os.path.join(self.run_dir, OUTPUT_LOG_FILE)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        _remove_if_present(os.path.join(self.run_dir, EXIT_STATUS_FILE))
        _apply_affinity(task.cpu_ids)

        # Step 3: start the task; handlers go in before anyone learns our pid.
        start_failure = self._start_task(task, log_fd)
        signal.signal(signal.SIGTERM, self._forward_terminate)
        signal.signal(KILL_TREE_SIGNAL, self._kill_tree)

        # Step 4: reply to the daemon, then close the server's pipes.
        pid = os.getpid()
        _write_line(
            {
                "run_id": self.run_id,
                "pid": pid,
                "start_time": read_start_time(pid),
                "task_pid": self.task_pgid,
            }
        )
        _detach_stdio(log_fd)

        # Step 5: wait for the task, record how it ended, clean up after it.
        if start_failure is not None:
            write_exit_status(self.run_dir, start_failure)
            return

        wait_status = _wait_for_child(self.task_pgid)
        self.task_pgid = 0
        try:
            write_exit_status(self.run_dir, *_decode_wait_status(wait_status))
        finally:
            self._kill_leftovers()

    def _start_task(self, task: _Task, log_fd: int) -> int | None:
        """Start the task and return None, or log why it could not be executed
        and return the shell's exit status for that."""
        try:
            self.task_process = _spawn(task, log_fd)
        except OSError as exc:
            return _report_exec_failure(task, exc, log_fd)

        self.task_pgid = self.task_process.pid

        return None

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


def _reset_ignored_signals() -> None:
    """Restore the default action of every ignored signal but SIGPIPE and SIGXFSZ.

    An ignored signal stays ignored across exec, and the task must not inherit
    what the daemon or the server ignore (the server ignores SIGINT and
    SIGCHLD). SIGPIPE stays ignored here, so a write to a daemon that is gone
    fails instead of killing the supervisor. Popen restores SIGPIPE and SIGXFSZ
    for the task.
    """
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ):
            continue

        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


def _apply_affinity(cpu_ids: set[int]) -> None:
    """Restrict the supervisor, and so the task it starts, to ``cpu_ids``.

    Ids this machine does not have (an inventory may declare more CPUs than
    exist) are dropped. If none is left, the inherited set stays.
    """
    usable = cpu_ids & os.sched_getaffinity(0)
    if usable:
        os.sched_setaffinity(0, usable)


def _spawn(task: _Task, log_fd: int) -> "subprocess.Popen[bytes]":
    """Start the task in its own process group; return once it called exec.

    Popen uses vfork when no user switch is needed. Measured with
    bench/run_start.py on a 2-core VM, that cut the median start of ``true``
    from 4.3 to 2.5 ms compared with forking this Python process. With a user
    switch Popen forks, and a start took about 3 ms either way.
    """
    switch = task.switch_user

    return subprocess.Popen(
        task.argv,
        cwd=task.cwd,
        env=task.env,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
        process_group=0,
        user=task.uid if switch else None,
        group=task.gid if switch else None,
        extra_groups=task.groups if switch else None,
    )


def _report_exec_failure(task: _Task, exc: OSError, log_fd: int) -> int:
    """Write why the task could not start to its log; return 127 or 126."""
    # NOTE: Popen attributes every failure before exec to the working
    # directory, so a failed user switch is reported as one too.
    if exc.filename == task.cwd:
        message = f"cannot enter working directory {task.cwd}: {exc.strerror}"
        status = EXIT_CANNOT_EXECUTE
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        message = f"{task.argv[0]}: command not found"
        status = EXIT_NOT_FOUND
    else:
        message = f"{task.argv[0]}: cannot execute: {exc.strerror}"
        status = EXIT_CANNOT_EXECUTE

    try:
        os.write(log_fd, f"dstackd: {message}\n".encode())
    except OSError:
        pass

    return status


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


def _decode_wait_status(wait_status: int) -> tuple[int, int | None]:
    """Return the shell-style exit status (128 + n for signal n) and the
    signal number, or None if the process exited."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return 128 - code, -code

    return code, None


def write_exit_status(
    run_dir: str, exit_status: int, signum: int | None = None
) -> None:
    """Write ``exit_status`` atomically and durably.

    The JSON goes to a temporary file that is fsynced and renamed over the
    final name, and then the directory is fsynced, so a reader sees either no
    file or the whole file, also after a power loss.
    """
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
