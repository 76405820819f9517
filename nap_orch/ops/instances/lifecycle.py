"""Removing instances, app-wide stop/start/restart, scale and destroy: what ends an instance's life.

Removing an instance (a common instance, or an MPI run whole) undoes its launch, in an order that a
removal cut short can always be done again: the engine's units first (stopped and forgotten), then its
published port, its port reservation and its ``/services/mpi`` keys, its folder, and last its number's
reservation (a number is held while anything of its instance is left). An instance whose launch job is
still queued or running is not removed: the launch's own rollback would fight the removal.

Numbers: a new instance gets one more than the highest number the app holds (``launch.reserve_numbers``),
so a removed number comes back only once no higher one is held, and never while its instance exists.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ... import keys
from ...engines.base import ENDED, InstanceStatus
from ...engines.ports import Ports
from ...errors import BadRequest, Conflict, NotFound
from ...names import InstanceName, Kind
from .. import apps, releases
from ..context import Context, Resources
from . import manage
from .common import start_common
from .launch import instance_dir

# Which of these job ids are queued or running (the job store's ``active_among``).
ActiveJobs = Callable[[Iterable[str]], Awaitable[set[str]]]
BATCH = 250  # instances per engine call


def _owner(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def held_numbers(rt: Resources, user: str, app: str) -> dict[int, dict[str, Any]]:
    """The app's reserved instance numbers and their reservations (launching job, host, port)."""
    prefix = keys.INSTANCES_OF_APP.format(user=user, app=app)
    found = await rt.store.get_prefix(prefix)
    return {int(k[len(prefix) :]): _owner(v) for k, v in found.items() if k[len(prefix) :].isdigit()}


async def members(rt: Resources, user: str, app: str) -> dict[int, list[InstanceStatus]]:
    """The app's units in the engine, by instance number (an MPI run's master and slaves share one)."""
    out: dict[int, list[InstanceStatus]] = defaultdict(list)
    for st in await rt.engine.instances(f"{user}_{app}_"):
        out[InstanceName.parse(st.name).number].append(st)
    return out


async def remove_numbers(rt: Resources, user: str, app: str, numbers: Iterable[int]) -> list[str]:
    """Remove the app's instances ``numbers`` whole (see the module's docstring for the order); the
    names of the units removed. Numbers with nothing left are skipped."""
    numbers = sorted(set(numbers))
    if not numbers:
        return []
    units = await members(rt, user, app)
    reserved = await held_numbers(rt, user, app)
    names = [st.name for n in numbers for st in units.get(n, [])]
    for i in range(0, len(names), BATCH):
        await rt.engine.remove(names[i : i + BATCH])
    held = []
    for n in numbers:
        r = reserved.get(n, {})
        if isinstance(r.get("host"), str) and isinstance(r.get("port"), int):
            held.append((r["host"], r["port"], f"{user}_{app}_common@{n}"))
    await Ports(rt.store, rt.settings.port_range).release_held(held)
    await rt.store.delete_many([keys.PORT.format(user=user, app=app, n=n) for n in numbers])
    for run in await mpi_runs(rt, user, app) & set(numbers):
        await rt.store.delete_prefix(keys.MPI.format(user=user, app=app, run=run))

    def remove_folders() -> None:
        for n in numbers:
            shutil.rmtree(instance_dir(rt.settings, user, app, n), ignore_errors=True)

    await asyncio.to_thread(remove_folders)
    await rt.store.delete_many([keys.INSTANCE.format(user=user, app=app, n=n) for n in numbers])
    return names


async def mpi_runs(rt: Resources, user: str, app: str) -> set[int]:
    """The runs of the app that have ``/services/mpi`` keys."""
    prefix = keys.MPI_OF_APP.format(user=user, app=app)
    runs = {key[len(prefix) :].split("/", 1)[0] for key in await rt.store.get_prefix(prefix)}
    return {int(r) for r in runs if r.isdigit()}


async def launching(rt: Resources, active: ActiveJobs, user: str, app: str, numbers: Iterable[int]) -> dict[int, str]:
    """Those of ``numbers`` whose launch job is still queued or running, with that job."""
    reserved = await held_numbers(rt, user, app)
    jobs = {n: reserved[n].get("job") for n in numbers if isinstance(reserved.get(n, {}).get("job"), str)}
    live = await active(j for j in jobs.values() if j)
    return {n: j for n, j in jobs.items() if j in live}


async def remove_instance(rt: Resources, active: ActiveJobs, inst: InstanceName) -> dict[str, Any]:
    """``remove_app``: the instance (an MPI master or slave: its run) removed whole. 404 if nothing of
    it is left (removed already); 409 while its launch job runs."""
    n = inst.number
    busy = await launching(rt, active, inst.user, inst.app, [n])  # first: it needs no engine
    if busy:
        raise Conflict(
            f"instance {inst.name} is still being launched by job {busy[n]}: wait for it or cancel it, then remove"
        )
    units = (await members(rt, inst.user, inst.app)).get(n, [])
    reserved = (await held_numbers(rt, inst.user, inst.app)).get(n)
    folder = instance_dir(rt.settings, inst.user, inst.app, n)
    own = [st for st in units if InstanceName.parse(st.name).kind.mpi == inst.kind.mpi]
    if not own and reserved is None and not folder.exists():
        raise NotFound(f"no instance {inst.name!r} (removed already?)")
    if units and not own:
        raise NotFound(f"no instance {inst.name!r}")
    removed = await remove_numbers(rt, inst.user, inst.app, [n])
    return {"instance": inst.name, "removed": removed or [inst.name], "state": "removed"}


async def restart_instance(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    """``restart_app``: stop, then start again, on the same number, folder and port."""
    if inst.kind.mpi:
        raise BadRequest("an MPI run cannot be restarted: start a new run with start_mpi")
    await manage.stop_instance(rt, inst)
    return await manage.start_instance(rt, inst)


ACTIONS = ("stop", "start", "restart", "remove")


async def app_action(ctx: Context, user: str, app: str, action: str, active: ActiveJobs) -> dict[str, Any]:
    """A job: ``action`` (stop, start, restart or remove) on every instance of the app, with progress.
    stop and remove take MPI runs too; start and restart only common instances. Instances whose launch
    job still runs are left alone, and the result says so."""
    if action not in ACTIONS:
        raise BadRequest(f"action must be one of {', '.join(ACTIONS)}")
    units = await members(ctx, user, app)
    numbers = sorted(units)
    if action == "remove":
        numbers = sorted(set(numbers) | set(await held_numbers(ctx, user, app)))
    busy = await launching(ctx, active, user, app, numbers)
    todo = [n for n in numbers if n not in busy]
    if busy:
        await ctx.log(f"leaving {len(busy)} instance(s) alone: their launch job is still running")
    await ctx.log(f"{action}: {len(todo)} instance(s) of {user}_{app}")
    done: list[str] = []
    failed: dict[str, str] = {}
    if action == "remove":
        for i in range(0, len(todo), BATCH):
            await ctx.check()
            done += await remove_numbers(ctx, user, app, todo[i : i + BATCH])
            await ctx.progress(min(i + BATCH, len(todo)), len(todo), phase="removed")
    else:
        targets = []
        for n in todo:
            for st in units.get(n, []):
                inst = InstanceName.parse(st.name)
                if inst.kind == Kind.MPI_SLAVE or (inst.kind.mpi and action != "stop"):
                    continue  # a master's stop stops its run; runs are not started again
                if action == "stop" and st.state in ENDED:
                    continue
                if action == "start" and st.state not in ENDED:
                    continue
                targets.append(inst)
        step = {"stop": manage.stop_instance, "start": manage.start_instance, "restart": restart_instance}[action]
        for i, inst in enumerate(targets, 1):
            if i % 20 == 1:
                await ctx.check()
            try:
                await step(ctx, inst)
                done.append(inst.name)
            except (NotFound, BadRequest) as e:  # removed meanwhile, or not startable: say so, go on
                failed[inst.name] = e.message
            await ctx.progress(i, len(targets), phase=action)
    await ctx.log(f"{action}: {len(done)} done" + (f", {len(failed)} not" if failed else ""))
    return {
        "app": app,
        "action": action,
        "done": len(done),
        "instances": done,
        "failed": failed,
        "left_alone": {str(n): j for n, j in busy.items()},
    }


async def common_instances(rt: Resources, user: str, app: str) -> list[tuple[int, InstanceStatus]]:
    rows = await rt.engine.instances(f"{user}_{app}_common@")
    return sorted((InstanceName.parse(st.name).number, st) for st in rows)


LIVE = frozenset({"starting", "running"})


def scale_plan(live: list[int], count: int) -> tuple[int, list[int]]:
    """How many instances to start, and which to remove (the highest numbers first), for ``count``
    of them to be live."""
    if count >= len(live):
        return count - len(live), []
    return 0, sorted(live)[count:]


async def destroy_app(ctx: Context, user: str, app: str, active: ActiveJobs, force: bool = False) -> dict[str, Any]:
    """A job: every instance of the app removed, then its folders, versions, URL and records."""
    apps.require_app(ctx.settings, user, app)
    numbers = sorted(set(await members(ctx, user, app)) | set(await held_numbers(ctx, user, app)))
    if numbers and not force:
        raise Conflict(f"app {app!r} has {len(numbers)} instance(s): remove them first, or destroy with force")
    busy = await launching(ctx, active, user, app, numbers)
    if busy:
        raise Conflict(f"app {app!r} is being launched by job {sorted(set(busy.values()))[0]}: wait or cancel it")
    removed: list[str] = []
    for i in range(0, len(numbers), BATCH):
        await ctx.check()
        removed += await remove_numbers(ctx, user, app, numbers[i : i + BATCH])
        await ctx.progress(min(i + BATCH, len(numbers)), len(numbers), phase="removed")
    await ctx.log(f"removed {len(numbers)} instance(s)")
    await asyncio.to_thread(apps.unpublish, ctx.settings, user, app)
    await asyncio.to_thread(releases.remove_all, ctx.settings, user, app)
    await ctx.store.delete_many([keys.URL.format(user=user, app=app)])
    await ctx.store.delete_prefix(keys.RELEASES_OF_APP.format(user=user, app=app))
    await ctx.store.delete_prefix(keys.PORTS_OF_APP.format(user=user, app=app))
    await ctx.store.delete_prefix(keys.MPI_OF_APP.format(user=user, app=app))
    await ctx.log(f"destroyed {user}_{app}")
    return {"app": app, "destroyed": True, "instances_removed": len(numbers), "units_removed": len(removed)}


async def scale(
    ctx: Context, user: str, app: str, count: int, params: dict[str, Any] | None, active: ActiveJobs
) -> dict[str, Any]:
    """A job: start or remove common instances of the app until ``count`` of them are live (starting
    or running). Removes the highest numbers first; stopped and failed instances are not counted and
    are left as they are. New instances get ``params``, else those the highest live instance was
    launched with, else the profile's defaults."""
    spec = apps.spec(ctx.settings, user, app)
    if spec.kind != "common":
        raise BadRequest(f"app {app!r} is an MPI app: scale takes common apps (start_mpi starts a run)")
    if not 0 <= count <= ctx.settings.max_count:
        raise BadRequest(f"count must be a whole number from 0 to {ctx.settings.max_count}")
    rows = await common_instances(ctx, user, app)
    live = [n for n, st in rows if st.state in LIVE]
    add, remove = scale_plan(live, count)
    busy = await launching(ctx, active, user, app, remove)
    if busy:
        raise Conflict(f"instance(s) {sorted(busy)} are still being launched by job {sorted(set(busy.values()))[0]}")
    await ctx.log(f"{len(live)} live instance(s) of {user}_{app}; scaling to {count}")
    removed: list[str] = []
    for i in range(0, len(remove), BATCH):
        await ctx.check()
        removed += await remove_numbers(ctx, user, app, sorted(remove, reverse=True)[i : i + BATCH])
        await ctx.progress(min(i + BATCH, len(remove)), len(remove), phase="removed")
    removed.sort(key=manage.sort_key, reverse=True)
    if removed:
        await ctx.log(
            f"removed {len(removed)} instance(s): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}"
        )
    started: dict[str, Any] = {}
    if add:
        if params is None and live:
            last = (await held_numbers(ctx, user, app)).get(max(live), {})
            params = last.get("params") if isinstance(last.get("params"), dict) else None
        started = await start_common(ctx, user, app, params or {}, count=add)
    return {
        "app": app,
        "count": count,
        "was": len(live),
        "removed": removed,
        "started": started.get("running", 0),
        "failed": started.get("failed", 0),
        "instances": started.get("instances", []),
        "seconds": started.get("seconds", 0),
    }
