"""What the nap command prints, without a server."""

from __future__ import annotations

import pytest

from nap_orch.cli.client import request_target
from nap_orch.cli.main import instance_row, parser


def row(state: str, exit_code: int | None, port: dict | None = None) -> dict:
    return {"name": "alice_web_common@3", "state": state, "exit_code": exit_code, "restarts": 0, "port": port}


def test_a_running_instance_shows_no_stale_exit_code():
    # stopped (143), then started again: its last exit code is history
    assert instance_row(row("running", 143, {"host": "127.0.0.1", "port": 20002})) == (
        "alice_web_common@3\trunning\trestarts=0\t127.0.0.1:20002"
    )
    assert instance_row(row("starting", 1)) == "alice_web_common@3\tstarting\trestarts=0"


def test_an_ended_instance_shows_how_it_ended():
    assert instance_row(row("stopped", 143)) == "alice_web_common@3\tstopped(143)\trestarts=0"
    assert instance_row(row("oom", 137)) == "alice_web_common@3\toom(137)\trestarts=0"
    assert instance_row(row("exited", None)) == "alice_web_common@3\texited\trestarts=0"


@pytest.mark.parametrize("count", ["0", "-3", "two", "1.5"])
def test_count_must_be_a_whole_number_of_at_least_one(count, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["start_common", "web", "--count", count])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --count: must be" in err and "at least 1" in err


def test_count_given_or_left_to_the_profile():
    assert parser().parse_args(["start_common", "web", "a=1", "--count", "3"]).count == 3
    assert parser().parse_args(["start_common", "web", "a=1"]).count is None


def test_request_targets_quote_names_and_keep_written_queries():
    assert request_target("/v1/instances/a b/port") == "/v1/instances/a%20b/port"
    assert request_target("/v1/instances/x@1?/port") == "/v1/instances/x@1?/port"
    assert request_target("/v1/apps/a#b") == "/v1/apps/a%23b"
    # a query written into the path stays a query (CI caught this one)
    assert request_target("/v1/events?follow=0") == "/v1/events?follow=0"
    assert request_target("/v1/events?follow=0", {"app": "web"}) == "/v1/events?follow=0&app=web"
    assert request_target("/v1/jobs", {"state": "failed", "app": None}) == "/v1/jobs?state=failed"
    assert request_target("/v1/jobs", {"app": None}) == "/v1/jobs"
