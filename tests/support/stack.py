"""The nap stack for tests: a real agent, a real dramatiq worker and the real API, as processes.

``NapStack(home, redis_url, etcd)`` starts them with their own NAP_HOME and Redis namespace, so several
stacks can share one Redis server. ``client(token)`` talks to its API over HTTP.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from nap_orch.cli.client import Client

from .services import free_port


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def passable(folder: Path) -> None:
    """Let other users pass through ``folder`` and the folders above it (pytest makes them 0700): the
    sandbox binds an instance's folder as its tenant's uid, which must reach it."""
    for f in [folder, *folder.parents]:
        if str(f) in ("/", "/tmp"):
            break
        f.chmod(f.stat().st_mode & 0o777 | 0o711)


class NapStack:
    def __init__(
        self, home: Path, redis_url: str, etcd: str = "", engine: str = "local", extra_env: dict | None = None
    ):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        passable(self.home)
        self.api_port = free_port()
        self.admin_token = "admin-" + uuid.uuid4().hex
        self.metrics_token = "metrics-" + uuid.uuid4().hex
        self.namespace = "t" + uuid.uuid4().hex[:10]
        self.env = {
            **os.environ,
            "NAP_HOME": str(self.home),
            "NAP_REDIS_URL": redis_url,
            "NAP_ETCD": etcd,
            "NAP_ENGINE": engine,
            "NAP_NAMESPACE": self.namespace,
            "NAP_ALLOW_LOCAL_SOURCES": "1",
            # Local sources from the folder beside the stack's home (the session's temp folder, which
            # holds the tests' own); its home stays refused. The file servers listen on loopback.
            "NAP_LOCAL_SOURCES_DIR": str(self.home.parent),
            "NAP_FETCH_ALLOW": "127.0.0.0/8",
            "NAP_ADMIN_TOKEN": self.admin_token,
            "NAP_METRICS_TOKEN": self.metrics_token,
            "NAP_API_PORT": str(self.api_port),
            # A dead worker's messages come back after 3 s; maintenance runs on most broker commands.
            "NAP_WORKER_HEARTBEAT_MS": "3000",
            "NAP_WORKER_MAINTENANCE": "500000",
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.users: list[str] = []  # the users add_user made, in order
        self.url = f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.home / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, agent: bool = True) -> NapStack:
        if agent:
            self.start_agent()
        self.start_worker()
        self.start_api()
        return self

    def start_api(self) -> None:
        self._spawn("api", [sys.executable, "-m", "nap_orch", "api"])
        self._wait(lambda: urllib.request.urlopen(self.url + "/health", timeout=1).status == 200, "api")

    def start_agent(self) -> None:
        sock = str(self.home / "agent.sock")
        self._spawn("agent", [sys.executable, "-m", "nap_orch", "agent"])

        def answers() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                return s.connect_ex(sock) == 0

        self._wait(answers, "agent")

    def start_worker(self, processes: int = 1, threads: int = 8) -> None:
        self._spawn(
            "worker",
            [sys.executable, "-m", "dramatiq", "workers", "--processes", str(processes), "--threads", str(threads)],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Signal one part and wait for it; one that does not end within ``timeout`` gets SIGKILL, so
        that nothing outlives the stack."""
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM) if name != "worker" else self.kill(name, signal.SIGKILL)
        self.kill_instances()
        self.remove_groups()

    def remove_groups(self) -> None:
        """The stack's control groups (``nap-<namespace>``: in each v1 hierarchy, or the v2 one), once
        their processes are gone (a process just killed leaves its group a moment later)."""
        root = Path("/sys/fs/cgroup")
        for base in [*root.glob(f"*/nap-{self.namespace}"), *root.glob(f"nap-{self.namespace}")]:
            for group in [*base.iterdir(), base]:
                for _ in range(50):
                    try:
                        group.rmdir()
                    except OSError as e:
                        if e.errno == errno.EBUSY:
                            time.sleep(0.1)
                            continue
                    break

    def instance_pids(self, marker: str = "", programs: bool = False) -> list[int]:
        """Processes running in this stack's instance folders (instances outlive the agent by design),
        optionally only those whose folder's path contains ``marker`` (``alice_web_``); with
        ``programs``, only the instances' programs (not the sandboxes' own bubblewrap processes)."""
        root = str(self.home / "apps")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cwd = os.readlink(f"/proc/{entry}/cwd")
                except OSError:  # gone meanwhile
                    continue
                if cwd.startswith(root) and marker in cwd:
                    if programs and _comm(entry) == "bwrap":
                        continue
                    pids.append(int(entry))
        return pids

    def kill_instances(self) -> None:
        for pid in self.instance_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _wait(self, check, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not start:\n{self.log(what)[-3000:]}")

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, self.admin_token if token is None else token)

    def add_user(self, name: str | None = None) -> tuple[str, Client]:
        name = name or "u" + uuid.uuid4().hex[:8]
        token = self.client().post("/v1/users", {"name": name})["token"]
        self.users.append(name)
        return name, self.client(token)

    def remove_instances(self, users: list[str], timeout: float = 600.0) -> None:
        """Remove every instance of ``users`` through the engine (tests/support/cleanup.py): nothing they
        started runs on into the next test."""
        if not users:
            return
        out = subprocess.run(
            [sys.executable, "-m", "tests.support.cleanup", *users],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[2],
        )
        if out.returncode:
            raise RuntimeError(f"removing the instances of {users} failed:\n{out.stderr[-3000:]}")

    def wait_job(self, client: Client, job_id: str, timeout: float = 60.0) -> dict:
        """Poll a job until it ends; returns its record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise AssertionError(
            f"job {job_id} did not end in {timeout} s: {job}\nworker log:\n{self.log('worker')[-3000:]}"
        )
