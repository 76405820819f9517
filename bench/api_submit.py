"""API submit benchmark: C concurrent clients submitting jobs as fast as the API accepts them, against
raw dramatiq enqueue on the same Redis with the same concurrency, measured in the same run; then the
latency at half the sustained rate.

    python bench/api_submit.py                       # 200 and 500 clients, 3 rounds, etcd store
    python bench/api_submit.py --clients 50 --rounds 2

Submits are deploys of a one-file app served on loopback; no worker runs, so this measures the API
alone (record, event, enqueue). It counts every status: the API must answer no 5xx. It starts its own
Redis, etcd and API in a temporary folder and removes everything after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import dramatiq
from dramatiq.brokers.redis import RedisBroker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402


async def submit_load(url: str, tokens: list[str], clients: int, seconds: float) -> tuple[Counter, float, int]:
    """Each client submits in a loop for ``seconds``; (statuses, accepted per second, accepted)."""
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(i: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            body = {"app": f"a{i}", "url": "https://example.org/app.tgz"}
            while time.monotonic() < deadline:
                async with session.post(f"{url}/v1/apps", json=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status == 429:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

        t0 = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        took = time.monotonic() - t0
    return statuses, statuses[202] / took, statuses[202]


async def paced(url: str, tokens: list[str], rate: float, seconds: float) -> list[float]:
    """Submits at a steady ``rate`` a second; the latency of each, in seconds."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(i: int) -> None:
            t0 = time.monotonic()
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            async with session.post(
                f"{url}/v1/apps", json={"app": f"p{i}", "url": "https://example.org/app.tgz"}, headers=headers
            ) as resp:
                await resp.read()
            latencies.append(time.monotonic() - t0)

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies


def raw_enqueue(redis_url: str, clients: int, seconds: float) -> float:
    """Messages a second that dramatiq's own enqueue takes from ``clients`` threads on the same Redis."""
    import concurrent.futures

    broker = RedisBroker(url=redis_url, namespace="bench-raw")
    broker.declare_queue("raw")
    message = dramatiq.Message(queue_name="raw", actor_name="noop", args=("x" * 16,), kwargs={}, options={})
    deadline = time.monotonic() + seconds
    count = [0] * clients

    def loop(i: int) -> None:
        while time.monotonic() < deadline:
            broker.enqueue(message)
            count[i] += 1

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    took = time.monotonic() - t0
    broker.flush_all()
    broker.close()
    return sum(count) / took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[200, 500])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nap-bench-submit-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis")
        redis.start()
        etcd = EtcdServer(root / "etcd")
        etcd.start()
        # the per-user request rate is set out of the way: this measures what the API can take
        unlimited = {"NAP_USER_RATE": "1000000", "NAP_USER_BURST": "1000000"}
        stack = NapStack(root / "nap", redis.url, etcd.endpoint, extra_env=unlimited)
        stack.start_api()  # no worker: the API alone
        try:
            tokens = [stack.add_user()[1].token for _ in range(args.users)]
            print(f"{args.users} users; {args.seconds:g} s per measure; accepted submits a second")
            print("clients round  API accepted/s  raw enqueue/s  ratio  statuses")
            for clients in args.clients:
                for r in range(1, args.rounds + 1):
                    statuses, rate, _ = asyncio.run(submit_load(stack.url, tokens, clients, args.seconds))
                    raw = raw_enqueue(redis.url, min(clients, 64), args.seconds)
                    shown = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
                    print(f"{clients:7d} {r:5d}  {rate:14.0f}  {raw:13.0f}  {raw / rate:5.2f}  {shown}", flush=True)
                    if r == args.rounds:
                        lat = sorted(asyncio.run(paced(stack.url, tokens, rate / 2, args.seconds)))
                        p50 = statistics.median(lat) * 1000
                        p99 = lat[int(len(lat) * 0.99) - 1] * 1000
                        print(
                            f"        at {rate / 2:.0f}/s (half the sustained rate): p50 {p50:.0f} ms, p99 {p99:.0f} ms"
                        )
        finally:
            stack.stop()
            etcd.stop()
            redis.stop()


if __name__ == "__main__":
    main()
