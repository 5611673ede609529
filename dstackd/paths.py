"""Default locations of the daemon's data directory, socket, log and lock files.

``resolve_paths`` only computes paths and checks their form. ``ensure_dirs``
creates the directories and checks the ownership of the shared fallback socket
directory. Only the daemon calls ``ensure_dirs``. dstackctl reads the same
defaults to find the socket.

Defaults:

- As root: data in ``/var/lib/dstackd``, socket ``/run/dstackd/dstackd.sock``.
- Otherwise: data in ``$XDG_STATE_HOME/dstackd`` (``~/.local/state/dstackd``
  when unset), socket ``$XDG_RUNTIME_DIR/dstackd.sock``, or
  ``/tmp/dstackd-<uid>/dstackd.sock`` when ``XDG_RUNTIME_DIR`` is unset.
- ``--data-dir`` (the ``data_dir`` argument) and ``DSTACKD_SOCKET`` (or the
  ``socket`` argument, which wins over it) override these.
"""

import os
import pwd
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from events.errors import DstackdError

SYSTEM_DATA_DIR = "/var/lib/dstackd"
SYSTEM_SOCKET = "/run/dstackd/dstackd.sock"
SOCKET_NAME = "dstackd.sock"
SOCKET_ENV = "DSTACKD_SOCKET"

# On Linux, sockaddr_un.sun_path is 108 bytes, and bind() needs one of them for
# the terminating NUL byte.
MAX_SOCKET_PATH_BYTES = 107


class SocketPathTooLongError(DstackdError, ValueError):
    """A socket path does not fit in an AF_UNIX address."""

    def __init__(self, path: str, length: int) -> None:
        self.path = path
        self.length = length
        super().__init__(
            f"socket path {path} is {length} bytes long, more than the "
            f"{MAX_SOCKET_PATH_BYTES} bytes an AF_UNIX address can contain: "
            f"set {SOCKET_ENV} to a shorter path"
        )


class UnsafeDirectoryError(DstackdError):
    """A directory that must be private to the daemon's user is not."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"directory {path} {problem}: {fix}")


@dataclass(frozen=True)
class Paths:
    """Where one daemon keeps its files.

    ``socket_dir_private`` is true for the ``/tmp`` fallback socket directory.
    Because that directory sits in a world-writable parent, another user could
    create it first, so ``ensure_dirs`` checks who owns it.
    """

    data_dir: str
    socket: str
    log_db: str
    runs_dir: str
    lock_file: str
    socket_dir_private: bool = False

    @property
    def socket_dir(self) -> str:
        return os.path.dirname(self.socket)

    @property
    def socket_lock_file(self) -> str:
        """Lock file next to the socket, so two daemons never share one socket."""
        return self.socket + ".lock"


def resolve_paths(
    data_dir: str | None,
    socket: str | None,
    env: Mapping[str, str] = os.environ,
    uid: int | None = None,
) -> Paths:
    """Compute the daemon's paths for ``uid`` (the effective uid by default).

    Reads only ``env`` and, when ``HOME`` is unset, the password database.
    Relative paths are made absolute against the current directory.

    Raises:
        SocketPathTooLongError: the socket path does not fit in an AF_UNIX
            address.
    """
    if uid is None:
        uid = os.geteuid()

    if data_dir is None:
        data_dir = _default_data_dir(env, uid)

    socket_dir_private = False
    if socket is None:
        socket = env.get(SOCKET_ENV) or None

    if socket is None:
        socket, socket_dir_private = _default_socket(env, uid)

    data_dir = os.path.abspath(data_dir)
    socket = os.path.abspath(socket)
    check_socket_path(socket)

    return Paths(
        data_dir=data_dir,
        socket=socket,
        log_db=os.path.join(data_dir, "events.db"),
        runs_dir=os.path.join(data_dir, "runs"),
        lock_file=os.path.join(data_dir, "dstackd.lock"),
        socket_dir_private=socket_dir_private,
    )


def check_socket_path(path: str) -> None:
    """Raise ``SocketPathTooLongError`` if ``path`` cannot be bound as AF_UNIX."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise SocketPathTooLongError(path, length)


def ensure_dirs(paths: Paths, uid: int | None = None) -> None:
    """Create the data, runs and socket directories if they are missing.

    The data and runs directories are created with mode 0700. The socket
    directory gets 0755 as root, so a socket group can reach the socket, and
    0700 otherwise. Existing directories keep their mode, except the private
    fallback socket directory, which is checked instead.

    Raises:
        UnsafeDirectoryError: the private socket directory is not a directory
            owned by ``uid``, or it is writable by group or others.
    """
    if uid is None:
        uid = os.geteuid()

    os.makedirs(paths.data_dir, mode=0o700, exist_ok=True)
    os.makedirs(paths.runs_dir, mode=0o700, exist_ok=True)

    if paths.socket_dir_private:
        _make_private_dir(paths.socket_dir, uid)
    elif not os.path.isdir(paths.socket_dir):
        os.makedirs(paths.socket_dir, exist_ok=True)
        # Set the mode explicitly because makedirs applies the umask to it.
        os.chmod(paths.socket_dir, 0o755 if uid == 0 else 0o700)


def _default_data_dir(env: Mapping[str, str], uid: int) -> str:
    if uid == 0:
        return SYSTEM_DATA_DIR

    state_home = _absolute_env(env, "XDG_STATE_HOME")
    if state_home is None:
        state_home = os.path.join(_home_dir(env, uid), ".local", "state")

    return os.path.join(state_home, "dstackd")


def _default_socket(env: Mapping[str, str], uid: int) -> tuple[str, bool]:
    """Return the default socket path and whether its directory must be private."""
    if uid == 0:
        return SYSTEM_SOCKET, False

    runtime_dir = _absolute_env(env, "XDG_RUNTIME_DIR")
    if runtime_dir is not None:
        return os.path.join(runtime_dir, SOCKET_NAME), False

    return os.path.join(f"/tmp/dstackd-{uid}", SOCKET_NAME), True


def _absolute_env(env: Mapping[str, str], name: str) -> str | None:
    # The XDG base directory specification requires ignoring relative paths in
    # these variables, and an empty value means unset.
    value = env.get(name, "")
    if not os.path.isabs(value):
        return None

    return value


def _home_dir(env: Mapping[str, str], uid: int) -> str:
    home = env.get("HOME", "")
    if home:
        return home

    return pwd.getpwuid(uid).pw_dir


def _make_private_dir(path: str, uid: int) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass

    # lstat, not stat, so a symlink planted by another user is rejected
    # instead of followed.
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(
            path,
            "is not a directory",
            "remove it, or set XDG_RUNTIME_DIR or DSTACKD_SOCKET",
        )

    if info.st_uid != uid:
        raise UnsafeDirectoryError(
            path,
            f"is owned by uid {info.st_uid}, not by uid {uid}",
            "another user may be intercepting the socket; remove the directory "
            "as root, or set XDG_RUNTIME_DIR or DSTACKD_SOCKET",
        )

    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectoryError(
            path,
            f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})",
            f"run chmod 700 {path}",
        )
