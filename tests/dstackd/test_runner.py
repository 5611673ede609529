"""Tests of local runs with real processes: the fork server, the supervisors,
and the daemon-side runner that starts, waits for, stops and adopts them."""

import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dstackd.backends.local import LocalBackend, LocalInventory, Reservation
from dstackd.runner import (
    LocalRunner,
    RunHandle,
    RunLaunch,
    RunLostError,
    RunStartError,
    read_exit_status,
)
from dstackd.spawner import read_start_time
from events.errors import InvalidValueError
from events.grammar import build_requirements
from events.model import Gpu

# Bound on any single wait in these tests; runs here take milliseconds.
WAIT_SECONDS = 20.0


@pytest.fixture
def run_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dsd-run-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Runs:
    """Starts runs and aborts at teardown those a failed test left running."""

    def __init__(self, runner: LocalRunner, root: Path) -> None:
        self.runner = runner
        self.root = root
        self.handles: list[RunHandle] = []
        self.stray_pids: list[int] = []

    def launch(self, run_id: str, **fields: Any) -> RunLaunch:
        return RunLaunch(run_id=run_id, run_dir=str(self.root / run_id), **fields)

    async def start(self, run_id: str, **fields: Any) -> RunHandle:
        with anyio.fail_after(WAIT_SECONDS):
            handle = await self.runner.start(self.launch(run_id, **fields))

        self.handles.append(handle)

        return handle

    async def wait(self, handle: RunHandle) -> int:
        with anyio.fail_after(WAIT_SECONDS):
            return await self.runner.wait(handle)

    def fifo(self, name: str) -> Path:
        path = self.root / name
        os.mkfifo(path)

        return path

    async def cleanup(self) -> None:
        with anyio.fail_after(WAIT_SECONDS):
            for handle in self.handles:
                await self.runner.stop(handle, abort=True)

        for pid in self.stray_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def start_runner() -> LocalRunner:
    with anyio.fail_after(WAIT_SECONDS):
        return await LocalRunner.start_spawner()


async def close_runner(runner: LocalRunner) -> None:
    with anyio.fail_after(WAIT_SECONDS):
        await runner.aclose()


@pytest.fixture
async def runner() -> AsyncIterator[LocalRunner]:
    runner = await start_runner()
    yield runner
    await close_runner(runner)


@pytest.fixture
async def runs(runner: LocalRunner, run_root: Path) -> AsyncIterator[Runs]:
    runs = Runs(runner, run_root)
    yield runs
    await runs.cleanup()


async def read_fifo_line(path: Path) -> str:
    """Read one line that a run writes into the FIFO at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        with anyio.fail_after(WAIT_SECONDS):
            while not data.endswith(b"\n"):
                await anyio.wait_readable(fd)
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"{path} closed after {data!r}")

                data += chunk
    finally:
        os.close(fd)

    return data.decode()


async def wait_for_exit(pid: int) -> None:
    """Wait until ``pid`` exited, through a pidfd as the daemon does."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return

    try:
        with anyio.fail_after(WAIT_SECONDS):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def process_exists(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_bytes().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False

    return state != b"Z"


def python_task(source: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(source)]


class TestExitStatus:
    @pytest.mark.parametrize(
        ("command", "status"),
        [
            pytest.param("exit 0", 0, id="success"),
            pytest.param("exit 3", 3, id="failure"),
            pytest.param("kill -KILL $$", 128 + 9, id="sigkill"),
            pytest.param("kill -TERM $$", 128 + 15, id="sigterm"),
        ],
    )
    async def test_exit_status_comes_through(
        self, runs: Runs, command: str, status: int
    ) -> None:
        handle = await runs.start("r1", commands=[command])

        assert await runs.wait(handle) == status
        assert read_exit_status(handle.run_dir) == status

    async def test_exit_status_file_records_signal(self, runs: Runs) -> None:
        handle = await runs.start("r1", commands=["kill -KILL $$"])
        await runs.wait(handle)

        record = json.loads(Path(handle.run_dir, "exit_status").read_text())

        assert record["exit_status"] == 137
        assert record["signal"] == 9
        assert not Path(handle.run_dir, "exit_status.tmp").exists()

    async def test_commands_stop_at_first_failing_line(self, runs: Runs) -> None:
        handle = await runs.start("r1", commands=["echo one", "false", "echo two"])

        assert await runs.wait(handle) == 1
        assert Path(handle.log_path).read_text() == "one\n"

    async def test_argv_is_found_on_path(self, runs: Runs) -> None:
        handle = await runs.start("r1", argv=["sh", "-c", "exit 4"])

        assert await runs.wait(handle) == 4

    async def test_concurrent_starts_get_their_own_runs(self, runs: Runs) -> None:
        statuses: dict[int, int] = {}

        async def start_and_wait(number: int) -> None:
            handle = await runs.start(f"r{number}", commands=[f"exit {number}"])
            statuses[number] = await runs.wait(handle)

        async with anyio.create_task_group() as group:
            for number in range(8):
                group.start_soon(start_and_wait, number)

        assert statuses == {number: number for number in range(8)}


class TestStartFailures:
    @pytest.mark.parametrize(
        ("fields", "status", "message"),
        [
            pytest.param(
                {"argv": ["no-such-command-dstackd"]},
                127,
                "dstackd: no-such-command-dstackd: command not found\n",
                id="command-not-found",
            ),
            pytest.param(
                {"argv": ["/dev/null"]},
                126,
                "dstackd: /dev/null: cannot execute: Permission denied\n",
                id="not-executable",
            ),
            pytest.param(
                {"argv": ["true"], "working_dir": "/no-such-dir-dstackd"},
                126,
                "dstackd: cannot enter working directory /no-such-dir-dstackd: "
                "No such file or directory\n",
                id="bad-working-dir",
            ),
        ],
    )
    async def test_exec_failure_is_logged_with_shell_status(
        self, runs: Runs, fields: dict[str, Any], status: int, message: str
    ) -> None:
        handle = await runs.start("r1", **fields)

        assert await runs.wait(handle) == status
        assert Path(handle.log_path).read_text() == message

    @pytest.mark.parametrize(
        "fields",
        [
            pytest.param({}, id="neither"),
            pytest.param({"argv": ["true"], "commands": ["true"]}, id="both"),
        ],
    )
    async def test_launch_needs_argv_or_commands(
        self, runs: Runs, fields: dict[str, Any]
    ) -> None:
        with pytest.raises(InvalidValueError, match="exactly one of them non-empty"):
            await runs.start("r1", **fields)

    async def test_unusable_run_dir_fails_the_start(self, runs: Runs) -> None:
        (runs.root / "r1" / "output.log").mkdir(parents=True)

        with pytest.raises(RunStartError, match="run r1 could not start: IsADirectory"):
            await runs.start("r1", argv=["true"])

    async def test_run_dir_under_a_file_fails_the_start(self, runs: Runs) -> None:
        (runs.root / "file").write_text("")

        with pytest.raises(RunStartError, match="cannot create run directory"):
            run_dir = str(runs.root / "file" / "r1")
            await runs.runner.start(
                RunLaunch(run_id="r1", argv=["true"], run_dir=run_dir)
            )


class TestEnvironment:
    async def test_output_goes_to_log_in_order(self, runs: Runs) -> None:
        commands = ["echo out", "echo err >&2", "echo end"]

        handle = await runs.start("r1", commands=commands)
        await runs.wait(handle)

        assert Path(handle.log_path).read_text() == "out\nerr\nend\n"
        assert handle.log_path == str(runs.root / "r1" / "output.log")

    async def test_env_cwd_and_affinity_are_applied(
        self, run_root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DSTACKD_TEST_SECRET", "daemon-only")
        cpu_id = min(os.sched_getaffinity(0))
        work = run_root / "work"
        work.mkdir()
        source = """
            import json, os
            print(json.dumps({
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "cpus": sorted(os.sched_getaffinity(0)),
                "stdin": os.read(0, 10).decode(),
            }))
        """
        runner = await start_runner()
        try:
            runs = Runs(runner, run_root)
            handle = await runs.start(
                "r1",
                argv=python_task(source),
                env={"FOO": "bar", "LANG": "en_US.UTF-8"},
                working_dir=str(work),
                cpu_ids=[cpu_id],
            )
            assert await runs.wait(handle) == 0
        finally:
            await close_runner(runner)

        report = json.loads(Path(handle.log_path).read_text())
        env = report["env"]
        user = pwd.getpwuid(os.getuid())
        assert env["FOO"] == "bar"
        assert env["LANG"] == "en_US.UTF-8"
        assert env["HOME"] == user.pw_dir
        assert env["USER"] == user.pw_name
        assert env["PATH"]
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "DSTACKD_TEST_SECRET" not in env
        assert report["cwd"] == str(work)
        assert report["cpus"] == [cpu_id]
        assert report["stdin"] == ""

    async def test_env_cannot_override_gpu_visibility(self, runs: Runs) -> None:
        handle = await runs.start(
            "r1",
            commands=['printf "%s" "$CUDA_VISIBLE_DEVICES"'],
            env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            gpu_indices=[2],
        )
        await runs.wait(handle)

        assert Path(handle.log_path).read_text() == "2"

    async def test_declared_gpus_are_split_between_runs(
        self, runs: Runs, run_root: Path
    ) -> None:
        inventory = LocalInventory(cpus=8, memory_gb=64.0, gpus=[Gpu("A100", 80.0)] * 4)
        backend = LocalBackend(inventory, data_dir=str(run_root))
        real_cpus = os.sched_getaffinity(0)
        requested = [{"gpu": "2"}, {"gpu": "2"}, {}]
        source = """
            import json, os
            print(json.dumps([
                os.environ["CUDA_VISIBLE_DEVICES"], sorted(os.sched_getaffinity(0))
            ]))
        """
        expected = []
        handles = []
        for number, requirements in enumerate(requested):
            gpu_requirements = build_requirements(
                cpu="1", memory="8GB", **requirements
            )
            offer = (await backend.list_offers(gpu_requirements))[0]
            provisioned = await backend.create(f"i-{number}", offer)
            reservation = Reservation.from_backend_data(provisioned.backend_data)
            handles.append(
                await runs.start(
                    f"r{number}",
                    argv=python_task(source),
                    cpu_ids=reservation.cpu_ids,
                    gpu_indices=reservation.gpu_indices,
                )
            )
            # CPU ids past this machine's own are dropped from the affinity;
            # with none left, the run keeps the whole machine.
            usable = set(reservation.cpu_ids) & real_cpus or real_cpus
            expected.append(
                [",".join(map(str, reservation.gpu_indices)), sorted(usable)]
            )

        reports = []
        for handle in handles:
            assert await runs.wait(handle) == 0
            reports.append(json.loads(Path(handle.log_path).read_text()))

        assert [report[0] for report in reports] == ["0,1", "2,3", ""]
        assert reports == expected

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
    async def test_root_daemon_runs_task_as_calling_user(self, runs: Runs) -> None:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user named nobody")

        handle = await runs.start(
            "r1",
            commands=["id -u", "id -g", "id -G", 'echo "$HOME $USER"', "pwd"],
            uid=nobody.pw_uid,
            gid=nobody.pw_gid,
        )
        assert await runs.wait(handle) == 0

        lines = Path(handle.log_path).read_text().splitlines()
        groups = os.getgrouplist(nobody.pw_name, nobody.pw_gid)
        assert lines[0] == str(nobody.pw_uid)
        assert lines[1] == str(nobody.pw_gid)
        assert sorted(map(int, lines[2].split())) == sorted(set(groups))
        assert lines[3] == f"{nobody.pw_dir} {nobody.pw_name}"
        expected_cwd = nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/"
        assert lines[4] == expected_cwd


# A task with a child in its process group and a double-forked grandchild in a
# session of its own, which reports their pids through a FIFO and then blocks.
# With "obey-term", the grandchild logs the SIGTERM it gets and exits, and the
# task dies of SIGTERM only after the grandchild is gone, so the task's status
# shows that the SIGTERM reached the grandchild. With "ignore-term", every
# process ignores SIGTERM.
TREE_TASK = """
    import json, os, signal, subprocess, sys
    fifo, mode = sys.argv[1], sys.argv[2]
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"])
    pid_read, pid_write = os.pipe()
    alive_read, alive_write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            def on_term(signum, frame):
                os.write(1, b"grandchild got SIGTERM\\n")
                os._exit(0)
            if mode == "obey-term":
                signal.signal(signal.SIGTERM, on_term)
            os.write(pid_write, str(os.getpid()).encode())
            os.close(pid_write)
            while True:
                signal.pause()
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(pid_write)
    os.close(alive_write)
    grandchild = int(os.read(pid_read, 32))
    def on_term(signum, frame):
        while os.read(alive_read, 1):
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if mode == "obey-term":
        signal.signal(signal.SIGTERM, on_term)
    with open(fifo, "w") as out:
        out.write(json.dumps([os.getpid(), child.pid, grandchild]) + "\\n")
    while True:
        signal.pause()
"""


class TestStop:
    @pytest.mark.parametrize(
        ("mode", "grace_seconds", "abort", "status", "term_logged"),
        [
            pytest.param("obey-term", 10.0, False, 128 + 15, True, id="sigterm"),
            pytest.param(
                "ignore-term", 0.0, False, 128 + 9, False, id="grace-expired"
            ),
            pytest.param("obey-term", 10.0, True, 128 + 9, False, id="abort"),
        ],
    )
    async def test_stop_kills_whole_tree(
        self,
        runs: Runs,
        mode: str,
        grace_seconds: float,
        abort: bool,
        status: int,
        term_logged: bool,
    ) -> None:
        fifo = runs.fifo("pids")
        handle = await runs.start("r1", argv=[*python_task(TREE_TASK), str(fifo), mode])
        pids = json.loads(await read_fifo_line(fifo))
        runs.stray_pids.extend(pids)

        with anyio.fail_after(WAIT_SECONDS):
            await runs.runner.stop(handle, grace_seconds=grace_seconds, abort=abort)

        assert not process_exists(handle.pid)
        for pid in pids:
            assert not process_exists(pid), f"pid {pid} survived the stop"

        assert await runs.wait(handle) == status
        log_text = Path(handle.log_path).read_text()
        assert ("grandchild got SIGTERM" in log_text) == term_logged

    async def test_leftover_processes_die_with_the_task(self, runs: Runs) -> None:
        fifo = runs.fifo("pid")
        command = f"sleep 1000 & echo $! > {fifo}"

        handle = await runs.start("r1", commands=[command, "exit 0"])
        background = int(await read_fifo_line(fifo))
        runs.stray_pids.append(background)

        assert await runs.wait(handle) == 0
        assert not process_exists(background)

    async def test_stop_of_ended_run_returns_at_once(self, runs: Runs) -> None:
        handle = await runs.start("r1", commands=["exit 2"])
        await runs.wait(handle)

        with anyio.fail_after(WAIT_SECONDS):
            await runs.runner.stop(handle)

        assert await runs.wait(handle) == 2


# Waits for SIGUSR2 (then exits 3) after reporting its pid through a FIFO.
SIGNAL_TASK = "trap 'exit 3' USR2; echo $$ > {fifo}; sleep 1000 & wait"


class TestAdoption:
    @pytest.mark.parametrize("ending", ["spawner-killed", "runner-closed"])
    async def test_new_runner_adopts_live_run(
        self, run_root: Path, ending: str
    ) -> None:
        first = Runs(await start_runner(), run_root)
        fifo = first.fifo("pid")
        handle = await first.start("r1", commands=[SIGNAL_TASK.format(fifo=fifo)])
        task_pid = int(await read_fifo_line(fifo))
        first.stray_pids.append(task_pid)
        spawner_pid = first.runner.spawner_pid
        assert spawner_pid is not None

        if ending == "spawner-killed":
            os.kill(spawner_pid, signal.SIGKILL)

        await close_runner(first.runner)
        second = Runs(await start_runner(), run_root)
        try:
            adopted = second.runner.adopt(
                "r1", handle.pid, handle.pid_start_time, handle.run_dir
            )
            assert not process_exists(spawner_pid)
            assert adopted == handle

            os.kill(task_pid, signal.SIGUSR2)

            assert await second.wait(adopted) == 3
        finally:
            second.handles.append(handle)
            await second.cleanup()
            await close_runner(second.runner)

    async def test_run_ended_unwatched_leaves_exit_status(self, run_root: Path) -> None:
        first = Runs(await start_runner(), run_root)
        handle = await first.start("r1", commands=["exit 5"])
        await close_runner(first.runner)
        await wait_for_exit(handle.pid)
        second = await start_runner()
        try:
            adopted = second.adopt(
                "r1", handle.pid, handle.pid_start_time, handle.run_dir
            )
        finally:
            await close_runner(second)

        assert adopted is None
        assert read_exit_status(handle.run_dir) == 5

    async def test_adopt_rejects_reused_pid(self, runner: LocalRunner) -> None:
        pid = os.getpid()
        start_time = read_start_time(pid)
        assert start_time is not None

        assert runner.adopt("r1", pid, start_time + 1, "/tmp/r1") is None
        assert runner.adopt("r1", 2**31 - 1, start_time, "/tmp/r1") is None

    async def test_wait_reports_lost_supervisor(self, runs: Runs) -> None:
        fifo = runs.fifo("pid")
        commands = [f"echo $$ > {fifo}", "exec sleep 1000"]
        handle = await runs.start("r1", commands=commands)
        runs.stray_pids.append(int(await read_fifo_line(fifo)))

        os.kill(handle.pid, signal.SIGKILL)

        with pytest.raises(RunLostError, match="exited without writing .*exit_status"):
            await runs.wait(handle)

    async def test_runner_restarts_dead_spawner(self, runs: Runs) -> None:
        old_pid = runs.runner.spawner_pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_for_exit(old_pid)

        handle = await runs.start("r1", commands=["exit 6"])

        assert await runs.wait(handle) == 6
        assert runs.runner.spawner_pid not in (None, old_pid)
