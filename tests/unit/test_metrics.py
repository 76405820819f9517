"""The metrics' own logic (``nap_orch/metrics.py``): the shared folder across processes that live and
end, the instances' gauge, the timing of a seam's calls. Processes are real ones; this process never
joins a folder (``setup``), so its own metrics stay in its memory."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from nap_orch import metrics

# A platform process in miniature: joins the folder, counts, says so, then ends or waits to be killed.
PROCESS = """
import sys, time
from pathlib import Path
from nap_orch import metrics
metrics.setup(Path(sys.argv[1]))
metrics.JOBS_SUBMITTED.labels("deploy").inc(int(sys.argv[2]))
metrics.JOB_DURATION.labels("deploy").observe(2.0)
metrics.SSE_CLIENTS.labels("user").inc()
print("counted", flush=True)
if sys.argv[3] == "wait":
    time.sleep(60)
"""


def counting(folder: Path, submitted: int, wait: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(folder), str(submitted), "wait" if wait else "end"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "counted\n"
    return proc


def scrape(folder: Path) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition(folder).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


DEPLOYS = ("nap_jobs_submitted_total", (("kind", "deploy"),))
DURATIONS = ("nap_job_duration_seconds_count", (("kind", "deploy"),))
SLOW_ONES = ("nap_job_duration_seconds_bucket", (("kind", "deploy"), ("le", "2.5")))
STREAMS = ("nap_sse_clients", (("stream", "user"),))


def test_an_ended_process_keeps_its_counts_and_leaves_no_files(tmp_path):
    folder = tmp_path / "metrics"
    killed = counting(folder, 3, wait=True)
    try:
        seen = scrape(folder)
        assert seen[DEPLOYS] == 3 and seen[DURATIONS] == 1 and seen[STREAMS] == 1
        assert any(f.suffix == ".lock" for f in folder.iterdir())  # it lives: nothing of it is swept
        assert scrape(folder)[DEPLOYS] == 3
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()

    seen = scrape(folder)  # swept: its counters and histograms in the archive, its live gauge gone
    assert seen[DEPLOYS] == 3 and seen[DURATIONS] == 1 and seen[SLOW_ONES] == 1
    assert STREAMS not in seen
    assert sorted(f.name for f in folder.iterdir()) == [".sweep", "counter_archive.db", "histogram_archive.db"]

    counting(folder, 2, wait=False).wait()  # one that ends by itself, after the archive was made
    seen = scrape(folder)
    assert seen[DEPLOYS] == 5 and seen[DURATIONS] == 2 and seen[SLOW_ONES] == 2
    assert sorted(f.name for f in folder.iterdir()) == [".sweep", "counter_archive.db", "histogram_archive.db"]


def test_processes_that_live_are_told_apart_by_id_not_pid(tmp_path):
    folder = tmp_path / "metrics"
    procs = [counting(folder, 1, wait=True) for _ in range(2)]
    try:
        locks = [f for f in folder.iterdir() if f.suffix == ".lock"]
        assert len(locks) == 2 and all("-" in f.stem for f in locks)
        assert metrics.sweep(folder) == []
        assert scrape(folder)[DEPLOYS] == 2 and scrape(folder)[STREAMS] == 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(metrics.sweep(folder)) == sorted(f.stem for f in locks)
    assert scrape(folder)[DEPLOYS] == 2


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_instances_gauge_reads_zero_for_a_state_no_instance_is_in_any_more():
    metrics.set_instances("test-engine", ["running", "running", "starting"])
    assert value("nap_instances", engine="test-engine", state="running") == 2
    assert value("nap_instances", engine="test-engine", state="starting") == 1
    metrics.set_instances("test-engine", ["running", "failed"])
    assert value("nap_instances", engine="test-engine", state="running") == 1
    assert value("nap_instances", engine="test-engine", state="starting") == 0
    assert value("nap_instances", engine="test-engine", state="failed") == 1


async def test_a_seams_calls_are_timed_by_operation_and_nothing_else_is():
    @metrics.store_calls("test-store")
    class Store:
        async def get(self, key: str) -> str:
            return key

        async def helper(self) -> None:
            pass

    before = value("nap_store_call_duration_seconds_count", store="test-store", op="get")
    assert await Store().get("k") == "k"
    await Store().helper()
    assert value("nap_store_call_duration_seconds_count", store="test-store", op="get") == before + 1
    assert value("nap_store_call_duration_seconds_count", store="test-store", op="helper") == 0
    assert Store.get.__name__ == "get"


def test_a_job_that_never_ran_counts_as_ended_without_a_duration():
    ended = value("nap_jobs_ended_total", kind="test-kind", state="cancelled")
    metrics.job_ended("test-kind", "cancelled", None, 10.0)
    metrics.job_ended("test-kind", "succeeded", 10.0, 12.5)
    assert value("nap_jobs_ended_total", kind="test-kind", state="cancelled") == ended + 1
    assert value("nap_job_duration_seconds_count", kind="test-kind") == 1
    assert value("nap_job_duration_seconds_sum", kind="test-kind") == pytest.approx(2.5)


def test_every_metric_has_labels():
    """A metric without labels would get its value when this module is imported, before ``setup``
    said where values live: it would stay in the process's memory, never reaching /metrics."""
    found = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(found) >= 9
    assert all(m._labelnames for m in found), [m._name for m in found if not m._labelnames]
