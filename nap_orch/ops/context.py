"""What the domain operations need from whoever runs them (a job in a worker, the API, a test)."""

from __future__ import annotations

from typing import Any, Protocol

from ..config import Settings
from ..engines.base import Engine
from ..store.base import Store


class Resources(Protocol):
    """The long-lived resources of a process: settings, the state store and the engine."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    @property
    def engine(self) -> Engine: ...


class Context(Resources, Protocol):
    """A running job as its operation sees it: its id (what its reservations are keyed by), its log
    and progress (events users follow), and its step boundaries (where a cancel takes effect)."""

    @property
    def job_id(self) -> str: ...

    async def log(self, line: str) -> None: ...

    async def progress(self, done: int, total: int, force: bool = False, **extra: Any) -> None: ...

    async def check(self) -> None:
        """Raises ``Cancelled`` once the job's user has cancelled it."""
        ...
