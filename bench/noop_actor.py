"""A dramatiq actor that does nothing but count its messages in Redis: the baseline of
``bench/deploy_drain.py`` (a worker of the same shape as nap's, on the same Redis)."""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ["BENCH_REDIS_URL"]
broker = RedisBroker(url=URL, namespace="bench-noop")
dramatiq.set_broker(broker)
counter = redis.Redis.from_url(URL)


@dramatiq.actor(queue_name="noop", max_retries=0)
def noop() -> None:
    # One round trip, as before: the count, and when the first message ran (for a drain of a full queue).
    with counter.pipeline(transaction=False) as p:
        p.incr("bench-noop:done")
        p.set("bench-noop:first", repr(time.time()), nx=True)
        p.execute()
