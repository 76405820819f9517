"""The processes of an MPI run (nap_orch.rank), run for real against the state store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

from nap_orch.store.etcd import EtcdStore


def mpirun_env(etcd_server, tmp_path, **extra) -> dict:
    return {**os.environ, "NAP_ETCD": etcd_server.endpoint, "NAP_HOST": "127.0.0.1", **extra}


def get(etcd_server, key: str):
    async def go():
        async with EtcdStore(etcd_server.endpoint) as s:
            return await s.get(key)

    return asyncio.run(go())


def test_master_gives_up_clearly_when_slaves_do_not_come(etcd_server, tmp_path):
    user = "u" + uuid.uuid4().hex[:8]
    env = mpirun_env(etcd_server, tmp_path, NAP_MPI_WAIT_TIMEOUT="1.5")
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nap_orch.rank",
            "master",
            "--user",
            user,
            "--app",
            "x",
            "--run",
            "1",
            "--hosts",
            "2",
            "--",
            "/bin/true",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3
    assert "only 0 of 2 slave(s) registered within 1.5 s" in out.stdout
    assert time.monotonic() - t0 < 30
    record = json.loads(get(etcd_server, f"/nap/mpi/{user}/x/1"))
    assert record["state"] == "failed" and "only 0 of 2" in record["error"]
    assert not (tmp_path / "hostfile").exists()


def test_slave_registers_with_a_lease_and_leaves_when_the_run_ends(etcd_server, tmp_path):
    user = "u" + uuid.uuid4().hex[:8]
    env = mpirun_env(etcd_server, tmp_path)

    async def put(key, value):
        async with EtcdStore(etcd_server.endpoint) as s:
            await s.put(key, value)

    asyncio.run(put(f"/nap/mpi/{user}/x/1", json.dumps({"state": "waiting"})))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nap_orch.rank",
            "slave",
            "--user",
            user,
            "--app",
            "x",
            "--run",
            "1",
            "--hosts",
            "1",
            "--index",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        key = f"/services/mpi/{user}/x/1/slave1"
        deadline = time.monotonic() + 20
        while get(etcd_server, key) is None:
            assert time.monotonic() < deadline, "the slave never registered"
            time.sleep(0.1)
        assert json.loads(get(etcd_server, key))["host"] == "127.0.0.1"
        asyncio.run(put(f"/nap/mpi/{user}/x/1", json.dumps({"state": "succeeded", "exit_code": 0})))
        assert proc.wait(20) == 0
        assert get(etcd_server, key) is None  # its lease went with it
    finally:
        proc.kill()
        proc.wait()
