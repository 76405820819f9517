"""The reaper's rule (jobs.reaper.verdict) and nap up's restart backoff, without Redis or processes."""

from __future__ import annotations

import pytest

from nap_orch.cli.up import Backoff
from nap_orch.jobs.reaper import Action, Seen, verdict


def seen(state="running", attempts=1, has_message=False, alive=False) -> Seen:
    return Seen(state=state, attempts=attempts, has_message=has_message, alive=alive)


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled", None])
def test_an_ended_job_or_a_missing_record_leaves_the_active_set(state):
    assert verdict(seen(state=state), max_attempts=2, stranded_for=999, grace=30) is Action.FORGET


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_job_with_a_message_or_a_mark_of_life_is_left_alone(state):
    for s in (seen(state, has_message=True), seen(state, alive=True), seen(state, has_message=True, alive=True)):
        assert verdict(s, max_attempts=2, stranded_for=999, grace=30) is Action.LEAVE


def test_a_stranded_job_waits_out_the_grace_then_is_requeued():
    assert verdict(seen(), max_attempts=2, stranded_for=0, grace=30) is Action.WAIT
    assert verdict(seen(), max_attempts=2, stranded_for=29.9, grace=30) is Action.WAIT
    assert verdict(seen(), max_attempts=2, stranded_for=30, grace=30) is Action.REQUEUE
    # a job whose enqueue was lost (never attempted) is queued again too
    assert verdict(seen("queued", attempts=0), max_attempts=1, stranded_for=30, grace=30) is Action.REQUEUE


def test_a_lost_job_gets_one_attempt_more_than_its_policy_then_fails():
    assert verdict(seen(attempts=2), max_attempts=2, stranded_for=60, grace=30) is Action.REQUEUE
    assert verdict(seen(attempts=3), max_attempts=2, stranded_for=60, grace=30) is Action.FAIL


def test_backoff_doubles_to_its_cap_and_resets_after_a_healthy_run():
    b = Backoff(first=1, most=30, healthy_after=60)
    assert [b.after_exit(ran_for=2) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.after_exit(ran_for=61) == 1  # it had run a minute: a fresh failure
    assert b.after_exit(ran_for=0.5) == 2
