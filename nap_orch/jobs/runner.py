"""Runs one job inside a worker: counts attempts, moves states, turns errors into the record's reason,
and gives the domain code a ``JobContext`` to log, report progress and honour cancellation."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import Settings
from ..engines.base import Engine
from ..engines.registry import open_engine
from ..errors import Cancelled, NapError
from ..store import open_store
from ..store.base import Store
from .records import Job, JobState, JobStore

log = logging.getLogger("nap.job")


class Runtime:
    """The long-lived resources of a process (Redis job store, state store, engine), opened lazily."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs = JobStore.from_url(settings.redis_url, settings.namespace)
        self.store: Store = open_store(settings)
        self.engine: Engine = open_engine(settings)
        self._opened = False

    async def open(self) -> Runtime:
        if not self._opened:
            await self.store.open()
            await self.engine.open()
            self._opened = True
        return self

    async def close(self) -> None:
        await self.engine.close()
        await self.store.close()
        await self.jobs.close()


@dataclass
class JobContext:
    """What domain code sees of its job."""

    job: Job
    rt: Runtime
    _last_progress: float = 0.0

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def settings(self) -> Settings:
        return self.rt.settings

    @property
    def store(self) -> Store:
        return self.rt.store

    @property
    def engine(self) -> Engine:
        return self.rt.engine

    async def log(self, line: str) -> None:
        """A worker log line for this job: into its event stream and the worker's log."""
        log.info("[%s %s] %s", self.job.kind, self.job.id, line)
        await self.rt.jobs.emit(self.job, "log", {"line": line})

    async def progress(self, done: int, total: int, force: bool = False, **extra) -> None:
        """Progress of long work; throttled to a few events per second."""
        now = time.monotonic()
        if force or done >= total or now - self._last_progress >= 0.2:
            self._last_progress = now
            await self.rt.jobs.emit(self.job, "progress", {"done": done, "total": total, **extra})

    async def check(self) -> None:
        """A step boundary: raises Cancelled if the user cancelled the job."""
        if await self.rt.jobs.cancel_requested(self.job.id):
            raise Cancelled("cancelled by the user")


JobFn = Callable[..., Awaitable[dict]]


async def run_job(rt: Runtime, job_id: str, fn: JobFn, max_attempts: int) -> None:
    """Run ``fn(ctx, **job.args)`` for the job, at most once to success.

    User-facing errors (NapError) fail the job at once. Anything else is retried by raising it to
    dramatiq until ``max_attempts`` attempts (a worker killed mid-job also counts as an attempt).
    """
    await rt.open()
    jobs = rt.jobs
    try:
        job = await jobs.get(job_id)
    except NapError:
        log.warning("job %s has no record; dropping its message", job_id)
        return
    if JobState(job.state).terminal:
        log.info("job %s already %s; not running it again", job_id, job.state)
        return
    if not await jobs.start_attempt(job):
        return
    ctx = JobContext(job, rt)
    if job.attempts > 1:
        await ctx.log(f"attempt {job.attempts} (an earlier attempt did not finish)")
    try:
        await ctx.check()
        result = await fn(ctx, **job.args)
    except Cancelled as e:
        await jobs.transition(job, JobState.CANCELLED, {JobState.RUNNING}, error=e.message)
    except NapError as e:
        await jobs.transition(job, JobState.FAILED, {JobState.RUNNING}, error=e.message)
    except Exception as e:  # a bug or an infrastructure failure: maybe transient
        reason = f"{type(e).__name__}: {e}"
        log.error("job %s attempt %d failed:\n%s", job_id, job.attempts, traceback.format_exc())
        if job.attempts >= max_attempts:
            await jobs.transition(
                job, JobState.FAILED, {JobState.RUNNING}, error=f"{reason} (after {job.attempts} attempts)"
            )
            return
        await jobs.transition(
            job, JobState.QUEUED, {JobState.RUNNING}, error=f"attempt {job.attempts} failed: {reason}; retrying"
        )
        raise
    else:
        await jobs.transition(job, JobState.SUCCEEDED, {JobState.RUNNING}, result=result, error=None)
