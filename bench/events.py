"""Event latency benchmark: S clients follow their users' event streams (SSE) while jobs are submitted;
the latency of each event is the time from the event's own timestamp (written with it in Redis) to its
arrival at a client. The baseline, in the same run: the same events read straight from Redis by one
XREAD BLOCK client per user (what the API's streams do, without HTTP).

    python bench/events.py                      # 1,000 subscribers (50 users x 20), 3 rounds
    python bench/events.py --users 10 --per-user 5 --rounds 1

No worker runs: each submit's `queued` state event is the event measured. It starts its own Redis,
etcd and API in a temporary folder and removes everything after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402


def figures(lat: list[float]) -> str:
    lat = sorted(lat)
    if not lat:
        return "no events"
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    return f"{len(lat)} events, p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


async def through_api(url: str, tokens: list[str], per_user: int, submits: int, rate: float) -> list[float]:
    latencies: list[float] = []
    ready = 0
    all_ready = asyncio.Event()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def follow(token: str) -> None:
            nonlocal ready
            # from now on (a stream id is the time in milliseconds, then a sequence number)
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": f"{int(time.time() * 1000)}-0"}
            async with session.get(f"{url}/v1/events", headers=headers) as resp:
                assert resp.status == 200, resp.status
                ready += 1
                if ready == len(tokens) * per_user:
                    all_ready.set()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        latencies.append(time.time() - json.loads(line[6:])["t"])

        followers = [asyncio.create_task(follow(t)) for t in tokens for _ in range(per_user)]
        await all_ready.wait()
        await asyncio.sleep(1)
        await submit(session, url, tokens, submits, rate)
        await asyncio.sleep(2)
        for f in followers:
            f.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    return latencies


async def submit(session: aiohttp.ClientSession, url: str, tokens: list[str], submits: int, rate: float) -> None:
    start = time.monotonic()
    for i in range(submits):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
        async with session.post(
            f"{url}/v1/apps", json={"app": f"e{i}", "url": "https://example.org/app.tgz"}, headers=headers
        ) as resp:
            await resp.read()


async def straight_from_redis(
    redis_url: str, namespace: str, users: list[str], url: str, tokens: list[str], submits: int, rate: float
) -> list[float]:
    latencies: list[float] = []
    clients = [aioredis.Redis.from_url(redis_url) for _ in users]

    async def follow(client: aioredis.Redis, user: str) -> None:
        stream = f"{namespace}:ev:user:{user}"
        last = "$"
        while True:
            resp = await client.xread({stream: last}, block=5000, count=500)
            for _, batch in resp or []:
                for eid, fields in batch:
                    last = eid
                    latencies.append(time.time() - float(fields[b"t"]))

    followers = [asyncio.create_task(follow(c, u)) for c, u in zip(clients, users, strict=True)]
    await asyncio.sleep(1)
    async with aiohttp.ClientSession() as session:
        await submit(session, url, tokens, submits, rate)
    await asyncio.sleep(2)
    for f in followers:
        f.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for c in clients:
        await c.aclose()
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--per-user", type=int, default=20)
    ap.add_argument("--submits", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0, help="submits a second")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nap-bench-events-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis")
        redis.start()
        etcd = EtcdServer(root / "etcd")
        etcd.start()
        stack = NapStack(root / "nap", redis.url, etcd.endpoint, extra_env={"NAP_SSE_PER_USER": str(args.per_user)})
        stack.start_api()
        try:
            pairs = [stack.add_user() for _ in range(args.users)]
            users, tokens = [n for n, _ in pairs], [c.token for _, c in pairs]
            print(f"{args.users * args.per_user} subscribers, {args.submits} submits at {args.rate:g}/s")
            for r in range(1, args.rounds + 1):
                api = asyncio.run(through_api(stack.url, tokens, args.per_user, args.submits, args.rate))
                raw = asyncio.run(
                    straight_from_redis(redis.url, stack.namespace, users, stack.url, tokens, args.submits, args.rate)
                )
                print(f"round {r}: through the API: {figures(api)}; straight from Redis: {figures(raw)}", flush=True)
        finally:
            stack.stop()
            etcd.stop()
            redis.stop()


if __name__ == "__main__":
    main()
