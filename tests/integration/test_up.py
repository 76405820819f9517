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


def test_nap_up_serves_the_api_and_stops_with_everything_it_started(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAP_")}
    env["NAP_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nap_orch", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
