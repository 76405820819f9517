"""Proof that the private test Slurm cluster (tests/support/slurm_cluster.py) runs what nap-orch needs.

Runs real slurmctld/slurmd/munged processes under pytest's tmp folders.  Skipped where Slurm is not
installed.  Each test is marked ``slurm``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nap_orch.engines.slurm.cli import TERMINAL  # Slurm's own states: one list
from tests.support.slurm_cluster import SlurmCluster, SlurmClusterError, slurm_available

_ok, _why = slurm_available()
if not _ok:
    pytest.skip(f"no Slurm on this machine: {_why}", allow_module_level=True)

pytestmark = pytest.mark.slurm

# Two "nodes" on one host share its hostname, so Open MPI's shared-memory (vader) segment names
# collide between them; TCP between the ranks avoids that (and the warnings it prints).
MPI_ENV = {"OMPI_MCA_btl": "self,tcp"}
ROOT_MPIRUN_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


MPI_SUM_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int rank, size, sum = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *node = getenv("SLURMD_NODENAME");
    printf("rank %d of %d on %s\n", rank, size, node ? node : "?");
    fflush(stdout);
    MPI_Reduce(&rank, &sum, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) { printf("sum %d\n", sum); fflush(stdout); }
    MPI_Finalize();
    return 0;
}
"""

MEM_HOG_PY = """
import time
b = bytearray(300 * 1024 * 1024)
for i in range(0, len(b), 4096):
    b[i] = 1
print("allocated", flush=True)
time.sleep(4)
print("survived", flush=True)
"""


# ------------------------------------------------------------------------------------ helpers
def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sbatch(c: SlurmCluster, *args: str, env: dict | None = None, cwd=None) -> str:
    out = c.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
    return out.split(";")[0]  # "<id>[;cluster]"


def states(c: SlurmCluster, jobid: str) -> list[str]:
    p = c.run("squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T", check=False)
    return p.stdout.split()


def wait_finished(c: SlurmCluster, jobid: str, timeout: float = 60) -> list[str]:
    def done():
        s = states(c, jobid)
        return (s or ["GONE"]) if all(x in TERMINAL for x in s) else None

    return wait_for(done, timeout, f"job {jobid} to finish\n{c.log_tails(10)}")


def cluster_pids(c: SlurmCluster) -> list[int]:
    """Every live process of the cluster: daemons (by marker) and job processes."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if f"NAP_TEST_SLURM_CLUSTER={c.cluster_name}".encode() in raw.split(
            b"\0"
        ) or f"SLURM_CLUSTER_NAME={c.cluster_name}".encode() in raw.split(b"\0"):
            out.append(int(entry))
    return out


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def one(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm1"), nodes=1)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mpi_sum(tmp_path_factory) -> Path:
    if shutil.which("mpicc") is None:
        pytest.skip("mpicc not installed")
    d = tmp_path_factory.mktemp("mpi")
    (d / "sum.c").write_text(MPI_SUM_C)
    subprocess.run(["mpicc", "-o", str(d / "sum"), str(d / "sum.c")], check=True)
    return d / "sum"


# -------------------------------------------------------------------------------- one node
def test_start_and_config(one):
    assert one.node_names == ["n1"]
    assert one.partition == "nap"
    assert one.conf_path.is_file()
    assert one.env["SLURM_CONF"] == str(one.conf_path)
    conf = one.conf_path.read_text()
    assert f"AuthInfo=socket={one.munge_socket}" in conf
    assert f"ClusterName={one.cluster_name}" in conf
    assert one.node_states()["n1"] in ("idle", "mix")
    assert one.startup_seconds is not None and one.startup_seconds < 30
    sinfo = one.run("sinfo", "-h", "-o", "%P %a %D").stdout.split()
    assert sinfo == ["nap*", "up", "1"]


def test_batch_job_writes_output(one, tmp_path):
    out = tmp_path / "hello.out"
    jid = sbatch(
        one,
        "-J",
        "hello",
        "-o",
        str(out),
        "--wrap",
        'echo "hello from $SLURM_JOB_NAME on $SLURMD_NODENAME"',
        cwd=tmp_path,
    )
    assert jid.isdigit()
    assert wait_finished(one, jid) in (["COMPLETED"], ["GONE"])
    assert out.read_text().strip() == "hello from hello on n1"


def test_squeue_running_then_scancel(one, tmp_path):
    pidfile = tmp_path / "pid"
    jid = sbatch(
        one,
        "-J",
        "sleeper",
        "-o",
        str(tmp_path / "out"),
        "--wrap",
        f"echo $$ > {pidfile}; exec sleep 300",
        cwd=tmp_path,
    )

    def running():
        lines = one.run("squeue", "-h", "-o", "%i %j %T %N").stdout.splitlines()
        return [ln for ln in lines if ln.split()[0] == jid and ln.split()[2] == "RUNNING"]

    (line,) = wait_for(running, 60, "the job to run")
    assert line.split() == [jid, "sleeper", "RUNNING", "n1"]
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pid file"))
    assert Path(f"/proc/{pid}").exists()

    one.run("scancel", jid)
    assert wait_finished(one, jid, 30) in (["CANCELLED"], ["GONE"])

    def gone():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(gone, 15, "the job's process to be killed")


def test_scancel_by_name(one, tmp_path):
    jid = sbatch(one, "-J", "byname", "-o", "/dev/null", "--wrap", "sleep 300", cwd=tmp_path)
    wait_for(lambda: states(one, jid) == ["RUNNING"], 60, "running")
    one.run("scancel", "-n", "byname")
    assert wait_finished(one, jid, 30) in (["CANCELLED"], ["GONE"])


def test_array_of_200_all_running(one, tmp_path):
    jid = sbatch(one, "-J", "arr", "-o", "/dev/null", "--array=0-199", "--wrap", "sleep 30", cwd=tmp_path)
    t0 = time.monotonic()

    def all_running():
        p = one.run("squeue", "-h", "-r", "-j", jid, "-t", "RUNNING", "-o", "%i")
        return len(p.stdout.split()) == 200

    try:
        wait_for(all_running, 60, "200 array tasks RUNNING", interval=0.25)
        print(f"200 array tasks running {time.monotonic() - t0:.1f}s after sbatch")
        tasks = one.run("squeue", "-h", "-r", "-j", jid, "-o", "%i").stdout.split()
        assert sorted(int(t.split("_")[1]) for t in tasks) == list(range(200))
    finally:
        one.run("scancel", jid)  # one id cancels the whole array
    wait_for(lambda: not [s for s in states(one, jid) if s not in TERMINAL], 60, "array cancelled")


def test_mem_is_accepted_but_not_enforced(one, tmp_path):
    """proctrack/linuxproc + jobacct_gather/none: --mem books memory, nothing enforces it."""
    (tmp_path / "hog.py").write_text(MEM_HOG_PY)
    out = tmp_path / "mem.out"
    jid = sbatch(one, "--mem=100M", "-o", str(out), "--wrap", f"{sys.executable} hog.py", cwd=tmp_path)
    show = one.run("scontrol", "show", "job", jid).stdout
    assert "MinMemoryNode=100M" in show
    wait_finished(one, jid)
    assert out.read_text().split() == ["allocated", "survived"]


def test_mem_too_large_is_refused(one, tmp_path):
    p = one.run("sbatch", "--mem=10T", "--wrap", "true", check=False, cwd=tmp_path)
    assert p.returncode != 0
    assert "memory" in p.stderr.lower() or "configuration" in p.stderr.lower()


def test_mem_enforced_with_enforce_memory(tmp_path):
    """enforce_memory=True (CR_Core_Memory, jobacct_gather/linux, OverMemoryKill) kills hogs."""
    (tmp_path / "hog.py").write_text(MEM_HOG_PY)
    with SlurmCluster(tmp_path / "c", nodes=1, enforce_memory=True) as c:
        out = tmp_path / "mem.out"
        jid = sbatch(c, "--mem=100M", "-o", str(out), "--wrap", f"{sys.executable} hog.py", cwd=tmp_path)
        ok = sbatch(c, "--mem=1G", "-o", str(tmp_path / "ok.out"), "--wrap", f"{sys.executable} hog.py", cwd=tmp_path)
        assert wait_finished(c, jid) in (["FAILED"], ["OUT_OF_MEMORY"], ["CANCELLED"])
        text = out.read_text()
        assert "survived" not in text
        assert "exceeded memory limit" in text
        assert wait_finished(c, ok) == ["COMPLETED"]
        assert (tmp_path / "ok.out").read_text().split() == ["allocated", "survived"]


def test_slurmrestd_ping_and_submit(one, tmp_path):
    url = one.start_restd(tcp=True)
    try:
        host, port = url.removeprefix("http://").split(":")
        headers = {**one.restd_headers(), "Content-Type": "application/json"}
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/slurm/v0.0.38/ping", headers=headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        assert body["pings"][0]["ping"] == "UP"

        out = tmp_path / "rest.out"
        job = {
            "job": {
                "name": "viarest",
                "current_working_directory": str(tmp_path),
                "standard_output": str(out),
                "environment": {"PATH": "/usr/bin:/bin"},
            },
            "script": "#!/bin/sh\necho from rest on $SLURMD_NODENAME\n",
        }
        conn.request("POST", "/slurm/v0.0.38/job/submit", body=json.dumps(job), headers=headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 and not body["errors"], body
        jid = str(body["job_id"])
        wait_finished(one, jid)
        assert out.read_text().strip() == "from rest on n1"

        # the unix-socket flavour too
        one.stop_restd()
        url = one.start_restd()
        assert url.startswith("http+unix://")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(one.restd_socket))
        conn = http.client.HTTPConnection("localhost", timeout=30)
        conn.sock = sock
        conn.request("GET", f"/slurm/v0.0.38/job/{jid}", headers=headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        assert body["jobs"][0]["name"] == "viarest"
    finally:
        one.stop_restd()


# ------------------------------------------------------------------------------- two nodes
def test_two_nodes_idle_and_separate_from_the_other_cluster(one, two, tmp_path):
    assert two.node_names == ["n1", "n2"]
    assert set(two.node_states().values()) <= {"idle", "mix"}
    assert sorted(two.node_states()) == ["n1", "n2"]
    assert one.cluster_name != two.cluster_name
    assert one.ctld_port != two.ctld_port
    jid = sbatch(two, "-J", "only-on-two", "-o", "/dev/null", "--wrap", "sleep 60", cwd=tmp_path)
    try:
        names = one.run("squeue", "-h", "-o", "%j").stdout.split()
        assert "only-on-two" not in names
        assert "only-on-two" in two.run("squeue", "-h", "-o", "%j").stdout.split()
    finally:
        two.run("scancel", jid)
    wait_finished(two, jid)


def _check_mpi_output(text: str, n: int = 4) -> None:
    lines = text.splitlines()
    assert f"sum {sum(range(n))}" in lines, text
    ranks = {}
    for ln in lines:
        if ln.startswith("rank "):
            parts = ln.split()
            ranks[int(parts[1])] = parts[-1]
            assert parts[3] == str(n)
    assert sorted(ranks) == list(range(n)), text
    assert set(ranks.values()) == {"n1", "n2"}, text


def test_heterogeneous_job_in_script(two, tmp_path):
    """Het jobs need one node per component here: the backfill scheduler (the only one that
    starts het jobs) plans each component on a different node, so on a one-node cluster a
    two-component het job stays PENDING (Resources) for ever."""
    out = tmp_path / "het.out"
    script = tmp_path / "het.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH -J het\n"
        f"#SBATCH -o {out}\n"
        "#SBATCH -n 1\n"
        "#SBATCH hetjob\n"
        "#SBATCH -n 2\n"
        'echo "het_size=$SLURM_HET_SIZE"\n'
        "srun --het-group=1 bash -c 'echo comp1 task $SLURM_PROCID' | sort\n"
    )
    jid = sbatch(two, str(script), cwd=tmp_path)
    comps = two.run("squeue", "-h", "-t", "all", "-j", jid, "-o", "%i").stdout.split()
    assert sorted(comps) == [f"{jid}+0", f"{jid}+1"]
    wait_finished(two, jid)
    assert out.read_text().splitlines() == ["het_size=2", "comp1 task 0", "comp1 task 1"]
    nodes = two.run("squeue", "-h", "-t", "all", "-j", jid, "-o", "%N").stdout.split()
    assert sorted(nodes) == ["n1", "n2"]


def test_heterogeneous_job_colon_syntax(two, tmp_path):
    out = tmp_path / "het2.out"
    jid = sbatch(
        two,
        "-J",
        "het2",
        "-o",
        str(out),
        "-n",
        "1",
        ":",
        "-n",
        "3",
        "--wrap",
        'echo "het_size=$SLURM_HET_SIZE ntasks1=$SLURM_NTASKS_HET_GROUP_1"',
        cwd=tmp_path,
    )
    wait_finished(two, jid)
    assert out.read_text().strip() == "het_size=2 ntasks1=3"


def test_mpi_srun_pmix_across_two_nodes(two, mpi_sum):
    p = two.run(
        "srun",
        "--mpi=pmix",
        "-N",
        "2",
        "-n",
        "4",
        "--ntasks-per-node=2",
        str(mpi_sum),
        env=MPI_ENV,
        timeout=120,
        cwd=mpi_sum.parent,
    )
    _check_mpi_output(p.stdout)


def test_mpi_srun_pmix_inside_sbatch_allocation(two, mpi_sum, tmp_path):
    out = tmp_path / "mpi.out"
    jid = sbatch(
        two,
        "-N",
        "2",
        "-n",
        "4",
        "--ntasks-per-node=2",
        "-o",
        str(out),
        "--wrap",
        f"srun --mpi=pmix {mpi_sum}",
        env=MPI_ENV,
        cwd=tmp_path,
    )
    assert wait_finished(two, jid, 120) in (["COMPLETED"], ["GONE"]), out.read_text()
    _check_mpi_output(out.read_text())


def test_mpirun_inside_sbatch_allocation(two, mpi_sum, tmp_path):
    out = tmp_path / "mpirun.out"
    jid = sbatch(
        two,
        "-N",
        "2",
        "-n",
        "4",
        "--ntasks-per-node=2",
        "-o",
        str(out),
        "--wrap",
        f"mpirun {mpi_sum}",
        env={**MPI_ENV, **ROOT_MPIRUN_ENV},
        cwd=tmp_path,
    )
    assert wait_finished(two, jid, 120) in (["COMPLETED"], ["GONE"]), out.read_text()
    _check_mpi_output(out.read_text())


def test_mpi4py_srun_pmix_across_two_nodes(two, tmp_path):
    pytest.importorskip("mpi4py")
    prog = tmp_path / "hello.py"
    prog.write_text(
        "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
        "s = c.reduce(c.rank, op=MPI.SUM, root=0)\n"
        "print(f'rank {c.rank} of {c.size} on {os.environ[\"SLURMD_NODENAME\"]}', flush=True)\n"
        "c.Barrier()\n"
        "if c.rank == 0: print(f'sum {s}', flush=True)\n"
    )
    p = two.run(
        "srun",
        "--mpi=pmix",
        "-N",
        "2",
        "-n",
        "4",
        "--ntasks-per-node=2",
        sys.executable,
        str(prog),
        env=MPI_ENV,
        timeout=120,
        cwd=tmp_path,
    )
    _check_mpi_output(p.stdout)


def test_node_down_and_up(two, tmp_path):
    jid = sbatch(two, "-N", "2", "-o", "/dev/null", "--wrap", "srun sleep 300", cwd=tmp_path)
    try:
        wait_for(lambda: states(two, jid) == ["RUNNING"], 60, "2-node job running")
        two.node_down("n2")
        assert two.node_states()["n2"].startswith("down")
        # the job lost a node: Slurm requeues it (batch jobs are requeueable by default)
        wait_for(lambda: states(two, jid) and states(two, jid)[0] in ("PENDING", "REQUEUED"), 30, "job requeued")
        # a one-node job still runs on n1
        one_node = sbatch(two, "-N", "1", "-o", str(tmp_path / "o"), "--wrap", "echo $SLURMD_NODENAME", cwd=tmp_path)
        wait_finished(two, one_node)
        assert (tmp_path / "o").read_text().strip() == "n1"
        two.node_up("n2")
        assert two.node_states()["n2"] in ("idle", "mix", "alloc")
    finally:
        two.run("scancel", jid, check=False)
    wait_finished(two, jid)
    two.wait_nodes_idle()


def test_ctld_unreachable_and_back(tmp_path):
    # small MessageTimeout: clients give up after about 2 s instead of 9 s
    with SlurmCluster(tmp_path / "c", nodes=1, message_timeout=3) as c:
        pidfile = tmp_path / "pid"
        jid = sbatch(c, "-o", "/dev/null", "--wrap", f"echo $$ > {pidfile}; exec sleep 300", cwd=tmp_path)
        wait_for(lambda: states(c, jid) == ["RUNNING"], 60, "running")
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pid"))
        c.stop_ctld()
        p = c.run("squeue", check=False)
        assert p.returncode != 0
        assert "Unable to contact slurm controller" in p.stderr
        p = c.run("sbatch", "--wrap", "true", check=False)
        assert p.returncode != 0 and "Unable to contact slurm controller" in p.stderr
        assert Path(f"/proc/{pid}").exists(), "jobs keep running without slurmctld"
        c.restart_ctld()
        assert states(c, jid) == ["RUNNING"]


def test_two_clusters_at_once_and_stop_leaves_nothing(tmp_path):
    a = SlurmCluster(tmp_path / "a", nodes=2)
    b = SlurmCluster(tmp_path / "b", nodes=1)
    with a, b:
        ja = sbatch(a, "-N", "2", "-o", "/dev/null", "--wrap", "srun sleep 300", cwd=tmp_path)
        jb = sbatch(b, "-o", "/dev/null", "--array=0-9", "--wrap", "sleep 300", cwd=tmp_path)
        wait_for(lambda: states(a, ja) == ["RUNNING"], 60, "a's job running")
        wait_for(lambda: states(b, jb).count("RUNNING") == 10, 60, "b's jobs running")
        assert cluster_pids(a) and cluster_pids(b)
        a.stop()
        assert cluster_pids(a) == []
        # b is untouched
        assert b.node_states() == {"n1": "mix"}
        assert states(b, jb).count("RUNNING") == 10
    assert cluster_pids(b) == []
    # stop() twice is harmless
    a.stop()


def test_start_failure_raises_with_log_tails(tmp_path):
    c = SlurmCluster(tmp_path / "bad", nodes=1, extra_conf="NoSuchOption=1", start_timeout=10)
    with pytest.raises(SlurmClusterError) as err:
        c.start()
    assert "slurmctld" in str(err.value)
    assert cluster_pids(c) == []
