"""``nap up`` (what ``scripts/up`` runs): the whole embedded stack from one command, then stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.support.services import free_port
from tests.support.stack import passable


def nap_up(home, port: int, **env: str) -> subprocess.Popen:
    """``nap up`` on ``home``, in an environment without the caller's NAP_* settings (but ``env``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NAP_")}
    return subprocess.Popen(
        [sys.executable, "-m", "nap_orch", "up", "--port", str(port)],
        env={**clean, "NAP_HOME": str(home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_nap_up_serves_the_api_and_stops_with_everything_it_started(tmp_path):
    port = free_port()
    proc = nap_up(tmp_path / "home", port)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(lines)
        assert f"nap is up: NAP_URL=http://127.0.0.1:{port}" in text, text
        token = text.split("NAP_TOKEN=", 1)[1].split()[0]
        assert (tmp_path / "home" / "admin.token").read_text().strip() == token
        assert oct((tmp_path / "home" / "admin.token").stat().st_mode & 0o777) == "0o600"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read()) == {"name": "admin", "admin": True}
        # The secrets are in one 0600 file, not in the environment of the parts it started ...
        platform = tmp_path / "home" / "platform.env"
        assert oct(platform.stat().st_mode & 0o777) == "0o600"
        kept = dict(line.split("=", 1) for line in platform.read_text().splitlines())
        assert kept["NAP_ADMIN_TOKEN"] == token
        parts = 0
        for pid in subprocess.run(
            ["pgrep", "-f", "nap_orch (api|agent)"], capture_output=True, text=True
        ).stdout.split():
            environ = open(f"/proc/{pid}/environ", "rb").read()
            if str(tmp_path).encode() in environ:
                parts += 1
                assert token.encode() not in environ and b"NAP_REDIS_URL" not in environ
        assert parts == 2  # the API and the agent
        # ... and its Redis answers no one without the password
        redis_port = int(kept["NAP_REDIS_URL"].rpartition(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as sock:
            sock.sendall(b"KEYS *\r\n")
            assert sock.recv(64).startswith(b"-NOAUTH")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    # its Redis, etcd, agent, worker and API are gone with it
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True).stdout.split()
    assert left == []


def _part(home, marker: bytes) -> int:
    """The pid of the part of the stack at ``home`` whose command line holds ``marker``."""
    found = _parts(home, marker)
    assert found, f"no {marker!r} process of {home}"
    return found[0]


def _parts(home, marker: bytes = b"") -> list[int]:
    """The processes of the stack at ``home`` (by their environment), whose command line holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if marker in cmdline and f"NAP_HOME={home}".encode() in environ.split(b"\0"):
            found.append(int(pid))
    return found


def test_nap_up_restarts_a_part_that_dies_and_goes_on_serving(tmp_path):
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    passable(home)  # the sandbox reaches instance folders as the tenant's uid
    # It deploys a folder of this test's own: local sources are off in nap up unless asked for.
    proc = nap_up(home, port, NAP_ALLOW_LOCAL_SOURCES="1", NAP_LOCAL_SOURCES_DIR=str(tmp_path))

    def read_until(prefix: str, timeout: float = 90) -> str:
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if line.startswith(prefix):
                return "".join(lines)
        raise AssertionError(f"no {prefix!r} within {timeout} s:\n" + "".join(lines))

    def call(path: str, token: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def until_ended(job: str, token: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while (record := call(f"/v1/jobs/{job}", token))["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        return record

    try:
        text = read_until("Ctrl-C stops everything")
        token = text.split("NAP_TOKEN=", 1)[1].split()[0]
        user_token = call("/v1/users", token, {"name": "dora"})["token"]
        app = tmp_path / "app"
        app.mkdir()
        (app / "profile").write_text("command: sleep 1000\n")
        deployed = call("/v1/apps", user_token, {"app": "snooze", "url": str(app)})["job"]
        assert until_ended(deployed, user_token)["state"] == "succeeded"
        # the worker killed in the middle of a launch, as the kernel's OOM killer would
        job = call("/v1/apps/snooze/instances", user_token, {"params": {}, "count": 30})["job"]
        while call(f"/v1/jobs/{job}", user_token)["state"] == "queued":
            time.sleep(0.02)
        os.kill(_part(home, b"dramatiq"), signal.SIGKILL)
        text = read_until("nap up: worker restarted")
        assert "nap up: worker killed by SIGKILL" in text and "restarting it in 1 s" in text, text
        # the launch resumes on the restarted worker once the dead one's heartbeat is over (15 s)
        record = until_ended(job, user_token)
        assert record["state"] == "succeeded", record
        rows = call("/v1/apps/snooze/instances", user_token)["instances"]
        assert sorted(int(r["instance"]) for r in rows) == list(range(1, 31))
        assert len({r["port"]["port"] for r in rows}) == 30 and {r["state"] for r in rows} == {"running"}
        api = _part(home, b"nap_orch\0api")
        os.kill(api, signal.SIGKILL)
        text = read_until("nap up: api restarted")
        deadline = time.monotonic() + 30
        while True:  # the restarted API answers
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the restarted API does not answer"
                time.sleep(0.2)
        for r in rows:  # instances outlive nap up by design: these are stopped here
            call(f"/v1/instances/{r['name']}/stop", user_token, {})
        assert proc.poll() is None  # nap up itself never stopped
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    assert _parts(home) == []  # no part, and nothing a killed part left behind


def test_an_api_without_an_admin_token_makes_one_on_its_first_start(tmp_path, redis_server):
    """As docker-compose runs it: no NAP_ADMIN_TOKEN, so the first start makes the admin's token, keeps
    it in NAP_HOME/admin.token (0600) and prints it; the next start uses the same."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAP_")}
    env.update(NAP_HOME=str(home), NAP_REDIS_URL=redis_server.url, NAP_NAMESPACE="t" + os.urandom(4).hex())
    tokens = []
    for _ in range(2):
        port = free_port()
        log = tmp_path / f"api-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nap_orch", "api", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                    time.sleep(0.1)
            token = (home / "admin.token").read_text().strip()
            assert oct((home / "admin.token").stat().st_mode & 0o777) == "0o600"
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/whoami", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert json.loads(resp.read()) == {"name": "admin", "admin": True}
            tokens.append(token)
            printed = f"NAP_TOKEN={token}" in log.read_text()
            assert printed == (len(tokens) == 1)  # printed when made, not at every start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert tokens[0] == tokens[1]


def test_nap_up_refuses_a_taken_api_port_at_once(tmp_path):
    """Another server on the API port: nap up says so and starts nothing, rather than print a URL that
    another process answers."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = nap_up(tmp_path / "home", port)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert f"port {port} on 127.0.0.1 is taken" in out and f"held by pid {os.getpid()} " in out, out
    assert "nap is up" not in out and "NAP_TOKEN" not in out
    assert not (tmp_path / "home" / "platform.env").exists()  # nothing started, nothing written
