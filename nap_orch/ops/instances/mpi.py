"""start_mpi: an MPI run as a master unit and one slave unit per host.

A run takes the next instance number ``r`` of its app (so runs never collide, with each other or with
common instances) and its own folder ``NAP_HOME/apps/<user>/<user>_<app>_<r>``. Units:
``<user>_<app>_mpi_master@<r>`` and ``<user>_<app>_mpi_slave@<r>-<i>`` (i = 1..hosts). They run
``nap_orch.rank`` (copied into the folder as ``.nap-mpi/rank.py``): slaves register in the folder, the
master waits for all of them, writes the hostfile from what they registered and runs mpirun. No unit
carries a credential of the platform's: the launch publishes the registrations as the seed's
``/services/mpi/<user>/<app>/<r>/slave<i>`` keys once all are in, and they are removed once the run is
seen ended (a stop, a listing of the app's instances, the app's next run).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ... import keys, rank, units
from ...config import Settings
from ...engines.base import UnitSpec
from ...errors import AppError, BadRequest, QuotaExceeded, Superseded
from ...names import InstanceName, Kind
from .. import apps, profile, quotas, tenants
from ..context import Context, Resources
from .launch import first_line, instance_dir, reserve_numbers, wait_settled, write_copy


def inside(folder: Path, relative: str, what: str) -> Path:
    """``folder/relative``, refusing paths that escape the folder."""
    if not relative or relative.startswith("/"):
        raise AppError(f"{what}: {relative!r} must be a path inside the app")
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents:
        raise AppError(f"{what}: {relative!r} escapes the app folder")
    return path


def program_argv(spec: profile.AppSpec, folder: Path, values: dict[str, str]) -> list[str]:
    """What every rank runs: the built binary (``to:`` plus ``args:``) or ``command:``; parameters are
    substituted inside each word, so a value stays one argument."""
    if spec.fields.get("from"):
        binary = inside(folder, spec.fields.get("to", ""), "to")
        extra = profile.split_command(spec.fields["args"]) if spec.fields.get("args") else []
        words = [str(binary)] + extra
    else:
        words = profile.split_command(spec.command or "")
        exe = words[0]
        if "/" in exe:
            words[0] = str(inside(folder, exe, "command") if not exe.startswith("/") else Path(exe))
        else:
            found = shutil.which(exe, path=units.instance_path(str(folder)))
            if not found:
                raise AppError(f"command: {exe!r} is not installed on this host (the instance's PATH)")
            words[0] = found
    return [profile.substitute(w, values) for w in words]


async def build(ctx: Context, spec: profile.AppSpec, folder: Path, uid: int | None) -> None:
    """Compile ``from:`` into ``to:`` with mpicc, streaming the compiler's output into the job's events.
    With ``uid``, as that tenant, in a clean environment: a source that includes ``/etc/shadow`` or the
    platform's files gets the compiler's "permission denied", not their lines in its events."""
    source = inside(folder, spec.fields["from"], "from")
    target = inside(folder, spec.fields["to"], "to")
    if not source.is_file():
        raise AppError(f"from: {spec.fields['from']!r} does not exist in the app")
    mpicc = shutil.which(ctx.settings.mpicc)
    if not mpicc:
        raise AppError(f"mpicc ({ctx.settings.mpicc}) is not installed on this host: install OpenMPI (libopenmpi-dev)")
    argv = [mpicc, "-O2", "-o", str(target), str(source)]
    await ctx.log("building: " + " ".join(argv))
    env = {"PATH": units.instance_path(str(folder)), "HOME": str(folder), "LANG": "C.UTF-8"}
    if uid is not None:
        as_tenant = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
        argv = [*as_tenant, *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=folder, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = []
    assert proc.stdout is not None  # a pipe, asked for above
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        output.append(line)
        await ctx.log(f"mpicc: {line}")
    code = await proc.wait()
    if code != 0:
        tail = "\n".join(output[-20:])
        raise AppError(f"compile error (mpicc exited with {code}):\n{tail}")
    await ctx.log(f"built {target.relative_to(folder)}")


RANK = f"{rank.FOLDER}/rank.py"  # the run's processes, in its folder


def run_env(settings: Settings, folder: Path) -> dict[str, str]:
    """The environment of the master and the slaves: no credential, only the run's settings."""
    env = {
        "PATH": units.instance_path(str(folder)),
        "HOME": str(folder),
        "NAP_MPI_WAIT_TIMEOUT": str(settings.mpi_wait_timeout),
        "NAP_MPIRUN": settings.mpirun,
        "PYTHONUNBUFFERED": "1",
    }
    if not settings.sandbox and os.geteuid() == 0:  # unsandboxed as root: OpenMPI refuses unless told twice
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def install_rank(folder: Path) -> None:
    """Put the run's program (``nap_orch.rank``, standard library only) into its folder."""
    (folder / rank.FOLDER).mkdir(exist_ok=True)
    shutil.copyfile(rank.__file__, folder / RANK)


def render_run(
    settings: Settings,
    user: str,
    app: str,
    run: int,
    hosts: int,
    folder: Path,
    argv: list[str],
    host: str | None,
    memory: int | None,
    uid: int | None,
) -> list[UnitSpec]:
    env = run_env(settings, folder)
    if host is not None:
        env["NAP_HOST"] = host
    common = ["--run", str(run), "--hosts", str(hosts)]

    def unit(name: InstanceName, role: str, argv: list[str], memory_max: int | None = None) -> units.Unit:
        """One of the run's units: all share the folder, the tenant, the settings and no restarts."""
        return units.Unit(
            name=name.name,
            description=f"nap MPI app {user}_{app} run {run}: {role}",
            argv=["python3", RANK, *argv],
            workdir=str(folder),
            env={**env, "NAP_INSTANCE": name.name, "NAP_INSTANCE_NUM": str(run)},
            memory_max=memory_max,
            tasks_max=settings.tasks_max,
            user=uid,
            group=uid,
            restart="no",
            stop_timeout=settings.stop_timeout,
        )

    master = InstanceName(user, app, Kind.MPI_MASTER, str(run))
    specs = [unit(master, "master", ["master", *common, "--", *argv], memory)]
    for i in range(1, hosts + 1):
        slave = InstanceName(user, app, Kind.MPI_SLAVE, f"{run}-{i}")
        specs.append(unit(slave, f"slave {i}", ["slave", *common, "--index", str(i)]))
    try:
        return [UnitSpec(u.name, units.render(u)) for u in specs]
    except ValueError as e:
        raise AppError(f"cannot render the run's units: {e}") from None


async def start_mpi(ctx: Context, user: str, app: str, params: dict[str, Any]) -> dict[str, Any]:
    settings, store, engine = ctx.settings, ctx.store, ctx.engine
    src = apps.require_app(settings, user, app)
    spec = apps.spec(settings, user, app)
    if spec.kind != "mpi":
        raise AppError(f"app {app!r} has no mpi.xml: use start_common")
    profile.validate(spec)
    hosts = spec.hosts
    if hosts > settings.max_mpi_hosts:
        raise AppError(f"hosts: {hosts} is above this server's maximum of {settings.max_mpi_hosts}")
    values = profile.check_values(params, spec.parameters)
    absent = profile.missing(values, spec.parameters)
    if absent:
        raise BadRequest(f"missing parameter(s): {', '.join(absent)}")
    uid = await tenants.uid_of(store, settings, user) if settings.sandbox else None
    await forget_ended_runs(ctx, user, app)
    size = await quotas.app_size(settings, user, app)
    async with quotas.held(store, user, ctx.job_id):
        [run] = await reserve_numbers(store, settings, user, app, 1, ctx.job_id, spec.memory, units=hosts + 1)
        try:
            await quotas.ensure_reserved(store, settings, user, size)
        except QuotaExceeded:
            await store.delete(keys.INSTANCE.format(user=user, app=app, n=run))
            raise
    folder = instance_dir(settings, user, app, run)
    fill = {**values, "instance": str(run), "user": user, "app": app}
    names: list[str] = []
    await ctx.log(f"MPI run {run} of {user}_{app}: 1 master + {hosts} slave(s), {hosts + 1} ranks")
    try:
        await asyncio.to_thread(write_copy, src, folder, spec, fill)
        argv = program_argv(spec, folder, fill)
        await asyncio.to_thread(install_rank, folder)
        if uid is not None:
            await asyncio.to_thread(tenants.give, folder, uid)
        if spec.fields.get("from"):
            await build(ctx, spec, folder, uid)
        await ctx.check()
        specs = render_run(settings, user, app, run, hosts, folder, argv, engine.host_for_ports(), spec.memory, uid)
        await engine.submit(specs)
        names = [s.name for s in specs]
        states = await wait_settled(ctx, names, len(names))
        slaves = await publish_slaves(ctx, user, app, run, hosts, folder)
    except Superseded:  # the newer attempt resumes what this one started: nothing to undo
        raise
    except BaseException as e:
        await ctx.log(f"rolling back run {run}: {first_line(e)}")
        if names:
            await engine.remove(names)
        await asyncio.to_thread(shutil.rmtree, folder, True)
        await store.delete(keys.INSTANCE.format(user=user, app=app, n=run))
        await store.delete_prefix(keys.MPI.format(user=user, app=app, run=run))
        raise
    return {
        "app": app,
        "run": run,
        "master": names[0],
        "slaves": names[1:],
        "ranks": hosts + 1,
        "registered": slaves,
        "folder": str(folder),
        "instances": [{"name": n, "state": states[n].state, "host": states[n].host} for n in names],
    }


async def stop_run(rt: Resources, inst: InstanceName) -> dict[str, Any]:
    """stop_app of a master (or a slave) stops the whole run."""
    run = inst.number
    members = [
        s for s in await rt.engine.instances(f"{inst.user}_{inst.app}_mpi_") if InstanceName.parse(s.name).number == run
    ]
    master = next((s for s in members if "_mpi_master@" in s.name), None)
    order = ([master] if master else []) + [s for s in members if s is not master]
    result = None
    for s in order:
        st = await rt.engine.stop(s.name)
        if s.name == inst.name:
            result = st
    await rt.store.delete_prefix(keys.MPI.format(user=inst.user, app=inst.app, run=run))
    return (result or order[0]).to_json() if order else {"name": inst.name, "state": "stopped"}


async def publish_slaves(ctx: Context, user: str, app: str, run: int, hosts: int, folder: Path) -> int:
    """Publish the slaves' registrations (``.nap-mpi/slave<i>.json``) as the seed's keys once all of them
    are in, or once the master has given up or the run has ended; how many were published."""
    deadline = time.monotonic() + ctx.settings.mpi_wait_timeout + 5
    there: dict[str, dict] = {}
    while time.monotonic() < deadline:
        there = await asyncio.to_thread(rank.registered, folder / rank.FOLDER)
        if len(there) >= hosts or (folder / rank.FOLDER / "ended").exists():
            break
        await ctx.check()
        await asyncio.sleep(0.2)
    if (folder / rank.FOLDER / "ended").exists():
        await ctx.log("the run ended before all of its slaves were published")
        return 0
    prefix = keys.MPI.format(user=user, app=app, run=run)
    await ctx.store.put_many(
        {prefix + name: json.dumps({"host": r["host"], "slots": r.get("slots", 1)}) for name, r in there.items()}
    )
    await ctx.log(f"{len(there)} of {hosts} slave(s) registered")
    return len(there)


def run_ended(settings: Settings, user: str, app: str, run: int | str) -> bool:
    """Whether the run's master has said the run is over (or its folder is gone)."""
    folder = instance_dir(settings, user, app, run) / rank.FOLDER
    return not folder.parent.exists() or (folder / "ended").exists()


async def forget_ended_runs(rt: Resources, user: str, app: str) -> None:
    """Remove the ``/services/mpi`` keys of the app's runs that have ended: the slaves have left."""
    found = await rt.store.get_prefix(keys.MPI_OF_APP.format(user=user, app=app))
    runs = {key[len(keys.MPI_OF_APP.format(user=user, app=app)) :].split("/", 1)[0] for key in found}
    for run in runs:
        if run.isdigit() and await asyncio.to_thread(run_ended, rt.settings, user, app, run):
            await rt.store.delete_prefix(keys.MPI.format(user=user, app=app, run=run))
