"""What users do with instances, common or MPI: status, list, port, stop, start, profile."""

from __future__ import annotations

import json
from typing import Any

from ... import keys
from ...config import Settings
from ...engines.base import RUNNING, InstanceStatus
from ...errors import BadRequest, NotFound
from ...names import MPI_XML, PROFILE, InstanceName
from ...store.base import Store
from ..context import Resources
from . import mpi, rollout
from .launch import instance_dir


async def require_instance(rt: Resources, inst: InstanceName) -> InstanceStatus:
    got = await rt.engine.status([inst.name])
    if inst.name not in got:
        raise NotFound(f"no instance {inst.name!r}")
    return got[inst.name]


async def port_of(store: Store, inst: InstanceName) -> dict[str, Any] | None:
    raw = await store.get(keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst))
    return json.loads(raw) if raw else None


async def instance_status(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    st = await require_instance(rt, inst)
    return {**st.to_json(), "port": await port_of(rt.store, inst)}


async def list_instances(rt: Resources, user: str, app: str) -> list[dict[str, Any]]:
    rows = await rt.engine.instances(f"{user}_{app}_")
    if any(InstanceName.parse(st.name).kind.mpi for st in rows):
        await mpi.forget_ended_runs(rt, user, app)
    published = await rt.store.get_prefix(keys.PORTS_OF_APP.format(user=user, app=app))
    out = []
    for st in sorted(rows, key=lambda s: sort_key(s.name)):
        inst = InstanceName.parse(st.name)
        port = published.get(keys.PORT.format(user=user, app=app, n=inst.inst))
        out.append(
            {**st.to_json(), "kind": inst.kind, "instance": inst.inst, "port": json.loads(port) if port else None}
        )
    return out


def sort_key(name: str):
    inst = InstanceName.parse(name)
    return (inst.kind, [int(x) for x in inst.inst.split("-")])


async def get_port(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    """Where a running instance listens; 404 for one that is starting, stopped or failed (a port it
    does not answer on is no answer)."""
    st = await require_instance(rt, inst)
    if st.state != RUNNING:
        raise NotFound(f"instance {inst.name} is {st.state}: it has a port only while running")
    port = await port_of(rt.store, inst)
    if port is None:
        raise NotFound(f"instance {inst.name} has no published port (is it running?)")
    return {"instance": inst.name, **port}


async def stop_instance(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    await require_instance(rt, inst)
    if inst.kind.mpi:
        return await mpi.stop_run(rt, inst)
    st = await rt.engine.stop(inst.name)
    # The port stays reserved for this instance (start_app reuses it) but is no longer published.
    await rt.store.delete(keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst))
    return st.to_json()


async def start_instance(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    await require_instance(rt, inst)
    if inst.kind.mpi:
        raise BadRequest("an MPI run cannot be restarted: start a new run with start_mpi")
    if await rollout.refresh(rt, inst):  # it was on an older release: it starts on the current one
        st = (await rt.engine.status([inst.name]))[inst.name]
    else:
        st = await rt.engine.start(inst.name)
    raw = await rt.store.get(keys.INSTANCE.format(user=inst.user, app=inst.app, n=inst.inst))
    record = json.loads(raw) if raw else {}
    if record.get("port"):
        await rt.store.put(
            keys.PORT.format(user=inst.user, app=inst.app, n=inst.inst),
            json.dumps({"host": st.host or record.get("host"), "port": record["port"]}),
        )
    return st.to_json()


def instance_profile(settings: Settings, inst: InstanceName) -> dict[str, str]:
    folder = instance_dir(settings, inst.user, inst.app, inst.number)  # an MPI run's units share its folder
    for filename in (PROFILE, MPI_XML):
        path = folder / filename
        if path.is_file():
            return {"instance": inst.name, "file": filename, "text": path.read_text(errors="replace")}
    raise NotFound(f"no instance {inst.name!r}")
