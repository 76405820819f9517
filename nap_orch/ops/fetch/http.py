"""Archives from http(s): streamed to a file, counted while they arrive, then unpacked."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import aiofiles
import aiohttp

from ...config import Settings
from ...errors import FetchError
from .archive import unpack
from .common import CHUNK, TICK, UNKNOWN_SIZE_STEP, USER_AGENT, Check, Log, Progress, human, redact


async def fetch_archive_url(
    url: str, work: Path, settings: Settings, log: Log, check: Check, progress: Progress | None = None
) -> tuple[Path, dict]:
    archive = work / "download"
    content_type = await download(url, archive, settings, log, check, progress)
    await check()
    return await unpack(archive, work, settings, log, check, f"content type {content_type}")


async def download(
    url: str, file: Path, settings: Settings, log: Log, check: Check, report: Progress | None = None
) -> str:
    """Stream ``url`` into ``file`` and return its content type.

    Bytes are counted as they arrive, and the download stops as soon as they pass
    ``max_download``: a Content-Length header can lie (or be absent), so it only serves to fail early.
    """
    limit = settings.max_download
    shown = redact(url)
    received = 0
    await log(f"downloading {shown}")
    try:
        async with asyncio.timeout(settings.download_timeout):
            # The bytes on the wire are the archive: no transparent decompression (a gzip bomb
            # in transport would dodge the byte count), and ask the server for none.
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            # The timeout above is the only one: aiohttp's own default (5 minutes) would cut it short.
            no_timeout = aiohttp.ClientTimeout(total=None)
            async with (
                aiohttp.ClientSession(auto_decompress=False, headers=headers, timeout=no_timeout) as session,
                session.get(url) as response,
            ):
                if not 200 <= response.status < 300:
                    raise FetchError(f"HTTP {response.status} {response.reason} from {shown}")
                total = response.content_length
                if total is not None and total > limit:
                    raise FetchError(f"download exceeds the limit of {limit} bytes (the server announces {total})")
                content_type = response.headers.get("Content-Type", "none")
                progress = DownloadProgress(total)
                next_check = 0.0
                async with aiofiles.open(file, "wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
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
    except TimeoutError:
        raise FetchError(f"download of {shown} timed out after {settings.download_timeout:g} seconds") from None
    except aiohttp.ClientConnectorError as e:
        raise FetchError(f"cannot reach host {e.host}:{e.port}: {os_reason(e.os_error)}") from None
    except aiohttp.ClientError as e:
        raise FetchError(f"download of {shown} failed: {str(e) or type(e).__name__}") from None
    await log(f"downloaded {received} bytes")
    return content_type


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
