"""Releases, rolling redeploys and rollbacks, through the real API, worker, agent or Slurm, and etcd."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time

import pytest

from nap_orch import keys
from nap_orch.cli.client import ApiError
from nap_orch.store.etcd import EtcdStore
from tests.support.apps import write_app
from tests.support.flows import publish, reach, run_cli, start, wait_instance, wait_until

# Answers "<its release's VERSION> <its parameter>" on its port; with CRASH in its folder it exits 3 at once.
SERVER = """import os, socket, sys
if os.path.exists("CRASH"):
    sys.exit(3)
version = open("VERSION").read().strip()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"]))); s.listen()
while True:
    c, _ = s.accept(); c.sendall(f"{version} {sys.argv[1]}".encode()); c.close()
"""


def release(stack, client, file_server, tmp_path, version: str, crash: bool = False, batch: int | None = None):
    files = {"profile": "command: python3 server.py {tag}\n", "server.py": SERVER, "VERSION": version + "\n"}
    if crash:
        files["CRASH"] = ""
    url = publish(file_server, write_app(tmp_path / f"v-{version}-{time.monotonic_ns()}", files), "tgz")
    body = {"app": "web", "url": url}
    if batch:
        body["batch"] = batch
    resp = client.post("/v1/apps", body)
    return stack.wait_job(client, resp["job"], 300)


def answer(stack, client, inst: str) -> str:
    port = client.get(f"/v1/instances/{inst}/port")
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection((reach(stack, port["host"]), port["port"]), timeout=2) as s:
                return s.recv(100).decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ports(client) -> dict[str, int]:
    return {i["name"]: i["port"]["port"] for i in client.get("/v1/apps/web/instances")["instances"]}


def logged(client, job: str, text: str) -> bool:
    """Whether the job's log so far has a line with ``text``."""
    events = client.events(f"/v1/jobs/{job}/events?follow=0")
    return any(text in e["data"]["line"] for e in events if e["event"] == "log")


def test_a_launch_waiting_behind_a_deploy_starts_on_the_release_the_deploy_made(stack, file_server, tmp_path):
    """A launch waits for its user's quota lock while a deploy holds it. The deploy makes v2 current
    and rolls the app's running instances, before the launch's are running: the launch must start
    its own on v2, not on the v1 that was current when it began."""
    name, client = stack.add_user()
    assert release(stack, client, file_server, tmp_path, "1")["state"] == "succeeded"
    lock = keys.QUOTA_LOCK.format(user=name)

    def put_lock(owner: str) -> None:
        async def go():
            async with EtcdStore(stack.env["NAP_ETCD"]) as s:
                await s.put(lock, owner)

        asyncio.run(go())

    put_lock("an-earlier-job")  # the lock is held from here on, by one job or another
    launch = client.post("/v1/apps/web/instances", {"params": {"tag": "t"}, "count": 1})["job"]
    wait_until(lambda: logged(client, launch, "starting 1 instance(s)"), 60, "the launch to begin")
    files = {"profile": "command: python3 server.py {tag}\n", "server.py": SERVER, "VERSION": "2\n"}
    deploy = client.post(
        "/v1/apps", {"app": "web", "url": publish(file_server, write_app(tmp_path / "v2", files), "tgz")}
    )
    # As if an earlier attempt of the deploy held the lock: the deploy takes it over at once, before the
    # launch can have it, and gives it back once v2 is current.
    put_lock(deploy["job"])
    deployed = stack.wait_job(client, deploy["job"], 120)
    assert deployed["state"] == "succeeded" and deployed["result"]["release"] == "v2", deployed
    launched = stack.wait_job(client, launch, 120)
    assert launched["state"] == "succeeded" and launched["result"]["running"] == 1, launched
    inst = launched["result"]["instances"][0]["name"]
    assert answer(stack, client, inst) == "2 t"


def test_redeploy_rolls_running_instances_and_rollback_brings_them_back(
    engine_stack, engine_user, file_server, tmp_path
):
    name, client = engine_user
    first = release(engine_stack, client, file_server, tmp_path, "1")
    assert first["state"] == "succeeded" and first["result"]["release"] == "v1", first
    assert start(engine_stack, client, "web", {"tag": "t"}, count=4)["result"]["running"] == 4
    insts = [f"{name}_web_common@{n}" for n in range(1, 5)]
    before = ports(client)
    assert {answer(engine_stack, client, i) for i in insts} == {"1 t"}

    second = release(engine_stack, client, file_server, tmp_path, "2", batch=2)
    assert second["state"] == "succeeded", second
    assert second["result"]["rollout"] == {"rolled": 4, "batches": 2, "batch": 2}
    wait_until(lambda: all(client.get(f"/v1/instances/{i}")["state"] == "running" for i in insts), 30, "running")
    assert {answer(engine_stack, client, i) for i in insts} == {"2 t"}
    if engine_stack.env["NAP_ENGINE"] == "local":
        assert ports(client) == before  # same numbers, same ports
    else:
        assert set(ports(client)) == set(before)

    listing = client.get("/v1/apps/web/releases")
    assert listing["current"] == "v2"
    assert [(r["name"], r["current"]) for r in listing["releases"]] == [("v2", True), ("v1", False)]
    assert all(r["digest"].startswith("sha256:") and r["url"].startswith("http") for r in listing["releases"])
    assert client.get("/v1/apps/web")["release"] == "v2"

    out = run_cli(engine_stack, client.token, "rollback", "web", "--wait", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: all(client.get(f"/v1/instances/{i}")["state"] == "running" for i in insts), 30, "running")
    assert {answer(engine_stack, client, i) for i in insts} == {"1 t"}
    assert client.get("/v1/apps/web/releases")["current"] == "v1"
    out = run_cli(engine_stack, client.token, "releases", "web")
    assert out.returncode == 0 and out.stdout.splitlines()[1].startswith("* v1"), out.stdout


def test_a_rollout_that_is_not_healthy_stops_and_puts_its_batch_back(stack, user, file_server, tmp_path):
    name, client = user
    assert release(stack, client, file_server, tmp_path, "1")["state"] == "succeeded"
    assert start(stack, client, "web", {"tag": "t"}, count=4)["result"]["running"] == 4
    insts = [f"{name}_web_common@{n}" for n in range(1, 5)]
    bad = release(stack, client, file_server, tmp_path, "2", crash=True, batch=2)
    assert bad["state"] == "failed", bad
    assert "stopped at batch 1 of 2" in bad["error"] and "back on v1" in bad["error"], bad["error"]
    for inst in insts:
        wait_instance(client, inst, lambda st: st["state"] == "running", 30)
        assert answer(stack, client, inst) == "1 t"
    # The release that failed is current still: a rollback puts the app back on v1 for new instances too.
    assert client.get("/v1/apps/web/releases")["current"] == "v2"
    job = stack.wait_job(client, client.post("/v1/apps/web/rollback", {"release": "v1"})["job"], 120)
    assert job["state"] == "succeeded" and job["result"]["rolled"] == 0, job
    assert start(stack, client, "web", {"tag": "u"}, count=1)["result"]["running"] == 1
    assert answer(stack, client, f"{name}_web_common@5") == "1 u"


def test_a_stopped_instance_starts_on_the_current_release(stack, user, file_server, tmp_path):
    name, client = user
    assert release(stack, client, file_server, tmp_path, "1")["state"] == "succeeded"
    assert start(stack, client, "web", {"tag": "t"}, count=1)["result"]["running"] == 1
    inst = f"{name}_web_common@1"
    client.post(f"/v1/instances/{inst}/stop")
    done = release(stack, client, file_server, tmp_path, "2")
    assert done["state"] == "succeeded" and done["result"]["rollout"] == {"rolled": 0, "batches": 0}
    client.post(f"/v1/instances/{inst}/start")
    wait_instance(client, inst, lambda st: st["state"] == "running", 30)
    assert answer(stack, client, inst) == "2 t"


def test_old_releases_are_pruned_and_bad_rollbacks_refused(stack, user, file_server, tmp_path):
    name, client = user
    for v in range(1, 7):
        assert release(stack, client, file_server, tmp_path, str(v))["state"] == "succeeded"
    listing = client.get("/v1/apps/web/releases")
    assert [r["name"] for r in listing["releases"]] == ["v6", "v5", "v4", "v3", "v2"]  # NAP_KEEP_RELEASES=5
    versions = stack.home / "services" / name / ".versions" / "web"
    assert sorted(p.name for p in versions.iterdir()) == ["v2", "v3", "v4", "v5", "v6"]

    for body, status in (
        ({"release": "v1"}, 404),  # pruned
        ({"release": "v99"}, 404),
        ({"release": "vx"}, 400),
        ({"release": 3}, 400),
        ({"batch": 0}, 400),
        ({"batch": "2"}, 400),
    ):
        with pytest.raises(ApiError) as e:
            client.post("/v1/apps/web/rollback", body)
        assert e.value.status == status and e.value.body["message"], (body, e.value.body)
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/nosuch/rollback", {})
    assert e.value.status == 404

    shutil.rmtree(versions / "v3")  # a release whose folder vanished
    job = stack.wait_job(client, client.post("/v1/apps/web/rollback", {"release": "v3"})["job"], 60)
    assert job["state"] == "failed" and "has no folder" in job["error"], job
    assert client.get("/v1/apps/web/releases")["current"] == "v6"  # nothing changed
    job = stack.wait_job(client, client.post("/v1/apps/web/rollback", {})["job"], 60)
    assert job["state"] == "succeeded" and job["result"]["to"] == "v5", job


def test_deploy_refuses_a_bad_batch(stack, user):
    _, client = user
    for batch in (0, -1, "2", True, 10**9):
        with pytest.raises(ApiError) as e:
            client.post("/v1/apps", {"app": "web", "url": "http://127.0.0.1:1/x.tgz", "batch": batch})
        assert e.value.status == 400 and "batch" in e.value.body["message"]
