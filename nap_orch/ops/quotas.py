"""Per-user quotas: instances in all (an MPI run counts its master and slaves), apps, disk used by the
user's apps and instance folders, and memory summed over instances (each instance's ``memory:``, or
``UNSET_MEMORY`` for one whose profile sets none).

Limits are the server's defaults (``NAP_QUOTA_*``) unless an admin set the user's own
(``nap user quota NAME instances=500 disk=20g``; kept in the state store at ``/nap/quotas/<user>``).
They are checked at submit (403 ``quota_exceeded``) and again by the job before it changes anything:
the job's count, made after its own reservation, is the one that holds when two launches are
submitted at once. What an instance writes into its folder while it runs counts at the next check; no
filesystem quota stops it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from .. import keys
from ..config import Settings
from ..errors import BadRequest, QuotaExceeded
from ..store.base import Store
from . import profile
from .apps import app_path
from .sizes import tree_bytes

FIELDS = ("instances", "apps", "disk", "memory")
SIZES = ("disk", "memory")
UNSET_MEMORY = 256 * 1024**2  # what an instance without ``memory:`` counts for


@dataclass(frozen=True)
class Amounts:
    """Limits, or what is used (bytes for disk and memory)."""

    instances: int = 0
    apps: int = 0
    disk: int = 0
    memory: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def defaults(settings: Settings) -> Amounts:
    return Amounts(
        instances=settings.quota_instances,
        apps=settings.quota_apps,
        disk=profile.parse_size(settings.quota_disk),
        memory=profile.parse_size(settings.quota_memory),
    )


async def limits(store: Store, settings: Settings, user: str) -> Amounts:
    """The user's limits: the defaults, with what an admin set for the user instead."""
    raw = await store.get(keys.QUOTA.format(user=user))
    own = json.loads(raw) if raw else {}
    return replace(defaults(settings), **{k: v for k, v in own.items() if k in FIELDS})


def parse_changes(changes: Any) -> dict[str, int | None]:
    """An admin's changes: ``{"instances": 500, "disk": "20g", "apps": null}`` (null: back to the
    default); 400 for anything else."""
    if not isinstance(changes, dict) or not changes:
        raise BadRequest(f"give at least one of {', '.join(FIELDS)}")
    out: dict[str, int | None] = {}
    for name, value in changes.items():
        if name not in FIELDS:
            raise BadRequest(f"unknown quota {str(name)[:40]!r}: the quotas are {', '.join(FIELDS)}")
        if value is None:
            out[name] = None
        elif name in SIZES and isinstance(value, str):
            out[name] = profile.parse_size(value, what=name)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**62:
            out[name] = value
        else:
            raise BadRequest(f"{name} must be a whole number from 0" + (" or a size like 20g" if name in SIZES else ""))
    return out


async def set_limits(store: Store, settings: Settings, user: str, changes: dict[str, int | None]) -> Amounts:
    key = keys.QUOTA.format(user=user)
    raw = await store.get(key)
    own = json.loads(raw) if raw else {}
    for name, value in changes.items():
        if value is None:
            own.pop(name, None)
        else:
            own[name] = value
    if own:
        await store.put(key, json.dumps(own, sort_keys=True))
    else:
        await store.delete(key)
    return await limits(store, settings, user)


def reservation(job: str, memory: int | None, units: int = 1, **more: Any) -> str:
    """The value of an instance number's reservation: what it counts for in the quotas."""
    return json.dumps({"job": job, "memory": memory, "units": units, **more})


async def usage(store: Store, settings: Settings, user: str) -> Amounts:
    """What the user uses now: reservations (instances and their memory), deployed apps, and the disk
    of the user's app and instance folders (the two reads and the folders' walk at once)."""
    reserved, urls, disk = await asyncio.gather(
        store.get_prefix(keys.INSTANCES_OF_USER.format(user=user)),
        store.get_prefix(keys.URLS_OF_USER.format(user=user)),
        asyncio.to_thread(
            lambda: (
                tree_bytes(settings.services_dir / user, allocated=True)
                + tree_bytes(settings.apps_dir / user, allocated=True)
            )
        ),
    )
    instances = memory = 0
    for value in reserved.values():
        try:
            held = json.loads(value)
        except ValueError:
            held = {}
        units = held.get("units") if isinstance(held.get("units"), int) else 1
        each = held.get("memory") if isinstance(held.get("memory"), int) else UNSET_MEMORY
        instances += units
        memory += units * each
    return Amounts(instances=instances, apps=len(urls), disk=disk, memory=memory)


def check(limit: Amounts, used: Amounts, adding: Amounts) -> None:
    """QuotaExceeded naming every quota that ``adding`` would take ``used`` over (a quota ``adding``
    does not touch is not looked at)."""
    over = []
    for name in FIELDS:
        want = getattr(adding, name)
        if want and getattr(used, name) + want > getattr(limit, name):
            over.append(
                f"{name}: {_shown(name, getattr(used, name))} used + {_shown(name, want)} more > "
                f"{_shown(name, getattr(limit, name))}"
            )
    if over:
        raise QuotaExceeded("over quota: " + "; ".join(over) + " (an admin can raise it: nap user quota)")


def within(limit: Amounts, used: Amounts, touched: tuple[str, ...] = FIELDS) -> None:
    """QuotaExceeded naming every quota of ``touched`` that ``used`` is over."""
    over = [
        f"{name}: {_shown(name, getattr(used, name))} > {_shown(name, getattr(limit, name))}"
        for name in touched
        if getattr(used, name) > getattr(limit, name)
    ]
    if over:
        raise QuotaExceeded("over quota: " + "; ".join(over) + " (an admin can raise it: nap user quota)")


async def ensure(store: Store, settings: Settings, user: str, adding: Amounts) -> None:
    """At submit: ``adding`` checked against the user's quotas now (403 ``quota_exceeded`` if over)."""
    check(await limits(store, settings, user), await usage(store, settings, user), adding)


async def ensure_within(
    store: Store, settings: Settings, user: str, touched: tuple[str, ...], less_disk: int = 0, more_apps: int = 0
) -> None:
    """In a deploy, once its files are staged (they count): the user's usage within the quotas of
    ``touched``, less the ``less_disk`` bytes it is about to free (the app's old version) and with
    ``more_apps`` it is about to add."""
    used = await usage(store, settings, user)
    after = replace(used, disk=used.disk - less_disk, apps=used.apps + more_apps)
    within(await limits(store, settings, user), after, touched)


async def ensure_reserved(store: Store, settings: Settings, user: str, more_disk: int) -> None:
    """In a launch, once its numbers are reserved (they count): instances and memory within the
    quotas, and room on disk for the ``more_disk`` bytes of copies it is about to make."""
    used = await usage(store, settings, user)
    limit = await limits(store, settings, user)
    within(limit, used, ("instances", "memory"))
    check(limit, used, Amounts(disk=more_disk))


@contextlib.asynccontextmanager
async def held(store: Store, user: str, owner: str, wait: float = 60.0) -> AsyncIterator[None]:
    """The user's quota lock, for the block: a launch reserves its numbers and counts them with no
    other launch of the user in between (else two launches at once could each see the other's
    reservations and both fail, or neither's and both pass).

    ``owner`` is the job: an earlier attempt of the same job that died holding it is taken over at
    once. The lock is the store's (``Store.lock``): one request to take it, one to give it back, and
    it lapses at most ``store.lock_ttl`` (30) seconds after its worker dies, so nothing waits for ever."""
    key = keys.QUOTA_LOCK.format(user=user)
    deadline = time.monotonic() + wait
    pause = 0.02
    while True:
        try:
            holder = await store.lock(key, owner)
        except BaseException:  # cancelled (or cut off) in flight: it may have been taken all the same
            with contextlib.suppress(Exception):
                await store.unlock(key, owner)
            raise
        if holder is None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the quota lock of {user} stayed taken for {wait:g} s")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)
    try:
        yield
    finally:
        await store.unlock(key, owner)


async def app_size(settings: Settings, user: str, app: str) -> int:
    """The disk an app's deployed version takes (0 when it is not deployed)."""
    path = app_path(settings, user, app)
    return await asyncio.to_thread(lambda: tree_bytes(path.resolve(), allocated=True) if path.is_dir() else 0)


def _shown(name: str, value: int) -> str:
    if name not in SIZES:
        return str(value)
    for unit, size in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if value >= size:
            return f"{value / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{value}b"
