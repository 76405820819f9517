"""git repositories: a shallow clone, then its files (without ``.git``) through the archive rules.

Over the network a clone follows the fetch policy (``policy.py``): the host is resolved and checked
here, and git connects only to the checked addresses. Over http(s) libcurl is pinned to them
(``http.curloptResolve``, git 2.37 or later) and follows no redirect (``http.followRedirects=false``:
a repository that moved must be given by its new URL); over ``git://``, whose transport resolves names
itself, the URL names the checked address instead of the host. Such a clone runs without the system's
and the user's git configuration (``url.<base>.insteadOf``, proxies) and without proxy variables, so
nothing sends it elsewhere. It fails when libcurl receives less than a byte a second for
``download_idle_timeout`` seconds (``http.lowSpeedLimit``/``lowSpeedTime``), or, over any protocol,
when git neither says nor writes anything for that long.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ...config import Settings
from ...errors import FetchError
from ..sizes import tree_bytes
from .archive import copy_folder
from .common import GIT_REMOTE_PROTOCOLS, Check, Log, in_thread, redact, retrieve, shown, watch
from .policy import Refused, resolve, spelling_refusal

DEFAULT_PORTS = {"http": 80, "https": 443, "git": 9418}
# What could send a network clone elsewhere than the checked address: dropped from git's environment.
PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "git_proxy_command"})


async def fetch_git(
    url: str,
    work: Path,
    settings: Settings,
    log: Log,
    check: Check,
    protocols: str = GIT_REMOTE_PROTOCOLS,
) -> tuple[Path, dict]:
    """Clone ``url`` (depth 1), then copy its files, without ``.git``, through the archive rules."""
    named = redact(url)
    clone = work / "clone"
    await log(f"cloning {named}")
    target, options = (url, []) if protocols == "file" else await pin(url, settings)
    await git_clone(target, clone, settings, log, check, protocols, options, named)
    commit = await git_head(clone)
    await log(f"cloned {named} at commit {commit[:12]}")
    await check()
    app, files, size = await in_thread(partial(copy_folder, clone, work / "tree", settings, skip={".git"}), log, check)
    await log(f"checked out {files} files ({size} bytes)")
    return app, {"kind": "git", "files": files, "bytes": size, "commit": commit}


async def pin(url: str, settings: Settings) -> tuple[str, list[str]]:
    """What git is given for the network URL ``url`` under the fetch policy: the URL to clone and the
    options (``-c name=value``) that keep it to the checked addresses.

    :raises FetchError: the host does not resolve, or to no address the policy permits.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except (ValueError, KeyError):
        raise FetchError(f"cannot clone {shown(redact(url))}: bad scheme or port") from None
    if not host.isascii():
        # libcurl would translate it (IDNA) after the pin is matched: no pin, its own lookup.
        raise FetchError("the host of a git URL must be written in ASCII (its punycode form)")
    if why := spelling_refusal(host):
        raise FetchError(why)
    try:
        addresses = await resolve(host, port, settings.fetch_allow_networks)
    except Refused as e:
        raise FetchError(f"git clone of {redact(url)} refused: {e}") from None
    except OSError as e:
        raise FetchError(f"cannot resolve host {host}: {e.strerror or e}") from None
    if scheme == "git":
        first = addresses[0]
        return urlunsplit(parts._replace(netloc=f"[{first}]:{port}" if ":" in first else f"{first}:{port}")), []
    idle = max(1, math.ceil(settings.download_idle_timeout))
    options = ["http.followRedirects=false", "http.lowSpeedLimit=1", f"http.lowSpeedTime={idle}"]
    try:
        ip_address(host)  # an address: libcurl looks nothing up
    except ValueError:
        pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        options.append(f"http.curloptResolve={host}:{port}:{pinned}")
    return url, [arg for option in options for arg in ("-c", option)]


def git_env(protocols: str) -> dict[str, str]:
    """git's environment: no prompt, only ``protocols``; for a network clone no configuration but
    ours (``-c``) and no proxy."""
    env = dict(os.environ)
    if protocols != "file":
        env = {k: v for k, v in env.items() if not k.startswith("GIT_CONFIG") and k.lower() not in PROXY_VARIABLES}
        env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull})
    # Only the protocol the URL names: no submodule or redirect tricks into ssh, ext:: or files.
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": protocols})
    return env


async def git_clone(
    url: str,
    target: Path,
    settings: Settings,
    log: Log,
    check: Check,
    protocols: str,
    options: list[str] | None = None,
    named: str | None = None,
) -> None:
    """Run ``git [options] clone --depth 1`` into ``target``, relaying its progress; kill it on any
    failure. ``named`` is how messages name the source (``url`` as the user gave it)."""
    named = named or redact(url)
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            *(options or []),
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
            env=git_env(protocols),
            # Its own process group, so that git's helpers (remote-https, index-pack) die with it.
            start_new_session=True,
        )
    except FileNotFoundError:
        raise FetchError("git is not installed on this server") from None
    lines: deque[str] = deque()
    tail: deque[str] = deque(maxlen=20)
    assert process.stderr is not None  # a pipe, asked for above
    last_sign = time.monotonic()  # of life: a byte from git, or the clone growing

    def alive() -> None:
        nonlocal last_sign
        last_sign = time.monotonic()

    reader = asyncio.ensure_future(read_git_progress(process.stderr, lines, tail, alive))
    reader.add_done_callback(retrieve)
    # The clone is only measured afterwards by the archive rules; while it runs, a disk-usage guard
    # stops a repository that grows past what a download plus its extraction may take.
    limit = settings.max_download + settings.max_extract
    idle = settings.download_idle_timeout
    next_guard = time.monotonic() + 1.0
    size = 0

    async def guard() -> None:
        nonlocal next_guard, size
        if time.monotonic() < next_guard:
            return
        if (now := await asyncio.to_thread(tree_bytes, target)) > limit:
            raise FetchError(f"the repository exceeds the limit of {limit} bytes")
        if now != size:
            size = now
            alive()
        if time.monotonic() - last_sign > idle:
            raise FetchError(f"git clone of {named} stalled: nothing received for {idle:g} seconds")
        next_guard = time.monotonic() + 1.0

    try:
        async with asyncio.timeout(settings.download_timeout):
            await watch(reader, lines, log, check, guard)
            code = await process.wait()
    except TimeoutError:
        raise FetchError(f"git clone of {named} timed out after {settings.download_timeout:g} seconds") from None
    finally:
        reader.cancel()
        if process.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    if code != 0:
        raise FetchError(f"git clone of {named} failed: {git_reason(tail, code)}")


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def read_git_progress(
    stream: asyncio.StreamReader, lines: deque[str], tail: deque[str], alive: Callable[[], None] | None = None
) -> None:
    """Collect git's stderr into ``lines``: each finished line, and its in-place progress updates
    (ended by a carriage return) at most once a second. ``tail`` keeps the last lines for errors;
    ``alive`` is called whenever git says something."""
    buffer = b""
    last_progress = 0.0
    while True:
        chunk = await stream.read(4096)
        if alive is not None:
            alive()
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


# git quotes what a server sent when it is not git's protocol ("bad line length character: HTTP"):
# the message keeps the complaint, not the bytes.
_QUOTED_BYTES = re.compile(r"(protocol error: [^:]*):.*")


def git_reason(tail: deque[str], code: int) -> str:
    errors = [_QUOTED_BYTES.sub(r"\1", line) for line in tail if line.startswith(("fatal:", "error:"))]
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
