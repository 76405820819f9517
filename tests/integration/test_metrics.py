"""Prometheus metrics at ``GET /metrics`` through the real stack: who may read them, and what a deploy,
a launch, an event stream, a crashing instance and a killed worker leave in them (the API's, the
workers' and the agent's, merged from the stack's metrics folder)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.apps import web_app
from tests.support.flows import deploy, deployed, publish, start, wait_instance, wait_until

PARAMS = {"name": "n1", "greeting": "hi"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get_metrics(stack, token: str | None) -> tuple[int, str, str]:
    """(status, content type, body) of ``GET /metrics`` with ``token`` (None: no Authorization)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(stack.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(stack, token: str | None = None) -> Samples:
    status, _, body = get_metrics(stack, stack.admin_token if token is None else token)
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def locks(stack) -> set[str]:
    """The ids of the processes that hold a place in the stack's metrics folder."""
    return {f.stem for f in (stack.home / "metrics").glob("*.lock")}


def test_metrics_take_an_admins_token_or_the_metrics_token(stack, user):
    _, client = user
    for token, status, error in (
        (None, 401, "unauthorized"),
        ("nope", 401, "unauthorized"),
        (client.token, 403, "forbidden"),
    ):
        got, ctype, body = get_metrics(stack, token)
        assert (got, ctype.split(";")[0]) == (status, "application/json"), body
        assert json.loads(body)["error"] == error and json.loads(body)["message"]

    for token in (stack.admin_token, stack.metrics_token):
        got, ctype, body = get_metrics(stack, token)
        assert got == 200 and ctype.startswith("text/plain"), body
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"nap_queue_depth", "nap_jobs_active", "nap_api_request_duration_seconds"} <= names


def test_a_deploy_and_a_launch_show_in_the_metrics(stack, user, file_server, tmp_path):
    name, client = user
    before = scrape(stack)
    job = deploy(stack, client, "web", publish(file_server, web_app(tmp_path / "src"), "tgz"))
    assert job["state"] == "succeeded", job
    launch = start(stack, client, "web", PARAMS, count=3)
    assert launch["state"] == "succeeded" and launch["result"]["running"] == 3, launch

    # The agent counts its instances once a second.
    wait_until(lambda: value(scrape(stack), "nap_instances", engine="local", state="running") >= 3, 10, "3 running")
    after = scrape(stack)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Jobs, by kind (the API's submits, the workers' ends), with how long they ran.
    assert grew("nap_jobs_submitted_total", kind="deploy") == 1
    assert grew("nap_jobs_submitted_total", kind="start_common") == 1
    assert grew("nap_jobs_ended_total", kind="deploy", state="succeeded") >= 1
    assert grew("nap_jobs_ended_total", kind="start_common", state="succeeded") >= 1
    assert grew("nap_job_duration_seconds_count", kind="start_common") >= 1
    assert grew("nap_job_duration_seconds_sum", kind="start_common") > 0
    count = value(after, "nap_job_duration_seconds_count", kind="start_common")
    assert value(after, "nap_job_duration_seconds_bucket", kind="start_common", le="+Inf") == count

    # The API's requests, by route pattern and status: never by the path asked for.
    route = {"method": "POST", "route": "/v1/apps/{app}/instances", "status": "202"}
    assert grew("nap_api_request_duration_seconds_count", **route) == 1
    assert value(after, "nap_api_request_duration_seconds_count", method="GET", route="/v1/jobs/{id}", status="200")
    routes = {dict(labels)["route"] for (n, labels) in after if n.startswith("nap_api_request_duration_seconds")}
    assert all(name not in r and "/web" not in r and launch["id"] not in r for r in routes), routes

    # What is read at scrape time, and the calls of the store and the engine.
    assert {dict(labels)["queue"] for (n, labels) in after if n == "nap_queue_depth"} == {"nap", "nap.DQ"}
    assert ("nap_jobs_active", ()) in after
    assert grew("nap_store_call_duration_seconds_count", store="etcd", op="create_many") >= 2  # numbers, ports
    assert grew("nap_engine_call_duration_seconds_count", engine="local", op="submit") >= 1

    # The stack's own folder holds the files of live processes (and the archive of ended ones) only:
    # a process's lock comes before its files and goes after them, so files listed first have a lock.
    folder = stack.home / "metrics"
    assert folder.stat().st_mode & 0o777 == 0o700
    owners = {f.stem.rsplit("_", 1)[1] for f in folder.glob("*.db")}
    assert owners <= locks(stack) | {"archive"}
    stack.remove_instances([name])


def test_an_event_stream_is_counted_while_it_is_open(stack, user):
    _, client = user
    open_now = value(scrape(stack), "nap_sse_clients", stream="user")
    conn = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=30)
    try:
        conn.request("GET", "/v1/events", headers={"Authorization": f"Bearer {client.token}"})
        assert conn.getresponse().status == 200
        assert value(scrape(stack), "nap_sse_clients", stream="user") == open_now + 1
    finally:
        conn.close()
    # The API notices a client that left at its next look at the stream (every 5 s at most).
    wait_until(lambda: value(scrape(stack), "nap_sse_clients", stream="user") == open_now, 20, "the stream to end")


def test_restarts_of_a_crashing_instance_are_counted(stack, user, file_server, tmp_path):
    name, client = user
    restarts = value(scrape(stack), "nap_instance_restarts_total", engine="local")
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sh -c 'exit 3'\n"}, "crash")
    start(stack, client, "crash", {}, count=1)
    st = wait_instance(client, f"{name}_crash_common@1", lambda s: s["restarts"] >= 2, timeout=60)
    assert value(scrape(stack), "nap_instance_restarts_total", engine="local") >= restarts + st["restarts"]
    stack.remove_instances([name])


def test_a_killed_worker_leaves_its_counts_and_no_files(stack, user, file_server, tmp_path):
    _, client = user
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 1000\n"}, "once")
    before, alive = scrape(stack), locks(stack)
    stack.kill("worker")  # SIGKILL: no chance to say it ended
    try:
        # Swept at the next scrape (the kernel drops a killed process's lock as it exits).
        def swept() -> set[str]:
            scrape(stack)
            return alive - locks(stack)

        wait_until(swept, 10, "the killed worker to be swept")
        after = scrape(stack)
    finally:
        stack.start_worker()
    gone = alive - locks(stack)
    assert not [f for f in (stack.home / "metrics").glob("*.db") if f.stem.rsplit("_", 1)[1] in gone]
    counted = ("nap_jobs_ended_total", "nap_jobs_submitted_total", "nap_job_duration_seconds_count")
    assert all(after.get(key, 0.0) >= v for key, v in before.items() if key[0] in counted)
    assert value(after, "nap_jobs_ended_total", kind="deploy", state="succeeded") >= 1


@pytest.mark.slurm_engine
def test_the_slurm_reconciler_counts_its_instances(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    try:
        deployed(slurm_stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "sleeper")
        job = start(slurm_stack, client, "sleeper", {}, count=2)
        assert job["state"] == "succeeded" and job["result"]["running"] == 2, job
        wait_until(
            lambda: value(scrape(slurm_stack), "nap_instances", engine="slurm", state="running") >= 2,
            10,
            "the reconciler's count of 2 running",
        )
        after = scrape(slurm_stack, slurm_stack.metrics_token)
        assert value(after, "nap_engine_call_duration_seconds_count", engine="slurm", op="submit") >= 1
        assert value(after, "nap_jobs_ended_total", kind="start_common", state="succeeded") >= 1
    finally:
        slurm_stack.remove_instances([name])
