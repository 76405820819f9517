"""Lifecycle benchmarks, each against a baseline measured in the same run.

    python bench/lifecycle.py ports      # launch 1,000, remove them all, three times, in a 1,000-port range
    python bench/lifecycle.py rollout    # redeploy an app with 100 running HTTP instances: how many answer
    python bench/lifecycle.py ports --count 500 --rounds 2
    python bench/lifecycle.py rollout --count 40 --batch 10

``ports``: each round starts ``--count`` instances of ``sleep`` (the range holds exactly that many ports,
so a round that found any port still held would fail), then removes them all with one app-wide remove
job. Baseline: the same number of processes started in the agent's sandbox directly
(``bulk_launch.sandboxed_baseline``). Reported per round: launch and removal seconds, the ratio of the
launch to the baseline, and the ports and numbers held after the removal (0 and 0).

``rollout``: ``--count`` instances of a small HTTP server; a prober connects to every instance's port
over and over (one sweep: all of them, in parallel threads) while a redeploy rolls them onto a new
release in batches. Reported: the fewest instances that answered in any sweep during the rollout (the
issue's bar: 75 of 100), the sweeps, the rollout's seconds, and the baseline: the same sweeps with
nothing rolling (all should answer).

Each starts its own Redis, etcd, agent, worker and API in a temporary folder and removes it after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bulk_launch import sandboxed_baseline  # noqa: E402
from nap_orch.config import Settings  # noqa: E402
from nap_orch.store import open_store  # noqa: E402
from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402

SERVER = """import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(os.environ["NAP_INSTANCE"].encode())
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


async def held(stack: NapStack, user: str, app: str, lo: int) -> tuple[int, int]:
    """Ports reserved in the bench's range, and the app's reserved instance numbers."""
    settings = Settings.from_env({k: v for k, v in stack.env.items() if k.startswith("NAP_")})
    async with open_store(settings) as store:
        ports = await store.get_prefix("/nap/ports/")
        numbers = await store.get_prefix(f"/nap/instances/{user}/{app}/")
    return sum(1 for k in ports if int(k.rsplit("/", 1)[1]) >= lo), len(numbers)


def ports_bench(stack: NapStack, www: FileServer, tmp: Path, args, lo: int) -> None:
    user, client = stack.add_user("bench")
    tar_gz(write_app(tmp / "tiny", {"profile": "command: sleep 100000\n"}), www.root / "tiny.tgz")
    job = client.post("/v1/apps", {"app": "tiny", "url": f"{www.url}/tiny.tgz"})
    assert stack.wait_job(client, job["job"])["state"] == "succeeded"
    for r in range(args.rounds):
        boxed = sandboxed_baseline(args.count, tmp / "boxed")
        t0 = time.perf_counter()
        job = client.post("/v1/apps/tiny/instances", {"params": {}, "count": args.count})
        rec = stack.wait_job(client, job["job"], timeout=900)
        launch = time.perf_counter() - t0
        assert rec["state"] == "succeeded" and rec["result"]["running"] == args.count, rec.get("error")
        t0 = time.perf_counter()
        job = client.delete("/v1/apps/tiny/instances")
        rec = stack.wait_job(client, job["job"], timeout=900)
        removal = time.perf_counter() - t0
        assert rec["state"] == "succeeded", rec.get("error")
        ports, numbers = asyncio.run(held(stack, user, "tiny", lo))
        print(
            json.dumps(
                {
                    "round": r + 1,
                    "instances": args.count,
                    "port_range": args.count,
                    "launch_seconds": round(launch, 2),
                    "launch_per_second": round(args.count / launch, 1),
                    "sandboxed_baseline_seconds": round(boxed, 2) if boxed else None,
                    "ratio_to_sandboxed": round(launch / boxed, 2) if boxed else None,
                    "removal_seconds": round(removal, 2),
                    "removal_per_second": round(args.count / removal, 1),
                    "ports_held_after": ports,
                    "numbers_held_after": numbers,
                }
            ),
            flush=True,
        )


class Prober(threading.Thread):
    """Sweeps over every instance's port, again and again: how many answered an HTTP GET in each."""

    def __init__(self, ports: list[int]):
        super().__init__(daemon=True)
        self.ports = ports
        self.sweeps: list[int] = []
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=32)

    @staticmethod
    def answers(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def run(self) -> None:
        while not self.stop.is_set():
            self.sweeps.append(sum(self.pool.map(self.answers, self.ports)))


def probe_for(ports: list[int], seconds: float) -> list[int]:
    p = Prober(ports)
    p.start()
    time.sleep(seconds)
    p.stop.set()
    p.join()
    return p.sweeps


def rollout_bench(stack: NapStack, www: FileServer, tmp: Path, args) -> None:
    user, client = stack.add_user("roller")
    for v in (1, 2):
        files = {"profile": "command: python3 server.py\ncheck: http /\ncheck_interval: 2s\n", "server.py": SERVER}
        tar_gz(write_app(tmp / f"web{v}", {**files, "VERSION": f"{v}\n"}), www.root / f"web{v}.tgz")
    job = client.post("/v1/apps", {"app": "web", "url": f"{www.url}/web1.tgz"})
    assert stack.wait_job(client, job["job"])["state"] == "succeeded"
    job = client.post("/v1/apps/web/instances", {"params": {}, "count": args.count})
    rec = stack.wait_job(client, job["job"], timeout=600)
    assert rec["state"] == "succeeded" and rec["result"]["running"] == args.count, rec.get("error")
    ports = [i["port"] for i in rec["result"]["instances"]]
    for r in range(args.rounds):
        base = probe_for(ports, 5.0)
        prober = Prober(ports)
        prober.start()
        t0 = time.perf_counter()
        body = {"app": "web", "url": f"{www.url}/web{2 - r % 2}.tgz"}
        if args.batch:
            body["batch"] = args.batch
        job = client.post("/v1/apps", body)
        rec = stack.wait_job(client, job["job"], timeout=1800)
        took = time.perf_counter() - t0
        prober.stop.set()
        prober.join()
        assert rec["state"] == "succeeded", rec.get("error")
        print(
            json.dumps(
                {
                    "round": r + 1,
                    "instances": args.count,
                    "batch": rec["result"].get("rollout", {}).get("batch"),
                    "rollout_seconds": round(took, 2),
                    "min_answering": min(prober.sweeps),
                    "sweeps": len(prober.sweeps),
                    "baseline_min_answering": min(base),
                    "baseline_sweeps": len(base),
                }
            ),
            flush=True,
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["ports", "rollout"])
    ap.add_argument("--count", type=int, help="instances (ports: 1000; rollout: 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, help="rollout: instances per batch (default: a quarter)")
    args = ap.parse_args()
    args.count = args.count or (1000 if args.what == "ports" else 100)
    lo = 30000
    with tempfile.TemporaryDirectory(prefix="nap-bench-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis")
        redis.start()
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        www = FileServer(tmp / "www").start()
        hi = lo + (args.count if args.what == "ports" else 10 * args.count) - 1
        stack = NapStack(
            tmp / "nap",
            redis.url,
            etcd.endpoint,
            extra_env={"NAP_PORT_RANGE": f"{lo}-{hi}", "NAP_FETCH_ALLOW": "127.0.0.1", "NAP_MAX_COUNT": "5000"},
        )
        try:
            stack.start()
            (ports_bench(stack, www, tmp, args, lo) if args.what == "ports" else rollout_bench(stack, www, tmp, args))
        finally:
            stack.remove_instances(stack.users)
            stack.stop()
            www.stop()
            etcd.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
