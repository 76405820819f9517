"""The state store's contract: every test runs on etcd and on the Redis fallback alike."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pytest

from nap_orch.engines.ports import Ports
from nap_orch.store.base import LeaseExpired, Store
from nap_orch.store.etcd import EtcdStore
from nap_orch.store.memory import MemoryStore
from nap_orch.store.redis import RedisStore
from tests.support.fixtures import SERVER_STORES
from tests.support.services import EtcdServer, RedisServer, free_port


async def wait_until_gone(store: Store, key: str, within: float) -> float:
    """Poll until ``key`` is gone; return how long it took. Fails after ``within`` seconds."""
    start = time.monotonic()
    while await store.get(key) is not None:
        if time.monotonic() - start > within:
            pytest.fail(f"{key} still there after {within:g} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def test_get_returns_the_last_value_put(store, key_prefix):
    key = key_prefix + "services/url/alice/web"
    assert await store.get(key) is None
    await store.put(key, "https://example.org/web.tar.gz")
    assert await store.get(key) == "https://example.org/web.tar.gz"
    await store.put(key, "https://example.org/web2.tar.gz")
    assert await store.get(key) == "https://example.org/web2.tar.gz"


async def test_values_round_trip_unchanged(store, key_prefix):
    values = {
        key_prefix + "services/port/alice/web/1": json.dumps({"host": "127.0.0.1", "port": 20001}),
        key_prefix + "nap/unicode": "héllo wörld ✓ 日本",
        key_prefix + "nap/empty": "",
        key_prefix + "nap/multiline": "a\nb\r\n\tc",
    }
    for key, value in values.items():
        await store.put(key, value)
    for key, value in values.items():
        assert await store.get(key) == value
    assert await store.get_prefix(key_prefix) == dict(sorted(values.items()))


async def test_create_writes_only_a_missing_key(store, key_prefix):
    key = key_prefix + "nap/ports/host/20001"
    assert await store.create(key, "alice_web_common@1") is True
    assert await store.create(key, "bob_api_common@1") is False
    assert await store.get(key) == "alice_web_common@1"
    assert await store.delete(key) is True
    assert await store.create(key, "bob_api_common@1") is True


async def test_create_is_atomic_under_concurrency(store, key_prefix):
    key = key_prefix + "nap/ports/host/20002"
    results = await asyncio.gather(*(store.create(key, f"claimant-{i}") for i in range(50)))
    assert results.count(True) == 1
    assert await store.get(key) == f"claimant-{results.index(True)}"


async def test_create_many_creates_exactly_the_missing_keys_in_order(store, key_prefix):
    """Over several of etcd's transactions (128 operations each): a chunk whose keys are all new, one with
    a key that exists already, one with a key given twice; each answer in the order given."""
    keys = [f"{key_prefix}nap/instances/alice/web/{n}" for n in range(1, 301)]
    await store.put(keys[150], "held by another job")
    items = [(k, "mine") for k in keys] + [(keys[299], "mine again")]
    created = await store.create_many(items)
    assert created[:299] == [n != 150 for n in range(299)]
    assert sorted(created[299:]) == [False, True]  # the key given twice: created by one of the two
    found = await store.get_many(keys)
    assert found[:299] == ["held by another job" if n == 150 else "mine" for n in range(299)]
    assert found[299] == ("mine" if created[299] else "mine again")
    assert await store.create_many([(keys[0], "x"), (keys[0], "y")]) == [False, False]
    assert await store.create_many([]) == []


async def test_create_many_is_atomic_per_key_under_concurrency(store, key_prefix):
    """Two batches racing for the same 200 keys: each key is created by exactly one of them."""
    keys = [f"{key_prefix}nap/ports/host/{30000 + n}" for n in range(200)]
    a, b = await asyncio.gather(
        store.create_many([(k, "a") for k in keys]), store.create_many([(k, "b") for k in reversed(keys)])
    )
    b.reverse()
    assert all(x != y for x, y in zip(a, b))
    assert await store.get_many(keys) == ["a" if x else "b" for x in a]


async def test_delete_reports_whether_the_key_existed(store, key_prefix):
    key = key_prefix + "services/url/alice/web"
    await store.put(key, "u")
    assert await store.delete(key) is True
    assert await store.get(key) is None
    assert await store.delete(key) is False


async def test_get_prefix_sorted_and_scoped(store, key_prefix):
    p = key_prefix
    keys = [
        p + "a/b",
        p + "a/b/1",
        p + "a/b/10",
        p + "a/b/2",
        p + "a/b/x/deep",
        p + "a/bc",
        p + "a/c",
        p + "b",
    ]
    shuffled = keys[:]
    random.Random(7).shuffle(shuffled)
    for key in shuffled:
        await store.put(key, key.upper())

    folder = await store.get_prefix(p + "a/b/")
    # Byte order, like etcd: "10" sorts before "2".
    assert list(folder) == [p + "a/b/1", p + "a/b/10", p + "a/b/2", p + "a/b/x/deep"]
    assert folder[p + "a/b/10"] == (p + "a/b/10").upper()

    # A prefix is a byte prefix (etcd's meaning): callers end a folder's prefix with "/".
    assert list(await store.get_prefix(p + "a/b")) == keys[:6]
    assert list(await store.get_prefix(p)) == keys
    assert await store.get_prefix(p + "nothing/") == {}


async def test_put_many_and_delete_many(store, key_prefix):
    # More keys than etcd takes in one transaction (128).
    items = {f"{key_prefix}services/port/alice/web/{n}": json.dumps({"port": 20000 + n}) for n in range(1000)}
    await store.put_many(items)
    assert await store.get_prefix(key_prefix) == dict(sorted(items.items()))

    gone = list(items)[:700]
    await store.delete_many(gone)
    left = await store.get_prefix(key_prefix)
    assert list(left) == sorted(list(items)[700:])
    assert not any(await asyncio.gather(*(store.get(key) for key in gone)))

    # Empty batches, and keys that don't exist, are no-ops.
    await store.put_many({})
    await store.delete_many([])
    await store.delete_many([key_prefix + "missing", key_prefix + "missing"])
    assert len(await store.get_prefix(key_prefix)) == 300


async def test_put_many_overwrites_existing_keys(store, key_prefix):
    await store.put(key_prefix + "k1", "old")
    await store.put_many({key_prefix + "k1": "new", key_prefix + "k2": "two"})
    assert await store.get_prefix(key_prefix) == {key_prefix + "k1": "new", key_prefix + "k2": "two"}


async def test_delete_prefix(store, key_prefix):
    await store.put_many({f"{key_prefix}services/port/alice/web/{n}": "x" for n in range(200)})
    await store.put(key_prefix + "services/port/alice/webshop/1", "kept")
    await store.put(key_prefix + "services/url/alice/web", "kept")

    assert await store.delete_prefix(key_prefix + "services/port/alice/web/") == 200
    assert await store.get_prefix(key_prefix) == {
        key_prefix + "services/port/alice/webshop/1": "kept",
        key_prefix + "services/url/alice/web": "kept",
    }
    assert await store.delete_prefix(key_prefix + "services/port/alice/web/") == 0


async def test_get_prefix_reads_ten_thousand_keys(store, key_prefix):
    items = {f"{key_prefix}nap/ports/host/{20000 + n}": f"alice_web_common@{n}" for n in range(10_000)}
    await store.put_many(items)
    found = await store.get_prefix(key_prefix + "nap/ports/host/")
    assert found == dict(sorted(items.items()))
    assert await store.delete_prefix(key_prefix) == 10_000


async def test_lease_keys_vanish_after_ttl(store, key_prefix):
    lease = await store.lease(1)
    assert lease.ttl >= 1  # etcd may grant more than asked (its minimum TTL)
    await store.put(key_prefix + "leased/put", "p", lease=lease)
    assert await store.create(key_prefix + "leased/created", "c", lease=lease) is True
    await store.put(key_prefix + "plain", "stays")
    assert len(await store.get_prefix(key_prefix + "leased/")) == 2

    took = await wait_until_gone(store, key_prefix + "leased/put", within=lease.ttl + 3)
    assert took >= lease.ttl - 1
    await wait_until_gone(store, key_prefix + "leased/created", within=1)
    assert await store.get_prefix(key_prefix) == {key_prefix + "plain": "stays"}

    # A lapsed lease can neither be renewed nor used; revoking it is harmless.
    with pytest.raises(LeaseExpired):
        await lease.refresh()
    with pytest.raises(LeaseExpired):
        await store.put(key_prefix + "leased/late", "x", lease=lease)
    with pytest.raises(LeaseExpired):
        await store.create(key_prefix + "leased/late", "x", lease=lease)
    await lease.revoke()
    assert await store.get(key_prefix + "leased/late") is None


async def test_refresh_keeps_lease_alive(store, key_prefix):
    lease = await store.lease(1)
    key = key_prefix + "services/port/alice/web/1"
    await store.put(key, "alive", lease=lease)

    deadline = time.monotonic() + 2.5 * lease.ttl
    while time.monotonic() < deadline:
        await asyncio.sleep(lease.ttl / 3)
        await lease.refresh()
        assert await store.get(key) == "alive"

    await wait_until_gone(store, key, within=lease.ttl + 3)


async def test_revoke_deletes_lease_keys_at_once(store, key_prefix):
    lease = await store.lease(30)
    await store.put_many({key_prefix + "plain": "stays"})
    for n in range(3):
        await store.put(f"{key_prefix}leased/{n}", "x", lease=lease)
    await lease.revoke()
    assert await store.get_prefix(key_prefix) == {key_prefix + "plain": "stays"}
    with pytest.raises(LeaseExpired):
        await lease.refresh()


async def test_put_without_lease_detaches_key_from_lease(store, key_prefix):
    lease = await store.lease(30)
    key = key_prefix + "services/url/alice/web"
    await store.put(key, "leased", lease=lease)
    await store.put(key, "permanent")
    await lease.refresh()
    await lease.revoke()
    assert await store.get(key) == "permanent"


async def test_lease_ttl_is_at_least_one_second(store):
    with pytest.raises(ValueError):
        await store.lease(0)


async def test_open_is_idempotent_and_store_is_an_async_context_manager(store, key_prefix):
    assert await store.open() is store
    assert await store.open() is store
    if isinstance(store, MemoryStore):  # one process's memory: a second store is another, empty store
        await store.put(key_prefix + "k", "v")
        async with MemoryStore() as other:
            assert await other.get(key_prefix + "k") is None
        return
    clone = type(store)(*_constructor_args(store))
    async with clone as opened:
        assert opened is clone
        await opened.put(key_prefix + "k", "v")
    assert await store.get(key_prefix + "k") == "v"


async def test_a_lock_is_held_once_and_given_back_by_its_holder(store, key_prefix):
    key = key_prefix + "nap/quota-locks/alice"
    assert await store.lock(key, "job1") is None
    assert await store.lock(key, "job2") == "job1"  # held: who holds it
    assert await store.get(key) == "job1"
    assert await store.unlock(key, "job2") is False  # not its lock
    assert await store.get(key) == "job1"
    assert await store.unlock(key, "job1") is True
    assert await store.get(key) is None
    assert await store.unlock(key, "job1") is False
    assert await store.lock(key, "job2") is None
    assert await store.unlock(key, "job2") is True


async def test_a_lock_is_taken_by_one_of_many_at_once(store, key_prefix):
    key = key_prefix + "nap/quota-locks/alice"
    results = await asyncio.gather(*(store.lock(key, f"job{i}") for i in range(50)))
    assert results.count(None) == 1
    winner = f"job{results.index(None)}"
    assert {r for r in results if r is not None} == {winner}
    assert await store.unlock(key, winner) is True


async def test_a_lock_of_the_same_owner_is_taken_over(store, key_prefix):
    """An earlier attempt of the job left it (here a key of a lease that would lapse only in 30 s)."""
    key = key_prefix + "nap/quota-locks/alice"
    await store.create(key, "job1", await store.lease(30))
    assert await store.lock(key, "job1") is None
    assert await store.lock(key, "job2") == "job1"
    assert await store.unlock(key, "job1") is True
    assert await store.get(key) is None


async def test_a_lock_taken_over_by_another_store_is_not_given_back_by_the_first(store, key_prefix):
    """Two attempts of one job in two processes: the older one's unlock leaves the newer one's lock."""
    if isinstance(store, MemoryStore):
        pytest.skip("one process's memory: no other store sees its locks")
    key = key_prefix + "nap/quota-locks/alice"
    async with type(store)(*_constructor_args(store)) as other:
        assert await other.lock(key, "job1") is None
        assert await store.lock(key, "job1") is None
        assert await other.unlock(key, "job1") is False
        assert await store.get(key) == "job1"
        assert await other.lock(key, "job2") == "job1"
    assert await store.get(key) == "job1"  # the other store's close gave back none of its locks
    assert await store.unlock(key, "job1") is True


async def test_closing_a_store_gives_its_locks_back(store, key_prefix):
    if isinstance(store, MemoryStore):
        pytest.skip("one process's memory: no other store sees its locks")
    key = key_prefix + "nap/quota-locks/alice"
    other = type(store)(*_constructor_args(store))
    await other.open()
    assert await other.lock(key, "job1") is None
    await other.close()
    assert await store.lock(key, "job2") is None
    assert await store.unlock(key, "job2") is True


# Holds a lock in a process of its own until killed: ``kind spec namespace key ttl``.
HOLDER = """
import asyncio, sys
from nap_orch.store.etcd import EtcdStore
from nap_orch.store.redis import RedisStore

kind, spec, namespace, key, ttl = sys.argv[1:]

async def main():
    if kind == "etcd":
        store = EtcdStore(spec, lock_ttl=int(ttl))
    else:
        store = RedisStore(spec, namespace=namespace, lock_ttl=int(ttl))
    await store.open()
    assert await store.lock(key, "job1") is None
    print("locked", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_lock_lives_as_long_as_its_holder_and_lapses_within_its_ttl_after(store, key_prefix):
    if isinstance(store, MemoryStore):
        pytest.skip("one process's memory: it dies with its locks")
    key, ttl = key_prefix + "nap/quota-locks/alice", 4  # short for the test; renewed every ttl/3
    kind = "etcd" if isinstance(store, EtcdStore) else "redis"
    args = _constructor_args(store)
    spec, namespace = args[0], args[1] if len(args) > 1 else ""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        kind,
        spec,
        namespace,
        key,
        str(ttl),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"  # type: ignore[union-attr]
        deadline = time.monotonic() + 3 * ttl  # kept alive in the background, well past its ttl
        while time.monotonic() < deadline:
            assert await store.lock(key, "job2") == "job1"
            await asyncio.sleep(0.2)
        holder.kill()  # SIGKILL: dead, nothing gives it back
        await holder.wait()
        killed = time.monotonic()
        while await store.lock(key, "job2") is not None:
            assert time.monotonic() - killed < 3 * ttl, "the dead holder's lock did not lapse"
            await asyncio.sleep(0.1)
        assert await store.unlock(key, "job2") is True
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


def _constructor_args(store: Store) -> tuple:
    if isinstance(store, EtcdStore):
        return (store.spec,)
    assert isinstance(store, RedisStore)
    return (store.redis_url, store.namespace)


def _own_server(kind: str, folder):
    return EtcdServer(folder / "etcd") if kind == "etcd" else RedisServer(folder / "redis")


def _store_on(kind: str, server) -> Store:
    return EtcdStore(server.endpoint) if kind == "etcd" else RedisStore(server.url, namespace="restart")


@pytest.mark.parametrize("kind", SERVER_STORES)
async def test_store_survives_server_restart(kind, tmp_path, request):
    if kind == "etcd":
        request.getfixturevalue("etcd_server")  # skips where etcd is not installed
    server = _own_server(kind, tmp_path)
    server.start()
    try:
        async with _store_on(kind, server) as store:
            await store.put("/services/url/alice/web", "u")

            server.stop()
            with pytest.raises(ConnectionError):
                await store.get("/services/url/alice/web")

            server.start()  # same ports; the client reconnects on its next call
            if kind == "etcd":
                assert await store.get("/services/url/alice/web") == "u"  # etcd keeps its data on disk
            else:
                assert await store.get("/services/url/alice/web") is None  # the fallback runs without persistence
            await store.put("/services/url/alice/api", "v")
            assert await store.get("/services/url/alice/api") == "v"

            # And again, without a failed call in between: the stale connection is replaced silently.
            server.restart()
            await store.put("/services/url/alice/db", "w")
            assert await store.get("/services/url/alice/db") == "w"
    finally:
        server.stop()


@pytest.mark.parametrize("kind", SERVER_STORES)
async def test_unreachable_store_raises_clear_error(kind):
    port = free_port()  # nothing listens there
    store = EtcdStore(f"127.0.0.1:{port}") if kind == "etcd" else RedisStore(f"redis://127.0.0.1:{port}/0")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"{kind} at .*127\.0\.0\.1:{port}.* is unreachable"):
        await store.open()
    with pytest.raises(ConnectionError, match="unreachable"):
        await store.get("/services/url/alice/web")
    with pytest.raises(ConnectionError, match="unreachable"):
        await store.put_many({"/a": "1", "/b": "2"})
    await store.close()
    assert time.monotonic() - start < 5


async def test_etcd_store_uses_the_first_endpoint_that_answers(etcd_server, key_prefix):
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdStore(f"{dead},http://{etcd_server.endpoint}") as store:
        await store.put(key_prefix + "k", "v")
        assert await store.get(key_prefix + "k") == "v"
        assert store.endpoint == etcd_server.address


async def test_concurrent_port_reservations_never_share_a_port(store, key_prefix):
    """The port allocator on each store: reservers racing for one host's range each get their own."""
    ports = Ports(store, (40000, 40299))
    host = "h" + key_prefix.strip("/")  # a host of this test's own: the stores are shared
    results = await asyncio.gather(*(ports.reserve(host, [f"app{j}@{i}" for i in range(40)]) for j in range(6)))
    handed = [p for r in results for p in r.ports.values()]
    assert len(handed) == 240 and len(set(handed)) == 240
    assert sorted(handed) == list(range(40000, 40240))  # the lowest ones, none skipped
    assert len(await ports.holders(host)) == 240
    late = await ports.reserve(host, [f"late@{i}" for i in range(100)])
    assert len(late.ports) == 60 and len(late.missing) == 40
    await ports.release(host, range(40000, 40300))
    assert await ports.free([host]) == 300
