"""What a state store must provide. Keys are etcd-style paths (``/services/url/alice/web``); values are str.

The implementations (``etcd.py``, ``redis.py``, and ``memory.py`` for unit tests) pass the same contract
suite (tests/integration/test_store.py, which runs the in-memory one too).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
# Requests in flight at once for the many-key operations below (etcd takes ~5,000 puts/s with 32 in flight).
IN_FLIGHT = 64
# Seconds a lock outlives its holder (the process that took it dies or loses the server) at most.
LOCK_TTL = 30

log = logging.getLogger("nap.store")


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = IN_FLIGHT) -> list[T]:
    """``asyncio.gather`` with at most ``limit`` of them awaited at once. When one fails, the others are
    cancelled before its error is raised: none of them goes on writing behind its caller's back (a
    launch retried after a Redis outage would race the creates of its own first attempt)."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        try:
            async with sem:
                return await c
        finally:
            if asyncio.iscoroutine(c):
                c.close()  # one cancelled before its turn never started: it needn't be awaited

    tasks = [asyncio.ensure_future(one(c)) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class LeaseExpired(LookupError):
    """The lease lapsed (or was revoked): its keys are gone, and it can be neither refreshed nor used."""


class Lease(abc.ABC):
    """A time-to-live shared by keys; the holder refreshes it, and its keys vanish when it lapses."""

    ttl: int

    @abc.abstractmethod
    async def refresh(self) -> None: ...

    @abc.abstractmethod
    async def revoke(self) -> None: ...


class Upkeep:
    """A store's background work for the locks it holds: ``tick`` every ``every`` seconds, from the first
    ``start`` until ``stop``. A tick that fails (the server away for a while) is tried again at the next."""

    def __init__(self, tick: Callable[[], Awaitable[None]], every: float):
        self._tick = tick
        self.every = every
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self._tick()
            except Exception as error:  # noqa: BLE001 - the next tick tries again; a lock outlives a few
                log.warning("keeping the store's locks alive failed (tried again in %g s): %s", self.every, error)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Store(abc.ABC):
    lock_ttl: int = LOCK_TTL

    async def open(self) -> Store:
        """Connect; returns self. Idempotent."""
        return self

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def put(self, key: str, value: str, lease: Lease | None = None) -> None: ...

    @abc.abstractmethod
    async def put_many(self, items: dict[str, str]) -> None:
        """Write several keys in one round trip (not necessarily atomically)."""

    @abc.abstractmethod
    async def create(self, key: str, value: str, lease: Lease | None = None) -> bool:
        """Write ``key`` only if it does not exist; True when this call created it (atomic)."""

    async def create_many(self, items: Iterable[tuple[str, str]], in_flight: int = IN_FLIGHT) -> list[bool]:
        """``create`` for each (key, value), ``in_flight`` at a time: which of them this call created."""
        return await gather_limited((self.create(k, v) for k, v in items), in_flight)

    async def get_many(self, keys: Iterable[str]) -> list[str | None]:
        """``get`` of each key, concurrently, in order."""
        return await gather_limited(self.get(k) for k in keys)

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete one key; True when it existed."""

    @abc.abstractmethod
    async def delete_many(self, keys: list[str]) -> None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, str]:
        """All keys starting with ``prefix`` and their values, sorted by key."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int: ...

    @abc.abstractmethod
    async def lease(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds."""

    @abc.abstractmethod
    async def lock(self, key: str, owner: str) -> str | None:
        """Take the lock ``key`` (its value: ``owner``) in one round trip: create it, or take it over when
        its value is ``owner`` already (whoever holds it: an earlier attempt of the same job that died).
        None when this store holds it now; else the value of the lock as it is (its owner).

        A lock lasts until ``unlock``, or until this store is closed. The store keeps it alive in the
        background (etcd: one lease of ``lock_ttl`` for all the store's locks, refreshed; Redis: the
        locks' own expiry, renewed), so it lapses at most ``lock_ttl`` seconds after its holder's
        process dies or loses the server, and never while the holder lives and reaches the server."""

    @abc.abstractmethod
    async def unlock(self, key: str, owner: str) -> bool:
        """Delete the lock ``key`` if this store holds it for ``owner`` (taken by its ``lock`` and not taken
        over since by another store), in one round trip; True when it did. A lock whose unlock raised (the
        server away) still goes: at the store's next upkeep, or when it lapses."""

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()
