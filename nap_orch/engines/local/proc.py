"""Processes as the agent sees them: alive or not (a pid and its start time), and how they ended."""

from __future__ import annotations

import signal

from ..restarts import Exit

# Exit by one of these signals is a clean exit, as for systemd's Restart=on-failure.
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
EXIT_CHDIR, EXIT_EXEC = 200, 203  # systemd's codes for "could not chdir" and "could not exec"


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[19])


def is_alive(pid: int | None, starttime: int | None) -> bool:
    if not pid:
        return False
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x") and (starttime is None or st[1] == starttime)


def describe_exit(code: int | None, signo: int | None) -> str:
    if signo is not None:
        try:
            return f"killed by signal {signal.Signals(signo).name}"
        except ValueError:
            return f"killed by signal {signo}"
    if code is None:
        return "exited (exit code unknown)"
    return f"exited with code {code}"


def exit_of(code: int | None, signo: int | None, *, spawn_error: str = "", while_away: bool = False) -> Exit:
    """The restart policy's view of an exit (``code`` None: unknown, which counts as a failure)."""
    what = spawn_error or describe_exit(code, signo)
    if while_away:
        what = "exited while the agent was down (exit code unknown)"
    clean = (
        code is not None
        and not spawn_error
        and ((signo is None and code == 0) or (signo is not None and signo in CLEAN_SIGNALS))
    )
    return Exit(code, clean, what)
