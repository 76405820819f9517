"""The processes of an MPI run's units: ``python3 .nap-mpi/rank.py master|slave ...`` in the run's folder.

This file runs inside the tenant's sandbox on the host's own Python, so it imports nothing but the
standard library: the launch copies it into the run's folder (``.nap-mpi/rank.py``), and it holds no
credential of the platform's. The master and its slaves meet through files in that folder, which all
of the run's units share (on a cluster engine it is on the filesystem the nodes share)::

    .nap-mpi/slave<i>.json   a slave's registration: {"host", "slots", "pid"} (written whole, by rename)
    .nap-mpi/run.json        the master's record of the run: state waiting|running|succeeded|failed,
                             master_host, ranks, exit_code, error, started, finished
    .nap-mpi/ended           the run is over: slaves leave

A slave registers and stays until the run has ended or it is stopped; its file goes with it. The
master waits for every slave (up to ``NAP_MPI_WAIT_TIMEOUT`` seconds, else it fails saying how many
came), writes the hostfile from what they registered (its own host first: rank 0 runs beside the
master) and runs mpirun on it. Its exit code is the run's. The platform publishes the registrations
as the seed's ``/services/mpi/<user>/<app>/<run>/slave<i>`` keys (``ops.instances.mpi``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

FOLDER = ".nap-mpi"
POLL = 0.2
# A launcher (Slurm's srun) still running this long after every rank has ended is ended: srun has been
# seen to miss the end of a heterogeneous step whose tasks had all finished, and wait for ever.
LAUNCHER_GRACE = 10.0
# What each rank runs under a cluster's launcher: the program, then its exit code into a file of its own
# (node and pid: unique among the run's ranks), which is how the master knows every rank has ended.
RANK_SH = '"$@"; c=$?; echo "$c" > ".nap-mpi/rank-${SLURMD_NODENAME:-node}-$$.exit"; exit "$c"'


def this_host() -> str:
    return os.environ.get("NAP_HOST") or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: readers on other nodes never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def registered(folder: Path) -> dict[str, dict]:
    """The slaves' registrations: ``slave<i>`` -> {"host", "slots", "pid"}."""
    out = {}
    for path in sorted(folder.glob("slave*.json")):
        data = read_json(path)
        if data is not None and isinstance(data.get("host"), str):
            out[path.stem] = data
    return out


class Run:
    """The run's record (``run.json``), kept by the master."""

    def __init__(self, folder: Path):
        self.path = folder / "run.json"
        self.ended = folder / "ended"
        self.record: dict = {}

    def set(self, **fields) -> None:
        self.record.update(fields)
        write_json(self.path, self.record)

    def end(self, state: str, code: int, **fields) -> int:
        self.set(state=state, exit_code=code, finished=time.time(), **fields)
        self.ended.touch()
        return code


def master(args, program: list[str]) -> int:
    folder = Path(FOLDER)
    folder.mkdir(exist_ok=True)
    run = Run(folder)
    run.set(state="waiting", hosts=args.hosts, master_host=this_host(), started=time.time())
    timeout = float(os.environ.get("NAP_MPI_WAIT_TIMEOUT") or 60)
    print(f"master: waiting for {args.hosts} slave(s) to register in {FOLDER}/", flush=True)
    deadline = time.monotonic() + timeout
    while len(slaves := registered(folder)) < args.hosts:
        if time.monotonic() > deadline:
            msg = f"only {len(slaves)} of {args.hosts} slave(s) registered within {timeout:g} s"
            print(f"master: {msg}; giving up", flush=True)
            return run.end("failed", 3, error=msg)
        time.sleep(POLL)
    hosts = Counter([this_host()] + [s["host"] for s in slaves.values()])
    with open("hostfile", "w") as f:
        for host, slots in hosts.items():
            f.write(f"{host} slots={slots}\n")
    ranks = sum(hosts.values())
    print(f"master: hostfile {dict(hosts)}; running {ranks} ranks", flush=True)
    run.set(state="running", ranks=ranks)
    # A cluster engine may launch the ranks its own way inside the run's allocation (Slurm: one
    # ``srun --mpi=pmix`` step over the master's and the slaves' tasks): NAP_MPI_LAUNCH, a JSON argv.
    launch = (
        json.loads(os.environ["NAP_MPI_LAUNCH"])
        if os.environ.get("NAP_MPI_LAUNCH")
        else [os.environ.get("NAP_MPIRUN") or "mpirun", "--hostfile", "hostfile", "-np", str(ranks), "--oversubscribe"]
    )
    watched = bool(os.environ.get("NAP_MPI_LAUNCH"))
    argv = [*launch, *(["/bin/sh", "-c", RANK_SH, "rank"] if watched else []), *program]
    print("master: " + " ".join(argv), flush=True)
    proc = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    code = wait_launcher(proc, folder, ranks if watched else None)
    print(f"master: mpirun exited with code {code}", flush=True)
    return run.end("succeeded" if code == 0 else "failed", code)


def wait_launcher(proc: subprocess.Popen, folder: Path, ranks: int | None) -> int:
    """The launcher's exit code. A launcher that outlives every rank by ``LAUNCHER_GRACE`` seconds is
    ended, and the run's code is the ranks' (the first that is not 0): with ``ranks``, as their exit
    files say (a cluster's launcher); without, when every process the launcher started has ended and
    it has not reaped them (Open MPI's mpirun has been seen to print that a rank aborted, then wait
    for ever beside its other ranks' zombies)."""
    all_ended = None
    while True:
        try:
            code = proc.wait(timeout=1.0)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        if ranks is None:
            statuses = unreaped_children(proc.pid)
            codes = None if statuses is None else [exit_code(st) for st in statuses]
        else:
            codes = rank_codes(folder)
            codes = codes if len(codes) >= ranks else None
        if codes is None:
            all_ended = None
            continue
        all_ended = all_ended or time.monotonic()
        if time.monotonic() - all_ended > LAUNCHER_GRACE:
            print(
                f"master: every rank ended {LAUNCHER_GRACE:g} s ago but the launcher did not: ending it",
                flush=True,
            )
            proc.kill()
            proc.wait()
            return next((c for c in codes if c != 0), 0)


def unreaped_children(pid: int) -> list[int] | None:
    """The wait statuses of ``pid``'s children when it has some and every one has ended without being
    reaped (zombies: ``/proc/<child>/stat`` keeps the status, field 52); None otherwise."""
    statuses = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) < 50 or fields[1] != str(pid):
            continue
        if fields[0] != "Z":
            return None
        statuses.append(int(fields[49]))
    return statuses or None


def exit_code(status: int) -> int:
    """A wait status as a shell says it: the exit code, or 128 + the signal that ended the process."""
    return (status >> 8) & 0xFF if status & 0x7F == 0 else 128 + (status & 0x7F)


def rank_codes(folder: Path) -> list[int]:
    """The exit codes the ranks that have ended wrote."""
    codes = []
    for path in folder.glob("rank-*.exit"):
        try:
            codes.append(int(path.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return codes


def slave(args) -> int:
    folder = Path(FOLDER)
    folder.mkdir(exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    me = folder / f"slave{args.index}.json"
    write_json(me, {"host": this_host(), "slots": 1, "pid": os.getpid()})
    print(f"slave {args.index}: registered {me} on {this_host()}", flush=True)
    try:
        while not stop:
            if (folder / "ended").exists():
                state = (read_json(folder / "run.json") or {}).get("state", "ended")
                print(f"slave {args.index}: run {state}; leaving", flush=True)
                break
            time.sleep(POLL)
    finally:
        me.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    program: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, program = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="rank.py")
    p.add_argument("role", choices=["master", "slave"])
    p.add_argument("--run", type=int, required=True)
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--index", type=int)
    args = p.parse_args(argv)
    if args.role == "master":
        return master(args, program)
    return slave(args)


if __name__ == "__main__":
    sys.exit(main())
