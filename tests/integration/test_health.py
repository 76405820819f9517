"""Health: starting until healthy, crash loops reported as failing, checks that restart, get_port only
for a running instance; through the real API, worker and agent."""

from __future__ import annotations

import time

import pytest

from nap_orch.cli.client import ApiError
from tests.support.apps import write_app
from tests.support.flows import deploy, deployed, publish, run_cli, start, wait_instance

CRASH = {"profile": "command: python3 -c 'import sys; sys.exit(3)'\n"}

# Serves /health as the file "healthy" says: 200 while it holds "ok", 500 otherwise.
CHECKED_PY = """import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = open("healthy").read().strip() == "ok" if os.path.exists("healthy") else False
        self.send_response(200 if ok and self.path == "/health?deep=1" else 500)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def test_a_crash_loop_is_failing_not_running(stack, user, file_server, tmp_path):
    name, client = user
    app = deployed(stack, client, file_server, tmp_path, CRASH, app="crash")
    out = run_cli(stack, client.token, "start_common", app, "--count", "1", "--wait", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "running: 0" in out.stdout or "none of the 1 instance(s) is running" in out.stderr
    st = client.get(f"/v1/instances/{name}_{app}_common@1")
    assert st["state"] in ("starting", "failed") and st["restarts"] + (st["state"] == "failed") >= 1, st
    with pytest.raises(ApiError) as e:
        client.get(f"/v1/instances/{name}_{app}_common@1/port")
    assert e.value.status == 404 and "only while running" in e.value.body["message"]


def test_starting_until_up_min_healthy(stack, user, file_server, tmp_path):
    name, client = user
    app = deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 1000\n"}, app="sleeper")
    job = start(stack, client, app, {}, count=1)
    assert job["state"] == "succeeded" and job["result"]["running"] == 1, job
    inst = f"{name}_{app}_common@1"
    client.post(f"/v1/instances/{inst}/stop")
    started = client.post(f"/v1/instances/{inst}/start")
    assert started["state"] == "starting"  # NAP_MIN_HEALTHY=1 in the tests
    with pytest.raises(ApiError) as e:
        client.get(f"/v1/instances/{inst}/port")
    assert e.value.status == 404
    wait_instance(client, inst, lambda st: st["state"] == "running", 10)


def test_a_check_gates_running_and_restarts_on_failure(engine_stack, engine_user, file_server, tmp_path):
    stack, (name, client) = engine_stack, engine_user
    app = deployed(
        stack,
        client,
        file_server,
        tmp_path,
        {
            "profile": "command: python3 server.py\ncheck: http /health?deep=1\ncheck_interval: 1s\n"
            "check_grace: 5s\ncheck_timeout: 500ms\n",
            "server.py": CHECKED_PY,
        },
        app="checked",
    )
    inst = f"{name}_{app}_common@1"
    resp = client.post(f"/v1/apps/{app}/instances", {"count": 1})
    folder = stack.home / "apps" / name / f"{name}_{app}_1"
    wait_instance(client, inst, lambda st: st["state"] == "starting", 30)
    time.sleep(3)  # up past NAP_MIN_HEALTHY (where it runs already), but its check fails: still starting
    assert client.get(f"/v1/instances/{inst}")["state"] == "starting"
    (folder / "healthy").write_text("ok")
    job = stack.wait_job(client, resp["job"], 60)
    assert job["state"] == "succeeded" and job["result"]["running"] == 1, job
    pid = client.get(f"/v1/instances/{inst}")["pid"]
    assert client.get(f"/v1/instances/{inst}/port")["port"]

    (folder / "healthy").write_text("sick")  # three failed probes in a row: ended, restarted
    wait_instance(client, inst, lambda st: st["restarts"] >= 1, 60)
    journal = "\n".join(client.lines(f"/v1/instances/{inst}/journal", lines=100))
    assert "check failed (HTTP answer 500" in journal, journal
    assert "its check failed 3 times in a row" in journal, journal
    (folder / "healthy").write_text("ok")
    st = wait_instance(client, inst, lambda st: st["state"] == "running", 60)
    assert st["pid"] != pid


@pytest.mark.parametrize(
    "check, why",
    [
        ("http health", "is not a path"),
        ("http /a b", "must be 'http /path' or 'tcp'"),
        ("http :8080/health", "is not a path"),
        ("tcp 9999", "must be 'http /path' or 'tcp'"),
        ("http /a\x01b", "is not a path"),
        ("http http://169.254.169.254/", "is not a path"),
        ("exec rm -rf /", "must be 'http /path' or 'tcp'"),
    ],
)
def test_bad_checks_fail_the_deploy(stack, user, file_server, tmp_path, check, why):
    _, client = user
    src = write_app(tmp_path / "bad", {"profile": f"command: sleep 100\ncheck: {check}\n"})
    job = deploy(stack, client, "bad", publish(file_server, src, "tgz"))
    assert job["state"] == "failed", job
    assert why in job["error"], job
