"""Round trips of one trivial deploy: the job's calls to Redis (records, events, cancel checks) and to
the state store, counted while the deploy job runs in this process (the worker's code, no queue).

    python bench/deploy_trips.py                 # etcd store, 3 deploys
    python bench/deploy_trips.py --store redis --deploys 5 --trace

Each count is of requests sent; ``serial`` counts the steps the job waits through one after another
(requests in flight together count once). It starts its own Redis, etcd and file server in a
temporary folder and removes everything after.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nap_orch.config import Settings  # noqa: E402
from nap_orch.jobs.runner import Runtime, run_job  # noqa: E402
from nap_orch.ops.deploy import deploy_app  # noqa: E402
from nap_orch.store.etcd import EtcdStore  # noqa: E402
from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402


class Tally:
    """Requests by name, and how many times the job went from none in flight to one (serial steps)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.serial = 0
        self.trace: list[str] = []
        self.on = False

    async def count(self, name: str, request):
        if not self.on:
            return await request
        self.calls[name] += 1
        if self.in_flight == 0:
            self.serial += 1
            self.trace.append(f"{self.serial:3d} {name}")
        else:
            self.trace.append(f"    + {name}")
        self.in_flight += 1
        try:
            return await request
        finally:
            self.in_flight -= 1


def instrument(tally: Tally) -> None:
    """Count every Redis command sent alone, every pipeline, and every etcd request."""
    single = aioredis.Redis.execute_command
    pipelined = Pipeline.execute
    etcd_run = EtcdStore._run

    async def execute_command(self, *args, **options):
        if isinstance(self, Pipeline) and not self.watching and self.explicit_transaction is not None:
            return await single(self, *args, **options)  # queued, not sent
        if isinstance(self, Pipeline):
            return await single(self, *args, **options)
        return await tally.count(f"redis {args[0]}", single(self, *args, **options))

    async def execute(self, raise_on_error=True):
        names = ",".join(str(c[0][0]) for c in self.command_stack)
        return await tally.count(f"redis pipeline[{names}]", pipelined(self, raise_on_error))

    async def run(self, request):
        frame = sys._getframe(1)
        while frame.f_code.co_name.startswith("_") or frame.f_code.co_name in ("request", "refresh", "revoke"):
            if frame.f_code.co_name in ("refresh", "revoke"):
                break
            frame = frame.f_back  # type: ignore[assignment]
        name = "put_many or delete_many" if frame.f_code.co_name == "run_forever" else frame.f_code.co_name
        return await tally.count(f"etcd {name}", etcd_run(self, request))

    aioredis.Redis.execute_command = execute_command  # type: ignore[method-assign]
    Pipeline.execute = execute  # type: ignore[method-assign]
    EtcdStore._run = run  # type: ignore[method-assign]


async def main_async(args: argparse.Namespace, root: Path) -> None:
    redis = RedisServer(root / "redis")
    redis.start()
    etcd = EtcdServer(root / "etcd") if args.store == "etcd" else None
    if etcd:
        etcd.start()
    www = FileServer(root / "www").start()
    try:
        tar_gz(write_app(root / "src", {"profile": "command: sleep 1000\n"}), www.root / "app.tgz")
        url = f"{www.url}/app.tgz"
        settings = Settings.from_env(
            {
                "NAP_HOME": str(root / "nap"),
                "NAP_REDIS_URL": redis.url,
                "NAP_ETCD": etcd.endpoint if etcd else "",
                "NAP_NAMESPACE": "trips",
                "NAP_FETCH_ALLOW": "127.0.0.1",
                "NAP_SANDBOX": "off",
            }
        )
        rt = await Runtime(settings).open()
        tally = Tally()
        instrument(tally)
        try:
            for i in range(args.deploys):
                job = await rt.jobs.create("deploy", "bob", {"user": "bob", "app": f"a{i}", "url": url})
                tally.__init__()
                tally.on = True
                t0 = time.monotonic()
                await run_job(rt, job.id, deploy_app, 1)
                took = time.monotonic() - t0
                tally.on = False
                state = (await rt.jobs.get(job.id)).state
                print(
                    f"deploy {i + 1}: {state}, {sum(tally.calls.values())} requests, {tally.serial} serial steps,"
                    f" {took * 1000:.1f} ms"
                )
                if args.trace and i == args.deploys - 1:
                    print("\n".join(tally.trace))
                    for name, n in sorted(tally.calls.items()):
                        print(f"{n:4d}  {name}")
        finally:
            await rt.close()
    finally:
        www.stop()
        if etcd:
            etcd.stop()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=("etcd", "redis"), default="etcd")
    ap.add_argument("--deploys", type=int, default=3)
    ap.add_argument("--trace", action="store_true", help="list the last deploy's requests in order")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nap-bench-trips-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
