"""The port allocator (``engines.ports``): the pure choice, and reservations in the in-memory store.

The same reservations run against etcd and Redis in tests/integration/test_store.py."""

from __future__ import annotations

import asyncio
import socket

from nap_orch.engines.ports import Ports, bindable, choose
from nap_orch.store.memory import MemoryStore


def test_choose_takes_the_lowest_free_ports_in_order():
    got, missing = choose(["a", "b", "c"], {10, 12}, (10, 15))
    assert got == {"a": 11, "b": 13, "c": 14} and missing == []


def test_choose_honours_a_free_preference_and_skips_a_taken_or_outside_one():
    taken = {10}
    got, missing = choose(["a", "b", "c"], taken, (10, 20), prefer={"a": 15, "b": 10, "c": 99})
    assert got == {"a": 15, "b": 11, "c": 12} and missing == []
    assert taken == {10, 11, 12, 15}  # updated with what was chosen


def test_choose_names_what_is_left_when_the_range_runs_out():
    got, missing = choose(["a", "b", "c"], {1}, (1, 3))
    assert got == {"a": 2, "b": 3} and missing == ["c"]


def test_choose_skips_ports_that_are_not_usable():
    got, _ = choose(["a", "b"], set(), (1, 6), prefer={"a": 2}, usable=lambda p: p % 2 == 1)
    assert got == {"a": 1, "b": 3}


async def test_reserve_gives_distinct_ports_and_is_idempotent_for_their_holders():
    ports = Ports(MemoryStore(), (20000, 20009))
    first = await ports.reserve("h", ["x@1", "x@2"])
    assert first.ports == first.fresh == {"x@1": 20000, "x@2": 20001}
    again = await ports.reserve("h", ["x@1", "x@2", "x@3"])
    assert again.ports == {"x@1": 20000, "x@2": 20001, "x@3": 20002}
    assert again.fresh == {"x@3": 20002}
    assert await ports.holders("h") == {20000: "x@1", 20001: "x@2", 20002: "x@3"}


async def test_concurrent_reservations_never_share_a_port():
    ports = Ports(MemoryStore(), (30000, 30999))
    results = await asyncio.gather(*(ports.reserve("h", [f"app{j}@{i}" for i in range(50)]) for j in range(8)))
    handed = [p for r in results for p in r.ports.values()]
    assert len(handed) == 400 and len(set(handed)) == 400
    assert all(not r.missing for r in results)
    assert len(await ports.holders("h")) == 400


async def test_concurrent_reservations_past_the_range_leave_the_rest_missing():
    ports = Ports(MemoryStore(), (1, 30))
    results = await asyncio.gather(*(ports.reserve("h", [f"a{j}@{i}" for i in range(10)]) for j in range(5)))
    assert sum(len(r.ports) for r in results) == 30
    assert sum(len(r.missing) for r in results) == 20
    handed = [p for r in results for p in r.ports.values()]
    assert len(set(handed)) == 30


async def test_hosts_of_one_address_share_their_ports():
    ports = Ports(MemoryStore(), (1, 4))
    await ports.reserve("n1", ["a"])
    got = await ports.reserve("n2", ["b", "c"], siblings=["n1"])
    assert got.ports == {"b": 2, "c": 3}
    assert await ports.free(["n1", "n2"]) == 1
    assert await ports.free(["n3"]) == 4


async def test_release_held_drops_only_what_its_holder_still_holds():
    store = MemoryStore()
    ports = Ports(store, (1, 9))
    await ports.reserve("h", ["a", "b"])
    await ports.release("h", [1])
    await ports.reserve("h", ["c"])  # c gets port 1, which a held before
    await ports.release_held([("h", 1, "a"), ("h", 2, "b")])
    assert await ports.holders("h") == {1: "c"}


def test_bindable_sees_a_port_someone_listens_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert bindable("127.0.0.1")(busy) is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert bindable("127.0.0.1")(free) is True
