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

With ``NAP_MPI_AGENT=1`` (a cluster engine: Slurm, where each unit runs in its tenant's sandbox on its
own node) the slaves host the ranks themselves: the hostfile names the master's own node
``localhost`` and each slave ``nap-slave<i>``, and mpirun starts Open MPI's daemon (``orted``) on a
slave through this file as its remote shell (``plm_rsh_agent``) instead of ssh::

    .nap-mpi/exec<i>.json    the command mpirun gave for slave i ({"command"}), written by the agent
    .nap-mpi/exec<i>.exit    how it ended ({"code"}), written by the slave

The slave runs that command in its own sandbox as the tenant, and ends it when the run ends. So a
run's every process is its tenant's, in a sandbox and a control group, and nothing of Slurm's runs a
rank: the run needs no credential and no Slurm launcher (PMIx) inside the sandbox. A command file is
the tenant's own and runs as the tenant: it gives nothing the tenant does not have already. A run
whose mpirun has started no rank ``NAP_MPI_WAIT_TIMEOUT`` seconds after it began (its daemons never
reported back) is ended and fails saying so, instead of waiting for ever.
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
# A launcher still running this long after every process it started has ended (unreaped) is ended.
LAUNCHER_GRACE = 10.0
AGENT_HOST = "nap-slave"  # the hostfile's name for slave i, with the agent: nap-slave<i>


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
    agent = os.environ.get("NAP_MPI_AGENT") == "1"
    hosts = hostfile(this_host(), slaves, agent)
    with open("hostfile", "w") as f:
        for host, slots in hosts.items():
            f.write(f"{host} slots={slots}\n")
    ranks = sum(hosts.values())
    print(f"master: hostfile {dict(hosts)}; running {ranks} ranks", flush=True)
    run.set(state="running", ranks=ranks)
    launch = [os.environ.get("NAP_MPIRUN") or "mpirun", "--hostfile", "hostfile", "-np", str(ranks), "--oversubscribe"]
    if agent:
        launch += agent_options()
    argv = [*launch, *program]
    print("master: " + " ".join(argv), flush=True)
    proc = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = wait_launcher(proc, startup=timeout if agent else None)
    except NeverStarted as e:
        print(f"master: {e}; mpirun ended", flush=True)
        return run.end("failed", 3, error=str(e))
    print(f"master: mpirun exited with code {code}", flush=True)
    return run.end("succeeded" if code == 0 else "failed", code)


def hostfile(me: str, slaves: dict[str, dict], agent: bool) -> Counter:
    """The hostfile's hosts and slots: the master's host (rank 0 runs beside the master) and the slaves'.
    With the agent, each slave is a host of its own (``nap-slave<i>``: its sandbox on its node), and the
    master's is ``localhost`` (mpirun starts those ranks itself)."""
    if not agent:
        return Counter([me] + [s["host"] for s in slaves.values()])
    hosts = Counter({"localhost": 1})
    for name, data in slaves.items():
        slots = data.get("slots")
        hosts[AGENT_HOST + name.removeprefix("slave")] = slots if isinstance(slots, int) and slots > 0 else 1
    return hosts


def agent_options() -> list[str]:
    """mpirun's options that make this file its remote shell: ``rank.py agent HOST COMMAND...``. Every
    daemon is started by the master (no tree spawn: a slave starts nothing on another)."""
    me = os.path.abspath(__file__)
    return [
        "--mca", "plm", "rsh",
        "--mca", "plm_rsh_agent", f"{sys.executable or 'python3'} {me} agent",
        "--mca", "plm_rsh_no_tree_spawn", "1",
        # daemons call back over IPv4: a launch hung about once in 10 here with IPv6 offered (0 in 16 without)
        "--mca", "oob_tcp_disable_ipv6_family", "1",
    ]  # fmt: skip


def agent(host: str, words: list[str]) -> int:
    """mpirun's remote shell: hand ``words`` (the daemon's command line, for a shell) to the slave that is
    ``host`` through the run's folder, and wait until it has ended there; its exit code is ours."""
    folder = Path(FOLDER)  # mpirun's working directory, the run's folder, is the agent's
    index = host.removeprefix(AGENT_HOST)
    if not host.startswith(AGENT_HOST) or not index.isdigit():
        print(f"agent: {host!r} is not a slave of this run ({AGENT_HOST}<i>)", file=sys.stderr, flush=True)
        return 255
    request, done, slave_file = (
        folder / f"{n}{index}.{ext}" for n, ext in (("exec", "json"), ("exec", "exit"), ("slave", "json"))
    )
    done.unlink(missing_ok=True)
    write_json(request, {"command": " ".join(words), "agent": os.getpid()})
    while True:
        ended = read_json(done)
        if ended is not None:
            code = ended.get("code")
            return code if isinstance(code, int) else 255
        if not slave_file.exists():
            print(f"agent: slave {index} left before its command ended", file=sys.stderr, flush=True)
            return 255
        time.sleep(POLL)


class NeverStarted(Exception):
    """mpirun started no rank in time: its daemons never reported back."""


def wait_launcher(proc: subprocess.Popen, startup: float | None = None) -> int:
    """The launcher's exit code. A launcher that outlives every process it started by
    ``LAUNCHER_GRACE`` seconds while it has not reaped them is ended, and the run's code is theirs (the
    first that is not 0): Open MPI's mpirun has been seen to print that a rank aborted, then wait for
    ever beside its other ranks' zombies.

    With ``startup`` (the agent's way), a launcher that has started no rank of its own host within that
    many seconds is ended, and ``NeverStarted`` says so: mpirun starts its own host's rank (there is
    always one: ``localhost slots=1``) only once every slave's daemon has reported back, and a daemon
    that never does would otherwise hold the run for ever (seen here: daemons started, no rank ran)."""
    all_ended = None
    began = time.monotonic()
    while True:
        try:
            code = proc.wait(timeout=1.0)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        kids = children(proc.pid)  # one look at /proc for both questions
        if startup is not None:
            if launched(kids):
                startup = None
            elif time.monotonic() - began > startup:
                end_launcher(proc)
                raise NeverStarted(f"mpirun started no rank within {startup:g} s: its daemons did not report back")
        statuses = unreaped(kids)
        codes = None if statuses is None else [exit_code(st) for st in statuses]
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


def end_launcher(proc: subprocess.Popen) -> None:
    """TERM (mpirun then ends what it started), KILL after 5 s."""
    proc.terminate()
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[tuple[int, list[str]]]:
    """``pid``'s children: each one's pid and its ``/proc/<child>/stat`` fields after the name."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            out.append((int(entry), fields))
    return out


def launched(kids: list[tuple[int, list[str]]]) -> bool:
    """Whether mpirun, whose ``children`` these are, runs a process other than its remote shells
    (``rank.py agent ...``): a rank of its own host."""
    for child, fields in kids:
        if fields[0] == "Z":
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"rank.py") and argv[2] == b"agent":
            continue
        return True
    return False


def unreaped(kids: list[tuple[int, list[str]]]) -> list[int] | None:
    """The wait statuses of a process's ``children`` when it has some and every one has ended without
    being reaped (zombies: ``/proc/<child>/stat`` keeps the status, field 52); None otherwise."""
    statuses = []
    for _, fields in kids:
        if fields[0] != "Z" or len(fields) < 50:
            return None
        statuses.append(int(fields[49]))
    return statuses or None


def exit_code(status: int) -> int:
    """A wait status as a shell says it: the exit code, or 128 + the signal that ended the process."""
    return (status >> 8) & 0xFF if status & 0x7F == 0 else 128 + (status & 0x7F)


def slave(args) -> int:
    folder = Path(FOLDER)
    folder.mkdir(exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    me = folder / f"slave{args.index}.json"
    write_json(me, {"host": this_host(), "slots": 1, "pid": os.getpid()})
    print(f"slave {args.index}: registered {me} on {this_host()}", flush=True)
    daemon = Daemon(folder, args.index)
    try:
        while not stop:
            if (folder / "ended").exists():
                state = (read_json(folder / "run.json") or {}).get("state", "ended")
                print(f"slave {args.index}: run {state}; leaving", flush=True)
                break
            daemon.look()
            time.sleep(POLL)
    finally:
        daemon.end()
        me.unlink(missing_ok=True)
    return 0


class Daemon:
    """What mpirun asked a slave to run through the agent (Open MPI's ``orted``, which starts the slave's
    ranks): started once asked, its exit code written once it ends, ended with the slave."""

    def __init__(self, folder: Path, index: int):
        self.request = folder / f"exec{index}.json"
        self.done = folder / f"exec{index}.exit"
        self.index = index
        self.proc: subprocess.Popen | None = None

    def look(self) -> None:
        if self.proc is None:
            asked = read_json(self.request)
            if asked is None or not isinstance(asked.get("command"), str):
                return
            self.request.unlink(missing_ok=True)
            print(f"slave {self.index}: starting Open MPI's daemon for the master", flush=True)
            self.proc = subprocess.Popen(["/bin/sh", "-c", asked["command"]], start_new_session=True)
        elif (code := self.proc.poll()) is not None:
            self.finished(code)

    def finished(self, code: int) -> None:
        code = code if code >= 0 else 128 - code
        print(f"slave {self.index}: Open MPI's daemon exited with code {code}", flush=True)
        write_json(self.done, {"code": code})
        self.proc = None

    def end(self) -> None:
        """End what it still runs: TERM to its whole group, KILL after 5 s."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.finished(self.proc.wait(wait))
                return
            except subprocess.TimeoutExpired:
                continue


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"] and len(argv) >= 2:  # mpirun's remote shell: agent HOST COMMAND...
        return agent(argv[1], argv[2:])
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
