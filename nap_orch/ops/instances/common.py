"""start_common: reserve numbers and ports, copy, render, submit, publish ports; undo all of it when
the launch fails or is cancelled."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import keys, units
from ...config import Settings
from ...engines.base import ENDED, RUNNING, InstanceStatus, UnitSpec
from ...engines.ports import Ports, bindable
from ...errors import AppError, BadRequest, EngineError, Exhausted, QuotaExceeded, Superseded
from ...store.base import Store
from .. import apps, profile, quotas, releases, tenants
from ..context import Context
from .launch import failing, first_line, instance_dir, reserve_numbers, wait_settled, write_copy

SUBMIT_BATCH = 250  # units per engine call: progress stays visible, requests stay small


@dataclass
class Slot:
    """One instance being launched."""

    n: int
    name: str
    port: int | None = None
    unit: UnitSpec | None = None


def command_words(spec: profile.AppSpec, values: dict[str, str], platform: dict[str, str]) -> list[str]:
    """The profile's command as argv: split first, then substitute inside each word, so a value is
    always data within one word. ``{port}``/``{host}`` become the unit's ``${PORT}``/``${NAP_HOST}``."""
    fill = {**values, **platform, "port": units.PORT_REF, "host": units.HOST_REF}
    return [profile.substitute(w, fill) for w in profile.split_command(spec.command or "")]


def render_unit(
    settings: Settings,
    spec: profile.AppSpec,
    slot: Slot,
    folder: Path,
    values: dict[str, str],
    user: str,
    app: str,
    host: str | None,
    uid: int | None,
) -> UnitSpec:
    platform = {"instance": str(slot.n), "user": user, "app": app}
    env = {
        "PATH": units.instance_path(str(folder)),
        "HOME": str(folder),
        "NAP_USER": user,
        "NAP_APP": app,
        "NAP_INSTANCE": slot.name,  # alice_web_common@3
        "NAP_INSTANCE_NUM": str(slot.n),  # 3, as {instance} in the profile
    }
    if slot.port is not None:
        env["PORT"] = str(slot.port)
    if host is not None:
        env["NAP_HOST"] = host
    unit = units.Unit(
        name=slot.name,
        description=f"nap app {user}_{app} instance {slot.n}",
        argv=command_words(spec, values, platform),
        workdir=str(folder),
        env=env,
        memory_max=spec.memory,
        tasks_max=settings.tasks_max,
        user=uid,
        group=uid,
        restart="on-failure",
        restart_limit=settings.restart_limit,
        stop_timeout=settings.stop_timeout,
        min_healthy=settings.min_healthy,
        **spec.health,
    )
    try:
        return UnitSpec(slot.name, units.render(unit))
    except ValueError as e:
        raise AppError(f"cannot render the unit of {slot.name}: {e}") from None


def install_copy(
    settings: Settings,
    src: Path,
    spec: profile.AppSpec,
    slot: Slot,
    values: dict[str, str],
    user: str,
    app: str,
    host: str | None,
    uid: int | None,
) -> UnitSpec:
    """Write the instance's folder (a copy of ``src`` with its parameters substituted, given to its
    tenant) and render its unit. Where the port and host are known only once the instance runs, the copy
    gets the units' markers for them (no value can hold one) and the engine fills them in then."""
    folder = instance_dir(settings, user, app, slot.n)
    filled = {
        **values,
        "instance": str(slot.n),
        "user": user,
        "app": app,
        "port": str(slot.port) if slot.port else units.PORT_REF,
        "host": host or units.HOST_REF,
    }
    write_copy(src, folder, spec, filled)
    if uid is not None:
        tenants.give(folder, uid)
    return render_unit(settings, spec, slot, folder, values, user, app, host, uid)


def source(
    settings: Settings, user: str, app: str, params: dict[str, Any]
) -> tuple[int | None, Path, profile.AppSpec, dict[str, str]]:
    """What a launch copies: the app's current release, its folder (the release's own: a redeploy meanwhile
    changes nothing), its profile (checked) and the launch's parameter values for it."""
    src = apps.require_app(settings, user, app)
    release = releases.current(settings, user, app)
    if release is not None:
        src = releases.release_dir(settings, user, app, release)
    spec = profile.load(src)
    if spec.kind != "common":
        raise AppError(f"app {app!r} is an MPI app: use start_mpi")
    profile.validate(spec)
    values = profile.check_values(params, spec.parameters)
    absent = profile.missing(values, spec.parameters)
    if absent:
        raise BadRequest(f"missing parameter(s): {', '.join(absent)}")
    return release, src, spec, values


async def start_common(
    ctx: Context, user: str, app: str, params: dict[str, Any], count: int | None = None
) -> dict[str, Any]:
    settings, store, engine = ctx.settings, ctx.store, ctx.engine
    t0 = time.monotonic()
    release, src, spec, values = source(settings, user, app, params)
    count = count or spec.scale or 1
    if not 1 <= count <= settings.max_count:
        raise BadRequest(f"count must be from 1 to {settings.max_count}")
    owner = ctx.job_id
    host = engine.host_for_ports()
    await ctx.log(f"starting {count} instance(s) of {user}_{app} on the {engine.name} engine")
    if host is None:  # ports are reserved once the hosts are known: can they all get one?
        await engine.check_room(count)

    uid = await tenants.uid_of(store, settings, user) if settings.sandbox else None
    copies = await quotas.app_size(settings, user, app) * count
    async with quotas.held(store, user, owner):  # of two launches at once, the second counts the first's
        # The release again, under the lock: a deploy that held it may have made another one current,
        # and its rollout, which looks for the app's instances once it has let go, may find these not
        # running yet and leave them on the release they would have been copied from.
        if releases.current(settings, user, app) != release:
            release, src, spec, values = source(settings, user, app, params)
            copies = await quotas.app_size(settings, user, app) * count
        numbers = await reserve_numbers(
            store, settings, user, app, count, owner, spec.memory, params=values, release=release
        )
        try:
            await quotas.ensure_reserved(store, settings, user, copies)
        except QuotaExceeded:
            await store.delete_many([keys.INSTANCE.format(user=user, app=app, n=n) for n in numbers])
            raise
    slots = [Slot(n, f"{user}_{app}_common@{n}") for n in numbers]
    submitted: list[str] = []
    ports: dict[str, int] = {}
    try:
        if host is not None:
            ports = await reserve_ports(Ports(store, settings.port_range), host, [s.name for s in slots])
            for s in slots:
                s.port = ports[s.name]
            # The instance's record keeps its port: start_app brings it back on the same one.
            await store.put_many(
                {
                    keys.INSTANCE.format(user=user, app=app, n=s.n): quotas.reservation(
                        owner, spec.memory, host=host, port=s.port, params=values, release=release
                    )
                    for s in slots
                }
            )
        await ctx.log(
            f"reserved instance numbers {numbers[0]}..{numbers[-1]}" + (f" and ports on {host}" if host else "")
        )
        # the true total at once: the first batch of folders takes a while to copy
        await ctx.progress(0, len(slots) * 2, phase="submitted", force=True)
        await ctx.check()

        def prepare(chunk: list[Slot]) -> list[UnitSpec]:
            return [install_copy(settings, src, spec, s, values, user, app, host, uid) for s in chunk]

        for i in range(0, len(slots), SUBMIT_BATCH):
            chunk = slots[i : i + SUBMIT_BATCH]
            specs = await asyncio.to_thread(prepare, chunk)
            await ctx.check()
            await engine.submit(specs)
            submitted += [s.name for s in specs]
            await ctx.log(f"submitted {len(submitted)}/{len(slots)} unit(s)")
            await ctx.progress(len(submitted), len(slots) * 2, phase="submitted")
        states = await wait_settled(ctx, [s.name for s in slots], len(slots))
    except Superseded:  # the newer attempt resumes what this one started: nothing to undo
        raise
    except BaseException as e:  # a failure, a cancel or a worker shutdown: leave nothing half-started
        await ctx.log(f"rolling back: {first_line(e)}")
        await rollback(ctx, user, app, slots, submitted, host, ports)
        raise
    running = [s for s in slots if states[s.name].state == RUNNING]
    failed = [s for s in slots if states[s.name].state != RUNNING]
    if host is None:  # the engine reserved and published the ports on the hosts the instances run on
        published = await store.get_prefix(keys.PORTS_OF_APP.format(user=user, app=app))
        for s in running:
            raw = published.get(keys.PORT.format(user=user, app=app, n=s.n))
            s.port = json.loads(raw)["port"] if raw else None
    else:  # those still restarting too: they may yet become healthy
        await publish_ports(store, user, app, [s for s in slots if states[s.name].state not in ENDED], states, host)
    seconds = round(time.monotonic() - t0, 3)
    await ctx.log(f"{len(running)} running, {len(failed)} not running, in {seconds} s")
    for s in failed[:10]:
        st = states[s.name]
        await ctx.log(f"{s.name} is {'failing' if failing(st) else st.state}: {st.message or 'no message'}")
    result = {
        "app": app,
        "count": count,
        "running": len(running),
        "failed": len(failed),
        "seconds": seconds,
        "instances": [
            {
                "name": s.name,
                "n": s.n,
                "host": states[s.name].host or host,
                "port": s.port,
                "state": states[s.name].state,
                "failing": failing(states[s.name]),
                "exit_code": states[s.name].exit_code,
                "message": states[s.name].message,
            }
            for s in slots
        ],
    }
    if not running:
        codes = sorted({str(states[s.name].exit_code) for s in failed})
        raise AppError(
            f"none of the {count} instance(s) is running (exit code {', '.join(codes)}); see get_journal of {slots[0].name}"
        )
    return result


async def reserve_ports(ports: Ports, host: str, names: list[str]) -> dict[str, int]:
    """A port on ``host`` (free on this machine right now) for each instance, or ``Exhausted`` with
    nothing reserved."""
    got = await ports.reserve(host, names, usable=bindable(host))
    if got.missing:
        await ports.release(host, got.fresh.values())
        lo, hi = ports.range
        raise Exhausted(f"port range {lo}-{hi} on host {host} is exhausted ({len(got.missing)} more port(s) needed)")
    return got.ports


async def publish_ports(
    store: Store, user: str, app: str, slots: list[Slot], states: dict[str, InstanceStatus], host: str | None
) -> None:
    items = {}
    for s in slots:
        h = states[s.name].host or host
        if s.port is not None:
            items[keys.PORT.format(user=user, app=app, n=s.n)] = json.dumps({"host": h, "port": s.port})
    for i in range(0, len(items), 500):
        await store.put_many(dict(list(items.items())[i : i + 500]))


async def rollback(
    ctx: Context, user: str, app: str, slots: list[Slot], submitted: list[str], host: str | None, ports: dict[str, int]
) -> None:
    """Undo a launch: remove units, folders, port keys and reservations. Nothing half-started stays;
    units the engine could not remove keep their folders, numbers and ports (nothing reuses them), and
    stay listed with their state."""
    if submitted:
        try:
            await ctx.engine.remove(submitted)
        except EngineError as e:
            await ctx.log(
                f"could not remove the {len(submitted)} unit(s) submitted so far ({e.message}): they keep "
                "their numbers and ports, and list_instances shows them"
            )
            return
    settings = ctx.settings

    def remove_folders() -> None:
        for s in slots:
            shutil.rmtree(instance_dir(settings, user, app, s.n), ignore_errors=True)

    await asyncio.to_thread(remove_folders)
    await ctx.store.delete_many(
        [keys.PORT.format(user=user, app=app, n=s.n) for s in slots]
        + [keys.INSTANCE.format(user=user, app=app, n=s.n) for s in slots]
    )
    if host is not None and ports:
        await Ports(ctx.store, settings.port_range).release(host, ports.values())
