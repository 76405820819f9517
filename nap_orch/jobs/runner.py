"""Runs one job inside a worker: counts attempts, moves states, turns errors into the record's reason,
and gives the domain code a ``JobContext`` to log, report progress and honour cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dramatiq

from ..config import Settings
from ..engines.base import Engine
from ..engines.registry import open_engine
from ..errors import Cancelled, NapError
from ..store import open_store
from ..store.base import Store
from .broker import send
from .records import ALIVE_TTL_S, UNREACHABLE, Job, JobState, JobStore, persistently

log = logging.getLogger("nap.job")
DEFER_MS = 2000  # a job over its user's cap of running jobs is looked at again after this


class Runtime:
    """The long-lived resources of a process (Redis job store, state store, engine), opened lazily."""

    def __init__(self, settings: Settings, jobs: JobStore | None = None):
        self.settings = settings
        self.jobs = jobs or JobStore.from_url(settings.redis_url, settings.namespace)
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
        """A worker log line for this job: into its event stream and the worker's log (waiting out a
        Redis outage of up to ``job_write_wait`` seconds, as the job's other writes do)."""
        log.info("[%s %s] %s", self.job.kind, self.job.id, line)
        await self._emit("log", {"line": line})

    async def progress(self, done: int, total: int, force: bool = False, **extra) -> None:
        """Progress of long work; throttled to a few events per second."""
        now = time.monotonic()
        if force or done >= total or now - self._last_progress >= 0.2:
            self._last_progress = now
            await self._emit("progress", {"done": done, "total": total, **extra})

    async def _emit(self, type_: str, data: dict) -> None:
        await persistently(
            lambda: self.rt.jobs.emit(self.job, type_, data), f"job {self.job.id} event", self.settings.job_write_wait
        )

    async def check(self) -> None:
        """A step boundary: raises Cancelled if the user cancelled the job."""
        if await self.rt.jobs.cancel_requested(self.job.id):
            raise Cancelled("cancelled by the user")


JobFn = Callable[..., Awaitable[dict]]


async def run_job(rt: Runtime, job_id: str, fn: JobFn, max_attempts: int) -> None:
    """Run ``fn(ctx, **job.args)`` for the job, at most once to success.

    User-facing errors (NapError) fail the job at once. Anything else is retried by raising it to
    dramatiq until ``max_attempts`` attempts (a worker killed mid-job also counts as an attempt).
    The job's state changes are written before its message is acknowledged, waiting out a Redis outage
    of up to ``job_write_wait`` seconds; while it runs, the job is marked alive for the reaper
    (``jobs.reaper``), which resolves a job whose message and worker were both lost.
    """
    await rt.open()
    jobs = rt.jobs
    wait = rt.settings.job_write_wait
    try:
        job = await jobs.get(job_id)
    except NapError:
        log.warning("job %s has no record; dropping its message", job_id)
        return
    if JobState(job.state).terminal:
        log.info("job %s already %s; not running it again", job_id, job.state)
        return
    cap = rt.settings.user_jobs_running
    if not await jobs.hold_running(job, cap):
        # The user has ``cap`` jobs running already: this one waits its turn in the queue, and the
        # worker's thread serves other users meanwhile.
        log.info("job %s waits: %s has %d jobs running (at most %d at once)", job.id, job.user, cap, cap)
        await send(dramatiq.get_broker(), job.kind, job.id, delay_ms=DEFER_MS)  # type: ignore[arg-type]
        return
    try:
        await jobs.mark_alive(job.id)
        if not await jobs.start_attempt(job):
            return
        beat = asyncio.create_task(_keep_alive(jobs, job))
        try:
            await _attempt(rt, job, fn, max_attempts, wait)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
    finally:
        with contextlib.suppress(*UNREACHABLE):  # else the hold lapses by itself
            await jobs.release_running(job)


async def _attempt(rt: Runtime, job: Job, fn: JobFn, max_attempts: int, wait: float) -> None:
    jobs = rt.jobs

    async def end(to: JobState, **fields) -> None:
        await persistently(lambda: jobs.transition(job, to, {JobState.RUNNING}, **fields), f"job {job.id} {to}", wait)

    ctx = JobContext(job, rt)
    if job.attempts > 1:
        await ctx.log(f"attempt {job.attempts} (an earlier attempt did not finish)")
    try:
        await ctx.check()
        result = await fn(ctx, **job.args)
    except Cancelled as e:
        await end(JobState.CANCELLED, error=e.message)
    except NapError as e:
        await end(JobState.FAILED, error=e.message)
    except Exception as e:  # a bug or an infrastructure failure: maybe transient
        reason = f"{type(e).__name__}: {e}"
        log.error("job %s attempt %d failed:\n%s", job.id, job.attempts, traceback.format_exc())
        if job.attempts >= max_attempts:
            await end(JobState.FAILED, error=f"{reason} (after {job.attempts} attempts)")
            return
        await end(JobState.QUEUED, error=f"attempt {job.attempts} failed: {reason}; retrying")
        raise
    else:
        await end(JobState.SUCCEEDED, result=result, error=None)


async def _keep_alive(jobs: JobStore, job: Job) -> None:
    """Renew the job's mark of life and its user's hold every few seconds; a Redis outage only skips
    renewals."""
    while True:
        await asyncio.sleep(ALIVE_TTL_S / 4)
        try:
            await jobs.mark_alive(job.id)
            await jobs.hold_running(job, cap=0)
        except Exception as e:  # noqa: BLE001 - the job goes on; the reaper waits for a lost mark
            log.warning("job %s: could not renew its mark of life: %s", job.id, e)
