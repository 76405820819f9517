"""The live API against its own OpenAPI document: served without a token, and fuzzed by schemathesis
(every generated request answers no 5xx, and every answer matches the document's status codes,
content types and schemas)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from tests.support.apps import web_app
from tests.support.fixtures import LIMITS
from tests.support.flows import deploy, publish
from tests.support.stack import NapStack

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_serves_its_document_without_a_token(stack):
    with urllib.request.urlopen(stack.url + "/v1/openapi.json", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        doc = json.load(resp)
    validate(doc)
    assert "/v1/apps/{app}/instances" in doc["paths"]
    assert set(doc["paths"]["/v1/instances/{name}"]) == {"get", "delete"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, redis_server, etcd_server, file_server):
    """A stack of the fuzzer's own, with a user, a deployed app and one of its instances, then no
    worker: the jobs the fuzzer submits are recorded and stay queued (nothing it asks for runs)."""
    stack = NapStack(
        tmp_path_factory.mktemp("nap-fuzz"),
        redis_server.url,
        etcd_server.endpoint,
        extra_env={**LIMITS, "NAP_USER_RATE": "1000", "NAP_USER_BURST": "1000"},
    )
    stack.start()
    try:
        _, client = stack.add_user()
        src = web_app(tmp_path_factory.mktemp("fuzz-src"))
        assert deploy(stack, client, "web", publish(file_server, src, "tgz"))["state"] == "succeeded"
        job = client.post("/v1/apps/web/instances", {"params": {"name": "n1", "greeting": "hi"}, "count": 1})["job"]
        assert stack.wait_job(client, job)["state"] == "succeeded"
        stack.kill("worker")
        yield stack, client
    finally:
        stack.stop()


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(fuzzed, tmp_path):
    stack, client = fuzzed
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    report = tmp_path / "schemathesis"
    proc = subprocess.run(
        [
            st,
            "run",
            f"{stack.url}/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {client.token}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            # the whole run's budget: every phase within it, the fuzzing and stateful ones repeated to fill it
            "--max-time",
            "150",
            "--seed",
            "20261207",
            # a request may wait NAP_AGENT_WAIT (15 s) for a busy agent, then answer: well above that
            "--request-timeout",
            "60",
            # one worker: hypothesis' parsing in threads hits CPython 3.11's "AST constructor recursion
            # depth mismatch" (a runtime error of the tool, not a finding)
            "--workers",
            "1",
            "--report",
            "junit",
            "--report-dir",
            str(report),
            "--no-color",
        ],
        # streams are asked not to follow (tests/support/schemathesis_hooks.py)
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert re.search(r"\b[1-9][0-9]* passed", out), out[-3000:]
    assert stack.procs["api"].poll() is None  # the API is still up
