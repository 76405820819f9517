"""A launch retried after an outage: its second attempt gets back what its first one took, and the
first one's writes cannot go on behind it."""

from __future__ import annotations

import asyncio
import json

import pytest

from nap_orch import keys
from nap_orch.config import Settings
from nap_orch.ops import quotas
from nap_orch.ops.instances.launch import reserve_numbers
from nap_orch.store.base import gather_limited
from nap_orch.store.memory import MemoryStore


async def test_a_failed_gather_cancels_the_rest_before_raising():
    go = asyncio.Event()
    done: list[int] = []

    async def write(i: int) -> int:
        if i == 3:
            raise ConnectionError("redis went away")
        await go.wait()  # the others are in flight, or waiting their turn, when write 3 fails
        done.append(i)
        return i

    with pytest.raises(ConnectionError):
        await gather_limited((write(i) for i in range(20)), limit=4)
    go.set()
    for _ in range(20):  # any write still alive gets its turns now
        await asyncio.sleep(0)
    assert done == []


class LateWrites(MemoryStore):
    """A store whose first prefix read misses what an earlier attempt's writes left (they land just
    after it, as a write in flight during an outage can)."""

    def __init__(self, late: dict[str, str]):
        super().__init__()
        self.late = late

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        found = await super().get_prefix(prefix)
        for key, value in self.late.items():
            await self.put(key, value)
        self.late = {}
        return found


async def test_a_retry_takes_back_its_own_numbers_even_when_they_land_late(tmp_path):
    own = quotas.reservation("job1", None)
    late = {keys.INSTANCE.format(user="alice", app="web", n=n): own for n in range(2, 6)}
    store = LateWrites(late)
    await store.put(keys.INSTANCE.format(user="alice", app="web", n=1), own)
    numbers = await reserve_numbers(store, Settings(home=tmp_path), "alice", "web", 8, "job1")
    assert numbers == list(range(1, 9))


async def test_numbers_of_another_job_are_skipped(tmp_path):
    store = LateWrites({keys.INSTANCE.format(user="alice", app="web", n=2): quotas.reservation("job0", None)})
    numbers = await reserve_numbers(store, Settings(home=tmp_path), "alice", "web", 3, "job1")
    assert numbers == [1, 3, 4]


def held_by(job: str, start: int | None = None) -> str:
    """A reservation as a launch writes it (``start``: where its numbers began), or as an older one did."""
    return quotas.reservation(job, None) if start is None else quotas.reservation(job, None, **{"from": start})


async def instance_numbers(store: MemoryStore, job: str) -> list[int]:
    found = await store.get_prefix(keys.INSTANCES_OF_APP.format(user="alice", app="web"))
    return sorted(int(k.rsplit("/", 1)[1]) for k, v in found.items() if json.loads(v)["job"] == job)


@pytest.mark.parametrize(
    ("landed", "start"),
    [
        ({1, 65}, 1),  # CI's fault test: 1 and 65 written, 2..64 in flight when Redis died
        ({2, 65}, 1),  # the first number lost, the second written: its record says where it began
        ({1, 65}, None),  # an older record without its start: the lowest of the job's own
        (set(range(1, 201)), 1),  # all written: nothing more to reserve
    ],
)
async def test_a_retry_fills_the_numbers_its_first_attempt_left_out(tmp_path, landed, start):
    store = MemoryStore()
    for n in landed:
        await store.put(keys.INSTANCE.format(user="alice", app="web", n=n), held_by("job1", start))
    numbers = await reserve_numbers(store, Settings(home=tmp_path), "alice", "web", 200, "job1")
    assert numbers == list(range(1, 201))
    assert await instance_numbers(store, "job1") == numbers


async def test_a_retry_skips_numbers_held_meanwhile_in_its_range(tmp_path):
    """Another job's reservation and a folder left behind keep their numbers; the rest of the first
    attempt's range is filled before anything above it."""
    settings = Settings(home=tmp_path)
    store = MemoryStore()
    await store.put(keys.INSTANCE.format(user="alice", app="web", n=1), held_by("job0", 1))
    for n in (3, 9):
        await store.put(keys.INSTANCE.format(user="alice", app="web", n=n), held_by("job1", 2))
    await store.put(keys.INSTANCE.format(user="alice", app="web", n=4), held_by("job2", 4))
    (settings.apps_dir / "alice" / "alice_web_6").mkdir(parents=True)
    numbers = await reserve_numbers(store, settings, "alice", "web", 8, "job1")
    assert numbers == [2, 3, 5, 7, 8, 9, 10, 11]


async def test_a_first_attempt_starts_above_the_highest_number_held(tmp_path):
    """A removed number comes back only once no higher one is held: a new launch does not fill holes.
    Its records say where it began, for its own retries."""
    store = MemoryStore()
    for n in (1, 5):
        await store.put(keys.INSTANCE.format(user="alice", app="web", n=n), held_by("job0", 1))
    numbers = await reserve_numbers(store, Settings(home=tmp_path), "alice", "web", 3, "job1")
    assert numbers == [6, 7, 8]
    for n in numbers:
        record = json.loads(await store.get(keys.INSTANCE.format(user="alice", app="web", n=n)) or "{}")
        assert record["job"] == "job1" and record["from"] == 6


async def test_the_quota_lock_of_a_dead_attempt_of_the_same_job_is_taken_over_at_once():
    store = MemoryStore()
    dead = await store.lease(30)
    await store.create(keys.QUOTA_LOCK.format(user="alice"), "job1", dead)
    # wait=0: taken over on the first look, not after the 30 s of the dead attempt's lease
    async with quotas.held(store, "alice", "job1", wait=0):
        assert await store.get(keys.QUOTA_LOCK.format(user="alice")) == "job1"
    assert await store.get(keys.QUOTA_LOCK.format(user="alice")) is None
    # another job's lock is waited for
    await store.create(keys.QUOTA_LOCK.format(user="alice"), "job0", dead)
    with pytest.raises(TimeoutError):
        async with quotas.held(store, "alice", "job1", wait=0):
            pass
