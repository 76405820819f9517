"""Prometheus metrics: the metric objects every part of the platform counts into, and the folder one
host's platform processes share them through (the API serves them at ``GET /metrics``, ``api/metrics.py``).

The API, each worker process and the agent (or the Slurm reconciler) of a host call ``setup()`` at start
and from then on write their metrics into one folder, ``NAP_METRICS_DIR`` (``NAP_HOME/metrics``, mode
0700), in prometheus_client's multiprocess mode: each process into memory-mapped files of its own, which
the API merges when it is scraped. Layout::

    <id>.lock                 held (a POSIX lock) by process <id> for as long as it lives
    counter_<id>.db, histogram_<id>.db, gauge_livesum_<id>.db    its metrics
    counter_archive.db, histogram_archive.db    the counters and histograms of processes that ended
    .sweep                    flock()ed while the folder is swept or read

A process's id is ``<pid>-<random>``, not its pid: ids never come back (a pid does, and would inherit a
dead process's gauges), and processes of other PID namespaces (docker-compose's containers share
``NAP_HOME``) never collide. Whether a process lives is whether its lock is held, which holds across
PID namespaces too. Before every scrape, and when a process joins, the folder is swept of the processes
that ended (SIGKILL included): their live gauges go (``mark_process_dead``), and their counters and
histograms are added into the archive files, so that totals never go backwards and files don't pile up
as parts restart. Gauges here are all ``livesum``: what an ended process held is no longer there.

Every metric below has labels, on purpose: a series' value is made when it is first used, after
``setup`` chose where values live. Scrape-time values (queue depth) are read by the API when it is
scraped (``exposition``'s ``extra``), not counted here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import secrets
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

C = TypeVar("C", bound=type)

# -- the metrics -------------------------------------------------------------------------------------
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SLOW = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

JOBS_SUBMITTED = Counter("nap_jobs_submitted", "Jobs recorded and queued, by kind.", ["kind"])
JOBS_ENDED = Counter("nap_jobs_ended", "Jobs that ended, by kind and final state.", ["kind", "state"])
JOB_DURATION = Histogram(
    "nap_job_duration_seconds",
    "How long jobs ran, from the start of the attempt that ended them to their end, by kind.",
    ["kind"],
    buckets=SLOW,
)
INSTANCES = Gauge(
    "nap_instances",
    "Instances by engine and state, as the engine's daemon (the agent, the Slurm reconciler) last saw them.",
    ["engine", "state"],
    multiprocess_mode="livesum",
)
RESTARTS = Counter("nap_instance_restarts", "Instances restarted by their unit's restart policy.", ["engine"])
API_REQUESTS = Histogram(
    "nap_api_request_duration_seconds",
    "API requests by method, route pattern and status (streams: until they end).",
    ["method", "route", "status"],
    buckets=FAST,
)
SSE_CLIENTS = Gauge(
    "nap_sse_clients",
    "Event streams (SSE) open now, of jobs or of users.",
    ["stream"],
    multiprocess_mode="livesum",
)
STORE_CALLS = Histogram(
    "nap_store_call_duration_seconds", "State store calls, by store and operation.", ["store", "op"], buckets=FAST
)
ENGINE_CALLS = Histogram(
    "nap_engine_call_duration_seconds", "Engine calls, by engine and operation.", ["engine", "op"], buckets=FAST
)

# The operations of the seams whose calls are timed (``engine_calls``, ``store_calls``).
ENGINE_OPS = ("submit", "status", "instances", "stop", "start", "remove", "unit_text")
STORE_OPS = (
    "get",
    "put",
    "put_many",
    "create",
    "create_many",
    "get_many",
    "delete",
    "delete_many",
    "get_prefix",
    "delete_prefix",
    "lease",
    "lock",
    "unlock",
)


def job_ended(kind: str, state: str, started: float | None, finished: float | None) -> None:
    """A job ended in ``state``; how long its last attempt ran, where it ran."""
    JOBS_ENDED.labels(kind, state).inc()
    if started is not None and finished is not None:
        JOB_DURATION.labels(kind).observe(max(0.0, finished - started))


_seen_states: dict[str, set[str]] = {}


def set_instances(engine: str, states: Iterable[str]) -> None:
    """The engine's instances now, one state each: a state none is in any more reads 0."""
    counts = Tally(states)
    seen = _seen_states.setdefault(engine, set())
    seen.update(counts)
    for state in seen:
        INSTANCES.labels(engine, state).set(counts.get(state, 0))


def _timed(histogram: Histogram, name: str, ops: Iterable[str]) -> Callable[[C], C]:
    def decorate(cls: C) -> C:
        for op in ops:
            fn = cls.__dict__.get(op)
            if fn is not None and inspect.iscoroutinefunction(fn):
                setattr(cls, op, _observed(fn, histogram, name, op))
        return cls

    return decorate


def _observed(fn: Callable[..., Awaitable[Any]], histogram: Histogram, *labels: str) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            histogram.labels(*labels).observe(time.perf_counter() - start)

    return call


def engine_calls(engine: str) -> Callable[[C], C]:
    """A class decorator for an engine: the calls of ``ENGINE_OPS`` it defines are timed in ``ENGINE_CALLS``."""
    return _timed(ENGINE_CALLS, engine, ENGINE_OPS)


def store_calls(store: str) -> Callable[[C], C]:
    """A class decorator for a state store: the calls of ``STORE_OPS`` it defines are timed in ``STORE_CALLS``."""
    return _timed(STORE_CALLS, store, STORE_OPS)


# -- the folder ---------------------------------------------------------------------------------------
ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus_client's values open their files
ARCHIVED = ("counter", "histogram", "summary")  # what an ended process leaves that still counts


class _Member:
    """This process's place in the folder: its id, and the lock that says it lives (a forked child
    takes a place of its own when it first counts something)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pid = 0
        self.id = ""
        self.fd = -1

    def identity(self) -> str:
        """The id that names this process's files (prometheus_client asks at every update)."""
        pid = os.getpid()
        if pid != self.pid:
            self._claim(pid)
        return self.id

    def _claim(self, pid: int) -> None:
        ident = f"{pid}-{secrets.token_hex(4)}"
        # Locked before it has the name sweeps look for: a sweep never finds it unheld.
        fresh = self.directory / f"{ident}.lock.new"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.rename(fresh, self.directory / f"{ident}.lock")
        self.pid, self.id, self.fd = pid, ident, fd  # the fd stays open: closing it would drop the lock


_member: _Member | None = None


def setup(directory: Path) -> None:
    """Make this process write its metrics into ``directory`` (made if missing), where the host's other
    platform processes write theirs; call it at the process's start, before anything is counted."""
    global _member
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)
    _member = _Member(directory)
    values.ValueClass = values.MultiProcessValue(_member.identity)
    sweep(directory)


def _own_id() -> str | None:
    return _member.id if _member is not None and _member.pid == os.getpid() else None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".sweep", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _held(lock: Path) -> bool:
    """Whether a live process holds the lock file ``lock`` (one that vanished: no)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN or EACCES: another process holds it
        return True
    finally:
        os.close(fd)  # (releases the lock this may have taken)
    return False


def sweep(directory: Path) -> list[str]:
    """Remove the processes that ended from ``directory``: their live gauges are dropped, their counters
    and histograms added into the archive files. Returns their ids."""
    with _locked(directory):
        return _sweep(directory)


def _sweep(directory: Path) -> list[str]:
    mine = _own_id()
    dead = [p.name[: -len(".lock")] for p in directory.glob("*.lock") if p.name != f"{mine}.lock" and not _held(p)]
    if not dead:
        return []
    for ident in dead:
        mark_process_dead(ident, str(directory))  # (prometheus_client's own rule for live gauges)
    left = [f for ident in dead for f in directory.glob(f"*_{ident}.db")]
    for typ in ARCHIVED:
        files = [f for f in left if f.name.startswith(typ + "_")]
        if files:
            _archive(directory, typ, files)
    for f in left:  # other gauges of an ended process count no more
        f.unlink(missing_ok=True)
    for ident in dead:  # last: a sweep cut short finds the same processes again
        (directory / f"{ident}.lock").unlink(missing_ok=True)
    return dead


def _archive(directory: Path, typ: str, files: list[Path]) -> None:
    """Add ``files`` (of type ``typ``) into ``<typ>_archive.db``: written beside it, then renamed over it."""
    archive = directory / f"{typ}_archive.db"
    sources = [str(f) for f in files] + ([str(archive)] if archive.exists() else [])
    merged = MultiProcessCollector.merge(sources, accumulate=False)  # as stored: buckets not cumulated
    fresh = directory / f"{typ}_archive.new"
    fresh.unlink(missing_ok=True)
    out = MmapedDict(str(fresh))
    try:
        for metric in merged:
            for s in metric.samples:
                key = mmap_key(metric.name, s.name, list(s.labels), list(s.labels.values()), metric.documentation)
                out.write_value(key, s.value, 0.0)
    finally:
        out.close()
    os.replace(fresh, archive)


class _Merged:
    """What one scrape shows: every process's metrics in the folder, and the scrape-time ones."""

    def __init__(self, directory: Path, extra: Iterable[Metric]):
        self.files = MultiProcessCollector(None, str(directory))
        self.extra = list(extra)

    def collect(self) -> Iterable[Metric]:
        yield from self.files.collect()
        yield from self.extra


def exposition(directory: Path, extra: Iterable[Metric] = ()) -> bytes:
    """The host's metrics in Prometheus's text format: the processes that ended are swept first, then
    everything in ``directory`` is merged, with ``extra`` (scrape-time gauges). Blocking file work: call
    it off the event loop."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory):  # not while a sweep moves an ended process's counts into the archive
        _sweep(directory)
        return generate_latest(_Merged(directory, extra))
