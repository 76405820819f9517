"""Batch scripts for the Slurm engine: units translated into bash that runs exactly what they say.

A common instance is one task of an array job (the task id is the instance number, less the group's
offset); the array's script is the same few lines for all its tasks, and each instance's own command is
in its task file ``<tasks>/<instance>.sh``, written at submit. A task waits for the port the control plane
assigns once the task's node is known (a file ``<run>/<job>.port``: "port host"), then runs the unit's
command in its ``WorkingDirectory``, with its ``Environment`` plus ``PORT`` and ``NAP_HOST`` and nothing
else (``env -i``, as systemd would), under its ``MemoryMax`` as an address-space limit (``--mem`` is the
real one where Slurm enforces it), writes the program's pid to ``<run>/<job>.started`` once it is
started (the instance is running from then on) and its exit code to ``<run>/<job>.exit`` ("code signalled"):
Slurm's own record of a job is gone ``MinJobAge`` after it ends, and this Slurm has no accounting.

An MPI run is one job: the master's unit runs as the batch script (component 0 of a heterogeneous
job), its slaves as one step over the slaves' tasks (component 1), each unit in its own sandbox and
control group, and the master's mpirun starts Open MPI's daemon on each slave through the run's folder
(``nap_orch.rank``'s agent), which starts the slave's ranks: one MPI world across the nodes, every
process of it its tenant's.

Words are quoted for bash with single quotes (``shlex.quote``): a value is data. The argv markers of
``${PORT}`` and ``${NAP_HOST}`` become ``"${PORT}"``/``"${NAP_HOST}"``; other references take their
value from the unit's environment, as systemd's expansion would.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from ... import units
from ..sandbox import Sandbox

# Exit code of a branch whose WorkingDirectory can't be entered (systemd's 200/CHDIR).
EXIT_CHDIR = 200

PRELUDE = r"""
nap_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
nap_job=${nap_job:-$SLURM_JOB_ID}
nap_event() {  # a journal line like the local agent's: 2025-01-01T00:00:00.000Z nap: text
    local TZ=UTC0 ms=${EPOCHREALTIME#*.}
    printf '%(%Y-%m-%dT%H:%M:%S)T.%sZ nap: %s\n' "${EPOCHREALTIME%.*}" "${ms:0:3}" "$*"
}
nap_nap() {  # sleep $1 seconds without a process (read on a pipe nobody writes)
    [ -n "$nap_fd" ] || exec {nap_fd}<> <(:)
    read -t "$1" -u "$nap_fd"
}
nap_wait_port() {  # the port the control plane assigns to this job on this node
    # polls back off to once a second: a thousand tasks polling ten times a second would keep two
    # cores half busy
    local file=$nap_run/$nap_job.port n=0 t=0.1
    until [ -s "$file" ] && read -r PORT NAP_HOST < "$file"; do  # a whole line: written at once
        nap_nap $t
        case $t in 0.1) t=0.15 ;; 0.15) t=0.25 ;; 0.25) t=0.4 ;; 0.4) t=0.6 ;; 0.6) t=1 ;; esac
        n=$((n + 1))
        if [ $n -eq 60 ]; then
            nap_event "still no port for job $nap_job on $SLURMD_NODENAME: is the nap agent running?"
        fi
    done
    nap_event "started on $NAP_HOST port $PORT (job $nap_job)"
}
nap_box=() nap_group=""  # a sandboxed unit's task file sets them (and nap_stack, nap_tasks)
# The instance's control group (as engines/cgroups.py keeps it, in bash: no process to start): one
# folder on cgroup v2, one per controller (memory, pids, freezer) on v1.
nap_cg_dirs() {
    local c
    if [ -r /sys/fs/cgroup/cgroup.controllers ]; then
        nap_cg=("/sys/fs/cgroup/nap-$nap_stack/$nap_group")
    else
        nap_cg=()
        for c in memory pids freezer; do nap_cg+=("/sys/fs/cgroup/$c/nap-$nap_stack/$nap_group"); done
    fi
}
nap_cg_join() {  # MEMORY_BYTES: this (sub)shell into the instance's group, under its limits
    local mem=$1 d base
    nap_cg_dirs
    base=${nap_cg[0]%/*}
    if [ ${#nap_cg[@]} -eq 1 ]; then
        if [ ! -d "$base" ]; then
            mkdir -p "$base" && echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control &&
                echo "+memory +pids" > "$base/cgroup.subtree_control" || return 1
        fi
        mkdir -p "${nap_cg[0]}" || return 1
        if [ "$mem" -gt 0 ]; then
            echo "$mem" > "${nap_cg[0]}/memory.max" || return 1
            [ -e "${nap_cg[0]}/memory.swap.max" ] && echo 0 > "${nap_cg[0]}/memory.swap.max"
        fi
        echo "${nap_tasks:-max}" > "${nap_cg[0]}/pids.max" || return 1
    else
        mkdir -p "${nap_cg[@]}" || return 1
        read -r d < "$base/memory.use_hierarchy"
        [ "$d" = 1 ] || echo 1 > "$base/memory.use_hierarchy"  # limits hold for subgroups
        if [ "$mem" -gt 0 ]; then  # a fresh group: memory first, then memory + swap (never below it)
            echo "$mem" > "${nap_cg[0]}/memory.limit_in_bytes" || return 1
            [ -e "${nap_cg[0]}/memory.memsw.limit_in_bytes" ] && echo "$mem" > "${nap_cg[0]}/memory.memsw.limit_in_bytes"
        fi
        echo "${nap_tasks:-max}" > "${nap_cg[1]}/pids.max" || return 1
    fi
    for d in "${nap_cg[@]}"; do echo "$BASHPID" > "$d/cgroup.procs" || return 1; done
}
nap_cg_pids() {  # the group's processes, into nap_cg_procs
    nap_cg_procs=()
    [ -r "${nap_cg[0]}/cgroup.procs" ] && mapfile -t nap_cg_procs < "${nap_cg[0]}/cgroup.procs"
}
nap_cg_signal() {  # SIGNAL [PID]: every process of the group but PID
    local p
    nap_cg_dirs
    nap_cg_pids
    for p in "${nap_cg_procs[@]}"; do [ "$p" = "$2" ] || kill -"$1" "$p" 2>/dev/null; done
}
nap_cg_kill() {  # every process of the group, forks in flight too (v1: while frozen)
    local i
    nap_cg_dirs
    if [ ${#nap_cg[@]} -eq 1 ] && [ -e "${nap_cg[0]}/cgroup.kill" ]; then
        echo 1 > "${nap_cg[0]}/cgroup.kill"
    elif [ ${#nap_cg[@]} -eq 3 ] && [ -d "${nap_cg[2]}" ]; then
        echo FROZEN > "${nap_cg[2]}/freezer.state"
        for ((i = 0; i < 20; i++)); do
            nap_cg_pids
            [ ${#nap_cg_procs[@]} -eq 0 ] && break
            kill -KILL "${nap_cg_procs[@]}" 2>/dev/null
        done
        echo THAWED > "${nap_cg[2]}/freezer.state"
    else
        nap_cg_signal KILL
    fi
}
nap_cg_end() {  # kill what is left, count its OOM kills (into nap_oom), remove the group
    local i k v
    nap_oom=0
    nap_cg_dirs
    [ -d "${nap_cg[0]}" ] || return 0
    nap_cg_kill
    for ((i = 0; i < 50; i++)); do nap_cg_pids; [ ${#nap_cg_procs[@]} -eq 0 ] && break; nap_nap 0.1; done
    for k in "${nap_cg[0]}/memory.events" "${nap_cg[0]}/memory.oom_control"; do
        [ -r "$k" ] || continue
        while read -r k v; do [ "$k" = oom_kill ] && nap_oom=$v; done < "$k"
    done
    rmdir "${nap_cg[@]}" 2>/dev/null
    return 0
}
nap_exec() {  # clean|keep WORKDIR MEMORY_KB NAME=VALUE... -- ARGV...: runs it, sets nap_code
    local mode=$1 dir=$2 mem=$3 envs=()
    shift 3
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    nap_signalled=0
    if ! cd -- "$dir"; then
        nap_code=200
        nap_event "could not enter $dir"
        return
    fi
    if [ "$mode" = clean ] && [ -n "$nap_group" ]; then
        # into the instance's control group (its limits over the whole tree), then into its sandbox
        ( nap_cg_join $((mem * 1024)) || { nap_event "cannot apply its limits (control group $nap_group)"; exit 203; }
          exec "${nap_box[@]}" env -i PATH="$PATH" HOME="${HOME:-/}" LANG="${LANG:-C.UTF-8}" "${envs[@]}" "$@" ) &
    elif [ "$mode" = clean ]; then
        ( [ "$mem" -gt 0 ] && ulimit -v "$mem"
          exec env -i PATH="$PATH" HOME="${HOME:-/}" LANG="${LANG:-C.UTF-8}" "${envs[@]}" "$@" ) &
    else
        ( [ "$mem" -gt 0 ] && ulimit -v "$mem"; exec env "${envs[@]}" "$@" ) &
    fi
    nap_pid=$!
    printf '%s\n' "$nap_pid" > "${nap_started:-$nap_run/$nap_job.started}"  # the instance runs from now on
    if [ -n "$nap_group" ] && [ "$mem" -gt 0 ]; then nap_watch_oom & fi
    # Slurm's TERM (scancel, a node taken down, a time limit) reaches the program too; remember it.
    trap 'nap_signalled=1; nap_term' TERM INT HUP
    wait $nap_pid
    nap_code=$?
    while kill -0 $nap_pid 2>/dev/null; do wait $nap_pid; nap_code=$?; done
}
nap_watch_oom() {  # systemd's OOMPolicy=stop: once the kernel kills any of its processes for memory, all go
    local f k v
    while kill -0 "$nap_pid" 2>/dev/null; do
        for f in "/sys/fs/cgroup/memory/nap-$nap_stack/$nap_group/memory.oom_control" \
                 "/sys/fs/cgroup/nap-$nap_stack/$nap_group/memory.events"; do
            [ -r "$f" ] || continue  # not made yet (its task is joining it), or v2 rather than v1
            while read -r k v; do
                if [ "$k" = oom_kill ] && [ "${v:-0}" -gt 0 ]; then
                    nap_cg_kill
                    return
                fi
            done < "$f"
        done
        nap_nap 1
    done
}
nap_term() {  # pass Slurm's TERM on: to the program's whole group, but the sandbox (it says how it ended)
    if [ -n "$nap_group" ]; then
        nap_cg_signal TERM "$nap_pid"
    else
        kill -TERM $nap_pid 2>/dev/null
    fi
}
nap_end() {  # record how it ended, for after Slurm has forgotten the job
    nap_oom=0
    if [ -n "$nap_group" ]; then  # nothing of it outlives it; did the kernel kill any of it for memory?
        nap_cg_end
        [ "${nap_oom:-0}" -gt 0 ] && nap_event "killed for memory: $nap_oom process(es) over its MemoryMax"
    fi
    printf '%s %s %s\n' "$nap_code" "$nap_signalled" "${nap_oom:-0}" > "$nap_run/$nap_job.exit"
    if [ "$nap_signalled" = 1 ]; then
        nap_event "exited with code $nap_code (signalled by Slurm)"
    else
        nap_event "exited with code $nap_code"
    fi
    exit "$nap_code"
}
"""


def bash_word(word: str, env: dict[str, str]) -> str:
    """One argv word (with reference markers) as one bash word."""
    parts = word.split(units.MARK)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                out.append(shlex.quote(part))
        elif part in units.PLATFORM_VARS:
            out.append('"${%s}"' % part)
        else:
            out.append(shlex.quote(env.get(part, "")))
    return "".join(out) or "''"


def memory_kib(unit: units.Unit) -> int:
    return -(-unit.memory_max // 1024) if unit.memory_max else 0


def memory_mib(unit: units.Unit) -> int | None:
    """``--mem`` (MiB, rounded up) for a unit's ``MemoryMax``."""
    return -(-unit.memory_max // (1024 * 1024)) if unit.memory_max else None


def exec_line(unit: units.Unit, mode: str, extra_env: Sequence[str] = (), memory: bool = True) -> str:
    """``nap_exec`` of the unit: its folder, memory, environment and argv."""
    env = [shlex.quote(f"{k}={v}") for k, v in unit.env.items() if k not in units.PLATFORM_VARS]
    words = [bash_word(w, unit.env) for w in unit.argv]
    mem = memory_kib(unit) if memory else 0
    return " ".join(["nap_exec", mode, shlex.quote(unit.workdir), str(mem), *env, *extra_env, "--", *words])


def header(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {opt}" for opt in options)


SECCOMP_FD = "$nap_sfd"  # the word in nap_box for the fd that NodeSandbox's lines open the filter on


@dataclass(frozen=True)
class NodeSandbox:
    """How a node sandboxes a unit with ``User=`` (``engines.sandbox``, rendered here at submit), and
    the stack its control groups are under (``nap-<stack>/<instance>``, made by the task itself).

    With ``seccomp`` (the filter's file, ``engines.seccomp``, made by the engine on the shared filesystem),
    the lines open it on a descriptor of their own (``nap_sfd``) for the sandbox's ``bwrap --seccomp``,
    which reads it to its end: so they come right before the ``nap_exec`` of the sandbox they are for. A
    node that can't open it starts no sandbox (bwrap refuses the empty fd), never one without the filter."""

    stack: str
    hidden: str  # NAP_HOME
    seccomp: str | None = None

    def lines(self, unit: units.Unit) -> list[str]:
        assert unit.user is not None and unit.group is not None
        fd = SECCOMP_FD if self.seccomp else None
        box = Sandbox(unit.user, unit.group, unit.workdir, hidden=(self.hidden,)).argv([], seccomp_fd=fd)
        out = []
        if self.seccomp:
            out.append(
                f"exec {{nap_sfd}}<{shlex.quote(self.seccomp)} || "
                f"nap_event {shlex.quote(f'cannot read the seccomp filter {self.seccomp}: no sandbox starts')}"
            )
        return [
            *out,
            "nap_box=(" + " ".join('"$nap_sfd"' if w == SECCOMP_FD else shlex.quote(w) for w in box) + ")",
            f"nap_group={shlex.quote(unit.name)} nap_tasks={unit.tasks_max or 'max'} nap_stack={shlex.quote(self.stack)}",
        ]


def task_line(unit: units.Unit, sandbox: NodeSandbox | None = None) -> str:
    """What a common instance's array task runs once it has its port: the ``nap_exec`` of its unit (the
    content of its task file, ``<tasks>/<instance>.sh``), in its sandbox where it names its tenant."""
    lines = sandbox.lines(unit) if sandbox is not None and unit.user is not None else []
    lines.append(exec_line(unit, "clean", ['"PORT=${PORT}"', '"NAP_HOST=${NAP_HOST}"']))
    return "\n".join(lines) + "\n"


def array_script(run_dir: str, tasks_dir: str, base: str, offset: int, count: int, options: list[str]) -> str:
    """An array job's script: task ``t`` runs instance ``<base>@<t + offset>`` by sourcing its task file.
    The script stays the same few lines for any number of tasks: Slurm ships it to the node with every
    task and bash parses it there, and a script with a branch per task (250 of them) made a launch of
    1,000 tasks 30% slower here."""
    task_file = f"{shlex.quote(tasks_dir)}/{shlex.quote(base)}@$((SLURM_ARRAY_TASK_ID + {offset})).sh"
    lines = [
        "#!/bin/bash",
        header(options),
        f"# nap-orch: {count} common instance(s), one array task each",
        f"nap_run={shlex.quote(run_dir)}",
        PRELUDE,
        f"nap_unit={task_file}",
        'if [ ! -r "$nap_unit" ]; then nap_event "no unit for array task $SLURM_ARRAY_TASK_ID ($nap_unit)"; exit 1; fi',
        "nap_wait_port",
        '. "$nap_unit"',
        "nap_end",
        "",
    ]
    return "\n".join(lines)


def slave_step(slaves: list[units.Unit], journals: list[str], extra_env: list[str], sandbox: NodeSandbox | None) -> str:
    """What each task of the slaves' step runs: slave ``SLURM_PROCID + 1``'s unit, into its own journal,
    in its sandbox and control group where it names its tenant (as a common instance's task does)."""
    lines = [PRELUDE, 'case "$SLURM_PROCID" in']
    for i, (unit, journal) in enumerate(zip(slaves, journals)):
        box = sandbox.lines(unit) if sandbox is not None and unit.user is not None else []
        lines += [
            f"{i})",
            f"    exec >> {shlex.quote(journal)} 2>&1",
            '    nap_event "started on $SLURMD_NODENAME (job $SLURM_JOB_ID)"',
            *(f"    {line}" for line in box),
            # its run's state is the master's job's: a slave's own start and end are its journal's
            f"    nap_started=/dev/null {exec_line(unit, 'clean', extra_env)}",
            '    [ -n "$nap_group" ] && nap_cg_end',
            '    nap_event "exited with code $nap_code" ;;',
        ]
    lines += ["esac"]
    return "\n".join(lines)


def mpi_script(
    run_dir: str,
    master: units.Unit,
    slaves: list[units.Unit],
    slave_journals: list[str],
    options: list[str],
    slave_srun: list[str],
    mpi_env: dict[str, str],
    sandbox: NodeSandbox | None = None,
) -> str:
    """An MPI run's script: the slaves' step in the background, the master, then the slaves' step is
    waited for. Every unit runs as a common instance's does (in its sandbox and control group where it
    names its tenant, with only its own environment); the master's mpirun starts the ranks on the slaves
    through the run's folder (``nap_orch.rank``'s agent), so no rank is Slurm's."""
    extra = [shlex.quote(f"{k}={v}") for k, v in {**mpi_env, "NAP_MPI_AGENT": "1"}.items()]
    # the node a unit runs on, as a rank's host and as Slurm would name it (a name, no credential)
    extra += ['"NAP_HOST=${SLURMD_NODENAME}"', '"SLURMD_NODENAME=${SLURMD_NODENAME}"']
    box = sandbox.lines(master) if sandbox is not None and master.user is not None else []
    lines = [
        "#!/bin/bash",
        header(options),
        f"# nap-orch: MPI run {master.name}: a master and {len(slaves)} slave(s)",
        f"nap_run={shlex.quote(run_dir)}",
        PRELUDE,
        'nap_event "job $SLURM_JOB_ID: master on $SLURMD_NODENAME, slaves on '
        '${SLURM_JOB_NODELIST_HET_GROUP_1:-$SLURM_JOB_NODELIST}"',
        f"nap_slave={shlex.quote(slave_step(slaves, slave_journals, extra, sandbox))}",
        f"nap_run={shlex.quote(run_dir)} " + " ".join(shlex.quote(w) for w in slave_srun) + ' bash -c "$nap_slave" &',
        "nap_slaves=$!",
        *box,
        exec_line(master, "clean", extra),
        # the slaves leave when the run's record says it ended; don't wait for ever if one can't
        "for i in $(seq 100); do kill -0 $nap_slaves 2>/dev/null || break; nap_nap 0.1; done",
        "kill -TERM $nap_slaves 2>/dev/null",
        "nap_end",
        "",
    ]
    return "\n".join(lines)


def ranges(numbers: list[int]) -> str:
    """``1-3,7,9-10`` for [1, 2, 3, 7, 9, 10] (sbatch's --array)."""
    out, nums = [], sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)
