"""What a handler reaches through its request: the API's long-lived resources (held on the aiohttp
application under typed keys) and the caller."""

from __future__ import annotations

import redis.exceptions
from aiohttp import web
from dramatiq.brokers.redis import RedisBroker

from ..config import Settings
from ..jobs.records import JobStore
from ..jobs.runner import Runtime
from .auth import Users
from .limits import Limits

# What means a backend is unreachable (answered 503 ``unavailable``, or said so by a stream).
UNAVAILABLE = (ConnectionError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
USERS = web.AppKey("users", Users)
BROKER = web.AppKey("broker", RedisBroker)
LIMITS = web.AppKey("limits", Limits)
STREAMS = web.AppKey("streams", JobStore)  # the job store on the event streams' own connections
OPENAPI = web.AppKey("openapi", dict)  # the API's OpenAPI document, built from its routes at start


async def caller(request: web.Request) -> str:
    """The user whose token the request carries (401 otherwise); ``request["admin"]`` says if an admin."""
    if "user" in request:  # checked once per request
        return request["user"]
    user, admin = await request.app[USERS].authenticate(request.headers.get("Authorization"))
    request.app[LIMITS].check_rate(user)
    request["admin"], request["user"] = admin, user
    return user
