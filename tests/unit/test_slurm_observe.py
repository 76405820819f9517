"""What the Slurm engine makes of what it sees (``engines.slurm.observe``), without a cluster: records,
squeue's rows and the run files a job's script writes, in a folder of the test's own."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nap_orch.engines.base import EXITED, FAILED, RUNNING, STARTING, STOPPED
from nap_orch.engines.slurm.cli import Row
from nap_orch.engines.slurm.engine import cancel_ids
from nap_orch.engines.slurm.observe import GRACE, Action, observe, to_status
from nap_orch.engines.slurm.records import Desired, Observed, RunFiles
from nap_orch.units import Unit

NAME = "alice_web_common@3"
JOB = "12_3"
T0 = 1_000_000.0
UNIT = Unit(
    name=NAME,
    description="d",
    argv=["/bin/sleep", "1000"],
    workdir="/",
    env={},
    restart="on-failure",
    restart_limit=2,
    restart_sec=1.0,
    restart_max_delay=30.0,
)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path


def files(run_dir, **written: str) -> RunFiles:
    """The run folder with ``<job>.<what>`` files: ``files(d, exit="3 0", started="4242")``."""
    for what, text in written.items():
        (run_dir / f"{JOB}.{what}").write_text(text + "\n")
    return RunFiles(run_dir)


def desired(**kw) -> Desired:
    return Desired(
        **{
            "kind": "common",
            "jobid": JOB,
            "row": JOB,
            "jobname": "alice_web_common",
            "submitted": T0,
            "since": T0,
            **kw,
        }
    )


def row(state: str = "RUNNING", nodes: str = "n1", reason: str = "None") -> dict[str, Row]:
    return {JOB: Row(JOB, "alice_web_common", state, nodes, reason)}


def look(d, s, rows, run_files, now=T0 + 1, unit=UNIT):
    return observe(NAME, d, s, rows, run_files, lambda name: unit, now)


def test_a_job_squeue_does_not_show_yet_is_starting(run_dir):
    s, actions = look(desired(), None, {}, files(run_dir), now=T0 + GRACE - 1)
    assert (s.state, s.message, actions) == (STARTING, "submitted", [])


def test_a_pending_job_says_why(run_dir):
    s, actions = look(desired(), None, row("PENDING", "", "Resources"), files(run_dir))
    assert (s.state, s.message, actions) == (STARTING, "pending in Slurm (Resources)", [])


def test_a_running_job_without_its_port_asks_for_one_on_its_node(run_dir):
    s, actions = look(desired(), None, row(nodes="n2"), files(run_dir))
    assert actions == [Action.ASSIGN]
    assert (s.state, s.host) == (STARTING, "n2")
    assert s.message == "running on n2, waiting for its port"


def test_an_instance_runs_once_its_task_started_the_program(run_dir):
    handed = Observed(gen=1, jobid=JOB, row=JOB, submitted=T0, port=21000, port_host="n1", port_job=JOB, host="n1")
    s, actions = look(desired(), handed, row(), files(run_dir))
    assert (s.state, actions) == (STARTING, [])
    assert s.message == "port 21000 on n1 handed out, waiting for the program to start"
    s, actions = look(desired(), handed, row(), files(run_dir, started="4242"), now=T0 + 2)
    assert (s.state, s.pid, s.started_at, actions) == (RUNNING, 4242, T0 + 2, [])
    st = to_status(NAME, desired(), s)
    assert (st.state, st.pid, st.extra["port"], st.host) == (RUNNING, 4242, 21000, "n1")


def running(**kw) -> Observed:
    return Observed(
        **{
            "gen": 1,
            "jobid": JOB,
            "row": JOB,
            "submitted": T0,
            "port": 21000,
            "port_host": "n1",
            "port_job": JOB,
            "host": "n1",
            "state": RUNNING,
            "pid": 4242,
            "started_at": T0,
            **kw,
        }
    )


def test_a_clean_exit_is_exited(run_dir):
    s, actions = look(desired(), running(), {}, files(run_dir, exit="0 0"), now=T0 + 5)
    assert (s.state, s.exit_code, s.message, actions) == (EXITED, 0, "exited with code 0", [Action.ENDED])


def test_a_failure_restarts_after_its_backoff_then_gives_up(run_dir):
    s, actions = look(desired(), running(), {}, files(run_dir, exit="3 0"), now=T0 + 5)
    assert actions == [Action.ENDED]
    assert (s.state, s.exit_code, s.failures, s.next_at) == (STARTING, 3, 1, T0 + 6)
    assert s.message == "exited with code 3, restarting in 1s (restart 1 of 2)"
    # judged once: before the backoff nothing to do, after it a resubmit
    assert look(desired(), s, {}, files(run_dir), now=T0 + 5.5)[1] == []
    assert look(desired(), s, {}, files(run_dir), now=T0 + 6)[1] == [Action.RESUBMIT]
    # the restart's job failed too, quickly: the limit (2) is reached on the next one
    again = replace(s, jobid="14_3", row="14_3", failures=2, started_at=T0 + 7, ended_job="")
    (run_dir / "14_3.exit").write_text("3 0\n")
    s, actions = observe(NAME, desired(), again, {}, RunFiles(run_dir), lambda n: UNIT, T0 + 8)
    assert (s.state, actions) == (FAILED, [Action.ENDED])
    assert s.message == "exited with code 3; gave up after 2 restarts in a row"


def test_a_job_gone_without_an_exit_code_is_lost_and_restarted(run_dir):
    s, actions = look(desired(), running(), {}, files(run_dir), now=T0 + GRACE + 1)
    assert actions == [Action.ENDED]
    assert s.state == STARTING and s.exit_code is None
    assert s.message.startswith(f"lost: job {JOB} is gone from Slurm without an exit code, restarting in 1s")


def test_a_job_slurm_signalled_is_judged_once_slurm_says_how_it_ended(run_dir):
    signalled = files(run_dir, exit="143 1")
    s, actions = look(desired(), running(), row("COMPLETING"), signalled, now=T0 + 5)
    assert (s.state, s.message, actions) == (RUNNING, "ending in Slurm (COMPLETING)", [])
    s, actions = look(desired(), s, row("NODE_FAIL", "n1"), signalled, now=T0 + 6)
    assert actions == [Action.ENDED]
    assert s.message.startswith(f"lost: Slurm ended job {JOB} (NODE_FAIL on n1), restarting in 1s")


def test_a_job_slurm_cancelled_is_lost_even_if_its_script_saw_a_plain_exit(run_dir):
    # Slurm's TERM reached the program before the script's trap ran: the script recorded "143 0".
    plain = files(run_dir, exit="143 0")
    s, actions = look(desired(), running(), row("COMPLETING"), plain, now=T0 + 5)
    assert (s.state, s.message, actions) == (RUNNING, "ending in Slurm (COMPLETING)", [])
    s, actions = look(desired(), s, row("CANCELLED", "n1"), plain, now=T0 + 6)
    assert actions == [Action.ENDED]
    assert s.message.startswith(f"lost: Slurm ended job {JOB} (CANCELLED on n1), restarting in 1s")


def test_an_exit_is_judged_by_its_code_once_slurm_ends_the_job(run_dir):
    failed = files(run_dir, exit="3 0")
    s, actions = look(desired(), running(), row("RUNNING"), failed, now=T0 + 5)
    assert (s.state, actions) == (RUNNING, [])
    s, actions = look(desired(), s, row("FAILED", "n1"), failed, now=T0 + 6)
    assert actions == [Action.ENDED] and s.exit_code == 3
    assert s.message == "exited with code 3, restarting in 1s (restart 1 of 2)"


def test_an_exit_slurm_is_slow_to_confirm_is_judged_after_the_grace(run_dir):
    s, actions = look(desired(), running(), row("COMPLETING"), files(run_dir, exit="0 0"), now=T0 + 5)
    assert actions == []
    s, actions = look(desired(), s, row("COMPLETING"), files(run_dir), now=T0 + 5 + GRACE)
    assert (s.state, s.exit_code, actions) == (EXITED, 0, [Action.ENDED])


def test_a_stopped_instance_whose_job_still_runs_is_cancelled(run_dir):
    d = desired(desired=STOPPED)
    s, actions = look(d, running(), row(), files(run_dir))
    assert (s.state, s.message, actions) == (STOPPED, "stopped", [Action.CANCEL])
    assert look(d, s, {}, files(run_dir))[1] == []


def test_a_new_generation_starts_a_fresh_observation_keeping_the_port_as_a_hint(run_dir):
    old = running(exit_code=3, state=FAILED, ended_job=JOB)
    d = desired(gen=2, jobid="20_3", row="20_3")
    s, actions = look(d, old, {}, files(run_dir), now=T0 + 1)
    assert (s.gen, s.jobid, s.state, s.port, s.port_host, s.exit_code) == (2, "20_3", STARTING, 21000, "n1", None)
    assert actions == []


def test_an_mpi_slave_ends_with_its_run(run_dir):
    d = desired(kind="mpi_slave")
    s, actions = observe(
        "alice_sum_mpi_slave@1-1",
        d,
        running(),
        {},
        files(run_dir, exit="0 0"),
        lambda n: replace(UNIT, restart="no"),
        T0 + 5,
    )
    assert (s.state, s.message, actions) == (EXITED, "the run ended", [Action.ENDED])


def test_a_whole_array_is_cancelled_by_its_id_and_a_part_by_task_ids():
    rows = {f"12_{t}": Row(f"12_{t}", "a", "RUNNING", "n1", "None") for t in (1, 2, 3)}
    rows |= {f"13_{t}": Row(f"13_{t}", "a", "RUNNING", "n1", "None") for t in (1, 2)}
    rows["13_3"] = Row("13_3", "a", "COMPLETED", "n1", "None")  # ended: does not keep the array
    rows["14"] = Row("14", "mpi", "RUNNING", "n1", "None")
    rows["15+0"] = Row("15+0", "mpi", "RUNNING", "n1", "None")
    rows["15+1"] = Row("15+1", "mpi", "RUNNING", "n2", "None")
    going = {"12_1", "12_3", "13_1", "13_2", "14", "15+0", "15+1"}
    assert cancel_ids(rows, going) == ["12_1", "12_3", "13", "14", "15"]
    assert cancel_ids(rows, set()) == []
