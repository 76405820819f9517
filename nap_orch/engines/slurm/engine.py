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
    component 0 runs the master, component 1 the slaves (each unit sandboxed as a common instance
    is), and the master's mpirun starts the slaves' ranks through the run's folder (``nap_orch.rank``'s
    agent): one MPI world across the nodes, none of it Slurm's. Het jobs need a node per
    component: on a partition with one node up the run is one job of ``hosts + 1`` tasks instead.
  The batch scripts are in ``scripts.py``; every job carries ``--comment=nap:<namespace>``.

Ports. Slurm allocates none, and a job's node is known only once it runs: the task waits for a port
file that the reconciler (``nap agent`` on this engine, ``reconciler.py``) writes after
reserving a port on that node in the state store (``/nap/ports/<node>/<port>``, unique among nodes with
the same address: several slurmd on one machine share its ports). The reconciler also publishes it
(``/services/port/...`` = ``{"host": <node>, "port": ...}``), watches the jobs, and restarts by the
unit's policy those that failed or were lost with their node.

Records: ``records.py`` (what the engine's users asked for, what the reconciler saw, the run files the
jobs write); ``NAP_HOME/slurm/tasks/<name>.sh`` is what a common instance's array task runs (its unit's
command). ``observe.py`` judges them, ``cli.py`` runs Slurm's commands.
States come from one ``squeue`` per call while jobs run, from these records after they end.
Everything under ``NAP_HOME`` must be on a filesystem the nodes share (so must the apps' folders).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ... import keys, metrics, units
from ...config import Settings
from ...errors import BadRequest, EngineError, Exhausted, NotFound
from ...names import PROFILE, InstanceName, Kind
from ...store import open_store
from .. import seccomp
from ..base import RUNNING, STARTING, STOPPED, Engine, InstanceStatus, UnitSpec
from ..journal import last_lines, read_from
from ..ports import Ports
from . import records, scripts
from .cli import Row, SlurmCli
from .config import SlurmSettings
from .observe import observe, to_status
from .records import RUN_FILES, Desired, Observed, Record, RunFiles, current

log = logging.getLogger("nap.slurm")

# How long remove() waits, after Slurm accepted the cancel, for the programs of cancelled jobs to end.
CANCEL_WAIT = 20.0
R = TypeVar("R", bound=Record)


@metrics.engine_calls("slurm")
class SlurmEngine(Engine):
    """Runs units as Slurm jobs of the cluster that ``SLURM_CONF`` (or the default config) names."""

    name = "slurm"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ns = settings.namespace
        self.tag = f"nap:{settings.namespace}"
        self.slurm = SlurmSettings.from_env()
        self.cli = SlurmCli(self.slurm, self.tag)
        self.store = open_store(settings)
        # the reconciler reserves a pass's ports at once: hundreds of tasks wait for them
        self.ports = Ports(self.store, settings.port_range, in_flight=256)
        root = settings.home / "slurm"
        self.journal_dir, self.run_dir, self.tasks_dir = root / "journal", root / "run", root / "tasks"
        self.seccomp = root / "seccomp.bpf"  # the sandboxes' seccomp filter, made at open for the nodes
        self.sandbox = (
            scripts.NodeSandbox(settings.namespace, str(settings.home), str(self.seccomp)) if settings.sandbox else None
        )
        self._units: dict[str, tuple[str, units.Unit | None]] = {}
        self._opened = False

    async def open(self) -> SlurmEngine:
        if not self._opened:
            for d in (self.journal_dir, self.run_dir, self.tasks_dir):
                d.mkdir(parents=True, exist_ok=True)
            if self.sandbox is not None:  # no sandbox without its filter: refuse, as the local agent does
                try:
                    seccomp.write(self.seccomp)
                except seccomp.SeccompError as e:
                    raise EngineError(f"cannot sandbox instances here: {e}. Fix that, or set NAP_SANDBOX=off") from None
            await self.store.open()
            self._opened = True
        return self

    async def close(self) -> None:
        await self.store.close()
        self._opened = False

    # -- names, paths, records -------------------------------------------------------------------
    def desired_key(self, name: str) -> str:
        return records.DESIRED.format(ns=self.ns, name=name)

    def observed_key(self, name: str) -> str:
        return records.OBSERVED.format(ns=self.ns, name=name)

    def ending_key(self, jobid: str) -> str:
        return records.ENDING.format(ns=self.ns, jobid=jobid)

    def run_file(self, jobid: str, what: str) -> Path:
        return self.run_dir / f"{jobid}.{what}"

    def run_files(self) -> RunFiles:
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
        return {k[start:]: d for k, v in raw.items() if (d := Desired.from_json(v)) is not None}

    async def all_observed(self, prefix: str = "") -> dict[str, Observed]:
        start = len(self.observed_key(""))
        raw = await self.store.get_prefix(self.observed_key(prefix))
        return {k[start:]: s for k, v in raw.items() if (s := Observed.from_json(v)) is not None}

    async def all_records(self, prefix: str = "") -> tuple[dict[str, Desired], dict[str, Observed]]:
        return await self.all_desired(prefix), await self.all_observed(prefix)

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
                if b[2].kind.mpi:
                    runs.setdefault(b[2].number, []).append(b)
            groups = await self._array_groups([b for b in todo if b[2].kind == "common"])
            for (jobname, mem), tasks in groups.items():
                jobid = await self.submit_array(jobname, tasks, mem)
                made.append(jobid)
                for task, unit in tasks:
                    records[unit.name] = self._desired_for(
                        before.get(unit.name),
                        "common",
                        f"{jobid}_{task}",
                        f"{jobid}_{task}",
                        jobname,
                        self.journal_dir / f"{jobname}@{task}.out",
                    )
            for members in runs.values():
                jobname, jobid, rows = await self._submit_mpi(members)
                made.append(jobid)
                for (spec, _, inst), row in zip(members, rows):
                    records[spec.name] = self._desired_for(
                        before.get(spec.name), inst.kind, jobid, row, jobname, self.journal_dir / f"{spec.name}.out"
                    )
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
                except (TimeoutError, EngineError):
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
        return Desired(
            kind=kind,
            desired=RUNNING,
            gen=(old.gen + 1) if old else 1,
            jobid=jobid,
            row=row,
            jobname=jobname,
            journal=str(journal),
            submitted=now,
            since=now,
        )

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

    def delete_run_files(self, jobids: Iterable[str]) -> None:
        self._delete_files(jobids=jobids)

    def _delete_files(
        self, journals: Iterable[str] = (), jobids: Iterable[str] = (), names: Iterable[str] = ()
    ) -> None:
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
            groups.setdefault((jobname, scripts.memory_mib(unit)), []).append((task, unit))
        return groups

    def _options(self, jobname: str, output: Path, mem: int | None) -> list[str]:
        opts = [
            f"--job-name={jobname}",
            f"--comment={self.tag}",
            f"--output={output}",
            "--open-mode=append",
            "--no-requeue",
            f"--chdir={self.run_dir}",
        ]
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
            tmp.write_text(scripts.task_line(unit, self.sandbox))
            os.replace(tmp, path)  # a task reading it sees the old line or the new one, whole

    async def submit_array(self, jobname: str, tasks: list[tuple[int, units.Unit]], mem: int | None) -> str:
        """One ``sbatch --array`` of common instances (task ids of one array job name)."""
        opts = self._options(jobname, self.journal_dir / f"{jobname}@%a.out", mem)
        opts.insert(1, f"--array={scripts.ranges([t for t, _ in tasks])}")
        base, _, offset = jobname.partition("~")
        await asyncio.to_thread(self._write_task_files, tasks)
        script = scripts.array_script(str(self.run_dir), str(self.tasks_dir), base, int(offset or 0), len(tasks), opts)
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
        opts = self._options(jobname, self.journal_dir / f"{munit.name}.out", scripts.memory_mib(munit))
        # a het job needs a node per component: with one node up, one job of hosts + 1 tasks instead
        het = len(await self.cli.up_nodes()) >= 2
        if het:
            opts += ["--ntasks=1", "hetjob", f"--ntasks={hosts}", "--spread-job"]
            if self.cli.partition:
                opts.append(f"--partition={self.cli.partition}")
            slave_srun = [srun, "--het-group=1", "--overlap", "--kill-on-bad-exit=0"]
        else:
            opts.append(f"--ntasks={hosts + 1}")
            slave_srun = [srun, f"--ntasks={hosts}", "--overlap", "--kill-on-bad-exit=0"]
        mpi_env = dict(w.split("=", 1) for w in shlex.split(self.slurm.mpi_env) if "=" in w)
        script = scripts.mpi_script(
            str(self.run_dir),
            munit,
            [u for _, u, _ in slaves],
            [str(self.journal_dir / f"{u.name}.out") for _, u, _ in slaves],
            opts,
            slave_srun,
            mpi_env,
            self.sandbox,
        )
        jobid = await self.cli.sbatch(script)
        rows = [
            (f"{jobid}+0" if het else jobid) if b[2].kind == "mpi_master" else (f"{jobid}+1" if het else jobid)
            for b in members
        ]
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
        by_addr: dict[str, list[str]] = {}
        for name, addr, _ in nodes:
            by_addr.setdefault(addr, []).append(name)
        free = sum([await self.ports.free(hosts) for hosts in by_addr.values()])
        if count > free:
            raise Exhausted(
                f"port range {lo}-{hi} is exhausted on the {len(by_addr)} host(s) of the Slurm nodes up "
                f"({free} free, {count} needed)"
            )

    # -- status ----------------------------------------------------------------------------------
    def _statuses(
        self, ds: dict[str, Desired], ss: dict[str, Observed], rows: dict[str, Row]
    ) -> dict[str, InstanceStatus]:
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

    async def instances(self, prefix: str) -> list[InstanceStatus]:
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
        if Kind(d.kind).mpi:
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
        jobid = await self.submit_array(jobname, [(task, unit)], scripts.memory_mib(unit))
        fresh = self._desired_for(d, "common", f"{jobid}_{task}", f"{jobid}_{task}", jobname, Path(d.journal))
        fresh.unit, fresh.profile = d.unit, d.profile
        items = {self.desired_key(name): fresh.to_json()}
        if s.port is not None and s.port_host:  # published again at once; moved if the job lands elsewhere
            inst = InstanceName.parse(name)
            items[keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst)] = json.dumps(
                {"host": s.port_host, "port": s.port}
            )
        await self.store.put_many(items)
        return (await self.status([name]))[name]

    async def remove(self, names: list[str]) -> None:
        """Cancel and forget: jobs, records, port reservations, unit, journal and run files.

        Bounded: it waits at most ``CANCEL_WAIT`` seconds after Slurm accepted the cancel, until
        nothing of the instances can start any more (a task starts its program only once the
        reconciler hands it a port, which it no longer does) and every program that did start has
        ended (its exit file). Jobs still ending in Slurm then are recorded (``records.ENDING``); the
        reconciler cancels them again if they linger and removes their run files once they are gone.
        """
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
        ending: list[str] = []
        try:
            rows = await self.rows_for(ds)
            mine = {i: r for i, r in rows.items() if i in row_ids and r.live}
            if mine:
                await self.cli.scancel(cancel_ids(rows, set(mine)))
                ending = await self._wait_ended(ds, mine)
        except EngineError as e:  # Slurm is unreachable: the reconciler cancels the jobs no record names
            log.warning("cancelling %d instance(s) in Slurm failed (%s); the reconciler will", len(ds), e.message)
        if ending:
            log.warning(
                "%d cancelled job(s) still ending in Slurm after %gs (%s ...); the reconciler finishes them",
                len(ending),
                CANCEL_WAIT,
                ending[0],
            )
            record = json.dumps({"since": time.time()})
            await self.store.put_many({self.ending_key(j): record for j in ending})
        ss = await self.observed(list(ds))  # the reconciler may have handed out ports meanwhile
        await self.ports.release_held(
            (s.port_host, s.port, n) for n, s in ss.items() if s.port is not None and s.port_host
        )
        await self.store.delete_many([self.desired_key(n) for n in names] + [self.observed_key(n) for n in names])
        done = [j for j in jobids if j not in ending]
        await asyncio.to_thread(self._delete_files, [d.journal for d in ds.values()], done, list(ds))
        for name in names:
            self._units.pop(name, None)

    async def _wait_ended(self, ds: dict[str, Desired], cancelled: dict[str, Row]) -> list[str]:
        """Wait (at most ``CANCEL_WAIT``) until each cancelled row has left Slurm, or never started its
        program, or its program has ended; the job ids of those still running then."""
        deadline = time.monotonic() + CANCEL_WAIT
        pending = dict(cancelled)
        while True:
            rows = await self.rows_for(ds)
            files = self.run_files()  # after squeue
            pending = {
                i: r
                for i, r in pending.items()
                if (now := rows.get(i)) is not None
                and now.live
                and files.started_of(r.jobid) is not None
                and files.exit_of(r.jobid) is None
            }
            if not pending or time.monotonic() > deadline:
                return sorted({r.jobid for r in pending.values()})
            await asyncio.sleep(0.25)

    # -- unit, journal ---------------------------------------------------------------------------
    async def unit_text(self, name: str) -> str | None:
        await self.open()
        d = (await self.desired([name])).get(name)
        return d.unit if d is not None else None

    async def journal(self, name: str, lines: int = 100, follow: bool = False) -> AsyncIterator[str]:
        """The job's output file: its last lines; with ``follow``, then what comes, until it ends."""
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
            data = await asyncio.to_thread(read_from, str(path), pos)
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


def cancel_ids(rows: dict[str, Row], cancel: set[str]) -> list[str]:
    """What to hand scancel for the rows ``cancel`` (squeue ids): a whole array job's id where every
    live task of it is to go (one id instead of hundreds), else the tasks' own ids. ``rows`` are all
    the live rows of those arrays (a launch's arrays may hold instances that stay)."""
    by_array: dict[str, list[str]] = {}
    for i, r in rows.items():
        if r.live:
            by_array.setdefault(r.jobid.partition("_")[0], []).append(i)
    ids: list[str] = []
    for base, members in sorted(by_array.items()):
        going = [i for i in members if i in cancel]
        if not going:
            continue
        if len(going) == len(members):
            ids.append(base)
        else:
            ids += sorted({rows[i].jobid for i in going})
    return ids


def _app_prefix(name: str) -> str:
    inst = InstanceName.parse(name)
    return f"{inst.user}_{inst.app}_"


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
