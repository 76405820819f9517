"""The nap agent, driven through LocalEngine: real agent processes running real instance processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from nap_orch.config import Settings
from nap_orch.engines.base import UnitSpec
from nap_orch.engines.local import LocalEngine
from nap_orch.errors import EngineError, NotFound
from nap_orch.units import PORT_REF, Unit, render

MiB = 1024 * 1024
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
NASTY = [
    "a b",
    "; rm -rf ~",
    "%n",
    "%%i",
    'q"uote',
    "'single'",
    "back\\slash",
    "\\",
    "${PORT}",
    "$HOME",
    "$$",
    "$",
    "",
    " spaced ",
    "é€😀",
    "#hash",
    "--port={port}",
]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Agent:
    home: Path
    proc: subprocess.Popen
    engine: LocalEngine
    log: Path


def start_agent(home: Path) -> tuple[subprocess.Popen, Path]:
    log = home / f"agent-{time.monotonic_ns()}.log"
    # The supervisor's own mechanics, with units of the tests' own folders: unsandboxed. The sandboxed
    # path (tenant uids, control groups) runs in every stack test and in test_isolation.py.
    env = {**os.environ, "NAP_HOME": str(home), "NAP_SANDBOX": "off"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nap_orch", "agent"], env=env, stdout=f, stderr=subprocess.STDOUT
        )
    return proc, log


async def until(check, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll the async ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


async def wait_ready(engine: LocalEngine, proc: subprocess.Popen, log: Path) -> None:
    async def answers():
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited: {log.read_text()}")
        try:
            await engine.instances("")
            return True
        except EngineError:
            return False

    await until(answers, what="the agent to answer")


async def open_agent(home: Path) -> Agent:
    proc, log = start_agent(home)
    engine = LocalEngine(Settings(home=home, sandbox=False))
    await engine.open()
    await wait_ready(engine, proc, log)
    return Agent(home, proc, engine, log)


async def close_agent(agent: Agent) -> None:
    try:
        if agent.proc.poll() is None:
            await agent.engine.remove([s.name for s in await agent.engine.instances("")])
    finally:
        await agent.engine.close()
        if agent.proc.poll() is None:
            agent.proc.terminate()
        agent.proc.wait(10)


@pytest.fixture(scope="module")
async def agent(tmp_path_factory):
    a = await open_agent(tmp_path_factory.mktemp("nap"))
    yield a
    await close_agent(a)


def spec(name: str, argv: list[str], workdir: Path, port: int = 20001, env: dict | None = None, **kw) -> UnitSpec:
    unit = Unit(
        name=name,
        description=f"test {name}",
        argv=argv,
        workdir=str(workdir),
        env={"PORT": str(port), **(env or {})},
        **kw,
    )
    return UnitSpec(name, render(unit))


async def status(agent: Agent, name: str):
    return (await agent.engine.status([name]))[name]


async def state_is(agent: Agent, name: str, *states: str, timeout: float = 15.0):
    async def check():
        st = await status(agent, name)
        return st if st.state in states else None

    return await until(check, timeout=timeout, what=f"{name} to be {'/'.join(states)}")


async def journal(agent: Agent, name: str, lines: int = 1000) -> list[str]:
    return [line async for line in agent.engine.journal(name, lines=lines)]


async def journal_has(agent: Agent, name: str, pattern: str, timeout: float = 15.0) -> list[str]:
    async def check():
        got = await journal(agent, name)
        return got if any(re.search(pattern, line) for line in got) else None

    return await until(check, timeout=timeout, what=f"{pattern!r} in the journal of {name}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``marker``, but for their own children: a
    shell's child between its fork and its exec (a ticker's ``sleep``) still carries its command line."""
    found: dict[int, int] = {}  # pid -> parent pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if alive(int(entry)):
            found[int(entry)] = parent
    return [pid for pid, parent in found.items() if parent not in found]


SH = "/bin/sh"


# ---------------------------------------------------------------------------------------------
# running exactly what the unit says


async def test_unit_runs_with_exact_argv_env_and_workdir(agent, tmp_path):
    (tmp_path / "dump.py").write_text(
        "import json, os, sys, time\n"
        "json.dump({'argv': sys.argv[1:], 'port': os.environ.get('PORT'), 'host': os.environ.get('NAP_HOST'),"
        " 'cwd': os.getcwd(), 'path': bool(os.environ.get('PATH'))}, open('argv.json.tmp', 'w'))\n"
        "os.rename('argv.json.tmp', 'argv.json')\n"
        "time.sleep(1000)\n"
    )
    pwned = tmp_path / "pwned"
    args = [*NASTY, f"$(touch {pwned})", f"`touch {pwned}`", "--port=" + PORT_REF, PORT_REF]
    await agent.engine.submit([spec("t_argv_common@1", [sys.executable, "dump.py", *args], tmp_path, port=20345)])

    async def dumped():
        path = tmp_path / "argv.json"
        return json.loads(path.read_text()) if path.exists() else None

    got = await until(dumped, what="the program to write its argv")
    assert got["argv"] == [*NASTY, f"$(touch {pwned})", f"`touch {pwned}`", "--port=20345", "20345"]
    assert got["port"] == "20345"
    assert got["host"] == "127.0.0.1"
    assert got["cwd"] == str(tmp_path)
    assert got["path"]
    assert not pwned.exists()
    st = await status(agent, "t_argv_common@1")
    assert st.state == "running" and st.host == "127.0.0.1" and st.pid and alive(st.pid)


async def test_unit_text_is_what_was_submitted(agent, tmp_path):
    s = spec("t_text_common@1", ["/bin/sleep", "1000"], tmp_path)
    await agent.engine.submit([s])
    assert await agent.engine.unit_text("t_text_common@1") == s.text


async def test_resubmitting_the_same_unit_keeps_the_running_process(agent, tmp_path):
    s = spec("t_same_common@1", ["/bin/sleep", "1000"], tmp_path)
    await agent.engine.submit([s])
    pid = (await status(agent, s.name)).pid
    await agent.engine.submit([s])
    assert (await status(agent, s.name)).pid == pid


async def test_journal_has_timestamped_stdout_and_stderr(agent, tmp_path):
    name = "t_journal_common@1"
    await agent.engine.submit([spec(name, [SH, "-c", "echo out-line; echo err-line >&2; exec sleep 1000"], tmp_path)])
    lines = await journal_has(agent, name, "err-line")
    pid = (await status(agent, name)).pid
    assert any(re.fullmatch(rf"{TIMESTAMP} nap: started pid {pid}", line) for line in lines)
    assert any(re.fullmatch(rf"{TIMESTAMP} stdout\[{pid}\]: out-line", line) for line in lines)
    assert any(re.fullmatch(rf"{TIMESTAMP} stderr\[{pid}\]: err-line", line) for line in lines)
    assert await journal(agent, name, lines=1) == lines[-1:]


# ---------------------------------------------------------------------------------------------
# restart policy


async def test_failing_command_restarts_with_growing_delays_then_fails(agent, tmp_path):
    name = "t_crash_common@1"
    argv = [SH, "-c", "echo attempt; echo oops >&2; exit 3"]
    await agent.engine.submit([spec(name, argv, tmp_path, restart_sec=0.2, restart_limit=3)])
    st = await state_is(agent, name, "failed")
    assert st.exit_code == 3
    assert st.restarts == 3
    assert "gave up after 3 restarts" in st.message
    lines = await journal(agent, name)
    assert sum(bool(re.fullmatch(rf"{TIMESTAMP} stdout\[\d+\]: attempt", line)) for line in lines) == 4
    assert sum(bool(re.fullmatch(rf"{TIMESTAMP} stderr\[\d+\]: oops", line)) for line in lines) == 4
    for delay in ("0.2", "0.4", "0.8"):
        assert any(f"exited with code 3, restarting in {delay}s" in line for line in lines)
    assert "gave up" in lines[-1]

    def at(line: str) -> float:
        stamp = line.split(" ", 1)[0]
        return time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + stamp[20:23])

    starts = [at(line) for line in lines if " nap: started pid " in line]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, (0.2, 0.4, 0.8)):
        assert delay - 0.01 <= gap < delay + 1.0, gaps


async def test_clean_exit_is_exited_without_restart(agent, tmp_path):
    name = "t_clean_common@1"
    await agent.engine.submit([spec(name, [SH, "-c", "echo bye"], tmp_path, restart_sec=0.1)])
    st = await state_is(agent, name, "exited")
    assert st.exit_code == 0 and st.restarts == 0 and st.pid is None
    await asyncio.sleep(0.3)
    assert (await status(agent, name)).state == "exited"
    assert any(re.fullmatch(rf"{TIMESTAMP} stdout\[\d+\]: bye", line) for line in await journal(agent, name))


async def test_unstartable_command_fails_after_its_restarts(agent, tmp_path):
    name = "t_nocwd_common@1"
    workdir = tmp_path / "gone"
    workdir.mkdir()
    s = spec(name, ["/bin/sleep", "1000"], workdir, restart_sec=0.1, restart_limit=1)
    workdir.rmdir()
    await agent.engine.submit([s])
    st = await state_is(agent, name, "failed")
    assert st.exit_code == 200  # systemd's code for "could not change to the working directory"
    assert "failed to start" in st.message


# ---------------------------------------------------------------------------------------------
# stop and start


async def test_stop_sends_sigterm_then_sigkill_and_start_runs_it_again(agent, tmp_path):
    name = "t_stubborn_common@1"
    script = "trap 'echo got TERM' TERM; echo ready; while :; do sleep 0.1; done"
    await agent.engine.submit([spec(name, [SH, "-c", script], tmp_path, stop_timeout=1.0)])
    await journal_has(agent, name, "stdout.*ready")
    pid = (await status(agent, name)).pid

    began = time.monotonic()
    st = await agent.engine.stop(name)
    took = time.monotonic() - began
    assert st.state == "stopped" and st.pid is None
    assert 1.0 <= took < 5.0
    assert not alive(pid)
    lines = await journal(agent, name)
    assert any(line.endswith("nap: stopping: SIGTERM") for line in lines)
    assert any("got TERM" in line for line in lines)
    assert any("SIGKILL" in line for line in lines)
    assert lines[-1].endswith("killed by signal SIGKILL: stopped")
    await asyncio.sleep(1.2)  # stopped instances are not restarted
    assert (await status(agent, name)).state == "stopped"

    st = await agent.engine.start(name)
    assert st.state == "running" and st.pid and st.pid != pid and alive(st.pid)
    await agent.engine.stop(name)


async def test_stop_of_a_well_behaved_program_is_quick(agent, tmp_path):
    name = "t_polite_common@1"
    await agent.engine.submit([spec(name, ["/bin/sleep", "1000"], tmp_path, stop_timeout=10)])
    began = time.monotonic()
    st = await agent.engine.stop(name)
    assert st.state == "stopped"
    assert time.monotonic() - began < 2.0
    assert (await agent.engine.stop(name)).state == "stopped"  # stopping again is harmless


async def test_unknown_instances_are_not_found(agent):
    for call in (agent.engine.stop, agent.engine.start, agent.engine.unit_text):
        with pytest.raises(NotFound):
            await call("t_nobody_common@1")
    with pytest.raises(NotFound):
        await journal(agent, "t_nobody_common@1")
    assert await agent.engine.status(["t_nobody_common@1"]) == {}
    await agent.engine.remove(["t_nobody_common@1"])


# ---------------------------------------------------------------------------------------------
# limits


async def test_memory_max_limits_the_program(agent, tmp_path):
    alloc = "import sys, time; b = bytearray({n} * 1024 * 1024); print('allocated', flush=True); time.sleep(1000)"
    big, small = "t_membig_common@1", "t_memsmall_common@1"
    await agent.engine.submit(
        [
            spec(big, [sys.executable, "-c", alloc.format(n=400)], tmp_path, memory_max=200 * MiB, restart="no"),
            spec(small, [sys.executable, "-c", alloc.format(n=50)], tmp_path, memory_max=200 * MiB, restart="no"),
        ]
    )
    st = await state_is(agent, big, "failed")
    assert st.exit_code not in (None, 0)
    assert any("MemoryError" in line for line in await journal(agent, big))
    await journal_has(agent, small, "stdout.*allocated")
    assert (await status(agent, small)).state == "running"


# ---------------------------------------------------------------------------------------------
# follow


async def test_journal_follow_streams_new_lines_and_ends_when_stopped(agent, tmp_path):
    name = "t_follow_common@1"
    script = "echo first; while [ ! -e trigger ]; do sleep 0.05; done; echo later; exec sleep 1000"
    await agent.engine.submit([spec(name, [SH, "-c", script], tmp_path)])
    await journal_has(agent, name, "stdout.*first")
    seen: list[str] = []

    async def follow():
        async for line in agent.engine.journal(name, lines=100, follow=True):
            seen.append(line)

    task = asyncio.create_task(follow())
    await until(lambda: _async(any(line.endswith(": first") for line in seen)), what="the backlog")
    assert not any(line.endswith(": later") for line in seen)
    (tmp_path / "trigger").touch()
    await until(lambda: _async(any(line.endswith(": later") for line in seen)), timeout=5, what="a live line")
    assert not task.done()
    await agent.engine.stop(name)
    await asyncio.wait_for(task, 5)  # the stream ends when the instance stops
    assert seen[-1].endswith("stopped")


async def test_journal_follow_of_a_finished_instance_ends_at_once(agent, tmp_path):
    name = "t_followdone_common@1"
    await agent.engine.submit([spec(name, [SH, "-c", "echo done"], tmp_path)])
    await state_is(agent, name, "exited")
    lines = await asyncio.wait_for(_collect(agent.engine.journal(name, follow=True)), 5)
    assert any(line.endswith(": done") for line in lines)


async def _async(value):
    return value


async def _collect(gen) -> list[str]:
    return [line async for line in gen]


# ---------------------------------------------------------------------------------------------
# batches


async def test_batch_of_200_units_all_reach_running(agent, tmp_path):
    specs = [spec(f"t_batch_common@{i}", ["/bin/sleep", "1000"], tmp_path, port=21000 + i) for i in range(200)]
    await agent.engine.submit(specs)
    found = await agent.engine.instances("t_batch_")
    assert len(found) == 200
    assert all(st.state == "running" and alive(st.pid) for st in found)
    assert len({st.pid for st in found}) == 200
    await agent.engine.remove([s.name for s in specs])
    assert await agent.engine.instances("t_batch_") == []
    await until(lambda: _async(not any(alive(st.pid) for st in found)), timeout=5, what="the processes to go")


async def test_list_matches_the_prefix(agent, tmp_path):
    await agent.engine.submit(
        [spec(f"t_pre_common@{i}", ["/bin/sleep", "1000"], tmp_path) for i in (1, 2)]
        + [spec("t_prefix_common@1", ["/bin/sleep", "1000"], tmp_path)]
    )
    assert [st.name for st in await agent.engine.instances("t_pre_")] == ["t_pre_common@1", "t_pre_common@2"]


# ---------------------------------------------------------------------------------------------
# the agent's own life


async def test_engine_says_when_the_agent_is_not_running(tmp_path):
    engine = LocalEngine(Settings(home=tmp_path, agent_wait=0))  # else it waits 15 s for one to start
    try:
        with pytest.raises(
            EngineError, match=r"nap agent is not running \(no socket at .*\): start it with `nap agent`"
        ):
            await engine.instances("")
        assert engine.host_for_ports() == "127.0.0.1"
    finally:
        await engine.close()


async def test_a_second_agent_refuses_to_start(agent):
    proc, log = start_agent(agent.home)
    assert proc.wait(20) != 0
    assert "another nap agent" in log.read_text()
    await agent.engine.instances("")  # the first one is unharmed


async def test_instances_survive_agent_sigkill_and_are_adopted(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first = await open_agent(home)
    marker = f"nap-test-{uuid.uuid4().hex}"
    ticker = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"
    names = [f"t_adopt_common@{i}" for i in range(4)]
    specs = [spec(n, [SH, "-c", ticker, f"{marker}-{i}"], tmp_path, restart_sec=0.2) for i, n in enumerate(names)]
    try:
        await first.engine.submit(specs)
        await first.engine.stop(names[3])
        before = await first.engine.status(names)
        pids = [before[n].pid for n in names[:3]]
        await journal_has(first, names[0], "tick 3")

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        await first.engine.close()
        await asyncio.sleep(0.3)
        assert all(alive(pid) for pid in pids)  # the instances outlive the agent
        os.killpg(pids[2], signal.SIGKILL)  # one dies while no agent watches
        await asyncio.sleep(0.5)  # the others keep writing output meanwhile

        second = await open_agent(home)
        first.engine = second.engine
        first.proc = second.proc
        after = await second.engine.status(names)
        assert after[names[0]].pid == pids[0] and after[names[0]].state == "running"
        assert after[names[1]].pid == pids[1] and after[names[1]].state == "running"
        restarted = await state_is(second, names[2], "running")
        assert restarted.pid != pids[2] and alive(restarted.pid)
        assert after[names[3]].state == "stopped"  # stopped stays stopped
        for i in range(4):
            assert len(processes_with(f"{marker}-{i}")) == (1 if i < 3 else 0)  # none twice, none lost

        await journal_has(second, names[0], "adopted pid")
        await asyncio.sleep(0.3)
        ticks = [
            int(line.rsplit(" ", 1)[1]) for line in await journal(second, names[0], lines=100_000) if ": tick " in line
        ]
        assert ticks == list(range(len(ticks)))  # output from while it was down: caught up, once each
        # ... and marked as such, with a time no later than its file's last change, before the adoption
        lines = await journal(second, names[0], lines=100_000)
        unwatched = [line for line in lines if "(written while no agent watched: by this time): tick" in line]
        adopted_at = next(line for line in lines if "adopted pid" in line).split(" ", 1)[0]
        assert unwatched and all(line.split(" ", 1)[0] <= adopted_at for line in unwatched), lines[-30:]
        assert any("exited while the agent was down" in line for line in await journal(second, names[2]))

        # adopted processes are watched too: one that dies now is restarted
        os.killpg(pids[1], signal.SIGKILL)

        async def replaced():
            st = await status(second, names[1])
            return st if st.state == "running" and st.pid != pids[1] else None

        await until(replaced, what="the adopted instance to be restarted")
        assert len(processes_with(f"{marker}-1")) == 1
        # and stopping an adopted one works
        assert (await second.engine.stop(names[0])).state == "stopped"
        assert not alive(pids[0])
    finally:
        await close_agent(first)
        for i in range(4):
            for pid in processes_with(f"{marker}-{i}"):
                os.kill(pid, signal.SIGKILL)
