"""A real HTTP server on 127.0.0.1 for deploy tests, in a thread: serves files from a folder.

``/slow/<file>?seconds=S`` trickles the file over about S seconds (to kill a worker mid-download).
``/redirect?to=URL`` answers 302 to URL. ``/fail/<code>?reason=R&body=B`` answers status ``code`` with
the reason phrase R and the body B (what a deploy's error must not quote). ``/held/<key>`` (a URL from
``hold()``) answers 200 and then a zero byte every 0.1 s, never ending until ``release(url)`` or until the
client leaves: a download that stays running as long as a test needs (a deploy to cancel).
``/silent/<key>/...`` (a URL from ``stall()``) answers nothing at all, or only its status and headers,
until ``release(url)`` or until the client leaves: a server that stalls, as a download or a clone sees
it. ``requested(url)`` says whether a held or stalled URL has been asked for.
"""

from __future__ import annotations

import http.server
import select
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path


class FileServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        root_dir = self.root
        self.holds: dict[str, threading.Event] = {}  # key -> set to end that held answer
        holds = self.holds
        self.stalls: dict[str, bool] = {}  # key of a stalled URL -> whether it sends its headers
        stalls = self.stalls
        self.asked: set[str] = set()  # keys of held and stalled URLs asked for
        asked = self.asked

        def gone(sock: socket.socket) -> bool:
            """Whether the client closed its end (it sends nothing more once its request is in)."""
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                parsed = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                path = parsed.path
                if path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path.startswith("/silent/"):
                    key = path.split("/")[2]
                    released = holds.get(key)
                    if released is None:
                        self.send_error(404, "Not Found")
                        return
                    asked.add(key)
                    if stalls[key]:
                        self.send_response(200)
                        self.send_header("Content-Type", "application/octet-stream")
                        self.end_headers()
                        self.wfile.flush()
                    while not released.wait(0.1):
                        if gone(self.connection):
                            return
                    self.close_connection = True  # released: the answer ends there, cut short
                    return
                if path.startswith("/held/"):
                    released = holds.get(path[len("/held/") :])
                    if released is None:
                        self.send_error(404, "Not Found")
                        return
                    asked.add(path[len("/held/") :])
                    self.send_response(200)  # no Content-Length: the body ends when the connection does
                    self.send_header("Content-Type", "application/octet-stream")
                    self.end_headers()
                    while not released.wait(0.1):
                        try:
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                        except (BrokenPipeError, ConnectionResetError):
                            return
                    return
                if path.startswith("/fail/"):
                    body = query.get("body", [""])[0].encode()
                    self.send_response(int(path[len("/fail/") :]), query.get("reason", ["Failed"])[0])
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                slow = path.startswith("/slow/")
                if slow:
                    path = path[len("/slow") :]
                target = (root_dir / path.lstrip("/")).resolve()
                if root_dir.resolve() not in target.parents or not target.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = target.read_bytes()
                self.send_response(200)
                self.send_header(
                    "Content-Type", "text/html" if target.suffix == ".html" else "application/octet-stream"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not slow:
                    self.wfile.write(data)
                    return
                seconds = float(query.get("seconds", ["3"])[0])
                steps = 30
                size = max(1, len(data) // steps + 1)
                for i in range(0, len(data), size):
                    try:
                        self.wfile.write(data[i : i + size])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    time.sleep(seconds / steps)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self) -> str:
        """A URL whose answer keeps coming (a byte every 0.1 s) until ``release`` is called with it."""
        key = uuid.uuid4().hex[:12]
        self.holds[key] = threading.Event()
        return f"{self.url}/held/{key}"

    def stall(self, headers: bool = False) -> str:
        """A URL whose server stalls until ``release`` is called with it: it sends nothing at all, or
        (``headers``) a 200 status and its headers and then nothing. Anything may follow the URL
        (``/app.git``, and what git asks for under it)."""
        key = uuid.uuid4().hex[:12]
        self.stalls[key] = headers
        self.holds[key] = threading.Event()
        return f"{self.url}/silent/{key}"

    @staticmethod
    def _key(url: str) -> str:
        path = urllib.parse.urlparse(url).path
        return path.split("/")[2]  # /held/<key> or /silent/<key>/...

    def release(self, url: str) -> None:
        """End the held or stalled answer of ``url`` (one from ``hold`` or ``stall``)."""
        self.holds[self._key(url)].set()

    def requested(self, url: str) -> bool:
        """Whether a client has asked for ``url`` (one from ``hold`` or ``stall``), or under it."""
        return self._key(url) in self.asked

    def start(self) -> FileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        for released in self.holds.values():
            released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
