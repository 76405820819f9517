"""Bulk launch on Slurm: one start_common of N instances of a tiny app through nap-orch on a one-node
Slurm test cluster, from submit until the job reports all running (each task has started its
program) with their ports in the store, against a bare ``sbatch --array=1-N`` of the same ``sleep`` on
the same cluster in the same run, until all N of its programs have started (each touches a file
first). The bare array's time until squeue shows all N RUNNING is printed too: that is only
slurmctld's allocation, the node launches the tasks well after it.

    python bench/slurm_launch.py                 # N=1000, etcd store
    python bench/slurm_launch.py --count 500 --store redis --rounds 2

It starts its own Slurm cluster (tests/support/slurm_cluster.py: munged, slurmctld, slurmd), Redis, etcd,
agent (the Slurm reconciler), worker and API in a temporary folder and removes everything after. Needs
root and Debian's Slurm 22.05, like the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nap_orch.config import Settings  # noqa: E402
from nap_orch.store import open_store  # noqa: E402
from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.slurm_cluster import SlurmCluster  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402


def running(cluster: SlurmCluster, jobid: str) -> int:
    out = cluster.run("squeue", "-h", "-r", "-j", jobid, "-t", "RUNNING", "-o", "%i").stdout
    return len(out.split())


def baseline(cluster: SlurmCluster, n: int, workdir: Path) -> tuple[float, float]:
    """A bare array job of n ``sleep``s, each task first touching a file of its own (as nap's tasks
    write their ``.started`` file): (seconds from sbatch until squeue shows all n RUNNING, seconds until
    all n programs have started). squeue says RUNNING as soon as slurmctld has allocated a task; the
    node's slurmd launches the tasks later, at its own pace (about 60 a second here), so the second
    figure is the one to compare with nap's "running"."""
    out = workdir / "baseline"  # its default output files (slurm-%A_%a.out), as nap's jobs have journals
    started = out / "started"
    started.mkdir(parents=True)
    t0 = time.perf_counter()
    jobid = (
        cluster.run(
            "sbatch",
            "--parsable",
            f"--array=1-{n}",
            "--wrap",
            f"touch {started}/$SLURM_ARRAY_TASK_ID; exec sleep 100000",
            cwd=out,
        )
        .stdout.strip()
        .split(";")[0]
    )
    allocated = None
    while True:
        if allocated is None and running(cluster, jobid) >= n:
            allocated = time.perf_counter() - t0
        if len(os.listdir(started)) >= n:
            took = time.perf_counter() - t0
            break
        time.sleep(0.05)
    if allocated is None:
        allocated = took
    cluster.run("scancel", jobid)
    cluster.cancel_all(timeout=120)
    cluster.wait_nodes_idle(timeout=120)
    return allocated, took


async def count_ports(stack: NapStack, user: str) -> int:
    settings = Settings.from_env({k: v for k, v in stack.env.items() if k.startswith("NAP_")})
    async with open_store(settings) as store:
        return len(await store.get_prefix(f"/services/port/{user}/tiny/"))


def one_round(args, r: int) -> dict:
    """A fresh cluster and stack (the reconciler would restart instances killed between rounds)."""
    # short: the munge socket's path must stay under 100 characters
    with tempfile.TemporaryDirectory(prefix="nap-sb-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        cluster = SlurmCluster(tmp / "slurm", nodes=1)
        redis = RedisServer(tmp / "redis")
        etcd = EtcdServer(tmp / "etcd") if args.store == "etcd" else None
        www = FileServer(tmp / "www")
        stack = None
        try:
            cluster.start()
            redis.start()
            if etcd:
                etcd.start()
            www.start()
            stack = NapStack(
                tmp / "nap",
                redis.url,
                etcd.endpoint if etcd else "",
                engine="slurm",
                extra_env={
                    **cluster.env,
                    "NAP_PORT_RANGE": "30000-39999",
                    "NAP_MAX_COUNT": str(max(1000, args.count)),
                    "NAP_SANDBOX": args.sandbox,
                    "NAP_FETCH_ALLOW": "127.0.0.1",  # the benchmark's file server
                },
            )
            stack.start()
            user, client = stack.add_user("bench")
            tar_gz(write_app(tmp / "tiny", {"profile": "command: sleep 100000\n"}), www.root / "tiny.tgz")
            job = client.post("/v1/apps", {"app": "tiny", "url": f"{www.url}/tiny.tgz"})
            assert stack.wait_job(client, job["job"])["state"] == "succeeded"
            allocated, base = baseline(cluster, args.count, tmp)
            t0 = time.perf_counter()
            job = client.post("/v1/apps/tiny/instances", {"params": {}, "count": args.count})
            rec = stack.wait_job(client, job["job"], timeout=900)
            took = time.perf_counter() - t0
            assert rec["state"] == "succeeded", rec
            if rec["result"]["running"] != args.count:
                down = [i for i in rec["result"]["instances"] if i["state"] != "running"]
                tail = client.lines(f"/v1/instances/{down[0]['name']}/journal", lines=20)
                raise AssertionError(f"{len(down)} not running, {down[:3]}; the first's journal:\n" + "\n".join(tail))
            ports = asyncio.run(count_ports(stack, user))
            assert ports == args.count, ports
            return {
                "round": r + 1,
                "engine": "slurm",
                "store": args.store,
                "sandbox": args.sandbox,
                "instances": args.count,
                "nap_seconds": round(took, 3),
                "nap_per_second": round(args.count / took, 1),
                "sbatch_array_seconds": round(base, 3),
                "sbatch_array_per_second": round(args.count / base, 1),
                "sbatch_array_squeue_running_seconds": round(allocated, 3),
                "ratio": round(took / base, 2),
            }
        except subprocess.CalledProcessError as e:
            print(e.stderr, file=sys.stderr)
            raise
        finally:
            if stack is not None:
                stack.stop()
            cluster.stop()
            www.stop()
            if etcd:
                etcd.stop()
            redis.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--store", choices=["etcd", "redis"], default="etcd")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sandbox", choices=["on", "off"], default="on", help="off: NAP_SANDBOX=off (unisolated)")
    args = ap.parse_args()
    for r in range(args.rounds):
        print(json.dumps(one_round(args, r)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
