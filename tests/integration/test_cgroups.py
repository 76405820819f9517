"""Control groups of instances (``engines.cgroups``) on this host's real hierarchy: the limits
hold for the whole process tree, a kill leaves nothing, an OOM kill is counted. Skipped where no
usable cgroup hierarchy exists (not as root, or no memory/pids controllers)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from nap_orch.engines.cgroups import Hierarchy, Limits

MiB = 1024 * 1024


@pytest.fixture
def hierarchy():
    found = Hierarchy.detect("test-" + uuid.uuid4().hex[:8])
    if found is None:
        pytest.skip("no writable cgroup hierarchy with memory and pids here")
    yield found
    for base in found.bases:
        for d in base.iterdir() if base.is_dir() else ():
            if d.is_dir():
                d.rmdir()
        base.rmdir()


def start_joined(group, code: str) -> subprocess.Popen:
    """A Python child that runs ``code`` only once it has joined ``group`` (it waits on stdin)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdin.readline()\n{code}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    group.join(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


CHILDREN_80M = """
import os, time
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = bytearray(80 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
codes = [os.waitpid(k, 0)[1] for k in kids]
print(codes, flush=True)
"""


def test_memory_max_holds_for_the_whole_process_tree(hierarchy):
    group = hierarchy.group("mem").create(Limits(memory=120 * MiB))
    proc = start_joined(group, CHILDREN_80M)
    try:
        deadline = time.monotonic() + 20
        while group.oom_kills() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group.oom_kills() >= 1  # three children of 80 MiB can't all live under 120 MiB
    finally:
        assert group.kill()
        proc.wait(10)
        group.remove()


def test_tasks_max_bounds_the_process_count(hierarchy):
    group = hierarchy.group("pids").create(Limits(tasks=20))
    code = """
import os, time
made = failed = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except BlockingIOError:
        failed += 1
print(made, failed, flush=True)
"""
    proc = start_joined(group, code)
    try:
        out = proc.stdout.readline().split()
        made, failed = int(out[0]), int(out[1])
        assert made < 20 and failed > 0 and made + failed == 200
        assert len(group.pids()) <= 20
    finally:
        assert group.kill()
        proc.wait(10)
        group.remove()


def test_kill_ends_setsid_and_double_forked_children(hierarchy):
    group = hierarchy.group("escape").create(Limits())
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(100)
    os._exit(0)
time.sleep(100)
"""
    proc = start_joined(group, code)
    deadline = time.monotonic() + 10
    while len(group.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    escaped = [p for p in group.pids() if p != proc.pid]
    assert escaped  # the grandchild left the session, not the group
    assert group.kill()
    proc.wait(10)
    assert group.pids() == []
    for pid in escaped:
        assert not _alive(pid)
    group.remove()
    assert not group.exists


def test_limits_can_change_and_no_limits_means_none(hierarchy):
    group = hierarchy.group("change").create(Limits(memory=64 * MiB, tasks=10))
    group.create(Limits(memory=256 * MiB, tasks=None))  # raised: memsw (v1) is raised first
    group.create(Limits())
    proc = start_joined(group, "print(len(bytearray(100 * 1024 * 1024)), flush=True)")
    assert proc.stdout.readline().strip() == str(100 * MiB)
    proc.wait(10)
    assert group.oom_kills() == 0
    group.remove()


def test_group_names_are_single_folders(hierarchy):
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            hierarchy.group(bad)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False
