"""App-wide logs (``nap logs SERVICE``, Heroku's ``logs -t``): every instance's journal merged in time
order, each line prefixed by its instance; with ``follow``, then new lines of every instance, and of
instances started meanwhile, as they come."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ...engines.base import ENDED
from ...errors import NapError
from ..context import Resources
from .manage import sort_key

NEW_LINES = 10_000  # of an instance started while a follow runs: its lines so far
RESCAN_S = 2.0  # how often a follow looks for instances started (or started again) meanwhile


def stamp(line: str) -> str:
    """A journal line's time (its first word: ISO 8601 UTC, so text order is time order)."""
    return line.split(" ", 1)[0]


async def history(rt: Resources, names: list[str], lines: int) -> list[str]:
    """The last ``lines`` lines of all ``names`` together, oldest first, each prefixed by its instance."""
    got: list[tuple[str, int, str]] = []
    for i, name in enumerate(names):
        try:
            async for line in rt.engine.journal(name, lines=lines, follow=False):
                got.append((stamp(line), i, f"{name} {line}"))
        except NapError:  # removed meanwhile
            continue
    got.sort(key=lambda t: (t[0], t[1]))  # stable: an instance's own lines keep their order
    return [text for _, _, text in got[-lines:]] if lines else []


async def app_logs(rt: Resources, user: str, app: str, lines: int = 100, follow: bool = False) -> AsyncIterator[str]:
    rows = await rt.engine.instances(f"{user}_{app}_")
    names = sorted((st.name for st in rows), key=sort_key)
    for text in await history(rt, names, lines):
        yield text
    if not follow:
        return
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
    tasks: dict[str, asyncio.Task] = {}

    async def tail(name: str, first: int) -> None:
        with contextlib.suppress(NapError):
            async for line in rt.engine.journal(name, lines=first, follow=True):
                await queue.put(f"{name} {line}")

    async def rescan() -> None:
        known = set(names)
        while True:
            for st in await rt.engine.instances(f"{user}_{app}_"):
                task = tasks.get(st.name)
                fresh = st.name not in known
                if task is None or (task.done() and st.state not in ENDED):
                    # A new instance is followed from its first line; one started again, from now.
                    known.add(st.name)
                    tasks[st.name] = asyncio.create_task(tail(st.name, NEW_LINES if fresh else 0))
            await asyncio.sleep(RESCAN_S)

    for name in names:
        tasks[name] = asyncio.create_task(tail(name, 0))
    scanner = asyncio.create_task(rescan())
    try:
        while True:
            get = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({get, scanner}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                scanner.result()  # the scan failed (the engine went away): raise its error
            yield get.result()
    finally:
        for t in [scanner, *tasks.values()]:
            t.cancel()
        await asyncio.gather(scanner, *tasks.values(), return_exceptions=True)
