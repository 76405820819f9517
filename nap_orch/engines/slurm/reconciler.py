"""The Slurm engine's reconciler: what ``nap agent`` runs when ``NAP_ENGINE=slurm``.

Slurm allocates no ports and never restarts a job (nap's jobs are ``--no-requeue``), so something
long-lived does, as the local agent does on its host. Each pass reads the engine's records, runs one
``squeue`` and, for each instance (``observe.observe`` says what to do):

- a task that runs without a port gets one: reserved on its node in the state store (the one it held
  there, else its last port number if free, else the lowest free), written to the task's port file,
  published at ``/services/port/<user>/<app>/<n>`` = ``{"host": <node>, "port": ...}``;
- a job that ended (exit code from its exit file; no file, or killed by Slurm: lost, e.g. with its
  node) is judged by the unit's restart policy (``engines.restarts``, as on the local engine): restarted after the
  backoff as a new job (the restarts of one pass are one ``sbatch --array`` per app), or failed after
  ``StartLimitBurst``; the decision goes to the instance's journal;
- a stopped instance whose job still runs is cancelled (after its stop timeout);
- a job with our comment that no record names for a while (a launch rolled back while Slurm was
  unreachable) is cancelled.

Passes come every ``NAP_SLURM_POLL`` seconds, four a second while something is starting. One
reconciler works per stack: the one holding ``/nap/slurm/<ns>/reconciler`` (a lease); others wait.
Like the local agent, it answers ``GET /health`` on the agent socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

from aiohttp import web

from ... import keys, metrics
from ...config import Settings
from ...errors import EngineError, NapError
from ...names import InstanceName
from ...store.base import Lease, LeaseExpired
from .. import daemon, health
from ..base import FAILED, RUNNING, STARTING, STOPPED
from ..files import FilePool
from ..journal import event_line
from . import records, scripts
from .cli import Row
from .engine import SlurmEngine
from .observe import Action, job_ended, observe
from .records import Desired, Observed

log = logging.getLogger("nap.slurm")

LEASE_TTL = 10
BUSY_INTERVAL = 0.25
ORPHAN_GRACE = 30.0  # a job no record names is cancelled after this (a launch records its jobs at once)
CLEANUP_EVERY = 60.0
PROBES_AT_ONCE = 64  # health checks in flight at once
RUN_FILE_AGE = 600.0  # run files of jobs no record names any more are removed after this
RETRY_SUBMIT = 10.0  # a restart that Slurm refused is tried again after this
SPARE_FILES = 2048  # empty files made ahead of time for port files: a launch of 1000 finds them ready
STOP_GRACE = 10.0  # a stopped instance's job still there after this is cancelled (again)


class Reconciler:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = SlurmEngine(settings)
        self.store = self.engine.store
        self.lease: Lease | None = None
        self.refreshed = 0.0
        self.orphans: dict[str, float] = {}
        self.cleaned = 0.0
        self.passes = 0
        self.instances = 0
        self.last_error = ""
        self.pool = FilePool(str(self.engine.run_dir / "spare"), SPARE_FILES)
        # Only the reconciler at work writes the observations: it keeps them here, read once as it takes
        # over (None: read them again).
        self.observed: dict[str, Observed] | None = None

    # -- leadership ------------------------------------------------------------------------------
    async def lead(self) -> bool:
        """Hold the reconciler's key (a lease kept alive); False while another reconciler holds it."""
        if self.lease is not None:
            if time.monotonic() - self.refreshed < LEASE_TTL / 3:
                return True
            try:
                await self.lease.refresh()
                self.refreshed = time.monotonic()
                return True
            except LeaseExpired:
                log.warning("lost the reconciler's lease; taking it again")
                self.lease = None
        lease = await self.store.lease(LEASE_TTL)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        if await self.store.create(records.RECONCILER.format(ns=self.engine.ns), me, lease=lease):
            self.lease, self.refreshed = lease, time.monotonic()
            self.observed = None
            log.info("reconciling the Slurm jobs of namespace %s", self.engine.ns)
            return True
        await lease.revoke()
        return False

    async def run(self) -> None:
        await self.engine.open()
        self.pool.refill()
        try:
            while True:
                busy = False
                try:
                    if await self.lead():
                        busy = await self.pass_once()
                        self.last_error = ""
                        if not busy:  # not while a launch needs the cores: slurmd starts its tasks then
                            self.pool.refill()
                except (TimeoutError, NapError, ConnectionError, OSError) as e:
                    self.observed = None
                    message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                    if message != self.last_error:
                        log.warning("reconciler pass failed: %s", message)
                    self.last_error = message
                except Exception:  # keep reconciling whatever one pass hit
                    self.observed = None
                    log.exception("reconciler pass failed")
                await asyncio.sleep(BUSY_INTERVAL if busy else self.engine.slurm.poll)
        finally:
            if self.lease is not None:
                try:
                    await self.lease.revoke()
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
            self.pool.close()
            await self.engine.close()

    # -- one pass --------------------------------------------------------------------------------
    async def pass_once(self) -> bool:
        """Look once and act; True while some instance is starting (the next pass comes sooner)."""
        engine = self.engine
        # first: a job submitted before this read shows in the squeue below
        if self.observed is None:
            ds, ss = await engine.all_records()
            self.observed = dict(ss)
        else:
            ds, ss = await engine.all_desired(), self.observed
        rows = await engine.cli.squeue()
        files = engine.run_files()  # after squeue
        now = time.time()
        states: dict[str, Observed] = {}
        todo: dict[Action, list[str]] = {action: [] for action in Action}
        for name, d in ds.items():
            if d is None:
                continue
            s, actions = observe(name, d, ss.get(name), rows, files, lambda n: engine.unit(n, ds[n]), now)
            states[name] = s
            for action in actions:
                todo[action].append(name)
        for name in todo[Action.ENDED]:  # the job's script wrote how it exited; say what comes of it
            s = states[name]
            if s.message not in (f"exited with code {s.exit_code}", "the run ended"):
                self.event(ds[name], s.message)
        if todo[Action.ASSIGN]:
            await self.assign(ds, states, todo[Action.ASSIGN], now)
        if todo[Action.RESUBMIT]:
            await self.resubmit(ds, states, todo[Action.RESUBMIT], now)
        await self.cancel_stopped(ds, states, todo[Action.CANCEL], now)
        if todo[Action.PROBE]:
            await self.probe(ds, states, todo[Action.PROBE], now)
        if todo[Action.UNHEALTHY]:
            await self.end_unhealthy(ds, states, todo[Action.UNHEALTHY])
        changed = {n: s for n, s in states.items() if s != ss.get(n)}
        items = [(engine.observed_key(n), s.to_json()) for n, s in changed.items()]
        for i in range(0, len(items), 500):
            await self.store.put_many(dict(items[i : i + 500]))
        self.observed.update(changed)
        # an instance removed while an earlier pass looked at it may have got its observation back
        gone = [n for n in self.observed if n not in ds]
        await self.store.delete_many([engine.observed_key(n) for n in gone])
        for n in gone:
            del self.observed[n]
        referenced = {d.jobid for d in ds.values() if d} | {s.jobid for s in states.values()}
        referenced |= await self.finish_ending(rows, now)
        await self.cancel_orphans(rows, referenced, now)
        if now - self.cleaned > CLEANUP_EVERY:
            self.cleaned = now
            await asyncio.to_thread(self.cleanup, referenced, now)
            await self.release_leaked_ports(ds)
        self.passes += 1
        self.instances = len(states)
        metrics.set_instances("slurm", (s.state for s in states.values()))
        return any(s.state == STARTING and ds[n].desired == RUNNING for n, s in states.items())

    def event(self, d: Desired, text: str) -> None:
        """A line in the instance's journal (the job's output file, appended to), like the agent's."""
        if not d.journal or not text:
            return
        try:
            with open(d.journal, "a", encoding="utf-8") as f:
                f.write(event_line(text))
        except OSError as e:
            log.warning("cannot write to %s: %s", d.journal, e)

    # -- ports -----------------------------------------------------------------------------------
    async def assign(self, ds: dict[str, Desired], states: dict[str, Observed], names: list[str], now: float) -> None:
        by_node: dict[str, list[str]] = {}
        for name in names:
            host = states[name].host
            if host is not None:  # observe asks for a port once the job's node is known
                by_node.setdefault(host, []).append(name)
        nodes = await self.engine.cli.nodes()
        addr = {n: a for n, a, _ in nodes}
        for node, group in by_node.items():
            siblings = [n for n, a, _ in nodes if node in addr and a == addr[node]] or [node]
            # the port it held there, else its last port number if free, else the lowest free one
            reserved = await self.engine.ports.reserve(
                node, group, siblings=siblings, prefer={n: states[n].port for n in group}
            )
            got, missing = reserved.ports, reserved.missing
            await self.hand_out(node, got, ds, states, now)
            lo, hi = self.settings.port_range
            if missing:
                await self.engine.cli.scancel([states[n].jobid for n in missing])
            for name in missing:
                s = states[name]
                job_ended(
                    s,
                    ds[name].kind,
                    self.engine.unit(name, ds[name]),
                    None,
                    None,
                    now,
                    what=f"no free port in {lo}-{hi} on {node} (job {s.jobid} cancelled)",
                )
                self.event(ds[name], s.message)

    async def hand_out(
        self, node: str, got: dict[str, int], ds: dict[str, Desired], states: dict[str, Observed], now: float
    ) -> None:
        """Release the ports left on other nodes, write the port files, publish the ports."""
        if not got:
            return
        await self.engine.ports.release_held(
            (s.port_host, s.port, n)
            for n in got
            if (s := states[n]).port_host and s.port is not None and (s.port_host, s.port) != (node, got[n])
        )
        await asyncio.to_thread(self.engine.fill_profiles, [(n, ds[n], p, node) for n, p in got.items()])
        await asyncio.to_thread(self.write_port_files, [(states[n].jobid, p, node) for n, p in got.items()])
        items = {}
        for name, port in got.items():  # the observation keeps the port (start_app asks for it again)
            inst = InstanceName.parse(name)
            items[keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst)] = json.dumps(
                {"host": node, "port": port}
            )
        pairs = list(items.items())
        for i in range(0, len(pairs), 500):
            await self.store.put_many(dict(pairs[i : i + 500]))
        for name, port in got.items():
            s = states[name]
            s.port, s.port_host, s.port_job = port, node, s.jobid
            s.state, s.since = STARTING, now  # running once the task has started the program
            s.message = f"port {port} on {node} handed out, waiting for the program to start"

    def write_port_files(self, items: list[tuple[str, int, str]]) -> None:
        """ "port node" into each job's port file, in one write (the task reads a whole line only). The
        file is a spare renamed into place: creating hundreds of files at once is what would cost."""
        for jobid, port, node in items:
            path = str(self.engine.run_file(jobid, "port"))
            self.pool.place(path)
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, f"{port} {node}\n".encode())
            finally:
                os.close(fd)

    # -- health (engines.health) ------------------------------------------------------------------
    async def probe(self, ds: dict[str, Desired], states: dict[str, Observed], names: list[str], now: float) -> None:
        """Probe the ports of the instances whose check is due, at their nodes' addresses, at once."""
        addr = {n: a for n, a, _ in await self.engine.cli.nodes()}
        limit = asyncio.Semaphore(PROBES_AT_ONCE)

        async def one(name: str) -> None:
            s = states[name]
            unit = self.engine.unit(name, ds[name])
            if unit is None or s.port is None or not s.host:
                return
            check = health.Check.of(unit)
            async with limit:
                ok, what = await health.probe(check, addr.get(s.host) or s.host, s.port)
            h = health.Health(s.started_at or now, s.check_passed, s.check_failures)
            health.record(h, ok)
            s.check_passed, s.check_failures, s.probed_at, s.probe_note = h.passed, h.failures, now, what
            if not ok and s.state == RUNNING:
                self.event(ds[name], f"check failed ({what}): {h.failures} of {health.FAIL_LIMIT} in a row")
            elif ok and s.state == STARTING and health.judge(check, h, time.time()) == "running":
                s.state, s.message, s.since = RUNNING, "", time.time()
                self.event(ds[name], f"healthy: {what}")

        await asyncio.gather(*(one(n) for n in names))

    async def end_unhealthy(self, ds: dict[str, Desired], states: dict[str, Observed], names: list[str]) -> None:
        """Cancel the jobs of instances whose check failed too often: their end is judged as a loss, and
        their restart policy brings them back."""
        for name in names:
            s = states[name]
            self.event(
                ds[name],
                f"its check failed {s.check_failures} times in a row ({s.probe_note}): cancelling job {s.jobid}",
            )
            s.check_failures = 0  # cancelled once; the job's end comes with the next passes
        await self.engine.cli.scancel([states[n].jobid for n in names])

    # -- restarts, cancels -----------------------------------------------------------------------
    async def resubmit(self, ds: dict[str, Desired], states: dict[str, Observed], names: list[str], now: float) -> None:
        """Restarts that are due: one array job per app (and memory limit)."""
        groups: dict[tuple, list] = {}
        for name in names:
            unit = self.engine.unit(name, ds[name])
            if unit is None:
                s = states[name]
                s.next_at = None
                s.state, s.message, s.since = FAILED, "its unit is gone: not restarted", now
                continue
            jobname, task = await self.engine.array_group(InstanceName.parse(name))
            groups.setdefault((jobname, scripts.memory_mib(unit)), []).append((task, unit))
        for (jobname, mem), tasks in groups.items():
            try:
                jobid = await self.engine.submit_array(jobname, tasks, mem)
            except EngineError as e:
                log.warning("restarting %d instance(s) of %s failed: %s", len(tasks), jobname, e.message)
                for _, unit in tasks:
                    s = states[unit.name]
                    s.next_at = now + RETRY_SUBMIT
                    s.message = f"restart {s.failures} failed, trying again in {RETRY_SUBMIT:g}s: {e.message}"
                continue
            for task, unit in tasks:
                s = states[unit.name]
                s.jobid = s.row = f"{jobid}_{task}"
                s.submitted, s.next_at, s.started_at = now, None, None
                s.restarts += 1
                metrics.RESTARTS.labels("slurm").inc()
                s.state, s.since = STARTING, now
                s.message = f"restart {s.failures} of {unit.restart_limit}: job {s.jobid}"
                self.event(ds[unit.name], s.message)

    async def cancel_stopped(
        self, ds: dict[str, Desired], states: dict[str, Observed], names: list[str], now: float
    ) -> None:
        """Jobs of stopped instances that still run (``stop`` cancelled them, or could not)."""
        due = [states[n].jobid for n in names if ds[n].desired == STOPPED and now - ds[n].since > STOP_GRACE]
        if due:
            await self.engine.cli.scancel(due)

    async def finish_ending(self, rows: dict[str, Row], now: float) -> set[str]:
        """The jobs of removed instances that were still ending (``SlurmEngine.remove``): cancelled
        again while they linger, forgotten with their run files once Slurm has ended them. Their ids."""
        start = len(self.engine.ending_key(""))
        ending = {k[start:]: v for k, v in (await self.store.get_prefix(self.engine.ending_key(""))).items()}
        if not ending:
            return set()
        live = {r.jobid for r in rows.values() if r.live}
        gone = [j for j in ending if j not in live]
        again = [j for j, raw in ending.items() if j in live and now - _since(raw) > STOP_GRACE]
        if again:
            log.info("cancelling again %d removed job(s) still in Slurm: %s", len(again), ", ".join(again[:10]))
            await self.engine.cli.scancel(again)
            record = json.dumps({"since": now})
            await self.store.put_many({self.engine.ending_key(j): record for j in again})
        if gone:
            await asyncio.to_thread(self.engine.delete_run_files, gone)
            await self.store.delete_many([self.engine.ending_key(j) for j in gone])
        return set(ending)

    async def cancel_orphans(self, rows: dict[str, Row], referenced: set[str], now: float) -> None:
        live = {r.jobid for r in rows.values() if r.live}
        orphans = [j for j in live if j not in referenced]
        self.orphans = {j: self.orphans.get(j, now) for j in orphans}
        due = [j for j, first in self.orphans.items() if now - first > ORPHAN_GRACE]
        if due:
            log.info("cancelling %d job(s) that no instance names: %s", len(due), ", ".join(due[:10]))
            await self.engine.cli.scancel(due)

    async def release_leaked_ports(self, ds: dict[str, Desired]) -> None:
        """Reservations on our nodes, in our range, held by instances that exist no more (a pass that
        handed out a port raced with the instance's removal)."""
        lo, hi = self.settings.port_range
        leaked = []
        for node, _, _ in await self.engine.cli.nodes():
            for key, holder in (await self.store.get_prefix(keys.PORTS_OF_HOST.format(host=node))).items():
                if not lo <= int(key.rsplit("/", 1)[1]) <= hi or holder in ds:
                    continue
                try:
                    inst = InstanceName.parse(holder)
                except NapError:
                    continue
                if await self.store.get(keys.INSTANCE.format(user=inst.user, app=inst.app, n=inst.inst)) is None:
                    leaked.append(key)
        if leaked:
            log.info("releasing %d port(s) of instances that are gone", len(leaked))
            await self.store.delete_many(leaked)

    def cleanup(self, referenced: set[str], now: float) -> None:
        """Take back the port and exit files of jobs that no record names any more."""
        for path in Path(self.engine.run_dir).iterdir():
            jobid = path.name.split(".")[0]
            try:
                if path.is_file() and jobid not in referenced and now - path.stat().st_mtime > RUN_FILE_AGE:
                    self.pool.recycle(str(path))
            except OSError:
                pass


def _since(raw: str) -> float:
    try:
        return float(json.loads(raw)["since"])
    except (ValueError, KeyError, TypeError):
        return 0.0


# -- the process -----------------------------------------------------------------------------------
RECONCILER = web.AppKey("reconciler", Reconciler)


async def health_answer(request: web.Request) -> web.Response:
    reconciler = request.app[RECONCILER]
    return web.json_response(
        {
            "agent": "nap",
            "engine": "slurm",
            "pid": os.getpid(),
            "leading": reconciler.lease is not None,
            "instances": reconciler.instances,
            "passes": reconciler.passes,
            "error": reconciler.last_error,
        }
    )


async def serve(settings: Settings) -> None:
    """Reconcile until cancelled, answering ``GET /health`` on the agent socket."""
    reconciler = Reconciler(settings)
    app = web.Application()
    app[RECONCILER] = reconciler
    app.router.add_get("/health", health_answer)
    sock_path = settings.agent_socket_path
    async with daemon.serving(app, sock_path):
        log.info("nap agent (Slurm reconciler, pid %s) on %s", os.getpid(), sock_path)
        await reconciler.run()


def main() -> None:
    """``nap agent`` on the Slurm engine, until SIGTERM or SIGINT."""
    settings = Settings.from_env()
    metrics.setup(settings.metrics_path)
    daemon.run(lambda: serve(settings))
