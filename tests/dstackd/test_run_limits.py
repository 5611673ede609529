"""Run limits: end-of-run decisions (restart, retry, plain end), no-capacity
decisions, and the max_duration deadline from the projection."""

import pytest

from dstackd.run_limits import (
    RETRY_BACKOFF_START_US,
    decide_end,
    decide_no_capacity,
    is_placeable,
    max_duration_deadline_us,
)
from dstackd.scheduler import restart_delay_seconds
from events.event_types import (
    RetryPolicy,
    RunFailed,
    RunFinished,
    RunRestarted,
    RunRetried,
    RunSpec,
    RunStopped,
)
from events.model import Offer, Resources
from events.projection import Instance, Run, RunAttempt, State

SECOND = 1_000_000
SUBMITTED_AT = 1_000 * SECOND


def make_state(spec: RunSpec, instance_status: str = "busy") -> tuple[State, Run]:
    offer = Offer("local", "local", "slice", Resources(1, 1.0))
    instance = Instance(
        id="i-1",
        name="local-1",
        pool="p",
        offer=offer,
        resources=offer.resources,
        idle_duration=300,
        requested_at=0,
        status=instance_status,  # type: ignore[arg-type]
        run_id="r-1",
    )
    run = Run(
        id="r-1",
        name="job",
        pool="p",
        spec=spec,
        user="u",
        uid=None,
        submitted_at=SUBMITTED_AT,
        status="running",
        instance_id="i-1",
    )
    state = State(instances={"i-1": instance}, runs={"r-1": run})

    return state, run


RETRY_ALL = RetryPolicy(duration=60)


class TestDecideEnd:
    def test_task_success_just_ends(self) -> None:
        state, run = make_state(RunSpec(argv=("true",), retry=RETRY_ALL))
        end = RunFinished("r-1", 0)

        decision = decide_end(state, run, end, SUBMITTED_AT + SECOND)

        assert decision.events == [end]
        assert decision.release
        assert not decision.relaunch

    def test_failure_within_duration_is_retried(self) -> None:
        state, run = make_state(RunSpec(argv=("false",), retry=RETRY_ALL))
        end = RunFinished("r-1", 1)
        now = SUBMITTED_AT + 5 * SECOND

        decision = decide_end(state, run, end, now)

        assert decision.events[0] == end
        retried = decision.events[1]
        assert isinstance(retried, RunRetried)
        assert retried.attempt == 2
        assert retried.trigger == "error"
        assert retried.exit_status == 1
        assert retried.retry_at == now + RETRY_BACKOFF_START_US
        assert decision.release

    def test_backoff_doubles_and_stops_at_deadline(self) -> None:
        state, run = make_state(RunSpec(argv=("false",), retry=RETRY_ALL))
        run.history = [RunAttempt(number, "error", "x") for number in (1, 2, 3)]
        now = SUBMITTED_AT + 58 * SECOND

        decision = decide_end(state, run, RunFinished("r-1", 1), now)

        retried = decision.events[1]
        assert isinstance(retried, RunRetried)
        assert retried.attempt == 5
        assert retried.retry_at == SUBMITTED_AT + 60 * SECOND

    def test_failure_after_duration_ends(self) -> None:
        state, run = make_state(RunSpec(argv=("false",), retry=RETRY_ALL))
        end = RunFinished("r-1", 1)

        decision = decide_end(state, run, end, SUBMITTED_AT + 61 * SECOND)

        assert decision.events == [end]

    def test_policy_without_error_ends(self) -> None:
        spec = RunSpec(argv=("false",), retry=RetryPolicy(on_events=("interruption",)))
        state, run = make_state(spec)
        end = RunFinished("r-1", 1)

        assert decide_end(state, run, end, SUBMITTED_AT).events == [end]

    def test_removed_instance_counts_as_interruption(self) -> None:
        spec = RunSpec(argv=("sleep",), retry=RetryPolicy(on_events=("interruption",)))
        state, run = make_state(spec, instance_status="terminating")
        end = RunFailed("r-1", "instance local-1 was removed: removed by u", 137)

        decision = decide_end(state, run, end, SUBMITTED_AT)

        retried = decision.events[1]
        assert isinstance(retried, RunRetried)
        assert retried.trigger == "interruption"
        assert retried.reason == end.reason

    def test_stopped_run_is_never_retried(self) -> None:
        state, run = make_state(RunSpec(argv=("sleep",), retry=RETRY_ALL))
        run.stop_requested = True
        end = RunStopped("r-1", 143)

        assert decide_end(state, run, end, SUBMITTED_AT).events == [end]

    def test_service_restarts_in_place_until_limit(self) -> None:
        spec = RunSpec(type="service", commands=("serve",), port=80, max_restarts=2)
        state, run = make_state(spec)
        end = RunFinished("r-1", 3)

        first = decide_end(state, run, end, SUBMITTED_AT)
        run.restarts = 2
        last = decide_end(state, run, end, SUBMITTED_AT)

        assert first.events == [RunRestarted("r-1", 1, 3, "exited with status 3")]
        assert not first.release
        assert first.relaunch
        assert last.events == [end]
        assert last.release

    def test_dev_environment_exit_zero_records_inactivity(self) -> None:
        spec = RunSpec(type="dev-environment", inactivity_duration=90)
        state, run = make_state(spec)

        decision = decide_end(state, run, RunFinished("r-1", 0), SUBMITTED_AT)

        finished = decision.events[0]
        assert isinstance(finished, RunFinished)
        assert finished.reason == (
            "no client was attached for its inactivity duration of 1m30s"
        )


class TestDecideNoCapacity:
    def test_without_policy_fails(self) -> None:
        _, run = make_state(RunSpec(argv=("true",)))
        failure = RunFailed("r-1", "nothing fits")

        assert decide_no_capacity(run, failure, SUBMITTED_AT) is failure

    def test_first_miss_starts_wait_then_waits_quietly(self) -> None:
        _, run = make_state(RunSpec(argv=("true",), retry=RETRY_ALL))
        failure = RunFailed("r-1", "nothing fits")

        first = decide_no_capacity(run, failure, SUBMITTED_AT)
        run.capacity_wait_since = SUBMITTED_AT
        second = decide_no_capacity(run, failure, SUBMITTED_AT + SECOND)

        assert isinstance(first, RunRetried)
        assert first.trigger == "no-capacity"
        assert first.retry_at is None
        assert second is None

    def test_failed_provisioning_is_retried_after_delay(self) -> None:
        _, run = make_state(RunSpec(argv=("true",), retry=RETRY_ALL))
        run.capacity_wait_since = SUBMITTED_AT
        failure = RunFailed("r-1", "provisioning failed")

        event = decide_no_capacity(run, failure, SUBMITTED_AT, provisioning_failed=True)

        assert isinstance(event, RunRetried)
        assert event.retry_at == SUBMITTED_AT + RETRY_BACKOFF_START_US

    def test_deadline_passed_fails_with_duration(self) -> None:
        _, run = make_state(RunSpec(argv=("true",), retry=RETRY_ALL))
        run.capacity_wait_since = SUBMITTED_AT

        event = decide_no_capacity(
            run, RunFailed("r-1", "nothing fits"), SUBMITTED_AT + 60 * SECOND
        )

        assert isinstance(event, RunFailed)
        assert event.reason == (
            "nothing fits; no capacity within the retry duration of 1m"
        )


def test_max_duration_counts_from_attempt_start() -> None:
    _, run = make_state(RunSpec(argv=("sleep",), max_duration=30))
    run.attempt_started_at = SUBMITTED_AT + 2 * SECOND

    assert max_duration_deadline_us(run) == SUBMITTED_AT + 32 * SECOND
    run.stop_requested = True
    assert max_duration_deadline_us(run) is None


def test_retry_delay_keeps_run_unplaceable() -> None:
    _, run = make_state(RunSpec(argv=("true",)))
    run.retry_at = SUBMITTED_AT + SECOND

    assert not is_placeable(run, SUBMITTED_AT)
    assert is_placeable(run, SUBMITTED_AT + SECOND)


@pytest.mark.parametrize(
    ("restarts", "delay"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (10_000, 30.0)],
)
def test_restart_delay_doubles_up_to_max(restarts: int, delay: float) -> None:
    assert restart_delay_seconds(restarts) == delay
