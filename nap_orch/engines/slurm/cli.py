"""Slurm's client commands (sbatch, squeue, scancel, sinfo, scontrol), run as processes, with Slurm's
errors turned into ours, and the rows squeue shows."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from dataclasses import dataclass

from ...errors import EngineError
from .config import SlurmSettings

# Slurm job states (squeue %T) after which nothing of the job runs any more.
TERMINAL = {
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}
# Terminal states in which Slurm ended the job (not its program): the instance was lost, whatever
# exit code its script recorded (a program killed by Slurm's TERM may be reaped before the script's
# trap runs, which then records a plain exit code 143).
ENDED_BY_SLURM = {"CANCELLED", "NODE_FAIL", "TIMEOUT", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED"}
ACTIVE = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}
UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted",
    "Communication connection failure",
)
SQUEUE_FORMAT = "%k|%i|%j|%T|%N|%r"


@dataclass
class Row:
    """One line of squeue: a job, an array task (``12_3``) or a het component (``12+1``)."""

    id: str
    name: str
    state: str
    nodes: str
    reason: str

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def jobid(self) -> str:
        """What scancel and the run files name: ``12_3`` for a task, ``12`` for a job or het job."""
        return self.id.split("+")[0]


def client_env() -> dict[str, str]:
    """The environment of Slurm's commands and so of the jobs (sbatch exports it): nothing of ours
    (the admin token stays here) and nothing of a Slurm job this process may run in, but SLURM_CONF."""
    env = {k: v for k in ("PATH", "HOME", "LANG", "USER", "LOGNAME", "SLURM_CONF") if (v := os.environ.get(k))}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


class SlurmCli:
    """sbatch, squeue, scancel, sinfo and scontrol, run as processes with Slurm's errors turned into ours."""

    def __init__(self, settings: SlurmSettings, tag: str):
        self.bin = settings.bin
        self.partition = settings.partition
        self.tag = tag
        self.env = client_env()
        self._max_array: int | None = None
        self._nodes: tuple[float, list[tuple[str, str, str]]] = (0.0, [])

    def path(self, prog: str) -> str:
        if self.bin:
            return os.path.join(self.bin, prog)
        return shutil.which(prog, path=self.env["PATH"]) or prog

    async def run(self, prog: str, *args: str, input: str | None = None, timeout: float = 120.0) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path(prog),
                *args,
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise EngineError(
                f"{prog} is not installed here (Slurm's client commands are needed by the slurm engine)"
            ) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode:
            raise slurm_error(prog, err.decode(errors="replace"), proc.returncode)
        return out.decode(errors="replace")

    async def sbatch(self, script: str) -> str:
        """Submit a script (its ``#SBATCH`` lines say everything); the job id."""
        out = await self.run("sbatch", "--parsable", input=script)
        return out.strip().split(";")[0]

    async def squeue(self, names: set[str] | None = None) -> dict[str, Row]:
        """Our jobs (tagged with our comment), with array tasks one by one, ended ones included."""
        args = ["-h", "-r", "-t", "all", "-o", SQUEUE_FORMAT]
        if names is not None:
            if not names:
                return {}
            args += ["-n", ",".join(sorted(names))]
        else:
            args += ["-u", str(os.getuid())]
        rows = {}
        for line in (await self.run("squeue", *args)).splitlines():
            parts = line.split("|", 5)
            if len(parts) == 6 and parts[0] == self.tag:
                row = Row(parts[1], parts[2], parts[3], "" if parts[4] in ("", "(null)") else parts[4], parts[5])
                rows[row.id] = row
        return rows

    async def scancel(self, ids: list[str], signal_name: str | None = None) -> None:
        """Cancel (or signal the whole of) jobs by id, 200 per call."""
        ids = list(dict.fromkeys(ids))
        extra = ["--full", f"--signal={signal_name}"] if signal_name else []
        for i in range(0, len(ids), 200):
            await self.run("scancel", *extra, *ids[i : i + 200])

    async def nodes(self, max_age: float = 5.0) -> list[tuple[str, str, str]]:
        """(node, address, state) of the partition's nodes (sinfo, cached a few seconds)."""
        t, found = self._nodes
        if time.monotonic() - t > max_age:
            args = ["-h", "-N", "-o", "%N|%o|%t"] + (["-p", self.partition] if self.partition else [])
            seen: dict[str, tuple[str, str, str]] = {}
            for line in (await self.run("sinfo", *args)).splitlines():
                parts = line.split("|")
                if len(parts) == 3:
                    seen.setdefault(parts[0], (parts[0], parts[1], parts[2]))
            found = list(seen.values())
            self._nodes = (time.monotonic(), found)
        return found

    async def up_nodes(self) -> list[tuple[str, str, str]]:
        return [n for n in await self.nodes() if node_up(n[2])]

    async def max_array_size(self) -> int:
        if self._max_array is None:
            out = await self.run("scontrol", "show", "config")
            m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
            self._max_array = int(m.group(1)) if m else 1001
        return self._max_array


def node_up(state: str) -> bool:
    """sinfo's %t: idle, mix, alloc, comp, resv, plnd take jobs; down, drain, fail, maint ... don't. A
    trailing '*' (not responding) alone does not count: a busy slurmd is late to answer, and Slurm
    marks a node DOWN itself after SlurmdTimeout."""
    return state.rstrip("*~#!%$@^-+") in {"idle", "mix", "alloc", "comp", "resv", "plnd"}


def slurm_error(prog: str, stderr: str, code: int) -> EngineError:
    message = "; ".join(line.strip() for line in stderr.strip().splitlines() if line.strip()) or f"exit code {code}"
    if any(marker in stderr for marker in UNREACHABLE):
        return EngineError(f"the Slurm controller is unreachable: {message}")
    if prog == "sbatch":
        return EngineError(f"Slurm rejected the job: {message}")
    return EngineError(f"{prog} failed: {message}")
