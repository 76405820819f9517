"""Deploy drain benchmark: N trivial deploys (a one-file app served on loopback) by U users on one
worker process of 8 threads, against N no-op dramatiq messages on a worker of the same shape on the
same Redis, in the same run. Two measures each round:

- end to end: from the first submit until all have succeeded, the worker running meanwhile; the
  deploys are submitted one after another through the API (so this is bounded by the submit rate).
- drain: the queue filled first (the worker stopped while the deploys are submitted, or the messages
  sent), then the worker started; from the first job's start until the last one's end (no-ops: from
  the first message's run until the count is complete).

    python bench/deploy_drain.py                 # 400 deploys by 20 users, 3 rounds
    python bench/deploy_drain.py --deploys 200 --rounds 1

Several users, because one user's jobs run at most NAP_USER_JOBS_RUNNING (4) at once. It starts its own
Redis, etcd, agent, worker and API in a temporary folder and removes everything after.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as redis_client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402


def drain_deploys(stack: NapStack, clients: list, url: str, n: int, tag: str, threads: int, full: bool) -> float:
    """Seconds for ``n`` deploys: end to end, or (``full``) the drain of a queue filled first."""
    if full:
        stack.kill("worker", signal.SIGTERM)
    t0 = time.monotonic()
    jobs = []
    for i in range(n):
        client = clients[i % len(clients)]
        jobs.append((client, client.post("/v1/apps", {"app": f"{tag}{i}", "url": url})["job"]))
    if full:
        stack.start_worker(threads=threads)
    for client, job in jobs:
        while (state := client.get(f"/v1/jobs/{job}")["state"]) not in ("succeeded", "failed"):
            time.sleep(0.05)
        assert state == "succeeded", client.get(f"/v1/jobs/{job}")
    if not full:
        return time.monotonic() - t0
    records = [client.get(f"/v1/jobs/{job}") for client, job in jobs]
    return max(r["finished"] for r in records) - min(r["started"] for r in records)


def drain_noops(redis_url: str, n: int, threads: int, full: bool) -> float:
    """Seconds for ``n`` no-op messages: sent to a running worker until all are done, or (``full``) all
    sent first, from the first one's run until all are done."""
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    root = Path(__file__).resolve().parent
    sys.path.insert(0, str(root))
    os.environ["BENCH_REDIS_URL"] = redis_url
    import noop_actor  # noqa: PLC0415 - its broker is the benchmark's Redis, known only now

    r = redis_client.Redis.from_url(redis_url)
    r.delete("bench-noop:done", "bench-noop:first")

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "noop_actor", "--processes", "1", "--threads", str(threads)],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    worker = None if full else start()
    try:
        if not full:
            noop_actor.noop.send()  # the worker is up once this one is done
            while int(r.get("bench-noop:done") or 0) < 1:
                time.sleep(0.05)
            r.delete("bench-noop:done", "bench-noop:first")
        t0 = time.monotonic()
        for _ in range(n):
            noop_actor.noop.send()
        if full:
            worker = start()
        while int(r.get("bench-noop:done") or 0) < n:
            time.sleep(0.002)
        if not full:
            return time.monotonic() - t0
        return time.time() - float(r.get("bench-noop:first") or 0)
    finally:
        r.close()
        if worker is not None:
            worker.terminate()
            worker.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deploys", type=int, default=400)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8, help="the worker's threads (nap's and the baseline's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nap-bench-drain-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis")
        redis.start()
        etcd = EtcdServer(root / "etcd")
        etcd.start()
        www = FileServer(root / "www").start()
        stack = NapStack(
            root / "nap",
            redis.url,
            etcd.endpoint,
            extra_env={"NAP_FETCH_ALLOW": "127.0.0.1", "NAP_USER_RATE": "1000", "NAP_USER_BURST": "1000"},
        )
        stack.start_agent()
        stack.start_worker(threads=args.threads)
        stack.start_api()
        try:
            clients = [stack.add_user()[1] for _ in range(args.users)]
            tar_gz(write_app(root / "src", {"profile": "command: sleep 1000\n"}), www.root / "app.tgz")
            url = f"{www.url}/app.tgz"
            print(f"{args.deploys} deploys by {args.users} users; one worker process of {args.threads} threads")
            print("                     end to end                                  drain of a full queue")
            print("round  deploys/s (s)   no-op messages/s (s)  ratio   deploys/s (s)   no-op messages/s (s)  ratio")
            n = args.deploys
            for r in range(1, args.rounds + 1):
                took = drain_deploys(stack, clients, url, n, f"r{r}a", args.threads, full=False)
                base = drain_noops(redis.url, n, args.threads, full=False)
                full = drain_deploys(stack, clients, url, n, f"r{r}b", args.threads, full=True)
                full_base = drain_noops(redis.url, n, args.threads, full=True)
                print(
                    f"{r:5d}  {n / took:6.1f} ({took:5.2f})  {n / base:7.1f} ({base:5.2f})     {took / base:5.1f}"
                    f"   {n / full:6.1f} ({full:5.2f})  {n / full_base:7.1f} ({full_base:5.2f})     {full / full_base:5.1f}",
                    flush=True,
                )
        finally:
            if "noop_actor" in sys.modules:
                sys.modules["noop_actor"].broker.close()
            stack.stop()
            www.stop()
            etcd.stop()
            redis.stop()


if __name__ == "__main__":
    main()
