"""What the integration tests do over and over through the real stack: deploy an app, start instances
or an MPI run, wait for a job or an instance, read the state store, run the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import redis

from nap_orch.cli.client import ApiError
from nap_orch.store.etcd import EtcdStore

from .apps import tar_gz, write_app, zip_dir


def etcd_get(stack, key: str):
    async def go():
        async with EtcdStore(stack.env["NAP_ETCD"]) as s:
            return await s.get(key)

    return asyncio.run(go())


def publish(file_server, src: Path, fmt: str) -> str:
    """Pack ``src`` as ``fmt`` under the file server's root; its URL."""
    name = f"{uuid.uuid4().hex[:8]}.{fmt}"
    dest = file_server.root / name
    if fmt in ("tar.gz", "tgz"):
        tar_gz(src, dest)
    elif fmt == "tar":
        with tarfile.open(dest, "w") as tf:
            tf.add(src, arcname="app")
    elif fmt == "zip":
        zip_dir(src, dest)
    return f"{file_server.url}/{name}"


def deploy(stack, client, app: str, url: str) -> dict:
    job = client.post("/v1/apps", {"app": app, "url": url})
    assert job["state"] == "queued"
    return stack.wait_job(client, job["job"])


def etcd_prefix(stack, prefix: str) -> dict:
    async def go():
        async with EtcdStore(stack.env["NAP_ETCD"]) as s:
            return await s.get_prefix(prefix)

    return asyncio.run(go())


def deployed(stack, client, file_server, tmp_path, files: dict, app: str = "app") -> str:
    src = write_app(tmp_path / f"src-{app}", files)
    job = deploy(stack, client, app, publish(file_server, src, "tgz"))
    assert job["state"] == "succeeded", job
    return app


def reach(stack, host: str) -> str:
    """The address of an instance's host: the agent's host, or a Slurm node (the test clusters' nodes
    all run on this machine, so they are reached at 127.0.0.1)."""
    cluster = getattr(stack, "cluster", None)
    if cluster is None:
        assert host == "127.0.0.1"
        return host
    assert host in cluster.node_names
    return "127.0.0.1"


def start(stack, client, app: str, params: dict | str, count: int | None = None, timeout: float = 120) -> dict:
    body = {"params": params}
    if count:
        body["count"] = count
    resp = client.post(f"/v1/apps/{app}/instances", body)
    return stack.wait_job(client, resp["job"], timeout)


def wait_instance(client, name: str, pred, timeout: float = 30.0) -> dict:
    """Poll the instance until ``pred`` holds (an instance not there yet is waited for too)."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            st = client.get(f"/v1/instances/{name}")
        except ApiError as e:
            if e.status != 404:
                raise
            st = {"absent": e.body}
        else:
            if pred(st):
                return st
        time.sleep(0.1)
    raise AssertionError(f"{name} never matched: {st}")


def wait_state(stack, client, job_id: str, state: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}")
        if job["state"] == state:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never reached {state}: {job}")


def run_cli(stack, token, *args, timeout=60):
    env = {**os.environ, "NAP_URL": stack.url, "NAP_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "nap_orch", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def mpi_app(stack, client, file_server, tmp_path, name: str, files: dict) -> dict:
    job = deploy(stack, client, name, publish(file_server, write_app(tmp_path / name, files), "tgz"))
    return job


def launch(stack, client, app: str, params: dict) -> dict:
    resp = client.post(f"/v1/apps/{app}/mpi", {"params": params})
    return stack.wait_job(client, resp["job"], 120)


def wait_master(client, app: str, run: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.get(f"/v1/apps/{app}/instances")["instances"]
        master = next(r for r in rows if r["kind"] == "mpi_master" and r["instance"] == str(run))
        if master["state"] in ("exited", "failed", "stopped"):
            return {"master": master, "rows": [r for r in rows if r["instance"].split("-")[0] == str(run)]}
        time.sleep(0.2)
    tail = "\n".join(client.lines(f"/v1/instances/{master['name']}/journal", lines=40))
    pid = client.get(f"/v1/instances/{master['name']}").get("pid")
    raise AssertionError(
        f"master of run {run} still {master['state']} after {timeout} s; its journal:\n{tail}\n"
        f"its processes:\n{process_tree(pid) if pid else '(no pid)'}"
    )


def process_tree(root: int) -> str:
    """``pid state command`` of ``root`` and its descendants (this host's), for a failure's message."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    lines, todo = [], [(root, 0)]
    while todo:
        pid, depth = todo.pop()
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            continue
        lines.append(f"{'  ' * depth}{pid} {state} {cmd}")
        todo += [(c, depth + 1) for c in children.get(pid, [])]
    return "\n".join(lines)


def wait_until(check, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def drop_messages(stack, job_id: str) -> int:
    """Remove the job's messages from dramatiq's queues and workers' hands, as a Redis restarted from an
    append-only file a second behind can have lost them; how many there were."""
    r = redis.Redis.from_url(stack.env["NAP_REDIS_URL"])
    ns = f"{stack.namespace}:dramatiq"
    dropped = 0
    for queue in (f"{ns}:nap", f"{ns}:nap.DQ"):
        for rid, raw in r.hgetall(f"{queue}.msgs").items():
            if json.loads(raw)["args"] == [job_id]:
                r.hdel(f"{queue}.msgs", rid)
                r.lrem(queue, 0, rid)
                for acks in r.scan_iter(f"{ns}:__acks__.*"):
                    r.srem(acks, rid)
                dropped += 1
    r.close()
    return dropped
