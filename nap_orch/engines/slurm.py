"""The Slurm engine: instances as Slurm jobs (``NAP_ENGINE=slurm``).

Translation of a unit
  - A common instance ``<user>_<app>_common@<n>`` is task ``n`` of an array job named
    ``<user>_<app>_common``: one ``sbatch --array=<n1,n2,...>`` per batch of a launch, so the instance's
    name is the job's name + ``@`` + its task id, like a systemd template unit. Task ids stop at
    Slurm's ``MaxArraySize``; numbers past it go to arrays named ``<user>_<app>_common~<offset>`` whose
    task id is ``n - offset``.
  - ``MemoryMax`` becomes ``--mem``; the journal is the job's output file
    (``NAP_HOME/slurm/journal/<name>.out``, appended to across restarts); ``stop_app`` is ``scancel``
    (Slurm's TERM, then KILL after its ``KillWait``, which stands in for the unit's ``TimeoutStopSec``);
    ``start_app`` submits the task again (a new array of one) in the same folder. Jobs are
    ``--no-requeue``: nap-orch applies the unit's restart policy itself.
  - An MPI run (a master unit and its slave units, submitted together) is one heterogeneous job:
    component 0 runs the master, component 1 the slaves, and the program runs as one
    ``srun --mpi=pmix`` step over both, one MPI world across the nodes. Het jobs need a node per
    component: on a partition with one node up the run is one job of ``hosts + 1`` tasks instead.
  The batch scripts are in ``slurm_jobs.py``; every job carries ``--comment=nap:<namespace>``.

Ports. Slurm allocates none, and a job's node is known only once it runs: the task waits for a port
file that the reconciler (``nap agent`` on this engine, ``nap_orch/slurm_reconciler.py``) writes after
reserving a port on that node in the state store (``/nap/ports/<node>/<port>``, unique among nodes with
the same address: several slurmd on one machine share its ports). The reconciler also publishes it
(``/services/port/...`` = ``{"host": <node>, "port": ...}``), watches the jobs, and restarts by the
unit's policy those that failed or were lost with their node.

Records (this Slurm has no accounting: Slurm forgets a job ``MinJobAge`` after it ends), per stack:
  - ``/nap/slurm/<ns>/desired/<name>``: what the engine's users asked for (the engine writes it): the
    unit as submitted (``cat_unit``), desired state, a generation bumped by each submit/start, and the
    job that submit/start made;
  - ``/nap/slurm/<ns>/observed/<name>``: what the reconciler saw and did (only it writes it): the
    current job (a restart makes a new one), state, node, port, exit code, restarts;
  - ``NAP_HOME/slurm/run/<job>.port``, ``<job>.started`` and ``<job>.exit``: the port handed to a task,
    the pid of the program it started (the instance is running from then on), and how it ended;
  - ``NAP_HOME/slurm/tasks/<name>.sh``: what a common instance's array task runs (its unit's command).
States come from one ``squeue`` per call while jobs run, from these records after they end.
Everything under ``NAP_HOME`` must be on a filesystem the nodes share (so must the apps' folders).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import AsyncIterator, Callable

from .. import keys, units
from ..config import Settings
from ..errors import BadRequest, EngineError, Exhausted, NotFound
from ..names import InstanceName
from ..profile import PROFILE
from ..store import open_store
from . import slurm_jobs
from .base import EXITED, FAILED, RUNNING, STARTING, STOPPED, Engine, InstanceStatus, UnitSpec

log = logging.getLogger("nap.slurm")

# Slurm job states (squeue %T) after which nothing of the job runs any more.
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
ACTIVE = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}
# How long remove() waits for cancelled jobs to leave Slurm: a base, and more per job.
CANCEL_WAIT, CANCEL_WAIT_PER_JOB = 30.0, 0.2
# A job that squeue does not show yet (or any more) this long after submission, without an exit file, is lost.
GRACE = 15.0
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
               "Zero Bytes were transmitted", "Communication connection failure")
SQUEUE_FORMAT = "%k|%i|%j|%T|%N|%r"
KINDS_MPI = ("mpi_master", "mpi_slave")
RUN_FILES = ("port", "started", "exit")  # NAP_HOME/slurm/run/<job>.<what>: see the module's docstring


# -- Slurm's commands ------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of squeue: a job, an array task (``12_3``) or a het component (``12+1``)."""

    id: str
    name: str
    state: str
    nodes: str
    reason: str

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def jobid(self) -> str:
        """What scancel and the run files name: ``12_3`` for a task, ``12`` for a job or het job."""
        return self.id.split("+")[0]


def client_env() -> dict[str, str]:
    """The environment of Slurm's commands and so of the jobs (sbatch exports it): nothing of ours
    (the admin token stays here) and nothing of a Slurm job this process may run in, but SLURM_CONF."""
    env = {k: v for k in ("PATH", "HOME", "LANG", "USER", "LOGNAME", "SLURM_CONF") if (v := os.environ.get(k))}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


class SlurmCli:
    """sbatch, squeue, scancel, sinfo and scontrol, run as processes with Slurm's errors turned into ours."""

    def __init__(self, settings: Settings, tag: str):
        self.bin = settings.slurm_bin
        self.partition = settings.slurm_partition
        self.tag = tag
        self.env = client_env()
        self._max_array: int | None = None
        self._nodes: tuple[float, list[tuple[str, str, str]]] = (0.0, [])

    def path(self, prog: str) -> str:
        if self.bin:
            return os.path.join(self.bin, prog)
        return shutil.which(prog, path=self.env["PATH"]) or prog

    async def run(self, prog: str, *args: str, input: str | None = None, timeout: float = 120.0) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path(prog), *args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL)
        except FileNotFoundError:
            raise EngineError(f"{prog} is not installed here (Slurm's client commands are needed by the slurm engine)") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode:
            raise slurm_error(prog, err.decode(errors="replace"), proc.returncode)
        return out.decode(errors="replace")

    async def sbatch(self, script: str) -> str:
        """Submit a script (its ``#SBATCH`` lines say everything); the job id."""
        out = await self.run("sbatch", "--parsable", input=script)
        return out.strip().split(";")[0]

    async def squeue(self, names: set[str] | None = None) -> dict[str, Row]:
        """Our jobs (tagged with our comment), with array tasks one by one, ended ones included."""
        args = ["-h", "-r", "-t", "all", "-o", SQUEUE_FORMAT]
        if names is not None:
            if not names:
                return {}
            args += ["-n", ",".join(sorted(names))]
        else:
            args += ["-u", str(os.getuid())]
        rows = {}
        for line in (await self.run("squeue", *args)).splitlines():
            parts = line.split("|", 5)
            if len(parts) == 6 and parts[0] == self.tag:
                row = Row(parts[1], parts[2], parts[3], "" if parts[4] in ("", "(null)") else parts[4], parts[5])
                rows[row.id] = row
        return rows

    async def scancel(self, ids: list[str], signal_name: str | None = None) -> None:
        """Cancel (or signal the whole of) jobs by id, 200 per call."""
        ids = list(dict.fromkeys(ids))
        extra = ["--full", f"--signal={signal_name}"] if signal_name else []
        for i in range(0, len(ids), 200):
            await self.run("scancel", *extra, *ids[i : i + 200])

    async def nodes(self, max_age: float = 5.0) -> list[tuple[str, str, str]]:
        """(node, address, state) of the partition's nodes (sinfo, cached a few seconds)."""
        t, found = self._nodes
        if time.monotonic() - t > max_age:
            args = ["-h", "-N", "-o", "%N|%o|%t"] + (["-p", self.partition] if self.partition else [])
            seen: dict[str, tuple[str, str, str]] = {}
            for line in (await self.run("sinfo", *args)).splitlines():
                parts = line.split("|")
                if len(parts) == 3:
                    seen.setdefault(parts[0], (parts[0], parts[1], parts[2]))
            found = list(seen.values())
            self._nodes = (time.monotonic(), found)
        return found

    async def up_nodes(self) -> list[tuple[str, str, str]]:
        return [n for n in await self.nodes() if node_up(n[2])]

    async def max_array_size(self) -> int:
        if self._max_array is None:
            out = await self.run("scontrol", "show", "config")
            m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
            self._max_array = int(m.group(1)) if m else 1001
        return self._max_array


def node_up(state: str) -> bool:
    """sinfo's %t: idle, mix, alloc, comp, resv, plnd take jobs; down, drain, fail, maint ... don't. A
    trailing '*' (not responding) alone does not count: a busy slurmd is late to answer, and Slurm
    marks a node DOWN itself after SlurmdTimeout."""
    return state.rstrip("*~#!%$@^-+") in {"idle", "mix", "alloc", "comp", "resv", "plnd"}


def slurm_error(prog: str, stderr: str, code: int) -> EngineError:
    message = "; ".join(line.strip() for line in stderr.strip().splitlines() if line.strip()) or f"exit code {code}"
    if any(marker in stderr for marker in UNREACHABLE):
        return EngineError(f"the Slurm controller is unreachable: {message}")
    if prog == "sbatch":
        return EngineError(f"Slurm rejected the job: {message}")
    return EngineError(f"{prog} failed: {message}")


# -- records ---------------------------------------------------------------------------------------
@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


class _Record:
    @classmethod
    def from_json(cls, raw: str | None):
        if not raw:
            return None
        data = json.loads(raw)
        names = _field_names(cls)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Desired(_Record):
    """What the engine's users asked for. ``gen`` grows with each submit or start; ``jobid``/``row`` name
    the job that made (scancel's id, and squeue's id of this instance's part of it)."""

    kind: str = "common"
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
class Observed(_Record):
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
    fresh = Observed(gen=d.gen, jobid=d.jobid, row=d.row, submitted=d.submitted, since=d.since or time.time(),
                     message="submitted")
    if s is not None:
        fresh.host, fresh.port, fresh.port_host = s.host, s.port, s.port_host
    return fresh


def observe(name: str, d: Desired, s: Observed | None, rows: dict[str, Row], files: "RunFiles",
            unit_of: Callable[[str], units.Unit | None], now: float) -> tuple[Observed, list[str]]:
    """The instance's state now, and what the reconciler has to do about it: ``assign`` (a port, on
    ``s.host``), ``ended`` (a job's end was just handled), ``resubmit`` (a restart is due), ``cancel``.
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
        return s, (["cancel"] if live else [])
    if s.ended_job == s.jobid:  # this job's end was handled: final, or a restart is due
        return s, (["resubmit"] if s.next_at is not None and now >= s.next_at else [])
    if live and not row.active:
        why = f" ({row.reason})" if row.reason and row.reason != "None" else ""
        _set(s, STARTING, f"{row.state.lower()} in Slurm{why}", now)
        return s, []
    ended = files.exit_of(s.jobid)  # written by the job's script as it ends, before Slurm sees the end
    if live and ended is not None and ended[1]:
        # Signalled by Slurm (scancel, its node going down, a time limit): judged once Slurm says which,
        # so that the journal names it (CANCELLED, NODE_FAIL ...) rather than COMPLETING.
        if s.ending_job != s.jobid:
            s.ending_job, s.ending_at = s.jobid, now
        if now - s.ending_at < GRACE:
            _set(s, s.state, f"ending in Slurm ({row.state})", now)
            return s, []
    if live and ended is None:
        s.host = row.nodes or s.host
        if d.kind == "common" and not (s.port_job == s.jobid and s.port_host == s.host):
            _set(s, STARTING, f"running on {s.host}, waiting for its port", now)
            return s, ["assign"]
        if s.state != RUNNING:
            if d.kind == "common":
                pid = files.started_of(s.jobid)
                if pid is None:
                    _set(s, STARTING, f"port {s.port} on {s.host} handed out, waiting for the program to start", now)
                    return s, []
                s.pid = pid
            s.started_at = now
            _set(s, RUNNING, "", now)
        return s, []
    if ended is None and row is None and now - s.submitted < GRACE:
        return s, []  # just submitted: squeue may not show it yet
    _ended(s, d.kind, unit_of(name), ended, row, now)
    return s, ["ended"]


def _set(s: Observed, state: str, message: str, now: float) -> None:
    if s.state != state or s.message != message:
        s.state, s.message, s.since = state, message, now


def _ended(s: Observed, kind: str, unit: units.Unit | None, ended: tuple[int, bool] | None, row: Row | None,
           now: float, what: str = "") -> None:
    """Apply the unit's restart policy to the end of the current job (the local agent's rules);
    ``ended`` is (exit code, signalled by Slurm), None when the job left no exit code (lost)."""
    code, signalled = ended if ended is not None else (None, False)
    lost = ended is None or signalled
    if what:
        pass
    elif lost:
        if row is not None:
            where = f" on {row.nodes}" if row.nodes else ""
            why = f", {row.reason}" if row.reason and row.reason != "None" else ""
            what = f"lost: Slurm ended job {s.jobid} ({row.state}{where}{why})"
        else:
            what = f"lost: job {s.jobid} is gone from Slurm without an exit code"
    elif kind == "mpi_slave":
        code, what = 0, "the run ended"
    else:
        what = f"exited with code {code}"
    # Only 0 is clean: the script sees a death by signal N as code 128+N, which a program's own exit
    # code could also be (the local agent, which reaps its children itself, knows the difference).
    clean = not lost and code == 0
    restart_policy = unit.restart if unit is not None else "no"
    limit = unit.restart_limit if unit is not None else 0
    s.exit_code = code
    s.ended_job = s.jobid
    s.next_at = None
    if unit is not None and s.started_at is not None and now - s.started_at >= unit.restart_max_delay:
        s.failures = 0  # it ran long enough to count as healthy: the backoff starts over
    restart = restart_policy == "always" or (restart_policy == "on-failure" and not clean)
    if not restart:
        _set(s, EXITED if clean else FAILED, what, now)
    elif s.failures >= limit:
        _set(s, FAILED, f"{what}; gave up after {s.failures} restarts in a row", now)
    else:
        s.failures += 1
        delay = unit.restart_delay(s.failures)
        s.next_at = now + delay
        _set(s, STARTING, f"{what}, restarting in {delay:g}s (restart {s.failures} of {limit})", now)


def to_status(name: str, d: Desired, s: Observed) -> InstanceStatus:
    port = s.port if s.port_job == s.jobid and s.state == RUNNING else None
    pid = s.pid if s.state == RUNNING else None
    return InstanceStatus(name=name, state=s.state, host=s.host, pid=pid, exit_code=s.exit_code, restarts=s.restarts,
                          since=s.since, message=s.message,
                          extra={"desired": d.desired, "job": s.jobid, "port": port})


def timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def ranges(numbers: list[int]) -> str:
    """``1-3,7,9-10`` for [1, 2, 3, 7, 9, 10] (sbatch's --array)."""
    out, nums = [], sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


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

    def exit_of(self, jobid: str) -> tuple[int, bool] | None:
        """How the job's task ended ("code signalled"), None when it wrote no exit file (yet)."""
        words = self._read(jobid, "exit")
        try:
            return (int(words[0]), words[1] == "1") if words else None
        except (ValueError, IndexError):
            return None

    def started_of(self, jobid: str) -> int | None:
        """The pid of the program the job's task started, None before it started it."""
        words = self._read(jobid, "started")
        try:
            return int(words[0]) if words else None
        except ValueError:
            return None


# -- the engine ------------------------------------------------------------------------------------
class SlurmEngine(Engine):
    """Runs units as Slurm jobs of the cluster that ``SLURM_CONF`` (or the default config) names."""

    name = "slurm"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ns = settings.namespace
        self.tag = f"nap:{settings.namespace}"
        self.cli = SlurmCli(settings, self.tag)
        self.store = open_store(settings)
        root = settings.home / "slurm"
        self.journal_dir, self.run_dir, self.tasks_dir = root / "journal", root / "run", root / "tasks"
        self._units: dict[str, tuple[str, units.Unit | None]] = {}
        self._opened = False

    async def open(self) -> "SlurmEngine":
        if not self._opened:
            for d in (self.journal_dir, self.run_dir, self.tasks_dir):
                d.mkdir(parents=True, exist_ok=True)
            await self.store.open()
            self._opened = True
        return self

    async def close(self) -> None:
        await self.store.close()
        self._opened = False

    # -- names, paths, records -------------------------------------------------------------------
    def desired_key(self, name: str) -> str:
        return keys.SLURM_DESIRED.format(ns=self.ns, name=name)

    def observed_key(self, name: str) -> str:
        return keys.SLURM_OBSERVED.format(ns=self.ns, name=name)

    def run_file(self, jobid: str, what: str) -> Path:
        return self.run_dir / f"{jobid}.{what}"

    def run_files(self) -> "RunFiles":
        """The run files as they are now: list them after squeue (see ``RunFiles``)."""
        return RunFiles(self.run_dir)

    def unit(self, name: str, d: Desired) -> units.Unit | None:
        """The instance's unit, parsed (cached while its text stays the same)."""
        cached = self._units.get(name)
        if cached is None or cached[0] != d.unit:
            try:
                unit = units.parse(d.unit, name) if d.unit else None
            except ValueError:
                unit = None
            cached = self._units[name] = (d.unit, unit)
        return cached[1]

    async def _records(self, names: list[str], key: Callable[[str], str], cls) -> dict:
        """Records of the named instances: one get each for a few, a prefix read per app for many."""
        names = list(dict.fromkeys(names))
        if len(names) <= 16:
            raws = await asyncio.gather(*(self.store.get(key(n)) for n in names))
            found = dict(zip(names, raws))
        else:
            prefixes = {_app_prefix(n) for n in names}
            found = {}
            for prefix in prefixes:
                start = len(key(""))
                for k, v in (await self.store.get_prefix(key(prefix))).items():
                    found[k[start:]] = v
        return {n: rec for n in names if (rec := cls.from_json(found.get(n))) is not None}

    async def desired(self, names: list[str]) -> dict[str, Desired]:
        return await self._records(names, self.desired_key, Desired)

    async def observed(self, names: list[str]) -> dict[str, Observed]:
        return await self._records(names, self.observed_key, Observed)

    async def all_desired(self, prefix: str = "") -> dict[str, Desired]:
        start = len(self.desired_key(""))
        raw = await self.store.get_prefix(self.desired_key(prefix))
        return {k[start:]: Desired.from_json(v) for k, v in raw.items()}

    async def all_records(self, prefix: str = "") -> tuple[dict[str, Desired], dict[str, Observed]]:
        out = []
        for key, cls in ((self.desired_key, Desired), (self.observed_key, Observed)):
            start = len(key(""))
            raw = await self.store.get_prefix(key(prefix))
            out.append({k[start:]: cls.from_json(v) for k, v in raw.items()})
        return out[0], out[1]

    async def rows_for(self, ds: dict[str, Desired]) -> dict[str, Row]:
        return await self.cli.squeue({d.jobname for d in ds.values()})

    # -- submit ----------------------------------------------------------------------------------
    async def submit(self, specs: list[UnitSpec]) -> None:
        if not specs:
            return
        await self.open()
        batch: list[tuple[UnitSpec, units.Unit, InstanceName]] = []
        for spec in specs:
            try:
                batch.append((spec, units.parse(spec.text, spec.name), InstanceName.parse(spec.name)))
            except (ValueError, BadRequest) as e:
                raise BadRequest(f"{spec.name}: {getattr(e, 'message', e)}") from None
        before = await self.desired([s.name for s, _, _ in batch])
        todo = [b for b in batch if not self._installed(before.get(b[0].name), b[0])]
        if not todo:
            return
        profiles = await asyncio.to_thread(self._keep_profiles, [u for _, u, i in todo if i.kind == "common"])
        made: list[str] = []
        records: dict[str, Desired] = {}
        try:
            runs: dict[int, list] = {}
            for b in todo:
                if b[2].kind in KINDS_MPI:
                    runs.setdefault(b[2].number, []).append(b)
            groups = await self._array_groups([b for b in todo if b[2].kind == "common"])
            for (jobname, mem), tasks in groups.items():
                jobid = await self.submit_array(jobname, tasks, mem)
                made.append(jobid)
                for task, unit in tasks:
                    records[unit.name] = self._desired_for(before.get(unit.name), "common", f"{jobid}_{task}",
                                                           f"{jobid}_{task}", jobname,
                                                           self.journal_dir / f"{jobname}@{task}.out")
            for members in runs.values():
                jobname, jobid, rows = await self._submit_mpi(members)
                made.append(jobid)
                for (spec, _, inst), row in zip(members, rows):
                    records[spec.name] = self._desired_for(before.get(spec.name), inst.kind, jobid, row, jobname,
                                                           self.journal_dir / f"{spec.name}.out")
            texts = {s.name: s.text for s, _, _ in todo}
            for n, d in records.items():
                d.unit, d.profile = texts[n], profiles.get(n, "")
            items = {self.desired_key(n): d.to_json() for n, d in records.items()}
            for chunk in _chunks(list(items.items()), 500):
                await self.store.put_many(dict(chunk))
        except BaseException:
            if made:
                try:
                    await self.cli.scancel(made)
                except (EngineError, asyncio.TimeoutError):
                    pass  # the reconciler cancels the jobs that no record names
            fresh = [s.name for s, _, _ in todo if s.name not in before]
            await asyncio.to_thread(self._delete_files, [records[n].journal for n in fresh if n in records], (), fresh)
            raise

    def _installed(self, d: Desired | None, spec: UnitSpec) -> bool:
        """Already submitted with this very unit and meant to run (a retried job): leave it be."""
        return d is not None and d.desired == RUNNING and d.unit == spec.text

    @staticmethod
    def _desired_for(old: Desired | None, kind: str, jobid: str, row: str, jobname: str, journal: Path) -> Desired:
        now = time.time()
        return Desired(kind=kind, desired=RUNNING, gen=(old.gen + 1) if old else 1, jobid=jobid, row=row,
                       jobname=jobname, journal=str(journal), submitted=now, since=now)

    @staticmethod
    def _keep_profiles(batch: list[units.Unit]) -> dict[str, str]:
        """The instances' profile copies whose port and host are still markers: the templates the
        reconciler fills in once they are known; meanwhile the copies show ``{port}`` and ``{host}``."""
        found = {}
        for unit in batch:
            copy = Path(unit.workdir) / PROFILE
            try:
                text = copy.read_text()
            except OSError:
                continue
            if units.MARK in text:
                found[unit.name] = text
                copy.write_text(text.replace(units.PORT_REF, "{port}").replace(units.HOST_REF, "{host}"))
        return found

    def fill_profiles(self, items: list[tuple[str, Desired, int, str]]) -> None:
        """Write the profile copies of instances that got (port, host)."""
        for name, d, port, host in items:
            unit = self.unit(name, d) if d.profile else None
            if unit is not None:
                filled = d.profile.replace(units.PORT_REF, str(port)).replace(units.HOST_REF, host)
                (Path(unit.workdir) / PROFILE).write_text(filled)

    def _delete_files(self, journals: list[str] = (), jobids: list[str] = (), names: list[str] = ()) -> None:
        paths = [Path(j) for j in journals if j] + [self.task_file(n) for n in names]
        paths += [self.run_file(j, what) for j in jobids if j for what in RUN_FILES]
        for path in paths:
            try:
                path.unlink()
            except OSError:
                pass

    async def array_group(self, inst: InstanceName) -> tuple[str, int]:
        """(job name, task id) of a common instance: its number is the task id plus the name's offset
        (task ids stop below Slurm's MaxArraySize)."""
        size = await self.cli.max_array_size()
        n = int(inst.inst)
        offset = n // size * size
        base = f"{inst.user}_{inst.app}_common"
        return (base if offset == 0 else f"{base}~{offset}"), n - offset

    async def _array_groups(self, batch) -> dict[tuple[str, int | None], list[tuple[int, units.Unit]]]:
        """Common units by array (job name) and memory: each group is one sbatch."""
        groups: dict[tuple, list] = {}
        for _, unit, inst in batch:
            jobname, task = await self.array_group(inst)
            groups.setdefault((jobname, slurm_jobs.memory_mib(unit)), []).append((task, unit))
        return groups

    def _options(self, jobname: str, output: Path, mem: int | None) -> list[str]:
        opts = [f"--job-name={jobname}", f"--comment={self.tag}", f"--output={output}", "--open-mode=append",
                "--no-requeue", f"--chdir={self.run_dir}"]
        if self.cli.partition:
            opts.append(f"--partition={self.cli.partition}")
        if mem:
            opts.append(f"--mem={mem}M")
        return opts

    def task_file(self, name: str) -> Path:
        return self.tasks_dir / f"{name}.sh"

    def _write_task_files(self, tasks: list[tuple[int, units.Unit]]) -> None:
        for _, unit in tasks:
            path = self.task_file(unit.name)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(slurm_jobs.task_line(unit))
            os.replace(tmp, path)  # a task reading it sees the old line or the new one, whole

    async def submit_array(self, jobname: str, tasks: list[tuple[int, units.Unit]], mem: int | None) -> str:
        """One ``sbatch --array`` of common instances (task ids of one array job name)."""
        opts = self._options(jobname, self.journal_dir / f"{jobname}@%a.out", mem)
        opts.insert(1, f"--array={ranges([t for t, _ in tasks])}")
        base, _, offset = jobname.partition("~")
        await asyncio.to_thread(self._write_task_files, tasks)
        script = slurm_jobs.array_script(str(self.run_dir), str(self.tasks_dir), base, int(offset or 0), len(tasks), opts)
        return await self.cli.sbatch(script)

    async def _submit_mpi(self, members) -> tuple[str, str, list[str]]:
        """One job for an MPI run: (its name, its id, each member's squeue id in the order of ``members``)."""
        master = [b for b in members if b[2].kind == "mpi_master"]
        slaves = sorted((b for b in members if b[2].kind == "mpi_slave"), key=lambda b: int(b[2].inst.split("-")[1]))
        if len(master) != 1 or not slaves:
            raise BadRequest("an MPI run is submitted as its master and slave units together")
        (_, munit, minst), hosts = master[0], len(slaves)
        srun = self.cli.path("srun")
        jobname = f"{minst.user}_{minst.app}_mpi@{minst.number}"
        opts = self._options(jobname, self.journal_dir / f"{munit.name}.out", slurm_jobs.memory_mib(munit))
        # a het job needs a node per component: with one node up, one job of hosts + 1 tasks instead
        het = len(await self.cli.up_nodes()) >= 2
        launch = [srun, "--mpi=pmix", "--overlap", "--kill-on-bad-exit=1"]
        if het:
            opts += ["--ntasks=1", "hetjob", f"--ntasks={hosts}", "--spread-job"]
            if self.cli.partition:
                opts.append(f"--partition={self.cli.partition}")
            slave_srun = [srun, "--het-group=1", "--overlap", "--kill-on-bad-exit=0"]
            launch.append("--het-group=0,1")
        else:
            opts.append(f"--ntasks={hosts + 1}")
            slave_srun = [srun, f"--ntasks={hosts}", "--overlap", "--kill-on-bad-exit=0"]
            launch.append(f"--ntasks={hosts + 1}")
        mpi_env = dict(w.split("=", 1) for w in shlex.split(self.settings.slurm_mpi_env) if "=" in w)
        script = slurm_jobs.mpi_script(str(self.run_dir), munit, [u for _, u, _ in slaves],
                                       [str(self.journal_dir / f"{u.name}.out") for _, u, _ in slaves],
                                       opts, slave_srun, launch, mpi_env)
        jobid = await self.cli.sbatch(script)
        rows = [(f"{jobid}+0" if het else jobid) if b[2].kind == "mpi_master" else (f"{jobid}+1" if het else jobid)
                for b in members]
        return jobname, jobid, rows

    async def check_room(self, count: int) -> None:
        """Enough free ports on the partition's nodes that are up (nodes of one address share theirs)?"""
        await self.open()
        nodes = await self.cli.up_nodes()
        if not nodes:
            where = f"partition {self.cli.partition}" if self.cli.partition else "the default partition"
            states = ", ".join(f"{n}: {st}" for n, _, st in await self.cli.nodes()) or "none"
            raise EngineError(f"no Slurm node of {where} is up ({states})")
        lo, hi = self.settings.port_range
        by_addr: dict[str, set[int]] = {}
        for name, addr, _ in nodes:
            used = by_addr.setdefault(addr, set())
            for key in await self.store.get_prefix(keys.PORTS_OF_HOST.format(host=name)):
                used.add(int(key.rsplit("/", 1)[1]))
        free = sum(len([p for p in range(lo, hi + 1) if p not in used]) for used in by_addr.values())
        if count > free:
            raise Exhausted(f"port range {lo}-{hi} is exhausted on the {len(by_addr)} host(s) of the Slurm nodes up "
                            f"({free} free, {count} needed)")

    # -- status ----------------------------------------------------------------------------------
    def _statuses(self, ds: dict[str, Desired], ss: dict[str, Observed], rows: dict[str, Row]) -> dict[str, InstanceStatus]:
        now = time.time()
        files = self.run_files()  # after the squeue of ``rows``
        out = {}
        for name, d in ds.items():
            s, _ = observe(name, d, ss.get(name), rows, files, lambda n: self.unit(n, ds[n]), now)
            out[name] = to_status(name, d, s)
        return out

    async def status(self, names: list[str]) -> dict[str, InstanceStatus]:
        if not names:
            return {}
        await self.open()
        ds = await self.desired(names)
        if not ds:
            return {}
        ss = await self.observed(list(ds))
        return self._statuses(ds, ss, await self.rows_for(ds))

    async def list(self, prefix: str) -> list[InstanceStatus]:
        await self.open()
        ds, ss = await self.all_records(prefix)
        if not ds:
            return []
        found = self._statuses(ds, ss, await self.rows_for(ds))
        return [found[n] for n in sorted(found)]

    # -- stop, start, remove ---------------------------------------------------------------------
    async def _require(self, name: str) -> Desired:
        await self.open()
        d = (await self.desired([name])).get(name)
        if d is None:
            raise NotFound(f"no instance {name!r}")
        return d

    async def stop(self, name: str) -> InstanceStatus:
        """``scancel`` of the instance's job (Slurm sends TERM, then KILL after its ``KillWait``), and
        wait until it is gone; an MPI member stops its whole run."""
        d = await self._require(name)
        members = {name: d}
        if d.kind in KINDS_MPI:
            inst = InstanceName.parse(name)
            ds, _ = await self.all_records(f"{inst.user}_{inst.app}_mpi_")
            members.update({n: m for n, m in ds.items() if m.jobid == d.jobid})
        now = time.time()
        for m in members.values():
            if m.desired != STOPPED:
                m.desired, m.since = STOPPED, now
        await self.store.put_many({self.desired_key(n): m.to_json() for n, m in members.items()})
        s = current(d, (await self.observed([name])).get(name))
        row = (await self.rows_for({name: d})).get(s.row)
        if row is not None and row.live:
            await self.cli.scancel([s.jobid])
            await self._wait_gone({name: d}, s.row, 60.0)
        return (await self.status([name]))[name]

    async def _wait_gone(self, ds: dict[str, Desired], row_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            row = (await self.rows_for(ds)).get(row_id)
            if row is None or not row.live:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)

    async def start(self, name: str) -> InstanceStatus:
        """Submit the instance again (same unit, folder and, where it is free on the node, port)."""
        d = await self._require(name)
        if d.kind != "common":
            raise BadRequest("an MPI run cannot be restarted: start a new run with start_mpi")
        s = current(d, (await self.observed([name])).get(name))
        row = (await self.rows_for({name: d})).get(s.row)
        if d.desired == RUNNING and row is not None and row.live:
            return (await self.status([name]))[name]
        unit = self.unit(name, d)
        if unit is None:
            raise NotFound(f"the unit of {name} is gone")
        jobname, task = await self.array_group(InstanceName.parse(name))
        jobid = await self.submit_array(jobname, [(task, unit)], slurm_jobs.memory_mib(unit))
        fresh = self._desired_for(d, "common", f"{jobid}_{task}", f"{jobid}_{task}", jobname, Path(d.journal))
        fresh.unit, fresh.profile = d.unit, d.profile
        items = {self.desired_key(name): fresh.to_json()}
        if s.port is not None and s.port_host:  # published again at once; moved if the job lands elsewhere
            inst = InstanceName.parse(name)
            items[keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst)] = json.dumps(
                {"host": s.port_host, "port": s.port})
        await self.store.put_many(items)
        return (await self.status([name]))[name]

    async def remove(self, names: list[str]) -> None:
        """Cancel and forget: jobs, records, port reservations, unit, journal and run files."""
        if not names:
            return
        await self.open()
        ds = await self.desired(names)
        now = time.time()
        for d in ds.values():  # first: the reconciler must not restart what is being cancelled here
            d.desired, d.since = STOPPED, now
        await self.store.put_many({self.desired_key(n): d.to_json() for n, d in ds.items()})
        ss = await self.observed(list(ds))
        jobids, row_ids = set(), set()
        for n, d in ds.items():
            s = current(d, ss.get(n))
            jobids.update({d.jobid, s.jobid})
            row_ids.update({d.row, s.row})
        try:
            rows = await self.rows_for(ds)
            live = [r.jobid for i, r in rows.items() if i in row_ids and r.live]
            if live:
                await self.cli.scancel(live)
                # Slurm ends cancelled jobs at about 30 a second here (400 took 14-16 s on 2 cores): a
                # rollback waits until they are gone, so nothing of it runs on when it is done
                deadline = time.monotonic() + CANCEL_WAIT + CANCEL_WAIT_PER_JOB * len(live)
                while True:
                    rows = await self.rows_for(ds)
                    left = [r for i, r in rows.items() if i in row_ids and r.live]
                    if not left:
                        break
                    if time.monotonic() > deadline:
                        log.warning("%d of %d cancelled job(s) still in Slurm (%s ...); the reconciler "
                                    "cancels them again", len(left), len(live), left[0].id)
                        break
                    await asyncio.sleep(0.25)
        except EngineError:
            pass  # Slurm is unreachable: the reconciler cancels the jobs that no record names any more
        ss = await self.observed(list(ds))  # the reconciler may have handed out ports meanwhile
        owned = [(n, s) for n, s in ss.items() if s.port is not None and s.port_host]
        holders = await asyncio.gather(*(self.store.get(keys.PORT_RESERVATION.format(host=s.port_host, port=s.port))
                                         for _, s in owned))
        await self.store.delete_many(
            [keys.PORT_RESERVATION.format(host=s.port_host, port=s.port) for (n, s), h in zip(owned, holders) if h == n]
            + [self.desired_key(n) for n in names] + [self.observed_key(n) for n in names])
        await asyncio.to_thread(self._delete_files, [d.journal for d in ds.values()], list(jobids), list(ds))
        for name in names:
            self._units.pop(name, None)

    # -- unit, journal ---------------------------------------------------------------------------
    async def unit_text(self, name: str) -> str | None:
        await self.open()
        d = (await self.desired([name])).get(name)
        return d.unit if d is not None else None

    async def journal(self, name: str, lines: int = 100, follow: bool = False) -> AsyncIterator[str]:
        """The job's output file: its last lines; with ``follow``, then what comes, until it ends."""
        from ..agent import last_lines

        d = await self._require(name)
        path = Path(d.journal)
        lines = max(0, min(int(lines), 100_000))
        for raw in await asyncio.to_thread(last_lines, str(path), lines):
            yield raw.decode("utf-8", "replace")
        if not follow:
            return
        try:
            pos = path.stat().st_size
        except OSError:
            pos = 0
        buf = b""
        checked = 0.0
        while True:
            done = False
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                st = (await self.status([name])).get(name)
                done = st is None or st.state not in (STARTING, RUNNING)
            data = await asyncio.to_thread(_read_from, path, pos)
            if data:
                pos += len(data)
                *complete, buf = (buf + data).split(b"\n")
                for line in complete:
                    yield line.decode("utf-8", "replace")
            if done:
                if buf:
                    yield buf.decode("utf-8", "replace")
                return
            await asyncio.sleep(0.25)


def _read_from(path: Path, pos: int) -> bytes:
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < pos:
                return b""
            f.seek(pos)
            return f.read(1024 * 1024)
    except OSError:
        return b""


def _app_prefix(name: str) -> str:
    inst = InstanceName.parse(name)
    return f"{inst.user}_{inst.app}_"


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
