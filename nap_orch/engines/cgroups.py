"""Resource limits over an instance's whole process tree: one control group per instance.

A unit's ``MemoryMax`` and ``TasksMax`` hold for every process the instance starts (``RLIMIT_AS`` held
per process, so three children of 80 MiB ran under 120 MiB), ``stop_app`` ends every process of the
group (a ``setsid`` or double-forked child included), and an instance the kernel killed for memory is
told apart (``oom_kills``).

Layout (``<stack>`` is the stack's namespace, ``<name>`` the instance's name):

- cgroup v2, where ``/sys/fs/cgroup/cgroup.controllers`` offers ``memory`` and ``pids``:
  ``/sys/fs/cgroup/nap-<stack>/<name>/`` with ``memory.max``, ``memory.swap.max``, ``pids.max``;
  killed with ``cgroup.kill``, OOM kills counted in ``memory.events``;
- cgroup v1, where the ``memory``, ``pids`` and ``freezer`` hierarchies are mounted (this machine kind):
  ``/sys/fs/cgroup/<controller>/nap-<stack>/<name>/`` with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` where swap is accounted) and ``pids.max``; killed while frozen (no
  process can fork meanwhile), OOM kills counted in ``memory.oom_control``.

``Hierarchy.detect`` says which one this host has (None: neither is usable). A process joins its
group with ``Group.join(pid)`` before it runs anything of the tenant's: the agent starts the sandbox
blocked and releases it once joined, so no child is born outside the group.

A Slurm task keeps the same layout from bash (``engines.slurm.scripts``: ``nap_cg_*``).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "freezer")


class CgroupError(OSError):
    """A group could not be made, limited or joined."""


@dataclass(frozen=True)
class Limits:
    """What a group enforces: bytes of memory (None: no limit) and processes (None: no limit)."""

    memory: int | None = None
    tasks: int | None = None


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(e.errno, f"cannot write {value!r} to {path}: {e.strerror}") from None


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in _read(path / "cgroup.procs").split()]
    except FileNotFoundError:
        return []


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except FileNotFoundError:  # gone: nothing of it to move
        pass
    return out


def _field(text: str, key: str) -> int:
    """``key N`` from a flat-keyed cgroup file (``memory.events``, ``memory.oom_control``)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class Group:
    """One instance's group (in each controller, on v1)."""

    def __init__(self, hierarchy: Hierarchy, name: str):
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a group name")
        self.hierarchy = hierarchy
        self.name = name
        self.dirs = [base / name for base in hierarchy.bases]
        self.fresh = False  # made by the last ``create`` (not there before)

    @property
    def exists(self) -> bool:
        return all(d.is_dir() for d in self.dirs)

    def _dir(self, controller: str) -> Path:
        if self.hierarchy.version == 2:
            return self.dirs[0]
        return self.dirs[V1_CONTROLLERS.index(controller)]

    def create(self, limits: Limits) -> Group:
        """Make the group (again: an existing one is kept, ``fresh`` says which) and set its limits."""
        self.fresh = False
        for d in self.dirs:
            try:
                d.mkdir(parents=True)
                self.fresh = True
            except FileExistsError:
                pass
        memory, tasks = self._dir("memory"), self._dir("pids")
        if self.fresh and not limits.memory:
            pass  # a new group has no memory limit: no writes for it on a launch without one
        elif self.hierarchy.version == 2:
            _write(memory / "memory.max", str(limits.memory) if limits.memory else "max")
            if (memory / "memory.swap.max").exists():
                _write(memory / "memory.swap.max", "0" if limits.memory else "max")
        else:
            # memsw (memory + swap) may not be lowered below the memory limit, nor the memory limit
            # raised above memsw: set them in the order that keeps memsw >= memory.
            unlimited = str(2**63 - 1)
            value = str(limits.memory) if limits.memory else unlimited
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, unlimited)
            _write(memory / "memory.limit_in_bytes", value)
            if memsw.exists():
                _write(memsw, value)
        _write(tasks / "pids.max", str(limits.tasks) if limits.tasks else "max")
        return self

    def join(self, pid: int) -> None:
        """Move ``pid`` (and so everything it starts from now on) into the group."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def join_tree(self, pid: int) -> None:
        """Move ``pid`` and every process it has started so far into the group. bubblewrap clones its
        sandbox before it waits on ``--block-fd``: that child exists already (blocked) and would stay
        outside. A fork either ends before the move (the child is listed then) or inherits the group."""
        self.join(pid)
        for child in _children(pid):
            self.join_tree(child)

    def pids(self) -> list[int]:
        """The processes in the group now."""
        return _pids(self.dirs[0])

    def oom_kills(self) -> int:
        """How many of the group's processes the kernel killed for memory, so far."""
        memory = self._dir("memory")
        try:
            if self.hierarchy.version == 2:
                return _field(_read(memory / "memory.events"), "oom_kill")
            return _field(_read(memory / "memory.oom_control"), "oom_kill")
        except FileNotFoundError:
            return 0

    def kill(self, timeout: float = 10.0) -> bool:
        """SIGKILL every process of the group, forks in flight included; True once it is empty."""
        deadline = time.monotonic() + timeout
        if self.hierarchy.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            _write(self.dirs[0] / "cgroup.kill", "1")
        else:
            self._kill_frozen()
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _kill_frozen(self) -> None:
        freezer = self._dir("freezer")
        state = freezer / ("cgroup.freeze" if self.hierarchy.version == 2 else "freezer.state")
        _write(state, "1" if self.hierarchy.version == 2 else "FROZEN")
        try:
            for _ in range(100):  # a frozen group can't fork: a few rounds find every process
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        finally:
            _write(state, "0" if self.hierarchy.version == 2 else "THAWED")

    def remove(self) -> None:
        """Remove the group (it must be empty: ``kill`` first). Gone already is fine."""
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                raise CgroupError(e.errno, f"{d} still holds processes {self.pids()}") from None


class Hierarchy:
    """Where a stack's groups live: ``bases`` (one folder on v2, one per controller on v1)."""

    def __init__(self, version: int, bases: list[Path]):
        self.version = version
        self.bases = bases

    @classmethod
    def detect(cls, stack: str, root: str = "/sys/fs/cgroup") -> Hierarchy | None:
        """This host's usable hierarchy for the stack ``stack``, its folders made; None where neither v2
        with memory and pids nor v1 memory, pids and freezer can be written here."""
        top = Path(root)
        folder = f"nap-{stack}"
        controllers = top / "cgroup.controllers"
        try:
            if controllers.exists() and {"memory", "pids"} <= set(_read(controllers).split()):
                base = top / folder
                base.mkdir(exist_ok=True)
                wanted = "+memory +pids"
                _write(top / "cgroup.subtree_control", wanted)
                _write(base / "cgroup.subtree_control", wanted)
                return cls(2, [base])
            if all((top / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
                bases = [top / c / folder for c in V1_CONTROLLERS]
                for base in bases:
                    base.mkdir(exist_ok=True)
                memory = bases[0] / "memory.use_hierarchy"  # limits hold for subgroups too
                if _read(memory).strip() != "1":
                    _write(memory, "1")
                return cls(1, bases)
        except OSError:
            return None
        return None

    def group(self, name: str) -> Group:
        return Group(self, name)
