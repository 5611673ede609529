"""Tests of the log configuration: output format, levels and secret redaction."""

import io
import json
import logging
import os
import re
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from dstackd.logging import (
    REDACTED,
    configure_logging,
    is_journal_stream,
    is_secret_key,
    redact_secrets,
)
from events.errors import InvalidValueError

ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)

    root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True),
        ("api_token", True),
        ("apiToken", True),
        ("X-Auth-Token", True),
        ("tokens", True),
        ("secret", True),
        ("client_secret", True),
        ("aws_secret_access_key", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("password", True),
        ("db_password", True),
        ("passwd", True),
        ("ssh_passphrase", True),
        ("credentials", True),
        ("authorization", True),
        ("cookie", True),
        ("key", True),
        ("api_key", True),
        ("apiKey", True),
        ("apikey", True),
        ("private_key", True),
        ("ssh_key", True),
        ("access_key", True),
        ("signing_keys", True),
        ("session_token", True),
        ("key_name", False),
        ("key_id", False),
        ("instance_key", False),
        ("idempotency_key", False),
        ("public_key", False),
        ("sort_key", False),
        ("ssh_key_path", False),
        ("secret_name", False),
        ("token_expires", False),
        ("password_file", False),
        ("token_count", False),
        ("monkey", False),
        ("keyboard", False),
        ("author", False),
        ("run_id", False),
        ("", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


class TestRedactSecrets:
    def _log(self, **fields: Any) -> dict[str, Any]:
        with capture_logs(processors=[redact_secrets]) as logs:
            structlog.get_logger().info("thing_happened", **fields)

        return logs[0]

    def test_replaces_secret_values(self) -> None:
        entry = self._log(api_token="abc", password=1234, instance_key="k-1")

        assert entry["api_token"] == REDACTED
        assert entry["password"] == REDACTED
        assert entry["instance_key"] == "k-1"

    def test_keeps_unset_secret(self) -> None:
        entry = self._log(token=None)

        assert entry["token"] is None

    def test_masks_env_mapping_values(self) -> None:
        entry = self._log(env={"HOME": "/root", "HF_TOKEN": "hf_x"})

        assert entry["env"] == {"HOME": REDACTED, "HF_TOKEN": REDACTED}

    def test_masks_env_assignment_list(self) -> None:
        entry = self._log(run_env=["A=1", "B=two=2", "C"])

        assert entry["run_env"] == ["A=***", "B=***", REDACTED]

    def test_masks_env_text(self) -> None:
        entry = self._log(environment="A=1 B=2")

        assert entry["environment"] == REDACTED

    def test_redacts_nested_keys(self) -> None:
        entry = self._log(
            request={"backend": {"name": "aws", "secret": "s"}, "items": [{"key": 1}]}
        )

        assert entry["request"] == {
            "backend": {"name": "aws", "secret": REDACTED},
            "items": [{"key": REDACTED}],
        }

    def test_redacts_access_key_id_in_text(self) -> None:
        entry = self._log(command=f"aws configure set id {ACCESS_KEY_ID} --profile x")

        assert entry["command"] == "aws configure set id *** --profile x"

    def test_redacts_temporary_access_key_id(self) -> None:
        entry = self._log(note="ASIAIOSFODNN7EXAMPLE")

        assert entry["note"] == REDACTED

    def test_keeps_longer_upper_case_words(self) -> None:
        text = "AKIAIOSFODNN7EXAMPLEX"

        entry = self._log(note=text)

        assert entry["note"] == text

    @pytest.mark.parametrize(
        "template",
        [
            "aws_secret_access_key={}",
            "AWS_SECRET_ACCESS_KEY = {}",
            "aws_secret_access_key: {}",
            '"aws_secret_access_key": "{}"',
            "aws_session_token='{}'",
        ],
    )
    def test_redacts_aws_secret_assignment(self, template: str) -> None:
        entry = self._log(config_text=template.format(SECRET_ACCESS_KEY))

        assert SECRET_ACCESS_KEY not in entry["config_text"]
        assert REDACTED in entry["config_text"]

    def test_redacts_event_text(self) -> None:
        with capture_logs(processors=[redact_secrets]) as logs:
            structlog.get_logger().info(f"leaked {ACCESS_KEY_ID}")

        assert logs[0]["event"] == "leaked ***"

    def test_named_tuple_becomes_plain_tuple(self) -> None:
        Pair = namedtuple("Pair", ["left", "right"])

        entry = self._log(pair=Pair(ACCESS_KEY_ID, 1))

        assert entry["pair"] == (REDACTED, 1)

    def test_stops_at_max_depth(self) -> None:
        nested: dict[str, Any] = {}
        node = nested
        for _ in range(20):
            node["next"] = {}
            node = node["next"]

        entry = self._log(deep=nested)

        assert json.dumps(entry["deep"]).count("next") == 8


class TestConfigureLogging:
    def test_json_line_fields(self) -> None:
        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)

        structlog.get_logger().info("socket_bound", path="/run/d.sock")

        [line] = _json_lines(stream)
        assert line["event"] == "socket_bound"
        assert line["level"] == "info"
        assert line["path"] == "/run/d.sock"
        assert ISO_UTC.fullmatch(line["timestamp"])

    def test_level_filters_lower_levels(self) -> None:
        stream = io.StringIO()
        configure_logging("WARNING", json=True, stream=stream)
        log = structlog.get_logger()

        log.info("hidden")
        log.warning("shown")

        assert [line["event"] for line in _json_lines(stream)] == ["shown"]

    def test_rejects_unknown_level(self) -> None:
        with pytest.raises(InvalidValueError) as caught:
            configure_logging("verbose", stream=io.StringIO())

        assert str(caught.value) == (
            "invalid log level 'verbose': expected one of "
            "debug, info, warning, error, critical"
        )

    def test_rendered_output_is_redacted(self) -> None:
        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)

        structlog.get_logger().info("run_started", token="t0ken", env={"A": "b"})

        [line] = _json_lines(stream)
        assert line["token"] == REDACTED
        assert line["env"] == {"A": REDACTED}
        assert "t0ken" not in stream.getvalue()

    def test_repr_of_objects_is_scrubbed(self) -> None:
        class Credentials:
            def __repr__(self) -> str:
                return f"Credentials({ACCESS_KEY_ID}, {SECRET_ACCESS_KEY})"

        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)

        structlog.get_logger().info("client_created", client=Credentials())

        assert ACCESS_KEY_ID not in stream.getvalue()
        assert "Credentials(***" in stream.getvalue()

    def test_exception_is_rendered_and_scrubbed(self) -> None:
        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)

        try:
            raise RuntimeError(f"bad key {ACCESS_KEY_ID}")
        except RuntimeError:
            structlog.get_logger().exception("call_failed")

        [line] = _json_lines(stream)
        assert "RuntimeError: bad key ***" in line["exception"]
        assert ACCESS_KEY_ID not in stream.getvalue()

    def test_stdlib_records_use_same_format(self) -> None:
        stream = io.StringIO()
        configure_logging("info", json=True, stream=stream)

        logging.getLogger("aiohttp.server").error("failed for %s", ACCESS_KEY_ID)

        [line] = _json_lines(stream)
        assert line["event"] == "failed for ***"
        assert line["logger"] == "aiohttp.server"
        assert line["level"] == "error"
        assert ISO_UTC.fullmatch(line["timestamp"])

    def test_reconfiguring_replaces_stdlib_handler(self) -> None:
        first, second = io.StringIO(), io.StringIO()
        configure_logging("info", json=True, stream=first)
        configure_logging("info", json=True, stream=second)

        logging.getLogger("aiohttp").warning("once")

        assert first.getvalue() == ""
        assert len(_json_lines(second)) == 1

    def test_pipe_gets_json(self) -> None:
        stream = io.StringIO()
        configure_logging("info", stream=stream, env={})

        structlog.get_logger().info("started")

        assert _json_lines(stream)[0]["event"] == "started"

    def test_terminal_gets_console_format(self) -> None:
        main, secondary = os.openpty()
        with open(secondary, "w", closefd=True) as terminal:
            configure_logging("info", stream=terminal, env={})

            structlog.get_logger().info("started", pool="default")
            terminal.flush()
            output = os.read(main, 4096).decode()

        os.close(main)
        assert "started" in output
        assert "pool" in output
        assert not output.lstrip().startswith("{")

    def test_journal_stream_gets_json_on_terminal(self) -> None:
        main, secondary = os.openpty()
        info = os.fstat(secondary)
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        with open(secondary, "w", closefd=True) as terminal:
            configure_logging("info", stream=terminal, env=env)

            structlog.get_logger().info("started")
            terminal.flush()
            output = os.read(main, 4096).decode()

        os.close(main)
        assert json.loads(output)["event"] == "started"


class TestIsJournalStream:
    def test_matching_device_and_inode(self, tmp_path: Path) -> None:
        with open(tmp_path / "out", "w") as file:
            info = os.fstat(file.fileno())
            env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}

            assert is_journal_stream(file, env) is True

    def test_inherited_variable_for_other_file(self, tmp_path: Path) -> None:
        with open(tmp_path / "out", "w") as file:
            info = os.fstat(file.fileno())
            env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}

            assert is_journal_stream(file, env) is False

    @pytest.mark.parametrize("value", ["", "12", "a:b", "1:"])
    def test_malformed_variable(self, tmp_path: Path, value: str) -> None:
        with open(tmp_path / "out", "w") as file:
            assert is_journal_stream(file, {"JOURNAL_STREAM": value}) is False

    def test_stream_without_descriptor(self) -> None:
        assert is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"}) is False
