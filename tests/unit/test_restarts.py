"""The restart policy both engines apply (``engines.restarts.decide``)."""

from __future__ import annotations

import pytest

from nap_orch.engines.base import EXITED, FAILED, STARTING
from nap_orch.engines.restarts import Exit, decide
from nap_orch.units import Unit


def unit(restart: str = "on-failure", limit: int = 3, sec: float = 1.0, max_delay: float = 30.0) -> Unit:
    return Unit(
        name="alice_web_common@1",
        description="d",
        argv=["/bin/true"],
        workdir="/",
        env={},
        restart=restart,
        restart_limit=limit,
        restart_sec=sec,
        restart_max_delay=max_delay,
    )


FAIL = Exit(3, False, "exited with code 3")
CLEAN = Exit(0, True, "exited with code 0")


def test_a_clean_exit_is_exited_without_restart():
    d = decide(unit(), CLEAN, started_at=100.0, failures=0, now=101.0)
    assert (d.state, d.delay, d.failures, d.message) == (EXITED, None, 0, "exited with code 0")


def test_failures_restart_with_doubling_delays_then_give_up():
    u = unit(limit=3, sec=1.0, max_delay=30.0)
    failures, delays = 0, []
    for _ in range(3):
        d = decide(u, FAIL, started_at=100.0, failures=failures, now=100.5)
        assert d.state == STARTING
        delays.append(d.delay)
        failures = d.failures
    assert delays == [1.0, 2.0, 4.0]
    assert d.message == "exited with code 3, restarting in 4s (restart 3 of 3)"
    last = decide(u, FAIL, started_at=100.0, failures=failures, now=100.5)
    assert (last.state, last.delay, last.failures) == (FAILED, None, 3)
    assert last.message == "exited with code 3; gave up after 3 restarts in a row"


def test_the_delay_stops_growing_at_the_max_delay():
    d = decide(unit(limit=10, sec=1.0, max_delay=5.0), FAIL, started_at=0.0, failures=6, now=1.0)
    assert d.delay == 5.0 and d.failures == 7


def test_a_run_as_long_as_the_max_delay_counts_as_healthy_and_starts_the_count_over():
    u = unit(limit=3, max_delay=30.0)
    d = decide(u, FAIL, started_at=100.0, failures=3, now=130.0)
    assert (d.state, d.failures, d.delay) == (STARTING, 1, 1.0)
    # just short of it, the count goes on (and here the limit is reached)
    assert decide(u, FAIL, started_at=100.0, failures=3, now=129.9).state == FAILED


def test_an_unknown_start_time_never_resets_the_count():
    assert decide(unit(limit=2), FAIL, started_at=None, failures=2, now=1e9).state == FAILED


@pytest.mark.parametrize(
    ("restart", "exit", "state"),
    [
        ("always", CLEAN, STARTING),
        ("always", FAIL, STARTING),
        ("no", FAIL, FAILED),
        ("no", CLEAN, EXITED),
        ("on-failure", Exit(None, False, "lost: job 12_3 is gone from Slurm without an exit code"), STARTING),
    ],
)
def test_the_units_policy_says_which_exits_restart(restart, exit, state):
    assert decide(unit(restart=restart), exit, started_at=0.0, failures=0, now=1.0).state == state


def test_a_limit_of_zero_never_restarts():
    d = decide(unit(limit=0), FAIL, started_at=0.0, failures=0, now=1.0)
    assert d.state == FAILED and d.message.endswith("gave up after 0 restarts in a row")


def test_without_its_unit_an_instance_is_not_restarted():
    assert decide(None, FAIL, started_at=0.0, failures=0, now=1.0).state == FAILED
    assert decide(None, CLEAN, started_at=0.0, failures=0, now=1.0).state == EXITED
