"""The ``[ssh]`` and ``[aws]`` config tables and the daemon id file."""

import os
from pathlib import Path

import pytest

from dstackd.config import ConfigError, load_config
from dstackd.daemon_id import DAEMON_ID_FILE, DaemonIdError, load_daemon_id


def write_config(directory: Path, text: str) -> str:
    path = directory / "dstackd.toml"
    path.write_text(text)
    return str(path)


def test_aws_table_enables_backend_with_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "[aws]\n"))

    assert config.aws is not None
    assert config.aws.regions == ("us-east-1",)
    assert config.aws.endpoint_url is None
    assert config.aws.disk_gb == 100


def test_no_aws_table_leaves_backend_off(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "[ssh]\nconnect_timeout_seconds = 3\n"))

    assert config.aws is None
    assert config.ssh.connect_timeout_seconds == 3


@pytest.mark.parametrize(
    "text,problem",
    [
        ('[aws]\nregions = ["useast"]\n', "invalid region 'useast' at"),
        ("[aws]\nregions = []\n", "length >= 1"),
        ('[aws]\nendpoint_url = "127.0.0.1:5000"\n', "invalid endpoint URL"),
        ('[aws]\nssh_cidr = "everyone"\n', "invalid CIDR 'everyone'"),
        ('[aws]\ndisk = "big"\n', "at $.aws.disk"),
        ("[aws]\nregion = 'us-east-1'\n", "unknown key 'region' in [aws]"),
        ("[ssh]\nconnect_timeout_seconds = 0\n", "> 0"),
        ("[ssh]\nhealth_check_interval_seconds = -1\n", "> 0"),
    ],
    ids=[
        "region",
        "no-regions",
        "endpoint",
        "cidr",
        "disk",
        "unknown-key",
        "zero-timeout",
        "negative-interval",
    ],
)
def test_invalid_remote_config_is_rejected(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, text))

    assert problem in str(raised.value)


def test_daemon_id_is_created_once(tmp_path: Path) -> None:
    first = load_daemon_id(str(tmp_path))
    second = load_daemon_id(str(tmp_path))

    assert first == second
    assert first.startswith("d-")
    assert len(first) == 14
    assert (tmp_path / DAEMON_ID_FILE).read_text() == first + "\n"
    assert os.listdir(tmp_path) == [DAEMON_ID_FILE]


def test_malformed_daemon_id_is_rejected(tmp_path: Path) -> None:
    (tmp_path / DAEMON_ID_FILE).write_text("not-an-id\n")

    with pytest.raises(DaemonIdError, match="invalid daemon id 'not-an-id'"):
        load_daemon_id(str(tmp_path))
