"""The dramatiq actors: a few lines each; the work is the domain code in ``nap_orch``.

Run with ``nap worker`` (or ``dramatiq workers``). Settings come from the environment.
"""

from __future__ import annotations

import dramatiq

from nap_orch.broker import POLICIES, actor_options, setup
from nap_orch.config import Settings
from nap_orch.runner import Runtime, run_job

settings = Settings.from_env()
broker = setup(settings)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """One Runtime per worker process, created on the worker's event loop."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings)
    return _runtime


@dramatiq.actor(**actor_options("deploy"))
async def deploy(job_id: str) -> None:
    from nap_orch.deploy import deploy_app

    await run_job(runtime(), job_id, deploy_app, POLICIES["deploy"].max_attempts)


@dramatiq.actor(**actor_options("start_common"))
async def start_common(job_id: str) -> None:
    from nap_orch.instances import start_common as fn

    await run_job(runtime(), job_id, fn, POLICIES["start_common"].max_attempts)


@dramatiq.actor(**actor_options("start_mpi"))
async def start_mpi(job_id: str) -> None:
    from nap_orch.mpi import start_mpi as fn

    await run_job(runtime(), job_id, fn, POLICIES["start_mpi"].max_attempts)
