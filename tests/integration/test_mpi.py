"""start_mpi: real OpenMPI runs of a master and N slaves on the local engine."""

from __future__ import annotations

import time

import pytest

from nap_orch.cli.client import ApiError
from tests.support.flows import etcd_prefix, launch, mpi_app, run_cli, wait_master

SUM_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    int rank, size, total = 0;
    char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    printf("rank %d of %d on %s got [%s]\n", rank, size, host, argc > 1 ? argv[1] : "");
    fflush(stdout);
    if (argc > 2 && atoi(argv[2]) == rank) { fprintf(stderr, "rank %d crashing\n", rank); abort(); }
    MPI_Reduce(&rank, &total, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) printf("sum=%d\n", total);
    MPI_Finalize();
    return 0;
}
"""

HELLO_PY = """import sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
print(f"py rank {comm.rank} of {comm.size} got [{sys.argv[1]}]", flush=True)
total = comm.reduce(comm.rank, op=MPI.SUM, root=0)
if comm.rank == 0:
    print(f"pysum={total}", flush=True)
"""


def journal(client, name: str) -> str:
    return "\n".join(client.lines(f"/v1/instances/{name}/journal", lines=500))


def slaves_gone(client, app: str, run: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [
            r
            for r in client.get(f"/v1/apps/{app}/instances")["instances"]
            if r["kind"] == "mpi_slave" and r["instance"].startswith(f"{run}-")
        ]
        if all(r["state"] in ("exited", "failed", "stopped") for r in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"slaves of run {run} still running: {rows}")


def test_c_program_sums_ranks_and_parameter_reaches_every_rank(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    files = {"mpi.xml": "from: sum.c\nto: sum\nhosts: 3\nargs: {label}\n", "sum.c": SUM_C}
    assert mpi_app(engine_stack, client, file_server, tmp_path, "sum", files)["state"] == "succeeded"
    assert client.get("/v1/apps/sum/parameters")["parameters"] == ["label"]
    job = launch(engine_stack, client, "sum", {"label": "x y $z"})
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["master"] == f"{name}_sum_mpi_master@{res['run']}"
    assert res["slaves"] == [f"{name}_sum_mpi_slave@{res['run']}-{i}" for i in (1, 2, 3)]
    assert any("mpicc" in e["data"].get("line", "") for e in client.events(f"/v1/jobs/{job['id']}/events"))
    done = wait_master(client, "sum", res["run"])
    assert done["master"]["state"] == "exited" and done["master"]["exit_code"] == 0, done
    out = journal(client, res["master"])
    assert "sum=6" in out
    assert out.count("got [x y $z]") == 4
    rows = slaves_gone(client, "sum", res["run"])
    assert len(rows) == 3
    assert etcd_prefix(engine_stack, f"/services/mpi/{name}/sum/{res['run']}/") == {}
    assert "hosts: 3" in client.get(f"/v1/instances/{res['master']}/profile")["text"]


def test_mpi4py_program_and_two_runs_at_once(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    files = {"mpi.xml": "command: python3 hello.py {word}\nhosts: 3\n", "hello.py": HELLO_PY}
    assert mpi_app(engine_stack, client, file_server, tmp_path, "py", files)["state"] == "succeeded"
    a = client.post("/v1/apps/py/mpi", {"params": {"word": "first"}})["job"]
    b = client.post("/v1/apps/py/mpi", {"params": {"word": "second"}})["job"]
    ja, jb = engine_stack.wait_job(client, a, 120), engine_stack.wait_job(client, b, 120)
    assert ja["state"] == jb["state"] == "succeeded", (ja, jb)
    runs = {ja["result"]["run"], jb["result"]["run"]}
    assert len(runs) == 2
    for job, word in ((ja, "first"), (jb, "second")):
        run = job["result"]["run"]
        done = wait_master(client, "py", run)
        assert done["master"]["exit_code"] == 0, done
        out = journal(client, job["result"]["master"])
        assert "pysum=6" in out and out.count(f"got [{word}]") == 4
        assert "got [first]" not in out if word == "second" else "got [second]" not in out


def test_rank_crash_fails_the_run_and_leaves_no_slave(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    files = {"mpi.xml": "from: sum.c\nto: sum\nhosts: 2\nargs: hello {crash_rank}\n", "sum.c": SUM_C}
    assert mpi_app(engine_stack, client, file_server, tmp_path, "boom", files)["state"] == "succeeded"
    job = launch(engine_stack, client, "boom", {"crash_rank": "2"})
    assert job["state"] == "succeeded", job
    done = wait_master(client, "boom", job["result"]["run"])
    assert done["master"]["state"] == "failed" and done["master"]["exit_code"] != 0, done
    assert "rank 2 crashing" in journal(client, job["result"]["master"])
    slaves_gone(client, "boom", job["result"]["run"])


def test_stop_master_stops_the_whole_run(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    files = {"mpi.xml": "command: sleep {secs}\nhosts: 2\n"}
    assert mpi_app(engine_stack, client, file_server, tmp_path, "long", files)["state"] == "succeeded"
    job = launch(engine_stack, client, "long", {"secs": "1000"})
    assert job["state"] == "succeeded", job
    client.post(f"/v1/instances/{job['result']['master']}/stop")
    rows = slaves_gone(client, "long", job["result"]["run"])
    assert len(rows) == 2
    assert client.get(f"/v1/instances/{job['result']['master']}")["state"] == "stopped"


def test_wait_shows_a_compile_errors_output_once(stack, file_server, tmp_path):
    """`--wait` streams the compiler's lines as the job's log; the state line, the rollback line and the
    final error give only the error's first line (the output was shown four times)."""
    name, client = stack.add_user()
    files = {"mpi.xml": "from: bad.c\nto: bad\nhosts: 1\n", "bad.c": "int main( { this is not C }\n"}
    assert mpi_app(stack, client, file_server, tmp_path, "bad", files)["state"] == "succeeded"
    out = run_cli(stack, client.token, "start_mpi", f"{name}_bad", "--wait")
    assert out.returncode == 1, out.stderr
    text = out.stdout + out.stderr
    compiler = [line for line in text.splitlines() if "bad.c:1" in line]
    assert compiler and all(line.strip().startswith("mpicc: ") for line in compiler), text
    assert "compile error (mpicc exited with 1" in out.stderr and "details are in the log above" in out.stderr


def test_compile_error_fails_the_job_with_the_compilers_message(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    files = {"mpi.xml": "from: bad.c\nto: bad\nhosts: 1\n", "bad.c": "int main( { this is not C }\n"}
    assert mpi_app(engine_stack, client, file_server, tmp_path, "bad", files)["state"] == "succeeded"
    job = launch(engine_stack, client, "bad", {})
    assert job["state"] == "failed" and "compile error" in job["error"] and "bad.c" in job["error"], job
    assert not list((engine_stack.home / "apps" / name).glob(f"{name}_bad_*"))
    assert client.get("/v1/apps/bad/instances")["count"] == 0


@pytest.mark.parametrize(
    "xml, where, message",
    [
        ("from: a.c\nto: a\n", "deploy", "hosts"),
        ("hosts: 2\n", "deploy", "from: (a C source to build) or command:"),
        ("from: a.c\nto: a\nhosts: 0\n", "deploy", "at least 1"),
        ("from: a.c\nto: a\nhosts: 9\n", "launch", "maximum of 4"),
        ("from: missing.c\nto: a\nhosts: 1\n", "launch", "does not exist"),
        ("from: ../../etc/passwd\nto: a\nhosts: 1\n", "launch", "escapes the app folder"),
    ],
)
def test_bad_mpi_apps(stack, user, file_server, tmp_path, xml, where, message):
    name, client = user
    job = mpi_app(stack, client, file_server, tmp_path, "odd", {"mpi.xml": xml, "a.c": SUM_C})
    if where == "deploy":
        assert job["state"] == "failed" and message in job["error"], job
        return
    assert job["state"] == "succeeded", job
    job = launch(stack, client, "odd", {})
    assert job["state"] == "failed" and message in job["error"], job
    assert client.get("/v1/apps/odd/instances")["count"] == 0


def test_start_mpi_of_a_common_app_is_refused(stack, user, file_server, tmp_path):
    _, client = user
    mpi_app(stack, client, file_server, tmp_path, "plain", {"profile": "command: sleep 1\n"})
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/plain/mpi", {"params": {}})
    assert e.value.status == 400


def test_missing_mpicc_is_reported(tmp_path_factory, redis_server, etcd_server, file_server, tmp_path):
    from tests.support.stack import NapStack

    s = NapStack(
        tmp_path_factory.mktemp("nompicc"),
        redis_server.url,
        etcd_server.endpoint,
        extra_env={"NAP_MPICC": "/nonexistent/mpicc"},
    ).start()
    try:
        _, client = s.add_user()
        mpi_app(
            s, client, file_server, tmp_path, "sum", {"mpi.xml": "from: sum.c\nto: sum\nhosts: 1\n", "sum.c": SUM_C}
        )
        job = launch(s, client, "sum", {})
        assert job["state"] == "failed" and "mpicc" in job["error"] and "not installed" in job["error"], job
    finally:
        s.stop()
