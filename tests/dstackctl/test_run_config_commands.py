"""dstackctl's side of run files: what run -f and apply send, profiles lookup,
the ps columns for endpoints and attempts, and a YAML-free startup."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dstackctl import tables
from dstackctl.main import cli
from dstackctl.run_config import find_profiles_files
from tests.dstackctl.fake_daemon import FakeDaemon
from tests.dstackctl.test_tables import NOW, make_run

RUN = make_run(status="submitted", instance=None)


def invoke(fake_daemon: FakeDaemon, *args: str, cwd: Path | None = None) -> Result:
    with _working_dir(cwd):
        return CliRunner().invoke(
            cli, ["--socket", fake_daemon.socket_path, *args], catch_exceptions=False
        )


class _working_dir:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.saved = os.getcwd()

    def __enter__(self) -> None:
        if self.path is not None:
            os.chdir(self.path)

    def __exit__(self, *exc_info: object) -> None:
        os.chdir(self.saved)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project directory with a run file, and an empty home directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root = tmp_path / "project"
    root.mkdir()
    (root / "task.yml").write_text("type: task\ncommands: [make]\n")
    yield root


def test_run_file_sends_path_and_text(fake_daemon: FakeDaemon, project: Path) -> None:
    fake_daemon.route("POST", "/v1/runs", RUN)

    result = invoke(fake_daemon, "run", "-d", "-f", "task.yml", cwd=project)

    body = fake_daemon.requests[0].json()
    assert result.exit_code == 0, result.output
    assert body["config"] == {
        "path": str(project / "task.yml"),
        "text": "type: task\ncommands: [make]\n",
    }
    assert "working_dir" not in body
    assert "argv" in body and body["argv"] == []
    assert "profiles" not in body


def test_apply_passes_flags_and_profiles(
    fake_daemon: FakeDaemon, project: Path
) -> None:
    fake_daemon.route("POST", "/v1/runs", RUN)
    (project / ".dstack").mkdir()
    (project / ".dstack" / "profiles.yml").write_text("profiles: []\n")
    home_profiles = Path(os.environ["HOME"]) / ".dstack"
    home_profiles.mkdir()
    (home_profiles / "profiles.yml").write_text("profiles: []  # home\n")

    result = invoke(
        fake_daemon,
        "apply",
        "-d",
        "-f",
        "task.yml",
        "--profile",
        "big",
        "--gpu",
        "A100",
        "-e",
        "A=1",
        "-w",
        "sub",
        cwd=project,
    )

    body = fake_daemon.requests[0].json()
    assert result.exit_code == 0, result.output
    assert body["profile"] == "big"
    assert body["resources"] == {"gpu": "A100"}
    assert body["env"] == {"A": "1"}
    assert body["working_dir"] == str(project / "sub")
    assert [source["path"] for source in body["profiles"]] == [
        str(project / ".dstack" / "profiles.yml"),
        str(home_profiles / "profiles.yml"),
    ]


def test_apply_requires_file(fake_daemon: FakeDaemon) -> None:
    result = CliRunner().invoke(cli, ["--socket", fake_daemon.socket_path, "apply"])

    assert result.exit_code == 2
    assert "Missing option '-f'" in result.output
    assert fake_daemon.requests == []


def test_run_without_command_or_file_is_usage_error(fake_daemon: FakeDaemon) -> None:
    result = CliRunner().invoke(cli, ["--socket", fake_daemon.socket_path, "run"])

    assert result.exit_code == 2
    assert "give COMMAND, or a run configuration with -f FILE" in result.output


def test_unreadable_file_is_usage_error(fake_daemon: FakeDaemon, project: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["--socket", fake_daemon.socket_path, "apply", "-f", str(project / "no.yml")],
    )

    assert result.exit_code == 2
    assert "cannot read" in result.output
    assert fake_daemon.requests == []


def test_profiles_lookup_skips_missing_files(project: Path) -> None:
    assert find_profiles_files(str(project)) == []


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        pytest.param({}, "running", id="plain"),
        pytest.param({"attempt": 3}, "running (attempt 3)", id="retried"),
        pytest.param({"restarts": 1}, "running (1 restart)", id="restarted"),
        pytest.param(
            {"attempt": 2, "restarts": 2}, "running (attempt 2, 2 restarts)", id="both"
        ),
    ],
)
def test_run_status_shows_attempts(fields: dict[str, object], status: str) -> None:
    assert tables.format_run_status(make_run(**fields)) == status


def test_runs_table_adds_endpoint_column() -> None:
    service = make_run(name="web", url="http://127.0.0.1:8000", type="service")
    task = make_run(name="nb", ports=[8888])

    lines = tables.runs_table([service, task], NOW).splitlines()

    assert lines[0].split()[3] == "ENDPOINT"
    assert lines[1].split()[3] == "http://127.0.0.1:8000"
    assert lines[2].split()[3:5] == ["ports", "8888"]


def test_import_leaves_out_yaml() -> None:
    code = "import sys, dstackctl.main; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout

    assert "yaml" not in output.split()
    assert "termios" not in output.split()
