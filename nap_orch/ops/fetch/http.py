"""Archives from http(s): streamed to a file, counted while they arrive, then unpacked.

Every connection goes through the fetch policy (``policy.py``): names are resolved by
:class:`~.policy.PolicyResolver`, sockets made by :func:`~.policy.guarded_socket`, and redirects are
followed here, by hand, so that each hop's URL is checked as the first one was. Messages name the
HTTP status and the content type, never the server's reason phrase or a byte of what it sent: a
deploy must not become a way to read what a server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

import aiofiles
import aiohttp
from yarl import URL

from ...config import Settings
from ...errors import FetchError
from .archive import unpack
from .common import (
    CHUNK,
    TICK,
    UNKNOWN_SIZE_STEP,
    USER_AGENT,
    Check,
    Log,
    Progress,
    credentials_refusal,
    human,
    redact,
    shown,
)
from .policy import PolicyResolver, Refused, guarded_socket, spelling_refusal

T = TypeVar("T")

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10


class Stalled(Exception):
    """No byte arrived for ``download_idle_timeout`` seconds."""


async def fetch_archive_url(
    url: str, work: Path, settings: Settings, log: Log, check: Check, progress: Progress | None = None
) -> tuple[Path, dict]:
    archive = work / "download"
    content_type = await download(url, archive, settings, log, check, progress)
    await check()
    return await unpack(archive, work, settings, log, check, content_type)


async def download(
    url: str, file: Path, settings: Settings, log: Log, check: Check, report: Progress | None = None
) -> str:
    """Stream ``url`` into ``file`` and return its content type.

    Bytes are counted as they arrive, and the download stops as soon as they pass
    ``max_download``: a Content-Length header can lie (or be absent), so it only serves to fail early.
    It fails when it takes longer than ``download_timeout`` in all, or when no byte arrives for
    ``download_idle_timeout`` (waiting for the connection and the headers included).
    """
    limit = settings.max_download
    idle = settings.download_idle_timeout
    named = redact(url)
    received = 0
    await log(f"downloading {named}")
    allow = settings.fetch_allow_networks
    resolver = PolicyResolver(allow)
    try:
        async with asyncio.timeout(settings.download_timeout):
            # The bytes on the wire are the archive: no transparent decompression (a gzip bomb
            # in transport would dodge the byte count), and ask the server for none.
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            # The timeouts here are the only ones: aiohttp's own default (5 minutes) would cut them short.
            # No proxy from the environment (trust_env is off): the policy checks the real destination.
            connector = aiohttp.TCPConnector(resolver=resolver, socket_factory=guarded_socket(allow))
            no_timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(
                connector=connector, auto_decompress=False, headers=headers, timeout=no_timeout
            ) as session:
                response = await follow(session, url, idle, log, check)
                async with response:
                    content_type = media_type(response)
                    if not 200 <= response.status < 300:
                        raise FetchError(f"{status(response.status)} ({content_type}) from {named}")
                    total = response.content_length
                    if total is not None and total > limit:
                        raise FetchError(f"download exceeds the limit of {limit} bytes (the server announces {total})")
                    progress = DownloadProgress(total)
                    next_check = 0.0
                    async with aiofiles.open(file, "wb") as out:
                        while chunk := await within(idle, response.content.read(CHUNK), check):
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
                                next_check = now + TICK
    except Stalled:
        raise FetchError(
            f"download of {named} stalled: no byte received for {idle:g} seconds (after {received} bytes)"
        ) from None
    except TimeoutError:
        raise FetchError(f"download of {named} timed out after {settings.download_timeout:g} seconds") from None
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, Refused):
            raise FetchError(f"download of {named} refused: {e.os_error}") from None
        if not isinstance(e, aiohttp.ClientSSLError):
            raise FetchError(f"cannot reach host {e.host}:{e.port}: {os_reason(e.os_error)}") from None
        raise FetchError(f"download of {named} failed: {client_reason(e)}") from None
    except aiohttp.ClientError as e:
        raise FetchError(f"download of {named} failed: {client_reason(e)}") from None
    finally:
        await resolver.close()
    await log(f"downloaded {received} bytes")
    return content_type


async def follow(
    session: aiohttp.ClientSession, url: str, idle: float, log: Log, check: Check
) -> aiohttp.ClientResponse:
    """GET ``url``, following redirects by hand: each hop's URL must pass the checks the first one
    did (http or https, no credentials, no odd spelling of an address); its address is checked when
    it is connected to, like every address."""
    target = URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        response = await within(idle, session.get(target, allow_redirects=False), check)
        location = response.headers.get("Location")
        if response.status not in REDIRECTS or location is None:
            return response
        response.release()
        try:
            target = response.url.join(URL(location))
        except ValueError:
            raise FetchError(f"{status(response.status)} redirects to a malformed URL") from None
        if why := hop_refusal(target):
            raise FetchError(f"redirect to {shown(redact(str(target)))} refused: {why}")
        await log(f"redirected to {redact(str(target))}")
    raise FetchError(f"more than {MAX_REDIRECTS} redirects from {redact(url)}")


def hop_refusal(url: URL) -> str | None:
    """Why a redirect to ``url`` is not followed, or None."""
    if url.scheme not in ("http", "https"):
        return "only http and https are followed"
    if not url.raw_host:
        return "it has no host"
    if why := credentials_refusal(str(url)):
        return why
    return spelling_refusal(url.raw_host)


async def within(seconds: float, step: Awaitable[T], check: Check) -> T:
    """Await ``step``, raising :class:`Stalled` if it takes longer than ``seconds``; meanwhile await
    ``check`` every ``TICK`` seconds, so that a cancel takes effect while a server sends nothing (not
    only when bytes arrive). ``step`` is abandoned (cancelled) when either raises."""
    task = asyncio.ensure_future(step)
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled()
            # The total cap's cancel lands here too, and becomes its TimeoutError outside.
            done, _ = await asyncio.wait({task}, timeout=min(TICK, left))
            if done:
                return task.result()
            await check()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def status(code: int) -> str:
    """``HTTP 404 Not Found``: the standard phrase, never the server's own (it is the server's text)."""
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def media_type(response: aiohttp.ClientResponse) -> str:
    """``content type text/html``, or ``no content type``: only the media type, cut short and printable."""
    if "Content-Type" not in response.headers:
        return "no content type"
    kind = "".join(c for c in response.content_type[:80] if c.isprintable())
    return f"content type {kind}"


def client_reason(e: aiohttp.ClientError) -> str:
    """A failure of the exchange in words of our own: aiohttp's messages can quote what the server
    sent (a status line that is not HTTP, a header)."""
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the transfer was cut short or malformed"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        why = getattr(e.certificate_error, "verify_message", None) or "not verified"
        return f"its TLS certificate is not valid ({why})"
    if isinstance(e, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(e, aiohttp.ClientResponseError):
        return "the server's answer is not valid HTTP"
    if isinstance(e, aiohttp.InvalidURL):
        return "the URL is not valid"
    if isinstance(e, aiohttp.ClientOSError):
        return os_reason(e)
    return type(e).__name__


class DownloadProgress:
    """Says when a download deserves a progress line: every 10% of a known size, else every few MiB."""

    def __init__(self, total: int | None):
        self.total = total
        self.step = max(total // 10, 1) if total else UNKNOWN_SIZE_STEP
        self.next = self.step

    def line(self, received: int) -> str | None:
        # The end is reported by the caller ("downloaded N bytes").
        if received < self.next or (self.total and received >= self.total):
            return None
        while self.next <= received:
            self.next += self.step
        if self.total:
            percent = received * 100 // self.total
            return f"downloaded {human(received)} of {human(self.total)} ({percent}%)"
        return f"downloaded {human(received)} so far"


def os_reason(error: OSError) -> str:
    # asyncio's connect errors carry "Connect call failed (...)" as strerror: the errno says it better.
    # Name-resolution errors (gaierror) have their own negative codes and a good strerror.
    if error.errno and not isinstance(error, socket.gaierror):
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__
