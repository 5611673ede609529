"""Tests of the TOML config file: defaults, decoding and error messages."""

import grp
from pathlib import Path

import pytest

from dstackd.config import (
    Config,
    ConfigError,
    DaemonConfig,
    GpuConfig,
    LocalConfig,
    load_config,
)

FULL = """
[daemon]
socket_group = 0
snapshot_every = 500
log_level = "debug"
stop_grace_seconds = 2.5

[local]
enabled = false
cpus = 16
memory = "64GB"
disk = "1.5TB"
price_per_hour = 1.25
region = "lab"

[[local.gpus]]
name = "A100"
memory = "80GB"
count = 2

[[local.gpus]]
name = "T4"
memory = "16GB"
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dstackd.toml"
    path.write_text(text)

    return str(path)


def test_no_file_gives_defaults() -> None:
    config = load_config(None)

    assert config == Config()
    assert config.daemon.socket_group is None
    assert config.daemon.socket_mode == 0o600
    assert config.daemon.snapshot_every == 10_000
    assert config.daemon.log_level == "info"
    assert config.daemon.stop_grace_seconds == 10
    assert config.local.enabled is True
    assert config.local.cpus is None
    assert config.local.memory_gb is None
    assert config.local.disk_gb is None
    assert config.local.gpus is None
    assert config.local.region == "local"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


def test_full_file_is_decoded(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))

    assert config.daemon == DaemonConfig(
        socket_group=0, snapshot_every=500, log_level="debug", stop_grace_seconds=2.5
    )
    assert config.local == LocalConfig(
        enabled=False,
        cpus=16,
        memory="64GB",
        disk="1.5TB",
        price_per_hour=1.25,
        region="lab",
        gpus=(
            GpuConfig(name="A100", memory="80GB", count=2),
            GpuConfig(name="T4", memory="16GB", count=1),
        ),
    )


def test_sizes_are_given_in_gb(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))

    assert config.local.memory_gb == 64.0
    assert config.local.disk_gb == 1536.0
    assert config.local.gpus is not None
    assert config.local.gpus[0].memory_gb == 80.0


class TestSocketGroup:
    def test_group_gives_mode_0660(self) -> None:
        assert DaemonConfig(socket_group="root").socket_mode == 0o660

    @pytest.mark.parametrize(
        ("group", "gid"),
        [
            pytest.param(None, None, id="none"),
            pytest.param(0, 0, id="gid"),
            pytest.param("1234", 1234, id="gid-text"),
            pytest.param(grp.getgrgid(0).gr_name, 0, id="name"),
        ],
    )
    def test_gid_lookup(self, group: str | int | None, gid: int | None) -> None:
        assert DaemonConfig(socket_group=group).socket_gid() == gid

    def test_group_name_is_checked_on_load(self, tmp_path: Path) -> None:
        name = grp.getgrgid(0).gr_name
        path = _write(tmp_path, f'[daemon]\nsocket_group = "{name}"\n')

        assert load_config(path).daemon.socket_gid() == 0


# Each case: file text, and the message after "config <path>: ".
ERROR_CASES = [
    pytest.param(
        '[local]\nidel_duration = "5m"\n',
        "unknown key 'idel_duration' in [local]",
        id="unknown-key",
    ),
    pytest.param(
        "[daemon]\nsnapshot_evry = 5\n",
        "unknown key 'snapshot_evry' in [daemon]",
        id="unknown-daemon-key",
    ),
    pytest.param(
        "verbose = true\n",
        "unknown key 'verbose' at the top level",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "[locla]\ncpus = 4\n",
        "unknown table [locla]",
        id="unknown-table",
    ),
    pytest.param(
        "[local.limits]\ncpus = 4\n",
        "unknown table [local.limits]",
        id="unknown-subtable",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = "80GB"\nnumber = 2\n',
        "unknown key 'number' in [[local.gpus]] entry 1",
        id="unknown-gpu-key",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\n',
        "missing required key 'memory' in [[local.gpus]] entry 1",
        id="missing-gpu-memory",
    ),
    pytest.param(
        '[local]\ncpus = "4"\n',
        "expected int at $.local.cpus, got string",
        id="cpus-string",
    ),
    pytest.param(
        "[local]\ncpus = 4.5\n",
        "expected int at $.local.cpus, got float",
        id="cpus-float",
    ),
    pytest.param(
        "[local]\ncpus = 0\n",
        "expected int >= 1 at $.local.cpus",
        id="cpus-zero",
    ),
    pytest.param(
        "[local]\nenabled = 1\n",
        "expected bool at $.local.enabled, got int",
        id="enabled-int",
    ),
    pytest.param(
        "[local]\nmemory = 64\n",
        "expected string at $.local.memory, got int",
        id="memory-number",
    ),
    pytest.param(
        '[local]\nmemory = "64XB"\n',
        "invalid value '64XB' at $.local.memory: expected a non-negative number "
        "with a unit MB, GB or TB (512MB, 80GB, 1.5TB) or a bare number of GB (16)",
        id="memory-unit",
    ),
    pytest.param(
        '[local]\ndisk = "0GB"\n',
        "invalid value '0GB' at $.local.disk: expected a size above 0",
        id="disk-zero",
    ),
    pytest.param(
        "[local]\nprice_per_hour = -1\n",
        "expected float >= 0.0 at $.local.price_per_hour",
        id="negative-price",
    ),
    pytest.param(
        '[local]\nregion = ""\n',
        "expected string of length >= 1 at $.local.region",
        id="empty-region",
    ),
    pytest.param(
        "local = 3\n",
        "expected table at $.local, got int",
        id="local-not-table",
    ),
    pytest.param(
        "[local]\ngpus = 2\n",
        "expected array at $.local.gpus, got int",
        id="gpus-not-array",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = "80GB"\n'
        '[[local.gpus]]\nname = "T4"\nmemory = "lots"\n',
        "invalid value 'lots' at $.local.gpus[1].memory: expected a non-negative "
        "number with a unit MB, GB or TB (512MB, 80GB, 1.5TB) or a bare number "
        "of GB (16)",
        id="second-gpu-memory",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A 100"\nmemory = "80GB"\n',
        "invalid GPU name 'A 100' at $.local.gpus[0].name: expected letters, "
        "digits, '_' and '-', starting with a letter (A100, RTX4090)",
        id="gpu-name",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = "80GB"\ncount = 0\n',
        "expected int >= 1 at $.local.gpus[0].count",
        id="gpu-count-zero",
    ),
    pytest.param(
        '[daemon]\nlog_level = "verbose"\n',
        "invalid value 'verbose' at $.daemon.log_level: expected one of "
        "debug, info, warning, error, critical",
        id="log-level",
    ),
    pytest.param(
        "[daemon]\nsocket_group = -1\n",
        "expected int >= 0 at $.daemon.socket_group",
        id="negative-gid",
    ),
    pytest.param(
        "[daemon]\nsocket_group = 1.5\n",
        "expected int | string at $.daemon.socket_group, got float",
        id="gid-float",
    ),
    pytest.param(
        '[daemon]\nsocket_group = "no-such-group-dstackd"\n',
        "group 'no-such-group-dstackd' at $.daemon.socket_group does not exist: "
        "create it (groupadd --system no-such-group-dstackd) or give a gid",
        id="unknown-group",
    ),
    pytest.param(
        "[daemon]\nsnapshot_every = 0\n",
        "expected int >= 1 at $.daemon.snapshot_every",
        id="snapshot-every-zero",
    ),
    pytest.param(
        "[daemon]\nstop_grace_seconds = -1\n",
        "expected float >= 0.0 at $.daemon.stop_grace_seconds",
        id="negative-grace",
    ),
    pytest.param(
        "[local\n",
        "invalid TOML: Expected ']' at the end of a table declaration "
        "(at line 1, column 7)",
        id="invalid-toml",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERROR_CASES)
def test_invalid_file_error_message(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"config {path}: {message}"


def test_missing_file_error_message(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert message == f"config {path}: cannot read it: No such file or directory"
