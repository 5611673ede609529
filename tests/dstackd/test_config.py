"""Tests of the TOML config file: defaults, decoding and error messages."""

import grp
from collections.abc import Callable
from pathlib import Path

import pytest

from dstackd.config import (
    AwsConfig,
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


def _gpu0(config: Config) -> GpuConfig:
    assert config.local.gpus is not None
    return config.local.gpus[0]


def _aws(config: Config) -> AwsConfig:
    assert config.aws is not None
    return config.aws


# Each case: file text, a getter of the decoded value, and that value.
ACCEPTED_CASES = [
    pytest.param(
        "[local]\nmemory = 64\n",
        lambda config: config.local.memory_gb,
        64.0,
        id="memory-int",
    ),
    pytest.param(
        "[local]\nmemory = 1.5\n",
        lambda config: config.local.memory_gb,
        1.5,
        id="memory-float",
    ),
    pytest.param(
        "[local]\ndisk = 500\n",
        lambda config: config.local.disk_gb,
        500.0,
        id="disk-int",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = 80\n',
        lambda config: _gpu0(config).memory_gb,
        80.0,
        id="gpu-memory-int",
    ),
    pytest.param(
        "[aws]\ndisk = 100\n",
        lambda config: _aws(config).disk_gb,
        100.0,
        id="aws-disk-int",
    ),
    pytest.param(
        "[local]\ncpus = 4096\n",
        lambda config: config.local.cpus,
        4096,
        id="cpus-max",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = "80GB"\ncount = 64\n',
        lambda config: _gpu0(config).count,
        64,
        id="gpu-count-max",
    ),
    pytest.param(
        "[daemon]\nstop_grace_seconds = 3600\n",
        lambda config: config.daemon.stop_grace_seconds,
        3600.0,
        id="grace-max",
    ),
    pytest.param(
        "[ssh]\nlost_after_seconds = 604800\n",
        lambda config: config.ssh.lost_after_seconds,
        604800.0,
        id="ssh-seconds-max",
    ),
]


@pytest.mark.parametrize(("text", "getter", "expected"), ACCEPTED_CASES)
def test_valid_value_is_decoded(
    tmp_path: Path,
    text: str,
    getter: Callable[[Config], object],
    expected: object,
) -> None:
    config = load_config(_write(tmp_path, text))

    assert getter(config) == expected


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
        "expected int >= 1 at $.local.cpus, got 0",
        id="cpus-zero",
    ),
    pytest.param(
        "[local]\nenabled = 1\n",
        "expected bool at $.local.enabled, got int",
        id="enabled-int",
    ),
    pytest.param(
        "[local]\nmemory = true\n",
        "expected string at $.local.memory, got bool",
        id="memory-bool",
    ),
    pytest.param(
        "[local]\nmemory = -64\n",
        "invalid value '-64' at $.local.memory: expected a non-negative number "
        "with a unit MB, GB or TB (512MB, 80GB, 1.5TB) or a bare number of GB (16)",
        id="memory-negative-number",
    ),
    pytest.param(
        "[local]\ndisk = 0\n",
        "invalid value '0' at $.local.disk: expected a size above 0",
        id="disk-zero-number",
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
        "expected float >= 0.0 at $.local.price_per_hour, got -1",
        id="negative-price",
    ),
    pytest.param(
        '[local]\nregion = ""\n',
        "expected string of length >= 1 at $.local.region, got ''",
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
        "expected int >= 1 at $.local.gpus[0].count, got 0",
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
        "expected int >= 0 at $.daemon.socket_group, got -1",
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
        "expected int >= 1 at $.daemon.snapshot_every, got 0",
        id="snapshot-every-zero",
    ),
    pytest.param(
        "[daemon]\nstop_grace_seconds = -1\n",
        "expected float >= 0.0 at $.daemon.stop_grace_seconds, got -1",
        id="negative-grace",
    ),
    pytest.param(
        "[local]\ncpus = 99999999999999999\n",
        "expected int <= 4096 at $.local.cpus, got 99999999999999999",
        id="cpus-too-many",
    ),
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = "80GB"\ncount = 65\n',
        "expected int <= 64 at $.local.gpus[0].count, got 65",
        id="gpu-count-too-many",
    ),
    pytest.param(
        "[daemon]\nstop_grace_seconds = 3601\n",
        "expected float <= 3600.0 at $.daemon.stop_grace_seconds, got 3601",
        id="grace-too-long",
    ),
    pytest.param(
        "[ssh]\nlost_after_seconds = 1e300\n",
        "expected float <= 604800.0 at $.ssh.lost_after_seconds, got 1e+300",
        id="ssh-seconds-too-long",
    ),
    pytest.param(
        "[local\n",
        "invalid TOML: Expected ']' at the end of a table declaration "
        "(at line 1, column 7)",
        id="invalid-toml",
    ),
]


# Every float key and a size key, each given inf, -inf and nan as TOML spells
# them, and 1e999, which TOML reads as inf. Each case: table, key.
FLOAT_KEYS = [
    ("daemon", "stop_grace_seconds"),
    ("local", "price_per_hour"),
    ("local", "memory"),
    ("ssh", "connect_timeout_seconds"),
    ("ssh", "keepalive_interval_seconds"),
    ("ssh", "lost_after_seconds"),
    ("ssh", "health_check_interval_seconds"),
    ("ssh", "health_check_timeout_seconds"),
    ("aws", "running_timeout_seconds"),
    ("aws", "poll_interval_seconds"),
    ("aws", "terminate_timeout_seconds"),
    ("aws", "reconcile_interval_seconds"),
    ("aws", "orphan_grace_seconds"),
    ("aws", "lost_grace_seconds"),
]
NON_FINITE = [("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("1e999", "inf")]

ERROR_CASES += [
    pytest.param(
        f"[{table}]\n{key} = {written}\n",
        f"invalid value {shown} at $.{table}.{key}: expected a finite number",
        id=f"{key}-{written}",
    )
    for table, key in FLOAT_KEYS
    for written, shown in NON_FINITE
]
ERROR_CASES.append(
    pytest.param(
        '[[local.gpus]]\nname = "A100"\nmemory = nan\n',
        "invalid value nan at $.local.gpus[0].memory: expected a finite number",
        id="gpu-memory-nan",
    )
)


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
