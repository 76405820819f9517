"""What the fetcher's sources share: callbacks, limits, running blocking work in a thread while
relaying its lines and honouring cancellation, and words for messages."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ...config import MiB

Log = Callable[[str], Awaitable[None]]
Check = Callable[[], Awaitable[None]]
# Awaited with (bytes so far, total or None) as a download proceeds: drives progress bars.
Progress = Callable[[int, "int | None"], Awaitable[None]]

CHUNK = 256 * 1024
# How often long steps (extraction threads, git clone) await ``check`` and relay their log lines.
TICK = 0.2
# Progress lines of a download of unknown size come every this many bytes (else every 10%).
UNKNOWN_SIZE_STEP = 4 * MiB
# Extraction and clone progress lines come at most this often (seconds).
PROGRESS_EVERY = 2.0
# A symlink's target is a path, not content: anything longer is not a real symlink.
MAX_LINK_TARGET = 4096
USER_AGENT = "nap-orch-fetch"
GIT_REMOTE_PROTOCOLS = "http:https:git"

ALLOWED = "http://, https:// (archives), git://, git+https:// or an http(s) URL ending in .git"
ALLOWED_LOCAL = ALLOWED + ", file:// or an absolute path"


class Stopped(Exception):
    """Raised in a worker thread when the coroutine waiting for it gave up (``check`` raised)."""


SHOWN = 120  # characters of a name or URL an error message quotes


def shown(text: str) -> str:
    """``text`` as an error message quotes a name, a link target or a URL the user gave: its repr, cut
    to ``SHOWN`` characters (a 6 KB member name is not worth echoing whole)."""
    if len(text) <= SHOWN:
        return repr(text)
    return f"{text[:SHOWN]!r}... ({len(text)} characters)"


def os_error(e: OSError, root: Path) -> str:
    """An OSError as an error message says it: its reason and the file relative to the app, never the
    server's staging path."""
    name = str(e.filename or "")
    if name.startswith(str(root)):
        name = name[len(str(root)) :].lstrip("/") or "."
    return f"{e.strerror or e}: {shown(name)}" if name else str(e.strerror or e)


async def in_thread(func: Callable, log: Log, check: Check):
    """Run ``func(stop, say)`` in a thread while relaying what it says to ``log`` and awaiting ``check``.

    ``func`` must return soon after ``stop`` is set (raising :class:`Stopped`). If ``check`` raises,
    the thread is stopped and waited for, so that the caller may remove its files.
    """
    stop = threading.Event()
    lines: deque[str] = deque()
    task = asyncio.ensure_future(asyncio.to_thread(func, stop, lines.append))
    task.add_done_callback(retrieve)
    try:
        return await watch(task, lines, log, check)
    finally:
        if not task.done():
            stop.set()
            # A thread cannot be interrupted: wait until it notices, before anyone deletes its files.
            await asyncio.wait({task})


async def watch(task: asyncio.Future, lines: deque[str], log: Log, check: Check, guard=None):
    """Wait for ``task``; meanwhile relay ``lines`` to ``log`` and await ``check`` (and ``guard``)."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=TICK)
        while lines:
            await log(lines.popleft())
        if done:
            return task.result()
        await check()
        if guard is not None:
            await guard()


def retrieve(task: asyncio.Future) -> None:
    # A task abandoned after a failure elsewhere must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


async def remove(path: Path) -> None:
    # Shielded: a second cancellation during cleanup must not leave the files behind.
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, ignore_errors=True))


async def quiet(message: str) -> None:
    pass


async def proceed() -> None:
    pass


def redact(url: str) -> str:
    """``url`` without its credentials, fit for logs and messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def credentials_refusal(url: str) -> str | None:
    """Why ``url`` is refused for carrying credentials (``user:password@``), or None. A deploy URL is
    kept and shown (the job's record and events, the app's URL in the state store, the worker's log),
    so it must hold no secret; refusing it is simpler and safer than redacting it everywhere."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None  # not a URL at all: others say so
    if "@" in netloc:
        return (
            "the URL carries credentials (user:password@host); deploy URLs are kept and shown with the"
            " app and its jobs, so they may hold none: use a URL that needs no credentials"
        )
    return None


def human(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
