"""Server-sent events: a job's event stream or a user's, replayed from ``Last-Event-ID`` then live."""

from __future__ import annotations

import json

from aiohttp import web

from .context import RUNTIME, caller


async def _sse(request: web.Request, stream: str, until_job_ends: str | None) -> web.StreamResponse:
    last = request.headers.get("Last-Event-ID") or request.query.get("last_id") or "0-0"
    follow = request.query.get("follow", "1") not in ("0", "false", "no")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    jobs = request.app[RUNTIME].jobs
    async for ev in jobs.events(stream, last, follow=follow, until_job_ends=until_job_ends):
        payload = {"job": ev["job"], "kind": ev["kind"], "t": float(ev["t"]), **ev["data"]}
        await resp.write(f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(payload)}\n\n".encode())
    await resp.write_eof()
    return resp


async def job_events(request: web.Request) -> web.StreamResponse:
    user = await caller(request)
    jobs = request.app[RUNTIME].jobs
    job = await jobs.get(request.match_info["id"], user)
    return await _sse(request, jobs.keys.job_events(job.id), until_job_ends=job.id)


async def user_events(request: web.Request) -> web.StreamResponse:
    user = await caller(request)
    return await _sse(request, request.app[RUNTIME].jobs.keys.user_events(user), until_job_ends=None)
