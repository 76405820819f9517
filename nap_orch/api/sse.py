"""Server-sent events: a job's event stream or a user's, replayed from ``Last-Event-ID`` then live.

A stream holds a Redis connection of the event streams' own pool (``STREAMS``) while it waits, never
one of the requests' pool; each user may have ``NAP_SSE_PER_USER`` open at once (429 beyond), each API
process ``NAP_SSE_MAX`` (503 beyond). Every ``NAP_SSE_HEARTBEAT`` seconds (15) without an event the
client gets a comment line: proxies keep the connection, and a client that left is noticed (the write fails, or its
transport is closing at the next look, every ``LOOK_MS`` or heartbeat, whichever is sooner) and its
stream ends.
"""

from __future__ import annotations

import contextlib
import json
import re
import time

from aiohttp import web

from .. import metrics
from ..errors import BadRequest
from ..http import stream_error
from .context import LIMITS, RUNTIME, SETTINGS, STREAMS, UNAVAILABLE, caller

LOOK_MS = 5000
EVENT_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _sse(request: web.Request, user: str, stream: str, until_job_ends: str | None) -> web.StreamResponse:
    last = request.headers.get("Last-Event-ID") or request.query.get("last_id") or "0-0"
    if not EVENT_ID.fullmatch(last):
        raise BadRequest("Last-Event-ID (or last_id) must be an event's id, <milliseconds>-<sequence>")
    follow = request.query.get("follow", "1") not in ("0", "false", "no")
    heartbeat = request.app[SETTINGS].sse_heartbeat
    open_streams = metrics.SSE_CLIENTS.labels("user" if until_job_ends is None else "job")
    with request.app[LIMITS].stream(user), open_streams.track_inprogress():
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        wrote = time.monotonic()
        events = request.app[STREAMS].events(
            stream,
            last,
            follow=follow,
            until_job_ends=until_job_ends,
            block_ms=min(LOOK_MS, max(100, int(heartbeat * 1000))),
            idle=True,
        )
        try:
            async for ev in events:
                if _gone(request):
                    break
                if ev is None:
                    if time.monotonic() - wrote >= heartbeat:
                        await resp.write(b": keep-alive\n\n")
                        wrote = time.monotonic()
                    continue
                payload = {"job": ev["job"], "kind": ev["kind"], "t": float(ev["t"]), **ev["data"]}
                await resp.write(f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(payload)}\n\n".encode())
                wrote = time.monotonic()
            else:
                await resp.write_eof()
        except ConnectionResetError:  # the client went away mid-write
            pass
        except Exception as e:  # noqa: BLE001 - the status is sent: a last event says why the stream ends
            with contextlib.suppress(ConnectionResetError):
                await resp.write(f"event: error\ndata: {json.dumps(stream_error(e, UNAVAILABLE))}\n\n".encode())
                await resp.write_eof()
        finally:
            await events.aclose()
        return resp


async def job_events(request: web.Request) -> web.StreamResponse:
    user = await caller(request)
    jobs = request.app[RUNTIME].jobs
    job = await jobs.get(request.match_info["id"], user)
    return await _sse(request, user, jobs.keys.job_events(job.id), until_job_ends=job.id)


async def user_events(request: web.Request) -> web.StreamResponse:
    user = await caller(request)
    return await _sse(request, user, request.app[RUNTIME].jobs.keys.user_events(user), until_job_ends=None)
