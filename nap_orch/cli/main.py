"""The ``nap`` command line: the seed's operations by their seed names, plus the platform's own.

Reads ``NAP_URL`` and ``NAP_TOKEN``. ``--json`` prints machine-readable output; ``--wait`` follows a
job's events until it ends and exits non-zero if it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from ..config import Settings
from ..engines.base import ENDED
from .client import ApiError, Client


def _out(args, data, text: str | None = None) -> None:
    if args.json or text is None:
        print(json.dumps(data, indent=2))
    else:
        print(text)


def _params(words: list[str]) -> dict | str:
    """``k=v`` pairs (space- or comma-separated) -> dict; anything else is the seed's para_str."""
    if not words:
        return {}
    if all("=" in w for w in words):
        parts = words if len(words) > 1 else _split_pairs(words[0])
        return dict(p.split("=", 1) for p in parts)
    return ",".join(words)


def _count(text: str) -> int:
    """``--count``: a whole number of at least 1 (0 would silently mean the profile's ``scale:``)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, not {n} (leave --count out to start the profile's scale:)"
        )
    return n


def _scale_count(text: str) -> int:
    """scale's N: a whole number of at least 0 (0 removes every live instance)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def _split_pairs(text: str) -> list[str]:
    # "a=1,b=2" -> ["a=1", "b=2"]; a comma inside a value is kept when not followed by "name=".
    return re.split(r",(?=[A-Za-z_][A-Za-z0-9_-]*=)", text)


class Bar:
    """A one-line progress bar on a terminal; plain lines otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def update(self, done: int, total: int, label: str = "") -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}   ")
        self.stream.flush()
        self.shown = True

    def line(self, text: str) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def watch(client: Client, job_id: str, quiet: bool = False) -> int:
    """Follow a job's events; 0 if it succeeded."""
    bar = Bar()
    final = None
    for ev in client.events(f"/v1/jobs/{job_id}/events"):
        kind, data = ev.get("event"), ev["data"]
        if kind == "log" and not quiet:
            bar.line(f"  {data['line']}")
        elif kind == "progress":
            bar.update(data["done"], data["total"], data.get("phase", ""))
        elif kind == "state":
            if not quiet:  # an error's first line: the details (a compiler's output) are in the log above
                error = (data.get("error") or "").splitlines()
                bar.line(f"job {job_id}: {data['state']}" + (f" ({error[0]})" if error else ""))
            final = data
    job = client.get(f"/v1/jobs/{job_id}")
    result = job.get("result") or {}
    if job["kind"] in ("start_common", "scale") and result.get("instances"):
        launched = result["instances"]
        running = sum(i["state"] == "running" for i in launched)
        print(f"running: {running}, failed: {len(launched) - running}, seconds: {result.get('seconds')}")
        for i in [i for i in launched if i["state"] != "running"][:20]:
            how = "failing (restarting)" if i.get("failing") else i["state"]
            print(f"  {i['name']}: {how}: {i.get('message') or ''}", file=sys.stderr)
        unhealthy = running < len(launched) and job["state"] == "succeeded"
    else:
        unhealthy = False
    if job["kind"] == "scale" and result:
        print(
            f"{result['app']}: {result['was']} -> {result['count']} live; removed {len(result['removed'])}, "
            f"started {result['started']}, failed {result['failed']}"
        )
    elif job["kind"] == "app_action" and result:
        print(f"{result['action']}: {result['done']} done, {len(result['failed'])} not")
    if unhealthy:  # the job did its part, but not all of the launch is up
        return 1
    if job["state"] != "succeeded":
        error = job.get("error") or ""
        shown = error.splitlines()[0] + " (the details are in the log above)" if not quiet and "\n" in error else error
        print(f"job {job_id} {job['state']}: {shown}", file=sys.stderr)
        return 1
    return 0 if final is None or final.get("state") == "succeeded" else 1


def _submitted(args, client: Client, resp: dict) -> int:
    if args.wait:
        if not args.json:
            print(f"job {resp['job']} queued")
        code = watch(client, resp["job"])
        if args.json:
            print(json.dumps(client.get(f"/v1/jobs/{resp['job']}"), indent=2))
        return code
    _out(args, resp, resp["job"])
    return 0


def cmd_remote(args) -> int:
    c = Client()
    op = args.op
    if op == "deploy_app":
        body: dict = {"app": args.service, "url": args.url}
        if args.batch is not None:
            body["batch"] = args.batch
        return _submitted(args, c, c.post("/v1/apps", body))
    if op == "releases":
        r = c.get(f"/v1/apps/{args.service}/releases")
        _out(args, r, "\n".join(release_row(x) for x in r["releases"]))
    elif op == "rollback":
        body = {"release": args.release, "batch": args.batch}
        return _submitted(args, c, c.post(f"/v1/apps/{args.service}/rollback", body))
    elif op == "list_services":
        r = c.get("/v1/apps", user=args.user)
        _out(args, r, "\n".join(r["apps"]))
    elif op == "get_service_url":
        r = c.get(f"/v1/apps/{args.service}/url")
        _out(args, r, r["url"])
    elif op == "get_parameters":
        r = c.get(f"/v1/apps/{args.service}/parameters")
        _out(args, r, r["para_str"])
    elif op == "cat_app":
        if "@" in args.name:
            r = c.get(f"/v1/instances/{args.name}/profile")
        else:
            r = c.get(f"/v1/apps/{args.name}/profile")
        _out(args, r, r["text"].rstrip("\n"))
    elif op == "cat_unit":
        r = c.get(f"/v1/instances/{args.instance}/unit")
        _out(args, r, r["text"].rstrip("\n"))
    elif op == "list_instances":
        r = c.get(f"/v1/apps/{args.service}/instances")
        _out(args, r, "\n".join(instance_row(i) for i in r["instances"]))
    elif op == "get_instances_num":
        r = c.get(f"/v1/apps/{args.service}/instances/count")
        _out(args, r, str(r["count"]))
    elif op == "get_port":
        r = c.get(f"/v1/instances/{args.instance}/port")
        _out(args, r, f"{r['host']}:{r['port']}")
    elif op == "get_journal":
        for line in c.lines(
            f"/v1/instances/{args.instance}/journal", lines=args.lines, follow=1 if args.follow else None
        ):
            print(line, flush=True)
    elif op in ("stop_app", "start_app", "restart_app") and args.all:
        return _submitted(args, c, c.post(f"/v1/apps/{args.instance}/{op.split('_')[0]}"))
    elif op in ("stop_app", "start_app", "restart_app"):
        r = c.post(f"/v1/instances/{args.instance}/{op.split('_')[0]}")
        _out(args, r, f"{r['name']}: {r['state']}")
    elif op == "remove_app" and args.all:
        if len(args.instances) != 1:
            print("error: remove_app --all takes one app (username_appname or appname)", file=sys.stderr)
            return 2
        return _submitted(args, c, c.delete(f"/v1/apps/{args.instances[0]}/instances"))
    elif op == "remove_app":
        code = 0
        for name in args.instances:
            try:
                r = c.delete(f"/v1/instances/{name}")
            except ApiError as e:
                print(f"error: {e.body.get('message') or e.body}", file=sys.stderr)
                code = 1
                continue
            _out(
                args,
                r,
                f"{r['instance']}: removed" + (f" ({', '.join(r['removed'])})" if len(r["removed"]) > 1 else ""),
            )
        return code
    elif op == "destroy_app":
        return _submitted(args, c, c.delete(f"/v1/apps/{args.service}", force=1 if args.force else None))
    elif op == "scale":
        body = {"count": args.count}
        if args.params:
            body["params"] = _params(args.params)
        return _submitted(args, c, c.put(f"/v1/apps/{args.service}/scale", body))
    elif op == "logs":
        for line in c.lines(f"/v1/apps/{args.service}/logs", lines=args.lines, follow=1 if args.follow else None):
            print(line, flush=True)
    elif op == "start_common":
        body = {"params": _params(args.params)}
        if args.count is not None:
            body["count"] = args.count
        return _submitted(args, c, c.post(f"/v1/apps/{args.service}/instances", body))
    elif op == "start_mpi":
        return _submitted(args, c, c.post(f"/v1/apps/{args.service}/mpi", {"params": _params(args.params)}))
    elif op == "jobs":
        r = c.get("/v1/jobs", state=args.state)
        _out(
            args,
            r,
            "\n".join(
                f"{j['id']}\t{j['kind']}\t{j['state']}\t{time.strftime('%F %T', time.localtime(j['created']))}"
                + (f"\t{j['error']}" if j.get("error") else "")
                for j in r["jobs"]
            ),
        )
    elif op == "job":
        r = c.get(f"/v1/jobs/{args.id}")
        _out(args, r)
    elif op == "watch":
        return watch(c, args.id)
    elif op == "cancel":
        r = c.post(f"/v1/jobs/{args.id}/cancel")
        _out(args, r, f"job {r['id']}: {r['state']}" + (" (cancel requested)" if r["state"] == "running" else ""))
    elif op == "user" and args.action == "add":
        if args.changes:
            print("error: nap user add NAME takes no NAME=VALUE (those are for nap user quota)", file=sys.stderr)
            return 2
        r = c.post("/v1/users", {"name": args.name, "admin": args.admin})
        _out(args, r, r["token"])
    elif op == "user":  # quota
        changes = {}
        for pair in args.changes:
            key, eq, value = pair.partition("=")
            if not eq:
                print(f"error: {pair!r} is not NAME=VALUE (instances=500, disk=20g, apps=default)", file=sys.stderr)
                return 2
            changes[key] = None if value == "default" else int(value) if value.isdigit() else value
        path = f"/v1/users/{args.name}/quota"
        r = c.post(path, changes) if changes else c.get(path)
        _out(args, r, quota_table(r))
    return 0


def quota_table(r: dict) -> str:
    """A user's quotas: each with what is used and the limit."""
    rows = [f"{name}\t{r['usage'][name]}\tof {r['limits'][name]}" for name in ("instances", "apps", "disk", "memory")]
    return f"quotas of {r['user']} (used, limit; disk and memory in bytes):\n" + "\n".join(rows)


def release_row(r: dict) -> str:
    """One line of ``releases``: name (* for the current), when, digest, URL."""
    when = time.strftime("%F %T", time.localtime(r.get("time", 0)))
    return f"{'*' if r['current'] else ' '} {r['name']}\t{when}\t{(r.get('digest') or '')[:19]}\t{r.get('url')}"


def instance_row(i: dict) -> str:
    """One line of ``list_instances``: name, state (with the exit code once it has ended: a running
    instance's last exit code is history), restarts, where it listens."""
    ended = i["state"] in ENDED and i.get("exit_code") is not None
    return (
        f"{i['name']}\t{i['state']}"
        + (f"({i['exit_code']})" if ended else "")
        + f"\trestarts={i['restarts']}"
        + (f"\t{i['port']['host']}:{i['port']['port']}" if i.get("port") else "")
    )


def cmd_local(args) -> int:
    """The platform's own processes. Their modules are imported here, not at the top: the remote
    operations (``nap get_port``) start without loading aiohttp's server, dramatiq or the engines."""
    # What the platform writes is its own: job staging, copies before they are given to their tenant,
    # journals, state (its children inherit this).
    os.umask(0o077)
    settings = Settings.from_env()
    if args.op == "api":
        from ..api.app import serve

        serve(settings, args.port)
    elif args.op == "agent":
        from ..engines.registry import run_daemon

        run_daemon(settings)
    elif args.op == "worker":
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "dramatiq",
                "workers",
                "--processes",
                str(args.processes),
                "--threads",
                str(args.threads),
            ],
        )
    elif args.op == "up":
        from .up import up

        return up(settings, args)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nap", description="nap-orch: deploy apps and run instances (NAP_URL, NAP_TOKEN)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="op", required=True, metavar="operation")

    def op(name: str, help: str, *aliases: str):
        sp = sub.add_parser(name, help=help, aliases=[name.replace("_", "-"), *aliases])
        sp.set_defaults(op=name)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        return sp

    s = op("deploy_app", "upload an app from a URL as its next release, rolling its instances onto it (a job)")
    s.add_argument("service", help="username_appname or appname")
    s.add_argument("url")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--batch", type=_count, help="instances the rollout replaces at once (default: a quarter)")
    op("releases", "an app's kept releases (* marks the current one)").add_argument("service")
    s = op("rollback", "make an earlier release current and roll the instances onto it (a job)")
    s.add_argument("service")
    s.add_argument("release", nargs="?", help="vN (default: the one before the current)")
    s.add_argument("--batch", type=_count, help="instances replaced at once (default: a quarter)")
    s.add_argument("--wait", action="store_true")
    op("list_services", "the apps you have deployed").add_argument("user", nargs="?")
    op("get_service_url", "the URL an app was deployed from").add_argument("service")
    op("get_parameters", "an app's {parameters} (comma-joined)").add_argument("service")
    op("cat_app", "an app's profile, or an instance's substituted profile").add_argument("name")
    op("cat_unit", "the rendered unit of an instance").add_argument("instance")
    op("list_instances", "instances of an app with their states").add_argument("service")
    op("get_instances_num", "how many instances an app has").add_argument("service")
    op("get_port", "host:port of a running instance").add_argument("instance")
    s = op("get_journal", "an instance's journal")
    s.add_argument("instance")
    s.add_argument("-n", "--lines", type=int, default=100)
    s.add_argument("-f", "--follow", action="store_true")
    for name, what in (
        ("stop_app", "stop an instance (--all: every instance of an app, a job)"),
        ("start_app", "start a stopped instance again (--all: every stopped one of an app, a job)"),
        ("restart_app", "stop and start an instance (--all: every instance of an app, a job)"),
    ):
        s = op(name, what)
        s.add_argument("instance", help="an instance; with --all, an app")
        s.add_argument("--all", action="store_true", help="every instance of the app named")
        s.add_argument("--wait", action="store_true", help="with --all: follow the job until it ends")
    s = op("remove_app", "remove instances: stopped, then their folders, ports and numbers released")
    s.add_argument("instances", nargs="+", metavar="instance")
    s.add_argument("--all", action="store_true", help="every instance of the app named (a job)")
    s.add_argument("--wait", action="store_true", help="with --all: follow the job until it ends")
    s = op("destroy_app", "remove an app whole: its instances (with --force), versions, URL (a job)")
    s.add_argument("service")
    s.add_argument("--force", action="store_true", help="remove its instances too")
    s.add_argument("--wait", action="store_true")
    s = op("scale", "start or remove instances until N of an app's run (a job)")
    s.add_argument("service")
    s.add_argument("count", type=_scale_count)
    s.add_argument("params", nargs="*", help="for new instances (default: those of the last one)")
    s.add_argument("--wait", action="store_true")
    s = op("logs", "every instance's journal of an app, merged in time order")
    s.add_argument("service")
    s.add_argument("-n", "--lines", type=int, default=100)
    s.add_argument("-f", "--follow", action="store_true")
    for name, what in (
        ("start_common", "start instances of an app (a job)"),
        ("start_mpi", "start an MPI run (a job)"),
    ):
        s = op(name, what)
        s.add_argument("service")
        s.add_argument("params", nargs="*", help="k=v pairs, or the seed's para_str (values comma-joined)")
        s.add_argument("--wait", action="store_true")
        if name == "start_common":
            s.add_argument("--count", type=_count, help="how many (default: the profile's scale:, else 1)")
    op("jobs", "your jobs").add_argument("--state")
    op("job", "one job's record").add_argument("id")
    op("watch", "follow a job's events until it ends").add_argument("id")
    op("cancel", "cancel a job").add_argument("id")
    s = op("user", "manage users (admin): nap user add NAME; nap user quota NAME [instances=N disk=20g ...]")
    s.add_argument("action", choices=["add", "quota"])
    s.add_argument("name")
    s.add_argument(
        "changes", nargs="*", help="quota: NAME=VALUE for instances, apps, disk, memory (VALUE default: reset)"
    )
    s.add_argument("--admin", action="store_true")
    op("api", "run the HTTP API").add_argument("--port", type=int)
    s = op("worker", "run job workers (dramatiq)")
    s.add_argument("--processes", "-p", type=int, default=2)
    s.add_argument("--threads", "-t", type=int, default=8)
    op("agent", "run the local engine's agent")
    s = op("up", "run the whole embedded stack")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    try:
        if args.op in ("api", "agent", "worker", "up"):
            return cmd_local(args)
        return cmd_remote(args)
    except ApiError as e:
        print(f"error: {e.body.get('message') or e.body}", file=sys.stderr)
        return 1 if e.status < 500 else 2
    except KeyboardInterrupt:
        return 130
