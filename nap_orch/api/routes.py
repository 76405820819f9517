"""The HTTP API's routes and handlers: authenticate, validate, call the domain code, answer.

Routes are declared in ``routes()``; a job is recorded and enqueued by ``enqueue`` and answered 202.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from aiohttp import web

from ..config import Settings
from ..errors import AppError, BadRequest, Conflict, Forbidden, NotFound
from ..http import json_object, json_type, stream_error
from ..jobs.broker import queued
from ..jobs.records import JobState
from ..names import InstanceName, check_name, control_character, split_service
from ..ops import apps, profile, quotas, releases
from ..ops.fetch import check_url
from ..ops.instances import lifecycle, manage
from ..ops.instances.logs import app_logs
from .context import OPENAPI, RUNTIME, SETTINGS, UNAVAILABLE, USERS, caller
from .sse import job_events, user_events

ALLOWED_SCHEMES = ("http", "https", "git", "git+http", "git+https")
MAX_URL = 2048  # characters of a deploy URL
MAX_NAME = 64  # characters of a name field (a user, an app, username_appname) before it is checked


def text_field(data: dict[str, Any], name: str, limit: int) -> str | None:
    """Body field ``name``: absent or null is None; else it must be a string of at most ``limit``
    characters (400 otherwise, naming the field)."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {json_type(value)}")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value


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
    if scheme == "file" or (not scheme and url.startswith("/")):
        if not settings.allow_local_sources:
            raise BadRequest("local sources (file:// or a path) are not allowed on this server")
    elif scheme not in ALLOWED_SCHEMES:
        raise BadRequest(f"URL scheme {scheme or '(none)'!r} is not allowed: use http, https or git")
    # The fetcher's own checks: no credentials, no odd spelling of an address, no address the fetch
    # policy refuses, a local path inside NAP_LOCAL_SOURCES_DIR and outside NAP_HOME.
    check_url(url, settings)


async def enqueue(request: web.Request, kind: str, user: str, args: dict[str, Any]) -> web.Response:
    settings = request.app[SETTINGS]
    # The record, its first event and its message, in one transaction (one round trip to Redis).
    job = await request.app[RUNTIME].jobs.create(
        kind, user, args, retention=settings.job_retention, enqueue=lambda job_id: queued(settings, kind, job_id)
    )
    return web.json_response(
        {
            "job": job.id,
            "state": job.state,
            "kind": kind,
            "links": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"},
        },
        status=202,
    )


# -- users -----------------------------------------------------------------------------------------
async def add_user(request: web.Request) -> web.Response:
    await caller(request)
    if not request["admin"]:
        raise Forbidden("only an admin can add users")
    data = await json_object(request, "name")
    name = text_field(data, "name", MAX_NAME)
    admin = data.get("admin", False)
    if not isinstance(admin, bool):
        raise BadRequest("admin must be true or false")
    token = await request.app[USERS].add(check_name(name, "user name"), admin=admin)
    return web.json_response({"name": name, "token": token}, status=201)


async def list_users(request: web.Request) -> web.Response:
    """The admin's view: every user, with its apps."""
    await caller(request)
    if not request["admin"]:
        raise Forbidden("only an admin can list users")
    settings = request.app[SETTINGS]
    users = await request.app[USERS].records()
    for u in users:
        u["apps"] = apps.list_apps(settings, u["name"])
    return web.json_response({"users": users})


async def quota_user(request: web.Request) -> str:
    """The user named in the path, for the caller to see (an admin, or that user) or to change (an
    admin); 404 for a user that does not exist."""
    caller_name = await caller(request)
    name = request.match_info["name"]
    if not request["admin"] and name != caller_name:
        raise Forbidden("only an admin can see another user's quota")
    if name not in await request.app[USERS].list():
        raise NotFound(f"no user {name[:40]!r}")
    return name


async def get_quota(request: web.Request) -> web.Response:
    name = await quota_user(request)
    store, settings = request.app[RUNTIME].store, request.app[SETTINGS]
    limits = await quotas.limits(store, settings, name)
    used = await quotas.usage(store, settings, name)
    return web.json_response({"user": name, "limits": limits.to_json(), "usage": used.to_json()})


async def set_quota(request: web.Request) -> web.Response:
    name = await quota_user(request)
    if not request["admin"]:
        raise Forbidden("only an admin can change quotas")
    changes = quotas.parse_changes(await json_object(request))
    store, settings = request.app[RUNTIME].store, request.app[SETTINGS]
    limits = await quotas.set_limits(store, settings, name, changes)
    used = await quotas.usage(store, settings, name)
    return web.json_response({"user": name, "limits": limits.to_json(), "usage": used.to_json()})


async def whoami(request: web.Request) -> web.Response:
    user = await caller(request)
    return web.json_response({"name": user, "admin": request["admin"]})


# -- apps ------------------------------------------------------------------------------------------
async def deploy_app(request: web.Request) -> web.Response:
    user = await caller(request)
    data = await json_object(request, "url")
    given = [text_field(data, f, MAX_NAME) for f in ("app", "service", "username_servicename")]
    named = next((g for g in given if g), None)
    if named is None:
        raise BadRequest("missing field: app (the app's name, or username_appname)")
    app = service_arg(named, user)
    url = text_field(data, "url", MAX_URL)
    if url is None:
        raise BadRequest("url must be a non-empty string")
    if control_character(url) is not None:
        raise BadRequest("url contains control characters or line breaks")
    settings = request.app[SETTINGS]
    check_source_url(url, settings)
    batch = _batch(data, settings)
    new_app = not apps.app_path(settings, user, app).is_dir()
    # disk: 1 byte more than used, that is, no deploy once the disk quota is reached
    await quotas.ensure(request.app[RUNTIME].store, settings, user, quotas.Amounts(apps=int(new_app), disk=1))
    args: dict[str, Any] = {"user": user, "app": app, "url": url}
    if batch is not None:
        args["batch"] = batch
    return await enqueue(request, "deploy", user, args)


def _batch(data: dict[str, Any], settings: Settings) -> int | None:
    """``batch``: how many instances a rollout replaces at once (absent: a quarter of them)."""
    batch = data.get("batch")
    if batch is not None and (
        not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= settings.max_count
    ):
        raise BadRequest(f"batch must be a whole number from 1 to {settings.max_count}")
    return batch


async def list_releases(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rt = request.app[RUNTIME]
    return web.json_response(await releases.listing(rt.store, request.app[SETTINGS], user, app))


async def rollback(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    settings, rt = request.app[SETTINGS], request.app[RUNTIME]
    data = await json_object(request)
    release = text_field(data, "release", 20)
    batch = _batch(data, settings)
    apps.require_app(settings, user, app)
    known = await releases.records(rt.store, user, app)
    if release is not None:
        n = releases.parse_release(release)
        if n not in known:
            kept = ", ".join(f"v{k}" for k in sorted(known)) or "none"
            raise NotFound(f"{app!r} has no release v{n} (kept: {kept})")
    elif not any(k < (releases.current(settings, user, app) or 0) for k in known):
        raise NotFound(f"{app!r} has no release before its current one to roll back to")
    for job in await rt.jobs.active_of(user):
        if job.args.get("app") == app and job.kind in ("deploy", "rollback"):
            raise Conflict(f"app {app!r} has a {job.kind} job {job.state}: {job.id}; wait for it or cancel it")
    return await enqueue(request, "rollback", user, {"user": user, "app": app, "release": release, "batch": batch})


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
    release = releases.current(settings, user, app)
    return web.json_response(
        {
            "app": app,
            "service": f"{user}_{app}",
            "kind": spec.kind,
            "url": url,
            "release": f"v{release}" if release else None,
            "parameters": spec.parameters,
            "para_str": ",".join(spec.parameters),
        }
    )


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


def _valid(spec: profile.AppSpec) -> None:
    """A launch of an app whose profile can't run (``memory: 99999999t``) is a bad request now, not a
    job that fails later."""
    try:
        profile.validate(spec)
    except AppError as e:
        raise BadRequest(e.message) from None


def _launch_params(data: dict[str, Any]) -> dict[str, Any] | str:
    """The parameters a launch's body gives: ``params`` (an object of name -> value, or the seed's
    para_str as a string) or ``para_str``; their types are checked here, their names and values against
    the app's profile by ``profile.launch_values``."""
    if "para_str" in data:
        para_str = data["para_str"]
        if not isinstance(para_str, str):
            raise BadRequest(f"para_str must be a string (values comma-joined), not {json_type(para_str)}")
        return para_str
    params = data.get("params", {})
    if not isinstance(params, (dict, str)):
        raise BadRequest(f"params must be an object of name -> value or the seed's para_str, not {json_type(params)}")
    return params


def _launch_values(given: dict[str, Any] | str, spec: profile.AppSpec) -> dict[str, str]:
    """Every parameter of the app, known and valid, else 400 naming the missing or wrong ones: a launch
    that can't run is refused at the door, not failed by its worker later."""
    if isinstance(given, str):
        given = profile.para_str_to_params(given, spec.parameters)
    return profile.launch_values(given, spec.parameters)


def _count(data: dict[str, Any], settings: Settings) -> int | None:
    """``count``: absent or null (the profile's ``scale:``, else 1), or a whole number from 1 to
    ``NAP_MAX_COUNT`` (not a boolean, a fraction or a string)."""
    count = data.get("count")
    if count is not None and (
        not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= settings.max_count
    ):
        raise BadRequest(f"count must be a whole number from 1 to {settings.max_count}")
    return count


async def _within_quota(
    request: web.Request, user: str, app: str, spec: profile.AppSpec, units: int, copies: int
) -> None:
    """A launch of ``units`` instances (``copies`` folders) that would take the user over a quota is
    refused now (403 quota_exceeded); its job checks again, counting its own reservations."""
    settings = request.app[SETTINGS]
    size = await quotas.app_size(settings, user, app)
    each = spec.memory or quotas.UNSET_MEMORY
    adding = quotas.Amounts(instances=units, memory=units * each, disk=size * copies)
    await quotas.ensure(request.app[RUNTIME].store, settings, user, adding)


async def start_common(request: web.Request) -> web.Response:
    user = await caller(request)
    settings = request.app[SETTINGS]
    app = service_arg(request.match_info["app"], user)
    data = await json_object(request)
    given = _launch_params(data)
    count = _count(data, settings)
    spec = apps.spec(settings, user, app)
    if spec.kind != "common":
        raise BadRequest(f"app {app!r} is an MPI app: use start_mpi")
    _valid(spec)
    params = _launch_values(given, spec)
    n = count or spec.scale or 1
    await _within_quota(request, user, app, spec, units=n, copies=n)
    return await enqueue(request, "start_common", user, {"user": user, "app": app, "params": params, "count": count})


async def start_mpi(request: web.Request) -> web.Response:
    user = await caller(request)
    settings = request.app[SETTINGS]
    app = service_arg(request.match_info["app"], user)
    data = await json_object(request)
    given = _launch_params(data)
    spec = apps.spec(settings, user, app)
    if spec.kind != "mpi":
        raise BadRequest(f"app {app!r} has no mpi.xml: use start_common")
    _valid(spec)
    params = _launch_values(given, spec)
    await _within_quota(request, user, app, spec, units=spec.hosts + 1, copies=1)
    return await enqueue(request, "start_mpi", user, {"user": user, "app": app, "params": params})


# -- instances -------------------------------------------------------------------------------------
async def list_instances(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rt = request.app[RUNTIME]
    rows = await manage.list_instances(rt, user, app)
    return web.json_response({"app": app, "count": len(rows), "instances": rows})


async def get_instances_num(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rows = await manage.list_instances(request.app[RUNTIME], user, app)
    return web.json_response({"app": app, "count": len(rows)})


async def get_instance(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await manage.instance_status(request.app[RUNTIME], inst))


async def get_port(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await manage.get_port(request.app[RUNTIME], inst))


async def instance_profile(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(manage.instance_profile(request.app[SETTINGS], inst))


async def instance_unit(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    text = await request.app[RUNTIME].engine.unit_text(inst.name)
    if text is None:
        raise NotFound(f"no instance {inst.name!r}")
    return web.json_response({"instance": inst.name, "unit": inst.unit, "text": text})


async def stop_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await manage.stop_instance(request.app[RUNTIME], inst))


async def start_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await manage.start_instance(request.app[RUNTIME], inst))


MAX_LINES = 100_000  # of a journal or an app's logs, in one answer


def _lines_query(request: web.Request) -> tuple[int, bool]:
    """``?lines=N`` (0 to ``MAX_LINES``, default 100) and ``?follow=1``."""
    try:
        lines = int(request.query.get("lines", "100"))
    except ValueError:
        raise BadRequest("lines must be a whole number") from None
    if not 0 <= lines <= MAX_LINES:
        raise BadRequest(f"lines must be from 0 to {MAX_LINES}")
    return lines, request.query.get("follow", "") in ("1", "true", "yes")


async def _stream_lines(request: web.Request, lines) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    try:
        async for line in lines:
            await resp.write((line.rstrip("\n") + "\n").encode())
    except ConnectionResetError:  # the client went away
        return resp
    except Exception as e:  # noqa: BLE001 - the status is sent: the stream's last line says why it ends
        await resp.write(f"nap: the stream ended early: {stream_error(e, UNAVAILABLE)['message']}\n".encode())
    await resp.write_eof()
    return resp


async def get_journal(request: web.Request) -> web.StreamResponse:
    inst = await instance_of(request)
    rt = request.app[RUNTIME]
    lines, follow = _lines_query(request)
    await manage.require_instance(rt, inst)
    return await _stream_lines(request, rt.engine.journal(inst.name, lines=lines, follow=follow))


async def get_app_logs(request: web.Request) -> web.StreamResponse:
    user, app = await app_of(request)
    lines, follow = _lines_query(request)
    apps.require_app(request.app[SETTINGS], user, app)
    return await _stream_lines(request, app_logs(request.app[RUNTIME], user, app, lines, follow))


# -- lifecycle -------------------------------------------------------------------------------------
async def remove_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    rt = request.app[RUNTIME]
    return web.json_response(await lifecycle.remove_instance(rt, rt.jobs.active_among, inst))


async def restart_app(request: web.Request) -> web.Response:
    inst = await instance_of(request)
    return web.json_response(await lifecycle.restart_instance(request.app[RUNTIME], inst))


async def _app_job(request: web.Request, action: str) -> web.Response:
    user, app = await app_of(request)
    apps.require_app(request.app[SETTINGS], user, app)
    return await enqueue(request, "app_action", user, {"user": user, "app": app, "action": action})


async def stop_all(request: web.Request) -> web.Response:
    return await _app_job(request, "stop")


async def start_all(request: web.Request) -> web.Response:
    return await _app_job(request, "start")


async def restart_all(request: web.Request) -> web.Response:
    return await _app_job(request, "restart")


async def remove_all(request: web.Request) -> web.Response:
    return await _app_job(request, "remove")


async def scale_app(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    settings = request.app[SETTINGS]
    data = await json_object(request, "count")
    count = data.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= settings.max_count:
        raise BadRequest(f"count must be a whole number from 0 to {settings.max_count}")
    spec = apps.spec(settings, user, app)
    if spec.kind != "common":
        raise BadRequest(f"app {app!r} is an MPI app: scale takes common apps (start_mpi starts a run)")
    _valid(spec)
    params = _launch_values(_launch_params(data), spec) if ("params" in data or "para_str" in data) else None
    rows = await lifecycle.common_instances(request.app[RUNTIME], user, app)
    more = count - sum(1 for _, st in rows if st.state in lifecycle.LIVE)
    if more > 0:
        await _within_quota(request, user, app, spec, units=more, copies=more)
    return await enqueue(request, "scale", user, {"user": user, "app": app, "count": count, "params": params})


async def destroy_app(request: web.Request) -> web.Response:
    user, app = await app_of(request)
    rt = request.app[RUNTIME]
    apps.require_app(request.app[SETTINGS], user, app)
    force = request.query.get("force", "") in ("1", "true", "yes")
    for job in await rt.jobs.active_of(user):
        if job.args.get("app") == app:
            raise Conflict(f"app {app!r} has a {job.kind} job {job.state}: {job.id}; wait for it or cancel it")
    held = set(await lifecycle.members(rt, user, app)) | set(await lifecycle.held_numbers(rt, user, app))
    if held and not force:
        raise Conflict(f"app {app!r} has {len(held)} instance(s): remove them first, or destroy with force")
    return await enqueue(request, "destroy", user, {"user": user, "app": app, "force": force})


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


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def routes() -> list[web.RouteDef]:
    return [
        web.get("/health", health),
        web.get("/v1/openapi.json", openapi_document),
        web.post("/v1/users", add_user),
        web.get("/v1/users", list_users),
        web.get("/v1/users/{name}/quota", get_quota),
        web.post("/v1/users/{name}/quota", set_quota),
        web.get("/v1/whoami", whoami),
        web.post("/v1/apps", deploy_app),
        web.get("/v1/apps", list_services),
        web.get("/v1/apps/{app}", get_app),
        web.delete("/v1/apps/{app}", destroy_app),
        web.put("/v1/apps/{app}/scale", scale_app),
        web.get("/v1/apps/{app}/releases", list_releases),
        web.post("/v1/apps/{app}/rollback", rollback),
        web.post("/v1/apps/{app}/stop", stop_all),
        web.post("/v1/apps/{app}/start", start_all),
        web.post("/v1/apps/{app}/restart", restart_all),
        web.delete("/v1/apps/{app}/instances", remove_all),
        web.get("/v1/apps/{app}/logs", get_app_logs),
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
        web.post("/v1/instances/{name}/restart", restart_app),
        web.delete("/v1/instances/{name}", remove_app),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.post("/v1/jobs/{id}/cancel", cancel_job),
        web.get("/v1/jobs/{id}/events", job_events),
        web.get("/v1/events", user_events),
    ]
