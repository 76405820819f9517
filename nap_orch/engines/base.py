"""The engine seam: "run these units somewhere", fleet's old role.

An engine receives rendered units (``UnitSpec``), runs exactly what they say, and reports per-instance
status. Adding an engine is adding one module beside this one.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

# Instance states, as users see them.
STARTING, RUNNING, EXITED, FAILED, STOPPED = "starting", "running", "exited", "failed", "stopped"
OOM = "oom"  # failed for good, its last run killed for memory (the unit's MemoryMax)
ENDED = frozenset({EXITED, FAILED, OOM, STOPPED})  # nothing runs, nor will until someone starts it


@dataclass
class UnitSpec:
    """One rendered unit: ``name`` is the instance name (no ``.service``), ``text`` the unit file."""

    name: str
    text: str


@dataclass
class InstanceStatus:
    name: str
    state: str  # starting | running | exited | failed | oom | stopped
    host: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    restarts: int = 0
    since: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Engine(abc.ABC):
    """What every engine provides. Names are instance names (``alice_web_common@3``)."""

    name = "base"

    async def open(self) -> Engine:
        return self

    async def close(self) -> None:
        pass

    @abc.abstractmethod
    async def submit(self, units: list[UnitSpec]) -> None:
        """Install and start the units (a batch: one round trip where the engine allows it)."""

    @abc.abstractmethod
    async def status(self, names: list[str]) -> dict[str, InstanceStatus]:
        """Status of the named instances; unknown names are absent from the answer."""

    @abc.abstractmethod
    async def instances(self, prefix: str) -> list[InstanceStatus]:
        """Every instance whose name starts with ``prefix`` (``alice_web_``)."""

    @abc.abstractmethod
    async def stop(self, name: str) -> InstanceStatus: ...

    @abc.abstractmethod
    async def start(self, name: str) -> InstanceStatus: ...

    @abc.abstractmethod
    async def remove(self, names: list[str]) -> None:
        """Stop and forget units (used to roll back a failed launch)."""

    @abc.abstractmethod
    async def unit_text(self, name: str) -> str | None: ...

    @abc.abstractmethod
    def journal(self, name: str, lines: int = 100, follow: bool = False) -> AsyncIterator[str]:
        """The instance's journal: the last ``lines`` lines; with ``follow``, then live until it stops."""

    def host_for_ports(self) -> str | None:
        """The host whose ports to reserve before submit, or None when the host is known only later."""
        return None

    async def check_room(self, count: int) -> None:
        """Raise ``Exhausted`` when ``count`` more instances can't all get a port (engines whose hosts
        are known only later check what they can before anything is reserved)."""
