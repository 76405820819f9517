"""Fault recovery benchmark: how long after a fault ends every job is terminal again, at the platform's
default settings (the reaper sweeps every 10 s and acts on a job stranded for 30 s), against the same
launch without a fault, measured in the same run.

    python bench/faults.py                 # 3 rounds, launches of 200 `sleep` instances, etcd store
    python bench/faults.py --store redis --rounds 2

Each round measures:
- ``none``: the launch alone, submit to the job's end (the baseline);
- ``redis``: Redis (with its append-only file) SIGKILLed a quarter second into the launch and restarted
  2 s later: seconds from Redis answering again to the job's end;
- ``lost``: the launch's worker SIGKILLed and its message removed from dramatiq's queues (what a Redis
  restarted a second behind can lose): seconds from the loss to the job's end, by the reaper.

It starts its own Redis, etcd, agent, worker and API in a temporary folder and removes everything after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nap_orch.cli.client import ApiError  # noqa: E402
from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.flows import drop_messages  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def ended(client, job: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = client.get(f"/v1/jobs/{job}")
        except ApiError as e:
            if e.status != 503:
                raise
            record = {}
        if record.get("state") in TERMINAL:
            return record
        time.sleep(0.1)
    raise RuntimeError(f"job {job} did not end within {timeout} s")


def running(client, job: str) -> None:
    while client.get(f"/v1/jobs/{job}")["state"] == "queued":
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--store", choices=["etcd", "redis"], default="etcd")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nap-bench-faults-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis", appendonly=True)
        redis.start()
        etcd = EtcdServer(root / "etcd") if args.store == "etcd" else None
        if etcd:
            etcd.start()
        files = FileServer(root / "www").start()
        stack = NapStack(
            root / "nap",
            redis.url,
            etcd.endpoint if etcd else "",
            extra_env={
                "NAP_PORT_RANGE": "30000-39999",
                "NAP_WORKER_HEARTBEAT_MS": "15000",
                "NAP_FETCH_ALLOW": "127.0.0.1",
            },
        ).start()
        try:
            _, client = stack.add_user()
            tar_gz(write_app(root / "src", {"profile": "command: sleep 100000\n"}), files.root / "app.tgz")
            job = client.post("/v1/apps", {"app": "many", "url": f"{files.url}/app.tgz"})["job"]
            assert ended(client, job)["state"] == "succeeded"
            time.sleep(1.1)  # the user and the app are in the append-only file
            print(f"launches of {args.count} on the {args.store} store; seconds until the job ended")
            print("round  none (baseline)  redis killed (from back)  lost message (from loss)")
            for r in range(1, args.rounds + 1):
                figures = []
                for fault in ("none", "redis", "lost"):
                    t0 = time.monotonic()
                    job = client.post("/v1/apps/many/instances", {"params": {}, "count": args.count})["job"]
                    if fault == "redis":
                        running(client, job)
                        time.sleep(0.25)
                        redis.kill()
                        time.sleep(2)
                        redis.start()
                        t0 = time.monotonic()
                    elif fault == "lost":
                        running(client, job)
                        stack.kill("worker")
                        drop_messages(stack, job)
                        t0 = time.monotonic()
                        stack.start_worker()
                    record = ended(client, job)
                    figures.append(f"{time.monotonic() - t0:6.1f} s {record['state']}")
                    stack.remove_instances(stack.users)
                print(f"{r:5d}  {figures[0]:>15}  {figures[1]:>24}  {figures[2]:>25}", flush=True)
        finally:
            stack.stop()
            files.stop()
            if etcd:
                etcd.stop()
            redis.stop()


if __name__ == "__main__":
    main()
