"""Tenant isolation at runtime, attacked from real tenant instances on the local engine.

Each attack runs from an ordinary app of an ordinary user. On the sandboxed stack (the default) every
attack must fail; on a stack with ``NAP_SANDBOX=off`` the same probe shows the attack working, which
proves the probe can tell.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

import pytest

from nap_orch.cli.client import ApiError
from tests.support.apps import SYSCALL_ATTACKS, SYSCALL_PROBE
from tests.support.fixtures import LIMITS
from tests.support.flows import deployed, start, wait_instance, wait_until
from tests.support.stack import NapStack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("unshare"),
    reason="the sandbox needs root, bubblewrap and unshare",
)

# What a hostile tenant tries, one line each: "probe <name>: WORKED|refused".
PROBE_SH = r"""#!/bin/sh
home="$1"; agent="$2"; victim_pid="$3"; victim_dir="$4"; token="$5"; redis="$6"; etcd="$7"
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "probe $name: WORKED"; else echo "probe $name: refused"; fi; }
echo "probe uid $(id -u) gid $(id -g) groups $(id -G)"
try admin_token cat "$home/admin.token"
try agent_environ grep -q NAP_ "/proc/$agent/environ"
try agent_socket python3 -c "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])" "$home/agent.sock"
try other_tenant_read ls "$victim_dir"
try other_tenant_write touch "$victim_dir/planted"
try other_tenant_code ls "$home/services"
try signal_other_tenant kill -0 "$victim_pid"
try write_nap_home touch "$home/planted"
try write_system touch "/etc/planted-$token"
try redis_keys python3 -c "
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
s.sendall(b'KEYS *\r\n')
sys.exit(0 if s.recv(64)[:1] == b'*' else 1)" "$redis"
try etcd_keys python3 -c "
import json, sys, urllib.request
req = urllib.request.Request('http://127.0.0.1:%s/v3/kv/range' % sys.argv[1], data=b'{\"key\": \"Lw==\", \"range_end\": \"AA==\"}')
sys.exit(0 if 'error' not in json.load(urllib.request.urlopen(req, timeout=5)) else 1)" "$etcd"
echo "$token" > "/tmp/planted-$token" 2>/dev/null
echo "$token" > "planted-here"
echo probe-done
exec sleep 100000
"""
PROBE = {
    "profile": "command: sh probe.sh {home} {agent} {pid} {dir} {token} {redis} {etcd}\n",
    "probe.sh": PROBE_SH,
}
VICTIM = {"profile": "command: sleep 100000\n"}
ATTACKS = [
    "admin_token",
    "agent_environ",
    "agent_socket",
    "other_tenant_read",
    "other_tenant_write",
    "other_tenant_code",
    "signal_other_tenant",
    "write_nap_home",
    "redis_keys",
    "etcd_keys",
]


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory, redis_server, etcd_server):
    """The same stack with NAP_SANDBOX=off (development only): where the attacks work."""
    s = NapStack(
        tmp_path_factory.mktemp("nap-open"),
        redis_server.url,
        etcd_server.endpoint,
        extra_env={**LIMITS, "NAP_SANDBOX": "off"},
    )
    s.start()
    yield s
    s.stop()


def journal_text(client, name: str) -> str:
    return "\n".join(client.lines(f"/v1/instances/{name}/journal", lines=1000))


def wait_journal(client, name: str, pattern: str, timeout: float = 30.0) -> str:
    found: list[str] = []

    def check() -> bool:
        text = journal_text(client, name)
        found[:] = [text]
        return re.search(pattern, text) is not None

    try:
        wait_until(check, timeout, f"{pattern!r} in the journal of {name}")
    except AssertionError:
        raise AssertionError(f"{pattern!r} never in the journal of {name}:\n{found[0] if found else ''}") from None
    return found[0]


def plant_admin_token(stack: NapStack) -> None:
    """The admin token where and as ``nap up`` keeps it: the attacks' target."""
    (stack.home / "admin.token").write_text("nap_admin_secret\n")
    (stack.home / "admin.token").chmod(0o600)


def probe(stack: NapStack, file_server, tmp_path) -> tuple[dict[str, str], str, str]:
    """Start a victim (one tenant) and the probe (another); the probe's findings, its journal, its
    instance name."""
    plant_admin_token(stack)
    _, bob = stack.add_user()
    deployed(stack, bob, file_server, tmp_path, VICTIM, "victim")
    victim = start(stack, bob, "victim", {})["result"]["instances"][0]
    victim_st = bob.get(f"/v1/instances/{victim['name']}")
    victim_dir = str(stack.home / "apps" / stack.users[-1] / f"{stack.users[-1]}_victim_{victim['n']}")
    _, eve = stack.add_user()
    deployed(stack, eve, file_server, tmp_path, PROBE, "probe")
    token = uuid.uuid4().hex
    params = {
        "home": str(stack.home),
        "agent": str(stack.procs["agent"].pid),
        "pid": str(victim_st["pid"]),
        "dir": victim_dir,
        "token": token,
        "redis": stack.env["NAP_REDIS_URL"].rpartition(":")[2].split("/")[0],
        "etcd": stack.env["NAP_ETCD"].rpartition(":")[2],
    }
    job = start(stack, eve, "probe", params)
    assert job["state"] == "succeeded", job
    name = job["result"]["instances"][0]["name"]
    text = wait_journal(eve, name, "probe-done")
    found = dict(re.findall(r"probe (\w+): (WORKED|refused)", text))
    found["token"] = token
    return found, text, name


def test_a_tenant_instance_reaches_nothing_of_the_platform_or_other_tenants(stack, file_server, tmp_path):
    found, text, name = probe(stack, file_server, tmp_path)
    for attack in ATTACKS:
        assert found.get(attack) == "refused", f"{attack}: {found.get(attack)}\n{text}"
    assert found["write_system"] == "refused"
    # it runs as its tenant's own uid and gid, in the range, with no other group
    uid, gid, groups = map(int, re.search(r"probe uid (\d+) gid (\d+) groups (\d+)", text).groups())
    assert uid == gid == groups and 200000 <= uid <= 299999
    # its /tmp is its own; its folder is the one place it wrote, and it owns it
    token = found["token"]
    assert not os.path.exists(f"/tmp/planted-{token}")
    folder = stack.home / "apps" / stack.users[-1] / name.replace("_common@", "_")
    assert (folder / "planted-here").read_text().strip() == token
    assert (folder / "planted-here").stat().st_uid == uid and folder.stat().st_uid == uid
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    assert not (stack.home / "planted").exists()


def test_two_tenants_run_as_two_uids(stack, file_server, tmp_path):
    uids = []
    for _ in range(2):
        _, client = stack.add_user()
        deployed(
            stack, client, file_server, tmp_path, {"profile": "command: sh -c 'id -u; exec sleep 100000'\n"}, "who"
        )
        name = start(stack, client, "who", {})["result"]["instances"][0]["name"]
        uids.append(int(re.search(r"stdout\[\d+\]: (\d+)", wait_journal(client, name, r"stdout\[\d+\]: \d+"))[1]))
    assert uids[0] != uids[1] and all(u >= 200000 for u in uids)


@pytest.mark.parametrize("engine", ["local", pytest.param("slurm", marks=pytest.mark.slurm_engine)])
def test_system_calls_a_service_never_needs_fail_with_eperm(engine, request, file_server, tmp_path):
    """unshare, mount, the keyring, perf events, bpf, TIOCSTI: the seccomp filter's EPERM (without it,
    the sandbox alone lets a tenant use a keyring, perf events and TIOCSTI: test_sandbox.py shows it)."""
    s = request.getfixturevalue({"local": "stack", "slurm": "slurm_stack"}[engine])
    user, client = s.add_user()
    try:
        deployed(s, client, file_server, tmp_path, SYSCALL_PROBE, "sys")
        job = start(s, client, "sys", {})
        assert job["state"] == "succeeded", job.get("error")
        name = job["result"]["instances"][0]["name"]
        text = wait_journal(client, name, "syscall-probe-done", timeout=90)
        found = dict(re.findall(r"syscall (\w+): (\w+)", text))
        assert found == dict.fromkeys(SYSCALL_ATTACKS, "EPERM"), text
    finally:
        s.remove_instances([user])


def test_without_the_sandbox_the_same_attacks_work(open_stack, file_server, tmp_path):
    found, text, _ = probe(open_stack, file_server, tmp_path)
    for attack in ("admin_token", "agent_environ", "agent_socket", "other_tenant_read", "signal_other_tenant"):
        assert found.get(attack) == "WORKED", f"{attack}: {found.get(attack)}\n{text}"
    assert "NAP_SANDBOX=off" in open_stack.log("agent")  # and the agent said so, loudly


def host_processes(marker: str) -> list[int]:
    """Processes on this host whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


ESCAPER = {
    "profile": "command: sh escape.sh {mark}\n",
    "escape.sh": 'setsid sleep "$1" &\n(sh -c "sleep $1 & exit 0") &\necho escaped\nexec sleep 100000\n',
}


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "off"])
def test_stop_ends_every_process_of_the_instance(sandboxed, request, file_server, tmp_path):
    s = request.getfixturevalue("stack" if sandboxed else "open_stack")
    _, client = s.add_user()
    deployed(s, client, file_server, tmp_path, ESCAPER, "escape")
    mark = str(900000 + int(uuid.uuid4().int % 99999))  # sleep's argument: finds its processes
    name = start(s, client, "escape", {"mark": mark})["result"]["instances"][0]["name"]
    wait_journal(client, name, "escaped")
    wait_until(lambda: len(host_processes(f"sleep\0{mark}")) == 2, 10, "both escapers")
    client.post(f"/v1/instances/{name}/stop", {})
    wait_instance(client, name, lambda st: st["state"] == "stopped")
    try:
        if sandboxed:
            wait_until(lambda: not host_processes(f"sleep\0{mark}"), 10, "no escaper left")
        else:
            assert host_processes(f"sleep\0{mark}")  # setsid escaped killpg: the old hole
    finally:
        for pid in host_processes(f"sleep\0{mark}"):
            os.kill(pid, 9)


HOG = """import subprocess, sys
kids = [subprocess.Popen([sys.executable, "-c", '''
import sys, time
block = bytearray(80 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
print("holding 80 MiB", flush=True)
time.sleep(100000)
''']) for _ in range(3)]
for k in kids:
    k.wait()
"""


def test_memory_max_holds_for_the_whole_process_tree(stack, file_server, tmp_path):
    _, client = stack.add_user()
    deployed(
        stack,
        client,
        file_server,
        tmp_path,
        {"profile": "command: python3 hog.py\nmemory: 120m\n", "hog.py": HOG},
        "hog",
    )
    resp = client.post("/v1/apps/hog/instances", {"params": {}})
    stack.wait_job(client, resp["job"], 120)
    name = client.get("/v1/apps/hog/instances")["instances"][0]["name"]
    text = wait_journal(client, name, r"killed for memory", timeout=60)
    assert text.count("holding 80 MiB") < 3 or re.search(r"holding 80 MiB(.|\n)*killed for memory", text)
    # given up after its restarts, the state says why
    st = wait_instance(client, name, lambda st: st["state"] in ("oom", "failed"), timeout=90)
    assert st["state"] == "oom", st


FORKER = """import os, time
n = 0
try:
    for _ in range(2000):
        if os.fork() == 0:
            time.sleep(100000)
            os._exit(0)
        n += 1
except OSError as e:
    print("forks refused after", n, flush=True)
else:
    print("forked all", n, flush=True)
time.sleep(100000)
"""


def test_tasks_max_bounds_a_fork_bomb(stack, file_server, tmp_path):
    _, client = stack.add_user()
    deployed(
        stack, client, file_server, tmp_path, {"profile": "command: python3 forker.py\n", "forker.py": FORKER}, "forker"
    )
    name = start(stack, client, "forker", {})["result"]["instances"][0]["name"]
    text = wait_journal(client, name, r"forks refused after \d+|forked all", timeout=60)
    n = int(re.search(r"forks refused after (\d+)", text)[1])
    assert 0 < n < 512  # TasksMax=512 counts the program itself too
    client.post(f"/v1/instances/{name}/stop", {})
    st = wait_instance(client, name, lambda st: st["state"] == "stopped", timeout=30)
    assert st["pid"] is None


@pytest.mark.parametrize("memory", ["99999999t", "0m", "2000t"])
def test_a_memory_limit_no_cgroup_can_hold_is_refused_at_submit(stack, file_server, tmp_path, memory):
    _, client = stack.add_user()
    # a deploy checks the profile too: put the bad value in after it, as an app deployed earlier would have
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 100\n"}, "big")
    services = stack.home / "services" / stack.users[-1]
    profile = next(services.glob("*_big")) / "profile"
    profile.write_text(f"command: sleep 100\nmemory: {memory}\n")
    with pytest.raises(ApiError) as err:
        client.post("/v1/apps/big/instances", {"params": {}})
    assert err.value.status == 400 and "out of range" in err.value.body["message"]
    assert client.get("/v1/apps/big/instances")["count"] == 0


def test_an_mpi_build_reads_nothing_the_tenant_could_not(stack, file_server, tmp_path):
    plant_admin_token(stack)
    _, client = stack.add_user()
    source = f'#include "/etc/shadow"\n#include "{stack.home}/admin.token"\nint main(void) {{ return 0; }}\n'
    files = {"mpi.xml": "from: leak.c\nto: leak\nhosts: 1\n", "leak.c": source}
    deployed(stack, client, file_server, tmp_path, files, "leak")
    resp = client.post("/v1/apps/leak/mpi", {"params": {}})
    job = stack.wait_job(client, resp["job"], 120)
    assert job["state"] == "failed" and "compile error" in job["error"], job
    said = job["error"] + "\n".join(
        e["data"].get("line", "") for e in client.events(f"/v1/jobs/{job['id']}/events") if e.get("data")
    )
    assert "Permission denied" in said
    assert "root:" not in said and "nap_admin_secret" not in said


SLURM_PROBE = {
    "profile": "command: sh probe.sh {home} {mark}\n",
    "probe.sh": r"""#!/bin/sh
home="$1"; mark="$2"
echo "probe uid $(id -u) gid $(id -g)"
if cat "$home/admin.token" >/dev/null 2>&1; then echo "probe admin_token: WORKED"; else echo "probe admin_token: refused"; fi
if ls "$home/slurm" >/dev/null 2>&1; then echo "probe engine_files: WORKED"; else echo "probe engine_files: refused"; fi
setsid sleep "$mark" &
echo probe-done
exec sleep 100000
""",
}


@pytest.mark.slurm_engine
def test_a_slurm_task_runs_sandboxed_as_its_tenant_and_leaves_nothing_behind(slurm_stack, file_server, tmp_path):
    s = slurm_stack
    plant_admin_token(s)
    _, client = s.add_user()
    deployed(s, client, file_server, tmp_path, SLURM_PROBE, "probe")
    mark = str(800000 + int(uuid.uuid4().int % 99999))
    job = start(s, client, "probe", {"home": str(s.home), "mark": mark})
    assert job["state"] == "succeeded", job
    name = job["result"]["instances"][0]["name"]
    text = wait_journal(client, name, "probe-done", timeout=60)
    uid, gid = map(int, re.search(r"probe uid (\d+) gid (\d+)", text).groups())
    assert uid == gid and 200000 <= uid <= 299999
    assert "probe admin_token: refused" in text and "probe engine_files: refused" in text
    assert len(host_processes(f"sleep\0{mark}")) == 1
    client.post(f"/v1/instances/{name}/stop", {})
    wait_instance(client, name, lambda st: st["state"] == "stopped", timeout=60)
    try:
        wait_until(lambda: not host_processes(f"sleep\0{mark}"), 30, "the setsid child to go with its task")
    finally:
        for pid in host_processes(f"sleep\0{mark}"):
            os.kill(pid, 9)


MPI_PROBE = {
    "mpi.xml": "command: sh probe.sh {home} {mark}\nhosts: 2\n",
    "probe.sh": r"""#!/bin/sh
home="$1"; mark="$2"
nnp=$(sed -n 's/^NoNewPrivs:\t*//p' /proc/self/status)
if cat "$home/admin.token" >/dev/null 2>&1; then token=WORKED; else token=refused; fi
if ls "$home/slurm" >/dev/null 2>&1; then files=WORKED; else files=refused; fi
echo "probe rank $OMPI_COMM_WORLD_RANK uid $(id -u) nnp $nnp admin_token $token engine_files $files slurm ${SLURM_JOB_ID:-none}"
exec sleep "$mark"
""",
}


def cgroups_of(pid: int) -> set[str]:
    """The control groups a host process is in (every hierarchy's path)."""
    with open(f"/proc/{pid}/cgroup") as f:
        return {line.rstrip("\n").split(":", 2)[2] for line in f}


@pytest.mark.slurm_engine
def test_an_mpi_run_on_slurm_runs_every_rank_sandboxed_in_its_units_group(slurm2_stack, file_server, tmp_path):
    """Master and slaves are sandboxed as their tenant, each in its own control group, and the slaves'
    ranks run in the slaves' (started through the run's folder, not by Slurm as root)."""
    s = slurm2_stack
    plant_admin_token(s)
    _, client = s.add_user()
    deployed(s, client, file_server, tmp_path, MPI_PROBE, "mprobe")
    mark = str(700000 + int(uuid.uuid4().int % 99999))
    resp = client.post("/v1/apps/mprobe/mpi", {"params": {"home": str(s.home), "mark": mark}})
    job = s.wait_job(client, resp["job"], 120)
    assert job["state"] == "succeeded", job
    master, slaves = job["result"]["master"], job["result"]["slaves"]
    try:
        wait_until(lambda: journal_text(client, master).count("probe rank ") >= 3, 90, "three ranks' probes")
        text = journal_text(client, master)
        lines = re.findall(
            r"probe rank (\d) uid (\d+) nnp (\d) admin_token (WORKED|refused) engine_files (WORKED|refused) slurm (none|\d+)",
            text,
        )
        assert sorted(r[0] for r in lines) == ["0", "1", "2"], text
        for _, uid, nnp, token, files, slurm in lines:
            assert 200000 <= int(uid) <= 299999 and nnp == "1", text
            assert (token, files, slurm) == ("refused", "refused", "none"), text
        wait_until(lambda: len(host_processes(f"sleep\0{mark}")) == 3, 30, "the three ranks")
        pids = host_processes(f"sleep\0{mark}")
        groups = set().union(*(cgroups_of(pid) for pid in pids))
        for unit in (master, *slaves):  # one rank in each unit's group: the master's and each slave's
            assert any(g.endswith(f"/{unit}") for g in groups), (unit, groups)
        client.post(f"/v1/instances/{master}/stop", {})
        wait_until(lambda: not host_processes(f"sleep\0{mark}"), 60, "every rank to end with the run")
    finally:
        for pid in host_processes(f"sleep\0{mark}"):
            os.kill(pid, 9)


@pytest.mark.slurm_engine
def test_memory_max_holds_for_a_slurm_tasks_whole_tree(slurm_stack, file_server, tmp_path):
    s = slurm_stack
    _, client = s.add_user()
    files = {"profile": "command: python3 hog.py\nmemory: 120m\n", "hog.py": HOG}
    deployed(s, client, file_server, tmp_path, files, "hog")
    resp = client.post("/v1/apps/hog/instances", {"params": {}})
    s.wait_job(client, resp["job"], 120)
    name = client.get("/v1/apps/hog/instances")["instances"][0]["name"]
    text = wait_journal(client, name, r"killed for memory", timeout=90)
    assert text.count("holding 80 MiB") < 3 or re.search(r"holding 80 MiB(.|\n)*killed for memory", text)
    client.post(f"/v1/instances/{name}/stop", {})


def test_an_instance_the_agent_can_no_longer_sandbox_is_not_started_unsandboxed(
    tmp_path_factory, redis_server, etcd_server, file_server, tmp_path
):
    s = NapStack(tmp_path_factory.mktemp("nap-lost"), redis_server.url, etcd_server.endpoint, extra_env=LIMITS)
    s.start()
    above = s.home.parent
    try:
        user, client = s.add_user()
        deployed(s, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "z")
        name = start(s, client, "z", {})["result"]["instances"][0]["name"]
        s.kill("agent")
        for pid in s.instance_pids(f"{user}_z_"):  # it dies while the agent is down
            os.kill(pid, 9)
        above.chmod(0o700)  # now no tenant can pass through to its folder: no sandbox can be made
        s.start_agent()
        st = wait_instance(client, name, lambda st: "cannot sandbox it" in st["message"], timeout=30)
        assert "does not let other users pass through" in st["message"]
        assert s.instance_pids(f"{user}_z_") == []  # not run as the agent's own user instead
        assert "cannot sandbox instances" in s.log("agent")
    finally:
        above.chmod(0o711)
        s.stop()
