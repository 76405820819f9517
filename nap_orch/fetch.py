"""The fetcher: turns a deploy URL into a folder holding the app's files.

Sources, by URL:

- ``http://`` and ``https://`` archives (tar, tar.gz, tgz, tar.bz2, tar.xz, zip), recognised by their
  first bytes, not by their name. A single top-level folder is flattened, as in GitHub's tarballs.
- git repositories: ``git://...``, ``git+https://...`` or an http(s) URL ending in ``.git``, cloned with
  ``git clone --depth 1``; the ``.git`` folder is not part of the app.
- local sources, only where ``Settings.allow_local_sources`` is on: ``file:///abs/path`` or
  ``/abs/path``, a folder (copied, or cloned when it is a git repository) or an archive file.

Everything is untrusted: an archive or a repository may try to write outside its folder (``..``,
absolute names, symlinks and hard links), hold devices, or expand without bound. Each entry is
checked and written by :class:`_Tree`, which counts the bytes it actually writes.

All work happens in a hidden folder beside ``dest``; ``dest`` appears, by one rename, only when
everything succeeded, and the hidden folder is always removed. So after any failure, cancellation
included, nothing is left behind.
"""

from __future__ import annotations

import asyncio
import lzma
import os
import posixpath
import re
import shutil
import signal
import socket
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

import aiofiles
import aiohttp

from .config import MiB, Settings
from .errors import BadRequest, FetchError

__all__ = ["fetch"]

Log = Callable[[str], Awaitable[None]]
Check = Callable[[], Awaitable[None]]
# Awaited with (bytes so far, total or None) as a download proceeds: drives progress bars.
Progress = Callable[[int, "int | None"], Awaitable[None]]

_CHUNK = 256 * 1024
# How often long steps (extraction threads, git clone) await ``check`` and relay their log lines.
_TICK = 0.2
# Progress lines of a download of unknown size come every this many bytes (else every 10%).
_UNKNOWN_SIZE_STEP = 4 * MiB
# Extraction and clone progress lines come at most this often (seconds).
_PROGRESS_EVERY = 2.0
# A symlink's target is a path, not content: anything longer is not a real symlink.
_MAX_LINK_TARGET = 4096
_USER_AGENT = "nap-orch-fetch"
_GIT_REMOTE_PROTOCOLS = "http:https:git"

_ALLOWED = "http://, https:// (archives), git://, git+https:// or an http(s) URL ending in .git"
_ALLOWED_LOCAL = _ALLOWED + ", file:// or an absolute path"


async def fetch(
    url: str,
    dest: Path,
    *,
    settings: Settings,
    log: Log | None = None,
    check: Check | None = None,
    progress: Progress | None = None,
) -> dict:
    """Download the app at ``url`` into the new folder ``dest``.

    :param url: an archive URL, a git repository, or (if allowed) a local folder or archive.
    :param dest: a folder that must not exist yet; it is created, holding the app's files.
    :param settings: limits (``max_download``, ``max_extract``, ``max_files``, ``download_timeout``)
        and ``allow_local_sources``.
    :param log: awaited with human progress lines.
    :param check: awaited between steps and chunks; whatever it raises (a cancelled job) propagates.
    :param progress: awaited with (bytes received, total or None) along with download progress lines.
    :returns: ``{"kind": "archive"|"git"|"local", "files": n, "bytes": n}``, plus ``"commit"`` for git.
    :raises BadRequest: the URL is not one of the accepted kinds.
    :raises FetchError: the source could not be fetched or is not a safe app; the message says why.
    """
    log = log or _quiet
    check = check or _proceed
    dest = Path(dest)
    source = _classify(url, settings)
    if os.path.lexists(dest):
        raise FileExistsError(f"fetch destination {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside dest, so that the final rename stays on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".fetch", dir=dest.parent))
    try:
        await check()
        if source.kind == "http":
            app, summary = await _fetch_archive_url(source.location, work, settings, log, check, progress)
        elif source.kind == "git":
            app, summary = await _fetch_git(source.location, work, settings, log, check)
        else:
            app, summary = await _fetch_local(Path(source.location), work, settings, log, check)
        await check()
        app.rename(dest)
    finally:
        await _remove(work)
    return summary


# -- what a URL names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A classified URL. ``kind`` is "http" (an archive), "git" or "local"; ``location`` is what to
    download or clone, or a local absolute path."""

    kind: str
    location: str


def _classify(url: str, settings: Settings) -> _Source:
    """Say what ``url`` names, or raise BadRequest when it is not a source this server accepts."""
    allowed = _ALLOWED_LOCAL if settings.allow_local_sources else _ALLOWED
    raw = url.strip()
    if not raw:
        raise BadRequest(f"empty URL: use {allowed}")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadRequest("the URL contains control characters")
    lower = raw.lower()
    if lower.startswith(("git+http://", "git+https://")):
        return _Source("git", _with_host(raw[len("git+"):]))
    if lower.startswith("git://"):
        return _Source("git", _with_host(raw))
    if lower.startswith(("http://", "https://")):
        if urlsplit(_with_host(raw)).path.rstrip("/").endswith(".git"):
            return _Source("git", raw)
        return _Source("http", raw)
    if lower.startswith("file:"):
        parts = urlsplit(raw)
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"a file URL names a path on this server (file:///abs/path), not {raw!r}")
        path = unquote(parts.path)
    elif raw.startswith("/"):
        path = raw
    else:
        scheme = urlsplit(raw).scheme
        if scheme:
            raise BadRequest(f"unsupported URL scheme {scheme + ':'!r}: use {allowed}")
        raise BadRequest(f"not a URL: {raw!r}: use {allowed}")
    if not settings.allow_local_sources:
        raise BadRequest("local sources are not allowed on this server")
    if not path.startswith("/"):
        raise BadRequest(f"a local source must be an absolute path, not {path!r}")
    return _Source("local", path)


def _with_host(url: str) -> str:
    if not urlsplit(url).hostname:
        raise BadRequest(f"the URL has no host: {url!r}")
    return url


# -- archives from http(s) ------------------------------------------------------------------------


async def _fetch_archive_url(
    url: str, work: Path, settings: Settings, log: Log, check: Check, progress: Progress | None = None
) -> tuple[Path, dict]:
    archive = work / "download"
    content_type = await _download(url, archive, settings, log, check, progress)
    await check()
    return await _unpack(archive, work, settings, log, check, f"content type {content_type}")


async def _download(url: str, file: Path, settings: Settings, log: Log, check: Check,
                    report: Progress | None = None) -> str:
    """Stream ``url`` into ``file`` and return its content type.

    Bytes are counted as they arrive, and the download stops as soon as they pass
    ``max_download``: a Content-Length header can lie (or be absent), so it only serves to fail early.
    """
    limit = settings.max_download
    shown = _redact(url)
    received = 0
    await log(f"downloading {shown}")
    try:
        async with asyncio.timeout(settings.download_timeout):
            # The bytes on the wire are the archive: no transparent decompression (a gzip bomb
            # in transport would dodge the byte count), and ask the server for none.
            headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
            # The timeout above is the only one: aiohttp's own default (5 minutes) would cut it short.
            no_timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(
                auto_decompress=False, headers=headers, timeout=no_timeout
            ) as session:
                async with session.get(url) as response:
                    if not 200 <= response.status < 300:
                        raise FetchError(f"HTTP {response.status} {response.reason} from {shown}")
                    total = response.content_length
                    if total is not None and total > limit:
                        raise FetchError(
                            f"download exceeds the limit of {limit} bytes (the server announces {total})"
                        )
                    content_type = response.headers.get("Content-Type", "none")
                    progress = _Progress(total)
                    next_check = 0.0
                    async with aiofiles.open(file, "wb") as out:
                        async for chunk in response.content.iter_chunked(_CHUNK):
                            received += len(chunk)
                            if received > limit:
                                raise FetchError(f"download exceeds the limit of {limit} bytes")
                            await out.write(chunk)
                            if line := progress.line(received):
                                await log(line)
                                if report is not None:
                                    await report(received, total)
                            # Chunks can be tiny: checking each one could cost more than the download.
                            if (now := time.monotonic()) >= next_check:
                                await check()
                                next_check = now + _TICK
    except TimeoutError:
        raise FetchError(
            f"download of {shown} timed out after {settings.download_timeout:g} seconds"
        ) from None
    except aiohttp.ClientConnectorError as e:
        raise FetchError(f"cannot reach host {e.host}:{e.port}: {_os_reason(e.os_error)}") from None
    except aiohttp.ClientError as e:
        raise FetchError(f"download of {shown} failed: {str(e) or type(e).__name__}") from None
    await log(f"downloaded {received} bytes")
    return content_type


class _Progress:
    """Says when a download deserves a progress line: every 10% of a known size, else every few MiB."""

    def __init__(self, total: int | None):
        self.total = total
        self.step = max(total // 10, 1) if total else _UNKNOWN_SIZE_STEP
        self.next = self.step

    def line(self, received: int) -> str | None:
        # The end is reported by the caller ("downloaded N bytes").
        if received < self.next or (self.total and received >= self.total):
            return None
        while self.next <= received:
            self.next += self.step
        if self.total:
            percent = received * 100 // self.total
            return f"downloaded {_human(received)} of {_human(self.total)} ({percent}%)"
        return f"downloaded {_human(received)} so far"


def _os_reason(error: OSError) -> str:
    # asyncio's connect errors carry "Connect call failed (...)" as strerror: the errno says it better.
    # Name-resolution errors (gaierror) have their own negative codes and a good strerror.
    if error.errno and not isinstance(error, socket.gaierror):
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__


# -- archives --------------------------------------------------------------------------------------


_MAGIC = (
    (0, b"\x1f\x8b", "gzip"),
    (0, b"PK\x03\x04", "zip"),
    (257, b"ustar", "tar"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
)


def _archive_format(path: Path) -> tuple[str | None, bytes]:
    """The archive format of ``path`` by its magic bytes (or None), and its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name, head
    return None, head


async def _unpack(
    archive: Path, work: Path, settings: Settings, log: Log, check: Check, described: str
) -> tuple[Path, dict]:
    """Extract ``archive`` (recognised by its first bytes) under ``work``; return the app folder and
    the summary. ``described`` says where the bytes came from, for the not-an-archive message."""
    fmt, head = _archive_format(archive)
    if fmt is None:
        raise FetchError(
            f"not an archive or repository ({described}, first bytes {head[:24]!r})"
        )
    app, files, size = await _in_thread(
        partial(_extract, archive, fmt, work / "tree", settings), log, check
    )
    await log(f"extracted {files} files ({size} bytes)")
    return app, {"kind": "archive", "files": files, "bytes": size}


def _extract(archive: Path, fmt: str, root: Path, settings: Settings, stop: threading.Event, say):
    """Thread body: extract ``archive`` into ``root``; return the app folder, file count and bytes."""
    tree = _Tree(root, settings, stop, say)
    try:
        if fmt == "zip":
            _read_zip(archive, tree)
        else:
            _read_tar(archive, tree)
        if not tree.entries:
            raise FetchError("the archive is empty")
        app = tree.finish(flatten=True)
    except (FetchError, _Stopped):
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
            OSError, RuntimeError, NotImplementedError) as e:
        # Corrupt or truncated data, encrypted zip entries, unknown compression, a full disk.
        raise FetchError(f"cannot extract the {fmt} archive: {e}") from e
    return app, tree.files, tree.bytes


def _read_tar(archive: Path, tree: _Tree) -> None:
    # Stream mode: one pass, no seeking back through a compressed stream.
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                tree.directory(member.name)
            elif member.isreg():
                data = tar.extractfile(member)
                tree.file(member.name, data, executable=bool(member.mode & 0o111))
            elif member.issym():
                tree.symlink(member.name, member.linkname)
            elif member.islnk():
                tree.hardlink(member.name, member.linkname)
            elif member.ischr() or member.isblk() or member.isfifo():
                raise FetchError(f"entry {member.name!r} is a device or fifo")
            else:
                raise FetchError(f"entry {member.name!r} has an unsupported type ({member.type!r})")


def _read_zip(archive: Path, tree: _Tree) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        tree.expect(len(infos))
        for info in infos:
            # Zips made on Windows may use backslashes; "..\\x" must count as a climb too.
            name = info.filename.replace("\\", "/")
            # Unix zips keep the file's mode (type and permissions) in the high bits.
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                with zf.open(info) as data:
                    target = data.read(_MAX_LINK_TARGET + 1)
                if len(target) > _MAX_LINK_TARGET:
                    raise FetchError(f"symlink {name!r} has a target longer than {_MAX_LINK_TARGET} bytes")
                tree.symlink(name, target.decode("utf-8", "surrogateescape"))
            elif info.is_dir() or kind == stat.S_IFDIR:
                tree.directory(name)
            elif kind in (0, stat.S_IFREG):
                with zf.open(info) as data:
                    tree.file(name, data, executable=bool(mode & 0o111))
            else:
                raise FetchError(f"entry {name!r} is a device, fifo or socket")


def _copy(source: Path, root: Path, settings: Settings, stop: threading.Event, say, skip=()):
    """Thread body: copy the folder ``source`` into ``root`` (top-level names in ``skip`` left out).

    Symlinks are copied as symlinks, never followed, and obey the archive rules.
    Returns the app folder, file count and bytes like :func:`_extract`.
    """
    tree = _Tree(root, settings, stop, say)
    try:
        pending = [(source, "")]
        while pending:
            folder, prefix = pending.pop()
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
            for entry in entries:
                if not prefix and entry.name in skip:
                    continue
                name = prefix + entry.name
                if entry.is_symlink():
                    tree.symlink(name, os.readlink(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    tree.directory(name)
                    pending.append((entry.path, name + "/"))
                elif entry.is_file(follow_symlinks=False):
                    mode = entry.stat(follow_symlinks=False).st_mode
                    with open(os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as data:
                        tree.file(name, data, executable=bool(mode & 0o111))
                else:
                    raise FetchError(f"{name!r} is a device, fifo or socket")
        app = tree.finish(flatten=False)
    except (FetchError, _Stopped):
        raise
    except OSError as e:
        raise FetchError(f"cannot copy {source}: {e}") from e
    return app, tree.files, tree.bytes


class _Stopped(Exception):
    """Raised in a worker thread when the coroutine waiting for it gave up (``check`` raised)."""


class _Tree:
    """The folder an app is unpacked into: it refuses any entry that would land outside it, and
    enforces the entry count and the bytes written.

    Entries arrive in archive order, named relative to the root with "/" separators. Symlinks are
    recorded and created only at the end, so no file is ever written through one; then each is
    resolved on disk, proving it stays inside the app even through chains of symlinks.
    """

    def __init__(self, root: Path, settings: Settings, stop: threading.Event, say: Callable[[str], None]):
        root.mkdir()
        self.root = root
        self.max_files = settings.max_files
        self.max_bytes = settings.max_extract
        self.stop = stop
        self.say = say
        self.entries = 0  # files, folders and links: what max_files bounds
        self.files = 0  # files and links
        self.bytes = 0
        self._regular: set[str] = set()
        self._symlinks: dict[str, str] = {}
        self._next_report = time.monotonic() + _PROGRESS_EVERY

    def expect(self, count: int) -> None:
        """Fail early when an archive's directory already lists too many entries."""
        if count > self.max_files:
            raise FetchError(f"the app has more than {self.max_files} files and folders (the limit)")

    def directory(self, name: str) -> None:
        rel, path = self._place(name)
        if rel:
            # Not the archive's mode: a folder without write permission could not be filled or removed.
            path.mkdir(mode=0o755, parents=True, exist_ok=True)

    def file(self, name: str, data: BinaryIO, *, executable: bool) -> None:
        rel, path = self._place(name, need_name=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o755 if executable else 0o644)
            # Count what is really written: sizes in headers can lie (zip bombs).
            while chunk := data.read(_CHUNK):
                self._written(len(chunk))
                out.write(chunk)
        self._regular.add(rel)
        self.files += 1

    def hardlink(self, name: str, target: str) -> None:
        target_rel = _normalize(target, what="hard link target")
        if target_rel not in self._regular:
            raise FetchError(
                f"hard link {name!r} points to {target!r}, which is not a file earlier in the archive"
            )
        # A copy, not a link: the app's files share no inode with anything (and count toward max_extract).
        source = self.root / target_rel
        with open(source, "rb") as data:
            self.file(name, data, executable=bool(source.stat().st_mode & 0o111))

    def symlink(self, name: str, target: str) -> None:
        rel, path = self._place(name, need_name=True)
        if not target or "\0" in target:
            raise FetchError(f"symlink {name!r} has an empty or invalid target")
        if target.startswith("/"):
            raise FetchError(f"symlink {name!r} points to an absolute path ({target})")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../"):
            raise FetchError(f"symlink {name!r} points outside the app ({target})")
        if os.path.lexists(path):
            raise FetchError(f"entry {name!r} appears twice")
        self._symlinks[rel] = target
        self.files += 1

    def finish(self, *, flatten: bool) -> Path:
        """Create the symlinks, choose the app folder and prove every symlink resolves inside it.

        With ``flatten``, a root holding a single folder gives that folder (GitHub tarballs).
        """
        for rel, target in self._symlinks.items():
            path = self.root / rel
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, path)
            except FileExistsError:
                raise FetchError(f"entry {rel!r} appears twice") from None
        app = self.root
        if flatten:
            top = list(self.root.iterdir())
            if len(top) == 1 and not top[0].is_symlink() and top[0].is_dir():
                app = top[0]
        inside = Path(os.path.realpath(app))
        for rel, target in self._symlinks.items():
            if not Path(os.path.realpath(self.root / rel)).is_relative_to(inside):
                raise FetchError(f"symlink {rel!r} resolves outside the app ({target})")
        return app

    def _place(self, name: str, *, need_name: bool = False) -> tuple[str, Path]:
        """Check one entry's name and count it; return its normalized name and its path."""
        rel = _normalize(name, what="entry")
        if not rel:
            if need_name:
                raise FetchError(f"entry {name!r} has no name")
            return rel, self.root
        self.entries += 1
        self.expect(self.entries)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                raise FetchError(f"entry {name!r} lies under the symlink {prefix!r}")
        if rel in self._symlinks:
            raise FetchError(f"entry {name!r} appears twice")
        self._check_stop()
        return rel, self.root.joinpath(*parts)

    def _written(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise FetchError(f"the app expands past the limit of {self.max_bytes} bytes")
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped()
        if (now := time.monotonic()) >= self._next_report:
            self._next_report = now + _PROGRESS_EVERY
            self.say(f"unpacking: {self.files} files, {_human(self.bytes)} so far")


def _normalize(name: str, *, what: str) -> str:
    """``name`` as "a/b/c" without "." or empty parts; refuses absolute names and "..".

    Returns "" for the root itself.
    """
    if name.startswith("/"):
        raise FetchError(f"{what} {name!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{what} {name!r} climbs out of the app folder (..)")
    if any("\0" in part for part in parts):
        raise FetchError(f"{what} {name!r} has an invalid name")
    return "/".join(parts)


# -- git -------------------------------------------------------------------------------------------


async def _fetch_git(
    url: str, work: Path, settings: Settings, log: Log, check: Check,
    protocols: str = _GIT_REMOTE_PROTOCOLS,
) -> tuple[Path, dict]:
    """Clone ``url`` (depth 1), then copy its files, without ``.git``, through the archive rules."""
    shown = _redact(url)
    clone = work / "clone"
    await log(f"cloning {shown}")
    await _git_clone(url, clone, settings, log, check, protocols)
    commit = await _git_head(clone)
    await log(f"cloned {shown} at commit {commit[:12]}")
    await check()
    app, files, size = await _in_thread(
        partial(_copy, clone, work / "tree", settings, skip={".git"}), log, check
    )
    await log(f"checked out {files} files ({size} bytes)")
    return app, {"kind": "git", "files": files, "bytes": size, "commit": commit}


async def _git_clone(
    url: str, target: Path, settings: Settings, log: Log, check: Check, protocols: str
) -> None:
    """Run ``git clone --depth 1`` into ``target``, relaying its progress; kill it on any failure."""
    shown = _redact(url)
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        # Only the protocol the URL names: no submodule or redirect tricks into ssh, ext:: or files.
        "GIT_ALLOW_PROTOCOL": protocols,
    }
    try:
        process = await asyncio.create_subprocess_exec(
            "git", "clone", "--depth", "1", "--progress", "--", url, str(target),
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
    reader = asyncio.ensure_future(_read_git_progress(process.stderr, lines, tail))
    reader.add_done_callback(_retrieve)
    # The clone is only measured afterwards by the archive rules; while it runs, a disk-usage guard
    # stops a repository that grows past what a download plus its extraction may take.
    limit = settings.max_download + settings.max_extract
    next_guard = time.monotonic() + 1.0

    async def guard() -> None:
        nonlocal next_guard
        if time.monotonic() < next_guard:
            return
        if await asyncio.to_thread(_disk_usage, target) > limit:
            raise FetchError(f"the repository exceeds the limit of {limit} bytes")
        next_guard = time.monotonic() + 1.0

    try:
        async with asyncio.timeout(settings.download_timeout):
            await _watch(reader, lines, log, check, guard)
            code = await process.wait()
    except TimeoutError:
        raise FetchError(
            f"git clone of {shown} timed out after {settings.download_timeout:g} seconds"
        ) from None
    finally:
        reader.cancel()
        if process.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    if code != 0:
        raise FetchError(f"git clone of {shown} failed: {_git_reason(tail, code)}")


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def _read_git_progress(stream: asyncio.StreamReader, lines: deque[str], tail: deque[str]) -> None:
    """Collect git's stderr into ``lines``: each finished line, and its in-place progress updates
    (ended by a carriage return) at most once a second. ``tail`` keeps the last lines for errors."""
    buffer = b""
    last_progress = 0.0
    while True:
        chunk = await stream.read(4096)
        buffer += chunk
        while (end := _LINE_END.search(buffer)) or (not chunk and buffer):
            if end:
                raw, separator, buffer = buffer[: end.start()], end.group(), buffer[end.end():]
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


def _git_reason(tail: deque[str], code: int) -> str:
    errors = [line for line in tail if line.startswith(("fatal:", "error:"))]
    if errors:
        return "; ".join(errors)
    return tail[-1] if tail else f"git exited with code {code}"


async def _git_head(clone: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        "git", "-C", str(clone), "rev-parse", "--verify", "HEAD",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise FetchError("the repository has no commits")
    return out.decode().strip()


def _disk_usage(folder: Path) -> int:
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


# -- local sources ---------------------------------------------------------------------------------


async def _fetch_local(
    path: Path, work: Path, settings: Settings, log: Log, check: Check
) -> tuple[Path, dict]:
    """A local git repository is cloned, a folder copied, a file extracted as an archive."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FetchError(f"no such file or folder: {path}") from None
    except OSError as e:
        raise FetchError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        if (path / ".git").exists():
            # file://, not a plain path: git ignores --depth for plain local paths.
            return await _fetch_git(path.resolve().as_uri(), work, settings, log, check, protocols="file")
        if work.resolve().is_relative_to(path.resolve()):
            raise FetchError(f"cannot copy {path} into a folder inside it")
        await log(f"copying {path}")
        app, files, size = await _in_thread(partial(_copy, path, work / "tree", settings), log, check)
        await log(f"copied {files} files ({size} bytes)")
        return app, {"kind": "local", "files": files, "bytes": size}
    if stat.S_ISREG(mode):
        await log(f"extracting {path}")
        return await _unpack(path, work, settings, log, check, "a local file")
    raise FetchError(f"{path} is neither a file nor a folder")


# -- running blocking work and waiting -------------------------------------------------------------


async def _in_thread(func: Callable, log: Log, check: Check):
    """Run ``func(stop, say)`` in a thread while relaying what it says to ``log`` and awaiting ``check``.

    ``func`` must return soon after ``stop`` is set (raising :class:`_Stopped`). If ``check`` raises,
    the thread is stopped and waited for, so that the caller may remove its files.
    """
    stop = threading.Event()
    lines: deque[str] = deque()
    task = asyncio.ensure_future(asyncio.to_thread(func, stop, lines.append))
    task.add_done_callback(_retrieve)
    try:
        return await _watch(task, lines, log, check)
    finally:
        if not task.done():
            stop.set()
            # A thread cannot be interrupted: wait until it notices, before anyone deletes its files.
            await asyncio.wait({task})


async def _watch(task: asyncio.Future, lines: deque[str], log: Log, check: Check, guard=None):
    """Wait for ``task``; meanwhile relay ``lines`` to ``log`` and await ``check`` (and ``guard``)."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=_TICK)
        while lines:
            await log(lines.popleft())
        if done:
            return task.result()
        await check()
        if guard is not None:
            await guard()


def _retrieve(task: asyncio.Future) -> None:
    # A task abandoned after a failure elsewhere must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


async def _remove(path: Path) -> None:
    # Shielded: a second cancellation during cleanup must not leave the files behind.
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, ignore_errors=True))


async def _quiet(message: str) -> None:
    pass


async def _proceed() -> None:
    pass


def _redact(url: str) -> str:
    """``url`` without its credentials, fit for logs and messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _human(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
