"""Job records, their event streams, cancellation and a worker dying mid-job."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import yaml

from nap_orch.cli.client import ApiError
from nap_orch.config import Settings
from nap_orch.errors import Cancelled, NotFound, Superseded
from nap_orch.jobs import runner
from nap_orch.jobs.records import Claim, JobState, JobStore
from nap_orch.jobs.runner import JobContext
from nap_orch.store.etcd import EtcdStore
from tests.support.apps import web_app, write_app
from tests.support.fixtures import LIMITS
from tests.support.flows import deploy, publish, run_cli, wait_state, wait_until
from tests.support.stack import NapStack


def big_app(tmp_path, file_server):
    """An archive that the test server trickles out over about 4 s."""
    src = write_app(tmp_path / "slow", {"profile": "command: /bin/sleep 1000\n", "blob": os.urandom(300_000).hex()})
    return publish(file_server, src, "tgz").replace(file_server.url, file_server.url + "/slow") + "?seconds=4"


def test_job_record_and_event_stream(stack, user, file_server, tmp_path):
    _, client = user
    url = publish(file_server, web_app(tmp_path / "src"), "tgz")
    job = deploy(stack, client, "web", url)
    assert job["kind"] == "deploy" and job["args"]["url"] == url
    assert job["created"] <= job["started"] <= job["finished"]
    events = list(client.events(f"/v1/jobs/{job['id']}/events"))
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    lines = [e["data"]["line"] for e in events if e["event"] == "log"]
    assert any("downloading" in line for line in lines), lines
    assert any("extracted" in line for line in lines), lines
    assert any("/services/url/" in line for line in lines), lines
    # Replay from the middle with Last-Event-ID: exactly the events after it.
    middle = events[len(events) // 2]["id"]
    rest = list(client.events(f"/v1/jobs/{job['id']}/events", last_id=middle))
    assert [e["id"] for e in rest] == [e["id"] for e in events if e["id"] > middle] or [e["id"] for e in rest] == [
        e["id"] for e in events[len(events) // 2 + 1 :]
    ]


def test_job_stream_follows_live_until_the_job_ends(stack, user, file_server, tmp_path):
    _, client = user
    resp = client.post("/v1/apps", {"app": "live", "url": big_app(tmp_path, file_server)})
    t0 = time.monotonic()
    events = list(client.events(f"/v1/jobs/{resp['job']}/events"))
    assert time.monotonic() - t0 > 1  # it followed a job that was still running
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "succeeded"
    progress = [e["data"] for e in events if e["event"] == "progress"]
    assert len(progress) >= 3  # they drive the --wait progress bar
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert all(p["done"] <= p["total"] == progress[0]["total"] for p in progress)


def test_user_stream_and_job_list_by_state(stack, user, file_server, tmp_path):
    _, client = user
    ok = deploy(stack, client, "one", publish(file_server, web_app(tmp_path / "a"), "tgz"))
    bad = deploy(stack, client, "two", f"{file_server.url}/nothing-here.tgz")
    assert ok["state"] == "succeeded" and bad["state"] == "failed"
    assert [j["id"] for j in client.get("/v1/jobs", state="failed")["jobs"]] == [bad["id"]]
    assert [j["id"] for j in client.get("/v1/jobs", state="succeeded")["jobs"]] == [ok["id"]]
    assert {j["id"] for j in client.get("/v1/jobs")["jobs"]} == {ok["id"], bad["id"]}
    with pytest.raises(ApiError) as e:
        client.get("/v1/jobs", state="nonsense")
    assert e.value.status == 400
    events = list(client.events("/v1/events?follow=0"))
    assert {e["data"]["job"] for e in events} == {ok["id"], bad["id"]}


async def test_a_finished_job_and_its_events_expire_after_its_retention(redis_server):
    redis_server.start()
    jobs = JobStore.from_url(redis_server.url, f"test-{uuid.uuid4().hex[:12]}")
    r, k = jobs.redis, jobs.keys
    try:
        done, kept, live, cancelled = [
            await jobs.create("deploy", "alice", {"n": i}, retention=keep) for i, keep in enumerate((1, 0, 1, 1))
        ]
        for job in (done, kept, live):
            assert await jobs.start_attempt(job)
        assert await jobs.transition(done, JobState.SUCCEEDED, {JobState.RUNNING}, result={})
        assert await jobs.transition(kept, JobState.FAILED, {JobState.RUNNING}, error="kept for ever")
        await jobs.request_cancel(cancelled)
        for job in (done, cancelled):  # ended: record and events expire after the job's retention
            assert 0 < await r.pttl(k.job(job.id)) <= 1000 and 0 < await r.pttl(k.job_events(job.id)) <= 1000
        for job in (kept, live):  # retention 0 keeps it; a running job is kept whatever its retention
            assert await r.pttl(k.job(job.id)) == -1 and await r.pttl(k.job_events(job.id)) == -1
        await asyncio.sleep(1.2)
        for job in (done, cancelled):
            with pytest.raises(NotFound):
                await jobs.get(job.id)
            assert not await r.exists(k.job_events(job.id))
        assert [j.id for j in await jobs.list("alice")] == [live.id, kept.id]
        assert {i.decode() for i in await r.zrange(k.user_jobs("alice"), 0, -1)} == {live.id, kept.id}
        assert await r.xlen(k.user_events("alice")) > 0  # the user's stream is trimmed by length instead
    finally:
        keys = [key async for key in r.scan_iter(f"{k.ns}:*")]
        if keys:
            await r.delete(*keys)
        await jobs.close()


async def test_a_jobs_lines_are_written_in_batches_in_order_and_promptly(redis_server, tmp_path, monkeypatch):
    """A running job's log lines and progress cost no round trip each: they are written, in order,
    with its next cancel check or state change, or by a timer soon after (live watchers see them)."""
    redis_server.start()
    jobs = JobStore.from_url(redis_server.url, f"test-{uuid.uuid4().hex[:12]}")
    r, k = jobs.redis, jobs.keys
    rt = SimpleNamespace(jobs=jobs, settings=Settings.from_env({"NAP_HOME": str(tmp_path)}))

    async def stream(job) -> list[str]:
        out = []
        for _, f in await r.xrange(k.job_events(job.id)):
            data = json.loads(f[b"data"])
            out.append(data.get("line") or data.get("state") or f"{data.get('done')}/{data.get('total')}")
        return out

    try:
        job = await jobs.create("deploy", "alice", {})
        assert await jobs.claim(job, cap=4) == (Claim.STARTED, False)
        ctx = JobContext(job, rt)  # type: ignore[arg-type]
        await ctx.log("one")
        await ctx.progress(1, 2)
        await ctx.log("two")
        deadline = time.monotonic() + 60
        while True:  # no check, no state change: the timer writes them
            if len(await stream(job)) == 5 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert await stream(job) == ["queued", "running", "one", "1/2", "two"]
        await ctx.log("three")
        await ctx.end(JobState.SUCCEEDED, result={})  # the last lines go with the final state
        assert await stream(job) == ["queued", "running", "one", "1/2", "two", "three", "succeeded"]
        assert ctx.released and not await r.zscore(k.user_running("alice"), job.id)

        job = await jobs.create("deploy", "alice", {})
        assert await jobs.claim(job, cap=4) == (Claim.STARTED, False)
        ctx = JobContext(job, rt)  # type: ignore[arg-type]
        await ctx.check()
        await jobs.request_cancel(await jobs.get(job.id))
        await ctx.log("four")
        monkeypatch.setattr(runner, "LOOK_S", 0.0)  # the next check looks: it reads the flag, writing the line
        with pytest.raises(Cancelled):
            await ctx.check()
        assert (await stream(job))[-1] == "four"
        await ctx.end(JobState.CANCELLED, error="cancelled by the user")
        assert (await stream(job))[-1] == "cancelled"
        await ctx.close()
    finally:
        keys = [key async for key in r.scan_iter(f"{k.ns}:*")]
        if keys:
            await r.delete(*keys)
        await jobs.close()


async def test_an_attempt_overtaken_by_a_newer_one_stops_and_leaves_the_job_to_it(redis_server, tmp_path, monkeypatch):
    """The reaper requeues a job whose worker it thinks lost; if that worker was only cut off from Redis,
    two attempts run. The older one stops at its next step: it neither ends, fails, retries nor undoes
    the job (a launch's rollback would remove what the newer attempt resumes), and the newer owns it."""
    monkeypatch.setattr(runner, "LOOK_S", 0.0)  # every check looks
    redis_server.start()
    jobs = JobStore.from_url(redis_server.url, f"test-{uuid.uuid4().hex[:12]}")
    r, k = jobs.redis, jobs.keys
    rt = SimpleNamespace(jobs=jobs, settings=Settings.from_env({"NAP_HOME": str(tmp_path)}))

    async def overtaken() -> tuple[JobContext, JobContext]:
        """A job's attempt 1, and its attempt 2 after the reaper requeued it."""
        first = await jobs.create("start_common", "alice", {})
        assert await jobs.claim(first, cap=4) == (Claim.STARTED, False)
        assert await jobs.transition(await jobs.get(first.id), JobState.QUEUED, {JobState.RUNNING}, error="lost")
        second = await jobs.get(first.id)
        assert await jobs.claim(second, cap=4) == (Claim.STARTED, False)
        assert (first.attempts, second.attempts) == (1, 2)
        return JobContext(first, rt), JobContext(second, rt)  # type: ignore[arg-type]

    try:
        old, new = await overtaken()
        await old.log("still here")
        with pytest.raises(Superseded, match="attempt 1 overtaken by attempt 2"):
            await old.check()
        await new.check()  # the newer attempt goes on
        assert not await old.end(JobState.FAILED, error="from the old attempt")  # moves nothing
        record = await jobs.get(old.job_id)
        assert (record.state, record.attempts, record.error) == ("running", 2, "lost")
        assert await new.end(JobState.SUCCEEDED, result={"n": 1})
        assert (await jobs.get(old.job_id)).state == "succeeded"

        # through the runner: an overtaken attempt that reaches a step returns, leaving all to the newer
        old, new = await overtaken()
        undone = []

        async def launch(ctx) -> dict:
            try:
                await ctx.check()
            except Superseded:
                raise
            except BaseException:
                undone.append(True)
                raise
            return {}

        await runner._attempt(old, launch, 3)
        record = await jobs.get(old.job_id)
        assert (record.state, record.attempts) == ("running", 2) and not undone
        assert old.released  # the running place is the newer attempt's: not given back
        assert await r.zscore(k.user_running("alice"), old.job_id) is not None

        # an overtaken attempt that fails is not retried (its error would send a third attempt)
        async def fails(ctx) -> dict:
            raise RuntimeError("etcd went away")

        await runner._attempt(old, fails, 3)  # no raise: dramatiq retries nothing
        assert (await jobs.get(old.job_id)).state == "running"
        await new.end(JobState.SUCCEEDED, result={})
    finally:
        keys = [key async for key in r.scan_iter(f"{k.ns}:*")]
        if keys:
            await r.delete(*keys)
        await jobs.close()


def test_jobs_are_removed_after_nap_job_retention(redis_server, file_server, tmp_path, tmp_path_factory):
    s = NapStack(
        tmp_path_factory.mktemp("nap-ret"), redis_server.url, "", extra_env={**LIMITS, "NAP_JOB_RETENTION": "2"}
    )
    s.start(agent=False)  # a deploy needs no engine
    try:
        _, client = s.add_user()
        job = deploy(s, client, "web", publish(file_server, web_app(tmp_path / "web"), "tgz"))
        assert job["state"] == "succeeded"
        assert [j["id"] for j in client.get("/v1/jobs")["jobs"]] == [job["id"]]
        r = redis.Redis.from_url(redis_server.url)
        assert 0 < r.pttl(f"{s.namespace}:job:{job['id']}") <= 2000
        assert 0 < r.pttl(f"{s.namespace}:ev:job:{job['id']}") <= 2000
        wait_until(lambda: not r.exists(f"{s.namespace}:job:{job['id']}"), 5, "the job's record to expire")
        with pytest.raises(ApiError) as e:
            client.get(f"/v1/jobs/{job['id']}")
        assert e.value.status == 404 and client.get("/v1/jobs")["jobs"] == []
        assert not r.exists(f"{s.namespace}:ev:job:{job['id']}")
        assert r.zcard(f"{s.namespace}:jobs:{job['user']}") == 0  # the list dropped its id
        r.close()
    finally:
        s.stop()


def test_a_job_records_the_platforms_retention(stack, user, file_server, tmp_path):
    _, client = user
    job = deploy(stack, client, "web", publish(file_server, web_app(tmp_path / "web"), "tgz"))
    r = redis.Redis.from_url(stack.env["NAP_REDIS_URL"])
    assert r.hget(f"{stack.namespace}:job:{job['id']}", "retention") == b"604800.0"  # NAP_JOB_RETENTION's default
    assert 604_700 < r.ttl(f"{stack.namespace}:job:{job['id']}") <= 604_800
    r.close()


def test_cancel_a_queued_job(stack, user, file_server, tmp_path):
    name, client = user
    stack.kill("worker")
    try:
        resp = client.post("/v1/apps", {"app": "never", "url": publish(file_server, web_app(tmp_path / "s"), "tgz")})
        job = client.post(f"/v1/jobs/{resp['job']}/cancel")
        assert job["state"] == "cancelled"
    finally:
        stack.start_worker()
    # The worker gets the message but must not run a cancelled job.
    time.sleep(2)
    assert client.get(f"/v1/jobs/{resp['job']}")["state"] == "cancelled"
    assert client.get(f"/v1/jobs/{resp['job']}")["attempts"] == 0
    assert not (stack.home / "services" / name / f"{name}_never").exists()
    with pytest.raises(ApiError) as e:
        client.post(f"/v1/jobs/{resp['job']}/cancel")
    assert e.value.status == 409


def test_cancel_a_running_job_cleans_up(stack, user, file_server, tmp_path):
    name, client = user
    resp = client.post("/v1/apps", {"app": "halt", "url": big_app(tmp_path, file_server)})
    wait_state(stack, client, resp["job"], "running")
    time.sleep(0.5)
    client.post(f"/v1/jobs/{resp['job']}/cancel")
    job = stack.wait_job(client, resp["job"])
    assert job["state"] == "cancelled"
    assert not (stack.home / "services" / name / f"{name}_halt").exists()
    staging = stack.home / "services" / name / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


@pytest.mark.parametrize("stall", ["silent", "silent after its headers", "silent to git"])
def test_cancel_a_deploy_whose_server_stalls(stack, user, file_server, stall):
    """A server that sends nothing more holds a download (or a clone) until its idle timeout (30 s),
    when it would fail as stalled; a cancel meanwhile ends it as cancelled, leaving nothing behind."""
    name, client = user
    url = file_server.stall(headers=stall == "silent after its headers")
    try:
        resp = client.post("/v1/apps", {"app": "stuck", "url": url + "/app.git" if stall == "silent to git" else url})
        wait_until(lambda: file_server.requested(url), 60, "the deploy to ask the stalled server")
        client.post(f"/v1/jobs/{resp['job']}/cancel")
        job = stack.wait_job(client, resp["job"], timeout=120)  # a missed cancel ends as stalled after 30 s
    finally:
        file_server.release(url)
    assert job["state"] == "cancelled", job
    assert "stalled" not in job["error"] and "too slow" not in job["error"], job
    lines = [e["data"]["line"] for e in client.events(f"/v1/jobs/{job['id']}/events") if e["event"] == "log"]
    assert not any("stalled" in line for line in lines), lines
    assert not (stack.home / "services" / name / f"{name}_stuck").exists()
    staging = stack.home / "services" / name / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


def test_worker_killed_mid_deploy_is_redelivered_and_completes_once(stack, user, file_server, tmp_path):
    name, client = user
    url = big_app(tmp_path, file_server)
    resp = client.post("/v1/apps", {"app": "phoenix", "url": url})
    wait_state(stack, client, resp["job"], "running")
    time.sleep(1.0)  # mid-download
    stack.kill("worker")  # SIGKILL, no chance to clean up
    stack.start_worker()
    job = stack.wait_job(client, resp["job"], timeout=90)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    base = stack.home / "services" / name
    assert [p.name for p in base.iterdir() if not p.name.startswith(".")] == [f"{name}_phoenix"]
    assert [p.name for p in (base / ".versions" / "phoenix").iterdir()] == ["v1"]  # one release, not two
    assert not list((base / ".staging").iterdir())

    async def url_keys():
        async with EtcdStore(stack.env["NAP_ETCD"]) as s:
            return await s.get_prefix(f"/services/url/{name}/")

    assert asyncio.run(url_keys()) == {f"/services/url/{name}/phoenix": url}
    states = [e["data"]["state"] for e in client.events(f"/v1/jobs/{resp['job']}/events") if e["event"] == "state"]
    assert states.count("succeeded") == 1 and states.count("running") == 2


def test_cli_user_add_and_deploy_wait(stack, file_server, tmp_path):
    out = run_cli(stack, stack.admin_token, "user", "add", "carol")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("nap_")
    url = publish(file_server, web_app(tmp_path / "src"), "tgz")
    out = run_cli(stack, token, "deploy_app", "carol_web", url, "--wait")
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stderr and "downloading" in out.stderr
    assert run_cli(stack, token, "get_parameters", "carol_web").stdout.strip() == "name,greeting"
    assert run_cli(stack, token, "list_services").stdout.split() == ["carol_web"]
    assert run_cli(stack, token, "get-service-url", "web").stdout.strip() == url
    out = run_cli(stack, token, "deploy_app", "carol_bad", f"{file_server.url}/missing.tgz", "--wait")
    assert out.returncode != 0 and "404" in out.stderr
    out = run_cli(stack, token, "deploy_app", "dave_web", url)
    assert out.returncode != 0 and "dave" in out.stderr
    out = run_cli(stack, "wrong", "list_services")
    assert out.returncode != 0 and "invalid token" in out.stderr


def test_docker_compose_file_is_valid_and_restarts_every_service():
    root = Path(__file__).resolve().parents[2]  # the repository
    out = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config"], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(services, "unless-stopped")
    # every part of the stack, on one host: the agent too, sharing NAP_HOME (apps, instances, its socket)
    assert set(services) == {"redis", "etcd", "api", "worker", "agent"}
    for part in ("api", "worker", "agent"):
        assert services[part]["command"][:2] == ["nap", part]
        assert services[part]["environment"]["NAP_HOME"] == "/var/lib/nap"
        mounts = services[part]["volumes"]
        # short ("nap-home:/var/lib/nap:rw") or long syntax, as docker-compose's version prints it
        pairs = [m.split(":")[:2] if isinstance(m, str) else [m["source"], m["target"]] for m in mounts]
        assert ["nap-home", "/var/lib/nap"] in pairs, mounts
    assert services["agent"]["privileged"] is True  # the sandbox's namespaces and control groups
    assert set(services["worker"]["depends_on"]) >= {"redis", "etcd", "agent"}
    assert services["api"]["environment"]["NAP_ADMIN_TOKEN"] == ""  # made on the API's first start
    dockerfile = (root / "Dockerfile").read_text()
    assert all(pkg in dockerfile for pkg in ("libopenmpi-dev", "openmpi-bin", "bubblewrap", "util-linux", "git"))
