"""The reaper: finds jobs that nothing will ever finish, and resolves them.

A job is queued or running until its worker writes its end. Normally something is always on its way to
doing that: a message for it waits in dramatiq's queue (or delay queue, for a retry's backoff), or a
worker holds that message and runs the job (and marks it alive every few seconds, ``runner``), or the
worker that held it died and dramatiq's maintenance will give its message to another worker.

A Redis outage can break that chain: a worker that could not write the job's end or enqueue its retry
drops the message, and a Redis restarted from its append-only file may have lost the last second of
writes. Such a job would stay ``running`` or ``queued`` for ever. The reaper looks at every job not yet
ended (``RedisKeys.active_jobs``), and one that has no message anywhere in dramatiq's queues and no mark
of life, for ``reap_grace`` seconds on end, is

- requeued (a new message), while it has attempts left: every job kind is safe to run again, as a
  retry would (a launch's reservations are keyed by its job id, so it resumes rather than duplicates);
  a job the platform lost gets one attempt more than its kind's policy, as the loss was not its own;
- failed, with a reason that says what happened, when it has none left.

One reaper acts at a time (a lock in Redis, held while it sweeps); it runs in every API process.
The bound: a job stranded by an outage is queued again or failed within ``reap_grace`` plus
``reap_interval`` (plus the mark of life's 20 s) of Redis being back.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .records import UNREACHABLE, Job, JobState, JobStore

log = logging.getLogger("nap.reaper")

Enqueue = Callable[[str, str], Awaitable[None]]  # (kind, job id)

# Takes the lock, or keeps it when this reaper holds it already; 1 if held. KEYS: lock. ARGV: token, ms.
_LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Action(enum.StrEnum):
    LEAVE = "leave"  # something is on its way to finishing it
    FORGET = "forget"  # it has ended (or its record is gone): not active any more
    WAIT = "wait"  # stranded, but not yet for long enough
    REQUEUE = "requeue"
    FAIL = "fail"


@dataclass(frozen=True)
class Seen:
    """What one sweep saw of an active job."""

    state: str | None  # None: no record
    attempts: int
    has_message: bool  # a message for it is in dramatiq's queue or delay queue, or in a worker's hands
    alive: bool  # a worker marked it alive within the last ALIVE_TTL_S seconds


def verdict(seen: Seen, max_attempts: int, stranded_for: float, grace: float) -> Action:
    """What to do with an active job (pure: the reaper's whole rule)."""
    if seen.state is None or JobState(seen.state).terminal:
        return Action.FORGET
    if seen.has_message or seen.alive:
        return Action.LEAVE
    if stranded_for < grace:
        return Action.WAIT
    if seen.attempts <= max_attempts:  # one more than its policy: the platform lost it, not its own fault
        return Action.REQUEUE
    return Action.FAIL


class Reaper:
    """Sweeps the active jobs of one namespace every ``interval`` seconds (see the module's text)."""

    def __init__(
        self,
        jobs: JobStore,
        dramatiq_queues: list[str],
        max_attempts: dict[str, int],
        enqueue: Enqueue,
        interval: float = 10.0,
        grace: float = 30.0,
    ):
        self.jobs = jobs
        self.redis = jobs.redis
        self.queues = dramatiq_queues  # full names, e.g. "nap:dramatiq:nap" and its ".DQ"
        self.max_attempts = max_attempts
        self.enqueue = enqueue
        self.interval = interval
        self.grace = grace
        self.token = uuid.uuid4().hex
        self.stranded_since: dict[str, float] = {}
        self._lock = self.redis.register_script(_LOCK)

    async def run(self) -> None:
        """Sweep for ever; an outage or a bug only skips a sweep."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except UNREACHABLE as e:
                log.warning("reaper: Redis unreachable (%s); next sweep in %.0f s", e, self.interval)
            except Exception:
                log.exception("reaper: sweep failed")

    async def sweep(self) -> dict[str, Action]:
        """One look at the active jobs; returns what was decided for each (none without the lock)."""
        if not await self._lock(keys=[self.jobs.keys.reaper_lock], args=[self.token, int(self.interval * 3000)]):
            self.stranded_since.clear()  # another reaper acts; what this one saw goes stale
            return {}
        now = time.time()
        ids = [
            i.decode() for i in await self.redis.zrangebyscore(self.jobs.keys.active_jobs, 0, now, start=0, num=10_000)
        ]
        if not ids:
            self.stranded_since.clear()
            return {}
        held = await self._held()
        async with self.redis.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(self.jobs.keys.job(i))
                p.exists(self.jobs.keys.job_alive(i))
            replies = await p.execute()
        decided: dict[str, Action] = {}
        for i, record, alive in zip(ids, replies[0::2], replies[1::2], strict=True):
            job = Job.from_hash(record) if record else None
            seen = Seen(
                state=job.state if job else None,
                attempts=job.attempts if job else 0,
                has_message=i in held,
                alive=bool(alive),
            )
            since = self.stranded_since.setdefault(i, now)
            kind_max = self.max_attempts.get(job.kind, 1) if job else 1
            action = verdict(seen, kind_max, now - since, self.grace)
            if action is not Action.WAIT:
                self.stranded_since.pop(i, None)
            decided[i] = action
            if action is Action.FORGET:
                await self.redis.zrem(self.jobs.keys.active_jobs, i)
            elif action is Action.REQUEUE and job:
                await self._requeue(job, now - since)
            elif action is Action.FAIL and job:
                await self._fail(job, kind_max)
        for gone in set(self.stranded_since) - set(ids):
            del self.stranded_since[gone]
        return decided

    async def _held(self) -> set[str]:
        """The job ids that some message in dramatiq's queues is for (read at one instant)."""
        async with self.redis.pipeline(transaction=True) as p:
            for q in self.queues:
                p.hvals(f"{q}.msgs")
            replies = await p.execute()
        held = set()
        for raw in (m for reply in replies for m in reply):
            try:
                args = json.loads(raw).get("args")
            except (ValueError, AttributeError):
                continue
            if isinstance(args, list) and args and isinstance(args[0], str):
                held.add(args[0])
        return held

    async def _requeue(self, job: Job, stranded_for: float) -> None:
        reason = (
            f"requeued by the platform: attempt {job.attempts} was lost (no worker ran it and no queue "
            f"held it for {stranded_for:.0f} s, as after a Redis outage)"
        )
        if await self.jobs.transition(job, JobState.QUEUED, {JobState.QUEUED, JobState.RUNNING}, error=reason):
            await self.enqueue(job.kind, job.id)
            log.warning("reaper: job %s (%s) %s", job.id, job.kind, reason)

    async def _fail(self, job: Job, max_attempts: int) -> None:
        reason = (
            f"lost by the platform after {job.attempts} attempts (no worker ran it and no queue held it, as "
            f"after a Redis outage); its kind allows {max_attempts}, so it is not tried again"
        )
        if await self.jobs.transition(job, JobState.FAILED, {JobState.QUEUED, JobState.RUNNING}, error=reason):
            log.warning("reaper: job %s (%s) %s", job.id, job.kind, reason)
