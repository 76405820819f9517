"""A real HTTP server on 127.0.0.1 for deploy tests, in a thread: serves files from a folder.

``/slow/<file>?seconds=S`` trickles the file over about S seconds (to kill a worker mid-download).
``/redirect?to=URL`` answers 302 to URL. ``/fail/<code>?reason=R&body=B`` answers status ``code`` with
the reason phrase R and the body B (what a deploy's error must not quote). ``/held/<key>`` (a URL from
``hold()``) answers 200 and then a zero byte every 0.1 s, never ending until ``release(url)`` or until the
client leaves: a download that stays running as long as a test needs (a deploy to cancel).
"""

from __future__ import annotations

import http.server
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
                if path.startswith("/held/"):
                    released = holds.get(path[len("/held/") :])
                    if released is None:
                        self.send_error(404, "Not Found")
                        return
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

    def release(self, url: str) -> None:
        """End the held answer of ``url`` (one from ``hold``)."""
        self.holds[url.rsplit("/", 1)[1]].set()

    def start(self) -> FileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        for released in self.holds.values():
            released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
