"""The instance sandbox (``engines.local.sandbox``), with the real bubblewrap and unshare, as root:
what a tenant's process can and cannot reach. Skipped where either is missing or not root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

from nap_orch.engines import seccomp
from nap_orch.engines.cgroups import Hierarchy, Limits
from nap_orch.engines.sandbox import Sandbox
from tests.support.apps import SYSCALL_ATTACKS, SYSCALL_PROBE_PY

TENANT = 31337

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("unshare"),
    reason="needs root, bubblewrap and unshare",
)


@pytest.fixture
def home(tmp_path):
    """A NAP_HOME with the platform's secret, another tenant's folder and this tenant's instance folder."""
    home = tmp_path / "nap"
    (home / "apps" / "bob" / "bob_x_1").mkdir(parents=True)
    (home / "apps" / "bob" / "bob_x_1" / "secret").write_text("bob's")
    (home / "admin.token").write_text("nap_admin_secret")
    (home / "admin.token").chmod(0o600)
    mine = home / "apps" / "alice" / "alice_web_1"
    mine.mkdir(parents=True)
    os.chown(mine.parent, TENANT, TENANT)
    os.chown(mine, TENANT, TENANT)
    (home / "apps" / "bob").chmod(0o700)
    # The tenant must be able to pass through the folders above its own (pytest makes them 0700):
    # traverse-only, as NAP_HOME and NAP_HOME/apps are meant to be.
    for folder in [home / "apps", home, *home.parents]:
        if str(folder) in ("/", "/tmp"):
            break
        folder.chmod(folder.stat().st_mode & 0o777 | 0o711)
    return home


def run(sandbox: Sandbox, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(sandbox.argv(["/bin/sh", "-c", script]), capture_output=True, text=True, timeout=30)


def test_the_sandboxed_process_is_the_tenant_on_the_host_without_privileges(home):
    mine = str(home / "apps" / "alice" / "alice_web_1")
    box = Sandbox(TENANT, TENANT, mine, hidden=(str(home),))
    proc = subprocess.Popen(box.argv(["/bin/sleep", "30"]))
    try:
        deadline = time.monotonic() + 10
        found: dict[str, str] = {}
        while time.monotonic() < deadline and not found:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        if open(f"/proc/{pid}/cmdline", "rb").read() == b"/bin/sleep\x0030\x00":
                            lines = open(f"/proc/{pid}/status").read().splitlines()
                            found = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
                    except OSError:
                        continue
            time.sleep(0.05)
        assert found["Uid"].split() == [str(TENANT)] * 4  # on the host, not only inside a namespace
        assert found["Gid"].split() == [str(TENANT)] * 4
        assert found["Groups"].split() == []  # none of root's supplementary groups
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert found[caps] == "0000000000000000", caps
        assert found["NoNewPrivs"] == "1"
    finally:
        proc.kill()
        proc.wait(10)


def test_only_the_instance_folder_and_a_private_tmp_are_writable_and_nap_home_is_hidden(home):
    mine = home / "apps" / "alice" / "alice_web_1"
    box = Sandbox(TENANT, TENANT, str(mine), hidden=(str(home),))
    out = run(
        box,
        f"""
        pwd
        echo hi > here && echo wrote-here
        echo x > /tmp/t && echo wrote-tmp
        cat {home}/admin.token 2>/dev/null || echo no-token
        ls {home}/apps/bob 2>/dev/null || echo no-bob
        touch /etc/x 2>/dev/null || echo ro-etc
        touch {home}/x 2>/dev/null || echo ro-home
        cat /etc/shadow 2>/dev/null || echo no-shadow
        kill -0 1 && echo pid1-is-mine
        cat /proc/{os.getpid()}/environ >/dev/null 2>&1 || echo no-host-environ
    """,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(mine)
    expected = {
        "wrote-here",
        "wrote-tmp",
        "no-token",
        "no-bob",
        "ro-etc",
        "ro-home",
        "no-shadow",
        "pid1-is-mine",
        "no-host-environ",
    }  # pid 1 is the sandbox's own: its PID namespace hides the host's processes
    assert expected <= set(lines), out.stdout
    assert (mine / "here").read_text() == "hi\n"
    assert (mine / "here").stat().st_uid == TENANT
    assert not (home / "x").exists() and not os.path.exists("/etc/x")


def test_block_fd_holds_the_sandbox_until_released(home):
    mine = home / "apps" / "alice" / "alice_web_1"
    box = Sandbox(TENANT, TENANT, str(mine))
    read, write = os.pipe()
    proc = subprocess.Popen(box.argv(["/bin/sh", "-c", "echo started > mark"], block_fd=read), pass_fds=(read,))
    os.close(read)
    try:
        time.sleep(0.5)
        assert not (mine / "mark").exists()  # still held
        os.write(write, b"1")
        assert proc.wait(20) == 0
        assert (mine / "mark").read_text() == "started\n"
    finally:
        os.close(write)
        if proc.poll() is None:
            proc.kill()


def test_a_sandbox_never_runs_as_root():
    with pytest.raises(ValueError, match="never as root"):
        Sandbox(0, 0, "/tmp").argv(["/bin/true"])


def test_a_blocked_sandbox_joined_as_a_tree_runs_wholly_in_its_group(home):
    hierarchy = Hierarchy.detect("test-" + uuid.uuid4().hex[:8])
    if hierarchy is None:
        pytest.skip("no writable cgroup hierarchy here")
    group = hierarchy.group("alice_web_common@1").create(Limits(tasks=64))
    mine = home / "apps" / "alice" / "alice_web_1"
    read, write = os.pipe()
    script = "setsid sleep 300 & (sh -c 'sleep 300 & exit 0') & echo up > mark; exec sleep 300"
    proc = subprocess.Popen(
        Sandbox(TENANT, TENANT, str(mine)).argv(["/bin/sh", "-c", script], block_fd=read), pass_fds=(read,)
    )
    os.close(read)
    try:
        time.sleep(0.3)  # bubblewrap has cloned its (blocked) sandbox by now, outside the group
        group.join_tree(proc.pid)
        os.write(write, b"1")
        # unshare+bwrap, bwrap's pid 1, sh (now sleep), and the two escapers, all in the group
        deadline = time.monotonic() + 20
        while not ((mine / "mark").exists() and len(group.pids()) >= 5) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = group.pids()
        assert len(pids) >= 5, pids
        assert proc.pid in pids
        assert group.kill() and not group.pids()
        assert proc.wait(10) != 0
    finally:
        os.close(write)
        if proc.poll() is None:
            proc.kill()
        group.remove()
        for base in hierarchy.bases:
            base.rmdir()


def test_the_seccomp_filter_denies_what_the_sandbox_alone_lets_a_tenant_do(home, tmp_path):
    mine = home / "apps" / "alice" / "alice_web_1"
    (mine / "probe.py").write_text(SYSCALL_PROBE_PY)
    filter_file = tmp_path / "seccomp.bpf"
    seccomp.write(filter_file)
    box = Sandbox(TENANT, TENANT, str(mine), hidden=(str(home),))
    found = {}
    for name, filtered in (("bare", False), ("filtered", True)):
        fd = os.open(filter_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            argv = box.argv(["/usr/bin/python3", "probe.py"], seccomp_fd=fd if filtered else None)
            proc = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=60)
        finally:
            os.close(fd)
        assert "syscall-probe-done" in proc.stdout, proc.stdout + proc.stderr
        found[name] = dict(re.findall(r"syscall (\w+): (\w+)", proc.stdout))
    # without the filter a tenant has a keyring, perf events and its terminal's input; unprivileged
    # user namespaces are off (--disable-userns) and mounts need privileges it hasn't
    assert found["bare"]["keyctl"] == found["bare"]["tiocsti"] == "allowed", found
    assert found["bare"]["perf_event_open"] in ("allowed", "ENOENT", "ENODEV"), found  # no PMU in some VMs
    assert found["bare"]["unshare_user"] == "ENOSPC" and found["bare"]["mount"] == "EPERM", found
    assert found["filtered"] == dict.fromkeys(SYSCALL_ATTACKS, "EPERM"), found
