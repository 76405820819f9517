"""The HTTP API's application: its resources (opened and closed in ``cleanup_ctx``), its error
middleware and its routes (``routes.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from .. import metrics
from ..config import Settings
from ..http import error_middleware
from ..jobs.broker import POLICIES, QUEUE, make_broker, queue_keys, send
from ..jobs.reaper import Reaper
from ..jobs.records import JobStore
from ..jobs.runner import Runtime
from ..web import routes as web_routes
from . import openapi
from .auth import Users
from .context import BROKER, LIMITS, OPENAPI, RUNTIME, SETTINGS, STREAMS, UNAVAILABLE, USERS
from .limits import Limits, TokenCache
from .metrics import scrape, timing
from .routes import routes

log = logging.getLogger("nap.api")


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[timing, error_middleware(UNAVAILABLE)], client_max_size=1024 * 1024)
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Requests share a bounded pool: under load they wait up to api_redis_wait seconds for a
        # connection, then answer 503 with Retry-After (never a fixed ceiling of instant failures).
        # Event streams hold a connection while they wait for events: they have a pool of their own.
        requests = _pool(settings.redis_url, settings.api_redis_connections, settings.api_redis_wait)
        streams = _pool(settings.redis_url, settings.sse_max, 1.0)
        rt = Runtime(settings, JobStore(aioredis.Redis(connection_pool=requests), settings.namespace))
        await rt.open()
        admin_token = settings.admin_token
        if not admin_token:
            admin_token, made = first_admin_token(settings.home)
            if made:  # shown once, in the log of the start that made it (docker-compose logs api)
                log.warning(
                    "no NAP_ADMIN_TOKEN: made the admin's token, kept in %s/admin.token: NAP_TOKEN=%s",
                    settings.home,
                    admin_token,
                )
        users = Users(rt.jobs.redis, settings.namespace, admin_token, TokenCache(ttl=settings.token_cache_ttl))
        await users.bootstrap()
        broker = make_broker(settings)
        broker.declare_queue(QUEUE)
        app[RUNTIME], app[USERS], app[BROKER] = rt, users, broker
        app[STREAMS] = JobStore(aioredis.Redis(connection_pool=streams), settings.namespace)
        app[LIMITS] = Limits(
            rate=settings.user_rate,
            burst=settings.user_burst,
            streams_per_user=settings.sse_per_user,
            streams_total=settings.sse_max,
        )
        reaper = Reaper(
            rt.jobs,
            queue_keys(settings),
            {kind: p.max_attempts for kind, p in POLICIES.items()},
            lambda kind, job_id: send(broker, kind, job_id),
            interval=settings.reap_interval,
            grace=settings.reap_grace,
        )
        reaping = asyncio.create_task(reaper.run())
        yield
        reaping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaping
        await rt.close()
        await app[STREAMS].close()
        broker.close()

    app.cleanup_ctx.append(resources)
    app.add_routes(routes())
    app.add_routes(web_routes())  # the web manager's page at /
    app.router.add_get("/metrics", scrape)
    app.on_startup.append(_document)
    return app


async def _document(app: web.Application) -> None:
    """The OpenAPI document of the routes the application serves, once they are all added: a route
    without its operation in ``openapi.py`` stops the API here rather than go undocumented."""
    app[OPENAPI] = openapi.document(served(app))


def served(app: web.Application) -> list[tuple[str, str]]:
    """The (method, path) of every route of ``app``."""
    return [(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None]


def first_admin_token(home: Path) -> tuple[str, bool]:
    """The admin's token kept in ``NAP_HOME/admin.token`` (mode 0600), made on the first start (then
    True): where no ``NAP_ADMIN_TOKEN`` is set (``nap up``, ``docker-compose up``), without it nobody
    could add users."""
    path = home / "admin.token"
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    token = "nap_admin_" + secrets.token_urlsafe(24)
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def _pool(url: str, size: int, wait: float) -> aioredis.BlockingConnectionPool:
    return aioredis.BlockingConnectionPool.from_url(
        url, max_connections=size, timeout=wait, socket_timeout=30, socket_connect_timeout=10
    )


def serve(settings: Settings, port: int | None = None) -> None:
    metrics.setup(settings.metrics_path)
    web.run_app(make_app(settings), host=settings.host, port=port or settings.api_port, print=None, access_log=None)
