"""What every HTTP server of nap-orch shares (the API, the agent): errors as JSON, JSON bodies.

An error is ``{"error": <kind>, "message": ...}`` with the status of its ``NapError`` (``errors.py``);
a backend that can't be reached is 503 ``unavailable``; anything unexpected is logged and answers 500
``internal`` without details.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .errors import BadRequest, NapError, PayloadTooLarge, RetryLater

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
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if isinstance(e, RetryLater) else None
            return web.json_response(e.to_json(), status=e.status, headers=headers)
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                return web.json_response(
                    {"error": e.reason.lower().replace(" ", "_"), "message": e.reason}, status=e.status
                )
            raise
        except unavailable as e:
            log.warning("backend unreachable on %s %s: %s", request.method, request.path, e)
            return web.json_response(
                {"error": "unavailable", "message": str(e)}, status=503, headers={"Retry-After": "1"}
            )
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return web.json_response({"error": "internal", "message": "internal error (see the log)"}, status=500)

    return errors


def stream_error(e: Exception, unavailable: tuple[type[BaseException], ...] = (ConnectionError,)) -> dict[str, str]:
    """The error body of an exception raised by a stream whose status is sent already (the middleware
    can no longer answer for it, so the stream says it in its own form): one of ours, an unreachable
    backend (``unavailable``, as the middleware's), else ``internal`` (logged)."""
    if isinstance(e, NapError):
        return e.to_json()
    if isinstance(e, unavailable):
        return {"error": "unavailable", "message": str(e)}
    log.exception("error in a stream")
    return {"error": "internal", "message": "internal error (see the log)"}


MAX_DEPTH = 32  # levels of objects and lists a request body may nest (ours use two or three)


def json_type(value: object) -> str:
    """What a decoded JSON value is, in JSON's words (for errors about a field's type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and lists more than ``limit`` levels deep (looked at without
    recursion: a value may be as deep as the parser allows)."""
    todo = [(value, 1)] if isinstance(value, (dict, list)) else []
    while todo:
        v, depth = todo.pop()
        if depth > limit:
            return True
        todo.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list)))
    return False


async def json_object(request: web.Request, *required: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The request's body: a JSON object (UTF-8, as JSON is exchanged) holding at least the ``required``
    fields and nesting at most ``max_depth`` levels (else 400); a body over the application's
    ``client_max_size`` is 413."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body is larger than {request.client_max_size} bytes") from None
    try:
        data = json.loads(body.decode("utf-8"))
    except RecursionError:  # the parser's own limit (about a thousand levels)
        raise BadRequest(f"the request body is nested too deep (at most {max_depth} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if body.count(b"[") + body.count(b"{") > max_depth and nested_deeper(data, max_depth):
        raise BadRequest(f"the request body is nested too deep (at most {max_depth} levels)")
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    absent = [f for f in required if f not in data]
    if absent:
        raise BadRequest(f"missing field(s): {', '.join(absent)}")
    return data
