"""The API under load and abuse (issue: no tenant takes it down, one tenant's work never stalls
another's): bounded connection pools, event streams that end with their client, per-user limits
answered 429 with Retry-After, and workers shared fairly between users. Bounded in count and time,
loopback only."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import time
import uuid

import pytest

from tests.support.apps import write_app
from tests.support.fixtures import LIMITS
from tests.support.flows import publish, wait_until
from tests.support.stack import NapStack


@pytest.fixture(scope="module")
def tight(tmp_path_factory, redis_server, etcd_server):
    """A stack with small limits: 4 Redis connections for requests, 3 event streams per user, a
    heartbeat every second, 20 requests a second per user (bursts of 20), 2 running jobs per user."""
    s = NapStack(
        tmp_path_factory.mktemp("nap-tight"),
        redis_server.url,
        etcd_server.endpoint,
        extra_env={
            **LIMITS,
            "NAP_API_REDIS_CONNECTIONS": "4",
            "NAP_SSE_PER_USER": "3",
            "NAP_SSE_HEARTBEAT": "1",
            "NAP_USER_RATE": "20",
            "NAP_USER_BURST": "20",
            "NAP_USER_JOBS_RUNNING": "2",
        },
    )
    s.start()
    yield s
    s.stop()


def request(stack: NapStack, path: str, token: str, method: str = "GET", body: dict | None = None):
    """(status, headers, JSON body) of one request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def ended(client, job: str, timeout: float = 120) -> dict:
    """The job's record once it ended, polled 4 times a second (this stack's rate limit is low)."""
    deadline = time.monotonic() + timeout
    while (record := client.get(f"/v1/jobs/{job}"))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, record
        time.sleep(0.25)
    return record


def open_stream(stack: NapStack, token: str) -> tuple[socket.socket, bytes]:
    """A raw SSE request for the user's events; the socket and the first bytes of the answer."""
    sock = socket.create_connection(("127.0.0.1", stack.api_port), timeout=10)
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return sock, sock.recv(4096)


def test_many_concurrent_clients_are_served_not_turned_away(tight):
    """200 clients at once on 4 Redis connections: they wait their turn for one, none gets a 5xx."""
    name, client = tight.add_user()
    users = [tight.add_user() for _ in range(10)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(lambda i: request(tight, "/v1/jobs", users[i % 10][1].token)[0], range(200)))
    assert codes == [200] * 200


def test_event_streams_are_capped_per_user_and_freed_when_their_client_goes(tight):
    name, client = tight.add_user()
    other, other_client = tight.add_user()
    streams = [open_stream(tight, client.token) for _ in range(3)]
    assert all(first.startswith(b"HTTP/1.1 200") for _, first in streams)
    status, headers, body = request(tight, "/v1/events", client.token)
    assert status == 429 and body["error"] == "too_many_requests" and int(headers["Retry-After"]) >= 1
    # an idle stream gets a comment line every NAP_SSE_HEARTBEAT seconds
    sock = streams[0][0]
    seen = b""
    deadline = time.monotonic() + 10
    while b": keep-alive" not in seen and time.monotonic() < deadline:
        seen += sock.recv(4096)
    assert b": keep-alive" in seen
    # another user is not affected, and answers stay quick while the streams are open
    assert request(tight, "/v1/jobs", other_client.token)[0] == 200
    for sock, _ in streams:  # the clients go away without a word
        sock.close()

    def freed() -> bool:  # all three places back (a probe's own place is given back as these were)
        again = [open_stream(tight, client.token) for _ in range(3)]
        for sock, _ in again:
            sock.close()
        return all(first.startswith(b"HTTP/1.1 200") for _, first in again)

    wait_until(freed, 20, "the closed streams' places to be given back", interval=1.5)


def test_a_bad_last_event_id_is_400_not_500(tight):
    name, client = tight.add_user()
    for bad in ("abc", "1-2-3", "-1", "9" * 30):
        status, _, body = request(tight, f"/v1/events?last_id={bad}", client.token)
        assert status == 400 and body["error"] == "bad_request", (bad, status, body)


def test_a_user_over_the_request_rate_gets_429_and_others_do_not(tight):
    name, client = tight.add_user()
    other, other_client = tight.add_user()
    codes = [request(tight, "/v1/jobs", client.token)[0] for _ in range(40)]
    assert codes[:20] == [200] * 20 and 429 in codes[20:]
    status, headers, body = request(tight, "/v1/jobs", client.token)
    assert status == 429 and body["error"] == "too_many_requests" and "Retry-After" in headers
    assert request(tight, "/v1/jobs", other_client.token)[0] == 200
    # the bucket refills at 20 a second: the user is served again once it has
    wait_until(lambda: request(tight, "/v1/jobs", client.token)[0] == 200, 10, "the user's bucket to refill")


def test_a_flood_of_bad_tokens_does_not_stall_a_good_user(tight):
    name, client = tight.add_user()

    def bad(_):
        return request(tight, "/v1/jobs", "nap_" + uuid.uuid4().hex)[0]

    def good(_):
        return request(tight, "/v1/jobs", client.token)[0]

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        floods = [pool.submit(bad, i) for i in range(300)]
        goods = list(pool.map(good, range(15)))
        assert {f.result() for f in floods} == {401}
    assert goods == [200] * 15


def test_one_users_slow_deploys_leave_workers_for_another_user(tight, file_server, tmp_path):
    """User A submits 6 deploys that each take about 3 s; at most 2 of A's run at once, so user B's
    deploy, submitted after them, runs on a free worker thread and ends before A's last ones start."""
    a, a_client = tight.add_user()
    b, b_client = tight.add_user()
    src = write_app(tmp_path / "src", {"profile": "command: sleep 1000\n", "blob": "x" * 60_000})
    url = publish(file_server, src, "tgz")
    slow = url.replace(file_server.url, file_server.url + "/slow") + "?seconds=3"
    a_jobs = [a_client.post("/v1/apps", {"app": f"slow{i}", "url": slow})["job"] for i in range(6)]

    def a_running() -> int:
        return sum(a_client.get(f"/v1/jobs/{j}")["state"] == "running" for j in a_jobs)

    wait_until(lambda: a_running() == 2, 30, "two of A's deploys to run", interval=0.5)  # all A's cap allows
    b_job = b_client.post("/v1/apps", {"app": "quick", "url": url})["job"]
    b_rec = ended(b_client, b_job)
    a_recs = [ended(a_client, j) for j in a_jobs]
    assert b_rec["state"] == "succeeded" and {r["state"] for r in a_recs} == {"succeeded"}
    starts = sorted(r["started"] for r in a_recs)
    assert b_rec["finished"] < starts[2]  # A's third started only when one of its first two ended ...
    for r in a_recs:  # ... and never more than 2 of A's ran at once
        running = [o for o in a_recs if o["started"] <= r["started"] < o["finished"]]
        assert len(running) <= 2, [(o["started"], o["finished"]) for o in a_recs]
