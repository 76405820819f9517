"""A small synchronous HTTP client of the nap API (used by the command line and tests)."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator


class ApiError(Exception):
    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body.get('message') or body}")


def request_target(path: str, query: dict | None = None) -> str:
    """The path and query of a request. A name typed by a user (``nap get_port "a b"``) is quoted,
    and the API says what is wrong with it; a query written into the path
    (``/v1/events?follow=0``) is kept as it is, and ``query``'s items are added to it."""
    path, sep, written = path.partition("?")
    target = urllib.parse.quote(path, safe="/@:-._~") + sep + written
    items = {k: v for k, v in (query or {}).items() if v is not None}
    if items:
        target += ("&" if sep else "?") + urllib.parse.urlencode(items)
    return target


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("NAP_URL") or "http://127.0.0.1:8470").rstrip("/")
        self.token = token if token is not None else os.environ.get("NAP_TOKEN", "")
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        data=None,
        query: dict | None = None,
        stream: bool = False,
        headers: dict | None = None,
    ):
        url = self.url + request_target(path, query)
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            resp = urllib.request.urlopen(req, timeout=None if stream else self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"message": raw.decode(errors="replace")}
            raise ApiError(e.code, payload) from None
        except urllib.error.URLError as e:
            raise ApiError(
                0, {"error": "unreachable", "message": f"cannot reach the nap API at {self.url}: {e.reason}"}
            ) from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str, **query):
        return self._request("GET", path, query=query)

    def post(self, path: str, data=None):
        return self._request("POST", path, data=data if data is not None else {})

    def put(self, path: str, data=None):
        return self._request("PUT", path, data=data if data is not None else {})

    def delete(self, path: str, **query):
        return self._request("DELETE", path, query=query)

    def lines(self, path: str, **query) -> Iterator[str]:
        """The lines of a streamed answer; ApiError (status 0) when the connection ends before the
        answer does (the API went away): that is not the end of a journal."""
        with self._request("GET", path, query=query, stream=True) as resp:
            try:
                for raw in resp:
                    yield raw.decode(errors="replace").rstrip("\n")
            except (OSError, http.client.HTTPException) as e:
                raise self._cut(e) from None
            # A chunked answer read to its end has read its last chunk (chunk_left None); one whose
            # connection ended first stops at a chunk's end (http.client's peek hides the error).
            if getattr(resp, "chunked", False) and getattr(resp, "chunk_left", None) is not None:
                raise self._cut(None)

    def _cut(self, error: BaseException | None) -> ApiError:
        why = f": {error}" if error else ""
        return ApiError(
            0, {"error": "unreachable", "message": f"the connection to the nap API at {self.url} ended{why}"}
        )

    def events(self, path: str, last_id: str | None = None) -> Iterator[dict]:
        """Server-sent events of a job or user stream, as dicts with ``id``, ``event`` and ``data``
        (comment lines, the API's keep-alives, are skipped)."""
        headers = {"Last-Event-ID": last_id} if last_id else None
        with self._request("GET", path, stream=True, headers=headers) as resp:
            ev: dict = {}
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if not line:
                    if ev:
                        ev["data"] = json.loads(ev.get("data", "null"))
                        yield ev
                    ev = {}
                    continue
                if line.startswith(":"):  # a comment (the API's keep-alive), not a field of an event
                    continue
                key, _, value = line.partition(": ")
                ev[key] = value
