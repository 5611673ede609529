"""Fixtures that start the real dstackd process and drive it with the real CLI."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 20.0
COMMAND_TIMEOUT_SECONDS = 60.0

# A declared inventory so placement does not depend on this machine's size.
DEFAULT_CONFIG = """
[daemon]
stop_grace_seconds = 2

[local]
cpus = 16
memory = "64GB"
disk = "500GB"

[[local.gpus]]
name = "A100"
memory = "80GB"
count = 2
"""


class DaemonProcess:
    """A dstackd started for one test, with its own data dir and socket."""

    def __init__(self, root: Path, config: str = DEFAULT_CONFIG) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "d.sock"
        self.config = root / "dstackd.toml"
        self.config.write_text(config)
        self.output = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DSTACKD_SOCKET"] = str(self.socket)
        return env

    def start(self) -> None:
        output = open(self.output, "ab")
        self.process = subprocess.Popen(
            [
                str(BIN / "dstackd"),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--socket",
                str(self.socket),
                "--config",
                str(self.config),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        output.close()
        self.wait_serving()

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"dstackd exited with {self.process.returncode}:\n{self.log_text()}"
                )

            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.02)

        raise AssertionError(f"dstackd did not serve within {START_TIMEOUT_SECONDS}s")

    def log_text(self) -> str:
        return self.output.read_text(errors="replace")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=COMMAND_TIMEOUT_SECONDS)

    def stop(self) -> int:
        """Stop with SIGTERM and return the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0

        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=COMMAND_TIMEOUT_SECONDS)

    def stop_active_runs(self) -> None:
        """Abort runs a test left behind, since their supervisors outlive the daemon."""
        if self.process is None or self.process.poll() is not None:
            return

        result = self.ctl("ps", "--json")
        if result.returncode != 0:
            return

        names = [run["name"] for run in json.loads(result.stdout)]
        if names:
            self.ctl("stop", "--abort", *names)

    def ctl(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT_SECONDS,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "dstackctl"), "--socket", str(self.socket), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd,
        )

    def ctl_ok(self, *args: str, **kwargs: Any) -> str:
        result = self.ctl(*args, **kwargs)
        assert result.returncode == 0, (
            f"dstackctl {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
        return result.stdout

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl_ok(*args, "--json"))

    def events(self) -> list[dict[str, Any]]:
        output = self.ctl_ok("events", "--json")
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def wait_for_event(
        self, type_name: str, timeout: float = 20.0, **fields: Any
    ) -> dict[str, Any]:
        """Follow the log until an event of ``type_name`` with ``fields`` appears."""
        process = subprocess.Popen(
            [str(BIN / "dstackctl"), "--socket", str(self.socket), "events", "--follow", "--json"],
            stdout=subprocess.PIPE,
            text=True,
            env=self.env(),
        )
        found: dict[str, Any] | None = None
        timer = _Watchdog(process, timeout)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                record = json.loads(line)
                event = record["event"]
                if record["type"] == type_name and all(
                    event.get(key) == value for key, value in fields.items()
                ):
                    found = record
                    break
        finally:
            timer.cancel()
            process.kill()
            process.wait()

        if found is None:
            raise AssertionError(f"no {type_name} {fields} within {timeout}s")

        return found


class _Watchdog:
    """Kills a process after a timeout, to bound a blocking read."""

    def __init__(self, process: subprocess.Popen[str], timeout: float) -> None:
        import threading

        self._timer = threading.Timer(timeout, process.kill)
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory, since AF_UNIX paths are limited to ~108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dsd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp)
    process.start()
    yield process
    process.stop_active_runs()
    process.stop()
