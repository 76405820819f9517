"""Releases: every deploy of an app is a numbered release (v1, v2, ...), kept with its URL, time and
digest; the app's folder is a link to one of them, its current release.

Folders: ``NAP_HOME/services/<user>/.versions/<app>/v<n>``; the app's ``<user>_<app>`` is a symlink to
one of them, swapped with one rename (no reader sees a half-written app). Records:
``/nap/releases/<user>/<app>/<n>`` = ``{"release", "url", "time", "digest", "job", "files", "bytes"}``.
The last ``NAP_KEEP_RELEASES`` (5) are kept, and the current one whatever its age (after a rollback);
older ones lose their folder and record. Numbers only grow: the highest release is never pruned.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .. import keys
from ..config import Settings
from ..errors import BadRequest, NotFound
from ..store.base import Store
from . import apps
from .sizes import tree_bytes

RELEASE_RE = re.compile(r"v([1-9][0-9]{0,8})")


def folder_of(settings: Settings, user: str, app: str) -> Path:
    return apps.versions_dir(settings, user) / app


def release_dir(settings: Settings, user: str, app: str, n: int) -> Path:
    return folder_of(settings, user, app) / f"v{n}"


def parse_release(text: str) -> int:
    """``v3`` or ``3`` -> 3 (400 for anything else)."""
    if not isinstance(text, str):
        raise BadRequest("a release is named like v3")
    m = RELEASE_RE.fullmatch(text) or RELEASE_RE.fullmatch("v" + text)
    if not m:
        raise BadRequest(f"{text[:20]!r} is not a release (they are named v1, v2, ...)")
    return int(m.group(1))


def current(settings: Settings, user: str, app: str) -> int | None:
    """The release the app's folder links to; None when the app is not deployed (or was deployed
    before releases were kept: its link names no release)."""
    link = apps.app_path(settings, user, app)
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    m = RELEASE_RE.fullmatch(target.name)
    return int(m.group(1)) if m and target.parent.name == app else None


async def records(store: Store, user: str, app: str) -> dict[int, dict[str, Any]]:
    prefix = keys.RELEASES_OF_APP.format(user=user, app=app)
    out = {}
    for key, raw in (await store.get_prefix(prefix)).items():
        tail = key[len(prefix) :]
        if tail.isdigit():
            try:
                out[int(tail)] = json.loads(raw)
            except ValueError:
                continue
    return out


async def next_number(
    store: Store, settings: Settings, user: str, app: str, job: str, known: dict[int, dict[str, Any]] | None = None
) -> int:
    """The number of the release a deploy job publishes: its own again on a retry, else one more than
    any release there is (recorded or on disk). ``known``: the app's records, if just read."""
    if known is None:
        known = await records(store, user, app)
    for n, r in known.items():
        if r.get("job") == job:
            return n
    on_disk = [int(m.group(1)) for p in _dirs(settings, user, app) if (m := RELEASE_RE.fullmatch(p.name))]
    return max([0, *known, *on_disk]) + 1


def _dirs(settings: Settings, user: str, app: str) -> list[Path]:
    base = folder_of(settings, user, app)
    return [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []


def digest(folder: Path) -> str:
    """sha256 over the app's files: their paths, kinds and contents (a symlink: its target)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                h.update(f"L {rel} -> {os.readlink(path)}\n".encode())
                continue
            h.update(f"F {rel} {path.stat().st_size}\n".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def publish(settings: Settings, user: str, app: str, staged: Path, n: int) -> None:
    """Make ``staged`` release ``n`` and the app's current release (one rename of the link)."""
    target = release_dir(settings, user, app, n)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a retried deploy's own release
        shutil.rmtree(target)
    os.rename(staged, target)
    point(settings, user, app, n)


def point(settings: Settings, user: str, app: str, n: int) -> None:
    """Make release ``n`` (its folder must exist) the app's current one, atomically."""
    target = release_dir(settings, user, app, n)
    if not target.is_dir():
        raise NotFound(f"release v{n} of {app!r} has no folder (pruned, or removed by hand)")
    link = apps.app_path(settings, user, app)
    tmp_link = link.with_name(f".{link.name}.v{n}.link")
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp_link)
    os.replace(tmp_link, link)
    for old in apps.versions_of(settings, user, app):  # the layout before releases
        shutil.rmtree(old, ignore_errors=True)


async def record(
    store: Store, user: str, app: str, n: int, also: dict[str, str] | None = None, **fields: Any
) -> dict[str, Any]:
    """Record release ``n`` with ``fields``; ``also``: other keys written in the same round trip."""
    value = {"release": n, "time": time.time(), **fields}
    await store.put_many({keys.RELEASE.format(user=user, app=app, n=n): json.dumps(value), **(also or {})})
    return value


def doomed(settings: Settings, user: str, app: str, known: dict[int, Any], keep: int) -> list[int]:
    """The releases pruning removes: all but the newest ``keep`` and the current one."""
    numbers = set(known) | {int(m.group(1)) for p in _dirs(settings, user, app) if (m := RELEASE_RE.fullmatch(p.name))}
    kept = set(sorted(numbers)[-max(keep, 1) :])
    cur = current(settings, user, app)
    if cur is not None:
        kept.add(cur)
    return sorted(numbers - kept)


async def prune(
    store: Store, settings: Settings, user: str, app: str, known: dict[int, Any] | None = None
) -> list[int]:
    """Remove the releases beyond the kept ones (their folders, then their records).

    ``known``: the app's records as its deploy last read them, under its user's quota lock, with its
    own. They may miss a release that another deploy recorded since, but its folder is there by then
    (a release's folder comes before its record), and the folders and the current link are looked at
    now: a stale ``known`` can only prune less, never a release that must stay.
    """
    if known is None:
        known = await records(store, user, app)
    gone = doomed(settings, user, app, known, settings.keep_releases)
    for n in gone:
        shutil.rmtree(release_dir(settings, user, app, n), ignore_errors=True)
    await store.delete_many([keys.RELEASE.format(user=user, app=app, n=n) for n in gone])
    return gone


async def pruned_size(
    store: Store, settings: Settings, user: str, app: str, n: int, known: dict[int, Any] | None = None
) -> int:
    """The disk that pruning frees once release ``n`` is published (what a deploy's quota check may
    count as about to go). ``known``: the app's records, if just read."""
    known = {**(await records(store, user, app) if known is None else known), n: {}}
    gone = [g for g in doomed(settings, user, app, known, settings.keep_releases) if g != n]
    return await asyncio.to_thread(
        lambda: sum(tree_bytes(release_dir(settings, user, app, g), allocated=True) for g in gone)
    )


async def listing(store: Store, settings: Settings, user: str, app: str) -> dict[str, Any]:
    """``nap releases``: every kept release, newest first, and which is current."""
    apps.require_app(settings, user, app)
    cur = current(settings, user, app)
    rows = []
    for n, r in sorted((await records(store, user, app)).items(), reverse=True):
        rows.append({**r, "release": n, "name": f"v{n}", "current": n == cur})
    return {"app": app, "current": f"v{cur}" if cur else None, "releases": rows}


def remove_all(settings: Settings, user: str, app: str) -> None:
    """Every release folder of the app (destroy_app, once its link is gone)."""
    shutil.rmtree(folder_of(settings, user, app), ignore_errors=True)
