"""The restart policy: what happens after an instance's process ends, for every engine.

A unit says its policy (``Restart=``, ``RestartSec=`` doubling up to ``X-RestartMaxDelaySec=``,
``StartLimitBurst=``). ``decide`` applies it to one exit; the engine says how the process ended
(``Exit``: only the engine knows what counts as clean) and carries out the ``Decision``. Pure: no
clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import Unit
from .base import EXITED, FAILED, OOM, STARTING


@dataclass(frozen=True)
class Exit:
    """How a process ended: its exit code (None: unknown), whether that is a clean end (restarts
    ``on-failure`` don't apply), and the words for it (``exited with code 3``, ``lost: ...``)."""

    code: int | None
    clean: bool
    what: str
    oom: bool = False  # killed for memory: a failure, and the state says so once it is final


@dataclass(frozen=True)
class Decision:
    """What to do: the instance's new state, its count of restarts in a row, when to restart (None: not
    at all) and the journal's words for it."""

    state: str
    failures: int
    delay: float | None
    message: str


def decide(unit: Unit | None, exit: Exit, started_at: float | None, failures: int, now: float) -> Decision:
    """Apply ``unit``'s policy (None: its unit is gone, so no restart) to ``exit`` of a process started
    at ``started_at``, after ``failures`` restarts in a row. A run that lasted ``restart_max_delay``
    counts as healthy: the count (and so the backoff) starts over."""
    if unit is not None and started_at is not None and now - started_at >= unit.restart_max_delay:
        failures = 0
    policy = unit.restart if unit is not None else "no"
    restart = policy == "always" or (policy == "on-failure" and not exit.clean)
    failed = OOM if exit.oom else FAILED
    if unit is None or not restart:
        return Decision(EXITED if exit.clean else failed, failures, None, exit.what)
    if failures >= unit.restart_limit:
        return Decision(failed, failures, None, f"{exit.what}; gave up after {failures} restarts in a row")
    failures += 1
    delay = unit.restart_delay(failures)
    return Decision(
        STARTING, failures, delay, f"{exit.what}, restarting in {delay:g}s (restart {failures} of {unit.restart_limit})"
    )
