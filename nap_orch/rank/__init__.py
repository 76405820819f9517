"""The processes of an MPI run's units: ``python -m nap_orch.rank master|slave ...``.

A slave registers ``/services/mpi/<user>/<app>/<run>/slave<i>`` = ``{"host": ..., "slots": 1}`` with a
lease it keeps alive, and stays until the run ends (the run record ``/nap/mpi/<user>/<app>/<run>`` says
so) or it is stopped; its key goes with it. The master waits for every slave (up to
``NAP_MPI_WAIT_TIMEOUT`` seconds, else it fails saying how many came), writes the hostfile from what
they registered (its own host first: rank 0 runs beside the master) and runs mpirun on it. Its exit
code is the run's. The same mechanism spans hosts on a cluster engine: only the hosts differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import Counter

from .. import keys
from ..config import Settings
from ..store import open_store

LEASE_TTL = 10


def this_host() -> str:
    return os.environ.get("NAP_HOST") or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


async def set_state(store, run_key: str, **fields) -> None:
    raw = await store.get(run_key)
    record = json.loads(raw) if raw else {}
    record.update(fields)
    await store.put(run_key, json.dumps(record))


async def master(args, program: list[str]) -> int:
    settings = Settings.from_env()
    async with open_store(settings) as store:
        run_key = keys.MPI_RUN.format(user=args.user, app=args.app, run=args.run)
        prefix = keys.MPI.format(user=args.user, app=args.app, run=args.run)
        await set_state(store, run_key, state="waiting", master_host=this_host(), started=time.time())
        print(f"master: waiting for {args.hosts} slave(s) to register under {prefix}", flush=True)
        deadline = time.monotonic() + settings.mpi_wait_timeout
        while True:
            slaves = await store.get_prefix(prefix)
            if len(slaves) >= args.hosts:
                break
            if time.monotonic() > deadline:
                msg = f"only {len(slaves)} of {args.hosts} slave(s) registered within {settings.mpi_wait_timeout:g} s"
                print(f"master: {msg}; giving up", flush=True)
                await set_state(store, run_key, state="failed", exit_code=3, error=msg, finished=time.time())
                return 3
            await asyncio.sleep(0.2)
        hosts = Counter([this_host()] + [json.loads(v)["host"] for v in slaves.values()])
        with open("hostfile", "w") as f:
            for host, slots in hosts.items():
                f.write(f"{host} slots={slots}\n")
        ranks = sum(hosts.values())
        print(f"master: hostfile {dict(hosts)}; running {ranks} ranks", flush=True)
        await set_state(store, run_key, state="running", ranks=ranks)
        # A cluster engine may launch the ranks its own way inside the run's allocation (Slurm: one
        # ``srun --mpi=pmix`` step over the master's and the slaves' tasks): NAP_MPI_LAUNCH, a JSON argv.
        launch = (
            json.loads(os.environ["NAP_MPI_LAUNCH"])
            if os.environ.get("NAP_MPI_LAUNCH")
            else [settings.mpirun, "--hostfile", "hostfile", "-np", str(ranks), "--oversubscribe"]
        )
        argv = [*launch, *program]
        print("master: " + " ".join(argv), flush=True)
        proc = await asyncio.create_subprocess_exec(*argv)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, proc.terminate)
        code = await proc.wait()
        code = code if code >= 0 else 128 - code
        print(f"master: mpirun exited with code {code}", flush=True)
        await set_state(
            store, run_key, state="succeeded" if code == 0 else "failed", exit_code=code, finished=time.time()
        )
        return code


async def slave(args) -> int:
    settings = Settings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with open_store(settings) as store:
        run_key = keys.MPI_RUN.format(user=args.user, app=args.app, run=args.run)
        key = keys.MPI_SLAVE.format(user=args.user, app=args.app, run=args.run, i=args.index)
        lease = await store.lease(LEASE_TTL)
        await store.put(key, json.dumps({"host": this_host(), "slots": 1, "pid": os.getpid()}), lease=lease)
        print(f"slave {args.index}: registered {key} on {this_host()}", flush=True)
        try:
            while not stop.is_set():
                raw = await store.get(run_key)
                state = json.loads(raw).get("state") if raw else None
                if raw is None or state in ("succeeded", "failed", "stopped"):
                    print(f"slave {args.index}: run {state or 'gone'}; leaving", flush=True)
                    break
                await lease.refresh()
                try:
                    await asyncio.wait_for(stop.wait(), LEASE_TTL / 4)
                except TimeoutError:
                    pass
        finally:
            await lease.revoke()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    program: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, program = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="nap_orch.rank")
    p.add_argument("role", choices=["master", "slave"])
    p.add_argument("--user", required=True)
    p.add_argument("--app", required=True)
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--index", type=int)
    args = p.parse_args(argv)
    if args.role == "master":
        return asyncio.run(master(args, program))
    return asyncio.run(slave(args))
