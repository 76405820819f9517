"""Journal lines and files, as both engines write and read them.

A line is ``2025-11-26T04:12:33.123Z <source>: text``: the time in UTC with milliseconds, then
``stdout[pid]``/``stderr[pid]`` for the program's output or ``nap`` for the engine's own events.
"""

from __future__ import annotations

import os
import time

_ts_cache: tuple[int, str] = (-1, "")


def timestamp(t: float) -> str:
    """``t`` (epoch seconds) as a journal line's time; the formatted second is cached (a batch of
    lines shares it)."""
    global _ts_cache
    sec = int(t)
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_ts_cache[1]}.{int((t - sec) * 1000):03d}Z"


def event_line(text: str, t: float | None = None) -> str:
    """An engine's own journal line (with its newline)."""
    return f"{timestamp(time.time() if t is None else t)} nap: {text}\n"


def last_lines(path: str, count: int) -> list[bytes]:
    """The last ``count`` lines of a file, reading from its end."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if pos > 0:
        lines = lines[1:]  # the first one may be cut
    return lines[-count:] if count else []


def read_from(path: str, pos: int, size: int = 1024 * 1024) -> bytes:
    """Up to ``size`` bytes of a file from ``pos`` (nothing if it is shorter, or unreadable)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < pos:
                return b""
            f.seek(pos)
            return f.read(size)
    except OSError:
        return b""
