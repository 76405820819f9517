"""The state store in Redis, for when no etcd is configured: the same keys, with etcd's semantics.

Layout, under ``<namespace>:``
  - ``kv:<key>``: a string, the value of ``<key>`` (keys put with a lease carry a PX TTL);
  - ``kvindex``: a sorted set of every key, all scores 0, so ZRANGEBYLEX reads a prefix in key order
    without SCAN/KEYS. A key that expired leaves its index entry behind; prefix reads skip it and drop it;
  - ``lease:<id>``: a lease, alive as long as this key is (PX TTL);
  - ``lockedby:<key>``: which store holds the lock ``<key>`` (a token of that store object), beside its
    value (the lock's owner) in ``kv:<key>``; both expire together (PX ``lock_ttl``), renewed by the
    holder every third of that while it lives.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import metrics
from .base import IN_FLIGHT, LOCK_TTL, Lease, LeaseExpired, Store, Upkeep

# Every script touches keys it computes from its arguments: fine on one server (not on Redis Cluster).

# KEYS: index, value key[, lease key]. ARGV: key, value, nx ("1" or "0").
# -1: the lease lapsed; 0: nx and the key exists; 1: written (expiring with the lease, if any).
# A SET without PX drops the key's TTL: like etcd, a put without a lease detaches the key from its lease.
_PUT = """
local ttl = 0
if KEYS[3] then
  ttl = redis.call('PTTL', KEYS[3])
  if ttl <= 0 then return -1 end
end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[2])
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 1
"""

# KEYS: index. ARGV: value-key prefix, key1, value1, key2, value2, ... Each key is written (with its index
# entry) only if it does not exist; returns 1 (written) or 0 (there already) for each, in order.
_CREATE_MANY = """
local out = {}
for i = 2, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 then
    out[#out + 1] = 0
  else
    redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[1], 0, ARGV[i])
    out[#out + 1] = 1
  end
end
return out
"""
CREATE_CHUNK = 500  # keys per script: one round trip each, and Redis is held for well under a millisecond

# KEYS: index. ARGV: min, max (ZRANGEBYLEX bounds), value-key prefix. Returns key1, value1, key2, ...
_GET_PREFIX = """
local found = {}
local dead = {}
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])) do
  local value = redis.call('GET', ARGV[3] .. key)
  if value then
    found[#found + 1] = key
    found[#found + 1] = value
  else
    dead[#dead + 1] = key
  end
end
for _, key in ipairs(dead) do redis.call('ZREM', KEYS[1], key) end
return found
"""

# KEYS: index. ARGV: min, max, value-key prefix. Returns how many keys existed.
_DELETE_PREFIX = """
local deleted = 0
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])) do
  deleted = deleted + redis.call('DEL', ARGV[3] .. key)
end
redis.call('ZREMRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])
return deleted
"""

# KEYS: lease key. ARGV: ttl in ms, value-key prefix, key1, key2, ...
# Renews the lease and those of its keys that still expire (a key put since without a lease keeps no TTL).
# Returns -1 when the lease lapsed, else the keys that are no longer attached.
_REFRESH = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return -1 end
local detached = {}
for i = 3, #ARGV do
  local name = ARGV[2] .. ARGV[i]
  if redis.call('PTTL', name) > 0 then
    redis.call('PEXPIRE', name, ARGV[1])
  else
    detached[#detached + 1] = ARGV[i]
  end
end
return detached
"""

# KEYS: lease key, index. ARGV: value-key prefix, key1, key2, ... Deletes the lease and its (expiring) keys.
_REVOKE = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV do
  local name = ARGV[1] .. ARGV[i]
  if redis.call('PTTL', name) > 0 then
    redis.call('DEL', name)
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return 0
"""


# KEYS: index, value key, holder key. ARGV: key, owner, this store's token, ttl in ms.
# Takes the lock (or takes it over from the same owner): nil; else returns its value.
_LOCK = """
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[2] then return held end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return false
"""

# KEYS: index, value key, holder key. ARGV: key, owner, this store's token. 1 when deleted.
_UNLOCK = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('GET', KEYS[3]) ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# ARGV: ttl in ms, value-key prefix, holder-key prefix, this store's token, key1, owner1, key2, owner2, ...
# Renews the locks this store still holds; returns the keys of those it no longer does.
_KEEP_LOCKS = """
local lost = {}
for i = 5, #ARGV, 2 do
  local value, holder = ARGV[2] .. ARGV[i], ARGV[3] .. ARGV[i]
  if redis.call('GET', value) == ARGV[i + 1] and redis.call('GET', holder) == ARGV[4] then
    redis.call('PEXPIRE', value, ARGV[1])
    redis.call('PEXPIRE', holder, ARGV[1])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""


def _prefix_bounds(prefix: str) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the keys that start with ``prefix`` (byte-wise, as etcd's prefix ranges)."""
    if not prefix:
        return b"-", b"+"
    start = prefix.encode()
    end = bytearray(start)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"[" + start, b"+"
    end[-1] += 1
    return b"[" + start, b"(" + bytes(end)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return url


class RedisLease(Lease):
    """A lease in Redis: a key with a PX TTL, and the set of keys put with it, kept here by its holder."""

    def __init__(self, store: RedisStore, lease_id: str, ttl: int):
        self.store = store
        self.id = lease_id
        self.ttl = ttl
        self.keys: set[str] = set()

    @property
    def name(self) -> str:
        return f"{self.store.namespace}:lease:{self.id}"

    async def refresh(self) -> None:
        store = self.store
        detached = await store._eval("refresh", [self.name], [self.ttl * 1000, store._kv, *self.keys])
        if detached == -1:
            raise LeaseExpired(f"redis lease {self.id} has expired")
        self.keys.difference_update(detached)

    async def revoke(self) -> None:
        store = self.store
        await store._eval("revoke", [self.name, store._index], [store._kv, *self.keys])
        self.keys.clear()

    def __repr__(self) -> str:
        return f"RedisLease(id={self.id}, ttl={self.ttl})"


@metrics.store_calls("redis")
class RedisStore(Store):
    """Keys and values in Redis, laid out as the module's docstring says.

    :param redis_url: ``redis://host:port/db`` (or ``unix://``), as redis-py reads it.
    :param namespace: the prefix of every Redis key this store owns, so that several share one server.
    :param max_connections: at most this many connections; more concurrent calls wait for one.
    :param lock_ttl: seconds a lock outlives its holder at most (see ``Store.lock``).
    """

    def __init__(self, redis_url: str, namespace: str = "nap", max_connections: int = 64, lock_ttl: int = LOCK_TTL):
        self.redis_url = redis_url
        self.namespace = namespace
        self.max_connections = max_connections
        self.lock_ttl = lock_ttl
        self._kv = f"{namespace}:kv:"
        self._index = f"{namespace}:kvindex"
        self._lockedby = f"{namespace}:lockedby:"
        self._redis: aioredis.Redis | None = None
        self._scripts: dict = {}
        self._token = secrets.token_hex(8)  # names this store object as the holder of its locks
        self._locks: dict[str, tuple[str, float]] = {}  # the locks it holds: key -> (owner, when taken)
        self._upkeep = Upkeep(self._keep_locks, lock_ttl / 3)

    def _client(self) -> Any:  # replies are bytes | str to redis-py's annotations; str here (decode_responses)
        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.redis_url,
                # Many concurrent calls (a bulk start) wait for a connection rather than fail.
                max_connections=self.max_connections,
                timeout=30,
                decode_responses=True,
                # One immediate retry on a fresh connection: a pooled one may be stale after a server restart.
                retry=Retry(NoBackoff(), 1),
                socket_connect_timeout=5,
                socket_timeout=30,
            )
            self._redis = aioredis.Redis.from_pool(pool)
            self._scripts = {
                "put": self._redis.register_script(_PUT),
                "create_many": self._redis.register_script(_CREATE_MANY),
                "get_prefix": self._redis.register_script(_GET_PREFIX),
                "delete_prefix": self._redis.register_script(_DELETE_PREFIX),
                "refresh": self._redis.register_script(_REFRESH),
                "revoke": self._redis.register_script(_REVOKE),
                "lock": self._redis.register_script(_LOCK),
                "unlock": self._redis.register_script(_UNLOCK),
                "keep_locks": self._redis.register_script(_KEEP_LOCKS),
            }
        return self._redis

    @contextlib.contextmanager
    def _reachable(self):
        """Turn redis-py's connection failures into the builtin ConnectionError, naming the server."""
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise ConnectionError(f"redis at {_redact(self.redis_url)} is unreachable: {error}") from error

    async def _eval(self, script: str, keys: list, args: list):
        """Run one of the Lua scripts above (EVALSHA, or EVAL when the server does not know it yet)."""
        client = self._client()
        with self._reachable():
            return await self._scripts[script](keys=keys, args=args, client=client)

    async def open(self) -> RedisStore:
        """Connect and check that the server answers; ConnectionError when it does not."""
        with self._reachable():
            await self._client().ping()
        return self

    async def close(self) -> None:
        await self._upkeep.stop()
        for key, (owner, _) in list(self._locks.items()):
            with contextlib.suppress(ConnectionError):
                await self.unlock(key, owner)
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def _put(self, key: str, value: str, lease: Lease | None, nx: bool) -> bool:
        """One script, one round trip: a put and its index entry are never seen apart."""
        if lease is not None and not isinstance(lease, RedisLease):
            raise TypeError(f"not a redis lease: {lease!r}")
        keys = [self._index, self._kv + key] + ([lease.name] if lease is not None else [])
        written = await self._eval("put", keys, [key, value, int(nx)])
        if written == -1:
            raise LeaseExpired(f"redis lease {getattr(lease, 'id', '?')} has expired")
        if written == 1 and lease is not None:
            lease.keys.add(key)
        return written == 1

    async def get(self, key: str) -> str | None:
        with self._reachable():
            return await self._client().get(self._kv + key)

    async def put(self, key: str, value: str, lease: Lease | None = None) -> None:
        await self._put(key, value, lease, nx=False)

    async def put_many(self, items: dict[str, str]) -> None:
        if not items:
            return
        with self._reachable():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.mset({self._kv + key: value for key, value in items.items()})
                pipe.zadd(self._index, dict.fromkeys(items, 0))
                await pipe.execute()

    async def create(self, key: str, value: str, lease: Lease | None = None) -> bool:
        return await self._put(key, value, lease, nx=True)

    async def create_many(self, items: Iterable[tuple[str, str]], in_flight: int = IN_FLIGHT) -> list[bool]:
        """``create`` of each (key, value), a script for every ``CREATE_CHUNK`` of them (a launch of 1,000
        made 2,000 round trips; now 4)."""
        items = list(items)
        out: list[bool] = []
        for start in range(0, len(items), CREATE_CHUNK):
            args = [self._kv] + [part for item in items[start : start + CREATE_CHUNK] for part in item]
            out += [bool(x) for x in await self._eval("create_many", [self._index], args)]
        return out

    async def delete(self, key: str) -> bool:
        with self._reachable():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.delete(self._kv + key)
                pipe.zrem(self._index, key)
                deleted, _ = await pipe.execute()
        return deleted > 0

    async def delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        with self._reachable():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.delete(*(self._kv + key for key in keys))
                pipe.zrem(self._index, *keys)
                await pipe.execute()

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        """All keys that start with ``prefix`` (a byte prefix: end it with ``/`` for a folder), by key."""
        low, high = _prefix_bounds(prefix)
        found = await self._eval("get_prefix", [self._index], [low, high, self._kv])
        return dict(zip(found[::2], found[1::2]))

    async def delete_prefix(self, prefix: str) -> int:
        low, high = _prefix_bounds(prefix)
        return await self._eval("delete_prefix", [self._index], [low, high, self._kv])

    def _lock_keys(self, key: str) -> list[str]:
        return [self._index, self._kv + key, self._lockedby + key]

    async def lock(self, key: str, owner: str) -> str | None:
        taken = time.monotonic()
        held = await self._eval("lock", self._lock_keys(key), [key, owner, self._token, self.lock_ttl * 1000])
        if held is None:
            self._locks[key] = (owner, taken)
            self._upkeep.start()
        return held

    async def unlock(self, key: str, owner: str) -> bool:
        # Forgotten first: a lock whose unlock fails is no longer renewed, and lapses.
        if self._locks.get(key, (None,))[0] == owner:
            del self._locks[key]
        return await self._eval("unlock", self._lock_keys(key), [key, owner, self._token]) == 1

    async def _keep_locks(self) -> None:
        """Renew the locks this store holds (the upkeep's tick); forget those it no longer holds."""
        if not self._locks:
            return
        held = list(self._locks.items())
        args: list = [self.lock_ttl * 1000, self._kv, self._lockedby, self._token]
        for key, (owner, _) in held:
            args += [key, owner]
        lost = set(await self._eval("keep_locks", [], args))
        for key, entry in held:
            if key in lost and self._locks.get(key) == entry:  # not taken again meanwhile
                del self._locks[key]

    async def lease(self, ttl: int) -> RedisLease:
        if ttl < 1:
            raise ValueError(f"a lease lasts at least 1 s, not {ttl}")
        lease = RedisLease(self, secrets.token_hex(8), int(ttl))
        with self._reachable():
            await self._client().set(lease.name, "1", px=lease.ttl * 1000, nx=True)
        return lease

    def __repr__(self) -> str:
        return f"RedisStore({_redact(self.redis_url)!r}, namespace={self.namespace!r})"
