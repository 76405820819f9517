"""The web manager with many instances, in Chromium, against a baseline of a few in the same run.

    python bench/web_instances.py                       # 1,000 instances, a baseline of 20, 3 rounds
    python bench/web_instances.py --count 500 --rounds 2 --stops 10

An app's page is opened on an app with ``--count`` running ``sleep`` instances (and, for the baseline, on
one with ``--baseline``, 20). Reported per round and per table: how long the page took to show every row; then
``--stops`` instances are stopped one after another through the API, and for each, the time from the
API's answer (the instance is stopped then) to its row saying ``stopped`` in the page (a
MutationObserver in the page stamps the change; the browser and this script share the machine's
clock); p50, p99 and max of those, and their ratio to the baseline's. The page refreshes its table
every 1.5 s, so about 0.75 s on average and 1.5 s at most is the design's own wait; what the rows
add to it is the difference to the baseline.

Starts its own Redis, etcd, agent, worker and API in a temporary folder and removes it after; needs
Debian's chromium and Playwright for Python (the test extras).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.support.apps import tar_gz, write_app  # noqa: E402
from tests.support.httpserver import FileServer  # noqa: E402
from tests.support.services import EtcdServer, RedisServer  # noqa: E402
from tests.support.stack import NapStack  # noqa: E402

# Stamps, in the page, the moment a row's state cell says "stopped" (epoch milliseconds).
OBSERVE = """() => {
  window.stoppedAt = {};
  const table = document.querySelector('#instances');
  new MutationObserver(() => {
    for (const td of table.querySelectorAll('td.st[data-v="stopped"]')) {
      const name = td.parentElement.dataset.name;
      if (!(name in window.stoppedAt)) window.stoppedAt[name] = Date.now();
    }
  }).observe(table, {subtree: true, childList: true, attributes: true});
}"""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def launch(stack: NapStack, client, app: str, count: int) -> None:
    job = client.post(f"/v1/apps/{app}/instances", {"params": {}, "count": count})
    rec = stack.wait_job(client, job["job"], timeout=900)
    assert rec["state"] == "succeeded" and rec["result"]["running"] == count, rec.get("error")


def measure(page, stack: NapStack, client, user: str, app: str, count: int, stops: int) -> dict:
    """Open the app's page, wait for its rows, stop ``stops`` instances and time their rows' change."""
    t0 = time.perf_counter()
    page.goto(f"{stack.url}/#/apps/{app}")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#instances tbody tr').length === n", arg=count, timeout=120_000
    )
    render = time.perf_counter() - t0
    page.evaluate(OBSERVE)
    lags = []
    for n in range(1, stops + 1):
        name = f"{user}_{app}_common@{n}"
        client.post(f"/v1/instances/{name}/stop")
        answered = time.time() * 1000
        page.wait_for_function("(n) => window.stoppedAt[n] !== undefined", arg=name, timeout=60_000)
        lags.append(page.evaluate("(n) => window.stoppedAt[n]", name) - answered)
        time.sleep(random.uniform(0.0, 1.5))  # the next stop lands anywhere in the page's refresh cycle
    for n in range(1, stops + 1):  # back to running for the next round
        client.post(f"/v1/instances/{user}_{app}_common@{n}/start")
    return {
        "rows": count,
        "render_seconds": round(render, 2),
        "p50_ms": round(statistics.median(lags)),
        "p99_ms": round(pct(lags, 99)),
        "max_ms": round(max(lags)),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--baseline", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stops", type=int, default=20)
    args = ap.parse_args()
    args.stops = min(args.stops, args.baseline, args.count)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nap-bench-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis")
        redis.start()
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        www = FileServer(tmp / "www").start()
        lo = 30000
        stack = NapStack(
            tmp / "nap",
            redis.url,
            etcd.endpoint,
            extra_env={
                "NAP_PORT_RANGE": f"{lo}-{lo + args.count + args.baseline + 100}",
                "NAP_FETCH_ALLOW": "127.0.0.1",
                "NAP_MAX_COUNT": "5000",
                "NAP_USER_RATE": "1000",
            },
        )
        try:
            stack.start()
            user, client = stack.add_user("bench")
            tar_gz(write_app(tmp / "tiny", {"profile": "command: sleep 100000\n"}), www.root / "tiny.tgz")
            for app in ("many", "few"):
                job = client.post("/v1/apps", {"app": app, "url": f"{www.url}/tiny.tgz"})
                assert stack.wait_job(client, job["job"])["state"] == "succeeded"
            launch(stack, client, "many", args.count)
            launch(stack, client, "few", args.baseline)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(stack.url + "/")
                page.evaluate("(t) => sessionStorage.setItem('nap_token', t)", client.token)
                for r in range(args.rounds):
                    base = measure(page, stack, client, user, "few", args.baseline, args.stops)
                    many = measure(page, stack, client, user, "many", args.count, args.stops)
                    print(
                        json.dumps(
                            {
                                "round": r + 1,
                                "stops": args.stops,
                                "baseline": base,
                                "measured": many,
                                "ratio_p50": round(many["p50_ms"] / max(1, base["p50_ms"]), 2),
                                "ratio_p99": round(many["p99_ms"] / max(1, base["p99_ms"]), 2),
                            }
                        ),
                        flush=True,
                    )
                browser.close()
        finally:
            stack.remove_instances(stack.users)
            stack.stop()
            www.stop()
            etcd.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
