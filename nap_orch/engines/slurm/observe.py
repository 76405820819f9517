"""What the Slurm engine makes of what it sees: ``observe`` turns an instance's records, squeue's rows and
the run files into its state and the reconciler's ``Action``s. Pure: the engine shows what it returns
(``to_status``); the reconciler also carries out the actions and keeps the observation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ...names import Kind
from ...units import Unit
from .. import health
from ..base import RUNNING, STARTING, STOPPED, InstanceStatus
from ..restarts import Exit, decide
from .cli import ENDED_BY_SLURM, Row
from .records import Desired, Ended, Observed, RunFiles, current

# A job that squeue does not show yet (or any more) this long after submission, without an exit file, is lost.
GRACE = 15.0


class Action(enum.StrEnum):
    """What the reconciler has to do about an instance."""

    ASSIGN = "assign"  # hand its job a port on the node it runs on (``Observed.host``)
    ENDED = "ended"  # its job's end was just judged: say so in its journal
    RESUBMIT = "resubmit"  # a restart is due
    CANCEL = "cancel"  # it is stopped, but its job still runs
    PROBE = "probe"  # its check is due: probe its port (engines.health)
    UNHEALTHY = "unhealthy"  # its check failed too often: cancel its job (then its restart policy applies)


def observe(
    name: str,
    d: Desired,
    s: Observed | None,
    rows: dict[str, Row],
    files: RunFiles,
    unit_of: Callable[[str], Unit | None],
    now: float,
) -> tuple[Observed, list[Action]]:
    """The instance's state now, and what the reconciler has to do about it (``Action``s).
    ``files`` are the run files listed after the squeue of ``rows``. A common instance is running once
    its task has started the program (its ``.started`` file: the program's pid on the node), not when
    Slurm says the job runs: the task waits for its port first.
    Pure: the engine shows what it returns, the reconciler also does the actions and keeps it."""
    s = current(d, s)
    row = rows.get(s.row)
    live = row is not None and row.live
    if d.desired == STOPPED:
        if s.state != STOPPED:
            s.state, s.message, s.since = STOPPED, "stopped", now
        return s, ([Action.CANCEL] if live else [])
    if s.ended_job == s.jobid:  # this job's end was handled: final, or a restart is due
        return s, ([Action.RESUBMIT] if s.next_at is not None and now >= s.next_at else [])
    if row is not None and live and not row.active:
        why = f" ({row.reason})" if row.reason and row.reason != "None" else ""
        _set(s, STARTING, f"{row.state.lower()} in Slurm{why}", now)
        return s, []
    ended = files.exit_of(s.jobid)  # written by the job's script as it ends, before Slurm sees the end
    if row is not None and row.live and ended is not None:
        # Judged once Slurm says how the job ended: a job Slurm signalled (scancel, its node going down,
        # a time limit) is lost, and the journal names why (CANCELLED, NODE_FAIL ...) rather than
        # COMPLETING. The script's own "signalled" mark can't be relied on alone: Slurm signals the
        # program and the script at once, and the script may see the program's end first.
        if s.ending_job != s.jobid:
            s.ending_job, s.ending_at = s.jobid, now
        if now - s.ending_at < GRACE:
            _set(s, s.state, f"ending in Slurm ({row.state})", now)
            return s, []
    if row is not None and row.live and ended is None:
        s.host = row.nodes or s.host
        if d.kind == "common" and not (s.port_job == s.jobid and s.port_host == s.host):
            _set(s, STARTING, f"running on {s.host}, waiting for its port", now)
            return s, [Action.ASSIGN]
        if s.state != RUNNING:
            if d.kind == "common":
                pid = files.started_of(s.jobid)
                if pid is None:
                    _set(s, STARTING, f"port {s.port} on {s.host} handed out, waiting for the program to start", now)
                    return s, []
                s.pid = pid
            if s.started_job != s.jobid:
                s.started_job, s.started_at = s.jobid, now
                s.check_passed, s.check_failures, s.probed_at, s.probe_note = False, 0, 0.0, ""
        if d.kind != "common":
            _set(s, RUNNING, "", now)
            return s, []
        unit = unit_of(name)
        check = health.Check.of(unit) if unit is not None else health.Check("", "", 10, 2, 5, 0)
        h = health.Health(s.started_at or now, s.check_passed, s.check_failures)
        verdict = health.judge(check, h, now)
        actions = []
        if check.kind and s.port is not None:
            every = check.interval if s.state == RUNNING else min(check.interval, 1.0)
            if now - s.probed_at >= every:
                actions.append(Action.PROBE)
        if verdict == "restart":
            return s, [Action.UNHEALTHY]
        if verdict == "starting":
            why = f"waiting for its check ({s.probe_note})" if check.kind and s.probe_note else "waiting to be healthy"
            _set(s, STARTING, f"started on {s.host}, {why}", now)
        else:
            _set(s, RUNNING, "", now)
        return s, actions
    if ended is None and row is None and now - s.submitted < GRACE:
        return s, []  # just submitted: squeue may not show it yet
    job_ended(s, d.kind, unit_of(name), ended, row, now)
    return s, [Action.ENDED]


def _set(s: Observed, state: str, message: str, now: float) -> None:
    if s.state != state or s.message != message:
        s.state, s.message, s.since = state, message, now


def job_ended(
    s: Observed,
    kind: str,
    unit: Unit | None,
    ended: Ended | None,
    row: Row | None,
    now: float,
    what: str = "",
) -> None:
    """Apply the unit's restart policy (``engines.restarts``) to the end of the current job; ``ended``
    is what its script wrote, None when the job left no exit code (lost)."""
    code, signalled, oom = ended if ended is not None else (None, False, False)
    lost = ended is None or signalled or (row is not None and row.state in ENDED_BY_SLURM)
    if what:
        pass
    elif lost:
        if row is not None:
            where = f" on {row.nodes}" if row.nodes else ""
            why = f", {row.reason}" if row.reason and row.reason != "None" else ""
            what = f"lost: Slurm ended job {s.jobid} ({row.state}{where}{why})"
        else:
            what = f"lost: job {s.jobid} is gone from Slurm without an exit code"
    elif kind == Kind.MPI_SLAVE:
        code, what = 0, "the run ended"
    else:
        what = f"exited with code {code}"
    if oom and unit is not None:
        what = f"killed for memory: over its MemoryMax={unit.memory_max} ({what})"
    # Only 0 is clean: the script sees a death by signal N as code 128+N, which a program's own exit
    # code could also be (the local agent, which reaps its children itself, knows the difference).
    decision = decide(
        unit, Exit(code, not lost and not oom and code == 0, what, oom=oom), s.started_at, s.failures, now
    )
    s.exit_code = code
    s.ended_job = s.jobid
    s.failures = decision.failures
    s.next_at = now + decision.delay if decision.delay is not None else None
    _set(s, decision.state, decision.message, now)


def to_status(name: str, d: Desired, s: Observed) -> InstanceStatus:
    port = s.port if s.port_job == s.jobid and s.state == RUNNING else None
    pid = s.pid if s.state == RUNNING else None
    return InstanceStatus(
        name=name,
        state=s.state,
        host=s.host,
        pid=pid,
        exit_code=s.exit_code,
        restarts=s.restarts,
        since=s.since,
        message=s.message,
        extra={"desired": d.desired, "job": s.jobid, "port": port},
    )
