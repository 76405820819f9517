"""Validation at the door: every bad request is answered 400 (or 413, or 404) with a JSON error when it is
submitted, through the real API, and records nothing: no job is created for it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from nap_orch.cli.client import ApiError, Client
from tests.support.apps import write_app
from tests.support.flows import deploy, publish, run_cli

COMMON = {"profile": "command: python3 run.py {a} --x={b} {port}\n", "run.py": "import time; time.sleep(100000)\n"}
MPI = {"mpi.xml": "command: python3 hello.py {word}\nhosts: 1\n", "hello.py": "print('hi')\n"}
CONTROLS = ["\x85", "\u2028", "\u2029", "\x0b", "\x1c", "\x9f"]  # NEL, the separators, C0 and C1 controls


class PatientClient(Client):
    """A client that waits out the per-user request rate (429) as a well-behaved one does: this module's
    user sends a few hundred requests in seconds."""

    def _request(self, *args, **kwargs):
        for _ in range(50):
            try:
                return super()._request(*args, **kwargs)
            except ApiError as e:
                if e.status != 429:
                    raise
                time.sleep(0.5)
        raise AssertionError("still 429 after 25 s")


@pytest.fixture(scope="module")
def tenant(stack, file_server, tmp_path_factory):
    """A user of the etcd stack with a common app ``run`` (parameters a and b) and an MPI app ``hello``
    (parameter word) deployed."""
    name, plain = stack.add_user()
    client = PatientClient(plain.url, plain.token)
    root = tmp_path_factory.mktemp("valid")
    for app, files in (("run", COMMON), ("hello", MPI)):
        job = deploy(stack, client, app, publish(file_server, write_app(root / app, files), "tgz"))
        assert job["state"] == "succeeded", job
    return name, client


def job_ids(client) -> list[str]:
    return [j["id"] for j in client.get("/v1/jobs", limit=1000)["jobs"]]


def refused(client, path: str, body, status: int = 400, *words: str) -> dict:
    """POST ``body`` (JSON, or raw bytes) to ``path``: it must answer ``status`` with a JSON error whose
    message holds ``words``, and create no job. The error's body."""
    before = job_ids(client)
    if isinstance(body, bytes):
        got_status, got = post_raw(client, path, body)
    else:
        with pytest.raises(ApiError) as e:
            client.post(path, body)
        got_status, got = e.value.status, e.value.body
    assert got_status == status, got
    assert set(got) == {"error", "message"} and isinstance(got["message"], str), got
    for w in words:
        assert w in got["message"], got
    assert job_ids(client) == before
    return got


def post_raw(client, path: str, body: bytes) -> tuple[int, dict]:
    """POST raw bytes as JSON; (status, JSON answer). A 429 is waited out."""
    for _ in range(50):
        req = urllib.request.Request(client.url + path, data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {client.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            kind, status, raw = e.headers.get_content_type(), e.code, e.read()
        if status != 429:
            break
        time.sleep(0.5)
    assert kind == "application/json", raw[:200]
    return status, json.loads(raw)


@pytest.mark.parametrize("para_str", [123, ["x", "y"], None, {"a": "x"}, True])
def test_a_para_str_that_is_not_a_string_is_400(tenant, para_str):
    _, client = tenant
    refused(client, "/v1/apps/run/instances", {"para_str": para_str}, 400, "para_str must be a string")
    refused(client, "/v1/apps/hello/mpi", {"para_str": para_str}, 400, "para_str must be a string")


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/apps", {"app": 123, "url": "https://example.org/a.tgz"}, "app must be a string"),
        ("/v1/apps", {"app": ["web"], "url": "https://example.org/a.tgz"}, "app must be a string"),
        ("/v1/apps", {"service": {"x": 1}, "url": "https://example.org/a.tgz"}, "service must be a string"),
        ("/v1/apps", {"url": "https://example.org/a.tgz"}, "missing field: app"),
        ("/v1/apps", {"app": "web", "url": 5}, "url must be a string"),
        ("/v1/apps", {"app": "web", "url": None}, "url must be a non-empty string"),
        ("/v1/apps", {"app": "web", "url": ["https://example.org/a.tgz"]}, "url must be a string"),
        ("/v1/apps/run/instances", {"params": 5}, "params must be an object"),
        ("/v1/apps/run/instances", {"params": ["x", "y"]}, "params must be an object"),
        ("/v1/apps/run/instances", {"params": None}, "params must be an object"),
        ("/v1/apps/run/instances", {"params": {"a": ["x"], "b": "1"}}, "parameter a: value must be a string"),
        ("/v1/apps/run/instances", {"params": {"a": {"k": 1}, "b": "1"}}, "parameter a: value must be a string"),
        ("/v1/apps/run/instances", {"params": {"a": None, "b": "1"}}, "parameter a: value must be a string"),
        ("/v1/apps/run/instances", {"params": {"a": True, "b": "1"}}, "parameter a: value must be a string"),
        ("/v1/apps/hello/mpi", {"params": 5}, "params must be an object"),
        ("/v1/apps/hello/mpi", {"params": {"word": [1]}}, "parameter word: value must be a string"),
        ("/v1/apps/run/instances", [], "must be a JSON object"),
        ("/v1/apps/run/instances", "a,b", "must be a JSON object"),
    ],
)
def test_wrong_types_in_a_body_are_400(tenant, path, body, words):
    _, client = tenant
    refused(client, path, body, 400, words)


@pytest.mark.parametrize("count", [0, -1, 3001, "2", 2.0, 1.5, True, [2], {"n": 2}])
def test_count_must_be_a_whole_number_in_range(tenant, count):
    _, client = tenant
    body = {"params": {"a": "1", "b": "2"}, "count": count}
    refused(client, "/v1/apps/run/instances", body, 400, "count must be a whole number from 1 to 3000")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": 5}, "name must be a string"),
        ({"name": ["bob"]}, "name must be a string"),
        ({"name": None}, "user name None is not valid"),
        ({"name": "n" * 1000}, "name is longer than 64 characters"),
        ({"name": "carol", "admin": "yes"}, "admin must be true or false"),
    ],
)
def test_users_with_wrong_types_are_400(stack, body, words):
    with pytest.raises(ApiError) as e:
        stack.client().post("/v1/users", body)
    assert e.value.status == 400 and set(e.value.body) == {"error", "message"} and words in e.value.body["message"]


def test_a_user_refused_for_a_wrong_field_is_not_created(stack):
    name = "d" + uuid.uuid4().hex[:8]
    with pytest.raises(ApiError):
        stack.client().post("/v1/users", {"name": name, "admin": 1})
    _, client = stack.add_user(name)
    assert client.get("/v1/whoami") == {"name": name, "admin": False}


@pytest.mark.parametrize("path", ["/v1/apps", "/v1/apps/run/instances", "/v1/apps/hello/mpi", "/v1/users"])
@pytest.mark.parametrize("depth", [33, 100_000])
def test_json_nested_too_deep_is_400(stack, tenant, path, depth):
    _, client = tenant
    if path == "/v1/users":
        client = stack.client()  # the admin
    body = ('{"params":' + "[" * depth + "]" * depth + "}").encode()
    refused(client, path, body, 400, "nested too deep")


@pytest.mark.parametrize("ch", CONTROLS)
def test_unicode_line_breaks_and_controls_are_refused_at_submit(tenant, ch):
    _, client = tenant
    got = refused(client, "/v1/apps/run/instances", {"params": {"a": f"x{ch}y", "b": "1"}}, 400, "parameter a")
    assert "control characters" in got["message"] and f"U+{ord(ch):04X}" in got["message"]
    refused(client, "/v1/apps/run/instances", {"params": {f"a{ch}": "x", "b": "1"}}, 400, "parameter name")
    refused(client, "/v1/apps/run/instances", {"para_str": f"x{ch},y"}, 400, "parameter a: control characters")
    refused(client, "/v1/apps/hello/mpi", {"params": {"word": f"hi{ch}"}}, 400, "parameter word: control characters")
    refused(client, "/v1/apps", {"app": "web", "url": f"https://example.org/{ch}.tgz"}, 400, "control characters")


def test_a_url_of_a_million_characters_is_400(tenant):
    _, client = tenant
    for length in (2049, 1_000_000):
        url = "https://example.org/" + "a" * (length - len("https://example.org/"))
        refused(client, "/v1/apps", {"app": "web", "url": url}, 400, "url is longer than 2048 characters")


def test_parameter_sizes_are_capped(tenant):
    _, client = tenant
    refused(
        client, "/v1/apps/run/instances", {"params": {"a": "x" * 4097, "b": "1"}}, 400, "parameter a: value is longer"
    )
    many = {f"p{i}": "1" for i in range(101)}
    refused(client, "/v1/apps/run/instances", {"params": many}, 400, "at most 100")
    refused(client, "/v1/apps/run/instances", {"params": {"n" * 10_000: "1"}}, 400, "longer than 128 characters")


def test_a_body_over_a_mebibyte_is_413_with_a_json_error(tenant):
    _, client = tenant
    body = json.dumps({"params": {"a": "x" * (2 * 1024 * 1024), "b": "1"}}).encode()
    got = refused(client, "/v1/apps/run/instances", body, 413, "larger than 1048576 bytes")
    assert got["error"] == "too_large"


def test_a_missing_parameter_is_400_at_submit(tenant):
    _, client = tenant
    refused(client, "/v1/apps/run/instances", {"params": {"a": "1"}}, 400, "missing parameter(s): b")
    refused(client, "/v1/apps/run/instances", {"params": {}}, 400, "missing parameter(s): a, b")
    refused(client, "/v1/apps/run/instances", {"params": {"a": "1", "b": "2", "c": "3"}}, 400, "unknown parameter(s) c")
    refused(client, "/v1/apps/hello/mpi", {"params": {}}, 400, "missing parameter(s): word")
    refused(client, "/v1/apps/run/instances", {"para_str": "1"}, 400, "para_str has 1 value(s) but the app takes 2")
    refused(client, "/v1/apps/ghost/instances", {"params": {"a": "1"}}, 404, "not deployed")
    refused(client, "/v1/apps/ghost/mpi", {"params": {}}, 404, "not deployed")


def test_count_zero_is_an_error_of_the_cli_and_of_the_api(stack, tenant):
    name, client = tenant
    before = job_ids(client)
    for count in ("0", "-2"):
        out = run_cli(stack, client.token, "start_common", f"{name}_run", "a=1,b=2", "--count", count)
        assert out.returncode == 2 and "argument --count: must be at least 1" in out.stderr, out.stderr
    assert job_ids(client) == before
    refused(client, "/v1/apps/run/instances", {"params": {"a": "1", "b": "2"}, "count": 0}, 400, "count must be")
