"""The state store on etcd 3 (through ``aetcd``): the seed's keys, exactly as it keeps them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar
from urllib.parse import unquote

import aetcd
import aetcd.exceptions
from aetcd import rpc
from aetcd import transactions as ops

from .. import metrics
from .base import IN_FLIGHT, LOCK_TTL, Lease, LeaseExpired, Store, Upkeep, gather_limited

T = TypeVar("T")

# etcd refuses a transaction of more than --max-txn-ops operations (128 by default).
MAX_TXN_OPS = 128

# gRPC channel options: a prefix read of tens of thousands of keys exceeds gRPC's default 4 MiB per
# message, and the default reconnect backoff (up to 2 minutes) would leave a channel failing long
# after etcd came back.
_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.strip()
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme) :]
    endpoint = endpoint.rstrip("/").rpartition("@")[2]
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return endpoint, 2379
    return host.strip("[]"), int(port)


def credentials(endpoints: str) -> tuple[str, str] | None:
    """``(user, password)`` written into an endpoint as ``user:password@host:port``, else None."""
    for endpoint in endpoints.split(","):
        endpoint = endpoint.strip().removeprefix("http://").removeprefix("https://")
        userinfo, at, _ = endpoint.rpartition("@")
        if at:
            user, _, password = userinfo.partition(":")
            return unquote(user), unquote(password)
    return None


async def enable_auth(endpoint: str, password: str) -> None:
    """Turn on etcd's authentication with a ``root`` user of ``password`` (the platform's account):
    from then on every client needs it. Already on: nothing to do."""
    host, port = _parse_endpoint(endpoint)
    client = aetcd.Client(host, port, timeout=10)
    try:
        await client.connect()
        stub = rpc.AuthStub(client.channel)
        try:
            await stub.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=10)
            await stub.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=10)
            await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
            await stub.AuthEnable(rpc.AuthEnableRequest(), timeout=10)
        except rpc.AioRpcError as error:
            if "user name is empty" in str(error.details()) or "permission denied" in str(error.details()):
                return  # authentication is on already
            raise
    finally:
        await client.close()


def _chunks(items: list, size: int = MAX_TXN_OPS):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_lease_not_found(error: Exception) -> bool:
    return "lease not found" in str(error)


class _LeaseIs(ops.BaseCompare):
    """A transaction's comparison of the lease a key is attached to (etcd 3.3+; aetcd has none)."""

    def build_compare(self, compare: rpc.Compare) -> None:
        compare.target = rpc.Compare.LEASE
        compare.lease = self.value


class EtcdLease(Lease):
    """An etcd lease. etcd grants at least its minimum TTL (2 s with default timings), so ``ttl``
    is the granted one, which may exceed the one asked for."""

    def __init__(self, store: EtcdStore, lease_id: int, ttl: int):
        self.store = store
        self.id = lease_id
        self.ttl = ttl

    async def refresh(self) -> None:
        """One keep-alive (aetcd sends none by itself): call it well within ``ttl``."""
        reply = await self.store._run(lambda client: client.refresh_lease(self.id))
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(f"etcd lease {self.id:x} has expired")

    async def revoke(self) -> None:
        """Delete the lease and its keys; a lease that already lapsed is not an error."""
        try:
            await self.store._run(lambda client: client.revoke_lease(self.id))
        except aetcd.exceptions.ClientError as error:
            if not _is_lease_not_found(error):
                raise

    def __repr__(self) -> str:
        return f"EtcdLease(id={self.id:x}, ttl={self.ttl})"


@metrics.store_calls("etcd")
class EtcdStore(Store):
    """Keys and values in etcd, UTF-8 encoded.

    :param endpoints: ``host:port[,host:port...]`` (a leading ``http://`` is accepted), one of them
        written ``user:password@host:port`` where etcd's authentication is on. The store talks to the
        first that answers, and moves on to the next when that one stops answering.
    :param timeout: seconds any one request may take.
    :param lock_ttl: seconds a lock outlives its holder at most (see ``Store.lock``): the TTL of the one
        lease that all the store's locks are attached to, refreshed every third of it.
    """

    def __init__(self, endpoints: str, timeout: float = 10.0, lock_ttl: int = LOCK_TTL):
        self.endpoints = [_parse_endpoint(e) for e in endpoints.split(",") if e.strip()]
        if not self.endpoints:
            raise ValueError("no etcd endpoint given")
        self.spec = endpoints  # as given (with any credentials): what opens another store like this one
        self._user: str | None = None
        self._password: str | None = None
        self._user, self._password = credentials(endpoints) or (None, None)
        self.timeout = timeout
        self._client: aetcd.Client | None = None
        self._current = 0  # index into endpoints of the one in use
        self._connecting: asyncio.Lock | None = None
        self._closing: set[asyncio.Task] = set()
        self.lock_ttl = lock_ttl
        self._session: EtcdLease | None = None  # the lease of this store's locks, granted at the first
        self._granting: asyncio.Lock | None = None
        self._unlocking: dict[str, tuple[str, int]] = {}  # unlocks that failed: key -> (owner, lease id)
        self._upkeep = Upkeep(self._keep_locks, lock_ttl / 3)

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._current]
        return f"{host}:{port}"

    def _describe(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)

    # -- connection ------------------------------------------------------------------------------

    async def open(self) -> EtcdStore:
        """Connect to the first endpoint that answers; ConnectionError when none does."""
        await self._connected()
        return self

    async def _connected(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is not None:
                return self._client
            errors = []
            # Start with the endpoint in use, so a healthy member is not traded for another.
            order = self.endpoints[self._current :] + self.endpoints[: self._current]
            for host, port in order:
                client = aetcd.Client(
                    host,
                    port,
                    username=self._user,
                    password=self._password,
                    timeout=self.timeout,
                    options=dict(_CHANNEL_OPTIONS),
                )
                try:
                    await client.connect()
                    await client.get(b"/")  # the channel connects lazily: make it answer once
                except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError) as error:
                    errors.append(f"{host}:{port}: {error}" if len(self.endpoints) > 1 else str(error))
                    await client.close()
                    continue
                except aetcd.exceptions.InvalidArgumentError as error:
                    await client.close()
                    if "user name is empty" in str(error):
                        raise ConnectionError(
                            f"etcd at {host}:{port} requires authentication: give it as user:password@{host}:{port}"
                        ) from None
                    if "authentication failed" in str(error):
                        raise ConnectionError(f"etcd at {host}:{port} refused the credentials given") from None
                    raise
                except BaseException:
                    await client.close()
                    raise
                self._current = self.endpoints.index((host, port))
                self._client = client
                return client
            raise ConnectionError(f"etcd at {self._describe()} is unreachable: {'; '.join(errors)}")

    def _discard(self, client: aetcd.Client) -> None:
        """Drop a failed channel (once, however many requests saw it fail) and close it in the background,
        letting requests still on it finish."""
        channel = client.channel
        if self._client is not client:
            return
        self._client = None
        if len(self.endpoints) > 1:
            self._current = (self._current + 1) % len(self.endpoints)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(grace=self.timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _run(self, request: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run one request; when etcd is unavailable, reconnect (maybe to another endpoint) and try once more.

        Only UNAVAILABLE is retried (a dead channel, or a member without a leader): the request was almost
        surely not applied. After a timeout it may have been, so a timeout is not retried. An expired
        authentication token (etcd's simple tokens lapse after minutes unused) is renewed and retried.
        """
        for attempt in (1, 2):
            client = await self._connected()
            try:
                return await request(client)
            except aetcd.exceptions.ConnectionFailedError as error:
                self._discard(client)
                if attempt == 2:
                    raise ConnectionError(f"etcd at {self._describe()} is unreachable: {error}") from error
            except aetcd.exceptions.UnauthenticatedError:
                self._discard(client)  # the next connection authenticates again
                if attempt == 2:
                    raise
            except aetcd.exceptions.ConnectionTimeoutError as error:
                self._discard(client)
                raise ConnectionError(
                    f"etcd at {self._describe()} did not answer within {self.timeout:g} s: {error}"
                ) from error
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._upkeep.stop()
        session, self._session = self._session, None
        if session is not None and self._client is not None:  # its locks go with it
            with contextlib.suppress(ConnectionError, aetcd.exceptions.ClientError):
                await session.revoke()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- keys ------------------------------------------------------------------------------------

    def _lease_id(self, lease: Lease | None) -> int:
        if lease is None:
            return 0
        if not isinstance(lease, EtcdLease):
            raise TypeError(f"not an etcd lease: {lease!r}")
        return lease.id

    async def _leased(self, lease: Lease | None, request: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        try:
            return await self._run(request)
        except aetcd.exceptions.ClientError as error:
            if lease is not None and _is_lease_not_found(error):
                raise LeaseExpired(f"etcd lease {self._lease_id(lease):x} has expired") from error
            raise

    async def _batch(self, requests: list) -> None:
        """Unconditional transactions of at most MAX_TXN_OPS requests each, all in flight at once."""

        def send(chunk: list) -> Callable[[aetcd.Client], Awaitable]:
            return lambda client: client.transaction(compare=[], success=chunk, failure=[])

        await asyncio.gather(*(self._run(send(chunk)) for chunk in _chunks(requests)))

    async def get(self, key: str) -> str | None:
        found = await self._run(lambda client: client.get(key.encode()))
        return None if found is None else found.value.decode()

    async def put(self, key: str, value: str, lease: Lease | None = None) -> None:
        lease_id = self._lease_id(lease)
        await self._leased(lease, lambda client: client.put(key.encode(), value.encode(), lease=lease_id))

    async def put_many(self, items: dict[str, str]) -> None:
        """Transactions of at most 128 puts each, sent together."""
        await self._batch([ops.Put(k.encode(), v.encode()) for k, v in items.items()])

    async def create(self, key: str, value: str, lease: Lease | None = None) -> bool:
        lease_id = self._lease_id(lease)
        encoded = key.encode()

        async def request(client: aetcd.Client) -> bool:
            succeeded, _ = await client.transaction(
                compare=[client.transactions.version(encoded) == 0],
                success=[client.transactions.put(encoded, value.encode(), lease=lease_id)],
                failure=[],
            )
            return succeeded

        return await self._leased(lease, request)

    async def create_many(self, items: Iterable[tuple[str, str]], in_flight: int = IN_FLIGHT) -> list[bool]:
        """Transactions of up to MAX_TXN_OPS creates each, ``in_flight`` at a time: a chunk none of whose
        keys exists (a launch's fresh numbers and ports, nearly always) is created in one round trip, and
        only a chunk with a key that exists already (or a key twice) goes key by key. A launch of 1,000
        made 2,000 round trips here."""
        items = list(items)

        def together(chunk: list[tuple[str, str]]) -> Callable[[aetcd.Client], Awaitable[bool]]:
            async def request(client: aetcd.Client) -> bool:
                succeeded, _ = await client.transaction(
                    compare=[client.transactions.version(k.encode()) == 0 for k, _ in chunk],
                    success=[client.transactions.put(k.encode(), v.encode()) for k, v in chunk],
                    failure=[],
                )
                return succeeded

            return request

        async def created(chunk: list[tuple[str, str]]) -> list[bool]:
            if len({k for k, _ in chunk}) == len(chunk) and await self._run(together(chunk)):
                return [True] * len(chunk)
            return await super(EtcdStore, self).create_many(chunk, in_flight)

        parts = await gather_limited((created(chunk) for chunk in _chunks(items)), in_flight)
        return [ok for part in parts for ok in part]

    async def delete(self, key: str) -> bool:
        return await self._run(lambda client: client.delete(key.encode())) is not None

    async def delete_many(self, keys: list[str]) -> None:
        """Transactions of at most 128 deletes each, sent together."""
        await self._batch([ops.Delete(k.encode()) for k in dict.fromkeys(keys)])

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        """All keys that start with ``prefix`` (a byte prefix: end it with ``/`` for a folder), by key."""
        if prefix:
            request = lambda client: client.get_prefix(prefix.encode(), sort_order="ascend")  # noqa: E731
        else:
            request = lambda client: client.get_range(b"\0", b"\0", sort_order="ascend")  # noqa: E731
        found = await self._run(request)
        return {kv.key.decode(): kv.value.decode() for kv in found}

    async def delete_prefix(self, prefix: str) -> int:
        if prefix:
            request = lambda client: client.delete_prefix(prefix.encode())  # noqa: E731
        else:
            request = lambda client: client.delete_range(b"\0", b"\0")  # noqa: E731
        return (await self._run(request)).deleted

    async def lease(self, ttl: int) -> EtcdLease:
        if ttl < 1:
            raise ValueError(f"a lease lasts at least 1 s, not {ttl}")
        granted = await self._run(lambda client: client.lease(int(ttl)))
        return EtcdLease(self, granted.id, granted.ttl)

    # -- locks -----------------------------------------------------------------------------------

    async def _lock_lease(self) -> EtcdLease:
        """The lease of this store's locks (granted at the first lock, then kept alive by the upkeep)."""
        if self._granting is None:
            self._granting = asyncio.Lock()
        async with self._granting:
            if self._session is None:
                self._session = await self.lease(self.lock_ttl)
                self._upkeep.start()
            return self._session

    async def lock(self, key: str, owner: str) -> str | None:
        encoded, value = key.encode(), owner.encode()
        for attempt in (1, 2):
            lease = await self._lock_lease()

            async def request(client: aetcd.Client, lease_id: int = lease.id) -> str | None:
                tx = client.transactions
                # Created, or taken over from the same owner, or else who holds it: one round trip.
                succeeded, replies = await client.transaction(
                    compare=[tx.version(encoded) == 0],
                    success=[tx.put(encoded, value, lease=lease_id)],
                    failure=[
                        ops.Txn(
                            compare=[tx.value(encoded) == value],
                            success=[tx.put(encoded, value, lease=lease_id)],
                            failure=[tx.get(encoded)],
                        )
                    ],
                )
                if succeeded:
                    return None
                inner = replies[0].response_txn
                if inner.succeeded:
                    return None
                kvs = inner.responses[0].response_range.kvs
                return kvs[0].value.decode() if kvs else ""  # "": deleted just now by its holder

            try:
                held = await self._run(request)
            except aetcd.exceptions.ClientError as error:
                if attempt == 2 or not _is_lease_not_found(error):
                    raise
                self._lost(lease)  # it lapsed (this process stalled, or etcd was away, too long): a new one
                continue
            if held is None:
                self._unlocking.pop(key, None)  # taken again: no older unlock may delete it
            return held
        raise AssertionError("unreachable")

    async def unlock(self, key: str, owner: str) -> bool:
        session = self._session
        if session is None:
            return False  # no lock of this store's is alive
        try:
            return await self._unlock(key, owner, session.id)
        except BaseException:
            # Kept alive by the store's lease, it would not lapse: the upkeep deletes it later.
            self._unlocking[key] = (owner, session.id)
            raise

    async def _unlock(self, key: str, owner: str, lease_id: int) -> bool:
        encoded = key.encode()

        async def request(client: aetcd.Client) -> bool:
            tx = client.transactions
            succeeded, _ = await client.transaction(
                compare=[tx.value(encoded) == owner.encode(), _LeaseIs(encoded) == lease_id],
                success=[tx.delete(encoded)],
                failure=[],
            )
            return succeeded

        return await self._run(request)

    def _lost(self, lease: EtcdLease) -> None:
        if self._session is lease:
            self._session = None
            self._unlocking.clear()  # their lease is gone, and they with it

    async def _keep_locks(self) -> None:
        """The upkeep's tick: the locks' lease refreshed, and the unlocks that failed tried again."""
        session = self._session
        if session is not None:
            try:
                await session.refresh()
            except LeaseExpired:
                self._lost(session)
        for key, (owner, lease_id) in list(self._unlocking.items()):
            await self._unlock(key, owner, lease_id)
            if self._unlocking.get(key) == (owner, lease_id):
                del self._unlocking[key]

    def __repr__(self) -> str:
        return f"EtcdStore({self._describe()!r})"
