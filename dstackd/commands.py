"""Commands from the socket API, checked against the projection and turned into events.

Every command validates its input before taking the decision lock, re-checks
the state under the lock and appends all its events in one batch. A rejected
command raises a ``CommandError`` and appends nothing.
"""

import os
import re

import anyio
import structlog

from dstackd import api
from dstackd.backends.base import Backend
from dstackd.core import Core
from dstackd.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from dstackd.placement import choose_instance, describe_rejections
from dstackd.reaper import IdleReaper
from dstackd.run_limits import retries_on
from dstackd.runs import RunFiles
from dstackd.scheduler import Scheduler, new_instance_id, new_run_id
from dstackd.submission import build_run_spec, resolve_request
from events.event_types import (
    DefaultPoolSet,
    InstanceClaimed,
    InstanceRequested,
    InstanceTerminationRequested,
    PoolCreated,
    PoolDeleted,
    RunFailed,
    RunSpec,
    RunStopped,
    RunStopRequested,
    RunSubmitted,
)
from events.grammar import build_requirements, parse_duration
from events.matching import mismatch
from events.model import POOL_ADDED_IDLE_DURATION, Actor, Offer, Requirements
from events.projection import (
    ACTIVE_RUN_STATUSES,
    DEFAULT_POOL,
    LIVE_INSTANCE_STATUSES,
    Instance,
    Run,
)
from events.record import NewEvent

log = structlog.get_logger("dstackd.commands")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ID_SHAPED = re.compile(r"^[ir]-[0-9a-f]{12}$")
NAME_RULE = "1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit"

# How long a forced pool delete waits for its instances to terminate.
POOL_DELETE_TIMEOUT_SECONDS = 120.0


def is_privileged(actor: Actor) -> bool:
    """Return whether the caller is root or the user the daemon runs as."""
    return actor.uid is not None and actor.uid in (0, os.geteuid())


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequestError(f"invalid {kind} name {name!r}: expected {NAME_RULE}")

    if _ID_SHAPED.match(name):
        raise InvalidRequestError(
            f"invalid {kind} name {name!r}: names shaped like instance or run ids "
            "(i-… or r-… with 12 hex digits) would make lookups ambiguous"
        )

    return name


def requirements_from(args: api.ResourceArgs) -> Requirements:
    return build_requirements(
        cpu=args.cpu,
        memory=args.memory,
        disk=args.disk,
        gpu=args.gpu,
        spot_policy=args.spot_policy,
        max_price=args.max_price,
        backends=tuple(args.backends) if args.backends is not None else None,
    )


class Commands:
    """The daemon's command handlers; one method per request type."""

    def __init__(
        self,
        core: Core,
        scheduler: Scheduler,
        reaper: IdleReaper,
        backends: dict[str, Backend],
        run_files: RunFiles,
    ) -> None:
        self.core = core
        self.scheduler = scheduler
        self.reaper = reaper
        self.backends = backends
        self.run_files = run_files

    # Lookups

    def pool_exists(self, name: str) -> bool:
        return name in self.core.state.pools or name == DEFAULT_POOL

    def resolve_pool(self, name: str | None) -> str:
        if name is None:
            return self.core.state.default_pool_name()

        if not self.pool_exists(name):
            known = ", ".join(sorted(set(self.core.state.pools) | {DEFAULT_POOL}))
            raise NotFoundError(
                "pool", name, f"create it with 'dstackctl pool create {name}' or use one of: {known}"
            )

        return name

    def find_instance(self, name: str, *, live_only: bool = True) -> Instance:
        state = self.core.state
        # Live instances are in memory; all of them means reading the archive.
        candidates = state.live_instances() if live_only else state.instances.values()
        matches = [
            instance
            for instance in candidates
            if name in (instance.name, instance.id)
            and (not live_only or instance.status in LIVE_INSTANCE_STATUSES)
        ]
        if not matches:
            raise NotFoundError("instance", name, "list instances with 'dstackctl pool ps'")

        return matches[-1]

    def check_run_access(self, run: Run, actor: Actor) -> None:
        """Reject a caller who is neither the run's submitter nor privileged.

        Root and the daemon's own user may act on every run. Other members of
        the socket's group may act only on their own, because a run's output
        and its stop belong to the user who submitted it.
        """
        if is_privileged(actor) or actor.uid == run.uid:
            return

        raise ForbiddenError(
            f"run {run.name} belongs to uid {run.uid}; uid {actor.uid} may only "
            "read and stop its own runs"
        )

    def find_run(self, name: str) -> Run:
        state = self.core.state
        if name in state.runs:
            return state.runs[name]

        run = state.runs.last_named(name)
        if run is not None:
            return run

        raise NotFoundError("run", name, "list runs with 'dstackctl ps -a'")

    def _pool_creation(self, pool: str) -> list[NewEvent]:
        """Create the implicit default pool on first use, so it is recorded."""
        if pool in self.core.state.pools:
            return []

        return [NewEvent(f"pool/{pool}", PoolCreated(pool), expected_version=0)]

    # Pools

    async def create_pool(self, request: api.CreatePool, actor: Actor) -> str:
        name = check_name("pool", request.name)
        async with self.core.lock:
            if name in self.core.state.pools:
                raise ConflictError(f"pool {name!r} already exists")

            await self.core.commit(
                [NewEvent(f"pool/{name}", PoolCreated(name), expected_version=0)], actor
            )

        return name

    async def set_default_pool(self, name: str, actor: Actor) -> str:
        async with self.core.lock:
            self.resolve_pool(name)
            entries = self._pool_creation(name)
            entries.append(NewEvent(f"pool/{name}", DefaultPoolSet(name)))
            await self.core.commit(entries, actor)

        return name

    async def delete_pool(self, name: str, force: bool, actor: Actor) -> str:
        async with self.core.lock:
            self.resolve_pool(name)
            state = self.core.state
            live = [
                i
                for i in state.live_instances()
                if i.pool == name and i.status in LIVE_INSTANCE_STATUSES
            ]
            active = [
                r for r in state.active_runs() if r.pool == name and r.status in ACTIVE_RUN_STATUSES
            ]
            if (live or active) and not force:
                raise ConflictError(
                    f"pool {name!r} has {len(live)} live instances and {len(active)} "
                    f"active runs; remove them first or use --force"
                )

            entries: list[NewEvent] = []
            for run in active:
                if run.instance_id is None:
                    reason = f"pool {name} was deleted"
                    entries.append(NewEvent(f"run/{run.id}", RunFailed(run.id, reason)))

            for instance in live:
                if instance.status != "terminating":
                    entries.append(
                        NewEvent(
                            f"instance/{instance.id}",
                            InstanceTerminationRequested(
                                instance.id, f"pool {name} deleted by {actor.name}"
                            ),
                        )
                    )

            if entries:
                await self.core.commit(entries, actor)

        for instance in live:
            self.reaper.terminate_soon(instance.id)

        await self._wait_terminated([instance.id for instance in live])
        async with self.core.lock:
            if name in self.core.state.pools:
                await self.core.commit([NewEvent(f"pool/{name}", PoolDeleted(name))], actor)

        return name

    async def _wait_terminated(self, instance_ids: list[str]) -> None:
        with anyio.move_on_after(POOL_DELETE_TIMEOUT_SECONDS):
            while any(
                self.core.state.instances[i].status != "terminated" for i in instance_ids
            ):
                await self.core.wait_changed()

    # Instances

    async def list_offers(self, request: api.ListOffers) -> list[Offer]:
        requirements = requirements_from(request.resources)
        if request.pool is not None:
            self.resolve_pool(request.pool)

        offers = await self.scheduler.list_offers(requirements)
        if request.max_offers is not None:
            offers = offers[: max(request.max_offers, 0)]

        return offers

    async def add_instance(self, request: api.AddInstance, actor: Actor) -> str:
        requirements = requirements_from(request.resources)
        idle_duration = (
            POOL_ADDED_IDLE_DURATION
            if request.idle_duration is None
            else parse_duration(request.idle_duration, "idle duration")
        )
        if request.name is not None:
            check_name("instance", request.name)

        offers = await self.scheduler.list_offers(requirements)
        offer = self._pick_offer(request.offer, offers, requirements)
        instance_id = new_instance_id()
        async with self.core.lock:
            pool = self.resolve_pool(request.pool)
            name = request.name or self.scheduler.next_instance_name(offer.backend)
            if any(
                i.name == name and i.status in LIVE_INSTANCE_STATUSES
                for i in self.core.state.live_instances()
            ):
                raise ConflictError(f"instance name {name!r} is taken; choose another --name")

            entries = self._pool_creation(pool)
            entries.append(
                NewEvent(
                    f"instance/{instance_id}",
                    InstanceRequested(
                        instance_id=instance_id,
                        name=name,
                        pool=pool,
                        offer=offer,
                        idle_duration=idle_duration,
                        requirements=requirements,
                    ),
                    expected_version=0,
                )
            )
            await self.core.commit(entries, actor)

        await self.scheduler.provision(instance_id)

        return instance_id

    async def add_ssh_hosts(self, request: api.AddSshHosts, actor: Actor) -> list[str]:
        """Add SSH hosts to a pool and return their instance ids.

        See ``dstackd.ssh_hosts`` for the checks and the events.
        """
        from dstackd.ssh_hosts import add_ssh_hosts

        return await add_ssh_hosts(self, request, actor)

    def _pick_offer(
        self, confirmed: Offer | None, offers: list[Offer], requirements: Requirements
    ) -> Offer:
        if confirmed is not None:
            reason = mismatch(requirements, confirmed)
            if reason is not None:
                raise InvalidRequestError(f"the confirmed offer does not fit: {reason}")

            if confirmed not in offers:
                raise ConflictError(
                    "the confirmed offer is no longer available; run the command again "
                    "to see current offers"
                )

            return confirmed

        if not offers:
            raise ConflictError("no backend offers an instance that fits these requirements")

        return offers[0]

    async def remove_instance(self, name: str, force: bool, actor: Actor) -> str:
        async with self.core.lock:
            instance = self.find_instance(name)
            if instance.status == "busy" and not force:
                run = self.core.state.runs.get(instance.run_id or "")
                raise ConflictError(
                    f"instance {instance.name} is busy with run "
                    f"{run.name if run else instance.run_id}; use --force to fail "
                    "that run and remove the instance"
                )

            if instance.status != "terminating":
                await self.core.commit(
                    [
                        NewEvent(
                            f"instance/{instance.id}",
                            InstanceTerminationRequested(
                                instance.id, f"removed by {actor.name}"
                            ),
                        )
                    ],
                    actor,
                )

        self.reaper.terminate_soon(instance.id)

        return instance.id

    async def stop_instance_run(self, instance_id: str) -> None:
        """Stop the run on an instance about to be terminated, and wait for it."""
        instance = self.core.state.instances[instance_id]
        run_id = instance.run_id
        if run_id is None:
            return

        await self.scheduler.stop(run_id, abort=False)
        with anyio.move_on_after(60):
            while self.core.state.instances[instance_id].run_id is not None:
                await self.core.wait_changed()

    # Runs

    async def submit_run(self, request: api.SubmitRun, actor: Actor) -> str:
        # A large YAML file takes seconds to parse; a worker thread keeps the
        # event loop (other requests, timers, probes) running meanwhile.
        request = await anyio.to_thread.run_sync(resolve_request, request)
        spec = self._run_spec(request)
        run_id = new_run_id()
        name = request.name or run_id
        if request.name is not None:
            check_name("run", request.name)

        async with self.core.lock:
            pool = self.resolve_pool(request.pool)
            state = self.core.state
            if any(
                r.name == name and r.status in ACTIVE_RUN_STATUSES
                for r in state.active_runs()
            ):
                raise ConflictError(f"a run named {name!r} is still active; choose another --name")

            if spec.instance is not None:
                instance = self.find_instance(spec.instance)
                if instance.pool != pool:
                    raise InvalidRequestError(
                        f"instance {spec.instance} is in pool {instance.pool}, not {pool}"
                    )

            if (
                spec.creation_policy == "reuse" or spec.instance is not None
            ) and not retries_on(spec, "no-capacity"):
                self._check_reusable(pool, spec, name)

            self.run_files.prepare(run_id, dict(request.env))
            entries = self._pool_creation(pool)
            entries.append(
                NewEvent(
                    f"run/{run_id}",
                    RunSubmitted(run_id, name, pool, spec, actor.name, actor.uid),
                    expected_version=0,
                )
            )
            claim = await self._claim_at_submit(run_id, name, pool, spec)
            if claim is not None:
                entries.append(claim)

            await self.core.commit(entries, actor)

        if claim is not None:
            self.scheduler.start_soon(self.scheduler.launch, run_id)

        return run_id

    async def _claim_at_submit(
        self, run_id: str, name: str, pool: str, spec: RunSpec
    ) -> NewEvent | None:
        """Claim an idle instance in the submission's own batch, saving a commit.

        Only when no earlier run is queued, so submission order is kept; the
        scheduler places every other run.
        """
        state = self.core.state
        if any(run.status == "submitted" for run in state.active_runs()):
            return None

        probe = Run(
            id=run_id, name=name, pool=pool, spec=spec, user="", uid=None, submitted_at=0
        )
        placement = choose_instance(state, probe)
        if placement.instance_id is None:
            return None

        stream = f"instance/{placement.instance_id}"
        return NewEvent(
            stream,
            InstanceClaimed(placement.instance_id, run_id, placement.candidates),
            expected_version=await self.core.stream_version(stream),
        )

    def _check_reusable(self, pool: str, spec: RunSpec, name: str) -> None:
        """Reject a reuse-only run that no live instance of the pool could take."""
        probe = Run(
            id="", name=name, pool=pool, spec=spec, user="", uid=None, submitted_at=0
        )
        placement = choose_instance(self.core.state, probe)
        if placement.instance_id is None and not placement.wait:
            option = "--instance" if spec.instance is not None else "--reuse"
            raise ConflictError(
                f"no instance in pool {pool} fits this run, and {option} forbids "
                f"provisioning one: {describe_rejections(placement.candidates)}"
            )

    def _run_spec(self, request: api.SubmitRun) -> RunSpec:
        return build_run_spec(request)

    async def stop_run(self, name: str, abort: bool, actor: Actor) -> str:
        async with self.core.lock:
            run = self.find_run(name)
            self.check_run_access(run, actor)
            if run.status not in ACTIVE_RUN_STATUSES:
                return run.id

            entries = [NewEvent(f"run/{run.id}", RunStopRequested(run.id, abort))]
            if run.status == "submitted":
                entries.append(NewEvent(f"run/{run.id}", RunStopped(run.id)))

            await self.core.commit(entries, actor)

        await self.scheduler.stop(run.id, abort=abort)

        return run.id
