"""systemd units: the artifact every instance is run from, rendered and parsed.

``render(unit)`` writes a ``.service`` file that systemd would run exactly as the ``Unit`` says;
``parse(text)`` reads it back (``parse(render(u)) == u``). The local engine runs what ``parse`` gives
it, the Slurm engine translates it; users see the text, like ``fleetctl cat``.

Quoting. Each argv word is written as one double-quoted word in ``ExecStart=``, escaped for the three
layers systemd applies: C-style unescaping (``\\`` and ``"``), specifiers (``%``) and environment
expansion (``$``). A value is data: spaces, quotes, ``$(...)``, ``;``, ``%n`` all reach the program as
they were given. Control characters (newlines included) are refused with ``ValueError``.

References. Values known only at run time (the port, the host) are referenced as ``${PORT}`` and
``${NAP_HOST}`` in ``ExecStart=``; systemd substitutes them from the environment, as one word. In an
argv word a reference is a marker, ``PORT_REF``/``HOST_REF`` (or ``ref(name)`` for a name listed in
``Unit.vars``): control characters never survive the validation of user data, so a parameter value
can't forge one. ``parse`` turns ``${NAME}`` back into the marker and ``$$`` back into ``$``, which
keeps the round trip exact (a parameter whose value is the text ``${PORT}`` stays that text), and
``expand`` replaces markers with their values: it is what systemd's expansion does to the rendered line.

Keys systemd 252 lacks are written with an ``X-`` prefix, which systemd ignores:
``X-RestartMaxDelaySec=`` (named after the key systemd 254 added) caps the doubling backoff.

A sandboxed unit (one with ``User=``) also says which system calls fail with ``EPERM``: one
``SystemCallFilter=~`` line per group of ``SYSCALLS_DENIED``, ``RestrictNamespaces=yes`` (``clone`` with a
namespace flag), ``LockPersonality=yes``, ``SystemCallArchitectures=native``. The engines enforce it
with one seccomp filter made from the same list (``engines/seccomp.py``, which adds ``ioctl(TIOCSTI)``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .names import is_unit_name

MARK = "\x00"

# What a sandboxed instance may not call (EPERM): what a tenant's service never needs, as in Docker's
# and Flatpak's default seccomp profiles. Names unknown on an architecture are skipped there.
SYSCALLS_DENIED = {
    "kernel modules, kexec, reboot, swap": (
        "init_module finit_module delete_module create_module query_module get_kernel_syms "
        "kexec_load kexec_file_load reboot swapon swapoff"
    ),
    "mounts, the old API and the new": (
        "mount umount umount2 pivot_root fsopen fsconfig fsmount fspick open_tree move_mount mount_setattr"
    ),
    "namespaces": "unshare setns",
    "the kernel keyring": "keyctl add_key request_key",
    "kernel interfaces a service has no use for": (
        "bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register kcmp lookup_dcookie "
        "open_by_handle_at"
    ),
    "the host's accounting, quotas and clock": (
        "acct quotactl quotactl_fd settimeofday stime clock_settime clock_settime64 clock_adjtime "
        "clock_adjtime64 adjtimex"
    ),
    "hardware, consoles and the kernel log": "ioperm iopl vm86 vm86old syslog vhangup",
    "obsolete": "nfsservctl uselib ustat sysfs _sysctl",
}


def ref(name: str) -> str:
    """The argv marker for a reference to the environment variable ``name`` (``${name}`` in the unit)."""
    if not ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return f"{MARK}{name}{MARK}"


ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PORT_REF = "\x00PORT\x00"
HOST_REF = "\x00NAP_HOST\x00"
# References always allowed in argv; others must be listed in ``Unit.vars``.
PLATFORM_VARS = ("PORT", "NAP_HOST")
RESTARTS = ("no", "on-failure", "always")
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
LINE_MAX = 1024 * 1024  # systemd's LONG_LINE_MAX


@dataclass
class Unit:
    """One instance's service, as data.

    ``restart_sec`` is the first restart delay; it doubles at each restart in a row up to
    ``restart_max_delay``. After ``restart_limit`` restarts in a row the instance is given up (failed).
    A run that lasts ``restart_max_delay`` seconds counts as healthy: the count and the delay start over.
    ``vars`` names the environment variables, besides ``PORT`` and ``NAP_HOST``, that argv may reference
    (with ``ref(name)``).
    """

    name: str
    description: str
    argv: list[str]
    workdir: str
    env: dict[str, str]
    memory_max: int | None = None
    tasks_max: int | None = None
    # The tenant's uid and gid: the unit then runs sandboxed (``User=``, ``Group=``,
    # ``NoNewPrivileges=yes``, ``ProtectSystem=strict``, ``ReadWritePaths=`` its folder, ``PrivateTmp=yes``,
    # the system calls it may not make).
    user: int | None = None
    group: int | None = None
    restart: str = "on-failure"
    restart_sec: float = 1.0
    restart_max_delay: float = 30.0
    restart_limit: int = 5
    stop_timeout: float = 10.0
    vars: tuple = field(default=())
    # Health (``engines.health``): ``starting`` until up ``min_healthy`` seconds and, with a ``check``
    # (``http /path`` or ``tcp``: the instance's own port), a probe has passed.
    min_healthy: float = 0.0
    check: str | None = None
    check_interval: float = 10.0
    check_timeout: float = 2.0
    check_grace: float = 5.0

    def restart_delay(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (1-based) of a run of failures."""
        return min(self.restart_sec * (2 ** max(attempt - 1, 0)), self.restart_max_delay)


# ---------------------------------------------------------------------------------------------
# validation and quoting


CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,1023}")  # an HTTP path and query, no blanks


def parse_check(text: str) -> tuple[str, str]:
    """A health check, ``http /path`` or ``tcp`` -> (kind, path); ``ValueError`` naming what is wrong.
    Only the instance's own port is ever probed: a check names no host and no port."""
    words = text.split() if isinstance(text, str) else []
    if words == ["tcp"]:
        return "tcp", ""
    if len(words) == 2 and words[0] == "http":
        if not CHECK_PATH_RE.fullmatch(words[1]):
            raise ValueError(
                f"check: {words[1][:60]!r} is not a path like /health (it starts with /, without blanks or "
                "control characters; the instance's own port is checked, so no host or port is named)"
            )
        return "http", words[1]
    shown = text[:60] if isinstance(text, str) else text
    raise ValueError(f"check: {shown!r} must be 'http /path' or 'tcp' (the instance's own port is checked)")


def check_value(value, what: str) -> str:
    """``value`` as a unit may hold it: a string without control characters (``ValueError`` if not)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in "\u2028\u2029":
            raise ValueError(f"{what} contains a control character ({ch!r}): {value!r}")
    return value


def _escape(text: str, dollar: bool) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return text.replace("$", "$$") if dollar else text


def _quote_word(word: str, allowed: set[str], what: str) -> str:
    if not isinstance(word, str):
        raise ValueError(f"{what} must be a string, not {type(word).__name__}")
    parts = word.split(MARK)
    if len(parts) % 2 == 0:
        raise ValueError(f"{what} has an unbalanced reference marker: {word!r}")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            if part not in allowed:
                raise ValueError(f"{what} references ${{{part}}}, which is not an allowed variable")
            out.append("${" + part + "}")
        else:
            out.append(_escape(check_value(part, what), dollar=True))
    return '"' + "".join(out) + '"'


def _plain(value: str, what: str) -> str:
    """A raw (unquoted) value: systemd strips its ends and a trailing backslash continues the line."""
    check_value(value, what)
    if value != value.strip() or value.endswith("\\"):
        raise ValueError(f"{what} can't start or end with blanks or end with a backslash: {value!r}")
    return value.replace("%", "%%")


def _seconds(value: float, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{what} must be a number of seconds >= 0, not {value!r}")
    if math.isinf(value):
        return "infinity"
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def instance_path(workdir: str) -> str:
    """An instance's ``PATH``: a virtualenv the app ships (``.venv/`` or ``venv/``), its ``bin/``, then the
    host's system folders. Never the control plane's own (its virtualenv is not the app's)."""
    own = [os.path.join(workdir, d) for d in (".venv/bin", "venv/bin", "bin")]
    return ":".join([*own, SYSTEM_PATH])


def resolve_executable(argv0: str, workdir: str, path: str | None = None) -> str:
    """argv[0] as an absolute, normalized path: a bare name on ``path`` (the instance's PATH), a relative
    one against workdir."""
    check_value(argv0, "the command")
    if not argv0 or MARK in argv0:
        raise ValueError("the command's first word must be a program, not empty or a reference")
    if "/" not in argv0:
        path = path or instance_path(workdir)
        found = shutil.which(argv0, path=path)
        if not found:
            raise ValueError(f"command {argv0!r} not found on the instance's PATH ({path})")
        path = os.path.abspath(found)
    else:
        path = os.path.normpath(os.path.join(workdir, argv0))
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ValueError(f"command {path!r} is not an executable file")
    return path


# ---------------------------------------------------------------------------------------------
# render


def render(unit: Unit) -> str:
    """The unit file for ``unit`` (``ValueError`` for values no unit can hold)."""
    name = check_value(unit.name, "unit name")
    if not is_unit_name(name):
        raise ValueError(f"{name!r} is not a unit instance name")
    workdir = _plain(unit.workdir, "working directory")
    if not os.path.isabs(workdir):
        raise ValueError(f"working directory {workdir!r} is not absolute")
    workdir = os.path.normpath(workdir)
    if not unit.argv:
        raise ValueError("the command is empty")
    if unit.restart not in RESTARTS:
        raise ValueError(f"Restart={unit.restart!r} is not one of {', '.join(RESTARTS)}")
    if isinstance(unit.restart_limit, bool) or not isinstance(unit.restart_limit, int) or unit.restart_limit < 0:
        raise ValueError(f"restart limit must be an integer >= 0, not {unit.restart_limit!r}")
    for var in unit.vars:
        ref(var)  # validates the name
    allowed = set(PLATFORM_VARS) | set(unit.vars)

    argv0 = resolve_executable(unit.argv[0], unit.workdir, unit.env.get("PATH"))
    words = [_quote_word(argv0, set(), "the command")]
    words += [_quote_word(w, allowed, f"argument {i}") for i, w in enumerate(unit.argv[1:], 1)]

    lines = [
        "[Unit]",
        f"Description={_plain(unit.description, 'description')}",
        f"X-Nap-Name={name}",
        # systemd counts starts, the first one too: restart_limit restarts are restart_limit + 1 starts,
        # which a crash loop makes within the sum of its backoff delays.
        f"StartLimitBurst={unit.restart_limit + 1}",
        f"StartLimitIntervalSec={_seconds(_limit_interval(unit), 'start limit interval')}",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(words),
        f"WorkingDirectory={workdir}",
    ]
    for key, value in unit.env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise ValueError(f"{key!r} is not an environment variable name")
        lines.append('Environment="' + _escape(f"{key}={check_value(value, key)}", dollar=False) + '"')
    if unit.memory_max is not None:
        if isinstance(unit.memory_max, bool) or not isinstance(unit.memory_max, int) or unit.memory_max <= 0:
            raise ValueError(f"memory limit must be a positive number of bytes, not {unit.memory_max!r}")
        lines.append(f"MemoryMax={unit.memory_max}")
    if unit.tasks_max is not None:
        lines.append(f"TasksMax={_positive(unit.tasks_max, 'tasks limit')}")
    if unit.user is not None or unit.group is not None:
        uid, gid = _positive(unit.user, "User="), _positive(unit.group, "Group=")
        lines += [
            f"User={uid}",
            f"Group={gid}",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            f"ReadWritePaths={workdir}",
            "PrivateTmp=yes",
            *(f"SystemCallFilter=~{names}" for names in SYSCALLS_DENIED.values()),
            "SystemCallErrorNumber=EPERM",
            "SystemCallArchitectures=native",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
        ]
    lines += [
        f"Restart={unit.restart}",
        f"RestartSec={_seconds(unit.restart_sec, 'restart delay')}",
        f"X-RestartMaxDelaySec={_seconds(unit.restart_max_delay, 'restart max delay')}",
        f"TimeoutStopSec={_seconds(unit.stop_timeout, 'stop timeout')}",
    ]
    if unit.min_healthy:
        lines.append(f"X-Nap-MinHealthySec={_seconds(unit.min_healthy, 'min healthy time')}")
    if unit.check is not None:
        kind, path = parse_check(unit.check)
        lines += [
            f"X-Nap-Check={kind} {path}".rstrip(),
            f"X-Nap-CheckIntervalSec={_seconds(unit.check_interval, 'check interval')}",
            f"X-Nap-CheckTimeoutSec={_seconds(unit.check_timeout, 'check timeout')}",
            f"X-Nap-CheckGraceSec={_seconds(unit.check_grace, 'check grace')}",
        ]
    lines += [
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    if any(len(line) >= LINE_MAX for line in lines):
        raise ValueError(f"a unit line is longer than systemd reads ({LINE_MAX} characters)")
    return "\n".join(lines)


def _positive(value: int | None, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a whole number above 0, not {value!r}")
    return value


def _limit_interval(unit: Unit) -> float:
    if math.isinf(unit.restart_sec) or math.isinf(unit.restart_max_delay):
        return math.inf
    backoff = sum(unit.restart_delay(i) for i in range(1, unit.restart_limit + 1))
    return math.ceil(backoff + unit.restart_max_delay)


# ---------------------------------------------------------------------------------------------
# parse

_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}
_SPECIFIER_RE = re.compile(r"%(.?)", re.S)


def _unspecify(text: str, what: str) -> str:
    """Resolve specifiers: only ``%%`` is supported (others depend on the host and instance)."""

    def one(m: re.Match) -> str:
        if m.group(1) == "%":
            return "%"
        raise ValueError(f"{what}: specifier %{m.group(1)} is not supported")

    return _SPECIFIER_RE.sub(one, text)


def split_words(text: str) -> list[str]:
    """systemd's word splitting with unquoting and C unescaping (``extract_first_word``)."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = None
        while i < n:
            ch = text[i]
            if quote is None and ch in " \t":
                break
            if ch == "\\":
                i += 1
                if i >= n:
                    raise ValueError("a trailing backslash")
                esc = text[i]
                if esc in _C_ESCAPES:
                    word.append(_C_ESCAPES[esc])
                    i += 1
                elif esc in "xuU":
                    size = {"x": 2, "u": 4, "U": 8}[esc]
                    digits = text[i + 1 : i + 1 + size]
                    if len(digits) != size or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                        raise ValueError(f"a bad \\{esc} escape")
                    word.append(chr(int(digits, 16)))
                    i += 1 + size
                elif esc in "01234567":
                    digits = text[i : i + 3]
                    if not re.fullmatch(r"[0-7]{3}", digits):
                        raise ValueError("a bad octal escape")
                    word.append(chr(int(digits, 8)))
                    i += 3
                else:
                    raise ValueError(f"an unknown escape \\{esc}")
                continue
            if quote is None and ch in "\"'":
                quote = ch
            elif ch == quote:
                quote = None
            else:
                word.append(ch)
            i += 1
        if quote is not None:
            raise ValueError("unbalanced quoting")
        words.append("".join(word))


_DOLLAR_RE = re.compile(r"\$(\$|\{([^}]*)\}|)")


def _unreference(word: str, what: str) -> tuple[str, list[str]]:
    """An ExecStart word as systemd stores it -> the argv word (markers for ``${NAME}``) and the names."""
    names: list[str] = []

    def one(m: re.Match) -> str:
        if m.group(1) == "$":
            return "$"
        if m.group(1) == "":
            return "$"  # a lone "$" is kept as it is by systemd
        name = m.group(2)
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"{what}: ${{{name}}} is not a supported reference")
        names.append(name)
        return ref(name)

    if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
        raise ValueError(f"{what}: the word-splitting reference {word} is not supported; use ${{NAME}}")
    return _DOLLAR_RE.sub(one, word), names


_TIME_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}


def parse_timespan(text: str) -> float:
    """A systemd time span (``1.5``, ``200ms``, ``1min 30s``, ``infinity``) in seconds."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    parts = re.findall(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)", text)
    if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"{text!r} is not a time span")
    total = 0.0
    for number, unit in parts:
        if unit not in _TIME_UNITS:
            raise ValueError(f"{text!r} is not a time span (unit {unit!r})")
        total += float(number) * _TIME_UNITS[unit]
    return round(total, 6)


def parse_bytes(text: str) -> int | None:
    """A systemd size (``209715200``, ``200M``, ``1G``, ``infinity``) in bytes; None for no limit."""
    text = text.strip()
    if text == "infinity":
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]?)", text)
    if not m:
        raise ValueError(f"{text!r} is not a size in bytes")
    factor = 1024 ** "_KMGTPE".index(m.group(2) or "_")
    return int(float(m.group(1)) * factor)


def _sections(text: str):
    """(section, key, value) for each assignment; comments and blank lines skipped."""
    section = None
    pending = ""
    for raw in text.split("\n"):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(f"bad section header {line!r}")
            section = line[1:-1]
            continue
        key, eq, value = line.partition("=")
        if not eq or section is None:
            raise ValueError(f"bad line {line!r}")
        yield section, key.strip(), value.strip()


_HEALTH_KEYS = {
    "X-Nap-MinHealthySec": "min_healthy",
    "X-Nap-CheckIntervalSec": "check_interval",
    "X-Nap-CheckTimeoutSec": "check_timeout",
    "X-Nap-CheckGraceSec": "check_grace",
}


def parse(text: str, name: str | None = None) -> Unit:
    """The ``Unit`` a unit file describes (the inverse of ``render``); ``ValueError`` if it can't be read.

    systemd takes a unit's name from its file name; ``render`` also writes it as ``X-Nap-Name=`` so that
    the text alone describes the instance. ``name`` (the file's name, without ``.service``) wins.
    """
    values: dict[str, Any] = {"env": {}}
    argv: list[str] | None = None
    names: list[str] = []
    burst = None
    for section, key, value in _sections(text):
        where = f"[{section}] {key}="
        if section == "Unit" and key == "Description":
            values["description"] = _unspecify(value, where)
        elif section == "Unit" and key == "X-Nap-Name":
            values["name"] = value
        elif section == "Unit" and key == "StartLimitBurst":
            burst = int(value)
        elif section == "Service" and key == "ExecStart":
            if argv is not None:
                raise ValueError("more than one ExecStart=")
            words = split_words(_unspecify(value, where))
            if not words:
                raise ValueError("ExecStart= is empty")
            argv = []
            for word in words:
                word, found = _unreference(word, where)
                argv.append(word)
                names += found
        elif section == "Service" and key == "WorkingDirectory":
            values["workdir"] = _unspecify(value, where)
        elif section == "Service" and key == "Environment":
            if not value:
                values["env"] = {}
            for word in split_words(value):
                k, eq, v = _unspecify(word, where).partition("=")
                if not eq or not ENV_NAME_RE.fullmatch(k):
                    raise ValueError(f"{where}: {word!r} is not NAME=value")
                values["env"][k] = v
        elif section == "Service" and key == "MemoryMax":
            values["memory_max"] = parse_bytes(value)
        elif section == "Service" and key in ("TasksMax", "User", "Group"):
            field_ = {"TasksMax": "tasks_max", "User": "user", "Group": "group"}[key]
            if not value.isdigit() or int(value) <= 0:
                raise ValueError(f"{where}{value} is not supported (a number above 0)")
            values[field_] = int(value)
        elif section == "Service" and key == "Restart":
            if value not in RESTARTS:
                raise ValueError(f"Restart={value} is not supported (use one of {', '.join(RESTARTS)})")
            values["restart"] = value
        elif section == "Service" and key == "RestartSec":
            values["restart_sec"] = parse_timespan(value)
        elif section == "Service" and key == "X-RestartMaxDelaySec":
            values["restart_max_delay"] = parse_timespan(value)
        elif section == "Service" and key == "TimeoutStopSec":
            values["stop_timeout"] = parse_timespan(value)
        elif section == "Service" and key == "X-Nap-Check":
            kind, path = parse_check(value)
            values["check"] = f"{kind} {path}".rstrip()
        elif section == "Service" and key in _HEALTH_KEYS:
            values[_HEALTH_KEYS[key]] = parse_timespan(value)
    if argv is None:
        raise ValueError("the unit has no ExecStart=")
    for word in argv:
        check_value(word.replace(MARK, ""), "ExecStart=")
    for k, v in values["env"].items():
        check_value(v, k)
    if burst is not None:
        values["restart_limit"] = max(burst - 1, 0)
    vars_ = tuple(dict.fromkeys(n for n in names if n not in PLATFORM_VARS))
    written_name = values.pop("name", "")
    return Unit(
        name=written_name if name is None else name,
        description=values.pop("description", ""),
        argv=argv,
        workdir=values.pop("workdir", "/"),
        env=values.pop("env"),
        vars=vars_,
        **values,
    )


# ---------------------------------------------------------------------------------------------
# expand, verify


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """The words the program receives: each reference replaced by its variable's value ("" if unset),
    inside its word. This is what systemd's ``${NAME}`` expansion (and ``$$`` -> ``$``) does to the
    rendered ``ExecStart=``; ``parse`` already turned ``$$`` back into ``$``."""
    out = []
    for word in argv:
        if MARK in word:
            parts = word.split(MARK)
            word = "".join(env.get(p, "") if i % 2 else p for i, p in enumerate(parts))
        out.append(word)
    return out


def verify(text: str, name: str) -> str:
    """Run ``systemd-analyze verify`` on the unit text as ``<name>.service``; its output, "" if clean.

    Works without systemd as PID 1 (the unit is loaded from the file, not from a running manager);
    ``--man=no`` skips the man-page check and ``--recursive-errors=no`` limits it to this unit.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a unit name")
    with tempfile.TemporaryDirectory(prefix="nap-verify-") as tmp:
        path = os.path.join(tmp, f"{name}.service")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SYSTEMD_LOG_COLOR": "0",
            "SYSTEMD_PAGER": "",
            "LANG": "C.UTF-8",
        }
        proc = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no", path],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode and not out:
            out = f"systemd-analyze verify exited with code {proc.returncode}"
        return out
