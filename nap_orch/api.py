"""The HTTP API (aiohttp): authenticates, validates, records the job, enqueues it, answers 202.

Routes are declared in ``routes()``; handlers parse, call domain code, answer. Errors are
``NapError``s, mapped to their HTTP status with a JSON body in ``error_middleware``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlparse

import dramatiq
import redis.asyncio as aioredis
from aiohttp import web

from . import apps, instances, profile
from .broker import QUEUE, make_broker
from .config import Settings
from .errors import BadRequest, Forbidden, NapError, NotFound
from .jobs import JobState
from .names import InstanceName, check_name, split_service
from .runner import Runtime
from .users import Users

log = logging.getLogger("nap.api")

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
USERS = web.AppKey("users", Users)
BROKER = web.AppKey("broker", object)

ALLOWED_SCHEMES = ("http", "https", "git", "git+http", "git+https")


# -- plumbing --------------------------------------------------------------------------------------
@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NapError as e:
        return web.json_response(e.to_json(), status=e.status)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return web.json_response({"error": e.reason.lower().replace(" ", "_"), "message": e.reason}, status=e.status)
        raise
    except (ConnectionError, aioredis.ConnectionError) as e:
        log.exception("backend unreachable")
        return web.json_response({"error": "unavailable", "message": str(e)}, status=503)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal", "message": "internal error (see the API log)"}, status=500)


async def caller(request: web.Request) -> str:
    user, _admin = await request.app[USERS].authenticate(request.headers.get("Authorization"))
    request["admin"] = _admin
    return user


async def body(request: web.Request, *required: str) -> dict:
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


def service_arg(value, user: str) -> str:
    """An app argument: ``app`` or the seed's ``username_appname`` (whose user must be the caller)."""
    if isinstance(value, str) and "_" in value:
        u, a = split_service(value)
        if u != user:
            raise Forbidden(f"{value!r} belongs to user {u!r}; you are {user!r}")
        return a
    return check_name(value, "app name")


def instance_arg(value: str, user: str) -> InstanceName:
    inst = InstanceName.parse(value)
    if inst.user != user:
        raise NotFound(f"no instance {value!r}")
    return inst


async def app_of(request: web.Request) -> tuple[str, str]:
    """The caller and the app named in the path."""
    user = await caller(request)
    return user, service_arg(request.match_info["app"], user)


async def instance_of(request: web.Request) -> InstanceName:
    """The caller's instance named in the path (another user's answers 404)."""
    return instance_arg(request.match_info["name"], await caller(request))


def check_source_url(url, settings: Settings) -> None:
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("url must be a non-empty string")
    if any(ord(c) < 32 for c in url):
        raise BadRequest("url contains control characters")
    scheme = urlparse(url).scheme.lower()
    if scheme in ALLOWED_SCHEMES:
        return
    if scheme == "file" or (not scheme and url.startswith("/")):
        if settings.allow_local_sources:
            return
        raise BadRequest("local sources (file:// or a path) are not allowed on this server")
    raise BadRequest(f"URL scheme {scheme or '(none)'!r} is not allowed: use http, https or git")


async def enqueue(request: web.Request, kind: str, user: str, args: dict) -> web.Response:
    rt = request.app[RUNTIME]
    job = await rt.jobs.create(kind, user, args)
    message = dramatiq.Message(queue_name=QUEUE, actor_name=kind, args=(job.id,), kwargs={}, options={})
    # Broker.enqueue blocks (sync Redis client): keep it off the event loop.
    await asyncio.get_running_loop().run_in_executor(None, request.app[BROKER].enqueue, message)
    return web.json_response(
        {"job": job.id, "state": job.state, "kind": kind, "links": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}},
        status=202,
    )


# -- users -----------------------------------------------------------------------------------------
async def add_user(request: web.Request) -> web.Response:
    await caller(request)
    if not request["admin"]:
        raise Forbidden("only an admin can add users")
    data = await body(request, "name")
    token = await request.app[USERS].add(data["name"], admin=bool(data.get("admin")))
    return web.json_response({"name": data["name"], "token": token}, status=201)


async def whoami(request: web.Request) -> web.Response:
    user = await caller(request)
    return web.json_response({"name": user, "admin": request["admin"]})


# -- apps ------------------------------------------------------------------------------------------
async def deploy_app(request: web.Request) -> web.Response:
    user = await caller(request)
    data = await body(request, "url")
    app = service_arg(data.get("app") or data.get("service") or data.get("username_servicename"), user)
    check_source_url(data["url"], request.app[SETTINGS])
    return await enqueue(request, "deploy", user, {"user": user, "app": app, "url": data["url"]})


async def list_services(request: web.Request) -> web.Response:
    user = await caller(request)
    asked = request.query.get("user")
    if asked is not None and asked != user:
        raise Forbidden(f"you are {user!r}: you can list only your own services")
    names = apps.list_apps(request.app[SETTINGS], user)
    return web.json_response({"user": user, "services": names, "apps": [f"{user}_{n}" for n in names]})


async def get_app(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    settings = request.app[SETTINGS]
    spec = apps.spec(settings, user, app)
    url = await apps.url(request.app[RUNTIME].store, user, app)
    return web.json_response({"app": app, "service": f"{user}_{app}", "kind": spec.kind, "url": url,
                              "parameters": spec.parameters, "para_str": ",".join(spec.parameters)})


async def get_service_url(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    url = await apps.url(request.app[RUNTIME].store, user, app)
    if url is None:
        raise NotFound(f"app {app!r} is not deployed")
    return web.json_response({"app": app, "url": url})


async def get_parameters(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    spec = apps.spec(request.app[SETTINGS], user, app)
    return web.json_response({"app": app, "parameters": spec.parameters, "para_str": ",".join(spec.parameters)})


async def cat_app(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    spec = apps.spec(request.app[SETTINGS], user, app)
    return web.json_response({"app": app, "file": spec.filename, "text": spec.text})


def _launch_params(data: dict, spec: profile.AppSpec) -> dict:
    params = data.get("params", {})
    if isinstance(params, str):  # the seed's para_str
        params = profile.para_str_to_params(params, spec.parameters)
    if "para_str" in data:
        params = profile.para_str_to_params(data["para_str"], spec.parameters)
    return profile.check_values(params, spec.parameters)


async def start_common(request: web.Request) -> web.Response:
    user = await caller(request)
    settings = request.app[SETTINGS]
    app = service_arg(request.match_info["app"], user)
    data = await body(request)
    spec = apps.spec(settings, user, app)
    if spec.kind != "common":
        raise BadRequest(f"app {app!r} is an MPI app: use start_mpi")
    params = _launch_params(data, spec)
    count = data.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= settings.max_count):
        raise BadRequest(f"count must be a whole number from 1 to {settings.max_count}")
    return await enqueue(request, "start_common", user, {"user": user, "app": app, "params": params, "count": count})


async def start_mpi(request: web.Request) -> web.Response:
    user = await caller(request)
    settings = request.app[SETTINGS]
    app = service_arg(request.match_info["app"], user)
    data = await body(request)
    spec = apps.spec(settings, user, app)
    if spec.kind != "mpi":
        raise BadRequest(f"app {app!r} has no mpi.xml: use start_common")
    params = _launch_params(data, spec)
    return await enqueue(request, "start_mpi", user, {"user": user, "app": app, "params": params})


# -- instances -------------------------------------------------------------------------------------
async def list_instances(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rt = request.app[RUNTIME]
    rows = await instances.list_instances(rt, user, app)
    return web.json_response({"app": app, "count": len(rows), "instances": rows})


async def get_instances_num(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rows = await instances.list_instances(request.app[RUNTIME], user, app)
    return web.json_response({"app": app, "count": len(rows)})


async def get_instance(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await instances.instance_status(request.app[RUNTIME], inst))


async def get_port(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await instances.get_port(request.app[RUNTIME], inst))


async def instance_profile(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(instances.instance_profile(request.app[SETTINGS], inst))


async def instance_unit(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    text = await request.app[RUNTIME].engine.unit_text(inst.name)
    if text is None:
        raise NotFound(f"no instance {inst.name!r}")
    return web.json_response({"instance": inst.name, "unit": inst.unit, "text": text})


async def stop_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await instances.stop_instance(request.app[RUNTIME], inst))


async def start_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await instances.start_instance(request.app[RUNTIME], inst))


async def get_journal(request: web.Request) -> web.StreamResponse:
    inst = await instance_of(request)
    rt = request.app[RUNTIME]
    try:
        lines = int(request.query.get("lines", "100"))
    except ValueError:
        raise BadRequest("lines must be a whole number") from None
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    await instances.require_instance(rt, inst)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    async for line in rt.engine.journal(inst.name, lines=lines, follow=follow):
        await resp.write((line.rstrip("\n") + "\n").encode())
    await resp.write_eof()
    return resp


# -- jobs and events -------------------------------------------------------------------------------
async def list_jobs(request: web.Request) -> web.Response:
    user = await caller(request)
    state = request.query.get("state")
    if state and state not in {s.value for s in JobState}:
        raise BadRequest(f"state must be one of {', '.join(s.value for s in JobState)}")
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "100"))))
    except ValueError:
        raise BadRequest("limit must be a whole number") from None
    jobs = await request.app[RUNTIME].jobs.list(user, state, limit)
    return web.json_response({"jobs": [j.to_json() for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    user = await caller(request)
    job = await request.app[RUNTIME].jobs.get(request.match_info["id"], user)
    return web.json_response(job.to_json())


async def cancel_job(request: web.Request) -> web.Response:
    user = await caller(request)
    jobs = request.app[RUNTIME].jobs
    job = await jobs.get(request.match_info["id"], user)
    job = await jobs.request_cancel(job)
    return web.json_response(job.to_json(), status=202 if job.state == "running" else 200)


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


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/health", health),
        web.post("/v1/users", add_user),
        web.get("/v1/whoami", whoami),
        web.post("/v1/apps", deploy_app),
        web.get("/v1/apps", list_services),
        web.get("/v1/apps/{app}", get_app),
        web.get("/v1/apps/{app}/url", get_service_url),
        web.get("/v1/apps/{app}/parameters", get_parameters),
        web.get("/v1/apps/{app}/profile", cat_app),
        web.post("/v1/apps/{app}/instances", start_common),
        web.get("/v1/apps/{app}/instances", list_instances),
        web.get("/v1/apps/{app}/instances/count", get_instances_num),
        web.post("/v1/apps/{app}/mpi", start_mpi),
        web.get("/v1/instances/{name}", get_instance),
        web.get("/v1/instances/{name}/port", get_port),
        web.get("/v1/instances/{name}/journal", get_journal),
        web.get("/v1/instances/{name}/profile", instance_profile),
        web.get("/v1/instances/{name}/unit", instance_unit),
        web.post("/v1/instances/{name}/stop", stop_app),
        web.post("/v1/instances/{name}/start", start_app),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.post("/v1/jobs/{id}/cancel", cancel_job),
        web.get("/v1/jobs/{id}/events", job_events),
        web.get("/v1/events", user_events),
    ]


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[SETTINGS] = settings

    async def resources(app: web.Application):
        rt = Runtime(settings)
        await rt.open()
        users = Users(rt.jobs.redis, settings.namespace, settings.admin_token)
        await users.bootstrap()
        broker = make_broker(settings)
        broker.declare_queue(QUEUE)
        app[RUNTIME], app[USERS], app[BROKER] = rt, users, broker
        yield
        await rt.close()
        broker.close()

    app.cleanup_ctx.append(resources)
    app.add_routes(routes())
    return app


def serve(settings: Settings, port: int | None = None) -> None:
    web.run_app(make_app(settings), host=settings.host, port=port or settings.api_port, print=None,
                access_log=None)
