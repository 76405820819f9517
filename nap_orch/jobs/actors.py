"""The dramatiq actors: a few lines each; the work is the domain code in ``nap_orch.ops``.

Importing this module sets up the broker and the process's metrics (``metrics.setup``) from the
environment's settings (dramatiq's workers import it through ``workers``: ``nap worker`` or
``dramatiq workers``).
"""

from __future__ import annotations

import dramatiq

from .. import metrics
from ..config import Settings
from ..ops.deploy import deploy_app
from ..ops.instances import lifecycle, rollout
from ..ops.instances.common import start_common as start_common_app
from ..ops.instances.mpi import start_mpi as start_mpi_app
from .broker import POLICIES, actor_options, setup
from .runner import JobContext, Runtime, run_job

settings = Settings.from_env()
broker = setup(settings)
metrics.setup(settings.metrics_path)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """One Runtime per worker process, created on the worker's event loop."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings)
    return _runtime


@dramatiq.actor(**actor_options("deploy"))
async def deploy(job_id: str) -> None:
    await run_job(runtime(), job_id, deploy_app, POLICIES["deploy"].max_attempts)


@dramatiq.actor(**actor_options("start_common"))
async def start_common(job_id: str) -> None:
    await run_job(runtime(), job_id, start_common_app, POLICIES["start_common"].max_attempts)


@dramatiq.actor(**actor_options("start_mpi"))
async def start_mpi(job_id: str) -> None:
    await run_job(runtime(), job_id, start_mpi_app, POLICIES["start_mpi"].max_attempts)


@dramatiq.actor(**actor_options("app_action"))
async def app_action(job_id: str) -> None:
    async def fn(ctx: JobContext, **args) -> dict:
        return await lifecycle.app_action(ctx, active=ctx.rt.jobs.active_among, **args)

    await run_job(runtime(), job_id, fn, POLICIES["app_action"].max_attempts)


@dramatiq.actor(**actor_options("scale"))
async def scale(job_id: str) -> None:
    async def fn(ctx: JobContext, **args) -> dict:
        return await lifecycle.scale(ctx, active=ctx.rt.jobs.active_among, **args)

    await run_job(runtime(), job_id, fn, POLICIES["scale"].max_attempts)


@dramatiq.actor(**actor_options("rollback"))
async def rollback(job_id: str) -> None:
    await run_job(runtime(), job_id, rollout.rollback, POLICIES["rollback"].max_attempts)


@dramatiq.actor(**actor_options("destroy"))
async def destroy(job_id: str) -> None:
    async def fn(ctx: JobContext, **args) -> dict:
        return await lifecycle.destroy_app(ctx, active=ctx.rt.jobs.active_among, **args)

    await run_job(runtime(), job_id, fn, POLICIES["destroy"].max_attempts)
