"""The Slurm engine's records (this Slurm has no accounting: it forgets a job ``MinJobAge`` after it
ends), per stack (namespace ``ns``):

- ``/nap/slurm/<ns>/desired/<name>``: what the engine's users asked for (the engine writes it): the unit
  as submitted (``cat_unit``), desired state, a generation bumped by each submit/start, and the job
  that submit/start made;
- ``/nap/slurm/<ns>/observed/<name>``: what the reconciler saw and did (only it writes it): the current
  job (a restart makes a new one), state, node, port, exit code, restarts;
- ``NAP_HOME/slurm/run/<job>.port``, ``<job>.started`` and ``<job>.exit`` (``RunFiles``): the port
  handed to a task, the pid of the program it started (the instance is running from then on), and how
  it ended;
- ``/nap/slurm/<ns>/ending/<job>``: a job of removed instances that Slurm had not ended when ``remove``
  stopped waiting; the reconciler cancels it again while it lingers and removes its run files after.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

from ...names import Kind
from ..base import RUNNING, STARTING

DESIRED = "/nap/slurm/{ns}/desired/{name}"
OBSERVED = "/nap/slurm/{ns}/observed/{name}"
ENDING = "/nap/slurm/{ns}/ending/{jobid}"  # a removed instance's job still ending in Slurm: {"since"}
RECONCILER = "/nap/slurm/{ns}/reconciler"  # the reconciler that holds it (a lease) is the one at work
RUN_FILES = ("port", "started", "exit")  # NAP_HOME/slurm/run/<job>.<what>

R = TypeVar("R", bound="Record")


@functools.cache
def _field_names(cls: type[Any]) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


@dataclass
class Record:
    """A record kept as JSON in the state store; fields it does not know are ignored."""

    @classmethod
    def from_json(cls: type[R], raw: str | None) -> R | None:
        if not raw:
            return None
        data = json.loads(raw)
        names = _field_names(cast(type, cls))
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Desired(Record):
    """What the engine's users asked for. ``gen`` grows with each submit or start; ``jobid``/``row`` name
    the job that made (scancel's id, and squeue's id of this instance's part of it)."""

    kind: str = Kind.COMMON
    desired: str = RUNNING
    gen: int = 1
    jobid: str = ""
    row: str = ""
    jobname: str = ""  # squeue -n finds it by this
    journal: str = ""  # its output file
    unit: str = ""  # the unit's text, as submitted
    profile: str = ""  # the instance's profile copy with markers for its port and host (filled in then)
    submitted: float = 0.0
    since: float = 0.0


@dataclass
class Observed(Record):
    """What the reconciler saw of generation ``gen``: its current job (a restart submits a new one)."""

    gen: int = 0
    jobid: str = ""
    row: str = ""
    submitted: float = 0.0
    state: str = STARTING
    host: str | None = None  # the node the current (or last) job ran on
    port: int | None = None  # the instance's port, reserved on port_host for job port_job
    port_host: str | None = None
    port_job: str = ""
    pid: int | None = None  # the program's pid on its node (common instances)
    exit_code: int | None = None
    restarts: int = 0
    failures: int = 0  # restarts in a row: the backoff step and the limit's count
    started_at: float | None = None
    started_job: str = ""  # the job whose program was seen started at started_at
    # Its check (engines.health), for the program of started_job: a probe passed, failures in a row,
    # when it was last probed and what that said.
    check_passed: bool = False
    check_failures: int = 0
    probed_at: float = 0.0
    probe_note: str = ""
    next_at: float | None = None  # a restart is due then
    ended_job: str = ""  # the last job whose end was handled
    ending_job: str = ""  # a job Slurm signalled, still ending in Slurm since ending_at
    ending_at: float = 0.0
    since: float = field(default_factory=time.time)
    message: str = ""


def current(d: Desired, s: Observed | None) -> Observed:
    """The observation of d's generation: s, or a fresh one (keeping the last port as a hint)."""
    if s is not None and s.gen == d.gen:
        return replace(s)
    fresh = Observed(
        gen=d.gen, jobid=d.jobid, row=d.row, submitted=d.submitted, since=d.since or time.time(), message="submitted"
    )
    if s is not None:
        fresh.host, fresh.port, fresh.port_host = s.host, s.port, s.port_host
    return fresh


class Ended(NamedTuple):
    """How a job's task ended, as its script wrote it: the program's exit code, whether Slurm signalled
    the task, and whether the kernel killed any of the instance's processes for memory."""

    code: int
    signalled: bool
    oom: bool = False


class RunFiles:
    """The files the jobs' scripts wrote in the run folder, listed once and read only where listed: a
    look at 1,000 instances costs one listing instead of 2,000 failed opens. List them after squeue:
    a task writes its exit file before Slurm sees it end, so a job squeue shows ended has its file in
    the listing."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        try:
            self.names = set(os.listdir(run_dir))
        except OSError:
            self.names = set()

    def _read(self, jobid: str, what: str) -> list[str] | None:
        name = f"{jobid}.{what}"
        if name not in self.names:
            return None
        try:
            return (self.dir / name).read_text().split()
        except OSError:
            return None

    def exit_of(self, jobid: str) -> Ended | None:
        """How the job's task ended ("code signalled [oom kills]"), None when it wrote no exit file (yet)."""
        words = self._read(jobid, "exit")
        try:
            if not words:
                return None
            return Ended(int(words[0]), words[1] == "1", int(words[2]) > 0 if len(words) > 2 else False)
        except (ValueError, IndexError):
            return None

    def started_of(self, jobid: str) -> int | None:
        """The pid of the program the job's task started, None before it started it."""
        words = self._read(jobid, "started")
        try:
            return int(words[0]) if words else None
        except ValueError:
            return None
