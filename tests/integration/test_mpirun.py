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


def test_master_runs_the_program_on_the_hosts_its_slaves_registered(run_dir):
    slaves = [
        subprocess.Popen(rank_argv("slave", "--hosts", "2", "--index", str(i)), env=env(), cwd=run_dir) for i in (1, 2)
    ]
    try:
        launch = json.dumps(["/bin/sh", "-c", 'echo "launched $0 $*" > launched', "launcher"])
        out = subprocess.run(
            rank_argv("master", "--hosts", "2", "--", "prog", "a b"),
            env=env(NAP_MPI_LAUNCH=launch),
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert (run_dir / "hostfile").read_text() == "127.0.0.1 slots=3\n"
        # under a cluster's launcher each rank runs the program, then writes its exit code
        assert (run_dir / "launched").read_text() == f"launched launcher /bin/sh -c {rank.RANK_SH} rank prog a b\n"
        record = json.loads((run_dir / ".nap-mpi" / "run.json").read_text())
        assert (record["state"], record["ranks"], record["exit_code"]) == ("succeeded", 3, 0)
        for proc in slaves:  # the run ended: they leave
            assert proc.wait(20) == 0
    finally:
        for proc in slaves:
            proc.kill()
            proc.wait()


def test_master_ends_a_launcher_that_outlives_every_rank(run_dir):
    """srun has been seen to miss the end of a het step whose ranks had all ended: the master ends it."""
    slave = subprocess.Popen(rank_argv("slave", "--hosts", "1", "--index", "1"), env=env(), cwd=run_dir)
    try:
        # a launcher that runs both ranks (the second one fails), then hangs
        launch = json.dumps(["/bin/sh", "-c", '"$@"; "$1" "$2" "$3" "$4" /bin/false; exec sleep 1000', "launcher"])
        out = subprocess.run(
            rank_argv("master", "--hosts", "1", "--", "/bin/true"),
            env=env(NAP_MPI_LAUNCH=launch),
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "every rank ended 10 s ago but the launcher did not: ending it" in out.stdout, out.stdout
        assert out.returncode == 1  # the failed rank's code
        assert sorted(rank.rank_codes(run_dir / ".nap-mpi")) == [0, 1]
        assert json.loads((run_dir / ".nap-mpi" / "run.json").read_text())["state"] == "failed"
        assert slave.wait(20) == 0
    finally:
        slave.kill()
        slave.wait()
