"""The nap command against the real stack: every remote operation with --json prints exactly one JSON
document on stdout holding what the operation says (errors too, as {"error", "message"} with a
non-zero exit code); log lines and progress go to stderr."""

from __future__ import annotations

import json
import time

import pytest

from nap_orch.cli.main import REMOTE, main, parser
from tests.support.apps import web_app, write_app
from tests.support.flows import publish

PARAMS = "name=n1,greeting=hi"


class Nap:
    """Runs ``nap ... --json`` in this process, as the user of ``NAP_TOKEN``; remembers which
    operations ran and the last stderr."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.ran: set[str] = set()
        self.err = ""

    def __call__(self, *argv: str, code: int = 0):
        got = main([*argv, "--json"])
        out = self.capsys.readouterr()
        self.err = out.err
        self.ran.add(parser().parse_args(list(argv)).op)
        doc = json.loads(out.out)  # exactly one document: json.loads refuses anything after it
        assert got == code, (argv, got, doc, out.err)
        if code:
            assert doc["error"] and doc["message"], doc
        return doc


@pytest.fixture
def nap(stack, user, capsys, monkeypatch):
    name, client = user
    monkeypatch.setenv("NAP_URL", stack.url)
    monkeypatch.setenv("NAP_TOKEN", client.token)
    return Nap(capsys)


def test_every_operation_prints_one_json_document(stack, user, nap, file_server, tmp_path, monkeypatch):
    name, client = user
    first, second = (f"{name}_web_common@{n}" for n in (1, 2))

    assert nap("whoami") == {"name": name, "admin": False}

    # releases: two deploys, then a rollback (no instance yet: nothing to roll, quick)
    url1 = publish(file_server, web_app(tmp_path / "v1"), "tgz")
    job = nap("deploy_app", "web", url1, "--wait")
    assert job["state"] == "succeeded" and job["result"]["release"] == "v1", job
    assert "downloading" in nap.err and f"job {job['id']}: succeeded" in nap.err
    url2 = publish(file_server, write_app(web_app(tmp_path / "v2"), {"VERSION": "2\n"}), "tgz")
    assert nap("deploy_app", f"{name}_web", url2, "--wait")["result"]["release"] == "v2"
    listing = nap("releases", "web")
    assert listing["current"] == "v2" and [r["name"] for r in listing["releases"]] == ["v2", "v1"]
    assert nap("rollback", "web", "--wait")["result"]["to"] == "v1"
    assert nap("list_services")["apps"] == [f"{name}_web"]
    assert nap("get_service_url", "web")["url"] in (url1, url2)
    assert nap("get_parameters", "web")["para_str"] == "name,greeting"
    assert nap("cat_app", "web")["text"].startswith("command: python3 server.py")

    # a launch: the final progress line counts the 2 instances (not twice as many), on stderr
    job = nap("start_common", "web", PARAMS, "--count", "2", "--wait")
    assert job["state"] == "succeeded" and job["result"]["running"] == 2, job
    assert "2/2 settled" in nap.err and "running: 2, failed: 0" in nap.err, nap.err
    launch = job["id"]
    rows = nap("list_instances", "web")["instances"]
    assert {i["name"]: i["state"] for i in rows} == {first: "running", second: "running"}
    assert nap("get_instances_num", "web")["count"] == 2
    port = nap("get_port", first)
    assert port["host"] == "127.0.0.1" and 21000 <= port["port"] <= 22999
    assert "--name n1 --greeting hi" in nap("cat_app", first)["text"]
    assert "ExecStart=" in nap("cat_unit", first)["text"]
    deadline = time.monotonic() + 60  # a first line, on a busy machine
    while not any("started with" in line for line in nap("get_journal", first, "-n", "20")["lines"]):
        assert time.monotonic() < deadline, "the journal never showed the program's first line"
        time.sleep(0.2)
    logs = nap("logs", "web")
    assert logs["app"] == "web" and any(first in line and "started with" in line for line in logs["lines"]), logs

    # one instance, then all of them
    assert nap("stop_app", first)["name"] == first
    assert nap("start_app", first)["name"] == first
    assert nap("restart_app", second)["name"] == second
    for action in ("stop", "start", "restart"):
        job = nap(f"{action}_app", "web", "--all", "--wait")
        assert job["state"] == "succeeded" and job["result"]["action"] == action, job
    scaled = nap("scale", "web", "3", "--wait")
    assert scaled["result"]["count"] == 3 and scaled["result"]["started"] == 1, scaled
    third = f"{name}_web_common@3"
    assert [r["instance"] for r in nap("remove_app", third)["removed"]] == [third]
    gone = nap("remove_app", third, code=1)
    assert gone["error"] == "not_found" and gone["removed"] == [] and gone["failed"][0]["instance"] == third

    # jobs and events
    jobs = {j["id"]: j for j in nap("jobs")["jobs"]}
    assert jobs[launch]["kind"] == "start_common" and jobs[launch]["args"]["app"] == "web"
    assert nap("jobs", "--state", "failed")["jobs"] == []
    assert nap("job", launch)["result"]["running"] == 2
    assert nap("watch", launch)["id"] == launch  # an ended job: its record
    refused = nap("cancel", launch, code=1)
    assert refused["error"] == "conflict" and "already ended" in refused["message"]
    events = nap("events", "--no-follow")["events"]
    assert {e["event"] for e in events} >= {"state", "log", "progress"}
    assert {e["data"]["job"] for e in events} >= {launch} and all(e["data"]["t"] for e in events)

    # errors of the API and of a job
    wrong = nap("start_mpi", "web", code=1)
    assert wrong["error"] == "bad_request" and "mpi.xml" in wrong["message"]
    missing = nap("get_port", f"{name}_web_common@42", code=1)
    assert missing["error"] == "not_found" and missing["status"] == 404
    failed = nap("deploy_app", "bad", f"{file_server.url}/missing.tgz", "--wait", code=1)
    assert failed["error"] == "job_failed" and "404" in failed["message"] and failed["job"]["state"] == "failed"

    # the end of the app
    assert nap("remove_app", "web", "--all", "--wait")["result"]["action"] == "remove"
    assert nap("destroy_app", "web", "--wait")["result"]["destroyed"] is True
    assert nap("list_services")["apps"] == []

    # the rest: no app needed
    assert "start_common" in nap("completion", "bash")["script"]
    monkeypatch.setenv("NAP_TOKEN", stack.admin_token)
    assert nap("whoami")["admin"] is True
    other = f"u{launch[:8]}"
    assert nap("user", "add", other)["token"].startswith("nap_")
    assert nap("user", "quota", other)["user"] == other

    assert nap.ran >= set(REMOTE), f"not run: {set(REMOTE) - nap.ran}"
