"""Runs over SSH against the test SSH server: output, exit status, stop, adopt,
and a host that stops answering mid-run."""

import stat
import time
import uuid
from pathlib import Path

import anyio
import pytest

from dstackd.runner import RunLaunch, RunLostError, RunStartError
from dstackd.ssh_runner import SshRunHandle, SshRunner
from tests.dstackd.remote_fixtures import (  # noqa: F401 (fixtures)
    SshServer,
    ssh_root,
    ssh_server,
)

WAIT_SECONDS = 30


def launch(
    server: SshServer, root: Path, *, commands: list[str], **fields: object
) -> RunLaunch:
    run_id = "r-" + uuid.uuid4().hex[:12]
    return RunLaunch(
        run_id=run_id,
        commands=commands,
        run_dir=str(root / "runs" / run_id),
        backend_data=server.backend_data(),
        **fields,  # type: ignore[arg-type]
    )


async def wait_for_file(path: Path) -> str:
    with anyio.fail_after(WAIT_SECONDS):
        while not (path.exists() and path.read_text().strip()):
            await anyio.sleep(0.02)

    return path.read_text().strip()


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False

    return state not in ("Z", "X")


class TestOutcome:
    async def test_output_and_exit_status_come_back(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        run = launch(
            ssh_server, ssh_root, commands=["echo hello", "echo oops >&2", "exit 3"]
        )

        handle = await runner.start(run)
        with anyio.fail_after(WAIT_SECONDS):
            status = await runner.wait(handle)

        assert status == 3
        assert Path(handle.log_path).read_text() == "hello\noops\n"

    async def test_first_failing_line_ends_commands(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        run = launch(ssh_server, ssh_root, commands=["echo one", "false", "echo two"])

        handle = await runner.start(run)
        with anyio.fail_after(WAIT_SECONDS):
            status = await runner.wait(handle)

        assert status == 1
        assert Path(handle.log_path).read_text() == "one\n"

    async def test_env_values_reach_task_but_not_command_line(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        secret = "s3cret 'quoted' $value"
        run = launch(
            ssh_server, ssh_root, commands=['echo "$TOKEN"'], env={"TOKEN": secret}
        )

        handle = await runner.start(run)
        with anyio.fail_after(WAIT_SECONDS):
            await runner.wait(handle)

        env_file = ssh_server.remote_run_dir(run.run_id) / "env"
        assert Path(handle.log_path).read_text() == secret + "\n"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    async def test_missing_working_dir_falls_back_to_home(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        run = launch(ssh_server, ssh_root, commands=["pwd"], working_dir="/no/such/dir")

        handle = await runner.start(run)
        with anyio.fail_after(WAIT_SECONDS):
            status = await runner.wait(handle)

        lines = Path(handle.log_path).read_text().splitlines()
        assert status == 0
        assert "/no/such/dir does not exist on this host" in lines[0]
        assert lines[1] == str(ssh_server.home)


class TestStop:
    async def test_stop_kills_the_remote_process_tree(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        pid_file = ssh_root / "grandchild.pid"
        run = launch(
            ssh_server, ssh_root, commands=[f"sleep 300 & echo $! > {pid_file}; wait"]
        )
        handle = await runner.start(run)
        grandchild = int(await wait_for_file(pid_file))
        statuses: list[int] = []

        async with anyio.create_task_group() as task_group:

            async def watch() -> None:
                statuses.append(await runner.wait(handle))

            task_group.start_soon(watch)
            with anyio.fail_after(WAIT_SECONDS):
                await runner.stop(handle, grace_seconds=5)

        assert statuses == [143]
        assert not pid_alive(grandchild)

    async def test_abort_kills_a_task_that_ignores_sigterm(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner()
        ready = ssh_root / "ready"
        run = launch(
            ssh_server,
            ssh_root,
            commands=[
                f"trap '' TERM; echo 1 > {ready}; while true; do sleep 0.1; done"
            ],
        )
        handle = await runner.start(run)
        await wait_for_file(ready)

        started = time.monotonic()
        with anyio.fail_after(WAIT_SECONDS):
            await runner.stop(handle, abort=True)
            status = await runner.wait(handle)

        assert status == 137
        assert time.monotonic() - started < 5


class TestRestart:
    async def test_new_runner_adopts_a_running_run(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        go = ssh_root / "go"
        run = launch(
            ssh_server,
            ssh_root,
            commands=[
                "echo before",
                f"while [ ! -e {go} ]; do sleep 0.05; done",
                "echo after",
                "exit 7",
            ],
        )
        first = await SshRunner().start(run)

        adopted = SshRunner().adopt(
            run.run_id, first.pid, first.pid_start_time, run.run_dir, run.backend_data
        )
        assert adopted is not None
        go.touch()
        with anyio.fail_after(WAIT_SECONDS):
            status = await SshRunner().wait(adopted)

        assert status == 7
        assert Path(adopted.log_path).read_text() == "before\nafter\n"

    async def test_adopted_run_that_ended_returns_its_status(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        run = launch(ssh_server, ssh_root, commands=["echo done", "exit 5"])
        first = await SshRunner().start(run)
        await wait_for_file(ssh_server.remote_run_dir(run.run_id) / "exit_status")

        adopted = SshRunner().adopt(
            run.run_id, first.pid, first.pid_start_time, run.run_dir, run.backend_data
        )
        assert adopted is not None
        with anyio.fail_after(WAIT_SECONDS):
            status = await SshRunner().wait(adopted)

        assert status == 5
        assert Path(adopted.log_path).read_text() == "done\n"

    async def test_second_start_of_same_run_starts_nothing(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        counter = ssh_root / "count"
        run = launch(
            ssh_server, ssh_root, commands=[f"echo x >> {counter}", "sleep 0.3"]
        )
        runner = SshRunner()

        first = await runner.start(run)
        second = await runner.start(run)
        with anyio.fail_after(WAIT_SECONDS):
            await runner.wait(second)

        assert second.pid == first.pid
        assert counter.read_text() == "x\n"


class TestUnreachableHost:
    async def test_host_that_stops_answering_mid_run_is_followed_again(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner(connect_timeout=1, keepalive_interval=0.3)
        go = ssh_root / "go"
        run = launch(
            ssh_server,
            ssh_root,
            commands=[
                "echo start",
                f"while [ ! -e {go} ]; do sleep 0.05; done",
                "echo end",
                "exit 4",
            ],
        )
        handle = await runner.start(run)
        statuses: list[int] = []

        async with anyio.create_task_group() as task_group:

            async def watch() -> None:
                statuses.append(await runner.wait(handle))

            task_group.start_soon(watch)
            await wait_for_file(Path(handle.log_path))
            ssh_server.pause()
            try:
                # Three missed keepalives and a failed reconnect at least.
                await anyio.sleep(2.5)
                go.touch()
                await wait_for_file(
                    ssh_server.remote_run_dir(run.run_id) / "exit_status"
                )
                assert statuses == []
            finally:
                ssh_server.resume()

            with anyio.fail_after(WAIT_SECONDS):
                while not statuses:
                    await anyio.sleep(0.05)

        assert statuses == [4]
        assert Path(handle.log_path).read_text() == "start\nend\n"

    async def test_host_unreachable_too_long_loses_the_run(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner(
            connect_timeout=0.5, keepalive_interval=0.2, lost_after_seconds=1.5
        )
        run = launch(ssh_server, ssh_root, commands=["echo start", "sleep 300"])
        handle = await runner.start(run)
        ssh_server.pause()
        try:
            with anyio.fail_after(WAIT_SECONDS):
                with pytest.raises(RunLostError, match="unreachable for 1.5s"):
                    await runner.wait(handle)
        finally:
            ssh_server.resume()

    async def test_stop_of_unreachable_host_gives_the_run_up(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner(connect_timeout=0.5, keepalive_interval=0.2)
        run = launch(ssh_server, ssh_root, commands=["sleep 300"])
        handle: SshRunHandle = await runner.start(run)
        ssh_server.pause()
        try:
            with anyio.fail_after(WAIT_SECONDS):
                await runner.stop(handle, grace_seconds=1)
                with pytest.raises(RunLostError, match="stopped while"):
                    await runner.wait(handle)
        finally:
            ssh_server.resume()

    async def test_start_retries_until_host_answers(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner(connect_timeout=0.5, start_retry_seconds=20)
        run = launch(ssh_server, ssh_root, commands=["echo late"])
        ssh_server.pause()
        handles: list[SshRunHandle] = []

        async with anyio.create_task_group() as task_group:

            async def start() -> None:
                handles.append(await runner.start(run))

            task_group.start_soon(start)
            await anyio.sleep(1.5)
            started_while_paused = bool(handles)
            ssh_server.resume()

        with anyio.fail_after(WAIT_SECONDS):
            status = await runner.wait(handles[0])

        assert started_while_paused is False
        assert status == 0
        assert Path(handles[0].log_path).read_text() == "late\n"

    async def test_start_gives_up_after_retry_period(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        runner = SshRunner(connect_timeout=0.3, start_retry_seconds=1)
        run = launch(ssh_server, ssh_root, commands=["true"])
        ssh_server.pause()
        try:
            with anyio.fail_after(WAIT_SECONDS):
                with pytest.raises(RunStartError, match="timed out"):
                    await runner.start(run)
        finally:
            ssh_server.resume()

    async def test_wait_stops_once_run_ended_in_log(
        self, ssh_server: SshServer, ssh_root: Path
    ) -> None:
        ended: set[str] = set()
        runner = SshRunner(
            connect_timeout=0.3,
            keepalive_interval=0.2,
            is_active=lambda run_id: run_id not in ended,
        )
        run = launch(ssh_server, ssh_root, commands=["sleep 300"])
        handle = await runner.start(run)
        ssh_server.pause()
        try:
            ended.add(run.run_id)
            with anyio.fail_after(WAIT_SECONDS):
                with pytest.raises(RunLostError, match="ended in the log"):
                    await runner.wait(handle)
        finally:
            ssh_server.resume()
