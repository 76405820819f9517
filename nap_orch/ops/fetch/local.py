"""Local sources (only where ``NAP_ALLOW_LOCAL_SOURCES`` is on): a folder, a git repository or an
archive file on this server."""

from __future__ import annotations

import stat
from functools import partial
from pathlib import Path

from ...config import Settings
from ...errors import FetchError
from .archive import copy_folder, unpack
from .common import Check, Log, in_thread
from .git import fetch_git


def is_bare_repository(path: Path) -> bool:
    """A bare git repository (``git init --bare``, a server's copy): no work tree, its HEAD, objects and
    refs at its top. Copied as a folder it would be git's internals, not the app."""
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


async def fetch_local(path: Path, work: Path, settings: Settings, log: Log, check: Check) -> tuple[Path, dict]:
    """A local git repository (with a work tree or bare) is cloned, a folder copied, a file extracted as
    an archive."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FetchError(f"no such file or folder: {path}") from None
    except OSError as e:
        raise FetchError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        if (path / ".git").exists() or is_bare_repository(path):
            # file://, not a plain path: git ignores --depth for plain local paths.
            return await fetch_git(path.resolve().as_uri(), work, settings, log, check, protocols="file")
        if work.resolve().is_relative_to(path.resolve()):
            raise FetchError(f"cannot copy {path} into a folder inside it")
        await log(f"copying {path}")
        app, files, size = await in_thread(partial(copy_folder, path, work / "tree", settings), log, check)
        await log(f"copied {files} files ({size} bytes)")
        return app, {"kind": "local", "files": files, "bytes": size}
    if stat.S_ISREG(mode):
        await log(f"extracting {path}")
        return await unpack(path, work, settings, log, check, "a local file")
    raise FetchError(f"{path} is neither a file nor a folder")
