"""The ``nap`` command line: the seed's operations by their seed names (and their hyphen aliases), plus
the platform's own.

Reads ``NAP_URL`` and ``NAP_TOKEN``. Each remote operation is a small function of the API's client, its
arguments and the command's ``Output`` (text for people, or exactly one JSON document with ``--json``,
errors too: ``output.py``); ``--wait`` follows a job's events until it ends (``watch.py``) and exits
non-zero if it failed. ``nap completion bash|zsh|tcsh`` prints a completion script made from the
parser by shtab (static: completing costs no Python start).
"""

from __future__ import annotations

import argparse
import contextvars
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import shtab

from ..config import Settings
from .client import ApiError, Client
from .output import CommandError, Output
from .text import event_line, instance_row, job_row, job_text, quota_table, release_row
from .watch import follow, outcome

LOCAL_OPS = ("api", "agent", "worker", "up")
SHELLS = ("bash", "zsh", "tcsh")  # shtab's
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def version() -> str:
    try:
        return importlib.metadata.version("nap-orch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


# -- arguments -------------------------------------------------------------------------------------------
def _params(words: list[str]) -> dict | str:
    """``k=v`` pairs (space- or comma-separated) -> dict; anything else is the seed's para_str."""
    if not words:
        return {}
    if all("=" in w for w in words):
        parts = words if len(words) > 1 else _split_pairs(words[0])
        return dict(p.split("=", 1) for p in parts)
    return ",".join(words)


def _split_pairs(text: str) -> list[str]:
    # "a=1,b=2" -> ["a=1", "b=2"]; a comma inside a value is kept when not followed by "name=".
    return re.split(r",(?=[A-Za-z_][A-Za-z0-9_-]*=)", text)


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


def _not_negative(text: str) -> int:
    """A whole number of at least 0: scale's N (0 removes every live instance), a count of lines."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


# -- the parser --------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A command line the parser refuses; ``main`` says so as text (argparse's way) or as JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser
        self.message = message

    def show(self, stream) -> None:
        self.parser.print_usage(stream)
        stream.write(f"{self.parser.prog}: error: {self.message}\n")


class ShowVersion(Exception):
    """``--version`` was given: ``main`` prints it (as JSON with ``--json``)."""


# True while main() parses: the parser then raises, so that main can answer in JSON; parse_args called
# by anyone else behaves as argparse's (prints, exits).
_RAISING: contextvars.ContextVar[bool] = contextvars.ContextVar("nap_parser_raising", default=False)


class NapParser(argparse.ArgumentParser):
    """argparse's parser, whose refusals ``main`` can answer as JSON (``parse``)."""

    def error(self, message: str) -> NoReturn:
        if _RAISING.get():
            raise UsageError(self, message)
        super().error(message)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """Arguments, or UsageError / ShowVersion."""
        token = _RAISING.set(True)
        try:
            return self.parse_args(argv)
        finally:
            _RAISING.reset(token)


class _Version(argparse.Action):
    """``--version``: on stdout, or as JSON (``ShowVersion``) when ``main`` parses."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        if _RAISING.get():
            raise ShowVersion
        print(f"nap {version()}")
        parser.exit()


def parser() -> NapParser:
    p = NapParser(
        prog="nap",
        description="nap-orch: deploy apps and run instances. Talks to the API at NAP_URL with the token NAP_TOKEN.",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout, errors too")
    p.add_argument("--version", action=_Version, help="print nap's version and exit")
    sub = p.add_subparsers(
        dest="op", required=True, metavar="operation", help="one of these (nap OPERATION --help: its arguments)"
    )

    def op(name: str, help: str, *aliases: str) -> argparse.ArgumentParser:
        hyphen = name.replace("_", "-")
        sp = sub.add_parser(
            name, help=help, description=help, aliases=[*([hyphen] if hyphen != name else []), *aliases]
        )
        sp.set_defaults(op=name)
        if name not in LOCAL_OPS:
            sp.add_argument(
                "--json",
                action="store_true",
                default=argparse.SUPPRESS,
                help="print exactly one JSON document on stdout, errors too",
            )
        return sp

    def wait(s: argparse.ArgumentParser, what: str = "") -> None:
        s.add_argument(
            "--wait",
            action="store_true",
            help=f"{what}follow the job's log and progress until it ends; exit non-zero if it failed",
        )

    service = "the app: username_appname or appname"
    instance = "an instance: username_appname_common@N (or an MPI run's master or slave)"

    s = op("deploy_app", "upload an app from a URL as its next release, rolling its instances onto it (a job)")
    s.add_argument("service", help=service)
    s.add_argument("url", help="http(s) archive, git repository, or (if the server allows) a local path")
    wait(s)
    s.add_argument("--batch", type=_count, help="instances the rollout replaces at once (default: a quarter)")
    op("releases", "an app's kept releases (* marks the current one)").add_argument("service", help=service)
    s = op("rollback", "make an earlier release current and roll the instances onto it (a job)")
    s.add_argument("service", help=service)
    s.add_argument("release", nargs="?", help="vN (default: the one before the current)")
    s.add_argument("--batch", type=_count, help="instances replaced at once (default: a quarter)")
    wait(s)
    op("list_services", "the apps you have deployed").add_argument(
        "user", nargs="?", help="whose (only your own may be listed)"
    )
    op("get_service_url", "the URL an app was deployed from").add_argument("service", help=service)
    op("get_parameters", "an app's {parameters} (comma-joined)").add_argument("service", help=service)
    op("cat_app", "an app's profile, or an instance's substituted profile").add_argument(
        "name", help="an app, or an instance (its name has an @)"
    )
    op("cat_unit", "the rendered unit of an instance").add_argument("instance", help=instance)
    op("list_instances", "instances of an app with their states").add_argument("service", help=service)
    op("get_instances_num", "how many instances an app has").add_argument("service", help=service)
    op("get_port", "host:port of a running instance").add_argument("instance", help=instance)
    s = op("get_journal", "an instance's journal")
    s.add_argument("instance", help=instance)
    s.add_argument("-n", "--lines", type=_not_negative, default=100, help="the last N lines (default: 100)")
    s.add_argument(
        "-f", "--follow", action="store_true", help="go on with new lines until the instance stops (or Ctrl-C)"
    )
    for name, what in (
        ("stop_app", "stop an instance (--all: every instance of an app, a job)"),
        ("start_app", "start a stopped instance again (--all: every stopped one of an app, a job)"),
        ("restart_app", "stop and start an instance (--all: every instance of an app, a job)"),
    ):
        s = op(name, what)
        s.add_argument("instance", help=f"{instance}; with --all, an app")
        s.add_argument("--all", action="store_true", help="every instance of the app named (a job)")
        wait(s, "with --all: ")
    s = op("remove_app", "remove instances: stopped, then their folders, ports and numbers released")
    s.add_argument("instances", nargs="+", metavar="instance", help=f"{instance}; with --all, one app")
    s.add_argument("--all", action="store_true", help="every instance of the app named (a job)")
    wait(s, "with --all: ")
    s = op("destroy_app", "remove an app whole: its instances (with --force), releases, URL (a job)")
    s.add_argument("service", help=service)
    s.add_argument("--force", action="store_true", help="remove its instances too")
    wait(s)
    s = op("scale", "start or remove instances until N of an app's run (a job)")
    s.add_argument("service", help=service)
    s.add_argument("count", type=_not_negative, help="how many live instances to have (0 removes them all)")
    s.add_argument("params", nargs="*", help="for new instances (default: those of the last one)")
    wait(s)
    s = op("logs", "every instance's journal of an app, merged in time order")
    s.add_argument("service", help=service)
    s.add_argument(
        "-n", "--lines", type=_not_negative, default=100, help="the last N lines of each instance (default: 100)"
    )
    s.add_argument("-f", "--follow", action="store_true", help="go on with new lines and new instances until Ctrl-C")
    for name, what in (
        ("start_common", "start instances of an app (a job)"),
        ("start_mpi", "start an MPI run (a job)"),
    ):
        s = op(name, what)
        s.add_argument("service", help=service)
        s.add_argument("params", nargs="*", help="k=v pairs, or the seed's para_str (values comma-joined)")
        wait(s)
        if name == "start_common":
            s.add_argument("--count", type=_count, help="how many (default: the profile's scale:, else 1)")
    op("jobs", "your jobs (newest first): id, kind, app, state, created").add_argument(
        "--state", choices=JOB_STATES, help="only the jobs in this state"
    )
    op("job", "one job's record (times in local time; --json: the record as the API has it)").add_argument(
        "id", help="the job's id"
    )
    op("watch", "follow a job's log and progress until it ends").add_argument("id", help="the job's id")
    op("cancel", "cancel a job (a running one stops at its next step)").add_argument("id", help="the job's id")
    op("whoami", "the user your token is, and whether it is an admin")
    s = op("events", "your jobs' events (states, log lines, progress) as they happen")
    s.add_argument(
        "--no-follow", action="store_true", help="print the events kept so far and exit, instead of following"
    )
    s = op("completion", 'print a shell completion script: eval "$(nap completion bash)"')
    s.add_argument("shell", choices=SHELLS, help="the shell's name")
    s = op("user", "manage users (admin): nap user add NAME; nap user quota NAME [instances=N disk=20g ...]")
    s.add_argument("action", choices=["add", "quota"], help="add a user (prints its token), or see or set quotas")
    s.add_argument("name", help="the user's name")
    s.add_argument(
        "changes", nargs="*", help="quota: NAME=VALUE for instances, apps, disk, memory (VALUE default: reset)"
    )
    s.add_argument("--admin", action="store_true", help="add: the new user is an admin")
    op("api", "run the HTTP API").add_argument("--port", type=int, help="the port (default: NAP_API_PORT, 8470)")
    s = op("worker", "run job workers (dramatiq)")
    s.add_argument("--processes", "-p", type=int, default=2, help="worker processes (default: 2)")
    s.add_argument("--threads", "-t", type=int, default=8, help="threads of each process (default: 8)")
    op("agent", "run the local engine's agent")
    s = op("up", "run the whole embedded stack")
    s.add_argument("--port", type=int, help="the API's port (default: NAP_API_PORT, 8470)")
    s.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    return p


# -- the remote operations -------------------------------------------------------------------------------
Handler = Callable[[Client, argparse.Namespace, Output], int]
REMOTE: dict[str, Handler] = {}


def remote(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            REMOTE[name] = fn
        return fn

    return register


def _submitted(c: Client, args: argparse.Namespace, out: Output, resp: dict) -> int:
    """A job was submitted: its id, or with ``--wait`` what it came to."""
    if not getattr(args, "wait", False):
        return out.result(resp, resp["job"])
    if not out.json:
        out.result(resp, f"job {resp['job']} queued")
    return _follow(c, resp["job"], out)


def _follow(c: Client, job_id: str, out: Output) -> int:
    try:
        job = follow(c, job_id, out.err)
    except KeyboardInterrupt:
        raise CommandError(
            "interrupted",
            f"stopped following job {job_id}, which goes on: nap watch {job_id} follows it again, "
            f"nap cancel {job_id} cancels it",
            130,
        ) from None
    end = outcome(job)
    for line in end.lines:
        out.summary(line)
    for note in end.notes:
        out.note(note)
    if end.error:
        return out.error(*end.error, code=end.code, job=job)
    if out.json:
        out.result(job)
    return 0


def _stream(out: Output, items: Iterable[Any], key: str, doc: dict, show: Callable[[Any], str]) -> int:
    """Lines or events as they come (text), or one document of them all once the stream ends (JSON; on
    Ctrl-C, what came so far, with ``"interrupted": true``)."""
    got: list[Any] = []
    try:
        for item in items:
            if out.json:
                got.append(item)
            else:
                print(show(item), file=out.out, flush=True)
    except KeyboardInterrupt:
        if out.json:
            out.result({**doc, key: got, "interrupted": True})
        return 130
    if out.json:
        out.result({**doc, key: got})
    return 0


@remote("deploy_app")
def deploy_app(c: Client, args: argparse.Namespace, out: Output) -> int:
    body: dict = {"app": args.service, "url": args.url}
    if args.batch is not None:
        body["batch"] = args.batch
    return _submitted(c, args, out, c.post("/v1/apps", body))


@remote("releases")
def releases(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/apps/{args.service}/releases")
    return out.result(r, "\n".join(release_row(x) for x in r["releases"]))


@remote("rollback")
def rollback(c: Client, args: argparse.Namespace, out: Output) -> int:
    body = {"release": args.release, "batch": args.batch}
    return _submitted(c, args, out, c.post(f"/v1/apps/{args.service}/rollback", body))


@remote("list_services")
def list_services(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get("/v1/apps", user=args.user)
    return out.result(r, "\n".join(r["apps"]))


@remote("get_service_url")
def get_service_url(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/apps/{args.service}/url")
    return out.result(r, r["url"])


@remote("get_parameters")
def get_parameters(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/apps/{args.service}/parameters")
    return out.result(r, r["para_str"])


@remote("cat_app")
def cat_app(c: Client, args: argparse.Namespace, out: Output) -> int:
    kind = "instances" if "@" in args.name else "apps"
    r = c.get(f"/v1/{kind}/{args.name}/profile")
    return out.result(r, r["text"].rstrip("\n"))


@remote("cat_unit")
def cat_unit(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/instances/{args.instance}/unit")
    return out.result(r, r["text"].rstrip("\n"))


@remote("list_instances")
def list_instances(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/apps/{args.service}/instances")
    return out.result(r, "\n".join(instance_row(i) for i in r["instances"]))


@remote("get_instances_num")
def get_instances_num(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/apps/{args.service}/instances/count")
    return out.result(r, str(r["count"]))


@remote("get_port")
def get_port(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/instances/{args.instance}/port")
    return out.result(r, f"{r['host']}:{r['port']}")


@remote("get_journal")
def get_journal(c: Client, args: argparse.Namespace, out: Output) -> int:
    lines = c.lines(f"/v1/instances/{args.instance}/journal", lines=args.lines, follow=1 if args.follow else None)
    return _stream(out, lines, "lines", {"instance": args.instance}, str)


@remote("logs")
def logs(c: Client, args: argparse.Namespace, out: Output) -> int:
    lines = c.lines(f"/v1/apps/{args.service}/logs", lines=args.lines, follow=1 if args.follow else None)
    return _stream(out, lines, "lines", {"app": args.service}, str)


@remote("stop_app", "start_app", "restart_app")
def instance_action(c: Client, args: argparse.Namespace, out: Output) -> int:
    action = args.op.split("_")[0]
    if args.all:
        return _submitted(c, args, out, c.post(f"/v1/apps/{args.instance}/{action}"))
    r = c.post(f"/v1/instances/{args.instance}/{action}")
    return out.result(r, f"{r['name']}: {r['state']}")


@remote("remove_app")
def remove_app(c: Client, args: argparse.Namespace, out: Output) -> int:
    if args.all:
        if len(args.instances) != 1:
            raise CommandError("usage", "remove_app --all takes one app (username_appname or appname)", 2)
        return _submitted(c, args, out, c.delete(f"/v1/apps/{args.instances[0]}/instances"))
    removed, failed = [], []
    for name in args.instances:
        try:
            r = c.delete(f"/v1/instances/{name}")
        except ApiError as e:
            message = e.body.get("message") or str(e.body)
            failed.append({"instance": name, "error": e.body.get("error") or f"http_{e.status}", "message": message})
            if not out.json:
                out.note(f"error: {message}")
            continue
        removed.append(r)
        if not out.json:
            also = f" ({', '.join(r['removed'])})" if len(r["removed"]) > 1 else ""
            out.result(r, f"{r['instance']}: removed{also}")
    if failed:
        if out.json:
            first = failed[0]
            message = f"{len(failed)} of {len(args.instances)} not removed: {first['instance']}: {first['message']}"
            out.error(first["error"], message, removed=removed, failed=failed)
        return 1
    if out.json:
        out.result({"removed": removed})
    return 0


@remote("destroy_app")
def destroy_app(c: Client, args: argparse.Namespace, out: Output) -> int:
    return _submitted(c, args, out, c.delete(f"/v1/apps/{args.service}", force=1 if args.force else None))


@remote("scale")
def scale(c: Client, args: argparse.Namespace, out: Output) -> int:
    body: dict = {"count": args.count}
    if args.params:
        body["params"] = _params(args.params)
    return _submitted(c, args, out, c.put(f"/v1/apps/{args.service}/scale", body))


@remote("start_common")
def start_common(c: Client, args: argparse.Namespace, out: Output) -> int:
    body: dict = {"params": _params(args.params)}
    if args.count is not None:
        body["count"] = args.count
    return _submitted(c, args, out, c.post(f"/v1/apps/{args.service}/instances", body))


@remote("start_mpi")
def start_mpi(c: Client, args: argparse.Namespace, out: Output) -> int:
    return _submitted(c, args, out, c.post(f"/v1/apps/{args.service}/mpi", {"params": _params(args.params)}))


@remote("jobs")
def jobs(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get("/v1/jobs", state=args.state)
    return out.result(r, "\n".join(job_row(j) for j in r["jobs"]))


@remote("job")
def job(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get(f"/v1/jobs/{args.id}")
    return out.result(r, job_text(r))


@remote("watch")
def watch(c: Client, args: argparse.Namespace, out: Output) -> int:
    return _follow(c, args.id, out)


@remote("cancel")
def cancel(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.post(f"/v1/jobs/{args.id}/cancel")
    return out.result(r, f"job {r['id']}: {r['state']}" + (" (cancel requested)" if r["state"] == "running" else ""))


@remote("whoami")
def whoami(c: Client, args: argparse.Namespace, out: Output) -> int:
    r = c.get("/v1/whoami")
    return out.result(r, r["name"] + (" (admin)" if r.get("admin") else ""))


@remote("events")
def events(c: Client, args: argparse.Namespace, out: Output) -> int:
    stream = c.events("/v1/events?follow=0" if args.no_follow else "/v1/events")
    return _stream(out, stream, "events", {}, event_line)


@remote("completion")
def completion(c: Client, args: argparse.Namespace, out: Output) -> int:
    script = shtab.complete(parser(), shell=args.shell)
    return out.result({"shell": args.shell, "script": script}, script.rstrip("\n"))


@remote("user")
def user(c: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "add":
        if args.changes:
            raise CommandError("usage", "nap user add NAME takes no NAME=VALUE (those are for nap user quota)", 2)
        r = c.post("/v1/users", {"name": args.name, "admin": args.admin})
        return out.result(r, r["token"])
    changes: dict[str, Any] = {}
    for pair in args.changes:
        key, eq, value = pair.partition("=")
        if not eq:
            raise CommandError("usage", f"{pair!r} is not NAME=VALUE (instances=500, disk=20g, apps=default)", 2)
        changes[key] = None if value == "default" else int(value) if value.isdigit() else value
    path = f"/v1/users/{args.name}/quota"
    r = c.post(path, changes) if changes else c.get(path)
    return out.result(r, quota_table(r))


# -- the platform's own processes ------------------------------------------------------------------------
def cmd_local(args: argparse.Namespace) -> int:
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


def api_error(e: ApiError) -> tuple[str, str]:
    """The kind and message of the API's error (its JSON body), or of not reaching it."""
    kind = e.body.get("error") or ("unreachable" if e.status == 0 else f"http_{e.status}")
    return str(kind), str(e.body.get("message") or json.dumps(e.body))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Output("--json" in argv)  # before parsing: a command line refused is a JSON document too
    try:
        args = parser().parse(argv)
    except ShowVersion:
        return out.result({"version": version()}, f"nap {version()}")
    except UsageError as e:
        if out.json:
            return out.error("usage", f"{e.parser.prog}: {e.message}", code=2)
        e.show(sys.stderr)
        return 2
    out.json = bool(getattr(args, "json", False))
    try:
        if args.op in LOCAL_OPS:
            if out.json:
                raise CommandError("usage", f"nap {args.op} runs a part of the platform: it has no JSON output", 2)
            return cmd_local(args)
        return REMOTE[args.op](Client(), args, out)
    except CommandError as e:
        return out.error(e.kind, e.message, e.code, **e.extra)
    except ApiError as e:
        kind, message = api_error(e)
        return out.error(kind, message, 1 if e.status < 500 else 2, status=e.status)
    except KeyboardInterrupt:
        if out.json:
            out.error("interrupted", "interrupted", 130)
        return 130
