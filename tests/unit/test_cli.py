"""What the nap command prints, without a server: records as text, progress, what a job came to, the
command line and its JSON documents."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import socket
import time

import pytest

from nap_orch.cli.client import request_target
from nap_orch.cli.main import main, parser, version
from nap_orch.cli.text import (
    Step,
    duration,
    instance_row,
    job_row,
    job_text,
    local_time,
    progress_line,
    progress_step,
    size,
    step_text,
)
from nap_orch.cli.watch import Bar, Progress, outcome, summary_lines


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


# -- times, sizes, records as text ---------------------------------------------------------------------
@pytest.fixture
def two_hours_east(monkeypatch):
    """This process in a time zone two hours east of UTC, for the test."""
    monkeypatch.setenv("TZ", "NAP-2")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_read_in_local_time_and_durations_for_people(two_hours_east):
    assert local_time(1_767_323_045.5) == "2026-01-02 05:04:05"  # 03:04:05 UTC
    assert local_time(None) == "-"
    assert [duration(s) for s in (0.04, 9.96, 12.4, 185, 7800)] == [
        "0.0 s",
        "10 s",
        "12 s",
        "3 min 5 s",
        "2 h 10 min",
    ]
    assert [size(n) for n in (512, 3300, 43_000_000)] == ["512 B", "3.2 KiB", "41.0 MiB"]


JOB = {
    "id": "3f2a9c1d0e4b5a6c",
    "kind": "start_common",
    "user": "alice",
    "args": {"user": "alice", "app": "web", "params": {"name": "n1"}, "count": 3},
    "state": "failed",
    "created": 1_767_323_045.0,
    "started": 1_767_323_045.25,
    "finished": 1_767_323_049.45,
    "attempts": 1,
    "error": "none of the 3 instance(s) is running\nsecond line",
    "result": None,
}


def test_jobs_shows_the_app_and_local_times():
    assert job_row(JOB) == (
        f"3f2a9c1d0e4b5a6c\tstart_common\tweb\tfailed\t{local_time(JOB['created'])}\t"
        "none of the 3 instance(s) is running"
    )
    action = {**JOB, "kind": "app_action", "args": {"app": "web", "action": "stop"}, "error": None}
    assert job_row(action).split("\t")[1:4] == ["app_action(stop)", "web", "failed"]


def test_a_job_reads_as_lines_with_local_times_and_durations():
    text = job_text(JOB)
    head, _, error = text.partition("\nerror:\n")
    rows = dict(line.split(None, 1) for line in head.splitlines())
    assert rows["job"] == "3f2a9c1d0e4b5a6c" and rows["app"] == "web" and rows["state"] == "failed"
    assert rows["created"] == local_time(JOB["created"])
    assert rows["started"] == f"{local_time(JOB['started'])} (queued 0.2 s)"
    assert rows["finished"] == f"{local_time(JOB['finished'])} (took 4.2 s)"
    assert rows["args.count"] == "3" and rows["args.params"] == '{"name": "n1"}'
    assert "1767323045" not in text  # no epoch time left
    assert error == "  none of the 3 instance(s) is running\n  second line"


# -- progress ------------------------------------------------------------------------------------------
def test_a_launch_shows_each_phase_out_of_its_true_total():
    # the worker counts a launch of 300 over its two phases, out of 600
    assert progress_step({"done": 250, "total": 600, "phase": "submitted"}) == Step("submitted", 250, 300)
    assert progress_step({"done": 450, "total": 600, "phase": "running"}) == Step("settled", 150, 300)
    assert progress_step({"done": 3, "total": 8, "phase": "removed"}) == Step("removed", 3, 8)
    assert progress_step({"done": 5, "total": 20, "phase": "on v2"}) == Step("on v2", 5, 20)
    down = progress_step({"done": 3 * 1024**2, "total": 8 * 1024**2, "phase": "downloaded"})
    assert step_text(down) == "3.0 MiB/8.0 MiB downloaded"
    assert step_text(progress_step({"done": 2048, "total": 2048, "phase": "downloaded"})) == "2.0 KiB downloaded"


def test_the_progress_line_has_a_bar_the_counts_the_phase_and_the_time():
    assert progress_line(Step("submitted", 150, 300), 12.4) == f"[{'#' * 15}{'.' * 15}] 150/300 submitted  12 s"
    assert progress_line(Step("queued")) == "queued"
    assert len(progress_line(Step("submitted", 1, 3000), 1.0, width=20)) == 20


def test_the_phase_and_total_show_before_the_first_progress_event():
    p = Progress("start_common", {"app": "web", "count": 300}, total=300)
    assert step_text(p.step) == "0/300 queued"
    p.state("running")
    assert step_text(p.step) == "0/300 preparing"
    p.progress({"done": 250, "total": 600, "phase": "submitted"})
    p.state("running")  # a state event (a retry) after progress keeps the counts
    assert step_text(p.step) == "250/300 submitted"
    assert Progress("app_action", {"action": "stop"}).first_phase == "stop"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_final_progress_line_stays_on_a_terminal():
    screen = Terminal()
    p = Progress("start_common", {"count": 2}, total=2)
    bar = Bar(screen, p)
    bar.start()
    p.at(100.0)
    p.state("running")
    bar.line("  reserved instance numbers 1..2")
    p.at(101.0)
    p.progress({"done": 4, "total": 4, "phase": "running"})
    bar.draw()
    p.at(102.5)
    p.state("succeeded")
    bar.finish()
    bar.line("job j1: succeeded")
    bar.close()
    shown = screen.getvalue()
    # what a terminal shows: each \r returns to the line's start, \033[K erases the rest
    rows = [row.rsplit("\r", 1)[-1].replace("\033[K", "") for row in shown.split("\n")]
    assert rows[-3:] == [f"[{'#' * 30}] 2/2 settled  2.5 s", "job j1: succeeded", ""]
    assert "  reserved instance numbers 1..2" in rows


def test_elsewhere_only_the_final_progress_line_is_written():
    log = io.StringIO()
    p = Progress("scale", {})
    bar = Bar(log, p)
    bar.start()
    p.progress({"done": 1, "total": 2, "phase": "removed"})
    bar.draw()
    p.progress({"done": 2, "total": 2, "phase": "removed"})
    bar.finish()
    bar.close()
    assert log.getvalue() == f"[{'#' * 30}] 2/2 removed\n"


# -- what a job came to -------------------------------------------------------------------------------
def launched(*states: str) -> dict:
    return {
        "app": "web",
        "running": states.count("running"),
        "seconds": 1.5,
        "instances": [{"name": f"a_web_common@{n}", "state": s, "message": "exit 1"} for n, s in enumerate(states, 1)],
    }


def test_a_launch_with_instances_not_running_exits_non_zero():
    end = outcome({**JOB, "state": "succeeded", "error": None, "result": launched("running", "failed")})
    assert end.code == 1 and end.error == ("not_running", "1 of the 2 instance(s) launched are not running")
    assert end.lines == ["running: 1, failed: 1, seconds: 1.5"]
    assert end.notes == ["  a_web_common@2: failed: exit 1"]
    ok = outcome({**JOB, "state": "succeeded", "error": None, "result": launched("running")})
    assert (ok.code, ok.error) == (0, None)


def test_a_failed_job_points_at_the_log_for_its_details():
    end = outcome(JOB)
    assert end.code == 1
    assert end.error == (
        "job_failed",
        "job 3f2a9c1d0e4b5a6c failed: none of the 3 instance(s) is running (the details are in the log above)",
    )


def test_job_results_in_a_line():
    scale = {"app": "web", "was": 1, "count": 0, "removed": ["a_web_common@1"], "started": 0, "failed": 0}
    assert summary_lines("scale", scale) == ["web: 1 -> 0 live; removed 1, started 0, failed 0"]
    assert summary_lines("app_action", {"action": "start", "done": 2, "failed": {}}) == ["start: 2 done, 0 not"]
    rollback = {"app": "web", "from": "v2", "to": "v1", "rolled": 4}
    assert summary_lines("rollback", rollback) == ["web: v2 -> v1, 4 rolled"]


# -- the command line ----------------------------------------------------------------------------------
def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_operation_has_help():
    p = parser()
    missing = [a.dest for a in p._actions if not a.help]
    for name, sp in subparsers(p).items():
        missing += [f"{name} {a.dest}" for a in sp._actions if not a.help]
    assert missing == []


def test_operations_keep_the_seed_names_and_their_hyphen_aliases():
    names = set(subparsers(parser()))
    for seed in ("deploy_app", "list_services", "start_common", "start_mpi", "get_port", "get_journal"):
        assert {seed, seed.replace("_", "-")} <= names
    assert {"whoami", "events", "completion"} <= names


def test_version_as_text_and_as_json(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"nap {version()}\n"
    assert main(["--version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": importlib.metadata.version("nap-orch")}


def test_a_refused_command_line_is_a_json_document_with_json(capsys):
    assert main(["start_common", "web", "--count", "0", "--json"]) == 2
    got = capsys.readouterr()
    doc = json.loads(got.out)
    assert doc["error"] == "usage" and "argument --count: must be at least 1" in doc["message"]
    assert got.err == ""
    assert main(["start_common", "web", "--count", "0"]) == 2  # as text: argparse's usage and error
    got = capsys.readouterr()
    assert got.out == "" and "nap start_common: error: argument --count: must be at least 1" in got.err
    assert main(["--json", "up"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "usage"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_name_the_operations_and_their_options(shell, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "start_common" in script and "get-port" in script and "--no-follow" in script
    assert main(["completion", shell, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shell"] == shell and doc["script"].rstrip("\n") == script.rstrip("\n")


def test_an_api_out_of_reach_is_an_error_document(monkeypatch, capsys):
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("NAP_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert main(["whoami", "--json"]) == 1
        doc = json.loads(capsys.readouterr().out)
        assert doc["error"] == "unreachable" and "cannot reach the nap API" in doc["message"]
        assert main(["whoami"]) == 1
        got = capsys.readouterr()
        assert got.out == "" and got.err.startswith("error: cannot reach the nap API")
