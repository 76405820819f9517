"""Job records and their event streams, kept in Redis (dramatiq itself has neither).

A job's record is a Redis hash; its events are a Redis stream (replayable from any id, then followed
live); each event is also appended to its user's stream. States only move forward:
queued -> running -> succeeded | failed | cancelled (running -> queued again when a retry is due).

Retention. A job is kept for ``retention`` seconds after it ends (``NAP_JOB_RETENTION``, given when it is
created and kept in its record's ``retention`` field, so every process that ends it applies the same):
the state change that ends it sets the expiry of its record and of its event stream, and its id leaves
its user's list when that list is next read and finds the record gone. Users' streams are trimmed by
length (``STREAM_MAXLEN``) instead.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from .. import metrics
from ..errors import Conflict, NotFound
from ..keys import RedisKeys

STREAM_MAXLEN = 10_000  # events kept per job / per user stream (approximate trim)
DEFAULT_RETENTION = 7 * 24 * 3600  # seconds a finished job is kept when its record does not say
ALIVE_TTL_S = 20  # a running job's mark of life expires this long after its worker last renewed it

log = logging.getLogger("nap.job")
R = TypeVar("R")

# What a Redis that is restarting or unreachable raises (BusyLoadingError, while it loads its data, is
# a ConnectionError).
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError)


async def persistently(write: Callable[[], Awaitable[R]], what: str, wait: float) -> R:
    """``write()``, tried again across a Redis outage for up to ``wait`` seconds (0.2 s doubling to 5 s
    between tries); then its error is raised. For a job's writes that must not be lost: its final state
    and the events that go with it."""
    deadline = time.monotonic() + wait
    pause = 0.2
    while True:
        try:
            return await write()
        except UNREACHABLE as e:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); trying again in %.1f s", what, e, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


TERMINAL = {s.value for s in JobState if s.terminal}


@dataclass
class Job:
    id: str
    kind: str
    user: str
    args: dict
    state: str = JobState.QUEUED.value
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: str | None = None
    result: dict | None = None
    cancel_requested: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, h: dict) -> Job:
        data = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in h.items()}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Look:
    """What a running attempt reads of its job's record at a step boundary."""

    cancel: bool = False  # its user asked for a cancel
    attempts: int | None = None  # the record's attempt count: higher than the reader's, it was overtaken


# A Lua function for the script below: appends events (a job's log lines and progress not written yet;
# ``events`` is a JSON list of their field tables) to the job's and the user's streams, in order.
_APPEND = """
local function append(job_stream, user_stream, maxlen, events)
  for _, ev in ipairs(cjson.decode(events)) do
    local fields = {'type', ev.type, 'job', ev.job, 'kind', ev.kind, 't', ev.t, 'data', ev.data}
    redis.call('XADD', job_stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    redis.call('XADD', user_stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
end
"""

# Moves a job to a new state only from the allowed ones and appends the state event to the job's and
# the user's streams, atomically (a reader that sees the final state also finds its event); a job that
# ends leaves the set of active jobs, and its record and stream expire after its retention (the
# record's ``retention`` field, else ARGV[5]; 0 keeps them). Events given in ARGV[6] go first, whether
# or not the state moves (a job's lines are never dropped); with a fifth key (its user's running jobs)
# the job leaves that set too, in the same call. With an attempt number in ARGV[7], nothing moves unless
# the record is still at that attempt (a fence against an overtaken attempt). Returns the old state or
# nil. KEYS: record, job stream, user stream, active set[, user's running set]. ARGV: allowed states
# (JSON), maxlen, event fields (JSON), "1" if the new state is terminal, the default retention
# (seconds), earlier events (JSON list), the attempt or '', then field/value pairs.
_TRANSITION = (
    _APPEND
    + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
append(KEYS[2], KEYS[3], ARGV[2], ARGV[6])
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[7] then
  return false  -- an attempt overtaken by a newer one: the record and the running place are that one's
end
if KEYS[5] then redis.call('ZREM', KEYS[5], cjson.decode(ARGV[3]).job) end
local allowed = cjson.decode(ARGV[1])
for _, s in ipairs(allowed) do
  if cjson.encode(s) == cur then
    for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
    local ev = cjson.decode(ARGV[3])
    if ARGV[4] == '1' then redis.call('ZREM', KEYS[4], ev.job) end
    local fields = {'type', ev.type, 'job', ev.job, 'kind', ev.kind, 't', ev.t, 'data', ev.data}
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
    if ARGV[4] == '1' then
      local keep = tonumber(redis.call('HGET', KEYS[1], 'retention') or ARGV[5]) or 0
      if keep > 0 then
        local ms = math.max(1, math.floor(keep * 1000))
        redis.call('PEXPIRE', KEYS[1], ms)
        redis.call('PEXPIRE', KEYS[2], ms)
      end
    end
    return cur
  end
end
return false
"""
)


# Takes (or renews) a place among a user's running jobs. KEYS: the user's set. ARGV: job id, cap (0: renew
# only a place held), now, when the place lapses. Returns 1 if the job holds a place.
_HOLD = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  redis.call('EXPIRE', KEYS[1], 3600)
  return 1
end
return 0
"""


# Starts an attempt of a job in one call: if the job is queued or running (a redelivery), and its user
# has fewer than ``cap`` jobs running (or it holds its place already), it takes its place among them,
# is marked alive, counts an attempt and moves to running with its state event. Returns {0} when the
# job has ended (or its record is gone), {-1} when its user has no room, else {1, attempts, "1" if a
# cancel was requested}. KEYS: record, job stream, user stream, user's running set, mark of life. ARGV:
# job id, kind, cap, now, when the place lapses, the mark's TTL (s), maxlen, started (JSON).
_CLAIM = """
local cur = redis.call('HGET', KEYS[1], 'state')
if cur ~= '"queued"' and cur ~= '"running"' then return {0} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) and redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then
  return {-1}
end
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('EXPIRE', KEYS[4], 3600)
redis.call('SET', KEYS[5], '1', 'EX', ARGV[6])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', '"running"', 'started', ARGV[8], 'attempts', attempts)
local data = '{"state": "running", "attempts": ' .. attempts .. '}'
local fields = {'type', 'state', 'job', ARGV[1], 'kind', ARGV[2], 't', ARGV[4], 'data', data}
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(fields))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', unpack(fields))
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' and '1' or '0'
return {1, attempts, cancel}
"""


class Claim(enum.Enum):
    """What ``JobStore.claim`` made of a job."""

    STARTED = 1  # running, its attempt counted: run it
    ENDED = 0  # already ended (or cancelled while queued): not to run
    NO_ROOM = -1  # its user runs as many jobs as allowed: it waits its turn


class Queued(NamedTuple):
    """A message put straight into a dramatiq queue: the queue's Redis name, the message's Redis id and
    its encoded body (``jobs.broker.queued``)."""

    queue: str
    message_id: str
    data: bytes


class JobStore:
    """Records and events of jobs. One per process; ``redis`` is a ``redis.asyncio.Redis``."""

    def __init__(self, redis: aioredis.Redis, namespace: str = "nap"):
        # Any: redis-py annotates replies as ``bytes | str``; without decode_responses they are bytes.
        self.redis: Any = redis
        self.keys = RedisKeys(namespace)
        self._transition = redis.register_script(_TRANSITION)
        self._hold = redis.register_script(_HOLD)
        self._claim = redis.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str, namespace: str = "nap") -> JobStore:
        # Blocking reads of event streams wait at most BLOCK_MS, well under the socket timeout.
        return cls(aioredis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10), namespace)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- records ---------------------------------------------------------------------------------
    async def create(
        self,
        kind: str,
        user: str,
        args: dict,
        retention: float = DEFAULT_RETENTION,
        enqueue: Callable[[str], Queued] | None = None,
    ) -> Job:
        """Record a queued job, kept ``retention`` seconds once it ends (0: for ever), with its first
        event; with ``enqueue`` (which gives the message for a job id), its message goes to the queue in
        the same transaction: one round trip, and never a job recorded but not queued."""
        job = Job(id=uuid.uuid4().hex[:16], kind=kind, user=user, args=args)
        event = self._event(job, "state", {"state": job.state, "kind": kind, "args": args})
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.keys.job(job.id), mapping={**job.to_hash(), "retention": json.dumps(retention)})
            p.zadd(self.keys.user_jobs(user), {job.id: job.created})
            p.zadd(self.keys.active_jobs, {job.id: job.created})
            p.xadd(self.keys.job_events(job.id), event, maxlen=STREAM_MAXLEN, approximate=True)
            p.xadd(self.keys.user_events(job.user), event, maxlen=STREAM_MAXLEN, approximate=True)
            if enqueue is not None:
                queued = enqueue(job.id)
                p.hset(f"{queued.queue}.msgs", queued.message_id, queued.data)
                p.rpush(queued.queue, queued.message_id)
            await p.execute()
        metrics.JOBS_SUBMITTED.labels(kind).inc()
        return job

    async def get(self, job_id: str, user: str | None = None) -> Job:
        """The job; NotFound when it does not exist or belongs to another user than ``user``."""
        h = await self.redis.hgetall(self.keys.job(job_id)) if _safe_id(job_id) else {}
        if not h:
            raise NotFound(f"no job {job_id!r}")
        job = Job.from_hash(h)
        if user is not None and job.user != user:
            raise NotFound(f"no job {job_id!r}")
        return job

    async def active_among(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` are queued or running (not ended): one round trip."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return set()
        scores = await self.redis.zmscore(self.keys.active_jobs, ids)
        return {i for i, score in zip(ids, scores, strict=True) if score is not None}

    async def active_of(self, user: str) -> list[Job]:
        """The user's jobs that are queued or running."""
        ids = await self.redis.zrange(self.keys.active_jobs, 0, -1)
        async with self.redis.pipeline(transaction=False) as p:
            for i in ids:
                p.hmget(self.keys.job(i.decode()), "user")
            owners = await p.execute()
        mine = [i.decode() for i, (owner,) in zip(ids, owners, strict=True) if owner and json.loads(owner) == user]
        async with self.redis.pipeline(transaction=False) as p:
            for i in mine:
                p.hgetall(self.keys.job(i))
            rows = await p.execute()
        jobs = [Job.from_hash(h) for h in rows if h]
        return [j for j in jobs if not JobState(j.state).terminal]

    async def list(self, user: str, state: str | None = None, limit: int = 100) -> list[Job]:
        ids = await self.redis.zrevrange(self.keys.user_jobs(user), 0, -1 if state else limit - 1)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(self.keys.job(i.decode()))
            rows = await p.execute()
        gone = [i for i, h in zip(ids, rows, strict=True) if not h]
        if gone:  # past their retention: their ids go too (record and id are created together)
            await self.redis.zrem(self.keys.user_jobs(user), *gone)
        jobs = [Job.from_hash(h) for h in rows if h]
        if state:
            jobs = [j for j in jobs if j.state == state][:limit]
        return jobs

    async def transition(
        self,
        job: Job,
        to: JobState,
        allowed: set[JobState],
        *,
        events: Sequence[dict[str, str]] = (),
        release: bool = False,
        attempt: int | None = None,
        **fields,
    ) -> bool:
        """Move ``job`` to state ``to`` if it is now in one of ``allowed``; set ``fields`` too.

        :param events: events made earlier (``event``) and not written yet: they go first, in order, in
            the same call, whether or not the state moves.
        :param release: the job also leaves its user's running jobs (``hold_running``).
        :param attempt: move only while the record is at this attempt (an attempt's own end: a newer
            attempt that overtook it owns the record).
        """
        updates = {"state": to.value, **fields}
        if to.terminal:
            updates.setdefault("finished", time.time())
        data = {"state": to.value}
        for k in ("error", "result", "attempts"):
            if k in fields:
                data[k] = fields[k]
        argv: list[Any] = [
            json.dumps([s.value for s in allowed]),
            STREAM_MAXLEN,
            json.dumps(self._event(job, "state", data)),
            "1" if to.terminal else "0",
            DEFAULT_RETENTION,
            json.dumps(list(events)),
            "" if attempt is None else str(attempt),
        ]
        for k, v in updates.items():
            argv += [k, json.dumps(v)]
        keys = [
            self.keys.job(job.id),
            self.keys.job_events(job.id),
            self.keys.user_events(job.user),
            self.keys.active_jobs,
        ]
        if release:
            keys.append(self.keys.user_running(job.user))
        if not await self._transition(keys=keys, args=argv):
            return False
        for k, v in updates.items():
            setattr(job, k, v)
        if to.terminal:  # counted once, by the process whose transition ended it
            metrics.job_ended(job.kind, to.value, job.started, job.finished)
        return True

    async def start_attempt(self, job: Job) -> bool:
        """Count an attempt and mark the job running; False if it was cancelled or already ended."""
        attempts = await self.redis.hincrby(self.keys.job(job.id), "attempts", 1)
        ok = await self.transition(
            job,
            JobState.RUNNING,
            {JobState.QUEUED, JobState.RUNNING},  # RUNNING: a worker died mid-job and this is its redelivery
            started=time.time(),
            attempts=attempts,
        )
        return ok

    async def claim(self, job: Job, cap: int) -> tuple[Claim, bool]:
        """Start an attempt of ``job`` in one round trip, and say whether a cancel was requested: what
        ``hold_running``, ``mark_alive`` and ``start_attempt`` do one after another, at once (``_CLAIM``).
        A job whose user already runs ``cap`` jobs is left as it is."""
        now = time.time()
        keys = [
            self.keys.job(job.id),
            self.keys.job_events(job.id),
            self.keys.user_events(job.user),
            self.keys.user_running(job.user),
            self.keys.job_alive(job.id),
        ]
        args: list[Any] = [
            job.id,
            job.kind,
            cap,
            repr(now),
            now + ALIVE_TTL_S,
            ALIVE_TTL_S,
            STREAM_MAXLEN,
            json.dumps(now),
        ]
        reply = await self._claim(keys=keys, args=args)
        outcome = Claim(int(reply[0]))
        if outcome is not Claim.STARTED:
            return outcome, False
        job.state, job.started, job.attempts = JobState.RUNNING.value, now, int(reply[1])
        return outcome, reply[2] == b"1"

    async def request_cancel(self, job: Job) -> Job:
        """Cancel a queued job now; ask a running job to stop at its next step boundary."""
        if JobState(job.state).terminal:
            raise Conflict(f"job {job.id} has already ended ({job.state})")
        await self.redis.hset(self.keys.job(job.id), "cancel_requested", "true")
        job.cancel_requested = True
        if await self.transition(job, JobState.CANCELLED, {JobState.QUEUED}, error="cancelled before it started"):
            return job
        await self.emit(job, "log", {"line": "cancel requested: stopping at the next step"})
        return await self.get(job.id)

    async def hold_running(self, job: Job, cap: int) -> bool:
        """Count the job among its user's running jobs, unless ``cap`` are running already (a job that
        holds its place keeps it, and renews it with ``cap`` 0); holds lapse ``ALIVE_TTL_S`` after their
        last renewal, so a dead worker's do not count for long."""
        now = time.time()
        got = await self._hold(keys=[self.keys.user_running(job.user)], args=[job.id, cap, now, now + ALIVE_TTL_S])
        return bool(got)

    async def release_running(self, job: Job) -> None:
        await self.redis.zrem(self.keys.user_running(job.user), job.id)

    async def mark_alive(self, job_id: str) -> None:
        """Say that a worker runs the job now (renewed every few seconds while it does)."""
        await self.redis.set(self.keys.job_alive(job_id), "1", ex=ALIVE_TTL_S)

    async def cancel_requested(self, job_id: str) -> bool:
        return (await self.redis.hget(self.keys.job(job_id), "cancel_requested")) == b"true"

    # -- events ----------------------------------------------------------------------------------
    async def append(self, job: Job, events: Sequence[dict[str, str]], look: bool = False) -> Look:
        """Append ``events`` (made by ``event``) to the job's and its user's streams, in order and all
        or none, in one round trip; with ``look``, in the same round trip, read whether a cancel was
        requested and which attempt the record is at (else nothing)."""
        async with self.redis.pipeline(transaction=True) as p:
            for fields in events:
                p.xadd(self.keys.job_events(job.id), fields, maxlen=STREAM_MAXLEN, approximate=True)
                p.xadd(self.keys.user_events(job.user), fields, maxlen=STREAM_MAXLEN, approximate=True)
            if look:
                p.hmget(self.keys.job(job.id), ["cancel_requested", "attempts"])
            replies = await p.execute()
        if not look:
            return Look()
        cancel, attempts = replies[-1]
        try:
            latest = int(attempts) if attempts is not None else None
        except ValueError:
            latest = None
        return Look(cancel == b"true", latest)

    def event(self, job: Job, type_: str, data: dict) -> dict[str, str]:
        """An event of the job, stamped now, to be written later (``append``, ``transition``)."""
        return self._event(job, type_, data)

    async def emit(self, job: Job, type_: str, data: dict) -> None:
        """Append an event to the job's stream and to its user's stream."""
        fields = self._event(job, type_, data)
        async with self.redis.pipeline(transaction=False) as p:
            p.xadd(self.keys.job_events(job.id), fields, maxlen=STREAM_MAXLEN, approximate=True)
            p.xadd(self.keys.user_events(job.user), fields, maxlen=STREAM_MAXLEN, approximate=True)
            await p.execute()

    @staticmethod
    def _event(job: Job, type_: str, data: dict) -> dict[str, str]:
        return {"type": type_, "job": job.id, "kind": job.kind, "t": repr(time.time()), "data": json.dumps(data)}

    async def events(
        self,
        stream: str,
        last_id: str = "0-0",
        follow: bool = True,
        until_job_ends: str | None = None,
        block_ms: int = 2000,
        idle: bool = False,
    ) -> AsyncGenerator[dict | None, None]:
        """Events of a stream after ``last_id``, then live. With ``until_job_ends`` (a job id) it stops
        after that job's terminal state event. With ``idle``, a wait of ``block_ms`` that brought no
        event yields None (a reader's chance to look at its client)."""
        last = last_id or "0-0"
        while True:
            if until_job_ends:
                # A job that ended before we subscribed: replay what is there and stop.
                state = await self.redis.hget(self.keys.job(until_job_ends), "state")
                ended = state is not None and json.loads(state) in TERMINAL
            else:
                ended = False
            resp = await self.redis.xread({stream: last}, count=500, block=None if ended or not follow else block_ms)
            batch = resp[0][1] if resp else []
            for eid, f in batch:
                last = eid.decode()
                ev = {k.decode(): v.decode() for k, v in f.items()}
                ev["id"] = last
                ev["data"] = json.loads(ev["data"])
                yield ev
                if until_job_ends and ev["type"] == "state" and ev["data"].get("state") in TERMINAL:
                    return
            if not batch and (ended or not follow):
                return
            if not batch and idle:
                yield None


def _safe_id(job_id: str) -> bool:
    return isinstance(job_id, str) and 0 < len(job_id) <= 64 and job_id.isalnum()
