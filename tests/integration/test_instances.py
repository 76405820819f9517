"""start_common and the instance operations, through the real API, worker, agent and etcd."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from nap_orch import units
from nap_orch.cli.client import ApiError
from tests.support.apps import web_app
from tests.support.flows import (
    deploy,
    deployed,
    etcd_prefix,
    publish,
    reach,
    run_cli,
    start,
    wait_instance,
    wait_until,
)

NASTY = ["a b", "$(touch /tmp/nap-pwned)", "; rm -rf ~", "%n", '"quoted"', "back\\slash", "${PORT}", "'single'"]

ARGV_APP = {
    "profile": "command: python3 argv.py {a} --x={b} {port}\n",
    "argv.py": "import json, os, sys, time\n"
    "with open('argv.tmp', 'w') as f:\n"
    "    json.dump({'argv': sys.argv[1:], 'port': os.environ['PORT'],\n"
    "               'instance': [os.environ['NAP_INSTANCE'], os.environ['NAP_INSTANCE_NUM']]}, f)\n"
    "os.rename('argv.tmp', 'argv.json')  # whole when it appears\n"
    "print('ready', flush=True)\n"
    "time.sleep(100000)\n",
}


def test_start_common_runs_instances_with_ports(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    web = web_app(tmp_path / "web")
    assert deploy(engine_stack, client, "web", publish(file_server, web, "tgz"))["state"] == "succeeded"
    job = start(engine_stack, client, "web", {"name": "n1", "greeting": "hi"})
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["count"] == 2 and result["running"] == 2  # the profile's scale: 2
    names = [i["name"] for i in result["instances"]]
    assert names == [f"{name}_web_common@1", f"{name}_web_common@2"]
    ports = etcd_prefix(engine_stack, f"/services/port/{name}/web/")
    assert set(ports) == {f"/services/port/{name}/web/1", f"/services/port/{name}/web/2"}
    for inst in names:
        port = client.get(f"/v1/instances/{inst}/port")
        address = reach(engine_stack, port["host"])
        deadline = time.monotonic() + 10
        while True:  # the process is up; its socket may take a moment longer
            try:
                with socket.create_connection((address, port["port"]), timeout=2) as s:
                    assert s.recv(100) == f"hello from {port['port']}".encode()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert len({json.loads(v)["port"] for v in ports.values()}) == 2
    listing = client.get("/v1/apps/web/instances")
    assert [(i["name"], i["state"]) for i in listing["instances"]] == [(n, "running") for n in names]
    assert client.get(f"/v1/apps/{name}_web/instances/count")["count"] == 2
    prof = client.get(f"/v1/instances/{names[0]}/profile")["text"]
    port1 = client.get(f"/v1/instances/{names[0]}/port")["port"]
    assert f"--name n1 --greeting hi --port {port1}" in prof
    unit = client.get(f"/v1/instances/{names[0]}/unit")["text"]
    assert "ExecStart=" in unit and "${PORT}" in unit
    assert units.verify(unit, names[0] + ".service") == ""


def test_parameter_values_arrive_as_exact_single_arguments(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, ARGV_APP, "argv")
    for value in NASTY:
        job = start(engine_stack, client, "argv", {"a": value, "b": value}, count=1)
        assert job["state"] == "succeeded", job
        inst = job["result"]["instances"][0]
        folder = engine_stack.home / "apps" / name / f"{name}_argv_{inst['n']}"
        deadline = time.monotonic() + 10
        while not (folder / "argv.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        got = json.loads((folder / "argv.json").read_text())
        assert got["argv"] == [value, f"--x={value}", str(inst["port"])], value
        assert got["instance"] == [inst["name"], str(inst["n"])]  # the name, and the number {instance} is
        unit = client.get(f"/v1/instances/{inst['name']}/unit")["text"]
        assert units.verify(unit, inst["name"] + ".service") == ""
    assert not Path("/tmp/nap-pwned").exists()


@pytest.mark.parametrize("value", ["line\nbreak", "tab\there", "nul\x00", "esc\x1b[0m", "bell\x07"])
def test_control_characters_are_refused(stack, user, file_server, tmp_path, value):
    _, client = user
    deployed(stack, client, file_server, tmp_path, ARGV_APP, "ctl")
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/ctl/instances", {"params": {"a": value, "b": "x"}})
    assert e.value.status == 400 and "control characters" in e.value.body["message"]


def test_unknown_and_missing_parameters(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, ARGV_APP, "params")
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/params/instances", {"params": {"a": "1", "b": "2", "c": "3"}})
    assert e.value.status == 400 and "unknown parameter" in e.value.body["message"] and "c" in e.value.body["message"]
    with pytest.raises(ApiError) as e:  # refused at submit: no job that fails later
        client.post("/v1/apps/params/instances", {"params": {"a": "1"}})
    assert e.value.status == 400 and "missing parameter(s): b" in e.value.body["message"]
    assert not list((engine_stack.home / "apps").glob(f"{name}/{name}_params_*"))
    assert etcd_prefix(engine_stack, f"/nap/instances/{name}/params/") == {}
    # the seed's para_str: values in get_parameters' order
    job = start(engine_stack, client, "params", "x,y", count=1)
    assert job["state"] == "succeeded", job
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/params/instances", {"params": "only-one"})
    assert e.value.status == 400


def test_start_common_of_an_app_that_is_not_deployed(stack, user):
    _, client = user
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps/ghost/instances", {"params": {}})
    assert e.value.status == 404


def test_stop_start_keeps_folder_and_port(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, ARGV_APP, "toggle")
    job = start(engine_stack, client, "toggle", {"a": "1", "b": "2"}, count=1)
    inst = job["result"]["instances"][0]
    port = client.get(f"/v1/instances/{inst['name']}/port")["port"]
    stopped = client.post(f"/v1/instances/{inst['name']}/stop")
    assert stopped["state"] == "stopped"
    with pytest.raises(ApiError) as e:
        client.get(f"/v1/instances/{inst['name']}/port")
    assert e.value.status == 404
    started = client.post(f"/v1/instances/{inst['name']}/start")
    assert started["state"] in ("starting", "running")
    st = wait_instance(client, inst["name"], lambda s: s["state"] == "running")
    assert st["port"]["port"] == port
    assert client.get(f"/v1/instances/{inst['name']}/port")["port"] == port  # once running again


def test_journal_last_lines_and_follow(engine_stack, engine_user, file_server, tmp_path):
    _, client = engine_user
    app = {
        "profile": "command: python3 tick.py\n",
        "tick.py": "import sys, time\nfor i in range(100000):\n"
        "    print('tick', i, flush=True); print('err', i, file=sys.stderr, flush=True); time.sleep(0.2)\n",
    }
    deployed(engine_stack, client, file_server, tmp_path, app, "tick")
    inst = start(engine_stack, client, "tick", {}, count=1)["result"]["instances"][0]["name"]
    time.sleep(1.5)
    lines = list(client.lines(f"/v1/instances/{inst}/journal", lines=4))
    assert 1 <= len(lines) <= 4 and any(
        "tick" in line for line in lines + list(client.lines(f"/v1/instances/{inst}/journal", lines=50))
    )
    followed: list[str] = []

    def follow():
        for line in client.lines(f"/v1/instances/{inst}/journal", lines=1, follow=1):
            followed.append(line)

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(1.5)
    client.post(f"/v1/instances/{inst}/stop")
    t.join(15)
    assert not t.is_alive(), "follow did not end when the instance stopped"
    ticks = [line for line in followed if "tick" in line]
    assert len(ticks) >= 3  # lines written after the request arrived live
    assert any("err" in line for line in followed)


def test_crashing_command_backs_off_and_gives_up(engine_stack, engine_user, file_server, tmp_path):
    _, client = engine_user
    app = {"profile": "command: sh -c 'echo about to fail; exit 3'\n"}
    deployed(engine_stack, client, file_server, tmp_path, app, "crash")
    job = start(engine_stack, client, "crash", {}, count=1)
    name = f"{engine_user[0]}_crash_common@1"
    st = wait_instance(client, name, lambda s: s["state"] == "failed", timeout=60)
    assert st["exit_code"] == 3 and st["restarts"] == 3  # NAP_RESTART_LIMIT of the test stacks
    journal = "\n".join(client.lines(f"/v1/instances/{name}/journal", lines=200))
    assert journal.count("about to fail") == 4
    assert job["state"] in ("succeeded", "failed")
    listing = client.get("/v1/apps/crash/instances")["instances"]
    assert listing[0]["state"] == "failed" and listing[0]["exit_code"] == 3


def test_other_users_instances_answer_404(engine_stack, file_server, tmp_path):
    alice, a = engine_stack.add_user()
    _, b = engine_stack.add_user()
    deployed(engine_stack, a, file_server, tmp_path, ARGV_APP, "mine")
    inst = start(engine_stack, a, "mine", {"a": "1", "b": "2"}, count=1)["result"]["instances"][0]["name"]
    for method, path in (
        ("get", "port"),
        ("get", "journal"),
        ("post", "stop"),
        ("post", "start"),
        ("get", "profile"),
        ("get", "unit"),
    ):
        with pytest.raises(ApiError) as e:
            getattr(b, method)(f"/v1/instances/{inst}/{path}")
        assert e.value.status == 404, path
    for path in ("port", "journal"):
        with pytest.raises(ApiError) as e:
            a.get(f"/v1/instances/{alice}_mine_common@99/{path}")
        assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        a.get("/v1/instances/not-an-instance/port")
    assert e.value.status == 400


def test_port_range_exhausted_fails_cleanly(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "hog")
    before = len(etcd_prefix(engine_stack, "/nap/ports/"))
    job = start(
        engine_stack, client, "hog", {}, count=2500
    )  # the test stacks' ranges have 2000 ports (shared by n1 and n2)
    assert job["state"] == "failed" and "exhausted" in job["error"], job
    assert not list((engine_stack.home / "apps").glob(f"{name}/{name}_hog_*"))
    assert etcd_prefix(engine_stack, f"/nap/instances/{name}/hog/") == {}
    assert len(etcd_prefix(engine_stack, "/nap/ports/")) == before
    assert client.get("/v1/apps/hog/instances")["count"] == 0
    # numbers were released: the next launch starts at 1
    job = start(engine_stack, client, "hog", {}, count=1)
    assert job["result"]["instances"][0]["name"] == f"{name}_hog_common@1"


def test_concurrent_launches_never_share_numbers_or_ports(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "par")
    jobs = [client.post("/v1/apps/par/instances", {"params": {}, "count": 40})["job"] for _ in range(3)]
    results = [engine_stack.wait_job(client, j, 120) for j in jobs]
    assert all(r["state"] == "succeeded" for r in results), results
    insts = [i for r in results for i in r["result"]["instances"]]
    assert sorted(i["n"] for i in insts) == list(range(1, 121))
    assert len({i["port"] for i in insts}) == 120
    assert client.get("/v1/apps/par/instances/count")["count"] == 120


def test_bulk_launch_with_cli_wait_prints_summary(engine_stack, file_server, tmp_path):
    name, client = engine_stack.add_user()
    deployed(engine_stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "bulk")
    out = run_cli(engine_stack, client.token, "start_common", f"{name}_bulk", "--count", "300", "--wait", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "running: 300, failed: 0" in out.stdout
    ports = etcd_prefix(engine_stack, f"/services/port/{name}/bulk/")
    assert len(ports) == 300
    assert len({json.loads(v)["port"] for v in ports.values()}) == 300
    listing = client.get("/v1/apps/bulk/instances")
    assert listing["count"] == 300 and {i["state"] for i in listing["instances"]} == {"running"}


def test_agent_killed_instances_survive_and_are_adopted(stack, user, file_server, tmp_path):
    name, client = user
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "sturdy")
    job = start(stack, client, "sturdy", {}, count=3)
    pids = {i["name"]: client.get(f"/v1/instances/{i['name']}")["pid"] for i in job["result"]["instances"]}
    stack.kill("agent")  # SIGKILL
    for pid in pids.values():
        os.kill(pid, 0)  # still alive
    victim = next(iter(pids))
    os.kill(pids[victim], 9)  # one dies while the agent is down
    stack.start_agent()
    st = wait_instance(client, victim, lambda s: s["state"] == "running" and s["pid"] != pids[victim])
    for inst, pid in pids.items():
        if inst != victim:
            assert client.get(f"/v1/instances/{inst}")["pid"] == pid
    procs = stack.instance_pids(f"{name}_sturdy_", programs=True)
    assert len(procs) == 3  # no duplicates, none lost
    assert st["port"]["port"] == job["result"]["instances"][0]["port"]  # same unit, same port


def test_cli_takes_pairs_and_para_str(stack, file_server, tmp_path):
    name, client = stack.add_user()
    deployed(stack, client, file_server, tmp_path, ARGV_APP, "cli")
    out = run_cli(stack, client.token, "start_common", f"{name}_cli", "a=one two,b=x,y", "--count", "1", "--wait")
    assert out.returncode == 0, out.stderr
    out = run_cli(stack, client.token, "start_common", "cli", "p,q", "--wait")
    assert out.returncode == 0, out.stderr
    for n, expected in ((1, ["one two", "--x=x,y"]), (2, ["p", "--x=q"])):
        path = stack.home / "apps" / name / f"{name}_cli_{n}" / "argv.json"
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(path.read_text())["argv"][:2] == expected
    out = run_cli(stack, client.token, "list_instances", "cli")
    assert f"{name}_cli_common@1\trunning" in out.stdout and f"{name}_cli_common@2\trunning" in out.stdout
    assert run_cli(stack, client.token, "get_instances_num", "cli").stdout.strip() == "2"
    out = run_cli(stack, client.token, "get_port", f"{name}_cli_common@1")
    host, port = out.stdout.strip().split(":")
    assert host == "127.0.0.1" and 21000 <= int(port) <= 22999
    out = run_cli(stack, client.token, "cat_unit", f"{name}_cli_common@1")
    assert "ExecStart=" in out.stdout
    out = run_cli(stack, client.token, "start_common", "cli", "a=1,zzz=2")
    assert out.returncode != 0 and "unknown parameter" in out.stderr


def test_cancel_a_running_launch_rolls_it_back(engine_stack, engine_user, file_server, tmp_path):
    name, client = engine_user
    deployed(engine_stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "undo")
    job = client.post("/v1/apps/undo/instances", {"params": {}, "count": 400})["job"]  # two batches
    progress = []
    for ev in client.events(f"/v1/jobs/{job}/events"):
        if ev["event"] == "progress":
            progress.append(ev["data"])
        if ev["event"] == "log" and ev["data"]["line"].startswith("submitted 250/"):
            client.post(f"/v1/jobs/{job}/cancel")
            break
    # the true total is known before the first folders are copied (its two phases: 2 x 400)
    assert progress and (progress[0]["done"], progress[0]["total"]) == (0, 800), progress[:3]
    # A rollback on Slurm waits up to CANCEL_WAIT (20 s) once Slurm accepted the cancel (README, Faults).
    rec = engine_stack.wait_job(client, job, timeout=120)
    assert rec["state"] == "cancelled", rec
    assert client.get("/v1/apps/undo/instances")["count"] == 0
    assert not list((engine_stack.home / "apps" / name).glob(f"{name}_undo_*"))
    assert etcd_prefix(engine_stack, f"/nap/instances/{name}/undo/") == {}
    assert etcd_prefix(engine_stack, f"/services/port/{name}/undo/") == {}
    # The local agent has stopped them when the job ends; Slurm ends the last of hundreds of cancelled
    # jobs at its own pace (10-30 a second here), and the reconciler cancels again what lingers.
    wait_until(lambda: not engine_stack.instance_pids(f"{name}_undo_"), 180, "the rolled back programs to end")
    if getattr(engine_stack, "cluster", None) is not None:  # what was still ending is finished, then forgotten
        ending = f"/nap/slurm/{engine_stack.namespace}/ending/"
        wait_until(lambda: etcd_prefix(engine_stack, ending) == {}, 120, "the reconciler to finish the ending jobs")


def test_instances_keep_running_when_api_and_workers_restart(stack, user, file_server, tmp_path):
    name, client = user
    deployed(stack, client, file_server, tmp_path, {"profile": "command: sleep 100000\n"}, "calm")
    job = start(stack, client, "calm", {}, count=2)
    pids = {i["name"]: client.get(f"/v1/instances/{i['name']}")["pid"] for i in job["result"]["instances"]}
    stack.kill("api")
    stack.kill("worker")
    for pid in pids.values():
        os.kill(pid, 0)
    stack.start_worker()
    stack.start_api()
    for inst, pid in pids.items():
        st = client.get(f"/v1/instances/{inst}")
        assert st["state"] == "running" and st["pid"] == pid
