"""The plumbing of an engine's daemon (what ``nap agent`` runs): its unix socket and its process.

Each engine's daemon answers on ``NAP_HOME/agent.sock`` (at least ``GET /health``), runs until
SIGTERM or SIGINT, and leaves the instances running when it ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from ..errors import Conflict, NapError


def claim_socket(path: str) -> None:
    """Remove a stale socket file; refuse if another daemon answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        os.unlink(path)
        return
    finally:
        probe.close()
    raise Conflict(f"another nap agent answers on {path}")


@asynccontextmanager
async def serving(app: web.Application, path: str, shutdown_timeout: float = 2.0) -> AsyncIterator[None]:
    """``app`` on the unix socket ``path`` (mode 0600: the platform's alone) for the duration of the block."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    claim_socket(path)
    await runner.setup()
    listening = False
    try:
        await web.UnixSite(runner, path).start()
        listening = True
        os.chmod(path, 0o600)
        yield
    finally:
        await runner.cleanup()
        if listening:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a daemon's coroutine until SIGTERM or SIGINT; a ``NapError`` (another agent is running, say)
    is printed and exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def until_signalled() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await main()
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(until_signalled())
    except NapError as e:
        print(f"nap agent: {e.message}", file=sys.stderr)
        sys.exit(1)
