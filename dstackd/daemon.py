"""The daemon process: assembles the parts, recovers from the log, serves, stops.

Start-up order: take the single-instance locks, open the log and rebuild the
state, give the backends their live instances back, re-adopt running runs,
re-arm idle deadlines, then bind the socket and tell systemd it is ready.
Shutdown on SIGTERM or SIGINT stops accepting requests, lets in-flight appends
finish and closes the log cleanly; runs keep running under their supervisors.
"""

import os
from pathlib import Path
import signal
import socket
from collections.abc import Sequence
from functools import partial

import anyio
import structlog
from aiohttp import web

from dstackd import systemd
from dstackd.backends.base import Backend, LiveInstance
from dstackd.backends.local import LocalBackend, LocalInventory
from dstackd.backends.ssh import SshBackend
from dstackd.commands import Commands
from dstackd.config import Config
from dstackd.core import Core
from dstackd.daemon_id import load_daemon_id
from dstackd.health import HealthChecker
from dstackd.lockfile import acquire_lock
from dstackd.paths import Paths, ensure_dirs
from dstackd.reaper import IdleReaper
from dstackd.run_limits import RunLimits
from dstackd.runner import LocalRunner, read_exit_status
from dstackd.runs import RunFiles
from dstackd.scheduler import Scheduler
from dstackd.services import ServiceProbes
from dstackd.server import Api
from dstackd.ssh_runner import SshRunner
from events.event_types import InstanceTerminationRequested
from events.grammar import parse_size
from events.log import EventLog
from events.model import DAEMON_ACTOR, Gpu
from events.projection import ACTIVE_RUN_STATUSES
from events.record import NewEvent, Record
from events.snapshot import load_state, save_snapshot

log = structlog.get_logger("dstackd.daemon")

# How long open requests (followed logs and events) may run on at shutdown.
SHUTDOWN_TIMEOUT_SECONDS = 1.0


class Daemon:
    """One running dstackd."""

    def __init__(self, paths: Paths, config: Config) -> None:
        self.paths = paths
        self.config = config
        self._records_since_snapshot = 0
        self._snapshot_due = anyio.Event()

    async def serve(self, listening: socket.socket | None = None) -> None:
        """Run until SIGTERM or SIGINT."""
        ensure_dirs(self.paths)
        locks = [acquire_lock(self.paths.lock_file), acquire_lock(self.paths.socket + ".lock")]
        try:
            await self._serve_locked(listening)
        finally:
            for lock in reversed(locks):
                lock.release()

    async def _serve_locked(self, listening: socket.socket | None) -> None:
        restrict_log_files(self.paths.log_db)
        event_log = await EventLog.open(self.paths.log_db)
        try:
            state = await load_state(event_log)
            log.info(
                "state_loaded",
                position=state.checkpoint,
                live_instances=len(state.live_instances()),
                active_runs=len(state.active_runs()),
            )
            core = Core(event_log, state)
            await self._run_parts(core, listening)
        finally:
            await event_log.close()
            log.info("log_closed")

    def _backends(self) -> dict[str, Backend]:
        backends: dict[str, Backend] = {}
        local = self.config.local
        if local.enabled:
            inventory = LocalInventory(
                cpus=local.cpus,
                memory_gb=parse_size(local.memory, "local.memory") if local.memory else None,
                disk_gb=parse_size(local.disk, "local.disk") if local.disk else None,
                gpus=_declared_gpus(self.config),
                price_per_hour=local.price_per_hour,
                region=local.region,
            )
            backends["local"] = LocalBackend(inventory, data_dir=self.paths.data_dir)

        backends["ssh"] = SshBackend(
            connect_timeout=self.config.ssh.connect_timeout_seconds
        )
        if self.config.aws is not None:
            from dstackd.backends.aws import AwsBackend

            backends["aws"] = AwsBackend(
                self.config.aws,
                daemon_id=load_daemon_id(self.paths.data_dir),
                key_dir=os.path.join(self.paths.data_dir, "aws"),
            )

        return backends

    async def _run_parts(self, core: Core, listening: socket.socket | None) -> None:
        backends = self._backends()
        if "aws" in backends:
            _label_aws_instances(backends["aws"], core)

        run_files = RunFiles(Path(self.paths.runs_dir))
        runner = await LocalRunner.start_spawner()
        ssh = self.config.ssh
        ssh_runner = SshRunner(
            connect_timeout=ssh.connect_timeout_seconds,
            keepalive_interval=ssh.keepalive_interval_seconds,
            lost_after_seconds=ssh.lost_after_seconds,
            is_active=partial(_run_is_active, core),
        )
        scheduler = Scheduler(
            core,
            backends,
            runner,
            run_files,
            stop_grace_seconds=self.config.daemon.stop_grace_seconds,
            runners={"ssh": ssh_runner, "aws": ssh_runner},
        )
        health = HealthChecker(
            core,
            backends["ssh"],  # type: ignore[arg-type]
            interval=self.config.ssh.health_check_interval_seconds,
            timeout=self.config.ssh.health_check_timeout_seconds,
        )
        reaper = IdleReaper(core, backends)
        commands = Commands(core, scheduler, reaper, backends, run_files)
        reaper.before_terminate = commands.stop_instance_run
        scheduler.terminate_soon = reaper.terminate_soon
        run_limits = RunLimits(
            core, partial(scheduler.stop, abort=False), scheduler.wake
        )
        service_probes = ServiceProbes(core)
        core.subscribe(self._count_for_snapshot)
        app_runner = web.AppRunner(
            Api(core, commands).app(),
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        )
        await app_runner.setup()
        try:
            async with anyio.create_task_group() as task_group:
                scheduler.task_group = task_group
                reaper.task_group = task_group
                await self._recover(core, backends, runner, scheduler, reaper)
                task_group.start_soon(scheduler.run, task_group)
                task_group.start_soon(reaper.run, task_group)
                task_group.start_soon(health.run, task_group)
                if "aws" in backends:
                    task_group.start_soon(self._reconcile, core, backends["aws"])
                task_group.start_soon(run_limits.run)
                task_group.start_soon(service_probes.run)
                task_group.start_soon(self._snapshot_loop, core)
                sock = listening or self._bind_socket()
                site = web.SockSite(app_runner, sock)
                await site.start()
                log.info("socket_bound", path=self.paths.socket, pid=os.getpid())
                systemd.notify_ready()
                interval = systemd.watchdog_interval()
                if interval is not None:
                    task_group.start_soon(systemd.watchdog_loop, interval)

                await _wait_for_signal()
                log.info("daemon_stopping")
                systemd.notify_stopping()
                await app_runner.cleanup()
                task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await app_runner.cleanup()
                await runner.aclose()
                if listening is None:
                    _remove_socket(self.paths.socket)

    def _bind_socket(self) -> socket.socket:
        path = self.paths.socket
        _remove_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        group = self.config.daemon.socket_group
        mode = 0o660 if group is not None else 0o600
        previous = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)

        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, _group_id(group))

        sock.listen(256)
        sock.setblocking(False)

        return sock

    async def _recover(
        self,
        core: Core,
        backends: dict[str, Backend],
        runner: LocalRunner,
        scheduler: Scheduler,
        reaper: IdleReaper,
    ) -> None:
        """Bring backends, runs and timers in line with the log after a start."""
        state = core.state
        for name, backend in backends.items():
            backend.restore(
                [
                    LiveInstance(i.id, i.offer, i.resources, i.backend_data)
                    for i in state.live_instances()
                    if i.backend == name
                    and i.provisioned_at is not None
                    and i.status in ("idle", "busy", "terminating")
                ]
            )

        for instance in state.live_instances():
            if instance.status == "provisioning":
                scheduler.start_soon(scheduler.provision, instance.id)
            elif instance.status == "terminating":
                reaper.terminate_soon(instance.id)
            elif instance.status == "idle":
                reaper.update(instance)
            elif instance.status == "busy" and instance.backend not in backends:
                async with core.lock:
                    await core.commit(
                        [
                            NewEvent(
                                f"instance/{instance.id}",
                                InstanceTerminationRequested(
                                    instance.id, f"backend {instance.backend} is not configured"
                                ),
                            )
                        ],
                        DAEMON_ACTOR,
                    )

        for run in state.active_runs():
            if run.status == "running":
                instance = state.instances.get(run.instance_id or "")
                backend = "local" if instance is None else instance.backend
                handle = scheduler.runner_for(backend).adopt(  # type: ignore[attr-defined]
                    run.id,
                    run.pid,
                    run.pid_start_time,
                    str(scheduler.run_files.run_dir(run.id)),
                    {} if instance is None else instance.backend_data,
                )
                if handle is not None:
                    log.info("run_adopted", run_id=run.id, pid=run.pid)
                    scheduler.start_soon(scheduler.watch, run.id, handle)
                else:
                    status = read_exit_status(str(scheduler.run_files.run_dir(run.id)))
                    reason = None if status is not None else (
                        "the run's supervisor ended while the daemon was down "
                        "and left no exit status"
                    )
                    await scheduler.record_exit(run.id, status, reason=reason)
            elif run.status == "provisioning" and run.instance_id is not None:
                instance = state.instances.get(run.instance_id)
                if instance is not None and instance.run_id == run.id:
                    scheduler.start_soon(scheduler.launch, run.id)

        scheduler.wake()

    async def _reconcile(self, core: Core, backend: Backend) -> None:
        """Reconcile the log with EC2 now and every interval; see ``reconcile``."""
        from dstackd.backends.aws import AwsBackend
        from dstackd.reconcile import Reconciler

        assert isinstance(backend, AwsBackend) and self.config.aws is not None
        aws = self.config.aws
        reconciler = Reconciler(
            core,
            backend,
            interval=aws.reconcile_interval_seconds,
            orphan_grace=aws.orphan_grace_seconds,
            lost_grace=aws.lost_grace_seconds,
        )
        await reconciler.run()

    def _count_for_snapshot(self, records: Sequence[Record]) -> None:
        self._records_since_snapshot += len(records)
        if self._records_since_snapshot >= self.config.daemon.snapshot_every:
            self._snapshot_due.set()

    async def _snapshot_loop(self, core: Core) -> None:
        while True:
            await self._snapshot_due.wait()
            self._snapshot_due = anyio.Event()
            self._records_since_snapshot = 0
            # No lock: save_snapshot encodes the state before its first await,
            # so decisions and appends go on while the snapshot is written.
            await save_snapshot(core.log, core.state)

            log.info("snapshot_saved", position=core.state.checkpoint)


def restrict_log_files(path: str) -> None:
    """Make the log and its WAL files readable by the daemon's user alone.

    SQLite creates the -wal and -shm files with the database file's mode, so
    creating that file 0600 first covers them too, whatever the umask or the
    data directory's mode.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(descriptor)
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            continue


async def _wait_for_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            return


def _remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _run_is_active(core: Core, run_id: str) -> bool:
    run = core.state.runs.get(run_id)
    return run is not None and run.status in ACTIVE_RUN_STATUSES


def _label_aws_instances(backend: Backend, core: Core) -> None:
    """Let the AWS backend tag instances with their pool and name from the state."""
    from dstackd.backends.aws import AwsBackend, instance_labels

    assert isinstance(backend, AwsBackend)
    backend.labels = lambda instance_id: instance_labels(core.state, instance_id)


def _group_id(group: str | int) -> int:
    import grp

    if isinstance(group, int) or group.isdigit():
        return int(group)

    return grp.getgrnam(group).gr_gid


def _declared_gpus(config: Config) -> list[Gpu] | None:
    if config.local.gpus is None:
        return None

    gpus: list[Gpu] = []
    for entry in config.local.gpus:
        memory = parse_size(entry.memory, "local.gpus.memory")
        for _ in range(entry.count):
            gpus.append(Gpu(entry.name.upper(), memory, index=len(gpus)))

    return gpus
