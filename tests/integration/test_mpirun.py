"""The processes of an MPI run (``nap_orch.rank``), run for real as the units run them: the host's own
Python on the file alone (standard library only), in a run folder, with no credential of the platform's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from nap_orch import rank

PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # the host's, as in the sandbox


@pytest.fixture
def run_dir(tmp_path):
    shutil.copyfile(rank.__file__, tmp_path / "rank.py")
    return tmp_path


def rank_argv(role: str, *args: str) -> list[str]:
    assert PYTHON, "no python3 in /usr/bin"
    return [PYTHON, "rank.py", role, "--run", "1", *args]


def env(**extra) -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("NAP_") and k != "PYTHONPATH"}
    return {**keep, "NAP_HOST": "127.0.0.1", **extra}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)
    return got


def test_master_gives_up_clearly_when_slaves_do_not_come(run_dir):
    t0 = time.monotonic()
    out = subprocess.run(
        rank_argv("master", "--hosts", "2", "--", "/bin/true"),
        env=env(NAP_MPI_WAIT_TIMEOUT="1.5"),
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert "only 0 of 2 slave(s) registered within 1.5 s" in out.stdout
    assert time.monotonic() - t0 < 30
    record = json.loads((run_dir / ".nap-mpi" / "run.json").read_text())
    assert record["state"] == "failed" and record["exit_code"] == 3 and "only 0 of 2" in record["error"]
    assert (run_dir / ".nap-mpi" / "ended").exists()
    assert not (run_dir / "hostfile").exists()


def test_slave_registers_in_the_run_folder_and_leaves_when_the_run_ends(run_dir):
    proc = subprocess.Popen(rank_argv("slave", "--hosts", "1", "--index", "1"), env=env(), cwd=run_dir, text=True)
    try:
        mine = run_dir / ".nap-mpi" / "slave1.json"
        wait_for(mine.exists, 20, "the slave to register")
        assert json.loads(mine.read_text())["host"] == "127.0.0.1"
        assert rank.registered(run_dir / ".nap-mpi") == {"slave1": json.loads(mine.read_text())}
        (run_dir / ".nap-mpi" / "ended").touch()
        assert proc.wait(20) == 0
        assert not mine.exists()  # its registration went with it
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_slave_leaves_its_registration_behind_it_too(run_dir):
    proc = subprocess.Popen(rank_argv("slave", "--hosts", "1", "--index", "2"), env=env(), cwd=run_dir)
    try:
        mine = run_dir / ".nap-mpi" / "slave2.json"
        wait_for(mine.exists, 20, "the slave to register")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not mine.exists()
    finally:
        proc.kill()
        proc.wait()


def test_master_runs_mpirun_on_the_hosts_its_slaves_registered(run_dir):
    slaves = [
        subprocess.Popen(rank_argv("slave", "--hosts", "2", "--index", str(i)), env=env(), cwd=run_dir) for i in (1, 2)
    ]
    try:
        (run_dir / "fake-mpirun").write_text('#!/bin/sh\necho "launched $*" > launched\n')
        (run_dir / "fake-mpirun").chmod(0o755)
        out = subprocess.run(
            rank_argv("master", "--hosts", "2", "--", "prog", "a b"),
            env=env(NAP_MPIRUN=str(run_dir / "fake-mpirun")),
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert (run_dir / "hostfile").read_text() == "127.0.0.1 slots=3\n"
        assert (run_dir / "launched").read_text() == "launched --hostfile hostfile -np 3 --oversubscribe prog a b\n"
        record = json.loads((run_dir / ".nap-mpi" / "run.json").read_text())
        assert (record["state"], record["ranks"], record["exit_code"]) == ("succeeded", 3, 0)
        for proc in slaves:  # the run ended: they leave
            assert proc.wait(20) == 0
    finally:
        for proc in slaves:
            proc.kill()
            proc.wait()


def mpi_env(**extra) -> dict:
    """Open MPI as root (these tests run as root, unsandboxed) talking TCP."""
    return env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp", **extra)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed")
def test_with_the_agent_each_slave_runs_its_ranks_started_through_the_run_folder(run_dir):
    """The cluster engines' way: mpirun starts Open MPI's daemon on each slave through the run's folder,
    and the slave's ranks are its children (they have the slave's environment, not the master's)."""
    slaves = [
        subprocess.Popen(
            rank_argv("slave", "--hosts", "2", "--index", str(i)),
            env=mpi_env(WHO=f"slave{i}"),
            cwd=run_dir,
            stdout=open(run_dir / f"slave{i}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for i in (1, 2)
    ]
    try:
        out = subprocess.run(
            rank_argv("master", "--hosts", "2", "--", "/bin/sh", "-c", 'echo "rank $OMPI_COMM_WORLD_RANK on $WHO"'),
            env=mpi_env(WHO="master", NAP_MPI_AGENT="1"),
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert (run_dir / "hostfile").read_text() == "localhost slots=1\nnap-slave1 slots=1\nnap-slave2 slots=1\n"
        ranks = sorted(line for line in out.stdout.splitlines() if line.startswith("rank "))
        assert ranks == ["rank 0 on master", "rank 1 on slave1", "rank 2 on slave2"], out.stdout + out.stderr
        for i, proc in enumerate(slaves, 1):
            assert proc.wait(60) == 0
            log = (run_dir / f"slave{i}.log").read_text()
            assert "starting Open MPI's daemon" in log and "daemon exited with code 0" in log, log
            assert json.loads((run_dir / ".nap-mpi" / f"exec{i}.exit").read_text()) == {"code": 0}
    finally:
        for proc in slaves:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed")
def test_with_the_agent_a_run_whose_daemons_never_report_back_fails_saying_so(run_dir):
    """A slave that answers the agent as a daemon that detached would (exit code 0) but runs nothing: no
    daemon ever calls mpirun back, so mpirun would wait for ever. The master ends it once
    NAP_MPI_WAIT_TIMEOUT has gone by without a rank, and the run fails saying why."""
    folder = run_dir / ".nap-mpi"
    folder.mkdir()
    (folder / "slave1.json").write_text(json.dumps({"host": "127.0.0.1", "slots": 1, "pid": os.getpid()}))
    master = subprocess.Popen(
        rank_argv("master", "--hosts", "1", "--", "/bin/echo", "a-rank-ran"),
        env=mpi_env(NAP_MPI_AGENT="1", NAP_MPI_WAIT_TIMEOUT="5"),
        cwd=run_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for((folder / "exec1.json").exists, 60, "the agent's command for slave 1")
        asked = json.loads((folder / "exec1.json").read_text())
        assert "orted" in asked["command"]
        (folder / "exec1.exit").write_text(json.dumps({"code": 0}))  # "it daemonized": nothing runs
        out, _ = master.communicate(timeout=120)
        assert master.returncode == 3, out
        assert "a-rank-ran" not in out.splitlines(), out  # no rank ran (the line is in mpirun's argv only)
        record = json.loads((folder / "run.json").read_text())
        assert record["state"] == "failed" and record["exit_code"] == 3, record
        assert "mpirun started no rank within 5 s" in record["error"], record
        assert (folder / "ended").exists()
    finally:
        master.kill()
        master.wait()


def test_a_slave_that_leaves_ends_its_daemon_and_the_agent_says_how_it_ended(run_dir):
    slave = subprocess.Popen(rank_argv("slave", "--hosts", "1", "--index", "1"), env=env(), cwd=run_dir)
    agent = None
    try:
        wait_for((run_dir / ".nap-mpi" / "slave1.json").exists, 60, "the slave to register")
        agent = subprocess.Popen(
            [PYTHON, "rank.py", "agent", "nap-slave1", "sleep 1000 & echo $! > daemon.pid; wait"],
            cwd=run_dir,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: (run_dir / "daemon.pid").exists() and (run_dir / "daemon.pid").read_text().strip(), 60, "the daemon"
        )
        daemon = int((run_dir / "daemon.pid").read_text())
        slave.send_signal(signal.SIGTERM)
        assert slave.wait(60) == 0
        assert agent.wait(60) == 143  # the daemon's code: ended by its slave's TERM
        wait_for(
            lambda: not os.path.exists(f"/proc/{daemon}") or open(f"/proc/{daemon}/stat").read().split()[2] == "Z",
            20,
            "the daemon to end",
        )
    finally:
        for proc in (slave, agent):
            if proc is not None:
                proc.kill()
                proc.wait()
