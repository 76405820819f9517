"""Following a job (``--wait``, ``nap watch``): its log lines and a progress line on stderr while it
runs, then what it came to.

The progress line shows the job's phase and its true total from the start: before the worker's first
progress event, the phase is the job's state (``queued``), then the kind's first phase (a launch is
``preparing`` its instances' folders); the total of a launch is its ``count`` (else its profile's
``scale:``, else 1). On a terminal the line is redrawn in place, and each second while nothing
happens (its clock runs); when the job ends it stays, as the final line of its progress.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from .client import ApiError, Client
from .text import Step, first_line, progress_line, progress_step

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# What a running job does before its first progress event, by its kind.
FIRST_PHASE = {
    "deploy": "downloading",
    "rollback": "rolling back",
    "start_common": "preparing",
    "start_mpi": "building",
    "scale": "scaling",
    "destroy": "removing",
}
SCALE = re.compile(r"(?mi)^\s*scale\s*:\s*([0-9]+)\s*$")
TICK = 1.0  # seconds between redraws of a terminal's progress line while no event comes


class Progress:
    """Where a followed job is (its ``Step``) and for how long: the time from the job's first event
    (its submission) to its last, plus the time since that one arrived (no clock of the server's is
    compared with ours)."""

    def __init__(self, kind: str, args: dict, total: int | None = None):
        self.first_phase = FIRST_PHASE.get(kind) or str(args.get("action") or "running")
        self.total = total
        self.step = Step("queued", 0 if total else None, total)
        self.counted = False  # a progress event came
        self._first: float | None = None
        self._last: float | None = None
        self._arrived = time.monotonic()

    def at(self, t: float | None) -> None:
        """An event stamped ``t`` (the server's epoch time) arrived."""
        if isinstance(t, int | float):
            self._first = t if self._first is None else self._first
            self._last = t
            self._arrived = time.monotonic()

    def state(self, state: str) -> None:
        if not self.counted and state in ("queued", "running"):
            phase = "queued" if state == "queued" else self.first_phase
            self.step = Step(phase, 0 if self.total else None, self.total)

    def progress(self, data: dict) -> None:
        self.step = progress_step(data)
        self.counted = True

    def elapsed(self, ended: bool = False) -> float | None:
        if self._first is None or self._last is None:
            return None
        return self._last - self._first + (0.0 if ended else time.monotonic() - self._arrived)


class Bar:
    """The progress line on ``stream`` and the log lines above it. On a terminal the line is redrawn in
    place (and by a ticker thread each ``TICK``); elsewhere only its final state is written, once."""

    def __init__(self, stream: TextIO, progress: Progress):
        self.stream = stream
        self.progress = progress
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.drawn = False  # the line is on the screen, to be erased before a log line
        self.stopped = threading.Event()
        self.ticker: threading.Thread | None = None

    def start(self) -> None:
        if self.tty:
            self.draw()
            self.ticker = threading.Thread(target=self._tick, name="nap-progress", daemon=True)
            self.ticker.start()

    def _tick(self) -> None:
        while not self.stopped.wait(TICK):
            self.draw()

    def _text(self, ended: bool = False) -> str:
        width = shutil.get_terminal_size((80, 24)).columns - 1
        return progress_line(self.progress.step, self.progress.elapsed(ended), width)

    def draw(self) -> None:
        if not self.tty:
            return
        with self.lock:
            if self.stopped.is_set():  # checked under the lock: the ticker never draws after finish()
                return
            self.stream.write("\r" + self._text() + "\033[K")
            self.stream.flush()
            self.drawn = True

    def line(self, text: str) -> None:
        """A line above the progress line."""
        with self.lock:
            if self.drawn:
                self.stream.write("\r\033[K")
                self.drawn = False
            self.stream.write(text + "\n")
            self.stream.flush()
        self.draw()

    def finish(self) -> None:
        """The job ended: its progress line stays, with its final counts and time (a job that never
        reported progress leaves none)."""
        self.stopped.set()
        with self.lock:
            if self.drawn:
                self.stream.write("\r\033[K")
            if self.progress.counted:
                self.stream.write(self._text(ended=True) + "\n")
            self.drawn = False
            self.stream.flush()

    def close(self) -> None:
        """Stop redrawing; a line left on the screen (Ctrl-C) stays, and the shell's prompt goes below."""
        self.stopped.set()
        if self.ticker is not None:
            self.ticker.join(TICK + 1)
        with self.lock:
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
                self.drawn = False


def launch_size(client: Client, job: dict) -> int | None:
    """How many instances a start_common launches: its ``count``, else its profile's ``scale:``, else
    1 (as the worker decides); None for other jobs, or when the profile can't be read."""
    args = job.get("args") or {}
    if job.get("kind") != "start_common":
        return None
    if isinstance(args.get("count"), int):
        return int(args["count"])
    try:
        text = client.get(f"/v1/apps/{args.get('app')}/profile")["text"]
    except (ApiError, KeyError, TypeError):
        return None
    m = SCALE.search(text or "")
    return int(m.group(1)) if m and int(m.group(1)) > 0 else 1


def follow(client: Client, job_id: str, stream: TextIO) -> dict:
    """Show a job's events on ``stream`` until it ends; its final record."""
    job = client.get(f"/v1/jobs/{job_id}")
    progress = Progress(job["kind"], job.get("args") or {}, launch_size(client, job))
    bar = Bar(stream, progress)
    bar.start()
    try:
        for ev in client.events(f"/v1/jobs/{job_id}/events"):
            kind, data = ev.get("event"), ev.get("data") or {}
            progress.at(data.get("t"))
            if kind == "log":
                bar.line(f"  {data.get('line', '')}")
            elif kind == "progress":
                progress.progress(data)
                bar.draw()
            elif kind == "state":
                state = str(data.get("state"))
                progress.state(state)
                if state in TERMINAL:
                    bar.finish()
                # an error's first line: the details (a compiler's output) are in the log above
                error = first_line(data.get("error"))
                bar.line(f"job {job_id}: {state}" + (f" ({error})" if error else ""))
    finally:
        bar.close()
    return client.get(f"/v1/jobs/{job_id}")


@dataclass
class Outcome:
    """What a job that ended came to, for the command: its exit code, summary lines (the result, as
    text), notes (stderr), and for a non-zero code the error's kind and message."""

    code: int = 0
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: tuple[str, str] | None = None


def outcome(job: dict) -> Outcome:
    """A job's end as the command reports it. A launch that succeeded with some of its instances not
    running exits 1 too: the job did its part, but not all of the launch is up."""
    end = Outcome()
    result, kind = job.get("result") or {}, job["kind"]
    not_running = 0
    if kind in ("start_common", "scale") and result.get("instances"):
        launched = result["instances"]
        running = sum(i["state"] == "running" for i in launched)
        end.lines.append(f"running: {running}, failed: {len(launched) - running}, seconds: {result.get('seconds')}")
        for i in [i for i in launched if i["state"] != "running"][:20]:
            how = "failing (restarting)" if i.get("failing") else i["state"]
            end.notes.append(f"  {i['name']}: {how}: {i.get('message') or ''}")
        if job["state"] == "succeeded":
            not_running = len(launched) - running
    if result:
        end.lines += summary_lines(kind, result)
    if job["state"] != "succeeded":
        error = job.get("error") or ""
        shown = first_line(error) + " (the details are in the log above)" if "\n" in error.strip() else error
        end.code, end.error = 1, (f"job_{job['state']}", f"job {job['id']} {job['state']}: {shown}")
    elif not_running:
        total = len(result["instances"])
        end.code, end.error = 1, ("not_running", f"{not_running} of the {total} instance(s) launched are not running")
    return end


def summary_lines(kind: str, r: dict) -> list[str]:
    """The result of a job that ended, in a line (a launch's counts are outcome's own line)."""
    if kind == "scale":
        return [
            f"{r['app']}: {r['was']} -> {r['count']} live; removed {len(r['removed'])}, "
            f"started {r['started']}, failed {r['failed']}"
        ]
    if kind == "app_action":
        return [f"{r['action']}: {r['done']} done, {len(r['failed'])} not"]
    if kind == "deploy":
        rolled = (r.get("rollout") or {}).get("rolled")
        return [
            f"{r['service']}: {r['release']} ({(r.get('digest') or '')[:19]})"
            + (f", {rolled} rolled" if rolled else "")
        ]
    if kind == "rollback":
        return [f"{r['app']}: {r.get('from') or '-'} -> {r['to']}, {r.get('rolled', 0)} rolled"]
    if kind == "destroy":
        return [f"{r['app']}: destroyed ({r.get('instances_removed', 0)} instance(s) removed)"]
    if kind == "start_mpi":
        return [f"run {r['run']} of {r['app']}: master {r['master']}, {len(r.get('slaves') or [])} slave(s)"]
    return []
