"""The state store in this process's memory: the same contract, for unit tests of the code above it.

Nothing is shared between processes or kept across a restart: never a production store. Each call is
atomic (no ``await`` inside), and each one yields to the event loop first, so concurrent callers
interleave as they would on a real store.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from .base import Lease, LeaseExpired, Store

_ids = itertools.count(1)


class MemoryLease(Lease):
    def __init__(self, store: MemoryStore, ttl: int):
        self.store = store
        self.id = next(_ids)
        self.ttl = ttl
        self.expires = time.monotonic() + ttl

    @property
    def alive(self) -> bool:
        return self.id in self.store._leases and time.monotonic() < self.expires

    async def refresh(self) -> None:
        await asyncio.sleep(0)
        if not self.alive:
            self.store._drop_lease(self.id)
            raise LeaseExpired(f"memory lease {self.id} has expired")
        self.expires = time.monotonic() + self.ttl

    async def revoke(self) -> None:
        await asyncio.sleep(0)
        self.store._drop_lease(self.id)


class MemoryStore(Store):
    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._owner: dict[str, int] = {}  # key -> the id of the lease it was put with
        self._leases: dict[int, MemoryLease] = {}
        self._locks: set[str] = set()  # the locks this store took (they live as long as the process)

    async def close(self) -> None:
        for key in self._locks:
            self._data.pop(key, None)
            self._owner.pop(key, None)
        self._locks.clear()

    def _drop_lease(self, lease_id: int) -> None:
        self._leases.pop(lease_id, None)
        for key in [k for k, owner in self._owner.items() if owner == lease_id]:
            del self._owner[key]
            del self._data[key]

    def _expire(self) -> None:
        now = time.monotonic()
        for lease in [lease for lease in self._leases.values() if now >= lease.expires]:
            self._drop_lease(lease.id)

    def _set(self, key: str, value: str, lease: Lease | None) -> None:
        if lease is not None:
            if not isinstance(lease, MemoryLease) or not lease.alive:
                raise LeaseExpired(f"lease {getattr(lease, 'id', lease)} has expired")
            self._owner[key] = lease.id
        else:
            self._owner.pop(key, None)  # like etcd: a put without a lease detaches the key
        self._data[key] = value

    async def get(self, key: str) -> str | None:
        await asyncio.sleep(0)
        self._expire()
        return self._data.get(key)

    async def put(self, key: str, value: str, lease: Lease | None = None) -> None:
        await asyncio.sleep(0)
        self._expire()
        self._set(key, value, lease)

    async def put_many(self, items: dict[str, str]) -> None:
        await asyncio.sleep(0)
        self._expire()
        for key, value in items.items():
            self._set(key, value, None)

    async def create(self, key: str, value: str, lease: Lease | None = None) -> bool:
        await asyncio.sleep(0)
        self._expire()
        if key in self._data:
            if lease is not None and not (isinstance(lease, MemoryLease) and lease.alive):
                raise LeaseExpired(f"lease {getattr(lease, 'id', lease)} has expired")
            return False
        self._set(key, value, lease)
        return True

    async def delete(self, key: str) -> bool:
        await asyncio.sleep(0)
        self._expire()
        self._owner.pop(key, None)
        return self._data.pop(key, None) is not None

    async def delete_many(self, keys: list[str]) -> None:
        await asyncio.sleep(0)
        for key in keys:
            self._owner.pop(key, None)
            self._data.pop(key, None)

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        await asyncio.sleep(0)
        self._expire()
        return {k: self._data[k] for k in sorted(self._data) if k.startswith(prefix)}

    async def delete_prefix(self, prefix: str) -> int:
        await asyncio.sleep(0)
        self._expire()
        gone = [k for k in self._data if k.startswith(prefix)]
        for key in gone:
            self._owner.pop(key, None)
            del self._data[key]
        return len(gone)

    async def lock(self, key: str, owner: str) -> str | None:
        await asyncio.sleep(0)
        self._expire()
        held = self._data.get(key)
        if held is not None and held != owner:
            return held
        self._set(key, owner, None)
        self._locks.add(key)
        return None

    async def unlock(self, key: str, owner: str) -> bool:
        await asyncio.sleep(0)
        self._expire()
        if key not in self._locks or self._data.get(key) != owner or key in self._owner:
            return False
        self._locks.discard(key)
        del self._data[key]
        return True

    async def lease(self, ttl: int) -> MemoryLease:
        if ttl < 1:
            raise ValueError(f"a lease lasts at least 1 second, not {ttl!r}")
        await asyncio.sleep(0)
        lease = MemoryLease(self, ttl)
        self._leases[lease.id] = lease
        return lease
