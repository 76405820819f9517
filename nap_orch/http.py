"""What every HTTP server of nap-orch shares (the API, the agent): errors as JSON, JSON bodies.

An error is ``{"error": <kind>, "message": ...}`` with the status of its ``NapError`` (``errors.py``);
a backend that can't be reached is 503 ``unavailable``; anything unexpected is logged and answers 500
``internal`` without details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .errors import BadRequest, NapError

log = logging.getLogger("nap.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_middleware(unavailable: tuple[type[BaseException], ...] = (ConnectionError,)) -> Any:
    """The middleware that turns errors into JSON answers; ``unavailable`` are the exceptions that mean
    a backend is unreachable (503)."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except NapError as e:
            return web.json_response(e.to_json(), status=e.status)
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                return web.json_response(
                    {"error": e.reason.lower().replace(" ", "_"), "message": e.reason}, status=e.status
                )
            raise
        except unavailable as e:
            log.exception("backend unreachable")
            return web.json_response({"error": "unavailable", "message": str(e)}, status=503)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return web.json_response({"error": "internal", "message": "internal error (see the log)"}, status=500)

    return errors


async def json_object(request: web.Request, *required: str) -> dict[str, Any]:
    """The request's body: a JSON object holding at least the ``required`` fields (else 400)."""
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    absent = [f for f in required if f not in data]
    if absent:
        raise BadRequest(f"missing field(s): {', '.join(absent)}")
    return data
