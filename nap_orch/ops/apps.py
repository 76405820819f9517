"""Deployed apps on disk: where they live, listing them, reading their spec.

``NAP_HOME/services/<user>/<user>_<app>`` is a symlink to the folder of one of the app's releases, in
``NAP_HOME/services/<user>/.versions/<app>/`` (``ops.releases``): a redeploy swaps the link with one
rename, so no reader ever sees a half-written app. Hidden folders (``.versions``, ``.staging``) never
show as apps.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .. import keys
from ..config import Settings
from ..errors import NotFound
from ..names import NAME_RE
from ..store.base import Store
from . import profile


def user_dir(settings: Settings, user: str) -> Path:
    return settings.services_dir / user


def app_path(settings: Settings, user: str, app: str) -> Path:
    return user_dir(settings, user) / f"{user}_{app}"


def versions_dir(settings: Settings, user: str) -> Path:
    return user_dir(settings, user) / ".versions"


def staging_dir(settings: Settings, user: str) -> Path:
    return user_dir(settings, user) / ".staging"


def list_apps(settings: Settings, user: str) -> list[str]:
    d = user_dir(settings, user)
    if not d.is_dir():
        return []
    prefix = f"{user}_"
    names = []
    for entry in d.iterdir():
        n = entry.name
        if n.startswith(prefix) and NAME_RE.fullmatch(n[len(prefix) :]) and entry.is_dir():
            names.append(n[len(prefix) :])
    return sorted(names)


def require_app(settings: Settings, user: str, app: str) -> Path:
    path = app_path(settings, user, app)
    if not path.is_dir():
        raise NotFound(f"app {app!r} is not deployed")
    return path


def spec(settings: Settings, user: str, app: str) -> profile.AppSpec:
    return profile.load(require_app(settings, user, app))


async def url(store: Store, user: str, app: str) -> str | None:
    return await store.get(keys.URL.format(user=user, app=app))


def unpublish(settings: Settings, user: str, app: str) -> None:
    """Remove the app's link, then every version folder of it (a reader sees the app whole or not at
    all)."""
    link = app_path(settings, user, app)
    if link.is_symlink():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link, ignore_errors=True)
    for old in versions_of(settings, user, app):
        shutil.rmtree(old, ignore_errors=True)


_JOB_ID = re.compile(r"[0-9a-f]{16}")


def versions_of(settings: Settings, user: str, app: str) -> list[Path]:
    """The app's version folders in the layout before releases (``.versions/<app>-<job id>``: not
    those of ``<app>-x``, whose names start alike)."""
    # One listing and a fixed pattern: every deploy asks (a regex and a glob per app name cost more
    # than the rest of the look).
    prefix = f"{app}-"
    try:
        with os.scandir(versions_dir(settings, user)) as entries:
            return [
                Path(e.path) for e in entries if e.name.startswith(prefix) and _JOB_ID.fullmatch(e.name[len(prefix) :])
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
