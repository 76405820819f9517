"""The API's OpenAPI 3.1 document, served at ``GET /v1/openapi.json``.

The document is built from the route table (``routes.routes()``, plus the routes the application adds
itself): each route's operation is looked up in ``OPERATIONS`` by its method and path, and a route that
has none makes ``document()`` raise, so the document cannot lose a route the API serves (a test builds it
and the API builds it at start). Path parameters come from the route's path; every operation that needs
a token says so, and lists the errors it can answer, each with the error body ``{"error", "message"}``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from importlib import metadata
from typing import Any

JSON = "application/json"
PARAM = re.compile(r"\{([^}]+)\}")

# -- schemas -----------------------------------------------------------------------------------------
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: Iterable[str] = (), **props: Schema) -> Schema:
    """An object with ``props``, of which ``required`` must be there; others may be added later (the
    answers grow fields over time, so clients must not reject unknown ones)."""
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
NUM: Schema = {"type": "number"}
ANY_OBJ: Schema = {"type": "object"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        ["error", "message"],
        error={"type": "string", "description": "the kind of error, e.g. bad_request, not_found, quota_exceeded"},
        message={"type": "string", "description": "what went wrong, for a person"},
    ),
    "JobAccepted": obj(
        ["job", "state", "kind", "links"],
        job={"type": "string", "description": "the job's id"},
        state=STR,
        kind=STR,
        links=obj(["self", "events"], self=STR, events=STR),
    ),
    "Job": obj(
        ["id", "kind", "user", "args", "state", "created"],
        id=STR,
        kind={"type": "string", "description": "deploy, start_common, start_mpi, app_action, scale, rollback, destroy"},
        user=STR,
        args=ANY_OBJ,
        state={"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        created={"type": "number", "description": "seconds since the epoch"},
        started=nullable(NUM),
        finished=nullable(NUM),
        attempts=INT,
        error=nullable(STR),
        result=nullable(ANY_OBJ),
        cancel_requested=BOOL,
    ),
    "Jobs": obj(["jobs"], jobs={"type": "array", "items": ref("Job")}),
    "Instance": obj(
        ["name", "state"],
        name={"type": "string", "description": "user_app_common@N, user_app_mpi_master@N or user_app_mpi_slave@N-K"},
        state={"type": "string", "description": "starting, running, exited, failed, oom, stopped, removed"},
        host=nullable(STR),
        pid=nullable(INT),
        exit_code=nullable(INT),
        restarts=INT,
        since=nullable(NUM),
        message=STR,
        port=nullable(ANY_OBJ),
    ),
    "Instances": obj(
        ["app", "count", "instances"], app=STR, count=INT, instances={"type": "array", "items": ref("Instance")}
    ),
    "Count": obj(["app", "count"], app=STR, count=INT),
    "Port": obj(["instance", "host", "port"], instance=STR, host=STR, port=INT),
    "File": obj(["file", "text"], app=STR, instance=STR, file=STR, text=STR),
    "Unit": obj(["instance", "unit", "text"], instance=STR, unit=STR, text=STR),
    "App": obj(
        ["app", "service", "kind", "parameters", "para_str"],
        app=STR,
        service=STR,
        kind={"type": "string", "enum": ["common", "mpi"]},
        url=nullable(STR),
        release=nullable(STR),
        parameters={"type": "array", "items": STR},
        para_str=STR,
    ),
    "Apps": obj(
        ["user", "services", "apps"],
        user=STR,
        services={"type": "array", "items": STR, "description": "app names"},
        apps={"type": "array", "items": STR, "description": "the seed's username_appname"},
    ),
    "Url": obj(["app", "url"], app=STR, url=STR),
    "Parameters": obj(
        ["app", "parameters", "para_str"], app=STR, parameters={"type": "array", "items": STR}, para_str=STR
    ),
    "Releases": obj(
        ["app", "current", "releases"],
        app=STR,
        current=nullable(STR),
        releases={
            "type": "array",
            "items": obj(["release", "name", "current"], release=INT, name=STR, current=BOOL, url=STR),
        },
    ),
    "Quota": obj(
        ["user", "limits", "usage"],
        user=STR,
        limits=obj(instances=INT, apps=INT, disk=INT, memory=INT),
        usage=obj(instances=INT, apps=INT, disk=INT, memory=INT),
    ),
    "User": obj(["name", "token"], name=STR, token={"type": "string", "description": "shown once"}),
    "Whoami": obj(["name", "admin"], name=STR, admin=BOOL),
    "Health": obj(["ok"], ok=BOOL),
    "Params": {
        "description": "an object of parameter name -> value, or the seed's para_str (values comma-joined)",
        "anyOf": [{"type": "object", "additionalProperties": {"type": "string"}}, STR],
    },
}

# -- parameters and bodies -----------------------------------------------------------------------
NAME = "[a-z][a-z0-9-]{0,30}"
PATH_PARAMS: dict[str, Schema] = {
    "app": {
        "type": "string",
        "pattern": f"^{NAME}(_{NAME})?$",
        "description": "an app's name, or the seed's username_appname (the user must be the caller)",
    },
    "name": {
        "type": "string",
        "pattern": f"^{NAME}_{NAME}_(common|mpi_master|mpi_slave)@[0-9]{{1,9}}(-[0-9]{{1,4}})?$",
        "description": "an instance's name: user_app_common@N, user_app_mpi_master@N or user_app_mpi_slave@N-K",
    },
    "user": {"type": "string", "pattern": f"^{NAME}$", "description": "a user's name"},
    "id": {"type": "string", "description": "a job's id"},
}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


FLAG: Schema = {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]}
LINES = [
    query("lines", {"type": "integer", "minimum": 0, "maximum": 100_000}, "how many of the last lines (default 100)"),
    query("follow", FLAG, "1: keep the answer open and send new lines as they come"),
]
EVENTS = [
    query("follow", FLAG, "0: end once the events so far are sent (default: follow)"),
    query("last_id", STR, "send the events after this one (as the Last-Event-ID header)"),
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": STR, "description": "as last_id"},
]

PARAMS_FIELDS: dict[str, Schema] = {
    "params": ref("Params"),
    "para_str": {"type": "string", "description": "the seed's form: the values comma-joined, in order"},
}
BATCH: Schema = {"type": "integer", "minimum": 1, "description": "instances a rollout replaces at once"}


def body(schema: Schema, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


# -- responses -------------------------------------------------------------------------------------
ERROR_TEXT = {
    400: "bad request: a field, parameter or body that is wrong, said in the message",
    401: "no token, or an unknown one",
    403: "not allowed (not an admin, another user's app, a quota that would be exceeded)",
    404: "no such thing (another user's is not found either)",
    409: "conflicts with what is going on (a job of the app still running, instances left)",
    413: "the request body is too large",
    429: "a per-user limit (request rate, event streams): try again after Retry-After",
    503: "a backend (Redis, the engine) is unreachable or the server is at a limit: try again after Retry-After",
}


def ok(status: int, schema: Schema | None, description: str, media: str = JSON) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return {str(status): out}


def errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": ERROR_TEXT[s], "content": {JSON: {"schema": ref("Error")}}} for s in sorted(statuses)
    }


TEXT_LINES = {"type": "string", "description": "lines of text"}
# Before OpenAPI 3.2 (itemSchema), an event stream's schema describes each of its events.
SSE = obj(
    ["data"],
    id={"type": "string", "description": "<milliseconds>-<sequence>: resume after it with Last-Event-ID"},
    event={"type": "string", "description": "state, log, progress ...; error: the stream ends early, data says why"},
    data={"type": "string", "description": "JSON: job, kind, t (seconds since the epoch) and the event's fields"},
)

# What any authenticated request may answer besides its own errors.
AUTHED = (400, 401, 429, 503)


def op(
    summary: str,
    answers: dict[str, Any],
    *codes: int,
    params: list[dict[str, Any]] | None = None,
    request: dict[str, Any] | None = None,
    public: bool = False,
    tag: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": summary, "responses": {**answers, **errors(*codes, *(() if public else AUTHED))}}
    if tag:
        out["tags"] = [tag]
    if params:
        out["parameters"] = params
    if request:
        out["requestBody"] = request
    if public:
        out["security"] = []
    if request:
        out["responses"].update(errors(413))
    return out


ACCEPTED = ok(202, ref("JobAccepted"), "the job is recorded and queued: follow it at links.events")

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/health"): op("whether the API answers", ok(200, ref("Health"), "it does"), public=True, tag="server"),
    ("GET", "/v1/openapi.json"): op(
        "this document", ok(200, ANY_OBJ, "the OpenAPI document"), public=True, tag="server"
    ),
    ("GET", "/metrics"): op(
        "this host's Prometheus metrics (an admin's token, or NAP_METRICS_TOKEN)",
        ok(200, {"type": "string", "description": "Prometheus's text format"}, "the metrics", media="text/plain"),
        403,
        tag="server",
    ),
    ("GET", "/"): op(
        "the web manager: a page that signs in with a token and shows apps, instances and jobs",
        ok(200, {"type": "string"}, "the page", media="text/html"),
        public=True,
        tag="web",
    ),
    ("GET", "/web/app.js"): op(
        "the web manager's script",
        ok(200, {"type": "string"}, "the script", media="text/javascript"),
        public=True,
        tag="web",
    ),
    ("GET", "/web/style.css"): op(
        "the web manager's style sheet",
        ok(200, {"type": "string"}, "the style sheet", media="text/css"),
        public=True,
        tag="web",
    ),
    ("POST", "/v1/users"): op(
        "add a user (admin): its token is in the answer, once",
        ok(201, ref("User"), "the user and its token"),
        403,
        409,
        request=body(obj(["name"], name=STR, admin=BOOL)),
        tag="users",
    ),
    ("GET", "/v1/users"): op(
        "every user with its apps (admin)",
        ok(
            200,
            obj(
                ["users"],
                users={
                    "type": "array",
                    "items": obj(
                        ["name", "admin", "apps"],
                        name=STR,
                        admin=BOOL,
                        created=nullable(NUM),
                        apps={"type": "array", "items": STR},
                    ),
                },
            ),
            "the users",
        ),
        403,
        tag="users",
    ),
    ("GET", "/v1/users/{name}/quota"): op(
        "a user's quotas and what it uses (an admin, or that user)",
        ok(200, ref("Quota"), "limits and usage"),
        403,
        404,
        tag="users",
    ),
    ("POST", "/v1/users/{name}/quota"): op(
        "change a user's quotas (admin): numbers, sizes like 20g, or null for the default",
        ok(200, ref("Quota"), "the new limits and usage"),
        403,
        404,
        request=body(
            obj(
                instances=nullable(INT),
                apps=nullable(INT),
                disk=nullable({"anyOf": [INT, STR]}),
                memory=nullable({"anyOf": [INT, STR]}),
            )
        ),
        tag="users",
    ),
    ("GET", "/v1/whoami"): op("the caller", ok(200, ref("Whoami"), "name and whether an admin"), tag="users"),
    ("POST", "/v1/apps"): op(
        "deploy_app: upload an app from a URL as its next release (a job)",
        ACCEPTED,
        403,
        request=body(
            obj(
                ["url"],
                app={"type": "string", "description": "the app's name, or username_appname"},
                service={"type": "string", "description": "as app (the seed's word)"},
                username_servicename={"type": "string", "description": "as app (the seed's word)"},
                url={"type": "string", "description": "http(s) or git URL of an archive or a repository"},
                batch=BATCH,
            )
        ),
        tag="apps",
    ),
    ("GET", "/v1/apps"): op(
        "list_services: the caller's apps",
        ok(200, ref("Apps"), "the apps"),
        403,
        params=[query("user", STR, "the caller's own name (the seed's form); another user's is 403")],
        tag="apps",
    ),
    ("GET", "/v1/apps/{app}"): op(
        "an app: its kind, URL, release and parameters", ok(200, ref("App"), "the app"), 403, 404, tag="apps"
    ),
    ("DELETE", "/v1/apps/{app}"): op(
        "destroy_app: remove an app whole (a job); with force=1 its instances too",
        ACCEPTED,
        403,
        404,
        409,
        params=[query("force", FLAG, "1: remove its instances too")],
        tag="apps",
    ),
    ("PUT", "/v1/apps/{app}/scale"): op(
        "scale: start or remove instances until count of them run (a job)",
        ACCEPTED,
        403,
        404,
        request=body(obj(["count"], count={"type": "integer", "minimum": 0}, **PARAMS_FIELDS)),
        tag="lifecycle",
    ),
    ("GET", "/v1/apps/{app}/releases"): op(
        "releases: the app's kept releases, newest first",
        ok(200, ref("Releases"), "the releases"),
        403,
        404,
        tag="lifecycle",
    ),
    ("POST", "/v1/apps/{app}/rollback"): op(
        "rollback: make an earlier release current and roll the instances onto it (a job)",
        ACCEPTED,
        403,
        404,
        409,
        request=body(obj(release={"type": "string", "description": "vN (default: the one before)"}, batch=BATCH)),
        tag="lifecycle",
    ),
    ("POST", "/v1/apps/{app}/stop"): op("stop every instance of the app (a job)", ACCEPTED, 403, 404, tag="lifecycle"),
    ("POST", "/v1/apps/{app}/start"): op(
        "start every stopped instance of the app (a job)", ACCEPTED, 403, 404, tag="lifecycle"
    ),
    ("POST", "/v1/apps/{app}/restart"): op(
        "restart every instance of the app (a job)", ACCEPTED, 403, 404, tag="lifecycle"
    ),
    ("DELETE", "/v1/apps/{app}/instances"): op(
        "remove every instance of the app (a job)", ACCEPTED, 403, 404, tag="lifecycle"
    ),
    ("GET", "/v1/apps/{app}/logs"): op(
        "logs: every instance's journal of the app, merged in time order",
        ok(200, TEXT_LINES, "the lines", media="text/plain"),
        403,
        404,
        params=LINES,
        tag="instances",
    ),
    ("GET", "/v1/apps/{app}/url"): op(
        "get_service_url: the URL the app was deployed from", ok(200, ref("Url"), "the URL"), 403, 404, tag="apps"
    ),
    ("GET", "/v1/apps/{app}/parameters"): op(
        "get_parameters: the app's {parameters}", ok(200, ref("Parameters"), "the parameters"), 403, 404, tag="apps"
    ),
    ("GET", "/v1/apps/{app}/profile"): op(
        "cat_app: the app's profile", ok(200, ref("File"), "the profile's text"), 403, 404, tag="apps"
    ),
    ("POST", "/v1/apps/{app}/instances"): op(
        "start_common: start count numbered instances of an ordinary app (a job)",
        ACCEPTED,
        403,
        404,
        request=body(obj(count={"type": "integer", "minimum": 1}, **PARAMS_FIELDS), required=False),
        tag="instances",
    ),
    ("GET", "/v1/apps/{app}/instances"): op(
        "list_instances: the app's instances and their states",
        ok(200, ref("Instances"), "the instances"),
        403,
        404,
        tag="instances",
    ),
    ("GET", "/v1/apps/{app}/instances/count"): op(
        "get_instances_num: how many instances the app has",
        ok(200, ref("Count"), "the count"),
        403,
        404,
        tag="instances",
    ),
    ("POST", "/v1/apps/{app}/mpi"): op(
        "start_mpi: start an MPI run, a master and its slaves (a job)",
        ACCEPTED,
        403,
        404,
        request=body(obj(**PARAMS_FIELDS), required=False),
        tag="instances",
    ),
    ("GET", "/v1/instances/{name}"): op(
        "an instance's state", ok(200, ref("Instance"), "the instance"), 404, tag="instances"
    ),
    ("GET", "/v1/instances/{name}/port"): op(
        "get_port: host and port of a running instance",
        ok(200, ref("Port"), "where it listens"),
        404,
        409,
        tag="instances",
    ),
    ("GET", "/v1/instances/{name}/journal"): op(
        "get_journal: an instance's journal",
        ok(200, TEXT_LINES, "the lines", media="text/plain"),
        404,
        params=LINES,
        tag="instances",
    ),
    ("GET", "/v1/instances/{name}/profile"): op(
        "cat_app of an instance: its profile with its parameters substituted",
        ok(200, ref("File"), "the profile"),
        404,
        tag="instances",
    ),
    ("GET", "/v1/instances/{name}/unit"): op(
        "cat_unit: the instance's rendered unit", ok(200, ref("Unit"), "the unit"), 404, tag="instances"
    ),
    ("POST", "/v1/instances/{name}/stop"): op(
        "stop_app: stop an instance", ok(200, ref("Instance"), "its state"), 404, 409, tag="instances"
    ),
    ("POST", "/v1/instances/{name}/start"): op(
        "start_app: start a stopped instance", ok(200, ref("Instance"), "its state"), 404, 409, tag="instances"
    ),
    ("POST", "/v1/instances/{name}/restart"): op(
        "restart_app: stop and start an instance", ok(200, ref("Instance"), "its state"), 404, 409, tag="lifecycle"
    ),
    ("DELETE", "/v1/instances/{name}"): op(
        "remove_app: remove an instance (an MPI run whole): stopped, its folder, port and number released",
        ok(200, ANY_OBJ, "what was removed"),
        404,
        409,
        tag="lifecycle",
    ),
    ("GET", "/v1/jobs"): op(
        "the caller's jobs, newest first",
        ok(200, ref("Jobs"), "the jobs"),
        params=[
            query(
                "state",
                {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "only these",
            ),
            query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most this many (default 100)"),
        ],
        tag="jobs",
    ),
    ("GET", "/v1/jobs/{id}"): op("a job's record", ok(200, ref("Job"), "the job"), 404, tag="jobs"),
    ("POST", "/v1/jobs/{id}/cancel"): op(
        "cancel a job (a running one stops at its next step: 202)",
        {**ok(200, ref("Job"), "cancelled (or ended already)"), **ok(202, ref("Job"), "asked to stop")},
        404,
        409,
        tag="jobs",
    ),
    ("GET", "/v1/jobs/{id}/events"): op(
        "a job's events, replayed then live until it ends",
        ok(200, SSE, "the events", media="text/event-stream"),
        404,
        params=EVENTS,
        tag="jobs",
    ),
    ("GET", "/v1/events"): op(
        "the caller's events: every job's",
        ok(200, SSE, "the events", media="text/event-stream"),
        params=EVENTS,
        tag="jobs",
    ),
}


def path_schema(path: str, name: str) -> Schema:
    """The schema of path parameter ``name``: ``{name}`` is a user's in /v1/users, else an instance's."""
    key = "user" if path.startswith("/v1/users/") else name
    return dict(PATH_PARAMS[key])


def operation(method: str, path: str) -> dict[str, Any]:
    """The documented operation of a route, with its path parameters; KeyError if it has none."""
    out = copy.deepcopy(OPERATIONS[(method, path)])
    names = PARAM.findall(path)
    if names:
        given = out.get("parameters", [])
        out["parameters"] = [
            {"name": n, "in": "path", "required": True, "schema": path_schema(path, n)} for n in names
        ] + given
    out["operationId"] = re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_")
    return out


def document(routes: Iterable[tuple[str, str]], server_url: str = "/") -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (method, path pairs, HEAD left out). Raises ``KeyError``
    naming a route that ``OPERATIONS`` does not describe, and one that it describes but the API does
    not serve: the two cannot drift apart."""
    paths: dict[str, dict[str, Any]] = {}
    served = set()
    for method, path in routes:
        if method == "HEAD":
            continue
        served.add((method, path))
        if (method, path) not in OPERATIONS:
            raise KeyError(f"route {method} {path} has no operation in nap_orch/api/openapi.py")
        paths.setdefault(path, {})[method.lower()] = operation(method, path)
    stale = set(OPERATIONS) - served
    if stale:
        raise KeyError(f"documented but not served: {', '.join(f'{m} {p}' for m, p in sorted(stale))}")
    try:
        version = metadata.version("nap-orch")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nap-orch",
            "version": version,
            "description": (
                "A small PaaS control plane: deploy apps from URLs, start numbered instances and MPI runs, "
                "follow the jobs that do it. Every error is a JSON body {error, message}; jobs answer 202 "
                "with links to their record and event stream."
            ),
        },
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a user's token (nap user add)"}
            },
        },
    }
