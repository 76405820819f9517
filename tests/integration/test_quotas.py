"""Quotas through the real API, worker, agent and etcd: over quota is a 403 at submit with nothing
recorded, or, for two launches submitted at once, a job that fails before it starts anything."""

from __future__ import annotations

import pytest

from nap_orch.cli.client import ApiError
from tests.support.flows import deployed, run_cli

SLEEPER = {"profile": "command: sleep 100000\n"}


def quota(stack, name: str, **changes) -> dict:
    return stack.client().post(f"/v1/users/{name}/quota", changes)


def refused(call) -> dict:
    with pytest.raises(ApiError) as e:
        call()
    assert e.value.status == 403 and e.value.body["error"] == "quota_exceeded", e.value.body
    return e.value.body


def job_count(client) -> int:
    return len(client.get("/v1/jobs")["jobs"])


def test_instances_over_quota_are_refused_at_submit(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, SLEEPER, "web")
    quota(stack, name, instances=5)
    jobs = job_count(client)
    body = refused(lambda: client.post("/v1/apps/web/instances", {"params": {}, "count": 6}))
    assert "instances: 0 used + 6 more > 5" in body["message"]
    assert job_count(client) == jobs  # nothing recorded
    ok = stack.wait_job(client, client.post("/v1/apps/web/instances", {"params": {}, "count": 5})["job"], 60)
    assert ok["state"] == "succeeded", ok
    refused(lambda: client.post("/v1/apps/web/instances", {"params": {}, "count": 1}))
    seen = client.get(f"/v1/users/{name}/quota")
    assert seen["limits"]["instances"] == 5 and seen["usage"]["instances"] == 5


def test_scale_over_quota_is_refused_and_removal_gives_quota_back(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, SLEEPER, "web")
    quota(stack, name, instances=3)
    up = stack.wait_job(client, client.put("/v1/apps/web/scale", {"count": 3})["job"], 60)
    assert up["state"] == "succeeded", up
    body = refused(lambda: client.put("/v1/apps/web/scale", {"count": 4}))
    assert "instances: 3 used + 1 more > 3" in body["message"]
    client.delete(f"/v1/instances/{name}_web_common@3")
    assert client.get(f"/v1/users/{name}/quota")["usage"]["instances"] == 2
    again = stack.wait_job(client, client.put("/v1/apps/web/scale", {"count": 3})["job"], 60)
    assert again["state"] == "succeeded" and again["result"]["started"] == 1, again


def test_two_launches_at_once_cannot_both_pass_the_quota(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, SLEEPER, "web")
    quota(stack, name, instances=10)
    jobs = [client.post("/v1/apps/web/instances", {"params": {}, "count": 6})["job"] for _ in range(2)]
    records = [stack.wait_job(client, j, 60) for j in jobs]
    states = sorted(r["state"] for r in records)
    assert states == ["failed", "succeeded"], records
    failed = next(r for r in records if r["state"] == "failed")
    assert failed["error"].startswith("over quota: instances:"), failed
    rows = client.get("/v1/apps/web/instances")["instances"]
    assert len(rows) == 6 and {r["state"] for r in rows} == {"running"}  # nothing of the failed one


def test_memory_and_apps_quotas(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\nmemory: 100m\n"}, "big")
    quota(stack, name, memory="250m", apps=1)
    body = refused(lambda: client.post("/v1/apps/big/instances", {"params": {}, "count": 3}))
    assert "memory: 0b used + 300m more > 250m" in body["message"], body
    ok = stack.wait_job(client, client.post("/v1/apps/big/instances", {"params": {}, "count": 2})["job"], 60)
    assert ok["state"] == "succeeded"
    # a second app is over the apps quota; deploying the same app again is not
    refused(lambda: client.post("/v1/apps", {"app": "other", "url": "https://example.org/a.tgz"}))
    url = client.get("/v1/apps/big/url")["url"]
    again = stack.wait_job(client, client.post("/v1/apps", {"app": "big", "url": url})["job"], 60)
    assert again["state"] == "succeeded", again


def test_disk_quota(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, {**SLEEPER, "blob": "x" * 200_000}, "fat")
    used = client.get(f"/v1/users/{name}/quota")["usage"]["disk"]
    assert used >= 200_000
    quota(stack, name, disk=used + 100_000)  # room for the app, not for a copy of it
    refused(lambda: client.post("/v1/apps/fat/instances", {"params": {}, "count": 1}))
    quota(stack, name, disk=used)  # full: no deploy at all
    refused(lambda: client.post("/v1/apps", {"app": "more", "url": "https://example.org/a.tgz"}))
    quota(stack, name, disk=None)  # back to the default
    ok = stack.wait_job(client, client.post("/v1/apps/fat/instances", {"params": {}, "count": 1})["job"], 60)
    assert ok["state"] == "succeeded"


def test_who_may_see_and_change_quotas(stack):
    name, client = stack.add_user()
    other, _ = stack.add_user()
    mine = client.get(f"/v1/users/{name}/quota")
    assert set(mine["limits"]) == {"instances", "apps", "disk", "memory"}
    for call, status in (
        (lambda: client.post(f"/v1/users/{name}/quota", {"instances": 10**6}), 403),
        (lambda: client.get(f"/v1/users/{other}/quota"), 403),
        (lambda: stack.client().get("/v1/users/nobody-such/quota"), 404),
        (lambda: stack.client().post(f"/v1/users/{name}/quota", {"cpu": 1}), 400),
        (lambda: stack.client().post(f"/v1/users/{name}/quota", {"disk": "much"}), 400),
        (lambda: stack.client().post(f"/v1/users/{name}/quota", {}), 400),
    ):
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == status and "message" in e.value.body


def test_cli_user_quota(stack):
    name, _ = stack.add_user()
    out = run_cli(stack, stack.admin_token, "user", "quota", name, "instances=7", "disk=2g")
    assert out.returncode == 0, out.stderr
    assert f"quotas of {name}" in out.stdout and "instances\t0\tof 7" in out.stdout
    assert f"disk\t0\tof {2 * 1024**3}" in out.stdout
    out = run_cli(stack, stack.admin_token, "user", "quota", name, "instances=default")
    default = stack.env["NAP_QUOTA_INSTANCES"]
    assert out.returncode == 0 and f"instances\t0\tof {default}" in out.stdout, out.stdout
    out = run_cli(stack, stack.admin_token, "user", "quota", name, "instances")
    assert out.returncode == 2 and "NAME=VALUE" in out.stderr
