"""The nap agent: the local engine's long-lived supervisor of instance processes on this host.

Workers hand it rendered units over an HTTP API on a unix socket; it runs exactly what each unit says
(``units.parse`` + ``units.expand``) and keeps it running by the unit's restart policy.

Instances outlive the agent: each runs in its own session, its stdout and stderr go to files (never
through a pipe the agent reads, which would SIGPIPE them once the agent is gone), and everything the
agent knows is kept in ``settings.agent_dir``::

    units/<name>.service   the unit, as submitted
    state/<name>.json      desired state, pid + its start time (/proc/<pid>/stat field 22), counters
    output/<name>.out|err  the instance's raw stdout/stderr (emptied when a new process starts)
    journal/<name>.log     the journal: raw output tailed into timestamped lines, plus agent events
    tail.0.json, tail.1.json  how far each raw file was read and how long each journal was (A/B copies)
    spare/                 empty files made ahead of time (see ``engines.files.FilePool``)
    seccomp.bpf            the sandboxes' seccomp filter (``engines.seccomp``), made at the agent's start

Files are written in place, not fsynced, and not replaced by renames: creating inodes is what costs
(see ``engines.files.FilePool``), and the state must survive the agent, not the host (the instances
don't either).

A restarted agent (also after SIGKILL) adopts the processes that are still alive (same pid and start
time), learns of their exit through a pidfd, and starts again those that died while it was away.

Journal lines: ``2025-11-26T04:12:33.123Z stdout[4242]: text`` (``stderr[...]`` for stderr, and
``nap: ...`` for the agent's own events). Lines written while no agent watched (read at a recovery)
carry their file's last modification time, the latest they can have been written, and the mark
``stdout[4242] (written while no agent watched: by this time): text``.

Every instance runs sandboxed (``sandbox.py``) as its unit's ``User=``, in a control group of its own
(``cgroups.py``) that holds its ``MemoryMax=`` and ``TasksMax=`` over its whole process tree: stopping
it signals every process of its group, and a process the kernel kills for memory stops the instance
(as systemd's ``OOMPolicy=stop``), whose state is ``oom`` once it is given up. In the sandbox a death
by signal N is seen as exit code 128+N (bubblewrap's). Without a usable sandbox the agent refuses to
start instances, unless ``NAP_SANDBOX=off`` says to run them as its own user, unisolated.

Its HTTP API on the agent socket is in ``http.py``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import resource
import signal
import subprocess
import time
import zlib
from pathlib import Path

from ... import metrics, units
from ...config import Settings
from ...errors import BadRequest, Conflict, EngineError, NotFound
from ...names import is_unit_name
from .. import health
from ..base import ENDED, RUNNING, STARTING, STOPPED, InstanceStatus
from ..cgroups import CgroupError, Group, Limits
from ..files import FilePool
from ..journal import event_line, last_lines, timestamp
from ..restarts import Exit, decide
from .linux import Inotify, punch_hole
from .proc import EXIT_CHDIR, EXIT_EXEC, describe_exit, exit_of, is_alive, proc_stat
from .records import Record, read_record, write_record
from .sandbox import Isolation, prepare

log = logging.getLogger("nap.agent")

LINE_MAX = 16 * 1024  # longer output lines are split into journal lines of this many bytes
JOURNAL_MAX = 8 * 1024 * 1024  # a journal this long moves to <name>.log.1 (one generation kept)
READ_CHUNK = 1024 * 1024
DRAIN_DELAY = 0.05  # batch the drains that file writes trigger
SWEEP_INTERVAL = 1.0  # also look at every running instance's output this often, and poll liveness
UNWATCHED = " (written while no agent watched: by this time)"  # how such journal lines are marked
SLICE = 0.01  # a batch's synchronous work lets other requests in after this many seconds of it


class Pacer:
    """Yields to the event loop once ``SLICE`` seconds of synchronous work have gone by, so that a
    batch of 1,000 units (installing, spawning sandboxed processes) does not hold another user's status
    request for seconds."""

    def __init__(self) -> None:
        self.since = time.monotonic()

    async def tick(self) -> None:
        if time.monotonic() - self.since >= SLICE:
            await asyncio.sleep(0)
            self.since = time.monotonic()


SPARE_FILES = 5 * 1024  # five files an instance: a batch of 1000 finds them ready
PUNCH_MIN = 1024 * 1024  # free the journaled part of a raw output file in steps of at least this


class Instance:
    """One unit and its process, as the agent tracks it in memory."""

    def __init__(self, name: str, text: str, unit: units.Unit, record: Record, paths: dict[str, str]):
        self.name = name
        self.text = text
        self.unit = unit
        self.record = record
        self.paths = paths
        self.popen: subprocess.Popen | None = None  # our child (reaped on SIGCHLD)
        self.pidfd: int | None = None  # an adopted process: readable when it exits
        self.polled = False  # an adopted process without a pidfd: liveness polled
        self.exit_waiters: list[asyncio.Future] = []
        self.restart_timer: asyncio.TimerHandle | None = None
        self.stop_task: asyncio.Task | None = None
        self.followers: set[asyncio.Queue] = set()
        self.out_off = 0
        self.err_off = 0
        self.jsize = 0
        self.output_pid: int | None = None  # whose output the raw files hold
        self.group: Group | None = None  # its control group, when sandboxed
        self.oom_seen = 0  # the group's OOM kills counted before the current process started
        self.health: health.Health | None = None  # of the current process
        self.unhealthy = ""  # why the agent is ending the current process (its check failed)

    @property
    def alive(self) -> bool:
        return self.record.pid is not None

    @property
    def finished(self) -> bool:
        """Stopped, exited or failed for good: nothing more will run until someone starts it."""
        return not self.alive and self.restart_timer is None and self.record.state in ENDED


def lock(directory: Path) -> int:
    """Take an agent directory's lock: one agent per directory (the kernel drops it if the agent dies).
    The lock's file descriptor; ``Conflict`` while another agent holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise Conflict(f"another nap agent (pid {other or '?'}) is running on {directory}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Supervisor:
    """Runs instances from their units and keeps them by their restart policy.

    Made on the event loop that runs it, by the agent that holds the directory's ``lock``;
    ``supervise`` adopts or restarts what an earlier agent left, ``close`` stops supervising (the instances run on).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = Path(settings.agent_dir)
        self.units_dir = self.dir / "units"
        self.state_dir = self.dir / "state"
        self.output_dir = self.dir / "output"
        self.journal_dir = self.dir / "journal"
        for d in (self.units_dir, self.state_dir, self.output_dir, self.journal_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.instances: dict[str, Instance] = {}
        self.children: dict[int, Instance] = {}
        self.base_env = {
            "PATH": os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME") or "/",
            "LANG": os.environ.get("LANG") or "C.UTF-8",
            "NAP_HOST": settings.host,
        }
        self.loop = asyncio.get_running_loop()
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.inotify = Inotify.watch(str(self.output_dir))
        self.pool = FilePool(f"{self.dir}/spare", SPARE_FILES)
        self.dirty: set[str] = set()
        self.drain_handle: asyncio.TimerHandle | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.tail_dirty = False
        self.tail_seq = 0
        # What runs instances sandboxed, or why nothing can (then no instance starts): ``NAP_SANDBOX=off``
        # alone runs them unisolated.
        self.isolation: Isolation | None = None
        self.unavailable = ""
        if settings.sandbox:
            self.isolation, self.unavailable = prepare(settings.namespace, str(settings.home), self.dir)
            for d in (self.dir, settings.home / "services"):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o700)  # the platform's alone
            if self.unavailable:
                log.error("cannot sandbox instances, so none will start: %s", self.unavailable)
        else:
            log.warning(
                "NAP_SANDBOX=off: instances run as the agent's own user, unsandboxed and without cgroup "
                "limits; tenants are NOT isolated from each other or from the platform (development only)"
            )

    # -- lifecycle --------------------------------------------------------------------------

    def supervise(self) -> None:
        """Supervise: child exits, output, and what a previous agent left (adopted or restarted)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # a pidfd per adopted process
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        # A thousand children exiting at once overflow the loop's wakeup socket; that is harmless (one
        # wakeup reaps them all), so don't print a warning for each.
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        if self.inotify:
            self.loop.add_reader(self.inotify.fd, self._on_inotify)
        self._recover()
        self.sweeper = asyncio.create_task(self._sweep_forever())
        self.pool.refill()

    def close(self) -> None:
        """Stop supervising; the instances keep running, and a new agent adopts them."""
        if self.sweeper:
            self.sweeper.cancel()
        for inst in self.instances.values():
            if inst.restart_timer:
                inst.restart_timer.cancel()
            if inst.pidfd is not None:
                self.loop.remove_reader(inst.pidfd)
                os.close(inst.pidfd)
            self._drain(inst)
        self.end_follows()
        self._save_tail()
        self.pool.close()
        if self.inotify:
            self.loop.remove_reader(self.inotify.fd)
            self.inotify.close()
        self.loop.remove_signal_handler(signal.SIGCHLD)
        os.close(self.devnull)

    # -- paths and persistence --------------------------------------------------------------

    def _paths(self, name: str) -> dict[str, str]:
        return {
            "unit": f"{self.units_dir}/{name}.service",
            "state": f"{self.state_dir}/{name}.json",
            "out": f"{self.output_dir}/{name}.out",
            "err": f"{self.output_dir}/{name}.err",
            "journal": f"{self.journal_dir}/{name}.log",
            "journal1": f"{self.journal_dir}/{name}.log.1",
        }

    def _save(self, inst: Instance) -> None:
        write_record(inst.paths["state"], inst.record.to_json())

    def _save_tail(self) -> None:
        """Write the read offsets and journal sizes, alternating between two files: one of them is
        always whole (a write cut short by SIGKILL fails its checksum and the other one is used)."""
        if not self.tail_dirty:
            return
        self.tail_seq += 1
        tails = json.dumps({i.name: [i.out_off, i.err_off, i.jsize] for i in self.instances.values()})
        data = json.dumps({"seq": self.tail_seq, "crc": zlib.crc32(tails.encode()), "tails": tails})
        write_record(f"{self.dir}/tail.{self.tail_seq % 2}.json", data.encode())
        self.tail_dirty = False

    def _load_tail(self) -> dict:
        best: dict = {}
        for i in (0, 1):
            try:
                data = read_record(f"{self.dir}/tail.{i}.json")
                tails = data["tails"]
                if zlib.crc32(tails.encode()) != data["crc"] or data["seq"] <= best.get("seq", -1):
                    continue
                best = {"seq": data["seq"], "tails": json.loads(tails)}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        self.tail_seq = best.get("seq", 0)
        return best.get("tails", {})

    def _recover(self) -> None:
        """Load what a previous agent left: adopt live processes, restart the dead that should run."""
        tail = self._load_tail()
        for path in sorted(self.units_dir.glob("*.service")):
            name = path.name[: -len(".service")]
            paths = self._paths(name)
            try:
                text = path.read_text()
                unit = units.parse(text, name)
            except (OSError, ValueError) as e:
                log.error("skipping unit %s: %s", path, e)
                continue
            try:
                record = Record.from_json(read_record(paths["state"]))
            except (FileNotFoundError, ValueError, TypeError):
                record = Record()  # installed, never spawned: it should run
            inst = Instance(name, text, unit, record, paths)
            self._place(inst)
            self.instances[name] = inst
            out_off, err_off, jsize = tail.get(name, (0, 0, None))
            inst.out_off, inst.err_off = out_off, err_off
            inst.output_pid = record.pid
            inst.jsize = self._trim_journal(paths["journal"], jsize)
            self.tail_dirty = True
            self._recover_one(inst)
        self._save_tail()

    @staticmethod
    def _trim_journal(path: str, saved: int | None) -> int:
        """Drop the output lines journaled after the offsets were last saved (they'll be read again
        from the raw files, and would be there twice); keep the agent's events. The journal's size."""
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            return 0
        if saved is None or actual <= saved:
            return actual
        with open(path, "r+b") as f:
            f.seek(saved)
            events = [line for line in f.read().splitlines(keepends=True) if line.split(b" ", 2)[1:2] == [b"nap:"]]
            f.seek(saved)
            f.truncate()
            f.write(b"".join(events))
            return f.tell()

    def _recover_one(self, inst: Instance) -> None:
        record = inst.record
        if record.pid and is_alive(record.pid, record.starttime):
            self._drain(inst, unwatched=True)  # what it wrote while no agent watched, before the adoption's event
            self._adopt(inst)
            if record.desired == STOPPED:  # the previous agent died while stopping it
                inst.stop_task = asyncio.create_task(self._stop(inst))
            return
        if record.pid:
            # It died while no agent watched: its exit code is gone with it.
            self._drain(inst, final=True, unwatched=True)
            record.pid = record.starttime = None
            if record.desired == STOPPED:
                self._set(inst, STOPPED, "stopped")
                self._event(inst, "stopped")
            else:
                self._after_exit(inst, exit_of(None, None, while_away=True))
            self._save(inst)
        elif record.desired == RUNNING and record.state in (STARTING, RUNNING):
            if record.failures:
                record.restarts += 1  # it was waiting for a restart
                metrics.RESTARTS.labels("local").inc()
            self._spawn(inst)

    def _place(self, inst: Instance) -> None:
        """The instance's control group, where it runs sandboxed (its unit says whose it is)."""
        if self.isolation is not None and inst.unit.user is not None:
            inst.group = self.isolation.hierarchy.group(inst.name)
            if inst.group.exists:
                inst.oom_seen = inst.group.oom_kills()

    def _check_runnable(self, unit: units.Unit) -> None:
        """Refuse what can't run as the settings say: anything while the sandbox is unavailable, and a
        unit without its tenant's ``User=`` while it is on."""
        if not self.settings.sandbox:
            return
        if self.isolation is None:
            raise EngineError(
                f"the nap agent cannot sandbox instances here: {self.unavailable}. Fix that, or set "
                "NAP_SANDBOX=off to run instances unisolated (development only: tenants are not isolated)"
            )
        if unit.user is None or unit.group is None:
            raise BadRequest(f"{unit.name}: the unit has no User= and Group= (the tenant it runs as)")

    def _adopt(self, inst: Instance) -> None:
        pid = inst.record.pid
        assert pid is not None  # adopted because it is alive
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            inst.polled = True
        else:
            if not is_alive(pid, inst.record.starttime):  # it went between the check and the open
                os.close(fd)
                inst.polled = True
            else:
                inst.pidfd = fd
                self.loop.add_reader(fd, self._on_pidfd, inst)
        self._event(inst, f"adopted pid {pid} (still running after an agent restart)")
        self._watch_health(inst)

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, inst: Instance) -> None:
        """Start the unit's process now: stdout/stderr to files, in a new session, with its limits."""
        unit, record = inst.unit, inst.record
        paths = inst.paths
        self._drain(inst, final=True)  # the previous process's last words
        env = {**self.base_env, **unit.env}
        argv = units.expand(unit.argv, env)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        out = os.open(paths["out"], flags, 0o640)
        err = os.open(paths["err"], flags, 0o640)
        inst.out_off = inst.err_off = 0
        self.tail_dirty = True
        group = inst.group
        block: tuple[int, ...] | None = None  # the pipe's two ends, the seccomp filter's fd
        if self.settings.sandbox and group is None:  # a restart or a recovery, now that it can't be sandboxed
            record.started_at = time.time()
            why = self.unavailable or "its unit has no User="
            self._after_exit(inst, exit_of(EXIT_EXEC, None, spawn_error=f"failed to start: cannot sandbox it: {why}"))
            self._save(inst)
            return
        try:
            if group is not None:
                assert self.isolation is not None and unit.user is not None and unit.group is not None
                group.create(Limits(unit.memory_max, unit.tasks_max))
                inst.oom_seen = 0
                if not group.fresh:
                    self._empty(group)  # a left-over of an earlier run (say, from before an agent crash)
                    inst.oom_seen = group.oom_kills()
                # The sandbox waits on this pipe until the agent has put it into the group, then reads its
                # seccomp filter from the other descriptor.
                block = os.pipe()
                block = (*block, self.isolation.filter_fd())
                box = self.isolation.sandbox(unit.user, unit.group, unit.workdir)
                argv = box.argv(argv, block_fd=block[0], seccomp_fd=block[2])
            # vfork-fast: no preexec_fn; close_fds isn't needed (Python opens every fd close-on-exec)
            popen = subprocess.Popen(
                argv,
                cwd=unit.workdir,
                env=env,
                stdin=self.devnull,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=block is not None,  # True only to pass the pipe (pass_fds implies it)
                pass_fds=(block[0], block[2]) if block else (),
            )
            if group is not None and block is not None:
                try:
                    group.join_tree(popen.pid)
                except CgroupError:
                    os.kill(popen.pid, signal.SIGKILL)  # still blocked: nothing of the tenant's ran
                    raise
                os.write(block[1], b"1")
        except (OSError, ValueError) as e:
            if isinstance(e, CgroupError):
                code, error = EXIT_EXEC, f"failed to start: cannot apply its limits: {e.strerror or e}"
            elif isinstance(e, OSError):
                code = EXIT_CHDIR if e.filename == unit.workdir else EXIT_EXEC
                error = f"failed to start: {e.strerror or e}: {e.filename or argv[0]}"
            else:
                code, error = EXIT_EXEC, f"failed to start: {e}"
            record.started_at = time.time()
            self._after_exit(inst, exit_of(code, None, spawn_error=error))
            self._save(inst)
            return
        finally:
            os.close(out)
            os.close(err)
            for fd in block or ():
                os.close(fd)
        pid = popen.pid
        if unit.memory_max and group is None:
            try:
                resource.prlimit(pid, resource.RLIMIT_AS, (unit.memory_max, unit.memory_max))
            except (ProcessLookupError, PermissionError, ValueError) as e:
                log.warning("%s: could not limit memory of pid %s: %s", inst.name, pid, e)
        st = proc_stat(pid)
        inst.popen = popen
        self.children[pid] = inst
        record.pid, record.starttime = pid, (st[1] if st else None)
        record.started_at = time.time()
        inst.output_pid = pid
        inst.unhealthy = ""
        waits = bool(unit.min_healthy or unit.check)
        self._set(inst, STARTING if waits else RUNNING, "waiting to be healthy" if waits else "")
        self._event(inst, f"started pid {pid}")
        self._save(inst)
        self._watch_health(inst)

    # -- health (engines.health) ----------------------------------------------------------------

    def _watch_health(self, inst: Instance) -> None:
        """Judge the current process's health: by the sweep while it only has to stay up, by a probe
        loop of its own when its unit has a check."""
        record = inst.record
        inst.health = health.Health(started_at=record.started_at or time.time(), passed=record.state == RUNNING)
        if inst.unit.check and inst.unit.env.get("PORT", "").isdigit():
            asyncio.create_task(self._probe_forever(inst, record.pid))
        elif record.state == STARTING:  # healthy once up min_healthy: judged then (the sweep too)
            h = inst.health
            wait = max(0.0, h.started_at + inst.unit.min_healthy - time.time())
            self.loop.call_later(wait + 0.01, self._judge_later, inst, h)

    def _judge_later(self, inst: Instance, h: health.Health) -> None:
        if inst.health is h and self.instances.get(inst.name) is inst and inst.record.state == STARTING:
            self._judge(inst, health.Check.of(inst.unit))

    def _judge(self, inst: Instance, check: health.Check, what: str = "") -> None:
        if inst.health is None or not inst.alive or inst.stop_task is not None or inst.unhealthy:
            return
        verdict = health.judge(check, inst.health, time.time())
        if verdict == "running" and inst.record.state == STARTING:
            self._set(inst, RUNNING, "")
            self._event(inst, "healthy" + (f": {what}" if what else f": up {check.min_healthy:g}s"))
            self._save(inst)
        elif verdict == "restart":
            inst.unhealthy = f"its check failed {inst.health.failures} times in a row ({what})"
            self._event(inst, f"{inst.unhealthy}: ending it (SIGTERM)")
            inst.stop_task = asyncio.create_task(self._end_unhealthy(inst))

    async def _end_unhealthy(self, inst: Instance) -> None:
        try:
            self._signal(inst, signal.SIGTERM)
            if not await self._wait_exit(inst, inst.unit.stop_timeout):
                self._signal(inst, signal.SIGKILL)
                await self._wait_exit(inst, 5.0)
        finally:
            inst.stop_task = None

    async def _probe_forever(self, inst: Instance, pid: int | None) -> None:
        check = health.Check.of(inst.unit)
        port = int(inst.unit.env["PORT"])
        while inst.record.pid == pid and self.instances.get(inst.name) is inst and inst.health is not None:
            h = inst.health
            ok, what = await health.probe(check, self.settings.host, port)
            if inst.record.pid != pid or inst.health is not h:
                return
            health.record(h, ok)
            if not ok and inst.record.state == RUNNING:
                self._event(inst, f"check failed ({what}): {h.failures} of {health.FAIL_LIMIT} in a row")
            self._judge(inst, check, what)
            starting = inst.record.state == STARTING
            await asyncio.sleep(min(check.interval, 1.0) if starting else check.interval)

    def _exited_child(self) -> os.waitid_result | None:
        """An exited child of ours, not yet reaped (other code in this process may have children too)."""
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            info = os.waitid(os.P_ALL, 0, flags)
        except ChildProcessError:
            return None
        if info is None or info.si_pid in self.children:
            return info
        for pid in list(self.children):  # someone else's child is first in line: look for ours
            try:
                info = os.waitid(os.P_PID, pid, flags)
            except ChildProcessError:
                continue
            if info is not None:
                return info
        return None

    def _reap(self) -> None:
        """SIGCHLD: collect our exited children. Each one's process group is killed first, while the
        zombie still holds the group's id (so it can't have been reused): no leftovers, no wrong target."""
        while True:
            info = self._exited_child()
            if info is None:
                break
            pid = info.si_pid
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            inst = self.children.pop(pid, None)
            if info.si_code == os.CLD_EXITED:
                code, signo = info.si_status, None
            else:
                code, signo = 128 + info.si_status, info.si_status
            if inst is None or inst.record.pid != pid:
                continue
            if inst.popen is not None:
                inst.popen.returncode = code if signo is None else -signo  # reaped: Popen must not wait
                inst.popen = None
            self._exited(inst, code, signo)
        self._save_tail()

    def _on_pidfd(self, inst: Instance) -> None:
        if inst.pidfd is not None:
            self.loop.remove_reader(inst.pidfd)
            os.close(inst.pidfd)
            inst.pidfd = None
        self._exited(inst, None, None)
        self._save_tail()

    @staticmethod
    def _empty(group: Group) -> None:
        """Nothing of an instance outlives its main process (a pid namespace mostly sees to that)."""
        try:
            if group.pids() and not group.kill(timeout=2.0):
                log.error("%s: processes %s survived SIGKILL", group.name, group.pids())
        except OSError as e:
            log.error("%s: cannot empty its group: %s", group.name, e)

    def _oom_kills(self, inst: Instance) -> int:
        """The kernel's OOM kills in the instance's group since its current process started."""
        if inst.group is None:
            return 0
        try:
            return inst.group.oom_kills() - inst.oom_seen
        except OSError:
            return 0

    def _exited(self, inst: Instance, code: int | None, signo: int | None) -> None:
        """The instance's main process is gone (``code`` None: unknown, it was not our child)."""
        record = inst.record
        self._drain(inst, final=True)
        record.pid = record.starttime = None
        inst.polled = False
        if inst.group is not None:
            self._empty(inst.group)
        if record.desired == STOPPED:
            record.exit_code = code
            self._set(inst, STOPPED, "stopped")
            self._event(inst, f"{describe_exit(code, signo)}: stopped")
        else:
            exit = exit_of(code, signo)
            if inst.unhealthy:  # ended by the agent for failing its check: a failure, whatever its code
                exit = Exit(exit.code, False, f"{exit.what}: ended because {inst.unhealthy}")
            if self._oom_kills(inst):
                what = f"killed for memory: over its MemoryMax={inst.unit.memory_max} ({exit.what})"
                exit = Exit(exit.code, False, what, oom=True)
            self._after_exit(inst, exit)
        self._save(inst)
        waiters, inst.exit_waiters = inst.exit_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(code)
        self._notify_end(inst)

    def _after_exit(self, inst: Instance, exit: Exit) -> None:
        """Apply the unit's restart policy (``engines.restarts``) to an exit."""
        record = inst.record
        record.exit_code = exit.code
        decision = decide(inst.unit, exit, record.started_at, record.failures, time.time())
        record.failures = decision.failures
        self._set(inst, decision.state, decision.message)
        self._event(inst, decision.message)
        if decision.delay is not None:
            inst.restart_timer = self.loop.call_later(decision.delay, self._restart, inst)
        self._notify_end(inst)

    def _restart(self, inst: Instance) -> None:
        inst.restart_timer = None
        if inst.record.desired != RUNNING or inst.alive or self.instances.get(inst.name) is not inst:
            return
        inst.record.restarts += 1
        metrics.RESTARTS.labels("local").inc()
        self._spawn(inst)
        self._save_tail()

    def _signal(self, inst: Instance, sig: int) -> None:
        """Signal the instance: every process of its group (a ``setsid`` child too) but the sandbox's
        own, which passes on how the program ended; unsandboxed, its process group. Only while its main
        process is still the one we started."""
        pid = inst.record.pid
        if pid is None or (inst.popen is None and not is_alive(pid, inst.record.starttime)):
            return
        if inst.group is not None:
            if sig == signal.SIGKILL:
                self._empty(inst.group)
                return
            for other in inst.group.pids():
                if other != pid:
                    try:
                        os.kill(other, sig)
                    except ProcessLookupError:
                        pass
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

    async def _wait_exit(self, inst: Instance, timeout: float) -> bool:
        if not inst.alive:
            return True
        fut = self.loop.create_future()
        inst.exit_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return not inst.alive

    async def _stop(self, inst: Instance) -> None:
        record = inst.record
        timeout = inst.unit.stop_timeout
        self._event(inst, "stopping: SIGTERM")
        self._signal(inst, signal.SIGTERM)
        if not await self._wait_exit(inst, timeout):
            self._event(inst, f"still running {timeout:g}s after SIGTERM: SIGKILL")
            self._signal(inst, signal.SIGKILL)
            if not await self._wait_exit(inst, 30.0):
                self._set(inst, STOPPED, f"pid {record.pid} did not die after SIGKILL")
                self._save(inst)

    # -- output and journal -------------------------------------------------------------------

    def _event(self, inst: Instance, text: str) -> None:
        self._append(inst, [event_line(text)])

    def _append(self, inst: Instance, lines: list[str]) -> None:
        data = "".join(lines).encode()
        paths = inst.paths
        if inst.jsize + len(data) > JOURNAL_MAX and inst.jsize:
            os.replace(paths["journal"], paths["journal1"])
            self.pool.place(paths["journal"])
            inst.jsize = 0
        with open(paths["journal"], "ab") as f:
            f.write(data)
        inst.jsize += len(data)
        self.tail_dirty = True
        for q in inst.followers:
            q.put_nowait(lines)

    def _drain(self, inst: Instance, final: bool = False, unwatched: bool = False) -> None:
        """Journal what the instance wrote since the last look (``final``: its partial last line too).
        ``unwatched``: written while no agent watched (a recovery's first look), so its lines' time is
        not known: they get the file's last modification time, the latest they can have been written,
        and say so."""
        paths = inst.paths
        now = timestamp(time.time())
        for stream, key in (("stdout", "out"), ("stderr", "err")):
            off = inst.out_off if key == "out" else inst.err_off
            try:
                st = os.stat(paths[key])
            except FileNotFoundError:
                continue
            size = st.st_size
            when = f"{timestamp(min(st.st_mtime, time.time()))} " if unwatched else f"{now} "
            mark = UNWATCHED if unwatched else ""
            if size < off:
                off = 0  # truncated under us
            start = off
            while size > off:
                with open(paths[key], "rb") as f:
                    f.seek(off)
                    data = f.read(min(size - off, READ_CHUNK))
                if not data:
                    break
                end = data.rfind(b"\n")
                if end >= 0 and not (final and len(data) == size - off):
                    data = data[: end + 1]
                elif end < 0 and not final and len(data) < LINE_MAX:
                    break  # a partial line: wait for the rest
                off += len(data)
                prefix = f"{when}{stream}[{inst.output_pid}]{mark}: "
                lines = []
                for raw in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
                    for i in range(0, max(len(raw), 1), LINE_MAX):
                        lines.append(prefix + raw[i : i + LINE_MAX].decode("utf-8", "replace") + "\n")
                self._append(inst, lines)
            if key == "out":
                inst.out_off = off
            else:
                inst.err_off = off
            self.tail_dirty = True
            if off // PUNCH_MIN > start // PUNCH_MIN:
                punch_hole(paths[key], off - off % 4096)  # journaled: give the disk space back

    def _on_inotify(self) -> None:
        assert self.inotify is not None  # the reader is added only with a watch
        names = self.inotify.read()
        if names is None:
            self.dirty.update(self.instances)
        else:
            self.dirty.update(n.rsplit(".", 1)[0] for n in names)
        if self.dirty and self.drain_handle is None:
            self.drain_handle = self.loop.call_later(DRAIN_DELAY, self._drain_dirty)

    def _drain_dirty(self) -> None:
        self.drain_handle = None
        dirty, self.dirty = self.dirty, set()
        for name in dirty:
            inst = self.instances.get(name)
            if inst is not None:
                self._drain(inst)
        self._save_tail()

    async def _sweep_forever(self) -> None:
        """A periodic look at all output (inotify may be missing) and at adopted processes without pidfd."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL if self.inotify else SWEEP_INTERVAL / 5)
            try:
                for inst in list(self.instances.values()):
                    if inst.polled and not is_alive(inst.record.pid, inst.record.starttime):
                        self._exited(inst, None, None)
                    elif inst.alive:
                        self._drain(inst)
                        if inst.record.state == STARTING and not inst.unit.check:
                            self._judge(inst, health.Check.of(inst.unit))
                        if inst.unit.memory_max and inst.stop_task is None and self._oom_kills(inst):
                            # systemd's OOMPolicy=stop: the instance goes whole (and restarts by its policy)
                            self._event(inst, f"a process was killed for memory (MemoryMax={inst.unit.memory_max})")
                            self._signal(inst, signal.SIGKILL)
                self._save_tail()
                metrics.set_instances("local", (i.record.state for i in self.instances.values()))
            except Exception:  # keep supervising whatever one instance did
                log.exception("sweep failed")

    def end_follows(self) -> None:
        for inst in self.instances.values():
            for q in inst.followers:
                q.put_nowait(None)
            inst.followers.clear()

    def _notify_end(self, inst: Instance) -> None:
        if inst.finished:
            for q in inst.followers:
                q.put_nowait(None)

    # -- state --------------------------------------------------------------------------------

    def _set(self, inst: Instance, state: str, message: str) -> None:
        inst.record.state = state
        inst.record.message = message
        inst.record.since = time.time()

    def status(self, inst: Instance) -> dict:
        record = inst.record
        return InstanceStatus(
            name=inst.name,
            state=record.state,
            host=self.settings.host,
            pid=record.pid,
            exit_code=record.exit_code,
            restarts=record.restarts,
            since=record.since,
            message=record.message,
            extra={"desired": record.desired},
        ).to_json()

    def get(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            raise NotFound(f"no instance {name!r}")
        return inst

    # -- operations (the API's) ---------------------------------------------------------------

    async def submit(self, specs: list[dict]) -> list[dict]:
        """Install and start a batch of units; all are checked before any is touched."""
        batch: list[tuple[str, str, units.Unit]] = []
        seen = set()
        pace = Pacer()
        for spec in specs:
            await pace.tick()
            if not isinstance(spec, dict):
                raise BadRequest("each unit must be an object {name, text}")
            name, text = spec.get("name"), spec.get("text")
            if not is_unit_name(name):
                raise BadRequest(f"{name!r} is not an instance name")
            if name in seen:
                raise BadRequest(f"{name!r} is in the batch twice")
            seen.add(name)
            if not isinstance(text, str):
                raise BadRequest(f"{name}: the unit text must be a string")
            try:
                unit = units.parse(text, name)
            except ValueError as e:
                raise BadRequest(f"{name}: {e}") from None
            self._check_runnable(unit)
            batch.append((name, text, unit))
        todo: list[Instance] = []
        for name, text, unit in batch:
            await pace.tick()
            old = self.instances.get(name)
            if old is not None and old.text == text and old.record.desired == RUNNING and not old.finished:
                continue  # already installed and running (a retried job): leave it be
            paths = self._paths(name)
            if old is not None:
                await self._halt(old)
            for key in ("unit", "state", "out", "err", "journal"):
                self.pool.place(paths[key])
            inst = Instance(name, text, unit, Record(), paths)
            self._place(inst)
            self._save(inst)  # first: a crash from here on can't revive an old record's process
            write_record(paths["unit"], text.encode())
            if old is not None:  # the journal goes on; the old output is already in it
                inst.out_off, inst.err_off, inst.jsize = old.out_off, old.err_off, old.jsize
                inst.output_pid, inst.followers = old.output_pid, old.followers
            self.instances[name] = inst
            self.tail_dirty = True
            todo.append(inst)
        for inst in todo:
            if self.instances.get(inst.name) is inst and not inst.alive:
                self._spawn(inst)
            await pace.tick()
        self._save_tail()
        self.pool.refill()
        return [self.status(self.instances[name]) for name, _, _ in batch if name in self.instances]

    async def _halt(self, inst: Instance) -> None:
        """Stop whatever runs for the instance and cancel its pending restart."""
        if inst.stop_task is not None:
            await asyncio.shield(inst.stop_task)
        inst.record.desired = STOPPED
        if inst.restart_timer is not None:
            inst.restart_timer.cancel()
            inst.restart_timer = None
        if inst.alive:
            inst.stop_task = asyncio.create_task(self._stop(inst))
            try:
                await asyncio.shield(inst.stop_task)
            finally:
                inst.stop_task = None

    async def stop(self, name: str) -> dict:
        inst = self.get(name)
        await self._halt(inst)
        if inst.record.state != STOPPED:  # nothing ran (it had exited, failed, or waited to restart)
            self._set(inst, STOPPED, "stopped")
            self._event(inst, "stopped")
        self._save(inst)
        self._save_tail()
        self._notify_end(inst)
        return self.status(inst)

    async def start(self, name: str) -> dict:
        inst = self.get(name)
        self._check_runnable(inst.unit)
        if inst.stop_task is not None:
            await asyncio.shield(inst.stop_task)
        record = inst.record
        record.desired = RUNNING
        if inst.restart_timer is not None:
            inst.restart_timer.cancel()
            inst.restart_timer = None
        if not inst.alive:
            record.restarts = record.failures = 0
            self._spawn(inst)
            self._save_tail()
        else:
            self._save(inst)
        return self.status(inst)

    async def remove(self, names: list[str]) -> list[str]:
        found = [self.instances[n] for n in dict.fromkeys(names) if n in self.instances]
        await asyncio.gather(*(self._halt(inst) for inst in found))
        for inst in found:
            if self.instances.get(inst.name) is not inst:
                continue
            del self.instances[inst.name]
            if inst.group is not None:
                try:
                    inst.group.remove()
                except OSError as e:
                    log.error("%s: cannot remove its group: %s", inst.name, e)
            for q in inst.followers:
                q.put_nowait(None)
            for path in inst.paths.values():
                self.pool.recycle(path)
        self.tail_dirty = True
        self._save_tail()
        return [inst.name for inst in found]

    def journal(self, name: str, lines: int) -> tuple[list[str], Instance]:
        inst = self.get(name)
        self._drain(inst)
        paths = inst.paths
        got = last_lines(paths["journal"], lines)
        if len(got) < lines:
            got = last_lines(paths["journal1"], lines - len(got)) + got
        return [line.decode("utf-8", "replace") + "\n" for line in got], inst
