"""The HTTP API's application: its resources (opened and closed in ``cleanup_ctx``), its error
middleware and its routes (``routes.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from ..config import Settings
from ..http import error_middleware
from ..jobs.broker import POLICIES, QUEUE, make_broker, queue_keys, send
from ..jobs.reaper import Reaper
from ..jobs.runner import Runtime
from .auth import Users
from .context import BROKER, RUNTIME, SETTINGS, USERS
from .routes import routes


def make_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware((ConnectionError, aioredis.ConnectionError))], client_max_size=1024 * 1024
    )
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        rt = Runtime(settings)
        await rt.open()
        users = Users(rt.jobs.redis, settings.namespace, settings.admin_token)
        await users.bootstrap()
        broker = make_broker(settings)
        broker.declare_queue(QUEUE)
        app[RUNTIME], app[USERS], app[BROKER] = rt, users, broker
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
        broker.close()

    app.cleanup_ctx.append(resources)
    app.add_routes(routes())
    return app


def serve(settings: Settings, port: int | None = None) -> None:
    web.run_app(make_app(settings), host=settings.host, port=port or settings.api_port, print=None, access_log=None)
