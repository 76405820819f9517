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
    spare/                 empty files made ahead of time (see ``FilePool``)

Files are written in place, not fsynced, and not replaced by renames: creating inodes is what costs
(see ``FilePool``), and the state must survive the agent, not the host (the instances don't either).

A restarted agent (also after SIGKILL) adopts the processes that are still alive (same pid and start
time), learns of their exit through a pidfd, and starts again those that died while it was away.

Journal lines: ``2025-11-26T04:12:33.123Z stdout[4242]: text`` (``stderr[...]`` for stderr, and
``nap: ...`` for the agent's own events). Lines read late (the agent was down) carry the catch-up time.

HTTP API (JSON unless noted; errors are ``{"error", "message"}`` with the status of ``errors.py``):

- ``GET /health``: ``{"agent": "nap", "pid", "instances"}``
- ``POST /units`` ``{"units": [{"name", "text"}, ...]}``: install and start all (all or none are
  accepted); answers once all are spawned: ``{"units": [status, ...]}``
- ``GET /units?prefix=``: ``{"units": [status, ...]}``
- ``POST /status`` ``{"names": [...]}``: ``{"units": {name: status}}`` (unknown names left out)
- ``POST /units/{name}/stop``, ``POST /units/{name}/start``: the status after it
- ``DELETE /units`` ``{"names": [...]}``: stop, forget, drop their files: ``{"removed": [...]}``
- ``GET /units/{name}/unit``: the unit text (text/plain)
- ``GET /units/{name}/journal?lines=N&follow=1``: the last N lines (text/plain, chunked); with follow,
  then new lines live, until the instance is stopped, exited or failed for good
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

from aiohttp import web

from . import units
from .config import Settings
from .engines.base import EXITED, FAILED, RUNNING, STARTING, STOPPED, InstanceStatus
from .errors import BadRequest, Conflict, NapError, NotFound

log = logging.getLogger("nap.agent")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,200}")
# Exit by one of these signals is a clean exit, as for systemd's Restart=on-failure.
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
EXIT_CHDIR, EXIT_EXEC = 200, 203  # systemd's codes for "could not chdir" and "could not exec"
LINE_MAX = 16 * 1024  # longer output lines are split into journal lines of this many bytes
JOURNAL_MAX = 8 * 1024 * 1024  # a journal this long moves to <name>.log.1 (one generation kept)
READ_CHUNK = 1024 * 1024
DRAIN_DELAY = 0.05  # batch the drains that file writes trigger
SWEEP_INTERVAL = 1.0  # also look at every running instance's output this often, and poll liveness
SPAWN_YIELD = 64  # let other requests in every this many spawns
FOLLOW_HEARTBEAT = 5.0
SPARE_FILES = 5 * 1024  # five files an instance: a batch of 1000 finds them ready
PUNCH_MIN = 1024 * 1024  # free the journaled part of a raw output file in steps of at least this


@dataclass
class Record:
    """What the agent keeps about an instance across its own restarts (``state/<name>.json``)."""

    desired: str = RUNNING  # running | stopped
    state: str = STARTING
    pid: int | None = None
    starttime: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart
    started_at: float | None = None  # wall time the current or last process started
    restarts: int = 0  # automatic restarts since the last start by a user
    failures: int = 0  # restarts in a row: the backoff step and the limit's count
    exit_code: int | None = None
    since: float = field(default_factory=time.time)
    message: str = ""

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()


class Instance:
    """One unit and its process, as the agent tracks it in memory."""

    def __init__(self, name: str, text: str, unit: units.Unit, record: Record, paths: dict[str, str]):
        self.name = name
        self.text = text
        self.unit = unit
        self.rec = record
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

    @property
    def alive(self) -> bool:
        return self.rec.pid is not None

    @property
    def finished(self) -> bool:
        """Stopped, exited or failed for good: nothing more will run until someone starts it."""
        return not self.alive and self.restart_timer is None and self.rec.state in (EXITED, FAILED, STOPPED)


# ---------------------------------------------------------------------------------------------
# small helpers


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[19])


def is_alive(pid: int | None, starttime: int | None) -> bool:
    if not pid:
        return False
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x") and (starttime is None or st[1] == starttime)


def write_record(path: str, data: bytes) -> None:
    """Overwrite a small JSON record in place with one write. If the agent dies before the truncation,
    ``read_record`` ignores the rest of the old, longer record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def read_record(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data, _ = json.JSONDecoder().raw_decode(f.read())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2


def punch_hole(path: str, length: int) -> bool:
    """Free the first ``length`` bytes of a file without moving its end (the writer appends on)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return _libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(length)) == 0
    finally:
        os.close(fd)


_ts_cache: tuple[int, str] = (-1, "")


def timestamp(t: float) -> str:
    global _ts_cache
    sec = int(t)
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_ts_cache[1]}.{int((t - sec) * 1000):03d}Z"


def describe_exit(code: int | None, signo: int | None) -> str:
    if signo is not None:
        try:
            return f"killed by signal {signal.Signals(signo).name}"
        except ValueError:
            return f"killed by signal {signo}"
    if code is None:
        return "exited (exit code unknown)"
    return f"exited with code {code}"


def last_lines(path: str, count: int) -> list[bytes]:
    """The last ``count`` lines of a file, reading from its end."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if pos > 0:
        lines = lines[1:]  # the first one may be cut
    return lines[-count:] if count else []


class Inotify:
    """Modify events for the files of one directory (inotify through ctypes); None where unsupported."""

    IN_MODIFY, IN_Q_OVERFLOW = 0x2, 0x4000
    HEADER = struct.Struct("iIII")

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def watch(cls, directory: str) -> "Inotify | None":
        try:
            fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if _libc.inotify_add_watch(fd, str(directory).encode(), cls.IN_MODIFY) < 0:
                os.close(fd)
                return None
            return cls(fd)
        except (OSError, AttributeError):
            return None

    def read(self) -> set[str] | None:
        """Names of the files written since the last read; None if events were lost."""
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, size = self.HEADER.unpack_from(data, pos)
                pos += self.HEADER.size
                if mask & self.IN_Q_OVERFLOW:
                    return None
                names.add(data[pos : pos + size].rstrip(b"\0").decode(errors="replace"))
                pos += size

    def close(self) -> None:
        os.close(self.fd)


class FilePool:
    """Empty files made ahead of time, renamed into place when an instance needs a file.

    Creating a file means allocating an inode, and ext4 skips the inodes freed in the last 30 s
    (``recently_deleted``): with thousands of those nearby (a test suite's temporary files, a removed
    batch) a create costs 0.2-0.7 ms here instead of 20 us, and five files for each of 1000 instances
    took seconds. A rename costs ~15 us. A background thread keeps the pool filled, and the files of
    removed instances are emptied and come back here instead of being deleted.
    """

    def __init__(self, directory: str, target: int):
        self.dir = directory
        self.target = target
        os.makedirs(directory, exist_ok=True)
        self.free = os.listdir(directory)
        self.count = 0
        self.prefix = f"{os.getpid()}-{time.time_ns()}-"
        self.filling: asyncio.Task | None = None
        self.executor = None

    def _new_name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def place(self, dest: str) -> None:
        """Make sure ``dest`` exists: a spare renamed to it, or a new file (an existing one is kept)."""
        if os.path.exists(dest):
            return
        while self.free:
            name = self.free.pop()
            try:
                os.rename(f"{self.dir}/{name}", dest)
                return
            except FileNotFoundError:
                continue
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))

    def recycle(self, path: str) -> None:
        """Take back an instance's file (emptied), or delete it when the pool is full."""
        try:
            if len(self.free) >= 2 * self.target:
                os.unlink(path)
                return
            os.truncate(path, 0)
            name = self._new_name()
            os.rename(path, f"{self.dir}/{name}")
            self.free.append(name)
        except FileNotFoundError:
            pass

    def refill(self) -> None:
        if self.filling is None and len(self.free) < self.target:
            self.filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="nap-spare", initializer=_lower_priority)
        loop = asyncio.get_running_loop()
        try:
            while len(self.free) < self.target:
                names = [self._new_name() for _ in range(min(256, self.target - len(self.free)))]
                await loop.run_in_executor(self.executor, _create_files, self.dir, names)
                self.free[:0] = names  # at the bottom: place() takes the recycled ones first
        except OSError as e:
            log.warning("could not make spare files in %s: %s", self.dir, e)
        finally:
            self.filling = None

    def close(self) -> None:
        if self.filling is not None:
            self.filling.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
    except OSError:
        pass


def _create_files(directory: str, names: list[str]) -> None:
    for name in names:
        os.close(os.open(f"{directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))


# ---------------------------------------------------------------------------------------------
# the supervisor


class Supervisor:
    """Runs instances from their units and keeps them by their restart policy."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = Path(settings.agent_dir)
        self.units_dir = self.dir / "units"
        self.state_dir = self.dir / "state"
        self.output_dir = self.dir / "output"
        self.journal_dir = self.dir / "journal"
        self.instances: dict[str, Instance] = {}
        self.children: dict[int, Instance] = {}
        self.base_env = {
            "PATH": os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME") or "/",
            "LANG": os.environ.get("LANG") or "C.UTF-8",
            "NAP_HOST": settings.host,
        }
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock_fd: int | None = None
        self.devnull: int | None = None
        self.inotify: Inotify | None = None
        self.dirty: set[str] = set()
        self.drain_handle: asyncio.TimerHandle | None = None
        self.sweeper: asyncio.Task | None = None
        self.tail_dirty = False
        self.tail_seq = 0
        self.pool: FilePool | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the agent directory's lock: one agent per directory (the kernel drops it if we die)."""
        for d in (self.units_dir, self.state_dir, self.output_dir, self.journal_dir):
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise Conflict(f"another nap agent (pid {other or '?'}) is running on {self.dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # a pidfd per adopted process
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        # A thousand children exiting at once overflow the loop's wakeup socket; that is harmless (one
        # wakeup reaps them all), so don't print a warning for each.
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        self.inotify = Inotify.watch(self.output_dir)
        if self.inotify:
            self.loop.add_reader(self.inotify.fd, self._on_inotify)
        self.pool = FilePool(f"{self.dir}/spare", SPARE_FILES)
        self._recover()
        self.sweeper = asyncio.create_task(self._sweep_forever())
        self.pool.refill()

    async def close(self) -> None:
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
        if self.devnull is not None:
            os.close(self.devnull)
        if self.lock_fd is not None:
            os.close(self.lock_fd)

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
        write_record(inst.paths["state"], inst.rec.to_json())

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
                rec = Record.from_json(read_record(paths["state"]))
            except (FileNotFoundError, ValueError, TypeError):
                rec = Record()  # installed, never spawned: it should run
            inst = Instance(name, text, unit, rec, paths)
            self.instances[name] = inst
            out_off, err_off, jsize = tail.get(name, (0, 0, None))
            inst.out_off, inst.err_off = out_off, err_off
            inst.output_pid = rec.pid
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
        rec = inst.rec
        if rec.pid and is_alive(rec.pid, rec.starttime):
            self._drain(inst)  # what it wrote while no agent watched, before the adoption's event
            self._adopt(inst)
            if rec.desired == STOPPED:  # the previous agent died while stopping it
                inst.stop_task = asyncio.create_task(self._stop(inst))
            return
        if rec.pid:
            # It died while no agent watched: its exit code is gone with it.
            self._drain(inst, final=True)
            rec.pid = rec.starttime = None
            if rec.desired == STOPPED:
                self._set(inst, STOPPED, "stopped")
                self._event(inst, "stopped")
            else:
                self._after_exit(inst, None, None, while_away=True)
            self._save(inst)
        elif rec.desired == RUNNING and rec.state in (STARTING, RUNNING):
            if rec.failures:
                rec.restarts += 1  # it was waiting for a restart
            self._spawn(inst)

    def _adopt(self, inst: Instance) -> None:
        pid = inst.rec.pid
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            inst.polled = True
        else:
            if not is_alive(pid, inst.rec.starttime):  # it went between the check and the open
                os.close(fd)
                inst.polled = True
            else:
                inst.pidfd = fd
                self.loop.add_reader(fd, self._on_pidfd, inst)
        self._event(inst, f"adopted pid {pid} (still running after an agent restart)")

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, inst: Instance) -> None:
        """Start the unit's process now: stdout/stderr to files, in a new session, with its limits."""
        unit, rec = inst.unit, inst.rec
        paths = inst.paths
        self._drain(inst, final=True)  # the previous process's last words
        env = {**self.base_env, **unit.env}
        argv = units.expand(unit.argv, env)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        out = os.open(paths["out"], flags, 0o640)
        err = os.open(paths["err"], flags, 0o640)
        inst.out_off = inst.err_off = 0
        self.tail_dirty = True
        try:
            # vfork-fast: no preexec_fn; close_fds isn't needed (Python opens every fd close-on-exec)
            popen = subprocess.Popen(
                argv, cwd=unit.workdir, env=env, stdin=self.devnull, stdout=out, stderr=err,
                start_new_session=True, close_fds=False,
            )
        except OSError as e:
            code = EXIT_CHDIR if e.filename == unit.workdir else EXIT_EXEC
            rec.started_at = time.time()
            error = f"failed to start: {e.strerror or e}: {e.filename or argv[0]}"
            self._after_exit(inst, code, None, spawn_error=error)
            self._save(inst)
            return
        finally:
            os.close(out)
            os.close(err)
        pid = popen.pid
        if unit.memory_max:
            try:
                resource.prlimit(pid, resource.RLIMIT_AS, (unit.memory_max, unit.memory_max))
            except (ProcessLookupError, PermissionError, ValueError) as e:
                log.warning("%s: could not limit memory of pid %s: %s", inst.name, pid, e)
        st = proc_stat(pid)
        inst.popen = popen
        self.children[pid] = inst
        rec.pid, rec.starttime = pid, (st[1] if st else None)
        rec.started_at = time.time()
        inst.output_pid = pid
        self._set(inst, RUNNING, "")
        self._event(inst, f"started pid {pid}")
        self._save(inst)

    def _exited_child(self) -> "os.waitid_result | None":
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
            if inst is None or inst.rec.pid != pid:
                continue
            inst.popen.returncode = code if signo is None else -signo  # reaped: Popen must not wait
            inst.popen = None
            self._exited(inst, code, signo)
        self._save_tail()

    def _on_pidfd(self, inst: Instance) -> None:
        self.loop.remove_reader(inst.pidfd)
        os.close(inst.pidfd)
        inst.pidfd = None
        self._exited(inst, None, None)
        self._save_tail()

    def _exited(self, inst: Instance, code: int | None, signo: int | None) -> None:
        """The instance's main process is gone (``code`` None: unknown, it was not our child)."""
        rec = inst.rec
        self._drain(inst, final=True)
        rec.pid = rec.starttime = None
        inst.polled = False
        if rec.desired == STOPPED:
            rec.exit_code = code
            self._set(inst, STOPPED, "stopped")
            self._event(inst, f"{describe_exit(code, signo)}: stopped")
        else:
            self._after_exit(inst, code, signo)
        self._save(inst)
        waiters, inst.exit_waiters = inst.exit_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(code)
        self._notify_end(inst)

    def _after_exit(self, inst: Instance, code: int | None, signo: int | None, *,
                    while_away: bool = False, spawn_error: str = "") -> None:
        """Apply the unit's restart policy to an exit (``code`` None: unknown, counted as a failure)."""
        unit, rec = inst.unit, inst.rec
        rec.exit_code = code
        what = spawn_error or describe_exit(code, signo)
        if while_away:
            what = "exited while the agent was down (exit code unknown)"
        clean = code is not None and not spawn_error and (
            (signo is None and code == 0) or (signo is not None and signo in CLEAN_SIGNALS))
        if rec.started_at is not None and time.time() - rec.started_at >= unit.restart_max_delay:
            rec.failures = 0  # it ran long enough to count as healthy: the backoff starts over
        restart = unit.restart == "always" or (unit.restart == "on-failure" and not clean)
        if not restart:
            self._set(inst, EXITED if clean else FAILED, what)
            self._event(inst, what)
        elif rec.failures >= unit.restart_limit:
            msg = f"{what}; gave up after {rec.failures} restarts in a row"
            self._set(inst, FAILED, msg)
            self._event(inst, msg)
        else:
            rec.failures += 1
            delay = unit.restart_delay(rec.failures)
            msg = f"{what}, restarting in {delay:g}s (restart {rec.failures} of {unit.restart_limit})"
            self._set(inst, STARTING, msg)
            self._event(inst, msg)
            inst.restart_timer = self.loop.call_later(delay, self._restart, inst)
        self._notify_end(inst)

    def _restart(self, inst: Instance) -> None:
        inst.restart_timer = None
        if inst.rec.desired != RUNNING or inst.alive or self.instances.get(inst.name) is not inst:
            return
        inst.rec.restarts += 1
        self._spawn(inst)
        self._save_tail()

    def _signal(self, inst: Instance, sig: int) -> None:
        """Signal the instance's process group, if its main process is still the one we started."""
        pid = inst.rec.pid
        if pid is None or (inst.popen is None and not is_alive(pid, inst.rec.starttime)):
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
        except asyncio.TimeoutError:
            return not inst.alive

    async def _stop(self, inst: Instance) -> None:
        rec = inst.rec
        timeout = inst.unit.stop_timeout
        self._event(inst, "stopping: SIGTERM")
        self._signal(inst, signal.SIGTERM)
        if not await self._wait_exit(inst, timeout):
            self._event(inst, f"still running {timeout:g}s after SIGTERM: SIGKILL")
            self._signal(inst, signal.SIGKILL)
            if not await self._wait_exit(inst, 30.0):
                self._set(inst, STOPPED, f"pid {rec.pid} did not die after SIGKILL")
                self._save(inst)

    # -- output and journal -------------------------------------------------------------------

    def _event(self, inst: Instance, text: str) -> None:
        self._append(inst, [f"{timestamp(time.time())} nap: {text}\n"])

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

    def _drain(self, inst: Instance, final: bool = False) -> None:
        """Journal what the instance wrote since the last look (``final``: its partial last line too)."""
        paths = inst.paths
        now = timestamp(time.time())
        for stream, key in (("stdout", "out"), ("stderr", "err")):
            off = inst.out_off if key == "out" else inst.err_off
            try:
                size = os.stat(paths[key]).st_size
            except FileNotFoundError:
                continue
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
                prefix = f"{now} {stream}[{inst.output_pid}]: "
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
                    if inst.polled and not is_alive(inst.rec.pid, inst.rec.starttime):
                        self._exited(inst, None, None)
                    elif inst.alive:
                        self._drain(inst)
                self._save_tail()
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
        inst.rec.state = state
        inst.rec.message = message
        inst.rec.since = time.time()

    def status(self, inst: Instance) -> dict:
        rec = inst.rec
        return InstanceStatus(
            name=inst.name, state=rec.state, host=self.settings.host, pid=rec.pid, exit_code=rec.exit_code,
            restarts=rec.restarts, since=rec.since, message=rec.message, extra={"desired": rec.desired},
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
        for spec in specs:
            if not isinstance(spec, dict):
                raise BadRequest("each unit must be an object {name, text}")
            name, text = spec.get("name"), spec.get("text")
            if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
                raise BadRequest(f"{name!r} is not an instance name")
            if name in seen:
                raise BadRequest(f"{name!r} is in the batch twice")
            seen.add(name)
            if not isinstance(text, str):
                raise BadRequest(f"{name}: the unit text must be a string")
            try:
                batch.append((name, text, units.parse(text, name)))
            except ValueError as e:
                raise BadRequest(f"{name}: {e}") from None
        todo: list[Instance] = []
        for name, text, unit in batch:
            old = self.instances.get(name)
            if old is not None and old.text == text and old.rec.desired == RUNNING and not old.finished:
                continue  # already installed and running (a retried job): leave it be
            paths = self._paths(name)
            if old is not None:
                await self._halt(old)
            for key in ("unit", "state", "out", "err", "journal"):
                self.pool.place(paths[key])
            inst = Instance(name, text, unit, Record(), paths)
            self._save(inst)  # first: a crash from here on can't revive an old record's process
            write_record(paths["unit"], text.encode())
            if old is not None:  # the journal goes on; the old output is already in it
                inst.out_off, inst.err_off, inst.jsize = old.out_off, old.err_off, old.jsize
                inst.output_pid, inst.followers = old.output_pid, old.followers
            self.instances[name] = inst
            self.tail_dirty = True
            todo.append(inst)
        for i, inst in enumerate(todo):
            if self.instances.get(inst.name) is inst and not inst.alive:
                self._spawn(inst)
            if i % SPAWN_YIELD == SPAWN_YIELD - 1:
                await asyncio.sleep(0)
        self._save_tail()
        self.pool.refill()
        return [self.status(self.instances[name]) for name, _, _ in batch if name in self.instances]

    async def _halt(self, inst: Instance) -> None:
        """Stop whatever runs for the instance and cancel its pending restart."""
        if inst.stop_task is not None:
            await asyncio.shield(inst.stop_task)
        inst.rec.desired = STOPPED
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
        if inst.rec.state != STOPPED:  # nothing ran (it had exited, failed, or waited to restart)
            self._set(inst, STOPPED, "stopped")
            self._event(inst, "stopped")
        self._save(inst)
        self._save_tail()
        self._notify_end(inst)
        return self.status(inst)

    async def start(self, name: str) -> dict:
        inst = self.get(name)
        if inst.stop_task is not None:
            await asyncio.shield(inst.stop_task)
        rec = inst.rec
        rec.desired = RUNNING
        if inst.restart_timer is not None:
            inst.restart_timer.cancel()
            inst.restart_timer = None
        if not inst.alive:
            rec.restarts = rec.failures = 0
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


# ---------------------------------------------------------------------------------------------
# the HTTP API

SUPERVISOR = web.AppKey("supervisor", Supervisor)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NapError as e:
        return web.json_response(e.to_json(), status=e.status)


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _names(body: dict) -> list[str]:
    names = body.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequest("'names' must be a list of instance names")
    return names


async def health(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response({"agent": "nap", "pid": os.getpid(), "instances": len(sup.instances)})


async def submit_units(request: web.Request) -> web.Response:
    body = await _json(request)
    specs = body.get("units")
    if not isinstance(specs, list):
        raise BadRequest("'units' must be a list of {name, text}")
    return web.json_response({"units": await request.app[SUPERVISOR].submit(specs)})


async def list_units(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    prefix = request.query.get("prefix", "")
    found = [sup.status(i) for n, i in sorted(sup.instances.items()) if n.startswith(prefix)]
    return web.json_response({"units": found})


async def status_units(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    names = _names(await _json(request))
    return web.json_response({"units": {n: sup.status(sup.instances[n]) for n in names if n in sup.instances}})


async def stop_unit(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SUPERVISOR].stop(request.match_info["name"]))


async def start_unit(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SUPERVISOR].start(request.match_info["name"]))


async def remove_units(request: web.Request) -> web.Response:
    names = _names(await _json(request))
    return web.json_response({"removed": await request.app[SUPERVISOR].remove(names)})


async def unit_text(request: web.Request) -> web.Response:
    inst = request.app[SUPERVISOR].get(request.match_info["name"])
    return web.Response(text=inst.text, content_type="text/plain")


async def journal(request: web.Request) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    try:
        count = max(0, min(int(request.query.get("lines", "100")), 100_000))
    except ValueError:
        raise BadRequest("'lines' must be a number") from None
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    # Read the tail and subscribe in one step (no await between): no line is missed or doubled.
    lines, inst = sup.journal(request.match_info["name"], count)
    queue: asyncio.Queue | None = None
    if follow and not inst.finished:
        queue = asyncio.Queue()
        inst.followers.add(queue)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        if lines:
            await resp.write("".join(lines).encode())
        while queue is not None:
            try:
                item = await asyncio.wait_for(queue.get(), FOLLOW_HEARTBEAT)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away
                continue
            if item is None:
                break
            await resp.write("".join(item).encode())
        await resp.write_eof()
    except ConnectionResetError:
        pass
    finally:
        if queue is not None:
            inst.followers.discard(queue)
    return resp


def make_app(sup: Supervisor) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=256 * 1024 * 1024)
    app[SUPERVISOR] = sup
    app.router.add_get("/health", health)
    app.router.add_post("/units", submit_units)
    app.router.add_get("/units", list_units)
    app.router.add_delete("/units", remove_units)
    app.router.add_post("/status", status_units)
    app.router.add_post("/units/{name}/stop", stop_unit)
    app.router.add_post("/units/{name}/start", start_unit)
    app.router.add_get("/units/{name}/unit", unit_text)
    app.router.add_get("/units/{name}/journal", journal)
    return app


def _claim_socket(path: str) -> None:
    """Remove a stale socket file; refuse if another agent answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        os.unlink(path)
        return
    finally:
        probe.close()
    raise Conflict(f"another nap agent answers on {path}")


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run the agent until cancelled. The instances keep running when it ends."""
    sup = Supervisor(settings)
    sup.lock()
    sock_path = settings.agent_socket_path
    runner = web.AppRunner(make_app(sup), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    listening = False
    try:
        _claim_socket(sock_path)
        await sup.open()
        await runner.setup()
        await web.UnixSite(runner, sock_path).start()
        listening = True
        os.chmod(sock_path, 0o660)
        log.info("nap agent (pid %s) on %s, %d instances", os.getpid(), sock_path, len(sup.instances))
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        if sup.loop is not None:
            sup.end_follows()
        await runner.cleanup()
        if sup.loop is not None:
            await sup.close()
        elif sup.lock_fd is not None:
            os.close(sup.lock_fd)
        if listening:
            try:
                os.unlink(sock_path)
            except FileNotFoundError:
                pass


def main() -> None:
    """``python -m nap_orch.agent``: the agent with ``Settings.from_env()``, until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    if settings.engine == "slurm":  # Slurm runs the instances; the agent watches them (restarts, ports)
        from .slurm_reconciler import main as reconcile

        return reconcile(settings)

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(settings)
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(run())
    except NapError as e:
        print(f"nap agent: {e.message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
