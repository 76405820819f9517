"""The MPI master's watch on its launcher (nap_orch.rank): a launcher that outlives its ranks without
reaping them is ended, with the ranks' code. Real processes, no MPI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from nap_orch import rank

# A launcher that starts two "ranks" (one exits 5, one is killed by SIGKILL) and never reaps them,
# as Open MPI's mpirun was seen to do after a rank aborted.
STUCK = """
import os, signal, time
if os.fork() == 0:
    os._exit(5)
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
os.kill(pid, signal.SIGKILL)
time.sleep(60)
"""


def test_exit_codes_as_a_shell_says_them():
    assert rank.exit_code(0) == 0
    assert rank.exit_code(3 << 8) == 3
    assert rank.exit_code(signal.SIGKILL) == 137
    assert rank.exit_code(signal.SIGABRT) == 134


def test_unreaped_children_are_seen_only_when_every_one_has_ended():
    live = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nif os.fork() == 0: time.sleep(60)\ntime.sleep(60)"]
    )
    stuck = subprocess.Popen([sys.executable, "-c", STUCK])
    try:
        deadline = time.monotonic() + 10
        while (got := rank.unreaped(rank.children(stuck.pid))) is None or len(got) < 2:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        assert sorted(rank.exit_code(s) for s in got) == [5, 137]
        time.sleep(0.5)
        assert rank.unreaped(rank.children(live.pid)) is None  # its child runs
        assert rank.unreaped(rank.children(1 << 30)) is None  # no such process, no children
    finally:
        for p in (live, stuck):
            p.kill()
            p.wait()


def test_a_launcher_stuck_beside_its_ended_ranks_is_ended_with_their_code(monkeypatch):
    monkeypatch.setattr(rank, "LAUNCHER_GRACE", 0.5)
    stuck = subprocess.Popen([sys.executable, "-c", STUCK], start_new_session=True)
    t0 = time.monotonic()
    code = rank.wait_launcher(stuck)
    assert code in (5, 137)  # the first of the ranks' codes that is not 0
    assert stuck.poll() is not None and time.monotonic() - t0 < 30


def test_with_the_agent_each_slave_is_a_host_of_its_own_and_the_master_is_localhost():
    slaves = {"slave1": {"host": "n2", "slots": 1}, "slave2": {"host": "n2", "slots": 2}, "slave3": {"host": "n3"}}
    assert rank.hostfile("n1", slaves, agent=True) == {
        "localhost": 1,
        "nap-slave1": 1,
        "nap-slave2": 2,
        "nap-slave3": 1,
    }
    # without it (one host: the local engine), slots add up per host
    assert rank.hostfile("n1", slaves, agent=False) == {"n1": 1, "n2": 2, "n3": 1}


def test_mpirun_is_told_to_start_its_daemons_through_the_agent_only():
    opts = rank.agent_options()
    pairs = dict(zip(opts[1::3], opts[2::3]))
    assert opts[0::3] == ["--mca"] * 4
    assert pairs["plm"] == "rsh" and pairs["plm_rsh_no_tree_spawn"] == "1"
    assert pairs["oob_tcp_disable_ipv6_family"] == "1"
    assert pairs["plm_rsh_agent"].endswith(f"{rank.__file__} agent") and " " not in rank.__file__


def test_the_agent_refuses_a_host_that_is_not_a_slave(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert rank.main(["agent", "elsewhere.example", "orted", "--x"]) == 255
    assert "'elsewhere.example' is not a slave of this run" in capsys.readouterr().err
    assert not (tmp_path / rank.FOLDER).exists() or not list((tmp_path / rank.FOLDER).iterdir())
