"""Archives and folders written into an app's folder by the archive rules (``Tree``): nothing lands
outside it, no devices, and the entry count and bytes written stay under the limits."""

from __future__ import annotations

import lzma
import os
import posixpath
import stat
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO

from ...config import Settings
from ...errors import FetchError
from .common import CHUNK, MAX_LINK_TARGET, PROGRESS_EVERY, Check, Log, Stopped, human, in_thread, os_error, shown

MAGIC = (
    (0, b"\x1f\x8b", "gzip"),
    (0, b"PK\x03\x04", "zip"),
    (257, b"ustar", "tar"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
)


def archive_format(path: Path) -> tuple[str | None, bytes]:
    """The archive format of ``path`` by its magic bytes (or None), and its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    for offset, magic, name in MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name, head
    return None, head


async def unpack(
    archive: Path, work: Path, settings: Settings, log: Log, check: Check, described: str
) -> tuple[Path, dict]:
    """Extract ``archive`` (recognised by its first bytes) under ``work``; return the app folder and
    the summary. ``described`` says what the bytes are (their content type), for the not-an-archive
    message."""
    fmt, _ = archive_format(archive)
    if fmt is None:
        # Not a byte of it is quoted: a deploy must not become a way to read what a server answers.
        size = archive.stat().st_size
        raise FetchError(f"not an archive or repository ({described}, {human(size)})")
    app, files, size = await in_thread(partial(extract, archive, fmt, work / "tree", settings), log, check)
    await log(f"extracted {files} files ({size} bytes)")
    return app, {"kind": "archive", "files": files, "bytes": size}


def extract(archive: Path, fmt: str, root: Path, settings: Settings, stop: threading.Event, say):
    """Thread body: extract ``archive`` into ``root``; return the app folder, file count and bytes."""
    tree = Tree(root, settings, stop, say)
    try:
        if fmt == "zip":
            read_zip(archive, tree)
        else:
            read_tar(archive, tree)
        if not tree.entries:
            raise FetchError("the archive is empty")
        app = tree.finish(flatten=True)
    except (FetchError, Stopped):
        raise
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as e:
        # Corrupt or truncated data, encrypted zip entries, unknown compression, a full disk.
        why = os_error(e, root) if isinstance(e, OSError) else str(e)[:200]
        raise FetchError(f"cannot extract the {fmt} archive: {why}") from e
    return app, tree.files, tree.bytes


def read_tar(archive: Path, tree: Tree) -> None:
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
                raise FetchError(f"entry {shown(member.name)} is a device or fifo")
            else:
                raise FetchError(f"entry {shown(member.name)} has an unsupported type ({member.type!r})")


def read_zip(archive: Path, tree: Tree) -> None:
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
                    target = data.read(MAX_LINK_TARGET + 1)
                if len(target) > MAX_LINK_TARGET:
                    raise FetchError(f"symlink {shown(name)} has a target longer than {MAX_LINK_TARGET} bytes")
                tree.symlink(name, target.decode("utf-8", "surrogateescape"))
            elif info.is_dir() or kind == stat.S_IFDIR:
                tree.directory(name)
            elif kind in (0, stat.S_IFREG):
                with zf.open(info) as data:
                    tree.file(name, data, executable=bool(mode & 0o111))
            else:
                raise FetchError(f"entry {shown(name)} is a device, fifo or socket")


def copy_folder(source: Path, root: Path, settings: Settings, stop: threading.Event, say, skip=()):
    """Thread body: copy the folder ``source`` into ``root`` (top-level names in ``skip`` left out).

    Symlinks are copied as symlinks, never followed, and obey the archive rules.
    Returns the app folder, file count and bytes like :func:`extract`.
    """
    tree = Tree(root, settings, stop, say)
    try:
        pending: list[tuple[str | Path, str]] = [(source, "")]
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
                    raise FetchError(f"{shown(name)} is a device, fifo or socket")
        app = tree.finish(flatten=False)
    except (FetchError, Stopped):
        raise
    except OSError as e:
        raise FetchError(f"cannot copy {source}: {os_error(e, root)}") from e
    return app, tree.files, tree.bytes


class Tree:
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
        self._next_report = time.monotonic() + PROGRESS_EVERY

    def expect(self, count: int) -> None:
        """Fail early when an archive's directory already lists too many entries."""
        if count > self.max_files:
            raise FetchError(f"the app has more than {self.max_files} files and folders (the limit)")

    def directory(self, name: str) -> None:
        rel, path = self._place(name)
        if rel:
            # Not the archive's mode: a folder without write permission could not be filled or removed.
            path.mkdir(mode=0o755, parents=True, exist_ok=True)

    def file(self, name: str, data: IO[bytes] | None, *, executable: bool) -> None:
        rel, path = self._place(name, need_name=True)
        if data is None:
            raise FetchError(f"entry {shown(name)} has no data")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o755 if executable else 0o644)
            # Count what is really written: sizes in headers can lie (zip bombs).
            while chunk := data.read(CHUNK):
                self._written(len(chunk))
                out.write(chunk)
        self._regular.add(rel)
        self.files += 1

    def hardlink(self, name: str, target: str) -> None:
        target_rel = normalize(target, what="hard link target")
        if target_rel not in self._regular:
            raise FetchError(
                f"hard link {shown(name)} points to {shown(target)}, which is not a file earlier in the archive"
            )
        # A copy, not a link: the app's files share no inode with anything (and count toward max_extract).
        source = self.root / target_rel
        with open(source, "rb") as data:
            self.file(name, data, executable=bool(source.stat().st_mode & 0o111))

    def symlink(self, name: str, target: str) -> None:
        rel, path = self._place(name, need_name=True)
        if not target or "\0" in target:
            raise FetchError(f"symlink {shown(name)} has an empty or invalid target")
        if target.startswith("/"):
            raise FetchError(f"symlink {shown(name)} points to an absolute path ({shown(target)})")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../"):
            raise FetchError(f"symlink {shown(name)} points outside the app ({shown(target)})")
        if os.path.lexists(path):
            raise FetchError(f"entry {shown(name)} appears twice")
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
                raise FetchError(f"entry {shown(rel)} appears twice") from None
        app = self.root
        if flatten:
            top = list(self.root.iterdir())
            if len(top) == 1 and not top[0].is_symlink() and top[0].is_dir():
                app = top[0]
        inside = Path(os.path.realpath(app))
        for rel, target in self._symlinks.items():
            if not Path(os.path.realpath(self.root / rel)).is_relative_to(inside):
                raise FetchError(f"symlink {shown(rel)} resolves outside the app ({shown(target)})")
        return app

    def _place(self, name: str, *, need_name: bool = False) -> tuple[str, Path]:
        """Check one entry's name and count it; return its normalized name and its path."""
        rel = normalize(name, what="entry")
        if not rel:
            if need_name:
                raise FetchError(f"entry {shown(name)} has no name")
            return rel, self.root
        self.entries += 1
        self.expect(self.entries)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                raise FetchError(f"entry {shown(name)} lies under the symlink {shown(prefix)}")
        if rel in self._symlinks:
            raise FetchError(f"entry {shown(name)} appears twice")
        self._check_stop()
        return rel, self.root.joinpath(*parts)

    def _written(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise FetchError(f"the app expands past the limit of {self.max_bytes} bytes")
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()
        if (now := time.monotonic()) >= self._next_report:
            self._next_report = now + PROGRESS_EVERY
            self.say(f"unpacking: {self.files} files, {human(self.bytes)} so far")


def normalize(name: str, *, what: str) -> str:
    """``name`` as "a/b/c" without "." or empty parts; refuses absolute names and "..".

    Returns "" for the root itself.
    """
    if name.startswith("/"):
        raise FetchError(f"{what} {shown(name)} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{what} {shown(name)} climbs out of the app folder (..)")
    if any("\0" in part for part in parts):
        raise FetchError(f"{what} {shown(name)} has an invalid name")
    return "/".join(parts)
