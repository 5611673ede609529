"""Tests of the default daemon paths and the creation of their directories."""

import os
import pwd
import stat
from pathlib import Path

import pytest

from dstackd.paths import (
    MAX_SOCKET_PATH_BYTES,
    Paths,
    SocketPathTooLongError,
    UnsafeDirectoryError,
    ensure_dirs,
    resolve_paths,
)

USER = 1000
HOME = "/home/ada"


@pytest.mark.parametrize(
    ("env", "uid", "data_dir", "socket", "private"),
    [
        pytest.param(
            {"XDG_STATE_HOME": "/s", "XDG_RUNTIME_DIR": "/r"},
            0,
            "/var/lib/dstackd",
            "/run/dstackd/dstackd.sock",
            False,
            id="root-ignores-xdg",
        ),
        pytest.param(
            {"HOME": HOME, "XDG_STATE_HOME": "/s", "XDG_RUNTIME_DIR": "/run/user/1000"},
            USER,
            "/s/dstackd",
            "/run/user/1000/dstackd.sock",
            False,
            id="user-with-xdg",
        ),
        pytest.param(
            {"HOME": HOME, "XDG_RUNTIME_DIR": "/run/user/1000"},
            USER,
            f"{HOME}/.local/state/dstackd",
            "/run/user/1000/dstackd.sock",
            False,
            id="user-state-home-unset",
        ),
        pytest.param(
            {"HOME": HOME},
            USER,
            f"{HOME}/.local/state/dstackd",
            "/tmp/dstackd-1000/dstackd.sock",
            True,
            id="user-runtime-dir-unset",
        ),
        pytest.param(
            {"HOME": HOME, "XDG_STATE_HOME": "", "XDG_RUNTIME_DIR": ""},
            USER,
            f"{HOME}/.local/state/dstackd",
            "/tmp/dstackd-1000/dstackd.sock",
            True,
            id="user-empty-xdg-means-unset",
        ),
        pytest.param(
            {"HOME": HOME, "XDG_STATE_HOME": "state", "XDG_RUNTIME_DIR": "run"},
            USER,
            f"{HOME}/.local/state/dstackd",
            "/tmp/dstackd-1000/dstackd.sock",
            True,
            id="user-relative-xdg-ignored",
        ),
        pytest.param(
            {"HOME": HOME, "DSTACKD_SOCKET": "/srv/d.sock"},
            USER,
            f"{HOME}/.local/state/dstackd",
            "/srv/d.sock",
            False,
            id="user-socket-env",
        ),
        pytest.param(
            {"DSTACKD_SOCKET": "/srv/d.sock"},
            0,
            "/var/lib/dstackd",
            "/srv/d.sock",
            False,
            id="root-socket-env",
        ),
    ],
)
def test_resolve_paths_defaults(
    env: dict[str, str], uid: int, data_dir: str, socket: str, private: bool
) -> None:
    paths = resolve_paths(None, None, env=env, uid=uid)

    assert paths.data_dir == data_dir
    assert paths.socket == socket
    assert paths.socket_dir_private is private


def test_resolve_paths_derives_files_from_data_dir() -> None:
    paths = resolve_paths("/d", "/s/x.sock", env={}, uid=USER)

    assert paths.log_db == "/d/events.db"
    assert paths.runs_dir == "/d/runs"
    assert paths.lock_file == "/d/dstackd.lock"
    assert paths.socket_dir == "/s"
    assert paths.socket_lock_file == "/s/x.sock.lock"


def test_resolve_paths_arguments_override_env() -> None:
    env = {"HOME": HOME, "DSTACKD_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/r"}

    paths = resolve_paths("/data", "/arg.sock", env=env, uid=USER)

    assert paths.data_dir == "/data"
    assert paths.socket == "/arg.sock"
    assert paths.socket_dir_private is False


def test_resolve_paths_makes_relative_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    paths = resolve_paths("data", "d.sock", env={}, uid=USER)

    assert paths.data_dir == str(tmp_path / "data")
    assert paths.socket == str(tmp_path / "d.sock")


def test_resolve_paths_home_from_passwd() -> None:
    entry = next(entry for entry in pwd.getpwall() if entry.pw_uid != 0)

    paths = resolve_paths(None, "/s.sock", env={}, uid=entry.pw_uid)

    assert paths.data_dir == f"{entry.pw_dir}/.local/state/dstackd"


def test_resolve_paths_accepts_longest_socket_path() -> None:
    socket = "/" + "s" * (MAX_SOCKET_PATH_BYTES - 1)

    paths = resolve_paths("/d", socket, env={}, uid=USER)

    assert len(paths.socket) == MAX_SOCKET_PATH_BYTES


def test_resolve_paths_rejects_too_long_socket_path() -> None:
    socket = "/" + "s" * MAX_SOCKET_PATH_BYTES

    with pytest.raises(SocketPathTooLongError) as caught:
        resolve_paths("/d", socket, env={}, uid=USER)

    assert caught.value.path == socket
    assert caught.value.length == MAX_SOCKET_PATH_BYTES + 1
    assert f"socket path {socket} is 108 bytes long" in str(caught.value)
    assert "DSTACKD_SOCKET" in str(caught.value)


def test_resolve_paths_counts_socket_length_in_bytes() -> None:
    # 38 characters but 110 bytes, since each euro sign takes three bytes.
    socket = "/" + "\u20ac" * 36 + "x"

    with pytest.raises(SocketPathTooLongError, match="is 110 bytes long"):
        resolve_paths("/d", socket, env={}, uid=USER)


def test_resolve_paths_rejects_long_default_runtime_socket() -> None:
    runtime_dir = "/run/" + "r" * 100

    with pytest.raises(SocketPathTooLongError, match=f"{runtime_dir}/dstackd.sock"):
        resolve_paths("/d", None, env={"XDG_RUNTIME_DIR": runtime_dir}, uid=USER)


def _paths(root: Path, *, private: bool) -> Paths:
    return Paths(
        data_dir=str(root / "data"),
        socket=str(root / "sock" / "d.sock"),
        log_db=str(root / "data" / "events.db"),
        runs_dir=str(root / "data" / "runs"),
        lock_file=str(root / "data" / "dstackd.lock"),
        socket_dir_private=private,
    )


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class TestEnsureDirs:
    def test_creates_data_and_runs_dirs_private(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=False)

        ensure_dirs(paths, uid=USER)

        assert _mode(paths.data_dir) == 0o700
        assert _mode(paths.runs_dir) == 0o700

    def test_creates_user_socket_dir_private(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=False)

        ensure_dirs(paths, uid=USER)

        assert _mode(paths.socket_dir) == 0o700

    def test_creates_root_socket_dir_reachable_by_group(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=False)

        ensure_dirs(paths, uid=0)

        assert _mode(paths.socket_dir) == 0o755

    def test_keeps_existing_dirs(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=False)
        os.makedirs(paths.socket_dir, mode=0o750)

        ensure_dirs(paths, uid=USER)
        ensure_dirs(paths, uid=USER)

        assert _mode(paths.socket_dir) == 0o750

    def test_creates_private_socket_dir_0700(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=True)

        ensure_dirs(paths, uid=os.geteuid())

        assert _mode(paths.socket_dir) == 0o700

    def test_accepts_existing_private_socket_dir(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=True)
        os.mkdir(paths.socket_dir, 0o700)

        ensure_dirs(paths, uid=os.geteuid())

        assert _mode(paths.socket_dir) == 0o700

    def test_rejects_private_socket_dir_of_other_user(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=True)
        os.mkdir(paths.socket_dir, 0o700)
        other_uid = os.geteuid() + 1

        with pytest.raises(UnsafeDirectoryError) as caught:
            ensure_dirs(paths, uid=other_uid)

        message = str(caught.value)
        assert message.startswith(f"directory {paths.socket_dir} is owned by uid ")
        assert f"not by uid {other_uid}" in message

    @pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
    def test_rejects_private_socket_dir_writable_by_others(
        self, tmp_path: Path, mode: int
    ) -> None:
        paths = _paths(tmp_path, private=True)
        os.mkdir(paths.socket_dir)
        os.chmod(paths.socket_dir, mode)

        with pytest.raises(UnsafeDirectoryError) as caught:
            ensure_dirs(paths, uid=os.geteuid())

        assert f"writable by group or others (mode 0{mode:o})" in str(caught.value)
        assert f"chmod 700 {paths.socket_dir}" in str(caught.value)

    def test_rejects_symlink_as_private_socket_dir(self, tmp_path: Path) -> None:
        paths = _paths(tmp_path, private=True)
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        os.symlink(target, paths.socket_dir)

        with pytest.raises(UnsafeDirectoryError, match="is not a directory"):
            ensure_dirs(paths, uid=os.geteuid())
