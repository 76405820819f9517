"""Runs one job inside a worker: counts attempts, moves states, turns errors into the record's reason,
and gives the domain code a ``JobContext`` to log, report progress and honour cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable

import dramatiq

from ..config import Settings
from ..engines.base import Engine
from ..engines.registry import open_engine
from ..errors import Cancelled, NapError, Superseded
from ..store import open_store
from ..store.base import Store
from .broker import send
from .records import ALIVE_TTL_S, UNREACHABLE, Claim, Job, JobState, JobStore, persistently

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


# A job's log lines and progress are written in batches: with its next cancel check, with its next
# state change, or by a timer at most FLUSH_S after the first of them was made (what watchers wait for
# a line at most). A cancel check reads Redis only when its last look is older than LOOK_S.
FLUSH_S = 0.1
LOOK_S = 0.1
RETRY_FLUSH_S = 1.0  # after a failed write, the timer tries again this much later


class JobContext:
    """What domain code sees of its job.

    Its events are buffered and written in order, a batch per round trip, together with the cancel
    checks and state changes that come anyway (see FLUSH_S): a trivial deploy's half-dozen lines cost
    no round trip of their own. A line is never dropped: a batch that could not be written stays
    first in the buffer for the next write, and the job's final state change carries what is left.
    """

    def __init__(self, job: Job, rt: Runtime, cancel_requested: bool = False):
        self.job = job
        self.rt = rt
        self._last_progress = 0.0
        self._pending: list[dict[str, str]] = []
        self._writing = asyncio.Lock()  # one write of the job's events at a time: they stay in order
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task | None = None
        self._cancel = cancel_requested
        self._overtaken_by: int | None = None  # a newer attempt of the job, seen at a look
        self._looked = time.monotonic()  # the claim that started the attempt looked
        self.released = False  # its user's running place was given back with its last state change

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
        """A worker log line for this job: into the worker's log now, and into its event stream with
        the job's next write (at most FLUSH_S later)."""
        log.info("[%s %s] %s", self.job.kind, self.job.id, line)
        self._add("log", {"line": line})

    async def progress(self, done: int, total: int, force: bool = False, **extra) -> None:
        """Progress of long work; throttled to a few events per second."""
        now = time.monotonic()
        if force or done >= total or now - self._last_progress >= 0.2:
            self._last_progress = now
            self._add("progress", {"done": done, "total": total, **extra})

    def _add(self, type_: str, data: dict) -> None:
        self._pending.append(self.rt.jobs.event(self.job, type_, data))
        self._schedule(FLUSH_S)

    def _schedule(self, delay: float) -> None:
        if self._timer is None and self._flusher is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        self._flusher = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        delay = FLUSH_S
        try:
            await self._write(look=False)
        except Exception as e:  # noqa: BLE001 - kept for the next write; the job goes on
            log.warning("job %s: could not write its events yet: %s", self.job.id, e)
            delay = RETRY_FLUSH_S
        finally:
            self._flusher = None
        if self._pending:
            self._schedule(delay)

    async def _write(self, look: bool) -> None:
        """Write the buffered events (and with ``look``, read the cancel flag) in one round trip."""
        async with self._writing:
            batch = self._pending[:]
            if not batch and not look:
                return
            seen = await self.rt.jobs.append(self.job, batch, look=look)
            del self._pending[: len(batch)]
            if look:
                self._cancel = self._cancel or seen.cancel
                if seen.attempts is not None and seen.attempts > self.job.attempts:
                    self._overtaken_by = seen.attempts
                self._looked = time.monotonic()

    async def check(self) -> None:
        """A step boundary: raises Cancelled if the user cancelled the job, Superseded if a newer attempt
        of it has started (as of a look at most LOOK_S old); writes the buffered events on the way when
        it looks."""
        if not self._cancel and time.monotonic() - self._looked >= LOOK_S:
            await self._write(look=True)
        if self._overtaken_by is not None:
            raise Superseded(f"attempt {self.job.attempts} overtaken by attempt {self._overtaken_by}")
        if self._cancel:
            raise Cancelled("cancelled by the user")

    async def end(self, to: JobState, **fields) -> bool:
        """The attempt's last state change, with the events still buffered, giving back the job's place
        among its user's running jobs; waits out a Redis outage of up to ``job_write_wait`` seconds.
        False if the state did not move: the job is no longer this attempt's (a newer attempt overtook
        it, or it was ended meanwhile)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, job = self.rt.jobs, self.job
        async with self._writing:
            batch = self._pending[:]
            attempt = job.attempts
            moved = await persistently(
                lambda: jobs.transition(
                    job, to, {JobState.RUNNING}, events=batch, release=True, attempt=attempt, **fields
                ),
                f"job {job.id} {to}",
                self.settings.job_write_wait,
            )
            del self._pending[: len(batch)]
            self.released = True  # or it is the newer attempt's, or the job ended: not this one's to give
            return moved

    async def close(self) -> None:
        """After the attempt: no more timed writes; what is still buffered (an attempt cut short by a
        worker's shutdown) is written if Redis takes it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._write(look=False))


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
    try:
        job = await jobs.get(job_id)
    except NapError:
        log.warning("job %s has no record; dropping its message", job_id)
        return
    if JobState(job.state).terminal:
        log.info("job %s already %s; not running it again", job_id, job.state)
        return
    cap = rt.settings.user_jobs_running
    try:
        claim, cancel_requested = await jobs.claim(job, cap)
    except BaseException:
        with contextlib.suppress(*UNREACHABLE):  # it may have taken its place; else the hold lapses
            await jobs.release_running(job)
        raise
    if claim is Claim.ENDED:
        log.info("job %s was cancelled or ended meanwhile; not running it", job_id)
        return
    if claim is Claim.NO_ROOM:
        # The user has ``cap`` jobs running already: this one waits its turn in the queue, and the
        # worker's thread serves other users meanwhile.
        log.info("job %s waits: %s has %d jobs running (at most %d at once)", job.id, job.user, cap, cap)
        await send(dramatiq.get_broker(), job.kind, job.id, delay_ms=DEFER_MS)  # type: ignore[arg-type]
        return
    ctx = JobContext(job, rt, cancel_requested)
    try:
        beat = asyncio.create_task(_keep_alive(jobs, job))
        try:
            await _attempt(ctx, fn, max_attempts)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await ctx.close()
    finally:
        if not ctx.released:
            with contextlib.suppress(*UNREACHABLE):  # else the hold lapses by itself
                await jobs.release_running(job)


async def _attempt(ctx: JobContext, fn: JobFn, max_attempts: int) -> None:
    job = ctx.job
    if job.attempts > 1:
        await ctx.log(f"attempt {job.attempts} (an earlier attempt did not finish)")
    try:
        await ctx.check()
        result = await fn(ctx, **job.args)
    except Superseded as e:
        # stop here, undoing nothing: the job, its record and its running place are the newer attempt's
        log.warning("job %s: %s; this attempt stops", job.id, e)
        ctx.released = True
        return
    except Cancelled as e:
        await ctx.end(JobState.CANCELLED, error=e.message)
    except NapError as e:
        await ctx.end(JobState.FAILED, error=e.message)
    except Exception as e:  # a bug or an infrastructure failure: maybe transient
        reason = f"{type(e).__name__}: {e}"
        log.error("job %s attempt %d failed:\n%s", job.id, job.attempts, traceback.format_exc())
        if job.attempts >= max_attempts:
            await ctx.end(JobState.FAILED, error=f"{reason} (after {job.attempts} attempts)")
            return
        if await ctx.end(JobState.QUEUED, error=f"attempt {job.attempts} failed: {reason}; retrying"):
            raise
        log.warning("job %s attempt %d: not retried, the job is no longer this attempt's", job.id, job.attempts)
    else:
        await ctx.end(JobState.SUCCEEDED, result=result, error=None)


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
