"""The Slurm engine's own behaviour, on real Slurm clusters: instances are Slurm jobs, ports are
recorded under the node a job runs on, the restart policy applies to failed and lost jobs, and Slurm's
faults reach users as clear messages. (The contract tests of test_instances.py and test_mpi.py run on
the Slurm stacks too.)"""

from __future__ import annotations

import os
import re
import time

import pytest

from nap_orch.cli.client import ApiError
from tests.support.fixtures import slurm_stack_on
from tests.support.flows import deployed, etcd_prefix, launch, mpi_app, start, wait_instance, wait_master

pytestmark = pytest.mark.slurm_engine

SLEEPER = {"profile": "command: sleep 100000\nmemory: 64m\n"}
WHERE = {
    "profile": "command: sh -c 'echo \"$NAP_HOST $PORT\" > where; echo to-stdout; echo to-stderr >&2; exec sleep 100000'\n"
}


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, redis_server, etcd_server):
    """A two-node cluster of its own for the faults (nodes taken down, slurmctld stopped): clients give up
    after about 3 s, an instance gets one restart, and a node taken down stays down until it is
    resumed (with ReturnToService=2 its slurmd, still answering pings while its jobs are killed, would
    bring it back for a moment, and a restart could land on it)."""
    s = slurm_stack_on(
        tmp_path_factory,
        redis_server,
        etcd_server,
        "slurmf",
        2,
        "27000-28999",
        extra_env={"NAP_RESTART_LIMIT": "1"},
        message_timeout=3,
        return_to_service=0,
    )
    yield s
    s.stop()
    s.cluster.stop()


@pytest.fixture(autouse=True)
def remove_what_the_test_started(request):
    """Each test's instances are removed after it: the clusters are shared by the module or the session."""
    names = [n for n in ("slurm_stack", "slurm2_stack", "fault_stack") if n in request.fixturenames]
    marks = [(s, len(s.users)) for s in map(request.getfixturevalue, names)]
    yield
    for s, first in marks:
        s.remove_instances(s.users[first:])


def squeue(stack, *args: str) -> list[list[str]]:
    out = stack.cluster.run("squeue", "-h", "-r", "-t", "all", *args).stdout
    return [line.split("|") for line in out.splitlines()]


def journal(client, name: str) -> str:
    return "\n".join(client.lines(f"/v1/instances/{name}/journal", lines=1000))


def nothing_left(stack, name: str, app: str) -> None:
    """No trace of a failed launch: folders, instance numbers, ports, the engine's records and units."""
    assert not list((stack.home / "apps").glob(f"{name}/{name}_{app}_*"))
    assert etcd_prefix(stack, f"/nap/instances/{name}/{app}/") == {}
    assert etcd_prefix(stack, f"/services/port/{name}/{app}/") == {}
    assert etcd_prefix(stack, f"/nap/slurm/{stack.namespace}/desired/{name}_{app}_") == {}
    assert etcd_prefix(stack, f"/nap/slurm/{stack.namespace}/observed/{name}_{app}_") == {}
    assert not list((stack.home / "slurm" / "journal").glob(f"{name}_{app}_*"))
    assert not list((stack.home / "slurm" / "tasks").glob(f"{name}_{app}_*"))


def test_an_instance_is_a_slurm_array_task_named_after_its_unit(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    deployed(slurm_stack, client, file_server, tmp_path, SLEEPER, "arr")
    job = start(slurm_stack, client, "arr", {}, count=260)  # two batches of the launch: two sbatch
    assert job["state"] == "succeeded" and job["result"]["running"] == 260, job
    rows = squeue(slurm_stack, "-n", f"{name}_arr_common", "-o", "%F|%K|%j|%T|%N")
    assert sorted(int(r[1]) for r in rows) == list(range(1, 261))  # the task id is the instance number
    assert len({r[0] for r in rows}) == 2  # one array job per batch, not one sbatch per instance
    assert {(r[2], r[3], r[4]) for r in rows} == {(f"{name}_arr_common", "RUNNING", "n1")}
    array = next(r[0] for r in rows if r[1] == "7")
    show = slurm_stack.cluster.run("scontrol", "show", "job", f"{array}_7").stdout
    assert "MinMemoryNode=64M" in show  # memory: 64m is --mem
    st = client.get(f"/v1/instances/{name}_arr_common@7")
    assert st["state"] == "running" and st["host"] == "n1" and st["extra"]["job"] == f"{array}_7"


def test_journal_is_the_jobs_output_file_and_stop_cancels_the_job(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    deployed(slurm_stack, client, file_server, tmp_path, WHERE, "out")
    inst = start(slurm_stack, client, "out", {}, count=1)["result"]["instances"][0]["name"]
    jobid = client.get(f"/v1/instances/{inst}")["extra"]["job"]
    path = slurm_stack.home / "slurm" / "journal" / f"{inst}.out"
    show = slurm_stack.cluster.run("scontrol", "show", "job", jobid).stdout
    assert f"StdOut={path}" in show
    deadline = time.monotonic() + 10
    while "to-stderr" not in path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert journal(client, inst).splitlines() == path.read_text().splitlines()
    assert "to-stdout" in journal(client, inst) and "nap: started on n1 port" in journal(client, inst)
    pid = client.get(f"/v1/instances/{inst}")["pid"]  # the program's own process, on the node
    assert os.readlink(f"/proc/{pid}/cwd") == str(slurm_stack.home / "apps" / name / f"{name}_out_1")
    assert client.post(f"/v1/instances/{inst}/stop")["state"] == "stopped"
    assert squeue(slurm_stack, "-j", jobid, "-o", "%T") == [["CANCELLED"]]
    assert "signalled by Slurm" in path.read_text()
    assert client.get(f"/v1/instances/{inst}")["state"] == "stopped"


def test_port_is_recorded_under_the_node_the_job_runs_on(slurm2_stack, file_server, tmp_path):
    name, client = slurm2_stack.add_user()
    deployed(slurm2_stack, client, file_server, tmp_path, WHERE, "where")
    job = start(slurm2_stack, client, "where", {}, count=6)
    assert job["state"] == "succeeded" and job["result"]["running"] == 6, job
    nodes = {r[0]: r[1] for r in squeue(slurm2_stack, "-n", f"{name}_where_common", "-o", "%K|%N")}
    for inst in job["result"]["instances"]:
        port = client.get(f"/v1/instances/{inst['name']}/port")
        assert port["host"] in ("n1", "n2") and port["host"] == nodes[str(inst["n"])] == inst["host"]
        assert etcd_prefix(slurm2_stack, f"/nap/ports/{port['host']}/{port['port']}") == {
            f"/nap/ports/{port['host']}/{port['port']}": inst["name"]
        }
        where = slurm2_stack.home / "apps" / name / f"{name}_where_{inst['n']}" / "where"
        deadline = time.monotonic() + 10
        while not where.exists() or not where.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert where.read_text().split() == [port["host"], str(port["port"])]  # NAP_HOST and PORT
    # n1 and n2 are one machine here: their instances never share a port number
    assert len({i["port"] for i in job["result"]["instances"]}) == 6


def test_a_job_cancelled_behind_naps_back_is_lost_and_restarted(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    deployed(slurm_stack, client, file_server, tmp_path, SLEEPER, "lost")
    inst = start(slurm_stack, client, "lost", {}, count=1)["result"]["instances"][0]["name"]
    before = client.get(f"/v1/instances/{inst}")
    slurm_stack.cluster.run("scancel", before["extra"]["job"])
    st = wait_instance(client, inst, lambda s: s["state"] == "running" and s["restarts"] == 1, timeout=30)
    assert st["extra"]["job"] != before["extra"]["job"] and st["port"] == before["port"]
    text = journal(client, inst)
    assert f"lost: Slurm ended job {before['extra']['job']} (CANCELLED" in text and "restart 1 of 3" in text


def test_a_node_going_down_restarts_its_instance_elsewhere_then_gives_up(fault_stack, file_server, tmp_path):
    cluster = fault_stack.cluster
    name, client = fault_stack.add_user()
    deployed(fault_stack, client, file_server, tmp_path, SLEEPER, "mover")
    inst = start(fault_stack, client, "mover", {}, count=1)["result"]["instances"][0]["name"]
    first = client.get(f"/v1/instances/{inst}")["host"]
    other = "n2" if first == "n1" else "n1"
    cluster.node_down(first)
    try:
        st = wait_instance(client, inst, lambda s: s["state"] == "running" and s["host"] == other, timeout=60)
        assert st["restarts"] == 1 and st["port"]["host"] == other
        assert "NODE_FAIL" in journal(client, inst) and f"on {first}" in journal(client, inst)
    finally:
        cluster.node_up(first)
    cluster.node_down(other)  # lost again: NAP_RESTART_LIMIT=1 of this stack is used up
    try:
        st = wait_instance(client, inst, lambda s: s["state"] == "failed", timeout=60)
        assert "lost: Slurm ended job" in st["message"] and "gave up after 1 restarts" in st["message"]
    finally:
        cluster.node_up(other)


def test_slurmctld_unreachable_fails_the_launch_cleanly(fault_stack, file_server, tmp_path):
    cluster = fault_stack.cluster
    name, client = fault_stack.add_user()
    deployed(fault_stack, client, file_server, tmp_path, SLEEPER, "dark")
    running = start(fault_stack, client, "dark", {}, count=1)["result"]["instances"][0]["name"]
    cluster.stop_ctld()
    try:
        t0 = time.monotonic()
        job = client.post("/v1/apps/dark/instances", {"params": {}, "count": 3})["job"]
        rec = fault_stack.wait_job(client, job, 60)
        assert rec["state"] == "failed" and "the Slurm controller is unreachable" in rec["error"], rec
        assert time.monotonic() - t0 < 30
        assert not list((fault_stack.home / "apps").glob(f"{name}/{name}_dark_[2-9]*"))
        assert sorted(etcd_prefix(fault_stack, f"/nap/instances/{name}/dark/")) == [f"/nap/instances/{name}/dark/1"]
        with pytest.raises(ApiError) as e:  # Slurm's state is out of reach: said so, not guessed
            client.get(f"/v1/instances/{running}")
        assert e.value.status == 503 and "unreachable" in e.value.body["message"]
    finally:
        cluster.start_ctld()
    assert wait_instance(client, running, lambda s: s["state"] == "running")["restarts"] == 0  # it ran on
    assert client.get("/v1/apps/dark/instances")["count"] == 1


def test_a_job_rejected_by_slurm_fails_with_slurms_message(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    deployed(slurm_stack, client, file_server, tmp_path, {"profile": "command: sleep 100\nmemory: 100t\n"}, "huge")
    job = start(slurm_stack, client, "huge", {}, count=2)
    assert job["state"] == "failed", job
    assert "Slurm rejected the job" in job["error"] and "Memory specification can not be satisfied" in job["error"]
    nothing_left(slurm_stack, name, "huge")


WHERE_PY = """import os
from mpi4py import MPI
comm = MPI.COMM_WORLD
print(f"rank {comm.rank} of {comm.size} on {os.environ['SLURMD_NODENAME']}", flush=True)
comm.Barrier()
"""


def test_an_mpi_run_is_one_het_job_and_one_mpi_world_across_both_nodes(slurm2_stack, file_server, tmp_path):
    name, client = slurm2_stack.add_user()
    files = {"mpi.xml": "command: python3 where.py\nhosts: 3\n", "where.py": WHERE_PY}
    assert mpi_app(slurm2_stack, client, file_server, tmp_path, "span", files)["state"] == "succeeded"
    job = launch(slurm2_stack, client, "span", {})
    assert job["state"] == "succeeded", job
    run = job["result"]["run"]
    done = wait_master(client, "span", run)
    assert done["master"]["state"] == "exited" and done["master"]["exit_code"] == 0, done
    out = journal(client, job["result"]["master"])
    # mpirun merges the ranks' output as it reads it: one rank's line can run into another's
    ranks = {int(r): node for r, node in re.findall(r"rank (\d+) of 4 on (n\d)", out)}
    assert sorted(ranks) == [0, 1, 2, 3] and set(ranks.values()) == {"n1", "n2"}, out
    jobid = client.get(f"/v1/instances/{job['result']['master']}")["extra"]["job"]
    components = squeue(slurm2_stack, "-j", jobid, "-o", "%i|%N")
    assert sorted(c[0] for c in components) == [f"{jobid}+0", f"{jobid}+1"]  # master, slaves
    hosts = {r["name"]: r["host"] for r in done["rows"]}
    assert hosts[job["result"]["master"]] == ranks[0]
    assert {hosts[s] for s in job["result"]["slaves"]} == {ranks[1]}


def test_an_mpi_run_on_one_node_is_one_job_of_hosts_plus_one_tasks(slurm_stack, file_server, tmp_path):
    name, client = slurm_stack.add_user()
    files = {"mpi.xml": "command: python3 where.py\nhosts: 2\n", "where.py": WHERE_PY}
    assert mpi_app(slurm_stack, client, file_server, tmp_path, "solo", files)["state"] == "succeeded"
    job = launch(slurm_stack, client, "solo", {})
    assert job["state"] == "succeeded", job
    jobid = client.get(f"/v1/instances/{job['result']['master']}")["extra"]["job"]
    assert "NumTasks=3" in slurm_stack.cluster.run("scontrol", "show", "job", jobid).stdout
    done = wait_master(client, "solo", job["result"]["run"])
    assert done["master"]["exit_code"] == 0, done
    assert journal(client, job["result"]["master"]).count(" on n1") >= 3
