"""Local sources (only where ``NAP_ALLOW_LOCAL_SOURCES`` is on): a folder, a git repository or an
archive file on this server, inside the folder ``NAP_LOCAL_SOURCES_DIR`` names and never inside
``NAP_HOME`` (another tenant's apps and instances, the platform's secrets).

The rule is on real paths (symlinks resolved): a link in the allowed folder that points into
``NAP_HOME`` is refused. What the allowed folder holds is trusted like the folder itself (a git
repository there is read by git, which follows its own links): keep it writable by the platform's
admins alone.
"""

from __future__ import annotations

import os
import stat
from functools import partial
from pathlib import Path

from ...config import Settings
from ...errors import BadRequest, FetchError
from .archive import copy_folder, unpack
from .common import Check, Log, in_thread, shown
from .git import fetch_git


def local_source(path: str, settings: Settings) -> Path:
    """The real path of the local source ``path`` (absolute), if the policy lets deploys read it.

    :raises BadRequest: no folder is set for local sources, or ``path`` resolves outside it or into
        ``NAP_HOME`` (or holds it).
    """
    if not settings.local_sources_dir:
        raise BadRequest(
            "local sources are allowed, but no folder is set for them (NAP_LOCAL_SOURCES_DIR): none may be deployed"
        )
    allowed = Path(os.path.realpath(settings.local_sources_dir))
    home = Path(os.path.realpath(settings.home))
    real = Path(os.path.realpath(path))
    if real.is_relative_to(home) or home.is_relative_to(real):
        raise BadRequest(f"the local source {shown(path)} reaches into the platform's folder (NAP_HOME)")
    if not real.is_relative_to(allowed):
        raise BadRequest(f"the local source {shown(path)} is outside {str(allowed)!r}, where local sources may be")
    return real


def is_bare_repository(path: Path) -> bool:
    """A bare git repository (``git init --bare``, a server's copy): no work tree, its HEAD, objects and
    refs at its top. Copied as a folder it would be git's internals, not the app."""
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


async def fetch_local(path: Path, work: Path, settings: Settings, log: Log, check: Check) -> tuple[Path, dict]:
    """A local git repository (with a work tree or bare) is cloned, a folder copied, a file extracted as
    an archive. Everything is read through the real path, checked here, right before it is read."""
    real = local_source(str(path), settings)
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise FetchError(f"no such file or folder: {path}") from None
    except OSError as e:
        raise FetchError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        dot_git = real / ".git"
        has_git = os.path.lexists(dot_git)
        # A .git that is a file (a linked work tree, a submodule) or a link names a repository
        # elsewhere: only a repository inside the allowed folder is cloned.
        if has_git and not (local_source(str(dot_git), settings) / "objects").is_dir():
            raise FetchError(f"{path}/.git is not a repository (a linked work tree or a submodule?)")
        if has_git or is_bare_repository(real):
            # file://, not a plain path: git ignores --depth for plain local paths.
            return await fetch_git(real.as_uri(), work, settings, log, check, protocols="file")
        if work.resolve().is_relative_to(real):
            raise FetchError(f"cannot copy {path} into a folder inside it")
        await log(f"copying {path}")
        app, files, size = await in_thread(partial(copy_folder, real, work / "tree", settings), log, check)
        await log(f"copied {files} files ({size} bytes)")
        return app, {"kind": "local", "files": files, "bytes": size}
    if stat.S_ISREG(mode):
        await log(f"extracting {path}")
        return await unpack(real, work, settings, log, check, "a local file")
    raise FetchError(f"{path} is neither a file nor a folder")
