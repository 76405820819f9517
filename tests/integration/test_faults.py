"""Faults survived with nothing lost: jobs whose message Redis lost are resolved by the reaper; a Redis
killed and restarted (from its append-only file), etcd frozen, the agent or the worker killed in the
middle of a launch; the API restarted under a client following a job's events.

After each: the job ends (within the documented bound: the waits below), the app has all of the
launch's instances or none (a rollback), and no two instances share a number or a port.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nap_orch import keys
from nap_orch.cli.client import ApiError
from nap_orch.config import Settings
from nap_orch.ops.instances.launch import reserve_numbers
from nap_orch.store.base import IN_FLIGHT, Store
from nap_orch.store.redis import RedisStore
from tests.support.apps import write_app
from tests.support.fixtures import LIMITS
from tests.support.flows import deployed, drop_messages, publish, start, wait_state
from tests.support.services import RedisServer
from tests.support.stack import NapStack

SLEEPER = {"profile": "command: sleep 100000\n"}


def job_states(client, job_id: str) -> list[str]:
    return [e["data"]["state"] for e in client.events(f"/v1/jobs/{job_id}/events") if e["event"] == "state"]


def test_a_queued_job_whose_message_was_lost_is_queued_again(stack, user, file_server, tmp_path):
    name, client = user
    url = publish(file_server, write_app(tmp_path / "src", SLEEPER), "tgz")
    stack.kill("worker")
    try:
        job = client.post("/v1/apps", {"app": "lost", "url": url})["job"]
        assert drop_messages(stack, job) == 1
        deadline = time.monotonic() + 30
        while "requeued by the platform" not in (client.get(f"/v1/jobs/{job}")["error"] or ""):
            assert time.monotonic() < deadline, client.get(f"/v1/jobs/{job}")
            time.sleep(0.2)
    finally:
        stack.start_worker()
    record = stack.wait_job(client, job, 60)
    assert record["state"] == "succeeded" and record["attempts"] == 1, record
    assert job_states(client, job) == ["queued", "queued", "running", "succeeded"]


@pytest.mark.parametrize("engine_stack", ["local", "slurm"], indirect=True)
def test_a_running_job_whose_worker_and_message_were_lost_runs_again_once(engine_stack, file_server, tmp_path):
    """On either engine: a launch whose worker died and whose message is gone is run again by the
    reaper and resumes (its reservations are keyed by its job id): no duplicate number or port."""
    stack = engine_stack
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, SLEEPER, "many")
    job = client.post("/v1/apps/many/instances", {"params": {}, "count": 30})["job"]
    wait_state(stack, client, job, "running")
    stack.kill("worker")  # SIGKILL mid-launch ...
    assert drop_messages(stack, job) == 1  # ... and its message lost: nothing would ever redeliver it
    stack.start_worker()
    record = stack.wait_job(client, job, 90)  # the mark of life expires (20 s), the grace (3 s), attempt 2
    assert record["state"] == "succeeded" and record["attempts"] == 2, record
    assert job_states(client, job) == ["queued", "running", "queued", "running", "succeeded"]
    rows = client.get("/v1/apps/many/instances")["instances"]
    assert sorted(int(r["instance"]) for r in rows) == list(range(1, 31))
    assert len({json.dumps(r["port"], sort_keys=True) for r in rows}) == 30


@pytest.fixture(params=["etcd", "redis"])
def own_stack(request, tmp_path_factory):
    """A stack on a Redis of its own, which the test may kill: with its append-only file, as production
    runs Redis; its state store in etcd (the session's) or in that Redis."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True)
    server.start()
    etcd = request.getfixturevalue("etcd_server").endpoint if request.param == "etcd" else ""
    stack = NapStack(tmp_path_factory.mktemp("nap-f"), server.url, etcd, extra_env=LIMITS)
    stack.redis = server
    stack.start()
    yield stack
    stack.stop()
    server.stop()


def settle(stack: NapStack, client, job: str, timeout: float = 150.0) -> dict:
    """The job's record once it ended, through the API (which answers 503 while Redis is down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = client.get(f"/v1/jobs/{job}")
        except ApiError as e:
            if e.status != 503:  # only "unavailable" is expected, while Redis is down
                raise
            record = {}
        if record.get("state") in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not end in {timeout} s: {record}\n{stack.log('worker')[-4000:]}")


def all_or_none(client, app: str, count: int, record: dict) -> None:
    rows = client.get(f"/v1/apps/{app}/instances")["instances"]
    numbers = sorted(int(r["instance"]) for r in rows)
    if record["state"] == "succeeded":
        # all of them on 1..N (a retry fills the numbers its first attempt's writes never landed on),
        # and nothing else reserved
        assert numbers == list(range(1, count + 1)), (record, numbers)
        assert {r["state"] for r in rows} == {"running"}, rows
        whoami = client.get("/v1/whoami")["name"]
        assert client.get(f"/v1/users/{whoami}/quota")["usage"]["instances"] == count
    else:  # a failed launch rolls back
        assert numbers == [], (record.get("error"), record.get("attempts"), numbers[:5], len(numbers))
    assert len({json.dumps(r["port"], sort_keys=True) for r in rows}) == len(rows)


@pytest.mark.parametrize("point", [None, 0.0, 0.25, 0.5])
def test_redis_killed_and_restarted_during_a_launch(own_stack, file_server, tmp_path, point):
    """Redis SIGKILLed before a worker takes the launch (``None``), or that many seconds after the launch
    began running (reserving, submitting, writing the end: 200 instances take about a second here)."""
    name, client = own_stack.add_user()
    deployed(own_stack, client, file_server, tmp_path, SLEEPER, "many")
    time.sleep(1.1)  # the user and the app are in the append-only file (it syncs every second)
    job = client.post("/v1/apps/many/instances", {"params": {}, "count": 200})["job"]
    if point is not None:
        wait_state(own_stack, client, job, "running")
        time.sleep(point)
    own_stack.redis.kill()
    time.sleep(2)
    own_stack.redis.start()
    record = settle(own_stack, client, job)
    assert record["state"] in ("succeeded", "failed"), record
    all_or_none(client, "many", 200, record)


class CutShort(RedisStore):
    """A Redis store whose server is SIGKILLed in the middle of a reservation's ``create_many``: the
    creates of the numbers in ``landing`` reach it, then it is killed, and only then are the others sent
    (as CI's append-only file showed: number 1, then 65, then nothing; 2..64 were still connecting)."""

    def __init__(self, server: RedisServer, landing: set[int]):
        super().__init__(server.url, namespace="cut")
        self.server = server
        self.landing = landing
        self.landed: set[int] = set()
        self.dead = asyncio.Event()

    async def create_many(self, items, in_flight: int = IN_FLIGHT) -> list[bool]:
        """Key by key, as the store did before it sent a chunk in one script: here each create can land
        or not on its own (on either store, the chunks of a big reservation still can)."""
        return await Store.create_many(self, items, in_flight)

    async def create(self, key: str, value: str, lease=None) -> bool:
        n = int(key.rsplit("/", 1)[1])
        if self.dead.is_set() or n not in self.landing:
            await self.dead.wait()
            return await super().create(key, value, lease)
        created = await super().create(key, value, lease)
        self.landed.add(n)
        if self.landed == self.landing:
            self.server.kill()
            self.dead.set()
        return created


@pytest.mark.parametrize("landing", [{1, 65}, {2, 65}])
async def test_a_retry_after_redis_killed_mid_reservation_gets_1_to_n(tmp_path, landing):
    """A launch's first attempt has some of its numbers written when Redis dies (its 64 creates in flight
    do not all land: the first to land frees its turn for number 65); Redis comes back from its
    append-only file, and the retry of the same job gets 1..N, not its two numbers and N-2 above them."""
    # every acknowledged write in the file before Redis dies: with everysec, a write that waits behind a
    # slow background fsync (a busy machine) is acknowledged and then lost with the process
    server = RedisServer(tmp_path / "redis", appendonly=True, fsync="always")
    server.start()
    store = CutShort(server, landing)
    settings = Settings(home=tmp_path / "home")
    prefix = keys.INSTANCES_OF_APP.format(user="alice", app="web")
    try:
        await store.open()
        async with asyncio.timeout(120):
            with pytest.raises(ConnectionError):
                await reserve_numbers(store, settings, "alice", "web", 200, "job1")
            server.start()  # from its append-only file
            kept = await store.get_prefix(prefix)
            assert sorted(int(k.rsplit("/", 1)[1]) for k in kept) == sorted(landing)
            numbers = await reserve_numbers(store, settings, "alice", "web", 200, "job1")
        assert numbers == list(range(1, 201))
        held = await store.get_prefix(prefix)
        assert len(held) == 200 and {json.loads(v)["job"] for v in held.values()} == {"job1"}
    finally:
        await store.close()
        server.stop()


def test_the_agent_killed_during_a_launch(own_stack, file_server, tmp_path):
    name, client = own_stack.add_user()
    deployed(own_stack, client, file_server, tmp_path, SLEEPER, "many")
    job = client.post("/v1/apps/many/instances", {"params": {}, "count": 100})["job"]
    wait_state(own_stack, client, job, "running")
    time.sleep(0.3)
    own_stack.kill("agent")
    time.sleep(1)
    own_stack.start_agent()
    record = settle(own_stack, client, job)
    assert record["state"] in ("succeeded", "failed"), record
    all_or_none(client, "many", 100, record)


def test_etcd_frozen_during_a_launch(stack, user, file_server, tmp_path, etcd_server):
    name, client = user
    deployed(stack, client, file_server, tmp_path, SLEEPER, "many")
    job = client.post("/v1/apps/many/instances", {"params": {}, "count": 100})["job"]
    wait_state(stack, client, job, "running")
    os.kill(etcd_server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(5)
    finally:
        os.kill(etcd_server.process.pid, signal.SIGCONT)
    record = settle(stack, client, job)
    assert record["state"] in ("succeeded", "failed"), record
    all_or_none(client, "many", 100, record)


def test_a_client_following_a_job_across_an_api_restart_sees_every_event_once(stack, user, file_server, tmp_path):
    name, client = user
    deployed(stack, client, file_server, tmp_path, SLEEPER, "many")
    job = client.post("/v1/apps/many/instances", {"params": {}, "count": 200})["job"]
    seen: list[dict] = []
    try:
        for ev in client.events(f"/v1/jobs/{job}/events"):
            seen.append(ev)
            if len(seen) == 3:  # the API goes away under the client, which reads what reached it
                stack.kill("api", signal.SIGKILL)
    except (OSError, http.client.HTTPException):
        pass
    assert len(seen) >= 3
    stack.start_api()
    seen += client.events(f"/v1/jobs/{job}/events", last_id=seen[-1]["id"])
    everything = list(client.events(f"/v1/jobs/{job}/events"))
    assert [e["id"] for e in seen] == [e["id"] for e in everything]
    assert seen[-1]["event"] == "state" and seen[-1]["data"]["state"] == "succeeded"


def test_following_a_journal_ends_with_an_error_when_the_api_goes_away(stack, user, file_server, tmp_path):
    """`nap get_journal -f` exits 0 when the instance stops, and non-zero, saying so, when the API goes
    away under it (it used to exit 0 silently then, as if the journal had ended)."""
    name, client = user
    deployed(stack, client, file_server, tmp_path, SLEEPER, "talk")
    first, second = (i["name"] for i in start(stack, client, "talk", {}, count=2)["result"]["instances"])
    env = {**os.environ, "NAP_URL": stack.url, "NAP_TOKEN": client.token}

    def follow(inst: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nap_orch", "get_journal", inst, "-f"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "nap: started" in proc.stdout.readline()  # following now
        return proc

    proc = follow(first)
    client.post(f"/v1/instances/{first}/stop")
    assert proc.wait(30) == 0, proc.stderr.read()
    proc = follow(second)
    stack.kill("api", signal.SIGKILL)
    try:
        code = proc.wait(30)
    finally:
        stack.start_api()
    err = proc.stderr.read()
    assert code != 0 and "the connection to the nap API" in err and "ended" in err, (code, err)
