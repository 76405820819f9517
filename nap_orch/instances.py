"""Common instances: start_common (reserve numbers and ports, copy, render, submit, publish ports) and
the per-instance operations (status, port, stop, start, profile).

Reservations live in the state store and are created atomically, so concurrent and bulk launches never
share an instance number or a port: ``/nap/instances/<user>/<app>/<n>`` and ``/nap/ports/<host>/<port>``.
An instance number is held while its folder or unit exists; a port while its instance exists.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import apps, keys, profile, units
from .engines.base import FAILED, RUNNING, STOPPED, InstanceStatus, UnitSpec
from .errors import AppError, BadRequest, Exhausted, NotFound
from .names import InstanceName
from .runner import JobContext, Runtime
from .store import Store

SUBMIT_BATCH = 250  # units per engine call: progress stays visible, requests stay small
SETTLED = {RUNNING, FAILED, "exited", STOPPED}


def instance_dir(settings, user: str, app: str, n: int | str) -> Path:
    return settings.apps_dir / user / f"{user}_{app}_{n}"


@dataclass
class Slot:
    """One instance being launched."""

    n: int
    name: str
    port: int | None = None
    unit: UnitSpec | None = None


# -- reservations ----------------------------------------------------------------------------------
async def reserve_numbers(store: Store, settings, user: str, app: str, count: int, owner: str) -> list[int]:
    """Reserve ``count`` fresh instance numbers (a retry of the same job gets its own back)."""
    taken = await store.get_prefix(keys.INSTANCES_OF_APP.format(user=user, app=app))
    mine, highest = [], 0
    for key, value in taken.items():
        n = int(key.rsplit("/", 1)[1])
        highest = max(highest, n)
        if _owner(value) == owner:
            mine.append(n)
    folder_root = settings.apps_dir / user
    if folder_root.is_dir():  # a folder left behind also holds its number
        for d in folder_root.glob(f"{user}_{app}_*"):
            tail = d.name[len(f"{user}_{app}_"):]
            if tail.isdigit():
                highest = max(highest, int(tail))
    mine = sorted(mine)[:count]
    nxt = highest + 1
    while len(mine) < count:
        want = list(range(nxt, nxt + count - len(mine)))
        nxt = want[-1] + 1
        value = json.dumps({"job": owner})
        got = await _gather_limited([store.create(keys.INSTANCE.format(user=user, app=app, n=n), value) for n in want])
        mine += [n for n, ok in zip(want, got) if ok]
    return sorted(mine)


async def reserve_ports(store: Store, settings, host: str, names: list[str], check_bind: bool) -> dict[str, int]:
    """Reserve one free port per instance name on ``host``; Exhausted (after releasing) if the range runs out."""
    lo, hi = settings.port_range
    taken = await store.get_prefix(keys.PORTS_OF_HOST.format(host=host))
    ports: dict[str, int] = {}
    used: set[int] = set()
    for key, value in taken.items():
        port = int(key.rsplit("/", 1)[1])
        used.add(port)
        if value in names:  # a retry of the same launch
            ports[value] = port
    want = [n for n in names if n not in ports]
    candidates = (p for p in range(lo, hi + 1) if p not in used)
    mine: list[int] = []
    while want:
        batch: list[tuple[str, int]] = []
        for name in want:
            for p in candidates:
                if not check_bind or _bindable(host, p):
                    batch.append((name, p))
                    break
            else:
                break
        if not batch:
            await release_ports(store, host, mine)
            raise Exhausted(f"port range {lo}-{hi} on host {host} is exhausted ({len(want)} more port(s) needed)")
        got = await _gather_limited([store.create(keys.PORT_RESERVATION.format(host=host, port=p), name) for name, p in batch])
        for (name, p), ok in zip(batch, got):
            if ok:
                ports[name] = p
                mine.append(p)
        want = [n for n in want if n not in ports]
    return ports


async def release_ports(store: Store, host: str, ports: list[int]) -> None:
    await store.delete_many([keys.PORT_RESERVATION.format(host=host, port=p) for p in ports])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _owner(value: str) -> str | None:
    try:
        return json.loads(value).get("job")
    except (ValueError, AttributeError):
        return None


async def _gather_limited(coros, limit: int = 64) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


# -- start_common ----------------------------------------------------------------------------------
def command_words(spec: profile.AppSpec, values: dict[str, str], platform: dict[str, str]) -> list[str]:
    """The profile's command as argv: split first, then substitute inside each word, so a value is
    always data within one word. ``{port}``/``{host}`` become the unit's ``${PORT}``/``${NAP_HOST}``."""
    fill = {**values, **platform, "port": units.PORT_REF, "host": units.HOST_REF}
    return [profile.substitute(w, fill) for w in profile.split_command(spec.command)]


def render_unit(settings, spec: profile.AppSpec, slot: Slot, folder: Path, values: dict[str, str], user: str,
                app: str, host: str | None) -> UnitSpec:
    platform = {"instance": str(slot.n), "user": user, "app": app}
    env = {"NAP_USER": user, "NAP_APP": app, "NAP_INSTANCE": str(slot.n)}
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
        restart="on-failure",
        restart_limit=settings.restart_limit,
        stop_timeout=settings.stop_timeout,
    )
    try:
        return UnitSpec(slot.name, units.render(unit))
    except ValueError as e:
        raise AppError(f"cannot render the unit of {slot.name}: {e}") from None


def write_copy(src: Path, folder: Path, spec: profile.AppSpec, values: dict[str, str]) -> None:
    """Copy the app into the instance's folder and substitute the parameters in its profile."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder, symlinks=True)
    (folder / spec.filename).write_text(profile.substitute(spec.text, values))


async def start_common(ctx: JobContext, user: str, app: str, params: dict, count: int | None = None) -> dict:
    settings, store, engine = ctx.settings, ctx.store, ctx.engine
    t0 = time.monotonic()
    src = apps.require_app(settings, user, app)
    spec = apps.spec(settings, user, app)
    if spec.kind != "common":
        raise AppError(f"app {app!r} is an MPI app: use start_mpi")
    profile.validate(spec)
    values = profile.check_values(params, spec.parameters)
    absent = profile.missing(values, spec.parameters)
    if absent:
        raise BadRequest(f"missing parameter(s): {', '.join(absent)}")
    count = count or spec.scale or 1
    if not 1 <= count <= settings.max_count:
        raise BadRequest(f"count must be from 1 to {settings.max_count}")
    owner = ctx.job.id
    host = engine.host_for_ports()
    await ctx.log(f"starting {count} instance(s) of {user}_{app} on the {engine.name} engine")
    if host is None:  # ports are reserved once the hosts are known: can they all get one?
        await engine.check_room(count)

    numbers = await reserve_numbers(store, settings, user, app, count, owner)
    slots = [Slot(n, f"{user}_{app}_common@{n}") for n in numbers]
    submitted: list[str] = []
    ports: dict[str, int] = {}
    try:
        if host is not None:
            ports = await reserve_ports(store, settings, host, [s.name for s in slots], check_bind=True)
            for s in slots:
                s.port = ports[s.name]
            # The instance's record keeps its port: start_app brings it back on the same one.
            await store.put_many({keys.INSTANCE.format(user=user, app=app, n=s.n):
                                  json.dumps({"job": owner, "host": host, "port": s.port}) for s in slots})
        await ctx.log(f"reserved instance numbers {numbers[0]}..{numbers[-1]}" + (f" and ports on {host}" if host else ""))
        await ctx.check()

        def prepare(chunk: list[Slot]) -> list[UnitSpec]:
            out = []
            for s in chunk:
                folder = instance_dir(settings, user, app, s.n)
                # Where the port and host are known only once the instance runs, the copy gets the units'
                # markers for them (no value can hold one) and the engine fills them in then.
                write_copy(src, folder, spec, {**values, "instance": str(s.n), "user": user, "app": app,
                                               "port": str(s.port) if s.port else units.PORT_REF,
                                               "host": host or units.HOST_REF})
                out.append(render_unit(settings, spec, s, folder, values, user, app, host))
            return out

        for i in range(0, len(slots), SUBMIT_BATCH):
            chunk = slots[i : i + SUBMIT_BATCH]
            specs = await asyncio.to_thread(prepare, chunk)
            await ctx.check()
            await engine.submit(specs)
            submitted += [s.name for s in specs]
            await ctx.log(f"submitted {len(submitted)}/{len(slots)} unit(s)")
            await ctx.progress(len(submitted), len(slots) * 2, phase="submitted")
        states = await wait_settled(ctx, [s.name for s in slots], len(slots))
    except BaseException as e:  # a failure, a cancel or a worker shutdown: leave nothing half-started
        await ctx.log(f"rolling back: {getattr(e, 'message', None) or type(e).__name__}")
        await rollback(ctx.rt, user, app, slots, submitted, host, ports)
        raise
    running = [s for s in slots if states[s.name].state == RUNNING]
    failed = [s for s in slots if states[s.name].state != RUNNING]
    if host is None:  # the engine reserved and published the ports on the hosts the instances run on
        published = await store.get_prefix(keys.PORTS_OF_APP.format(user=user, app=app))
        for s in running:
            raw = published.get(keys.PORT.format(user=user, app=app, n=s.n))
            s.port = json.loads(raw)["port"] if raw else None
    else:
        await publish_ports(store, user, app, running, states, host)
    seconds = round(time.monotonic() - t0, 3)
    await ctx.log(f"{len(running)} running, {len(failed)} not running, in {seconds} s")
    result = {
        "app": app,
        "count": count,
        "running": len(running),
        "failed": len(failed),
        "seconds": seconds,
        "instances": [
            {"name": s.name, "n": s.n, "host": states[s.name].host or host, "port": s.port,
             "state": states[s.name].state, "exit_code": states[s.name].exit_code}
            for s in slots
        ],
    }
    if not running:
        codes = sorted({str(states[s.name].exit_code) for s in failed})
        raise AppError(f"none of the {count} instance(s) is running (exit code {', '.join(codes)}); see get_journal of {slots[0].name}")
    return result


async def wait_settled(ctx: JobContext, names: list[str], total: int, timeout: float = 120.0) -> dict[str, InstanceStatus]:
    """Poll the engine until every instance is running or has given up; progress as they come up."""
    deadline = time.monotonic() + timeout
    states: dict[str, InstanceStatus] = {}
    pending = list(names)
    delay = 0.05
    while pending:
        got = await ctx.engine.status(pending)
        for n in pending:
            st = got.get(n)
            if st is not None and st.state in SETTLED:
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


async def publish_ports(store: Store, user: str, app: str, slots: list[Slot], states: dict[str, InstanceStatus], host: str | None) -> None:
    items = {}
    for s in slots:
        h = states[s.name].host or host
        if s.port is not None:
            items[keys.PORT.format(user=user, app=app, n=s.n)] = json.dumps({"host": h, "port": s.port})
    for i in range(0, len(items), 500):
        await store.put_many(dict(list(items.items())[i : i + 500]))


async def rollback(rt: Runtime, user: str, app: str, slots: list[Slot], submitted: list[str], host: str | None,
                   ports: dict[str, int]) -> None:
    """Undo a launch: remove units, folders, port keys and reservations. Nothing half-started stays."""
    if submitted:
        await rt.engine.remove(submitted)
    settings = rt.settings
    await asyncio.to_thread(
        lambda: [shutil.rmtree(instance_dir(settings, user, app, s.n), ignore_errors=True) for s in slots]
    )
    await rt.store.delete_many(
        [keys.PORT.format(user=user, app=app, n=s.n) for s in slots]
        + [keys.INSTANCE.format(user=user, app=app, n=s.n) for s in slots]
    )
    if host is not None and ports:
        await release_ports(rt.store, host, list(ports.values()))


# -- per-instance operations -----------------------------------------------------------------------
async def require_instance(rt: Runtime, inst: InstanceName) -> InstanceStatus:
    got = await rt.engine.status([inst.name])
    if inst.name not in got:
        raise NotFound(f"no instance {inst.name!r}")
    return got[inst.name]


async def port_of(store: Store, inst: InstanceName) -> dict | None:
    raw = await store.get(keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst))
    return json.loads(raw) if raw else None


async def instance_status(rt: Runtime, inst: InstanceName) -> dict:
    st = await require_instance(rt, inst)
    return {**st.to_json(), "port": await port_of(rt.store, inst)}


async def list_instances(rt: Runtime, user: str, app: str) -> list[dict]:
    rows = await rt.engine.list(f"{user}_{app}_")
    published = await rt.store.get_prefix(keys.PORTS_OF_APP.format(user=user, app=app))
    out = []
    for st in sorted(rows, key=lambda s: _sort_key(s.name)):
        inst = InstanceName.parse(st.name)
        port = published.get(keys.PORT.format(user=user, app=app, n=inst.inst))
        out.append({**st.to_json(), "kind": inst.kind, "instance": inst.inst, "port": json.loads(port) if port else None})
    return out


def _sort_key(name: str):
    inst = InstanceName.parse(name)
    return (inst.kind, [int(x) for x in inst.inst.split("-")])


async def get_port(rt: Runtime, inst: InstanceName) -> dict:
    await require_instance(rt, inst)
    port = await port_of(rt.store, inst)
    if port is None:
        raise NotFound(f"instance {inst.name} has no published port (is it running?)")
    return {"instance": inst.name, **port}


async def stop_instance(rt: Runtime, inst: InstanceName) -> dict:
    await require_instance(rt, inst)
    if inst.kind != "common":
        from . import mpi

        return await mpi.stop_run(rt, inst)
    st = await rt.engine.stop(inst.name)
    # The port stays reserved for this instance (start_app reuses it) but is no longer published.
    await rt.store.delete(keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst))
    return st.to_json()


async def start_instance(rt: Runtime, inst: InstanceName) -> dict:
    await require_instance(rt, inst)
    if inst.kind != "common":
        raise BadRequest("an MPI run cannot be restarted: start a new run with start_mpi")
    st = await rt.engine.start(inst.name)
    raw = await rt.store.get(keys.INSTANCE.format(user=inst.user, app=inst.app, n=inst.inst))
    record = json.loads(raw) if raw else {}
    if record.get("port"):
        await rt.store.put(keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst),
                           json.dumps({"host": st.host or record.get("host"), "port": record["port"]}))
    return st.to_json()


def instance_profile(settings, inst: InstanceName) -> dict:
    folder = instance_dir(settings, inst.user, inst.app, inst.number)  # an MPI run's units share its folder
    for filename in (profile.PROFILE, profile.MPI_XML):
        path = folder / filename
        if path.is_file():
            return {"instance": inst.name, "file": filename, "text": path.read_text(errors="replace")}
    raise NotFound(f"no instance {inst.name!r}")

