"""The fetcher: turns a deploy URL into a folder holding the app's files.

Sources, by URL:

- ``http://`` and ``https://`` archives (tar, tar.gz, tgz, tar.bz2, tar.xz, zip), recognised by their
  first bytes, not by their name. A single top-level folder is flattened, as in GitHub's tarballs.
- git repositories: ``git://...``, ``git+https://...`` or an http(s) URL ending in ``.git``, cloned with
  ``git clone --depth 1``; the ``.git`` folder is not part of the app.
- local sources, only where ``Settings.allow_local_sources`` is on: ``file:///abs/path`` or
  ``/abs/path``, a folder (copied, or cloned when it is a git repository) or an archive file, inside
  ``Settings.local_sources_dir`` and outside ``NAP_HOME`` (``local.py``).

Where a fetch may connect is the fetch policy's (``policy.py``): public addresses, and those
``NAP_FETCH_ALLOW`` lists, checked on every connection and redirect. A URL with credentials in it
(``user:password@``) is refused: deploy URLs are kept and shown. :func:`check_url` is what the API
checks at submit; :func:`fetch` checks it all again, in the worker, before and while it fetches.

Everything is untrusted: an archive or a repository may try to write outside its folder (``..``,
absolute names, symlinks and hard links), hold devices, or expand without bound. Each entry is
checked and written by :class:`archive.Tree`, which counts the bytes it actually writes.

Modules: ``http.py``, ``git.py``, ``local.py`` (the sources), ``archive.py`` (the archive rules),
``policy.py`` (the addresses a fetch may reach), ``common.py`` (what they share).

All work happens in a hidden folder beside ``dest``; ``dest`` appears, by one rename, only when
everything succeeded, and the hidden folder is always removed. So after any failure, cancellation
included, nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ...config import Settings
from ...errors import BadRequest
from .common import ALLOWED, ALLOWED_LOCAL, Check, Log, Progress, credentials_refusal, proceed, quiet, remove, shown
from .git import fetch_git
from .http import fetch_archive_url
from .local import fetch_local, local_source
from .policy import Refused, check_address, spelling_refusal

__all__ = ["check_url", "fetch"]


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
    :param settings: limits (``max_download``, ``max_extract``, ``max_files``, ``download_timeout``,
        ``download_idle_timeout``), the fetch policy (``fetch_allow``) and local sources
        (``allow_local_sources``, ``local_sources_dir``).
    :param log: awaited with human progress lines.
    :param check: awaited between steps and chunks; whatever it raises (a cancelled job) propagates.
    :param progress: awaited with (bytes received, total or None) along with download progress lines.
    :returns: ``{"kind": "archive"|"git"|"local", "files": n, "bytes": n}``, plus ``"commit"`` for git.
    :raises BadRequest: the URL is not one of the accepted kinds, or the policy refuses it.
    :raises FetchError: the source could not be fetched or is not a safe app; the message says why.
    """
    log = log or quiet
    check = check or proceed
    dest = Path(dest)
    source = classify(url, settings)
    if os.path.lexists(dest):
        raise FileExistsError(f"fetch destination {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside dest, so that the final rename stays on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".fetch", dir=dest.parent))
    try:
        await check()
        if source.kind == "http":
            app, summary = await fetch_archive_url(source.location, work, settings, log, check, progress)
        elif source.kind == "git":
            app, summary = await fetch_git(source.location, work, settings, log, check)
        else:
            app, summary = await fetch_local(Path(source.location), work, settings, log, check)
        await check()
        app.rename(dest)
    finally:
        await remove(work)
    return summary


# -- what a URL names -------------------------------------------------------------------------------


def check_url(url: str, settings: Settings) -> None:
    """Raise BadRequest unless ``url`` is a source this server would fetch, as far as can be told
    without fetching: its kind, no credentials, no odd spelling of an address, an IP address the
    policy permits, a local path where local sources may be. (Names are checked when they are
    resolved, at fetch time: what they resolve to may change.)"""
    classify(url, settings)


@dataclass(frozen=True)
class Source:
    """A classified URL. ``kind`` is "http" (an archive), "git" or "local"; ``location`` is what to
    download or clone, or a local absolute path."""

    kind: str
    location: str


def classify(url: str, settings: Settings) -> Source:
    """Say what ``url`` names, or raise BadRequest when it is not a source this server accepts."""
    allowed = ALLOWED_LOCAL if settings.allow_local_sources else ALLOWED
    raw = url.strip()
    if not raw:
        raise BadRequest(f"empty URL: use {allowed}")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadRequest("the URL contains control characters")
    lower = raw.lower()
    if lower.startswith(("git+http://", "git+https://")):
        return Source("git", with_host(raw[len("git+") :], settings))
    if lower.startswith("git://"):
        return Source("git", with_host(raw, settings))
    if lower.startswith(("http://", "https://")):
        if urlsplit(with_host(raw, settings)).path.rstrip("/").endswith(".git"):
            return Source("git", raw)
        return Source("http", raw)
    if lower.startswith("file:"):
        if why := credentials_refusal(raw):
            raise BadRequest(why)  # before a message quotes the URL
        parts = urlsplit(raw)
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"a file URL names a path on this server (file:///abs/path), not {shown(raw)}")
        path = unquote(parts.path)
    elif raw.startswith("/"):
        path = raw
    else:
        scheme = urlsplit(raw).scheme
        if scheme:
            raise BadRequest(f"unsupported URL scheme {scheme + ':'!r}: use {allowed}")
        raise BadRequest(f"not a URL: {shown(raw)}: use {allowed}")
    if not settings.allow_local_sources:
        raise BadRequest("local sources are not allowed on this server")
    if not path.startswith("/"):
        raise BadRequest(f"a local source must be an absolute path, not {shown(path)}")
    local_source(path, settings)
    return Source("local", path)


def with_host(url: str, settings: Settings) -> str:
    """``url`` (http, https or git) if its host may be fetched from as far as its text tells."""
    if why := credentials_refusal(url):
        raise BadRequest(why)  # before a message quotes the URL
    try:
        host = urlsplit(url).hostname
    except ValueError:
        raise BadRequest(f"not a URL: {shown(url)}") from None
    if not host:
        raise BadRequest(f"the URL has no host: {shown(url)}")
    if why := spelling_refusal(host):
        raise BadRequest(why)
    try:
        check_address(host, settings.fetch_allow_networks)
    except Refused as e:
        raise BadRequest(str(e)) from None
    except ValueError:
        pass  # a name: checked on what it resolves to, each time it is connected to
    return url
