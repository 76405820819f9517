"""The API's Prometheus side: ``GET /metrics`` and the middleware that times every request.

``GET /metrics`` answers this host's metrics in Prometheus's text format: those of every platform process
that writes into ``NAP_METRICS_DIR`` (the API's own, the workers', the agent's: ``nap_orch/metrics.py``)
and the ones read when it is scraped, from Redis, in one round trip whatever the load: the messages
waiting in dramatiq's queue and delay queue, and the jobs not yet ended (left out while Redis can't be
reached). It takes an admin's token or ``NAP_METRICS_TOKEN`` (Prometheus's ``authorization`` setting;
checked without Redis): no token 401, another user's 403.

Requests are timed by route pattern (``/v1/apps/{app}``, never the path asked for: the series stay few
whatever the paths), method and status; a path that matches no route is ``unmatched``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric

from .. import metrics
from ..errors import Forbidden
from ..http import Handler
from ..jobs.broker import queue_keys
from ..jobs.records import UNREACHABLE
from .context import RUNTIME, SETTINGS, caller

log = logging.getLogger("nap.api")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(request: web.Request) -> str:
    """The pattern of the route that served ``request`` (``unmatched`` when none did: 404, 405)."""
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


@web.middleware
async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Observe each request in ``API_REQUESTS``; outside the error middleware, so that errors count
    with the status they are answered with."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:  # the client went away
        status = 499
        raise
    finally:
        method = request.method if request.method in METHODS else "other"
        metrics.API_REQUESTS.labels(method, route_of(request), str(status)).observe(time.perf_counter() - start)


async def _authorize(request: web.Request) -> None:
    token = request.app[SETTINGS].metrics_token
    given = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return
    await caller(request)  # 401 without a valid token
    if not request["admin"]:
        raise Forbidden("metrics are for an admin (or NAP_METRICS_TOKEN)")


async def scrape(request: web.Request) -> web.Response:
    await _authorize(request)
    settings = request.app[SETTINGS]
    body = await asyncio.to_thread(metrics.exposition, settings.metrics_path, await _from_redis(request))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _from_redis(request: web.Request) -> list[Metric]:
    """The gauges read from Redis now; none while Redis can't be reached (the rest is still served)."""
    jobs = request.app[RUNTIME].jobs
    queues = queue_keys(request.app[SETTINGS])
    try:
        async with jobs.redis.pipeline(transaction=False) as p:
            for q in queues:
                p.llen(q)
            p.zcard(jobs.keys.active_jobs)
            *depths, active = await p.execute()
    except UNREACHABLE as e:
        log.warning("metrics without the queue's depth: Redis is unreachable (%s)", e)
        return []
    depth = GaugeMetricFamily(
        "nap_queue_depth",
        "Messages waiting for a worker in dramatiq's queue (nap) and delay queue (nap.DQ).",
        labels=["queue"],
    )
    for q, n in zip(queues, depths):
        depth.add_metric([q.removeprefix(jobs.keys.dramatiq_namespace + ":")], n)
    return [depth, GaugeMetricFamily("nap_jobs_active", "Jobs not yet ended (queued or running).", value=active)]
