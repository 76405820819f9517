"""The dramatiq broker, configured on purpose for this platform.

dramatiq's defaults (20 retries with backoff up to 7 days, a 10-minute time limit for every message)
suit no job here. Each job kind declares its own policy in ``POLICIES``; our job records count
attempts themselves (a worker killed mid-job counts too), so dramatiq's retries only re-deliver.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, AsyncIO, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from ..config import Settings
from ..keys import RedisKeys
from .records import Queued

QUEUE = "nap"


@dataclass(frozen=True)
class Policy:
    """How a job kind is run: attempts in all, backoff between them, and a time limit per attempt."""

    max_attempts: int
    min_backoff_ms: int
    max_backoff_ms: int
    time_limit_ms: int


POLICIES = {
    # A deploy downloads up to 512 MiB: transient network trouble deserves a few quick retries.
    "deploy": Policy(max_attempts=3, min_backoff_ms=1_000, max_backoff_ms=30_000, time_limit_ms=15 * 60_000),
    # Starting up to 1,000 instances: retry once (reservations make a retry resume, not duplicate).
    "start_common": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=30 * 60_000),
    # An MPI launch builds and starts units; a retry after a crash starts a clean run.
    "start_mpi": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=15 * 60_000),
    # Lifecycle jobs redo what is left on a retry: a removal cut short is finished by the next attempt.
    "app_action": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=30 * 60_000),
    "scale": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=30 * 60_000),
    "rollback": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=60 * 60_000),
    "destroy": Policy(max_attempts=2, min_backoff_ms=1_000, max_backoff_ms=10_000, time_limit_ms=30 * 60_000),
}


def make_broker(settings: Settings) -> RedisBroker:
    """A Redis broker with explicit middleware (AsyncIO included: our actors are coroutines).

    A worker that dies (SIGKILL, power loss) stops heart-beating; after ``heartbeat_timeout`` its
    unacknowledged messages go back to the queue. Maintenance (which does that requeue) runs on 1 in
    ``maintenance_chance``/1e6 broker commands: raised from the default so recovery is prompt.
    """
    heartbeat_ms = int(os.environ.get("NAP_WORKER_HEARTBEAT_MS", "15000"))
    broker = RedisBroker(
        url=settings.redis_url,
        namespace=RedisKeys(settings.namespace).dramatiq_namespace,
        heartbeat_timeout=heartbeat_ms,
        maintenance_chance=int(os.environ.get("NAP_WORKER_MAINTENANCE", "50000")),
        middleware=[
            AgeLimit(),
            TimeLimit(time_limit=10 * 60_000),  # per-actor limits below override this
            ShutdownNotifications(),
            Callbacks(),
            Pipelines(),
            Retries(max_retries=0),  # per-actor max_retries below
            AsyncIO(),
        ],
    )
    return broker


def message(kind: str, job_id: str) -> dramatiq.Message:
    """The message that runs a job (its actor is named after the job's kind; its one argument is the
    job's id, which the reaper reads back from the queues)."""
    return dramatiq.Message(queue_name=QUEUE, actor_name=kind, args=(job_id,), kwargs={}, options={})


async def send(broker: RedisBroker, kind: str, job_id: str, delay_ms: int | None = None) -> None:
    """Enqueue the job's message, after ``delay_ms`` if given (``Broker.enqueue`` blocks on its sync
    Redis client: off the loop)."""
    await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(broker.enqueue, message(kind, job_id), delay=delay_ms)
    )


def queued(settings: Settings, kind: str, job_id: str) -> Queued:
    """The job's message as dramatiq's Redis broker enqueues it (``dispatch.lua``'s ``enqueue``: the
    body in ``<queue>.msgs`` under a fresh id, the id pushed on the queue), for ``JobStore.create`` to
    write in the same transaction as the job's record. No middleware here acts on enqueue."""
    rid = str(uuid.uuid4())
    msg = message(kind, job_id).copy(options={"redis_message_id": rid})
    return Queued(queue_keys(settings)[0], rid, msg.encode())


def queue_keys(settings: Settings) -> list[str]:
    """The Redis names of the queue and its delay queue (each has a ``.msgs`` hash of its messages)."""
    ns = RedisKeys(settings.namespace).dramatiq_namespace
    return [f"{ns}:{QUEUE}", f"{ns}:{QUEUE}.DQ"]


def actor_options(kind: str) -> dict:
    p = POLICIES[kind]
    return {
        "actor_name": kind,
        "queue_name": QUEUE,
        "max_retries": p.max_attempts - 1,
        "min_backoff": p.min_backoff_ms,
        "max_backoff": p.max_backoff_ms,
        "time_limit": p.time_limit_ms,
    }


def setup(settings: Settings) -> RedisBroker:
    broker = make_broker(settings)
    dramatiq.set_broker(broker)
    return broker
