"""Quotas (ops.quotas): the arithmetic, the admin's changes and what a user's reservations count for,
with the in-process store and real folders."""

from __future__ import annotations

import pytest

from nap_orch import keys
from nap_orch.config import Settings
from nap_orch.errors import BadRequest, QuotaExceeded
from nap_orch.ops import quotas
from nap_orch.ops.quotas import Amounts
from nap_orch.store.memory import MemoryStore

MiB = 1024**2


def test_check_names_every_quota_the_addition_would_exceed():
    limit = Amounts(instances=10, apps=2, disk=100 * MiB, memory=1024 * MiB)
    used = Amounts(instances=8, apps=2, disk=10 * MiB, memory=512 * MiB)
    quotas.check(limit, used, Amounts(instances=2, memory=512 * MiB))  # exactly at the limits: fine
    with pytest.raises(QuotaExceeded) as e:
        quotas.check(limit, used, Amounts(instances=3, memory=600 * MiB, disk=1))
    assert e.value.status == 403 and e.value.code == "quota_exceeded"
    assert "instances: 8 used + 3 more > 10" in e.value.message and "memory: 512m used" in e.value.message
    assert "disk" not in e.value.message  # 10m + 1 byte is within 100m
    quotas.check(limit, used, Amounts())  # apps is at its limit but nothing adds one


def test_within_looks_only_at_the_quotas_touched():
    limit = Amounts(instances=10, apps=2, disk=100, memory=100)
    quotas.within(limit, Amounts(instances=11, apps=2), ("apps", "disk"))
    with pytest.raises(QuotaExceeded, match=r"instances: 11 > 10"):
        quotas.within(limit, Amounts(instances=11), ("instances",))


def test_an_admins_changes_are_whole_numbers_or_sizes_and_null_resets():
    assert quotas.parse_changes({"instances": 5, "disk": "20g", "memory": 1024, "apps": None}) == {
        "instances": 5,
        "disk": 20 * 1024**3,
        "memory": 1024,
        "apps": None,
    }
    for bad in ({}, [], {"cpu": 1}, {"instances": -1}, {"instances": True}, {"instances": "5"}, {"disk": "lots"}):
        with pytest.raises(BadRequest):
            quotas.parse_changes(bad)


async def test_limits_usage_and_what_reservations_count_for(tmp_path):
    settings = Settings(home=tmp_path, quota_instances=100, quota_memory="1g")
    store = MemoryStore()
    await store.open()
    assert await quotas.limits(store, settings, "alice") == Amounts(100, 100, 50 * 1024**3, 1024**3)
    assert (await quotas.set_limits(store, settings, "alice", {"instances": 7})).instances == 7
    assert (await quotas.set_limits(store, settings, "alice", {"instances": None})).instances == 100
    assert await store.get(keys.QUOTA.format(user="alice")) is None  # nothing of its own left
    await store.put(keys.INSTANCE.format(user="alice", app="web", n=1), quotas.reservation("j1", 64 * MiB))
    await store.put(keys.INSTANCE.format(user="alice", app="web", n=2), '{"job": "j0"}')  # from before quotas
    await store.put(keys.INSTANCE.format(user="alice", app="hpc", n=1), quotas.reservation("j2", 32 * MiB, 3))
    await store.put(keys.INSTANCE.format(user="bob", app="web", n=1), quotas.reservation("j3", 1024 * MiB))
    await store.put(keys.URL.format(user="alice", app="web"), "https://example.org/web.tgz")
    folder = settings.apps_dir / "alice" / "alice_web_1"
    folder.mkdir(parents=True)
    (folder / "data").write_bytes(b"x" * 100_000)
    used = await quotas.usage(store, settings, "alice")
    assert used.instances == 1 + 1 + 3 and used.apps == 1
    assert used.memory == 64 * MiB + quotas.UNSET_MEMORY + 3 * 32 * MiB
    assert 100_000 <= used.disk < 200_000
    await store.close()
