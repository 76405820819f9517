"""A real, private Slurm cluster for tests, started in a temporary folder.

``SlurmCluster(base_dir, nodes=1)`` runs its own munged, slurmctld and one slurmd per node (all on
this host, each node on its own port) as foreground subprocesses that it owns.  Everything lives
under ``base_dir``: the munge key and socket, slurm.conf, state and spool folders, pid files and logs.
Ports are picked free, and the ClusterName is unique, so several clusters (and a system one) can run
side by side.  No pytest dependency.

    with SlurmCluster(tmp_path, nodes=2) as c:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=c.full_env())

Client commands (sbatch, squeue, scancel, srun, scontrol, sinfo) talk to this cluster when given
``c.env`` (``SLURM_CONF`` pointing at our slurm.conf, whose ``AuthInfo=socket=...`` names our munge
socket).  ``c.full_env()`` is ``os.environ`` without inherited ``SLURM_*`` variables, plus ``c.env``.

Requires root (SlurmUser=root) and Debian's slurm-wlm 22.05 and munge.  No cgroups are used:
``proctrack/linuxproc``, ``task/none``, so ``--mem`` is accepted but not enforced unless the cluster
is built with ``enforce_memory=True`` (jobacct_gather/linux polling with OverMemoryKill).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from nap_orch.engines.slurm.cli import TERMINAL

__all__ = ["SlurmCluster", "SlurmClusterError", "slurm_available"]

# Set in the environment of every daemon we start; slurmstepd inherits slurmd's environment, so
# this finds the step daemons (and via SLURM_CLUSTER_NAME the job processes) of this cluster.
MARKER = "NAP_TEST_SLURM_CLUSTER"
NODE_MARKER = "NAP_TEST_SLURM_NODE"
# How long node_down() lets slurmctld kill a node's jobs before it kills the slurmd (KillWait=2).
KILL_WAIT_S = 8.0

# Variables a Slurm job or a user's shell may carry that would steer our client commands elsewhere.
_INHERITED_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")


class SlurmClusterError(RuntimeError):
    pass


def slurm_available() -> tuple[bool, str]:
    """(True, "") when this machine can run a SlurmCluster, else (False, reason)."""
    for prog in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(prog) is None and not Path("/usr/sbin", prog).exists():
            return False, f"{prog} is not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return False, "the test Slurm cluster runs its daemons as root (SlurmUser=root)"
    return True, ""


def _which(prog: str) -> str:
    path = shutil.which(prog)
    if path is None and Path("/usr/sbin", prog).exists():
        path = str(Path("/usr/sbin", prog))
    if path is None:
        raise SlurmClusterError(f"{prog} not found on PATH")
    return path


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty)"


def _others_can_read(path: Path) -> bool:
    """True when any user may read `path` (o+r on it, o+x on every folder above it)."""
    path = Path(path).resolve()
    try:
        if not path.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def _proc_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, _, v = item.partition(b"=")
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def _pids() -> Iterable[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors() -> set[int]:
    """This process and its ancestors: never kill those."""
    out = set()
    pid = os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = _ppid(pid)
    return out


class SlurmCluster:
    """A private Slurm 22.05 cluster of ``nodes`` slurmd nodes (n1, n2, ...) on this host."""

    def __init__(
        self,
        base_dir: Path | str,
        nodes: int = 1,
        *,
        cpus: int = 256,
        real_memory_mb: int | None = None,
        partition: str = "nap",
        oversubscribe: str = "FORCE:64",
        enforce_memory: bool = False,
        slurmd_timeout: int = 10,
        message_timeout: int = 10,
        return_to_service: int = 2,
        bf_interval: int = 2,
        start_timeout: float = 30.0,
        extra_conf: str = "",
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.base_dir = Path(base_dir).resolve()
        self.nodes = nodes
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.partition = partition
        self.cpus = cpus
        # Fake sizes are fine: SlurmdParameters=config_overrides trusts slurm.conf over hardware.
        # With enforce_memory memory is a consumable resource, so give every node plenty.
        self.real_memory_mb = real_memory_mb or (1048576 if enforce_memory else 16384)
        self.oversubscribe = oversubscribe
        self.enforce_memory = enforce_memory
        self.slurmd_timeout = slurmd_timeout
        self.message_timeout = message_timeout
        self.return_to_service = return_to_service
        self.bf_interval = bf_interval
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        b = self.base_dir
        # ClusterName: lower case, short, unique per instance; slurmctld refuses to start on a
        # StateSaveLocation written under another name, so a reused base_dir keeps its name.
        saved = b / "state" / "clustername"
        self.cluster_name = (saved.read_text().strip() if saved.is_file() else "") or "nap" + secrets.token_hex(4)
        self.hostname = socket.gethostname().split(".")[0]
        self.conf_path = b / "etc" / "slurm.conf"
        self.munge_dir = b / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.munge_key = b / "etc" / "munge.key"
        self.jwt_key = b / "etc" / "jwt.key"
        self.log_dir = b / "log"
        self.state_dir = b / "state"
        self.spool_dir = b / "spool"
        self.tmpfs_dir = b / "tmp"
        self.run_dir = b / "run"

        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf_path)}

        self._munged: subprocess.Popen | None = None
        self._ctld: subprocess.Popen | None = None
        self._slurmd: dict[str, subprocess.Popen] = {}
        self._restd: subprocess.Popen | None = None
        self._restd_socket: Path | None = None
        self._restd_port: int | None = None
        self._started = False
        self.startup_seconds: float | None = None

    # ----------------------------------------------------------------- environment and commands
    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ without inherited SLURM_* variables, plus self.env (and extra)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; text output."""
        proc = subprocess.run(
            list(args),
            env=self.full_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def _daemon_env(self, node: str | None = None) -> dict[str, str]:
        env = self.full_env({MARKER: self.cluster_name})
        if node:
            env[NODE_MARKER] = node
        return env

    # ------------------------------------------------------------------------------- set-up
    def _prepare_dirs(self) -> None:
        for d in (
            self.base_dir,
            self.conf_path.parent,
            self.log_dir,
            self.state_dir,
            self.spool_dir,
            self.tmpfs_dir,
            self.run_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.spool_dir / name).mkdir(exist_ok=True)
            (self.tmpfs_dir / name).mkdir(exist_ok=True)
            os.chmod(self.tmpfs_dir / name, 0o1777)
        # munged insists on a socket folder that is not group/other writable (0755 works) and
        # on a key only its user can read (0400); --force gets it past a lax parent folder.
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        if not self.munge_key.exists():
            self.munge_key.write_bytes(secrets.token_bytes(1024))
        os.chmod(self.munge_key, 0o400)
        if not self.jwt_key.exists():
            self.jwt_key.write_bytes(secrets.token_bytes(32))
        os.chmod(self.jwt_key, 0o600)
        (self.conf_path.parent / "plugstack.conf").write_text("")

    def render_conf(self) -> str:
        """The slurm.conf text for the current ports (written by start())."""
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            # slurmrestd's JWT mode (start_restd); harmless otherwise.
            "AuthAltTypes=auth/jwt",
            f"AuthAltParameters=jwt_key={self.jwt_key}",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmdSpoolDir={self.spool_dir}/%n",
            f"SlurmctldPidFile={self.run_dir}/slurmctld.pid",
            f"SlurmdPidFile={self.run_dir}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={self.tmpfs_dir}/%n",
            f"PlugStackConfig={self.conf_path.parent / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory" if self.enforce_memory else "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            f"SchedulerParameters=default_queue_depth=2000,bf_interval={self.bf_interval},sched_min_interval=200000",
            f"ReturnToService={self.return_to_service}",
            "MaxArraySize=4001",
            "MaxJobCount=100000",
            "MinJobAge=60",
            "KillWait=2",
            "InactiveLimit=0",
            "Waittime=0",
            f"SlurmdTimeout={self.slurmd_timeout}",
            "SlurmctldTimeout=10",
            f"MessageTimeout={self.message_timeout}",
        ]
        if self.enforce_memory:
            lines += [
                "DefMemPerCPU=1024",
                "JobAcctGatherType=jobacct_gather/linux",
                "JobAcctGatherFrequency=task=1",
                "JobAcctGatherParams=OverMemoryKill",
            ]
        else:
            lines.append("JobAcctGatherType=jobacct_gather/none")
        for name in self.node_names:
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.node_ports[name]} "
                f"CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
            f"MaxTime=INFINITE State=UP OverSubscribe={self.oversubscribe}"
        )
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def _spawn(self, argv: list[str], logname: str, env: dict[str, str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{logname}.out", "ab")
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
                start_new_session=True,
            )
        finally:
            out.close()

    def _start_munged(self) -> None:
        argv = [
            _which("munged"),
            "-F",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={self.munge_key}",
            f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={self.run_dir / 'munged.seed'}",
            "--num-threads=4",
        ]
        self._munged = self._spawn(argv, "munged", self._daemon_env())
        self._wait(lambda: self.munge_socket.exists(), 10, "munged socket", procs=[("munged", self._munged)])

    def start_ctld(self) -> None:
        """Start slurmctld (keeps the saved state: jobs survive a restart_ctld())."""
        if self._ctld is not None and self._ctld.poll() is None:
            return
        argv = [_which("slurmctld"), "-D", "-f", str(self.conf_path)]
        self._ctld = self._spawn(argv, "slurmctld", self._daemon_env())
        self._wait(self.ctld_responding, 20, "slurmctld to answer", procs=[("slurmctld", self._ctld)])

    def _start_slurmd(self, name: str) -> None:
        proc = self._slurmd.get(name)
        if proc is not None and proc.poll() is None:
            return
        argv = [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf_path)]
        self._slurmd[name] = self._spawn(argv, f"slurmd.{name}", self._daemon_env(name))

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and the slurmds; return once every node is idle.

        Raises SlurmClusterError (with the daemons' log tails) and cleans up on failure.
        """
        ok, why = slurm_available()
        if not ok:
            raise SlurmClusterError(why)
        if self._started:
            return self
        if len(str(self.munge_socket)) > 100:
            raise SlurmClusterError(f"base_dir too long for a unix socket path: {self.munge_socket}")
        t0 = time.monotonic()
        for attempt in range(3):
            self._started = True
            atexit.register(self.stop)
            try:
                self._prepare_dirs()
                # free now; another process may take one before our daemons bind it: retried
                ports = _free_ports(1 + self.nodes)
                self.ctld_port = ports[0]
                self.node_ports = dict(zip(self.node_names, ports[1:]))
                self.conf_path.write_text(self.render_conf())
                self._start_munged()
                self.start_ctld()
                for name in self.node_names:
                    self._start_slurmd(name)
                self.wait_nodes_idle(self.node_names, self.start_timeout)
                break
            except SlurmClusterError as exc:
                self.stop()
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        self.startup_seconds = time.monotonic() - t0
        return self

    # ------------------------------------------------------------------------------- status
    def ctld_responding(self) -> bool:
        """True when ``scontrol ping`` reaches this cluster's slurmctld."""
        try:
            p = self.run("scontrol", "ping", check=False, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0 and "UP" in p.stdout

    def node_states(self) -> dict[str, str]:
        """{node: state} from sinfo's compact %t: 'idle', 'mix', 'alloc', 'down', 'down*', 'idle*'...

        A trailing '*' means slurmctld gets no answer from that node's slurmd.
        """
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
        out = {}
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def wait_nodes_idle(self, names: Iterable[str] | None = None, timeout: float = 30) -> None:
        names = list(names or self.node_names)

        def ready() -> bool:
            states = self.node_states()
            # idle, or running jobs already (mix/alloc); '*' = not responding, '~'/'#' = power
            return all(states.get(n) in ("idle", "mix", "alloc") for n in names)

        procs = [("slurmctld", self._ctld)] + [(f"slurmd.{n}", self._slurmd.get(n)) for n in names]
        self._wait(ready, timeout, f"nodes {names} to be idle", procs=procs)

    def _wait(
        self, cond: Callable[[], bool], timeout: float, what: str, procs: list[tuple[str, subprocess.Popen | None]] = ()
    ) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if cond():
                return
            for name, proc in procs:
                if proc is not None and proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n{self.log_tails()}"
                    )
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {timeout}s waiting for {what}\n{self.log_tails()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon log (for error messages)."""
        parts = []
        if self.log_dir.exists():
            logs = sorted(self.log_dir.iterdir())
            have_log = {p.stem for p in logs if p.suffix == ".log"}
            for log in logs:
                # daemons in -D mode print their log to stderr (.out) as well: where a .log
                # exists, the .out only matters for what came before logging started (fatals)
                n = 5 if (log.suffix == ".out" and log.stem in have_log) else lines
                parts.append(f"--- {log.name} (last {n} lines) ---\n{_tail(log, n)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------- faults
    def node_down(self, name: str, reason: str = "test", graceful: bool = True) -> None:
        """Take node `name` away: mark it DOWN (its jobs are killed) and kill its slurmd.

        With graceful=False the slurmd and the node's step daemons and tasks are just SIGKILLed
        (a crashed host): slurmctld notices after SlurmdTimeout (about 10 s) and marks it DOWN.
        """
        if graceful:
            self.run("scontrol", "update", f"nodename={name}", "state=down", f"reason={reason}", check=False)
            # let slurmctld deliver the kill to the node's jobs while slurmd is still there
            self._wait_node_processes_gone(name, timeout=KILL_WAIT_S)
        proc = self._slurmd.pop(name, None)
        if proc is not None:
            self._kill_proc(proc, graceful=graceful)
        self._sweep(lambda env: env.get(NODE_MARKER) == name or env.get("SLURMD_NODENAME") == name)
        if graceful:
            # ReturnToService=2 lets a last message of the dying slurmd bring the node back: down again
            self.run("scontrol", "update", f"nodename={name}", "state=down", f"reason={reason}", check=False)

    def node_up(self, name: str, timeout: float = 30) -> None:
        """Start the node's slurmd again, resume it, and wait until it takes jobs."""
        self._start_slurmd(name)
        deadline = time.monotonic() + timeout
        while True:
            state = self.node_states().get(name, "")
            if state in ("idle", "mix", "alloc"):
                return
            if state.startswith(("down", "drain", "fail")) and not state.endswith("*"):
                self.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"node {name} did not come back (state {state!r})\n{self.log_tails()}")
            time.sleep(0.2)

    def stop_ctld(self) -> None:
        """Stop slurmctld (jobs keep running on the nodes; clients get 'Unable to contact')."""
        if self._ctld is not None:
            self._kill_proc(self._ctld)
            self._ctld = None

    def restart_ctld(self) -> None:
        """Stop and start slurmctld; it recovers its jobs from StateSaveLocation."""
        self.stop_ctld()
        self.start_ctld()

    # --------------------------------------------------------------------------- slurmrestd
    def start_restd(self, tcp: bool = False, timeout: float = 20) -> str:
        """Start slurmrestd (openapi/v0.0.38, JWT auth) and return its URL.

        tcp=False: a unix socket; the URL is ``http+unix://<percent-quoted socket path>`` (use
        ``restd_socket`` with aiohttp's UnixConnector or ``curl --unix-socket``).
        tcp=True: ``http://127.0.0.1:<free port>``.
        It runs as ``nobody`` where base_dir lets others read slurm.conf, else as root with
        ``SLURMRESTD_SECURITY=disable_user_check``.
        Every request needs the headers of ``restd_headers()`` (X-SLURM-USER-NAME/-TOKEN).
        """
        if self._restd is not None and self._restd.poll() is None:
            return self.restd_url
        self._restd_socket = None
        self._restd_port = None
        if tcp:
            self._restd_port = _free_ports(1)[0]
            listen = f"127.0.0.1:{self._restd_port}"
        else:
            # slurmrestd drops to `nobody` before it binds: give it a folder it may write.
            restd_dir = self.base_dir / "restd"
            restd_dir.mkdir(exist_ok=True)
            os.chmod(restd_dir, 0o1777)
            self._restd_socket = restd_dir / "slurmrestd.socket"
            if self._restd_socket.exists():
                self._restd_socket.unlink()
            listen = f"unix:{self._restd_socket}"
        env = self._daemon_env()
        env["SLURM_JWT"] = "daemon"
        argv = [_which("slurmrestd"), "-f", str(self.conf_path), "-a", "rest_auth/jwt", "-s", "openapi/v0.0.38"]
        if _others_can_read(self.conf_path):
            # the recommended way: slurmrestd drops to an unprivileged user before reading
            # slurm.conf
            argv += ["-u", "nobody", "-g", "nogroup"]
        else:
            # base_dir is private (pytest's tmp folders are 0700): nobody could not read
            # slurm.conf, so stay root and lift slurmrestd's "not as root/SlurmUser" check
            env["SLURMRESTD_SECURITY"] = "disable_user_check"
        argv.append(listen)
        self._restd = self._spawn(argv, "slurmrestd", env)

        def listening() -> bool:
            if self._restd_socket is not None:
                return self._restd_socket.exists()
            try:
                socket.create_connection(("127.0.0.1", self._restd_port), timeout=0.5).close()
                return True
            except OSError:
                return False

        self._wait(listening, timeout, "slurmrestd to listen", procs=[("slurmrestd", self._restd)])
        return self.restd_url

    @property
    def restd_url(self) -> str:
        if self._restd_port:
            return f"http://127.0.0.1:{self._restd_port}"
        from urllib.parse import quote

        return "http+unix://" + quote(str(self._restd_socket), safe="")

    @property
    def restd_socket(self) -> Path | None:
        """The unix socket of slurmrestd (None when it listens on TCP or is not started)."""
        return self._restd_socket

    def jwt_token(self, user: str = "root", lifespan: int = 3600) -> str:
        """A JWT for `user` from ``scontrol token`` (signed with this cluster's jwt_key)."""
        p = self.run("scontrol", "token", f"username={user}", f"lifespan={lifespan}")
        return p.stdout.strip().split("=", 1)[1]

    def restd_headers(self, user: str = "root") -> dict[str, str]:
        return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": self.jwt_token(user)}

    def stop_restd(self) -> None:
        if self._restd is not None:
            self._kill_proc(self._restd)
            self._restd = None

    # -------------------------------------------------------------------------------- stop
    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job of this cluster (by id, in batches) and wait for the queue to drain."""
        if self._ctld is None or self._ctld.poll() is not None:
            return
        # "123", "124_7" (array task), "125+1" (het component): cancel by the base id, which
        # takes a whole array or het job (a het component alone may not be cancelled)
        p = self.run("squeue", "-h", "-o", "%i", check=False, timeout=30)
        ids: list[str] = []
        for token in p.stdout.split():
            base = token.split("_")[0].split("+")[0]
            if base.isdigit() and base not in ids:
                ids.append(base)
        for i in range(0, len(ids), 200):
            self.run("scancel", *ids[i : i + 200], check=False, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=30)
            live = [s for s in p.stdout.split() if s not in TERMINAL]
            if not live and not self._job_pids():
                return
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop everything this cluster started: jobs, slurmrestd, slurmd, slurmctld, munged."""
        try:
            self.cancel_all()
        except Exception:  # noqa: BLE001 - stop must go on
            pass
        self.stop_restd()
        for name in list(self._slurmd):
            self._kill_proc(self._slurmd.pop(name))
        self.stop_ctld()
        # step daemons and tasks left behind (slurmstepd outlives slurmd on purpose)
        self._sweep(lambda env: True)
        if self._munged is not None:
            self._kill_proc(self._munged)
            self._munged = None
        self._sweep(lambda env: True)
        self._started = False
        atexit.unregister(self.stop)

    def _kill_proc(self, proc: subprocess.Popen, graceful: bool = True) -> None:
        if proc.poll() is not None:
            return
        if graceful:
            proc.terminate()
            try:
                proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _ours(self, env: dict[str, str]) -> bool:
        return env.get(MARKER) == self.cluster_name or env.get("SLURM_CLUSTER_NAME") == self.cluster_name

    def _job_pids(self, pred: Callable[[dict[str, str]], bool] = lambda env: True) -> list[int]:
        """Processes of this cluster other than the daemons we hold as Popen objects."""
        skip = _ancestors()
        held = {
            p.pid for p in [self._munged, self._ctld, self._restd, *self._slurmd.values()] if p and p.poll() is None
        }
        out = []
        for pid in _pids():
            # the daemons we hold, and their own helpers (slurmctld's slurmscriptd)
            if pid in skip or pid in held or _ppid(pid) in held:
                continue
            env = _proc_environ(pid)
            if env and self._ours(env) and pred(env):
                out.append(pid)
        return out

    def _wait_node_processes_gone(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pred = lambda env: env.get(NODE_MARKER) == name or env.get("SLURMD_NODENAME") == name  # noqa: E731
        while time.monotonic() < deadline and self._job_pids(pred):
            time.sleep(0.1)

    def _sweep(self, pred: Callable[[dict[str, str]], bool]) -> None:
        for _ in range(20):
            pids = self._job_pids(pred)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SlurmCluster {self.cluster_name} nodes={self.node_names} conf={self.conf_path}>"
