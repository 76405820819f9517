"""The nap agent's HTTP API, on the unix socket ``NAP_HOME/agent.sock`` (the local engine's client is
``engine.py``).

HTTP API (JSON unless noted; errors are ``{"error", "message"}`` with the status of ``nap_orch/errors.py``):

- ``GET /health``: ``{"agent": "nap", "pid", "instances"}``
- ``POST /units`` ``{"units": [{"name", "text"}, ...]}``: install and start all (all or none are
  accepted); answers once all are spawned: ``{"units": [status, ...]}``
- ``GET /units?prefix=``: ``{"units": [status, ...]}``
- ``POST /status`` ``{"names": [...]}``: ``{"units": {name: status}}`` (unknown names left out)
- ``POST /units/{name}/stop``, ``POST /units/{name}/start``: the status after it
- ``DELETE /units`` ``{"names": [...]}``: stop, forget, drop their files: ``{"removed": [...]}``
- ``GET /units/{name}/unit``: the unit text (text/plain)
- ``GET /units/{name}/journal?lines=N&follow=1``: the last N lines (text/plain, chunked); with follow,
  then new lines live, until the instance is stopped, exited or failed for good
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from ... import metrics
from ...config import Settings
from ...errors import BadRequest
from ...http import error_middleware, json_object
from .. import daemon
from .supervisor import Supervisor, lock

FOLLOW_HEARTBEAT = 5.0
log = logging.getLogger("nap.agent")
SUPERVISOR = web.AppKey("supervisor", Supervisor)


def _names(body: dict) -> list[str]:
    names = body.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequest("'names' must be a list of instance names")
    return names


async def health(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response({"agent": "nap", "pid": os.getpid(), "instances": len(sup.instances)})


async def submit_units(request: web.Request) -> web.Response:
    body = await json_object(request)
    specs = body.get("units")
    if not isinstance(specs, list):
        raise BadRequest("'units' must be a list of {name, text}")
    return web.json_response({"units": await request.app[SUPERVISOR].submit(specs)})


async def list_units(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    prefix = request.query.get("prefix", "")
    found = [sup.status(i) for n, i in sorted(sup.instances.items()) if n.startswith(prefix)]
    return web.json_response({"units": found})


async def status_units(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    names = _names(await json_object(request))
    return web.json_response({"units": {n: sup.status(sup.instances[n]) for n in names if n in sup.instances}})


async def stop_unit(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SUPERVISOR].stop(request.match_info["name"]))


async def start_unit(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SUPERVISOR].start(request.match_info["name"]))


async def remove_units(request: web.Request) -> web.Response:
    names = _names(await json_object(request))
    return web.json_response({"removed": await request.app[SUPERVISOR].remove(names)})


async def unit_text(request: web.Request) -> web.Response:
    inst = request.app[SUPERVISOR].get(request.match_info["name"])
    return web.Response(text=inst.text, content_type="text/plain")


async def journal(request: web.Request) -> web.StreamResponse:
    sup = request.app[SUPERVISOR]
    try:
        count = max(0, min(int(request.query.get("lines", "100")), 100_000))
    except ValueError:
        raise BadRequest("'lines' must be a number") from None
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    # Read the tail and subscribe in one step (no await between): no line is missed or doubled.
    lines, inst = sup.journal(request.match_info["name"], count)
    queue: asyncio.Queue | None = None
    if follow and not inst.finished:
        queue = asyncio.Queue()
        inst.followers.add(queue)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        if lines:
            await resp.write("".join(lines).encode())
        while queue is not None:
            try:
                item = await asyncio.wait_for(queue.get(), FOLLOW_HEARTBEAT)
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away
                continue
            if item is None:
                break
            await resp.write("".join(item).encode())
        await resp.write_eof()
    except ConnectionResetError:
        pass
    finally:
        if queue is not None:
            inst.followers.discard(queue)
    return resp


def make_app(sup: Supervisor) -> web.Application:
    app = web.Application(middlewares=[error_middleware()], client_max_size=256 * 1024 * 1024)
    app[SUPERVISOR] = sup
    app.router.add_get("/health", health)
    app.router.add_post("/units", submit_units)
    app.router.add_get("/units", list_units)
    app.router.add_delete("/units", remove_units)
    app.router.add_post("/status", status_units)
    app.router.add_post("/units/{name}/stop", stop_unit)
    app.router.add_post("/units/{name}/start", start_unit)
    app.router.add_get("/units/{name}/unit", unit_text)
    app.router.add_get("/units/{name}/journal", journal)
    return app


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run the agent until cancelled. The instances keep running when it ends."""
    lock_fd = lock(settings.agent_dir)
    try:
        sock_path = settings.agent_socket_path
        daemon.claim_socket(sock_path)  # before anything starts: another agent may answer there
        sup = Supervisor(settings)
        try:
            sup.supervise()
            async with daemon.serving(make_app(sup), sock_path):
                log.info("nap agent (pid %s) on %s, %d instances", os.getpid(), sock_path, len(sup.instances))
                if ready is not None:
                    ready.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    sup.end_follows()  # journal streams end before the server waits for its handlers
        finally:
            sup.close()
    finally:
        os.close(lock_fd)


def main() -> None:
    """``nap agent`` on the local engine: the agent with ``Settings.from_env()``, until SIGTERM or SIGINT."""
    settings = Settings.from_env()
    metrics.setup(settings.metrics_path)
    daemon.run(lambda: serve(settings))
