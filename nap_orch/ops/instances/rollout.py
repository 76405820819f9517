"""Rolling an app's common instances onto a release (after a redeploy or a rollback), batch by batch.

Each batch: its instances are stopped, their folders copied afresh from the release (with the
parameters each was launched with), their units rendered and submitted again, on the same numbers and
ports; then the batch must become healthy (``running``: ``engines.health``). A batch that does not is
put back on the release it was on, the rollout stops there, and the job fails saying so. The batches
before it stay on the new release. MPI runs are not rolled: a new run takes the app's current release.

Stopped and failed instances are not started by a rollout: ``start_app`` brings them back on the
app's current release (``refresh``).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import keys
from ...engines.base import RUNNING, InstanceStatus, UnitSpec
from ...errors import AppError, BadRequest, NotFound
from ...names import InstanceName
from .. import apps, profile, releases, tenants
from ..context import Context, Resources
from .common import Slot, install_copy
from .launch import failing, first_line, wait_settled

LIVE = frozenset({"starting", "running"})


def batch_size(total: int, batch: int | None) -> int:
    """``--batch N``, else a quarter of the instances, at least 1."""
    if batch is not None:
        return max(1, batch)
    return max(1, math.floor(total * 0.25))


async def reservation(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    raw = await rt.store.get(keys.INSTANCE.format(user=inst.user, app=inst.app, n=inst.inst))
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


@dataclass
class Plan:
    """Instances to put on a release: checked (the release's folder and profile, each instance's
    parameters) before anything is stopped; ``write`` copies and renders, once they are stopped."""

    rt: Resources
    insts: list[InstanceName]
    release: int
    src: Path
    spec: profile.AppSpec
    values: dict[str, dict[str, str]]
    held: dict[str, dict[str, Any]]
    host: str | None
    uid: int | None

    async def write(self) -> list[UnitSpec]:
        """Copy the release into the instances' folders (their processes must be stopped), render their
        units, and record each one's release."""
        settings = self.rt.settings

        def prepare() -> list[UnitSpec]:
            out = []
            for inst in self.insts:
                port = self.held[inst.name].get("port")
                slot = Slot(inst.number, inst.name, port=port if isinstance(port, int) else None)
                values = self.values[inst.name]
                out.append(
                    install_copy(settings, self.src, self.spec, slot, values, inst.user, inst.app, self.host, self.uid)
                )
            return out

        specs = await asyncio.to_thread(prepare)
        await self.rt.store.put_many(
            {
                keys.INSTANCE.format(user=i.user, app=i.app, n=i.inst): json.dumps(
                    {**self.held[i.name], "release": self.release}
                )
                for i in self.insts
            }
        )
        return specs


async def plan(rt: Resources, insts: list[InstanceName], n: int) -> Plan:
    """What putting ``insts`` on release ``n`` takes; AppError (nothing touched) when the release's
    folder is gone, its profile is bad, or an instance lacks a parameter the release needs."""
    user, app = (insts[0].user, insts[0].app) if insts else ("", "")
    settings = rt.settings
    src = releases.release_dir(settings, user, app, n)
    if insts and not src.is_dir():
        raise AppError(f"release v{n} of {app!r} has no folder any more (pruned, or removed by hand)")
    spec = profile.load(src) if insts else profile.AppSpec("common", "profile", "")
    if insts:
        profile.validate(spec)
        if spec.kind != "common":
            raise AppError(f"release v{n} of {app!r} is an MPI app: its common instances can't run it")
    held = {i.name: await reservation(rt, i) for i in insts}
    values = {}
    for inst in insts:
        given = held[inst.name].get("params")
        try:
            values[inst.name] = profile.launch_values(given if isinstance(given, dict) else {}, spec.parameters)
        except BadRequest as e:
            raise AppError(f"release v{n} can't run {inst.name}: {e.message} (it was launched without)") from None
    uid = await tenants.uid_of(rt.store, settings, user) if settings.sandbox and insts else None
    return Plan(rt, insts, n, src, spec, values, held, rt.engine.host_for_ports(), uid)


async def refresh(rt: Resources, inst: InstanceName) -> bool:
    """Before a stopped common instance starts again: if it is on another release than its app's
    current one, put it on the current one (it starts with the submit). Whether it did."""
    cur = releases.current(rt.settings, inst.user, inst.app)
    if cur is None or (await reservation(rt, inst)).get("release", cur) == cur:
        return False
    ready = await plan(rt, [inst], cur)
    await rt.engine.submit(await ready.write())
    return True


async def replace(ctx: Context, ready: Plan) -> dict[str, InstanceStatus]:
    """Stop the planned instances, put them on the plan's release and start them; their states once
    settled."""
    for inst in ready.insts:
        try:
            await ctx.engine.stop(inst.name)
        except NotFound:
            continue
    specs = await ready.write()
    await ctx.engine.submit(specs)
    return await wait_settled(ctx, [s.name for s in specs], len(specs))


async def roll(ctx: Context, user: str, app: str, to: int, batch: int | None = None) -> dict[str, Any]:
    """Roll the app's live common instances that are on another release onto release ``to``."""
    if not await ctx.store.get_prefix(keys.INSTANCES_OF_APP.format(user=user, app=app)):
        return {"rolled": 0, "batches": 0}  # no instance: no need to ask the engine
    rows = await ctx.engine.instances(f"{user}_{app}_common@")
    live = sorted((InstanceName.parse(st.name) for st in rows if st.state in LIVE), key=lambda i: i.number)
    held = {i.name: await reservation(ctx, i) for i in live}
    todo = [i for i in live if held[i.name].get("release") != to]
    if not todo:
        return {"rolled": 0, "batches": 0}
    size = batch_size(len(todo), batch)
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    plans = [await plan(ctx, group, to) for group in batches]  # all checked before any is stopped
    await ctx.log(f"rolling {len(todo)} instance(s) onto v{to} in {len(batches)} batch(es) of up to {size}")
    done = 0
    for k, (group, ready) in enumerate(zip(batches, plans, strict=True), 1):
        await ctx.check()
        states = await replace(ctx, ready)
        sick = [i for i in group if states[i.name].state != RUNNING]
        if sick:
            first = states[sick[0].name]
            how = "failing" if failing(first) else first.state
            await ctx.log(
                f"batch {k}: {len(sick)} of {len(group)} not healthy ({sick[0].name}: {how}: {first.message})"
            )
            back = await _put_back(ctx, group, held)
            raise AppError(
                f"the rollout onto v{to} stopped at batch {k} of {len(batches)}: {len(sick)} of its "
                f"{len(group)} instance(s) did not become healthy ({sick[0].name} is {how}: {first.message or 'no message'}); "
                f"the batch is back on {back}; {done} instance(s) are on v{to}"
            )
        done += len(group)
        await ctx.log(f"batch {k} of {len(batches)}: {len(group)} instance(s) healthy on v{to}")
        await ctx.progress(done, len(todo), phase=f"on v{to}")
    return {"rolled": done, "batches": len(batches), "batch": size}


async def _put_back(ctx: Context, group: list[InstanceName], held: dict[str, dict[str, Any]]) -> str:
    """Put each instance of a failed batch back on the release it was on; which releases those were."""
    by_release: dict[int, list[InstanceName]] = {}
    for inst in group:
        was = held[inst.name].get("release")
        if isinstance(was, int):
            by_release.setdefault(was, []).append(inst)
    for was, insts in by_release.items():
        try:
            await replace(ctx, await plan(ctx, insts, was))
        except Exception as e:  # say it, and let the rollout's own error stand
            await ctx.log(f"could not put {len(insts)} instance(s) back on v{was}: {first_line(e)}")
    return ", ".join(f"v{n}" for n in sorted(by_release)) or "(no release recorded)"


async def rollback(ctx: Context, user: str, app: str, release: str | None, batch: int | None) -> dict[str, Any]:
    """A job: make an earlier release (``release``, else the newest one before the current) current,
    and roll the running instances onto it."""
    settings = ctx.settings
    apps.require_app(settings, user, app)
    cur = releases.current(settings, user, app)
    known = await releases.records(ctx.store, user, app)
    if release is None:
        older = [n for n in known if cur is None or n < cur]
        if not older:
            raise NotFound(f"{app!r} has no release before {f'v{cur}' if cur else 'its current one'} to roll back to")
        to = max(older)
    else:
        to = releases.parse_release(release)
        if to not in known:
            kept = ", ".join(f"v{n}" for n in sorted(known)) or "none"
            raise NotFound(f"{app!r} has no release v{to} (kept: {kept})")
    releases.point(settings, user, app, to)
    await ctx.log(f"{user}_{app}: current release v{cur} -> v{to}")
    rolled = await roll(ctx, user, app, to, batch)
    return {"app": app, "from": f"v{cur}" if cur else None, "to": f"v{to}", **rolled}
