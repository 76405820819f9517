"""The app lifecycle: remove, destroy, scale, app-wide stop/start/restart, restart and app-wide logs,
through the real API, worker, agent or Slurm cluster, and etcd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nap_orch.cli.client import ApiError
from tests.support.apps import web_app
from tests.support.fixtures import LIMITS
from tests.support.flows import deploy, deployed, etcd_get, etcd_prefix, publish, run_cli, start, wait_until
from tests.support.stack import NapStack

PARAMS = {"name": "n1", "greeting": "hi"}


def web(stack, client, file_server, tmp_path, app: str = "web") -> str:
    job = deploy(stack, client, app, publish(file_server, web_app(tmp_path / f"src-{app}"), "tgz"))
    assert job["state"] == "succeeded", job
    return app


def names_of(client, app: str) -> dict[str, str]:
    return {i["name"]: i["state"] for i in client.get(f"/v1/apps/{app}/instances")["instances"]}


def job_of(stack, client, resp: dict, timeout: float = 120) -> dict:
    assert resp["state"] == "queued", resp
    return stack.wait_job(client, resp["job"], timeout)


def refused(call, status: int) -> dict:
    with pytest.raises(ApiError) as e:
        call()
    assert e.value.status == status, e.value.body
    assert e.value.body.get("message"), e.value.body
    return e.value.body


def test_remove_releases_number_port_folder_and_keys(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    web(engine_stack, client, file_server, tmp_path)
    assert start(engine_stack, client, "web", PARAMS)["result"]["running"] == 2
    second = f"{name}_web_common@2"
    port = client.get(f"/v1/instances/{second}/port")
    folder = engine_stack.home / "apps" / name / f"{name}_web_2"
    assert folder.is_dir()

    # Another tenant can't see it, let alone remove it; nothing of it changes.
    _, other = engine_stack.add_user()
    refused(lambda: other.delete(f"/v1/instances/{second}"), 404)
    assert names_of(client, "web")[second] == "running"

    got = client.delete(f"/v1/instances/{second}")
    assert got["state"] == "removed" and got["removed"] == [second]
    assert set(names_of(client, "web")) == {f"{name}_web_common@1"}
    assert etcd_get(engine_stack, f"/services/port/{name}/web/2") is None
    assert etcd_get(engine_stack, f"/nap/instances/{name}/web/2") is None
    assert etcd_get(engine_stack, f"/nap/ports/{port['host']}/{port['port']}") is None
    assert not folder.exists()
    refused(lambda: client.get(f"/v1/instances/{second}"), 404)
    body = refused(lambda: client.delete(f"/v1/instances/{second}"), 404)  # twice: nothing left
    assert "removed already" in body["message"]

    # The number comes back (no higher one is held), as a fresh instance that runs.
    again = start(engine_stack, client, "web", PARAMS, count=1)
    assert [i["name"] for i in again["result"]["instances"]] == [second], again
    out = run_cli(engine_stack, client.token, "remove_app", second, f"{name}_web_common@1")
    assert out.returncode == 0, out.stderr
    assert f"{second}: removed" in out.stdout
    assert names_of(client, "web") == {}
    assert etcd_prefix(engine_stack, f"/nap/instances/{name}/web/") == {}
    assert etcd_prefix(engine_stack, f"/services/port/{name}/web/") == {}
    out = run_cli(engine_stack, client.token, "remove_app", second)
    assert out.returncode == 1 and "removed already" in out.stderr


def test_scale_up_down_and_to_zero(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    web(engine_stack, client, file_server, tmp_path)
    assert start(engine_stack, client, "web", {"name": "first", "greeting": "yo"}, count=1)["state"] == "succeeded"

    up = job_of(engine_stack, client, client.put("/v1/apps/web/scale", {"count": 3}))
    assert up["state"] == "succeeded", up
    assert up["result"]["was"] == 1 and up["result"]["started"] == 2
    assert set(names_of(client, "web")) == {f"{name}_web_common@{n}" for n in (1, 2, 3)}
    # New instances are launched with the parameters of the last one.
    profile = client.get(f"/v1/instances/{name}_web_common@3/profile")["text"]
    assert "--name first --greeting yo" in profile

    down = job_of(engine_stack, client, client.put(f"/v1/apps/{name}_web/scale", {"count": 1}))
    assert down["state"] == "succeeded", down
    assert down["result"]["removed"] == [f"{name}_web_common@3", f"{name}_web_common@2"]  # highest first
    assert set(names_of(client, "web")) == {f"{name}_web_common@1"}
    assert set(etcd_prefix(engine_stack, f"/nap/instances/{name}/web/")) == {f"/nap/instances/{name}/web/1"}

    out = run_cli(engine_stack, client.token, "scale", "web", "0", "--wait", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 -> 0 live; removed 1" in out.stdout
    assert names_of(client, "web") == {}

    settings_max = int(LIMITS["NAP_MAX_COUNT"])
    for bad in (-1, settings_max + 1, "3", True, 2.5, None):
        refused(lambda bad=bad: client.put("/v1/apps/web/scale", {"count": bad}), 400)
    refused(lambda: client.put("/v1/apps/web/scale", {"count": 1, "params": {"nope": "x"}}), 400)
    refused(lambda: client.put("/v1/apps/nosuch/scale", {"count": 1}), 404)
    out = run_cli(engine_stack, client.token, "scale", "web", "-1")
    assert out.returncode == 2 and "must be 0 or more" in out.stderr


def test_app_wide_stop_start_restart(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    web(engine_stack, client, file_server, tmp_path)
    assert start(engine_stack, client, "web", PARAMS)["result"]["running"] == 2
    stopped = job_of(engine_stack, client, client.post("/v1/apps/web/stop"))
    assert stopped["state"] == "succeeded" and stopped["result"]["done"] == 2, stopped
    assert set(names_of(client, "web").values()) == {"stopped"}
    refused(lambda: client.get(f"/v1/instances/{name}_web_common@1/port"), 404)

    out = run_cli(engine_stack, client.token, "start_app", "web", "--all", "--wait", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "start: 2 done, 0 not" in out.stdout
    wait_until(lambda: set(names_of(client, "web").values()) == {"running"}, 60, "both running again")

    restarted = job_of(engine_stack, client, client.post("/v1/apps/web/restart"))
    assert restarted["state"] == "succeeded" and restarted["result"]["done"] == 2, restarted
    wait_until(lambda: set(names_of(client, "web").values()) == {"running"}, 60, "both running after restart")
    for n in (1, 2):
        assert client.get(f"/v1/instances/{name}_web_common@{n}/port")["port"]

    one = client.post(f"/v1/instances/{name}_web_common@1/restart")
    assert one["name"] == f"{name}_web_common@1" and one["state"] in ("starting", "running")
    refused(lambda: client.post("/v1/apps/nosuch/restart"), 404)


def test_destroy_app(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    web(engine_stack, client, file_server, tmp_path)
    web(engine_stack, client, file_server, tmp_path, app="web-x")  # a name that starts alike stays
    assert start(engine_stack, client, "web", PARAMS)["result"]["running"] == 2
    body = refused(lambda: client.delete("/v1/apps/web"), 409)
    assert "2 instance(s)" in body["message"]

    out = run_cli(engine_stack, client.token, "destroy_app", "web", "--force", "--wait", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    refused(lambda: client.get("/v1/apps/web"), 404)
    assert client.get("/v1/apps")["services"] == ["web-x"]
    assert client.get("/v1/apps/web-x")["kind"] == "common"
    assert etcd_get(engine_stack, f"/services/url/{name}/web") is None
    assert etcd_get(engine_stack, f"/services/url/{name}/web-x") is not None
    assert etcd_prefix(engine_stack, f"/nap/instances/{name}/web/") == {}
    assert etcd_prefix(engine_stack, f"/services/port/{name}/web/") == {}
    assert not list((engine_stack.home / "apps" / name).glob(f"{name}_web_*"))
    refused(lambda: client.delete("/v1/apps/web"), 404)  # twice

    # Deployed again, it starts afresh from number 1.
    web(engine_stack, client, file_server, tmp_path)
    again = start(engine_stack, client, "web", PARAMS, count=1)
    assert [i["name"] for i in again["result"]["instances"]] == [f"{name}_web_common@1"]
    assert job_of(engine_stack, client, client.delete("/v1/apps/web-x"))["state"] == "succeeded"


def test_mpi_run_removed_whole(stack, user, file_server, tmp_path):
    name, client = user
    app = deployed(
        stack,
        client,
        file_server,
        tmp_path,
        {"mpi.xml": "command: sleep 1000\nhosts: 2\n"},
        app="mpiapp",
    )
    resp = client.post(f"/v1/apps/{app}/mpi", {"params": {}})
    assert stack.wait_job(client, resp["job"], 120)["state"] == "succeeded"
    assert len(names_of(client, app)) == 3
    got = client.delete(f"/v1/instances/{name}_{app}_mpi_slave@1-2")  # a slave's removal takes its run
    assert sorted(got["removed"]) == sorted(
        [f"{name}_{app}_mpi_master@1", f"{name}_{app}_mpi_slave@1-1", f"{name}_{app}_mpi_slave@1-2"]
    )
    assert names_of(client, app) == {}
    assert etcd_prefix(stack, f"/services/mpi/{name}/{app}/") == {}
    assert not (stack.home / "apps" / name / f"{name}_{app}_1").exists()


def test_remove_waits_for_the_launch_job(stack, user, file_server, tmp_path):
    """A removal while the instance's launch job runs is refused (409), not fought over."""
    name, client = user
    web(stack, client, file_server, tmp_path)
    agent = stack.procs["agent"].pid
    os.kill(agent, signal.SIGSTOP)  # the launch reserves its numbers, then waits for the agent
    try:
        resp = client.post("/v1/apps/web/instances", {"params": PARAMS, "count": 1})
        wait_until(lambda: etcd_get(stack, f"/nap/instances/{name}/web/1") is not None, 30, "the reservation")
        body = refused(lambda: client.delete(f"/v1/instances/{name}_web_common@1"), 409)
        assert resp["job"] in body["message"]
        refused(lambda: client.delete("/v1/apps/web"), 409)
    finally:
        os.kill(agent, signal.SIGCONT)
    assert stack.wait_job(client, resp["job"], 60)["state"] == "succeeded"
    assert client.delete(f"/v1/instances/{name}_web_common@1")["state"] == "removed"


LOGGER = {
    "profile": "command: python3 log.py {port}\nscale: 2\n",
    "log.py": "import os, sys, time\n"
    "n = os.environ['NAP_INSTANCE_NUM']\n"
    "for i in range(1000000):\n"
    "    print(f'line {i} of {n}', flush=True)\n"
    "    time.sleep(0.2)\n",
}


def test_app_logs_merged_and_followed(engine_stack, engine_user, file_server, tmp_path):
    stack, (name, client) = engine_stack, engine_user
    app = deployed(stack, client, file_server, tmp_path, LOGGER, app="logger")
    assert start(stack, client, app, {})["result"]["running"] == 2
    wait_until(
        lambda: sum(" line 20 of " in x for x in client.lines(f"/v1/apps/{app}/logs", lines=1000)) == 2,
        30,
        "both instances' 21st lines",
    )
    got = list(client.lines(f"/v1/apps/{app}/logs", lines=40))
    assert len(got) == 40
    assert {x.split(" ", 1)[0] for x in got} == {f"{name}_{app}_common@1", f"{name}_{app}_common@2"}
    stamps = [x.split(" ", 2)[1] for x in got]
    assert stamps == sorted(stamps)  # merged in time order
    assert len(list(client.lines(f"/v1/apps/{app}/logs", lines=3))) == 3
    refused(lambda: list(client.lines(f"/v1/apps/{app}/logs", lines="x")), 400)
    refused(lambda: list(client.lines(f"/v1/apps/{app}/logs", lines=-1)), 400)

    # Follow: new lines of both, and of an instance started meanwhile, from its first line.
    env = {**os.environ, "NAP_URL": stack.url, "NAP_TOKEN": client.token}
    follow = subprocess.Popen(
        [sys.executable, "-m", "nap_orch", "logs", app, "-n", "0", "-f"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert follow.stdout is not None
        # The follow has listed the app's instances once it prints a new line of one: only then is the
        # third one "started meanwhile" (started before, it would be followed from now, as -n 0 says).
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen:
            line = follow.stdout.readline()
            if not line:
                break
            seen.add(line.split(" ", 1)[0].rsplit("@", 1)[1])
        assert seen, "the follow printed nothing"
        assert start(stack, client, app, {}, count=1)["state"] == "succeeded"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {"1", "2", "3", "first of 3"} <= seen:
            line = follow.stdout.readline()
            if not line:
                break
            who, _, rest = line.rstrip("\n").partition(" ")
            seen.add(who.rsplit("@", 1)[1])
            if who.endswith("@3") and rest.endswith("line 0 of 3"):
                seen.add("first of 3")
        assert {"1", "2", "3", "first of 3"} <= seen, seen
    finally:
        follow.kill()
        follow.wait()


@pytest.fixture(scope="module")
def narrow_stack(tmp_path_factory, redis_server, etcd_server):
    """A stack with 8 ports to hand out."""
    s = NapStack(
        tmp_path_factory.mktemp("nap-narrow"),
        redis_server.url,
        etcd_server.endpoint,
        extra_env={**LIMITS, "NAP_PORT_RANGE": "23100-23107"},
    )
    s.start()
    yield s
    s.stop()


def test_removed_instances_give_their_ports_back(narrow_stack, file_server, tmp_path):
    """Three rounds of 8 instances in an 8-port range: each round's removal frees the range."""
    stack = narrow_stack
    name, client = stack.add_user()
    web(stack, client, file_server, tmp_path)
    for round_ in range(3):
        job = start(stack, client, "web", PARAMS, count=8)
        assert job["state"] == "succeeded" and job["result"]["running"] == 8, (round_, job)
        assert sorted(i["port"] for i in job["result"]["instances"]) == list(range(23100, 23108))
        over = client.post("/v1/apps/web/instances", {"params": PARAMS, "count": 1})
        failed = stack.wait_job(client, over["job"])
        assert failed["state"] == "failed" and "exhausted" in failed["error"], failed
        removed = job_of(stack, client, client.delete("/v1/apps/web/instances"))
        assert removed["state"] == "succeeded" and removed["result"]["done"] == 8, removed
        held = etcd_prefix(stack, "/nap/ports/127.0.0.1/2310")  # the stacks share etcd: only this range
        assert held == {}, held
        assert names_of(client, "web") == {}
    assert etcd_prefix(stack, f"/nap/instances/{name}/web/") == {}


@pytest.mark.parametrize("name", ["a b", "x?y", "../../v1/users", "a%2fb", "é@1"])
def test_a_malformed_instance_name_is_an_error_not_a_traceback(stack, user, name):
    _, client = user
    for op in ("get_port", "remove_app", "restart_app"):
        out = run_cli(stack, client.token, op, name)
        assert out.returncode == 1 and out.stderr.startswith("error: "), (op, out.stderr)
        assert "Traceback" not in out.stderr
