"""git repositories: a shallow clone, then its files (without ``.git``) through the archive rules."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import deque
from contextlib import suppress
from functools import partial
from pathlib import Path

from ...config import Settings
from ...errors import FetchError
from .archive import copy_folder
from .common import GIT_REMOTE_PROTOCOLS, Check, Log, in_thread, redact, retrieve, watch


async def fetch_git(
    url: str,
    work: Path,
    settings: Settings,
    log: Log,
    check: Check,
    protocols: str = GIT_REMOTE_PROTOCOLS,
) -> tuple[Path, dict]:
    """Clone ``url`` (depth 1), then copy its files, without ``.git``, through the archive rules."""
    shown = redact(url)
    clone = work / "clone"
    await log(f"cloning {shown}")
    await git_clone(url, clone, settings, log, check, protocols)
    commit = await git_head(clone)
    await log(f"cloned {shown} at commit {commit[:12]}")
    await check()
    app, files, size = await in_thread(partial(copy_folder, clone, work / "tree", settings, skip={".git"}), log, check)
    await log(f"checked out {files} files ({size} bytes)")
    return app, {"kind": "git", "files": files, "bytes": size, "commit": commit}


async def git_clone(url: str, target: Path, settings: Settings, log: Log, check: Check, protocols: str) -> None:
    """Run ``git clone --depth 1`` into ``target``, relaying its progress; kill it on any failure."""
    shown = redact(url)
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        # Only the protocol the URL names: no submodule or redirect tricks into ssh, ext:: or files.
        "GIT_ALLOW_PROTOCOL": protocols,
    }
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            "clone",
            "--depth",
            "1",
            "--progress",
            "--",
            url,
            str(target),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # Its own process group, so that git's helpers (remote-https, index-pack) die with it.
            start_new_session=True,
        )
    except FileNotFoundError:
        raise FetchError("git is not installed on this server") from None
    lines: deque[str] = deque()
    tail: deque[str] = deque(maxlen=20)
    assert process.stderr is not None  # a pipe, asked for above
    reader = asyncio.ensure_future(read_git_progress(process.stderr, lines, tail))
    reader.add_done_callback(retrieve)
    # The clone is only measured afterwards by the archive rules; while it runs, a disk-usage guard
    # stops a repository that grows past what a download plus its extraction may take.
    limit = settings.max_download + settings.max_extract
    next_guard = time.monotonic() + 1.0

    async def guard() -> None:
        nonlocal next_guard
        if time.monotonic() < next_guard:
            return
        if await asyncio.to_thread(disk_usage, target) > limit:
            raise FetchError(f"the repository exceeds the limit of {limit} bytes")
        next_guard = time.monotonic() + 1.0

    try:
        async with asyncio.timeout(settings.download_timeout):
            await watch(reader, lines, log, check, guard)
            code = await process.wait()
    except TimeoutError:
        raise FetchError(f"git clone of {shown} timed out after {settings.download_timeout:g} seconds") from None
    finally:
        reader.cancel()
        if process.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    if code != 0:
        raise FetchError(f"git clone of {shown} failed: {git_reason(tail, code)}")


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def read_git_progress(stream: asyncio.StreamReader, lines: deque[str], tail: deque[str]) -> None:
    """Collect git's stderr into ``lines``: each finished line, and its in-place progress updates
    (ended by a carriage return) at most once a second. ``tail`` keeps the last lines for errors."""
    buffer = b""
    last_progress = 0.0
    while True:
        chunk = await stream.read(4096)
        buffer += chunk
        while (end := _LINE_END.search(buffer)) or (not chunk and buffer):
            if end:
                raw, separator, buffer = buffer[: end.start()], end.group(), buffer[end.end() :]
            else:
                raw, separator, buffer = buffer, b"\n", b""
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            tail.append(line)
            if separator == b"\r":
                if time.monotonic() - last_progress < 1.0:
                    continue
                last_progress = time.monotonic()
            # It names the server's own temporary folder, which says nothing to the user.
            if not line.startswith("Cloning into"):
                lines.append(line)
        if not chunk:
            return


def git_reason(tail: deque[str], code: int) -> str:
    errors = [line for line in tail if line.startswith(("fatal:", "error:"))]
    if errors:
        return "; ".join(errors)
    return tail[-1] if tail else f"git exited with code {code}"


async def git_head(clone: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(clone),
        "rev-parse",
        "--verify",
        "HEAD",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise FetchError("the repository has no commits")
    return out.decode().strip()


def disk_usage(folder: Path) -> int:
    """Bytes under ``folder``, tolerating files that vanish meanwhile (git renames its temp files)."""
    total = 0
    pending = [str(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    with suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total
