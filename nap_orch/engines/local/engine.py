"""The local engine: a client of the nap agent (``nap agent``), which runs the units on this host.

The agent's HTTP API on its unix socket is described in ``http.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp

from ... import metrics
from ...config import Settings
from ...errors import BadRequest, Conflict, EngineError, NotFound
from ..base import Engine, InstanceStatus, UnitSpec

_ERRORS = {400: BadRequest, 404: NotFound, 409: Conflict}
log = logging.getLogger("nap.engine")


@metrics.engine_calls("local")
class LocalEngine(Engine):
    """Runs units through the nap agent on this host; instances are reached at ``settings.host``."""

    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.socket_path = settings.agent_socket_path
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> LocalEngine:
        self._client()
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                # no total limit: a batch of 1000 units or a stop that waits for SIGKILL takes a while
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10),
            )
        return self._session

    def _not_running(self, error: Exception) -> EngineError:
        if not os.path.exists(self.socket_path):
            why = f"no socket at {self.socket_path}"
        else:
            why = f"nothing answers on {self.socket_path}: {error}"
        return EngineError(f"the nap agent is not running ({why}): start it with `nap agent` or `nap up`")

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            body = await resp.json(content_type=None)
            message = body.get("message") or str(body)
        except (ValueError, aiohttp.ContentTypeError, AttributeError):
            message = (await resp.text())[:500]
        raise _ERRORS.get(resp.status, EngineError)(message or f"the nap agent answered {resp.status}")

    async def _call(self, method: str, path: str, *, json=None, params=None, text: bool = False):
        """One call of the agent's API. An agent that cannot be reached or goes away mid-call (killed and
        being restarted: ``nap up`` brings it back within a second or two) is tried again for up to
        ``agent_wait`` seconds (a new agent removes the old socket before it loads its instances and
        listens again, so a missing socket is no sign that none is coming): every call is safe to repeat (a unit submitted again with the same
        text is left running as it is; remove, stop and status are idempotent)."""
        deadline = time.monotonic() + self.settings.agent_wait
        pause = 0.2
        while True:
            try:
                async with self._client().request(method, "http://nap-agent" + path, json=json, params=params) as resp:
                    await self._raise_for(resp)
                    return await resp.text() if text else await resp.json()
            except (aiohttp.ClientConnectionError, ConnectionError) as e:
                if time.monotonic() + pause > deadline:
                    if isinstance(e, aiohttp.ClientConnectorError):
                        raise self._not_running(e) from None
                    raise EngineError(f"the nap agent failed to answer: {e}") from None
                log.warning("the nap agent did not answer %s %s (%s); trying again in %.1f s", method, path, e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            except aiohttp.ClientError as e:
                raise EngineError(f"the nap agent failed to answer: {e}") from None

    @staticmethod
    def _status(data: dict) -> InstanceStatus:
        return InstanceStatus(**data)

    async def submit(self, units: list[UnitSpec]) -> None:
        if units:
            await self._call("POST", "/units", json={"units": [{"name": u.name, "text": u.text} for u in units]})

    async def status(self, names: list[str]) -> dict[str, InstanceStatus]:
        if not names:
            return {}
        found = (await self._call("POST", "/status", json={"names": list(names)}))["units"]
        return {name: self._status(data) for name, data in found.items()}

    async def instances(self, prefix: str) -> list[InstanceStatus]:
        found = (await self._call("GET", "/units", params={"prefix": prefix}))["units"]
        return [self._status(data) for data in found]

    async def stop(self, name: str) -> InstanceStatus:
        return self._status(await self._call("POST", f"/units/{_quote(name)}/stop"))

    async def start(self, name: str) -> InstanceStatus:
        return self._status(await self._call("POST", f"/units/{_quote(name)}/start"))

    async def remove(self, names: list[str]) -> None:
        if names:
            await self._call("DELETE", "/units", json={"names": list(names)})

    async def unit_text(self, name: str) -> str | None:
        return await self._call("GET", f"/units/{_quote(name)}/unit", text=True)

    async def journal(self, name: str, lines: int = 100, follow: bool = False) -> AsyncIterator[str]:
        params = {"lines": str(lines), "follow": "1" if follow else "0"}
        url = f"http://nap-agent/units/{_quote(name)}/journal"
        try:
            async with self._client().get(url, params=params) as resp:
                await self._raise_for(resp)
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for line in done:
                        yield line.decode("utf-8", "replace")
                if buf:
                    yield buf.decode("utf-8", "replace")
        except aiohttp.ClientConnectorError as e:
            raise self._not_running(e) from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise EngineError(f"the nap agent failed to answer: {e}") from None

    def host_for_ports(self) -> str | None:
        return self.settings.host


def _quote(name: str) -> str:
    return quote(name, safe="@:")
