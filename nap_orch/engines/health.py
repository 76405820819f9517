"""Health: when a started instance counts as running, and when a failing check restarts it.

An instance is ``starting`` from each start of its process until it is healthy:
  - without a check, once it has stayed up ``min_healthy`` seconds (Nomad's ``min_healthy_time``);
  - with a check (``X-Nap-Check=http /path`` or ``tcp`` in its unit, from the profile's ``check:``),
    once a probe of its own port has passed and it has stayed up ``min_healthy`` seconds.
Then it is ``running``. A check that fails ``FAIL_LIMIT`` times in a row, once ``grace`` seconds have
passed since the start, ends the process as a failure: the unit's restart policy takes it from there.

``Check.of(unit)`` reads a unit's check, ``judge`` is the pure rule, ``probe`` does one probe. Both
engines use them: the local agent for its processes, the Slurm reconciler for its jobs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..units import Unit, parse_check

FAIL_LIMIT = 3  # failed probes in a row that restart an instance


@dataclass(frozen=True)
class Check:
    kind: str  # "http" | "tcp" | "" (none)
    path: str
    interval: float
    timeout: float
    grace: float
    min_healthy: float

    @classmethod
    def of(cls, unit: Unit) -> Check:
        kind, path = parse_check(unit.check) if unit.check else ("", "")
        return cls(kind, path, unit.check_interval, unit.check_timeout, unit.check_grace, unit.min_healthy)


@dataclass
class Health:
    """What is known of the health of one run of an instance's process."""

    started_at: float  # the process's start (wall time)
    passed: bool = False  # a probe has passed since the start
    failures: int = 0  # failed probes in a row


def judge(check: Check, h: Health, now: float) -> str:
    """``running``, ``starting`` or ``restart`` (the check failed ``FAIL_LIMIT`` times in a row past
    its grace) for a live process."""
    up = now - h.started_at
    if check.kind and h.failures >= FAIL_LIMIT and up >= check.grace:
        return "restart"
    if up < check.min_healthy:
        return "starting"
    if check.kind and not h.passed:
        return "starting"
    return "running"


def record(h: Health, ok: bool) -> None:
    """Count one probe's outcome."""
    if ok:
        h.passed, h.failures = True, 0
    else:
        h.failures += 1


async def probe(check: Check, host: str, port: int) -> tuple[bool, str]:
    """One probe of ``host:port``: a TCP connection, or an HTTP GET answered 2xx or 3xx, within the
    check's timeout. (passed, what happened)."""
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if check.kind != "http":
                    return True, "connected"
                writer.write(
                    f"GET {check.path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: nap-health\r\n\r\n".encode()
                )
                await writer.drain()
                status = (await reader.readline()).decode("latin-1").split()
            finally:
                writer.close()
    except TimeoutError:
        return False, f"no answer within {check.timeout:g}s"
    except OSError as e:
        return False, e.strerror or str(e)
    if len(status) >= 2 and status[1].isdigit() and 200 <= int(status[1]) < 400:
        return True, f"HTTP {status[1]}"
    return False, f"HTTP answer {' '.join(status[1:3])[:40] or '(none)'}"
