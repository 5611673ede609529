"""Single-instance lock files of the daemon, and removal of its stale socket.

A daemon holds two ``flock`` locks while it runs: ``dstackd.lock`` in its data
directory and ``<socket>.lock`` next to its socket. So two daemons can share
neither a data directory nor a socket. Each lock file contains the pid of its
holder, for the error message a second daemon prints. The kernel drops a flock
lock when the last descriptor of its open file closes, which includes the
holder being killed with SIGKILL, so a stale lock file never blocks a restart.
"""

import errno
import fcntl
import os
import stat
from types import TracebackType

from events.errors import DstackdError


class AlreadyRunningError(DstackdError):
    """Another process holds a lock this daemon needs."""

    def __init__(self, lock_file: str, pid: int | None) -> None:
        self.lock_file = lock_file
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process with unknown pid"
        super().__init__(
            f"another dstackd ({holder}) holds the lock {lock_file}: stop it, or "
            "start this one with a different --data-dir and DSTACKD_SOCKET"
        )


class LockFailedError(DstackdError):
    """A lock file could not be opened or locked for a reason other than a holder."""

    def __init__(self, lock_file: str, reason: str) -> None:
        self.lock_file = lock_file
        super().__init__(f"cannot lock {lock_file}: {reason}")


class NotASocketError(DstackdError):
    """The socket path exists but is not a socket, so it is left in place."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path} exists and is not a socket: remove it, or set DSTACKD_SOCKET "
            "to another path"
        )


class LockHandle:
    """Held locks; ``release`` or leaving the ``with`` block drops them.

    The lock files stay on disk after release. Deleting one could let a
    process that opened it just before the deletion hold a lock on a file that
    no one else can find anymore.
    """

    def __init__(self, paths: tuple[str, ...], fds: tuple[int, ...]) -> None:
        self.paths = paths
        self._fds = fds

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        """Drop every lock; calling it again does nothing."""
        fds, self._fds = self._fds, ()
        for fd in fds:
            os.close(fd)

    def remove_stale_socket(self, socket_path: str) -> bool:
        """Delete a socket file left by a killed daemon; return whether one existed.

        Call this only for a socket the daemon binds itself, never for one
        systemd passed in by socket activation.

        Raises:
            RuntimeError: the locks are no longer held.
            NotASocketError: something other than a socket is at the path.
        """
        if not self.held:
            raise RuntimeError("remove_stale_socket needs the locks held")

        try:
            info = os.lstat(socket_path)
        except FileNotFoundError:
            return False

        if not stat.S_ISSOCK(info.st_mode):
            raise NotASocketError(socket_path)

        os.unlink(socket_path)

        return True

    def __enter__(self) -> "LockHandle":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def acquire_lock(path: str, socket_path: str | None = None) -> LockHandle:
    """Lock ``path`` and, with ``socket_path``, the file ``<socket_path>.lock``.

    Neither call blocks. The data directory lock is taken first, so two
    daemons racing for the same paths fail on the same file.

    Raises:
        AlreadyRunningError: another process holds one of the locks. Any lock
            taken by this call is released again.
        LockFailedError: a lock file cannot be opened, e.g. for lack of
            permission.
    """
    lock_files = [path]
    if socket_path is not None:
        lock_files.append(socket_path + ".lock")

    fds: list[int] = []
    try:
        for lock_file in lock_files:
            fds.append(_lock_file(lock_file))
    except BaseException:
        for fd in fds:
            os.close(fd)

        raise

    return LockHandle(tuple(lock_files), tuple(fds))


def read_lock_pid(path: str) -> int | None:
    """Return the pid recorded in a lock file, or None if it has none yet."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(32).strip()
    except OSError:
        return None

    return int(text) if text.isdigit() else None


def _lock_file(path: str) -> int:
    # O_CLOEXEC keeps the descriptor, and with it the lock, out of the run
    # processes the daemon starts, which could otherwise outlive it and hold
    # the lock.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockFailedError(path, exc.strerror or str(exc)) from exc

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunningError(path, read_lock_pid(path)) from None

        raise LockFailedError(path, exc.strerror or str(exc)) from exc

    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise LockFailedError(path, exc.strerror or str(exc)) from exc

    return fd
