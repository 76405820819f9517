"""How the API's records read as text in the ``nap`` command: times in local time, durations and sizes
for people, one line per instance, release, job or event. Pure functions of the records (``--json``
prints the records themselves)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..engines.base import ENDED


def local_time(t: float | None) -> str:
    """An epoch time as this machine's local time, ``2026-05-01 14:03:07``; ``-`` for none."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 5 s``, ``2 h 10 min``."""
    if round(seconds, 1) < 10:
        return f"{max(seconds, 0):.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def size(n: int) -> str:
    """Bytes as ``512 B``, ``3.2 KiB``, ``41.0 MiB`` ..."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def first_line(text: str | None) -> str:
    """A message's first line (an error's details, a compiler's output, follow it)."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


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


def release_row(r: dict) -> str:
    """One line of ``releases``: name (* for the current), when, digest, URL."""
    when = local_time(r.get("time", 0))
    return f"{'*' if r['current'] else ' '} {r['name']}\t{when}\t{(r.get('digest') or '')[:19]}\t{r.get('url')}"


def quota_table(r: dict) -> str:
    """A user's quotas: each with what is used and the limit."""
    rows = [f"{name}\t{r['usage'][name]}\tof {r['limits'][name]}" for name in ("instances", "apps", "disk", "memory")]
    return f"quotas of {r['user']} (used, limit; disk and memory in bytes):\n" + "\n".join(rows)


def job_kind(job: dict) -> str:
    """A job's kind as a person reads it: an app-wide action says which (``app_action(stop)``)."""
    action = (job.get("args") or {}).get("action")
    return f"{job['kind']}({action})" if job["kind"] == "app_action" and action else job["kind"]


def job_row(job: dict) -> str:
    """One line of ``jobs``: id, kind, app, state, created (local time), the error's first line."""
    app = (job.get("args") or {}).get("app") or "-"
    row = f"{job['id']}\t{job_kind(job)}\t{app}\t{job['state']}\t{local_time(job.get('created'))}"
    return row + (f"\t{first_line(job['error'])}" if job.get("error") else "")


def brief(value: Any) -> str:
    """A value of a job's arguments or result on one line: lists of records as their count."""
    if isinstance(value, list):
        if all(isinstance(v, str | int | float) for v in value) and len(value) <= 8:
            return ", ".join(str(v) for v in value) or "(none)"
        return f"{len(value)} item(s)"
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "))
    return "-" if value is None else str(value)


def job_text(job: dict) -> str:
    """A job's record for people (``nap job ID``): its times in local time, how long it waited and
    ran, its arguments and result one per line, its error whole."""
    args = {k: v for k, v in (job.get("args") or {}).items() if k not in ("user", "app")}
    created, started, finished = job.get("created"), job.get("started"), job.get("finished")
    rows = [
        ("job", job["id"]),
        ("kind", job_kind(job)),
        ("user", job.get("user") or "-"),
        ("app", (job.get("args") or {}).get("app") or "-"),
        (
            "state",
            job["state"] + (" (cancel requested)" if job.get("cancel_requested") and job["state"] == "running" else ""),
        ),
        ("created", local_time(created)),
    ]
    if started is not None:
        rows.append(("started", local_time(started) + (f" (queued {duration(started - created)})" if created else "")))
    if finished is not None:
        since = started if started is not None else created
        rows.append(("finished", local_time(finished) + (f" (took {duration(finished - since)})" if since else "")))
    rows.append(("attempts", str(job.get("attempts", 0))))
    rows += [(f"args.{k}", brief(v)) for k, v in args.items()]
    rows += [(f"result.{k}", brief(v)) for k, v in (job.get("result") or {}).items()]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if job.get("error"):
        text += "\nerror:\n" + "\n".join(f"  {line}" for line in job["error"].splitlines())
    return text


def event_line(ev: dict) -> str:
    """One line of ``nap events``: when (local time), the job, its kind, what happened."""
    data = ev.get("data") or {}
    kind = ev.get("event", "")
    if kind == "log":
        what = data.get("line", "")
    elif kind == "state":
        what = data.get("state", "") + (f": {first_line(data['error'])}" if data.get("error") else "")
    elif kind == "progress":
        what = step_text(progress_step(data))
    else:
        what = json.dumps(data)
    return f"{local_time(data.get('t'))}  {data.get('job', '-')}  {data.get('kind', '-')}  {kind}  {what}"


# A launch (start_common, and the launch of a scale) reports one count over its two phases, out of
# twice its instances: "submitted" counts the units handed to the engine, then "running" counts on
# from there as instances settle (running, or given up). Shown as each phase out of the instances.
LAUNCH_PHASES = {"submitted": "submitted", "running": "settled"}


@dataclass
class Step:
    """Where a job is: its phase, and how far through it (``done`` of ``total``; ``None``: not known
    yet). ``unit`` ``B``: the counts are bytes (a download)."""

    phase: str
    done: int | None = None
    total: int | None = None
    unit: str = ""


def progress_step(data: dict) -> Step:
    """What a job's progress event says, in the job's own counts."""
    phase = str(data.get("phase") or "")
    done, total = int(data.get("done") or 0), int(data.get("total") or 0)
    if phase in LAUNCH_PHASES and total > 0 and total % 2 == 0:
        half = total // 2
        return Step(LAUNCH_PHASES[phase], max(0, done - half) if phase == "running" else done, half)
    if phase == "downloaded":
        return Step(phase, done, total if total > done else None, "B")  # total == done: size not known
    return Step(phase or "working", done, total)


def step_text(step: Step) -> str:
    """``120/300 submitted``, ``3.1 MiB/8.0 MiB downloaded``, ``0/300 preparing``, ``queued``."""
    show = size if step.unit == "B" else str
    if step.done is None and step.total is None:
        return step.phase
    if step.total is None:
        return f"{show(step.done or 0)} {step.phase}"
    return f"{show(step.done or 0)}/{show(step.total)} {step.phase}"


def progress_line(step: Step, elapsed: float | None = None, width: int = 80) -> str:
    """A progress line of at most ``width`` characters: a bar when the total is known, the counts,
    the phase, the time since the job was submitted."""
    text = step_text(step) + (f"  {duration(elapsed)}" if elapsed is not None else "")
    if step.total:
        cells = 30
        filled = min(cells, int(cells * (step.done or 0) / step.total))
        text = f"[{'#' * filled}{'.' * (cells - filled)}] {text}"
    return text[: max(width, 10)]
