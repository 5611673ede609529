"""Tests of the dstackctl commands against a fake daemon.

They check the requests sent, the output and the exit codes.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dstackctl import exit_codes, main, pool
from dstackctl.main import cli
from tests.dstackctl.fake_daemon import FakeDaemon

OFFER = {
    "backend": "local",
    "region": "local",
    "instance_type": "local-4cpu",
    "resources": {"cpus": 4, "memory_gb": 16.0},
    "price": 0.0,
}
OFFER_VIEW = {
    "backend": "local",
    "region": "local",
    "instance_type": "local-4cpu",
    "resources": "4xCPU, 16GB",
    "spot": False,
    "price": 0.0,
    "offer": OFFER,
}
INSTANCE = {
    "id": "i-1",
    "name": "local-1",
    "pool": "default-pool",
    "backend": "local",
    "region": "local",
    "instance_type": "local-4cpu",
    "resources": "4xCPU, 16GB",
    "spot": False,
    "price": 0.0,
    "status": "idle",
    "schedulable": True,
    "run": None,
    "idle_since": "2025-03-01T11:59:48Z",
    "idle_seconds": 12.0,
    "idle_duration": "259200",
    "created_at": "2025-03-01T11:00:00Z",
    "reason": None,
}
RUN = {
    "id": "r-1",
    "name": "quiet-fox-1",
    "pool": "default-pool",
    "type": "task",
    "status": "submitted",
    "command": "python train.py",
    "user": "alice",
    "instance": None,
    "submitted_at": "2025-03-01T11:58:00Z",
    "started_at": None,
    "ended_at": None,
    "exit_status": None,
    "reason": None,
    "wait_ms": None,
    "log_path": "/var/lib/dstackd/runs/r-1/output.log",
}
POOL = {
    "name": "gpu",
    "default": False,
    "created_at": "2025-03-01T10:00:00Z",
    "instances": 0,
    "idle": 0,
    "busy": 0,
}
EVENT = {
    "position": 7,
    "stream": "pool/gpu",
    "version": 1,
    "recorded_at": "2025-03-01T10:00:00Z",
    "actor": "alice",
    "type": "PoolCreated",
    "event": {"type": "PoolCreated", "pool": "gpu"},
    "hash": "00" * 32,
}


@pytest.fixture
def local_time_utc_plus_two() -> Iterator[None]:
    """Set this process's local time zone to UTC+2.

    A POSIX TZ string needs no zoneinfo files; its offset is west of UTC, so
    ``-2`` means two hours east.
    """
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "TST-2"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved

    time.tzset()


def invoke(
    fake_daemon: FakeDaemon,
    *args: str,
    input: str | None = None,
    env: dict[str, str | None] | None = None,
) -> Result:
    return CliRunner().invoke(
        cli,
        ["--socket", fake_daemon.socket_path, *args],
        input=input,
        env=env,
        catch_exceptions=False,
    )


def _command_id(value: object) -> str | None:
    """Name a parametrized case after its command line; other values get the default."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)

    return None


def ended_run(**fields: Any) -> dict[str, Any]:
    return {**RUN, "ended_at": "2025-03-01T12:00:00Z", **fields}


class TestRequests:
    @pytest.mark.parametrize(
        ("args", "method", "path", "query", "response"),
        [
            (["pool", "list"], "GET", "/v1/pools", {}, [POOL]),
            (["pool", "delete", "gpu"], "DELETE", "/v1/pools/gpu", {}, POOL),
            (
                ["pool", "delete", "gpu", "--force"],
                "DELETE",
                "/v1/pools/gpu",
                {"force": "true"},
                POOL,
            ),
            (["pool", "set-default", "gpu"], "POST", "/v1/pools/gpu/default", {}, POOL),
            (["pool", "ps"], "GET", "/v1/instances", {}, [INSTANCE]),
            (
                ["pool", "ps", "--pool", "gpu", "-a"],
                "GET",
                "/v1/instances",
                {"pool": "gpu", "all": "true"},
                [INSTANCE],
            ),
            (["ps"], "GET", "/v1/runs", {}, [RUN]),
            (["ps", "--all"], "GET", "/v1/runs", {"all": "true"}, [RUN]),
            (["events", "--after", "5"], "GET", "/v1/events", {"after": "5"}, None),
            (["events", "--follow"], "GET", "/v1/events", {"follow": "true"}, None),
            (["logs", "r/1"], "GET", "/v1/runs/r%2F1/logs", {}, None),
            (["logs", "-f", "r1"], "GET", "/v1/runs/r1/logs", {"follow": "true"}, None),
        ],
        ids=lambda value: _command_id(value),
    )
    def test_command_sends_method_path_and_query(
        self,
        fake_daemon: FakeDaemon,
        args: list[str],
        method: str,
        path: str,
        query: dict[str, str],
        response: Any,
    ) -> None:
        if response is None:
            # A streamed body: one event line, which is also valid log output.
            fake_daemon.route(method, path, chunks=[json.dumps(EVENT).encode() + b"\n"])
        else:
            fake_daemon.route(method, path, response)

        result = invoke(fake_daemon, *args)

        assert result.exit_code == 0, result.output
        [request] = fake_daemon.requests
        assert request.method == method
        # The fake daemon records the path as sent, still percent-encoded.
        assert request.path == path
        assert request.query == query

    def test_pool_create_sends_the_name(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/pools", POOL)

        result = invoke(fake_daemon, "pool", "create", "gpu")

        assert result.exit_code == 0
        assert fake_daemon.requests[0].json() == {"name": "gpu"}
        assert result.stdout == "Created pool gpu.\n"

    def test_stop_sends_abort_for_each_run(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/runs/a/stop", {**RUN, "name": "a"})
        fake_daemon.route("POST", "/v1/runs/b/stop", {**RUN, "name": "b"})

        result = invoke(fake_daemon, "stop", "--abort", "a", "b")

        assert result.exit_code == 0
        assert [r.path for r in fake_daemon.requests] == [
            "/v1/runs/a/stop",
            "/v1/runs/b/stop",
        ]
        assert [r.json() for r in fake_daemon.requests] == [{"abort": True}] * 2

    def test_offer_sends_every_resource_option(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/offers", [OFFER_VIEW])

        result = invoke(
            fake_daemon,
            "offer",
            "--pool", "gpu",
            "--cpu", "4..",
            "--memory", "16GB..",
            "--disk", "100GB",
            "--gpu", "A100:80GB:2",
            "--backend", "aws",
            "--backend", "local",
            "--spot-auto",
            "--max-price", "2.5",
            "--max-offers", "5",
        )  # fmt: skip

        assert result.exit_code == 0, result.output
        assert fake_daemon.requests[0].json() == {
            "pool": "gpu",
            "resources": {
                "cpu": "4..",
                "memory": "16GB..",
                "disk": "100GB",
                "gpu": "A100:80GB:2",
                "max_price": "2.5",
                "backends": ["aws", "local"],
                "spot_policy": "auto",
            },
            "max_offers": 5,
        }
        assert result.stdout.splitlines()[1].startswith("1  local")

    @pytest.mark.parametrize(
        ("flag", "policy"),
        [("--spot", "spot"), ("--on-demand", "on-demand"), ("--spot-auto", "auto")],
    )
    def test_spot_flag_sets_spot_policy(
        self, fake_daemon: FakeDaemon, flag: str, policy: str
    ) -> None:
        fake_daemon.route("POST", "/v1/offers", [])

        invoke(fake_daemon, "offer", flag)

        assert fake_daemon.requests[0].json() == {"resources": {"spot_policy": policy}}

    def test_pool_remove_tries_every_instance(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.error("DELETE", "/v1/instances/a", 409, "conflict", "a is busy")
        fake_daemon.route("DELETE", "/v1/instances/b", {**INSTANCE, "name": "b"})

        result = invoke(fake_daemon, "pool", "remove", "a", "b", "--force")

        assert result.exit_code == exit_codes.FAILED
        assert [r.path for r in fake_daemon.requests] == [
            "/v1/instances/a",
            "/v1/instances/b",
        ]
        assert [r.query for r in fake_daemon.requests] == [{"force": "true"}] * 2
        assert result.stderr == "error: a is busy\n"
        assert result.stdout == "Removing instance b (idle).\n"


class TestRun:
    def test_detached_run_sends_argv_and_options(
        self, fake_daemon: FakeDaemon, socket_dir: str
    ) -> None:
        fake_daemon.route("POST", "/v1/runs", RUN)

        result = invoke(
            fake_daemon,
            "run",
            "-d",
            "--name", "train",
            "--pool", "gpu",
            "--gpu", "A100",
            "--spot",
            "--idle-duration", "10m",
            "--max-duration", "2h",
            "--reuse",
            "--instance", "local-1",
            "-e", "A=1",
            "-e", "B=x=y",
            "-e", "FROM_CLIENT",
            "-w", socket_dir,
            "python", "-c", "print(1)",
            env={"FROM_CLIENT": "inherited"},
        )  # fmt: skip

        assert result.exit_code == 0, result.output
        assert result.stdout == "quiet-fox-1\n"
        assert fake_daemon.requests[0].json() == {
            "argv": ["python", "-c", "print(1)"],
            "name": "train",
            "pool": "gpu",
            "resources": {"gpu": "A100", "spot_policy": "spot"},
            "env": {"A": "1", "B": "x=y", "FROM_CLIENT": "inherited"},
            "working_dir": socket_dir,
            "idle_duration": "10m",
            "max_duration": "2h",
            "reuse": True,
            "instance": "local-1",
        }

    def test_run_defaults_working_dir_to_the_client_cwd(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("POST", "/v1/runs", RUN)

        invoke(fake_daemon, "run", "-d", "--", "-leading-dash")

        body = fake_daemon.requests[0].json()
        assert body["argv"] == ["-leading-dash"]
        assert body["working_dir"] == os.getcwd()
        assert body["env"] == {}
        assert body["reuse"] is False

    def test_attached_run_exits_with_task_status(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/runs", RUN)
        fake_daemon.route("GET", "/v1/runs/quiet-fox-1/logs", chunks=[b"hello\n", b"x"])
        fake_daemon.route(
            "GET", "/v1/runs/quiet-fox-1/wait", {**RUN, "status": "running"}
        )
        fake_daemon.route(
            "GET",
            "/v1/runs/quiet-fox-1/wait",
            ended_run(status="failed", exit_status=3),
        )

        result = invoke(fake_daemon, "run", "false")

        assert result.exit_code == 3
        assert result.stdout == "hello\nx"
        assert fake_daemon.requests[1].query == {"follow": "true"}
        assert len(fake_daemon.requests_to("GET", "/v1/runs/quiet-fox-1/wait")) == 2

    def test_attached_run_failing_without_status_prints_reason(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("POST", "/v1/runs", RUN)
        fake_daemon.route("GET", "/v1/runs/quiet-fox-1/logs", chunks=[])
        fake_daemon.route(
            "GET",
            "/v1/runs/quiet-fox-1/wait",
            ended_run(status="failed", reason="no offer fits the requirements"),
        )

        result = invoke(fake_daemon, "run", "true")

        assert result.exit_code == exit_codes.FAILED
        assert result.stderr == (
            "error: run quiet-fox-1 failed: no offer fits the requirements\n"
        )

    def test_killed_task_exits_with_128_plus_signal(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("POST", "/v1/runs", RUN)
        fake_daemon.route("GET", "/v1/runs/quiet-fox-1/logs", chunks=[])
        fake_daemon.route(
            "GET",
            "/v1/runs/quiet-fox-1/wait",
            ended_run(status="stopped", exit_status=-9),
        )

        result = invoke(fake_daemon, "run", "sleep", "100")

        assert result.exit_code == 137

    def test_ctrl_c_detaches_with_hints(
        self, fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def interrupt(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        fake_daemon.route("POST", "/v1/runs", RUN)
        monkeypatch.setattr(main, "_copy_logs", interrupt)

        result = invoke(fake_daemon, "run", "sleep", "100")

        assert result.exit_code == exit_codes.INTERRUPTED
        assert "dstackctl logs -f quiet-fox-1" in result.stderr
        assert "dstackctl stop quiet-fox-1" in result.stderr

    @pytest.mark.parametrize(
        ("env_option", "message"),
        [
            ("NOEQUALS", "'NOEQUALS': NOEQUALS is not set in this environment"),
            ("1BAD=x", "'1BAD=x': expected KEY=VALUE or KEY"),
            ("=x", "'=x': expected KEY=VALUE or KEY"),
        ],
    )
    def test_invalid_env_is_usage_error(
        self, fake_daemon: FakeDaemon, env_option: str, message: str
    ) -> None:
        result = invoke(
            fake_daemon, "run", "-e", env_option, "true", env={"NOEQUALS": None}
        )

        assert result.exit_code == exit_codes.USAGE
        assert message in result.stderr
        assert fake_daemon.requests == []


class TestPoolAdd:
    def test_declining_the_prompt_adds_nothing(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/offers", [OFFER_VIEW])

        result = invoke(fake_daemon, "pool", "add", "--cpu", "4", input="n\n")

        assert result.exit_code == exit_codes.FAILED
        assert "Continue? [y/n]" in result.stdout
        assert "local-4cpu" in result.stdout
        assert fake_daemon.requests_to("POST", "/v1/instances") == []
        assert fake_daemon.requests[0].json() == {
            "resources": {"cpu": "4"},
            "max_offers": 3,
        }

    def test_accepting_adds_the_first_offer(self, fake_daemon: FakeDaemon) -> None:
        cheaper = {**OFFER_VIEW, "offer": {**OFFER, "instance_type": "cheap"}}
        fake_daemon.route("POST", "/v1/offers", [cheaper, OFFER_VIEW])
        fake_daemon.route("POST", "/v1/instances", INSTANCE)

        result = invoke(
            fake_daemon,
            "pool", "add",
            "--pool", "gpu",
            "--idle-duration", "1h",
            "--name", "box",
            "--max-offers", "2",
            input="y\n",
        )  # fmt: skip

        assert result.exit_code == 0, result.output
        [add] = fake_daemon.requests_to("POST", "/v1/instances")
        assert add.json() == {
            "pool": "gpu",
            "resources": {},
            "idle_duration": "1h",
            "name": "box",
            "offer": cheaper["offer"],
        }
        assert result.stdout.splitlines()[-1].split()[-3:] == ["idle", "-", "12s/3d"]

    def test_yes_skips_the_prompt(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/offers", [OFFER_VIEW])
        fake_daemon.route("POST", "/v1/instances", INSTANCE)

        result = invoke(fake_daemon, "pool", "add", "-y")

        assert result.exit_code == 0
        assert "Continue?" not in result.stdout
        assert len(fake_daemon.requests_to("POST", "/v1/instances")) == 1

    def test_no_offers_names_the_requirements(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("POST", "/v1/offers", [])

        result = invoke(fake_daemon, "pool", "add", "--cpu", "64", "--spot", "-y")

        assert result.exit_code == exit_codes.FAILED
        assert result.stderr.startswith(
            "error: no offers match cpu=64 spot_policy=spot;"
        )
        assert fake_daemon.requests_to("POST", "/v1/instances") == []

    def test_add_waits_while_the_instance_provisions(
        self, fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(pool, "PROVISIONING_POLL_INTERVAL_S", 0)
        provisioning = {**INSTANCE, "status": "provisioning", "idle_seconds": None}
        fake_daemon.route("POST", "/v1/offers", [OFFER_VIEW])
        fake_daemon.route("POST", "/v1/instances", provisioning)
        fake_daemon.route("GET", "/v1/instances", [provisioning])
        fake_daemon.route(
            "GET", "/v1/instances", [{**INSTANCE, "id": "other"}, INSTANCE]
        )

        result = invoke(fake_daemon, "pool", "add", "-y")

        assert result.exit_code == 0
        polls = fake_daemon.requests_to("GET", "/v1/instances")
        assert len(polls) == 2
        assert polls[0].query == {"pool": "default-pool", "all": "true"}
        assert "idle" in result.stdout.splitlines()[-1]

    def test_failed_provisioning_exits_1_with_reason(
        self, fake_daemon: FakeDaemon
    ) -> None:
        failed = {**INSTANCE, "status": "failed", "reason": "quota exceeded"}
        fake_daemon.route("POST", "/v1/offers", [OFFER_VIEW])
        fake_daemon.route("POST", "/v1/instances", failed)

        result = invoke(fake_daemon, "pool", "add", "-y")

        assert result.exit_code == exit_codes.FAILED
        assert result.stderr == "error: instance local-1 failed: quota exceeded\n"


class TestOutput:
    @pytest.mark.parametrize(
        ("args", "method", "path", "response"),
        [
            (["pool", "list", "--json"], "GET", "/v1/pools", [POOL]),
            (["pool", "ps", "--json"], "GET", "/v1/instances", [INSTANCE]),
            (["ps", "--json"], "GET", "/v1/runs", [RUN]),
            (["offer", "--json"], "POST", "/v1/offers", [OFFER_VIEW]),
        ],
        ids=["pool-list", "pool-ps", "ps", "offer"],
    )
    def test_json_option_prints_the_daemon_json(
        self,
        fake_daemon: FakeDaemon,
        args: list[str],
        method: str,
        path: str,
        response: Any,
    ) -> None:
        fake_daemon.route(method, path, response)

        result = invoke(fake_daemon, *args)

        assert result.exit_code == 0
        assert json.loads(result.stdout) == response

    def test_events_json_prints_lines_as_received(
        self, fake_daemon: FakeDaemon
    ) -> None:
        line = json.dumps(EVENT).encode()
        fake_daemon.route(
            "GET", "/v1/events", chunks=[line + b"\n" + line[:10], line[10:]]
        )

        result = invoke(fake_daemon, "events", "--json")

        assert result.stdout_bytes == line + b"\n" + line + b"\n"

    @pytest.mark.usefixtures("local_time_utc_plus_two")
    def test_events_prints_one_line_per_record(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/events", chunks=[json.dumps(EVENT).encode()])

        result = invoke(fake_daemon, "events")

        [line] = result.stdout.splitlines()
        assert line.split() == [
            "7",
            "2025-03-01",
            "12:00:00",
            "pool/gpu",
            "PoolCreated",
            "alice",
            "pool=gpu",
        ]

    def test_events_rejects_a_line_that_is_not_json(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("GET", "/v1/events", chunks=[b"garbage\n"])

        result = invoke(fake_daemon, "events")

        assert result.exit_code == exit_codes.FAILED
        assert result.stderr.startswith("error: invalid response from dstackd at ")

    def test_logs_writes_bytes_unchanged(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/runs/r1/logs", chunks=[b"\xff\xfe raw\r\n"])

        result = invoke(fake_daemon, "logs", "r1")

        assert result.stdout_bytes == b"\xff\xfe raw\r\n"

    def test_ps_prints_the_runs_table(self, fake_daemon: FakeDaemon) -> None:
        fake_daemon.route("GET", "/v1/runs", [RUN])

        result = invoke(fake_daemon, "ps")

        header, row = result.stdout.splitlines()
        assert header.split()[0] == "RUN"
        assert row.split()[:2] == ["quiet-fox-1", "submitted"]

    @pytest.mark.parametrize("args", [["pool", "ps", "--watch"], ["ps", "--watch"]])
    def test_watch_renders_until_ctrl_c(
        self, fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, args: list[str]
    ) -> None:
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr("dstackctl.terminal.time.sleep", sleep)
        fake_daemon.route("GET", "/v1/instances", [INSTANCE])
        fake_daemon.route("GET", "/v1/runs", [RUN])

        result = invoke(fake_daemon, *args)

        assert result.exit_code == 0
        assert sleeps == [1.0, 1.0]
        assert len(fake_daemon.requests) == 2
        assert result.stdout.count("\n\n") == 2

    @pytest.mark.parametrize("args", [["pool", "ps"], ["ps"]])
    def test_watch_with_json_is_a_usage_error(
        self, fake_daemon: FakeDaemon, args: list[str]
    ) -> None:
        result = invoke(fake_daemon, *args, "--watch", "--json")

        assert result.exit_code == exit_codes.USAGE
        assert fake_daemon.requests == []


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CUT_STREAM = CHUNKED + b"6\r\nhello\n\r\n"
CUT_PROBLEM = "connection closed before the chunk size"
CLOSED_PROBLEM = "connection closed before the status line"
RUN_HINT = (
    "Run quiet-fox-1 keeps running without this client. Once dstackd is back, "
    "follow it with 'dstackctl logs -f quiet-fox-1' or check it with "
    "'dstackctl ps'.\n"
)
RUN_LOGS = "/v1/runs/quiet-fox-1/logs"

# Each case: the command, the routes as (method, path, raw response or JSON),
# the problem named in the message, and the hint printed after it.
DAEMON_GONE_CASES = [
    pytest.param(
        ["run", "sleep", "100"],
        [("POST", "/v1/runs", RUN), ("GET", RUN_LOGS, CUT_STREAM)],
        CUT_PROBLEM,
        RUN_HINT,
        id="run-log-stream",
    ),
    pytest.param(
        ["run", "sleep", "100"],
        [
            ("POST", "/v1/runs", RUN),
            ("GET", RUN_LOGS, CHUNKED + b"0\r\n\r\n"),
            ("GET", "/v1/runs/quiet-fox-1/wait", b""),
        ],
        CLOSED_PROBLEM,
        RUN_HINT,
        id="run-wait",
    ),
    pytest.param(
        ["events", "--follow"],
        [("GET", "/v1/events", CHUNKED + b"2\r\n{}\r\n")],
        CUT_PROBLEM,
        "",
        id="events-follow",
    ),
    pytest.param(
        ["logs", "-f", "r1"],
        [("GET", "/v1/runs/r1/logs", CUT_STREAM)],
        CUT_PROBLEM,
        "",
        id="logs-follow",
    ),
    pytest.param(
        ["stop", "x", "y"],
        [("POST", "/v1/runs/x/stop", b"")],
        CLOSED_PROBLEM,
        "",
        id="stop",
    ),
    pytest.param(["ps"], [("GET", "/v1/runs", b"")], CLOSED_PROBLEM, "", id="ps"),
]


class TestErrors:
    @pytest.mark.parametrize(("args", "routes", "problem", "hint"), DAEMON_GONE_CASES)
    def test_daemon_gone_exits_3_with_message(
        self,
        fake_daemon: FakeDaemon,
        args: list[str],
        routes: list[tuple[str, str, Any]],
        problem: str,
        hint: str,
    ) -> None:
        for method, path, response in routes:
            if isinstance(response, bytes):
                fake_daemon.route(method, path, raw=response)
            else:
                fake_daemon.route(method, path, response)

        result = invoke(fake_daemon, *args)

        assert result.exit_code == exit_codes.UNREACHABLE
        assert result.stderr == (
            f"error: lost the connection to dstackd at {fake_daemon.socket_path} "
            f"({problem}). The daemon stopped or restarted.\n{hint}"
        )
        assert len(fake_daemon.requests) == len(routes)

    def test_socket_help_names_every_default(self) -> None:
        result = CliRunner().invoke(cli, ["--help"], terminal_width=200)

        assert "$DSTACKD_SOCKET" in result.stdout
        assert "/run/dstackd/dstackd.sock as root" in result.stdout
        assert "$XDG_RUNTIME_DIR/dstackd.sock" in result.stdout
        assert "/tmp/dstackd-<uid>/dstackd.sock when XDG_RUNTIME_DIR" in result.stdout

    @pytest.mark.parametrize(
        ("status", "code", "exit_code"),
        [
            (404, "not_found", exit_codes.NOT_FOUND),
            (400, "invalid_value", exit_codes.USAGE),
            (400, "invalid_request", exit_codes.USAGE),
            (409, "conflict", exit_codes.FAILED),
            (500, "internal", exit_codes.FAILED),
        ],
    )
    def test_daemon_error_maps_exit_code(
        self, fake_daemon: FakeDaemon, status: int, code: str, exit_code: int
    ) -> None:
        fake_daemon.error("POST", "/v1/runs/x/stop", status, code, "run x: the reason")

        result = invoke(fake_daemon, "stop", "x")

        assert result.exit_code == exit_code
        assert result.stderr == "error: run x: the reason\n"

    def test_missing_socket_exits_3_naming_the_path(self, socket_dir: str) -> None:
        path = os.path.join(socket_dir, "absent.sock")

        result = CliRunner().invoke(cli, ["--socket", path, "pool", "ps"])

        assert result.exit_code == exit_codes.UNREACHABLE
        assert result.stderr == (
            f"error: cannot reach dstackd at {path}: No such file or directory. "
            "Start it with 'dstackd serve' or set DSTACKD_SOCKET.\n"
        )

    def test_dstackd_socket_variable_is_used_without_option(
        self, fake_daemon: FakeDaemon
    ) -> None:
        fake_daemon.route("GET", "/v1/runs", [])

        result = CliRunner().invoke(
            cli, ["ps"], env={"DSTACKD_SOCKET": fake_daemon.socket_path}
        )

        assert result.exit_code == 0
        assert len(fake_daemon.requests) == 1

    def test_socket_option_wins_over_the_variable(
        self, fake_daemon: FakeDaemon, socket_dir: str
    ) -> None:
        fake_daemon.route("GET", "/v1/runs", [])
        elsewhere = os.path.join(socket_dir, "elsewhere.sock")

        result = invoke(fake_daemon, "ps", env={"DSTACKD_SOCKET": elsewhere})

        assert result.exit_code == 0
        assert len(fake_daemon.requests) == 1

    @pytest.mark.parametrize(
        "args",
        [
            ["pool", "ps", "--no-such-option"],
            ["offer", "--spot", "--on-demand"],
            ["offer", "--max-offers", "0"],
            ["events", "--after", "-1"],
            ["pool", "remove"],
            ["run"],
        ],
        ids=" ".join,
    )
    def test_invalid_usage_exits_2_without_request(
        self, fake_daemon: FakeDaemon, args: list[str]
    ) -> None:
        result = invoke(fake_daemon, *args)

        assert result.exit_code == exit_codes.USAGE
        assert fake_daemon.requests == []


def run_entry_point(*args: str) -> subprocess.CompletedProcess[str]:
    """Run dstackctl as its console script does, in a fresh interpreter."""
    code = "from dstackctl.main import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entry_point_reports_unreachable_daemon_without_traceback(
    socket_dir: str,
) -> None:
    path = os.path.join(socket_dir, "absent.sock")

    result = run_entry_point("--socket", path, "ps")

    assert result.returncode == exit_codes.UNREACHABLE
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot reach dstackd at {path}: ")


def test_import_leaves_out_heavy_modules() -> None:
    code = "import sys, dstackctl.main; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(output.split())

    for module in [
        "aiohttp",
        "asyncio",
        "dstackd",
        "email",
        "events",
        "http.client",
        "msgspec",
        "structlog",
    ]:
        assert module not in loaded, f"dstackctl imports {module}"
