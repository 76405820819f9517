"""What launching instances takes, common or MPI: reserved instance numbers, the instance's own folder
(a copy of the app with its parameters substituted), and waiting for the engine to settle them.

Reservations live in the state store and are created atomically, so concurrent and bulk launches never
share an instance number: ``/nap/instances/<user>/<app>/<n>`` (value: ``{"job": <the launching job>}``,
plus the port where it is known). A number is held while its folder or unit exists. Ports are the
engines' port allocator's (``engines.ports``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ... import keys
from ...config import Settings
from ...engines.base import ENDED, RUNNING, STARTING, InstanceStatus
from ...store.base import Store
from .. import profile, quotas
from ..context import Context

SETTLED = ENDED | {RUNNING}


FAILING_RESTARTS = 2  # restarts before it was ever healthy that make a starting instance failing


def failing(st: InstanceStatus) -> bool:
    """Started, but not healthy: it has already had to be restarted twice (a crash loop, a failing
    check). Once is not enough: a job lost with its node, then running, is not failing."""
    return st.state == STARTING and st.restarts >= FAILING_RESTARTS


def first_line(error: BaseException) -> str:
    """What a log line says of the error that stops a launch: its message's first line (a compile
    error's compiler output is in the job's log already, and in its error once)."""
    message = getattr(error, "message", None) or type(error).__name__
    return message.splitlines()[0] if message.strip() else message


def instance_dir(settings: Settings, user: str, app: str, n: int | str) -> Path:
    return settings.apps_dir / user / f"{user}_{app}_{n}"


async def reserve_numbers(
    store: Store,
    settings: Settings,
    user: str,
    app: str,
    count: int,
    owner: str,
    memory: int | None = None,
    units: int = 1,
    **more: Any,
) -> list[int]:
    """Reserve ``count`` fresh instance numbers (a retry of the same job gets its own back); each
    records what it counts for in the quotas (``units`` instances of ``memory`` bytes each), and
    ``more`` (a common instance's parameters, which scale and a rollout launch it with again).

    A launch's numbers start one above the highest number the app holds, and each of its reservations
    records that start (``"from"``). A retry starts where its first attempt did: the numbers from there
    up that nothing holds are taken before any above the highest, so an attempt cut short with some of
    its numbers written and others not (a Redis killed with 1 and 65 written, 2..64 in flight) gets
    1..N back on its retry, not 1, 65..263."""
    taken = await store.get_prefix(keys.INSTANCES_OF_APP.format(user=user, app=app))
    held: set[int] = set()
    mine: list[int] = []
    start: int | None = None
    for key, value in taken.items():
        n = int(key.rsplit("/", 1)[1])
        held.add(n)
        record = _record(value)
        if record.get("job") == owner:
            mine.append(n)
            first = record.get("from")
            first = first if isinstance(first, int) and 0 < first <= n else n
            start = first if start is None else min(start, first)
    folder_root = settings.apps_dir / user
    if folder_root.is_dir():  # a folder left behind also holds its number
        for d in folder_root.glob(f"{user}_{app}_*"):
            tail = d.name[len(f"{user}_{app}_") :]
            if tail.isdigit():
                held.add(int(tail))
    mine = sorted(mine)[:count]
    if start is None:  # a first attempt, or a retry whose first attempt wrote nothing
        start = max(held, default=0) + 1
    value = quotas.reservation(owner, memory, units, **more, **{"from": start})
    nxt = start
    while len(mine) < count:
        want: list[int] = []
        while len(want) < count - len(mine):
            if nxt not in held:
                want.append(nxt)
            nxt += 1
        got = await store.create_many([(keys.INSTANCE.format(user=user, app=app, n=n), value) for n in want])
        mine += [n for n, ok in zip(want, got) if ok]
        # A number taken meanwhile may be this job's own (an earlier attempt's write that landed late).
        lost = [n for n, ok in zip(want, got) if not ok]
        found = await store.get_many([keys.INSTANCE.format(user=user, app=app, n=n) for n in lost])
        mine += [n for n, v in zip(lost, found) if v is not None and _owner(v) == owner]
    return sorted(mine)


def _record(value: str) -> dict[str, Any]:
    try:
        record = json.loads(value)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _owner(value: str) -> str | None:
    return _record(value).get("job")


def write_copy(src: Path, folder: Path, spec: profile.AppSpec, values: dict[str, str]) -> None:
    """Copy the app into the instance's folder and substitute the parameters in its profile."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder, symlinks=True)
    (folder / spec.filename).write_text(profile.substitute(spec.text, values))


async def wait_settled(ctx: Context, names: list[str], total: int, timeout: float = 120.0) -> dict[str, InstanceStatus]:
    """Poll the engine until every instance is running or has given up; progress as they come up."""
    deadline = time.monotonic() + timeout
    states: dict[str, InstanceStatus] = {}
    pending = list(names)
    delay = 0.05
    while pending:
        got = await ctx.engine.status(pending)
        for n in pending:
            st = got.get(n)
            if st is not None and (st.state in SETTLED or failing(st)):
                states[n] = st
        pending = [n for n in pending if n not in states]
        await ctx.progress(total + len(states), total * 2, phase="running")
        if not pending:
            break
        if time.monotonic() > deadline:
            for n in pending:
                states[n] = got.get(n) or InstanceStatus(n, "unknown")
            break
        await ctx.check()
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    return states
