"""The app formats: ``profile`` and ``mpi.xml`` (both ``key: value`` lines), and their ``{parameters}``.

Words in ``{}`` are parameters. The platform fills ``{port}``, ``{instance}``, ``{host}``, ``{user}``,
``{app}`` itself; the user gives the rest.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import units
from ..errors import AppError, BadRequest
from ..names import MPI_XML, PROFILE, control_character

PLATFORM_PARAMS = ("port", "instance", "host", "user", "app")
PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")
MEMORY_RE = re.compile(r"(?i)\s*([0-9]+)\s*([kmgt]?)i?b?\s*")
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# What a launch may carry: parameters, the length of a name and of a value (characters).
MAX_PARAMS = 100
MAX_PARAM_NAME = 128
MAX_VALUE = 4096


@dataclass
class AppSpec:
    """A parsed ``profile`` or ``mpi.xml``: its file name, raw text and fields."""

    kind: str  # "common" (profile) or "mpi" (mpi.xml)
    filename: str
    text: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> list[str]:
        """User parameters in first-seen order, without the platform's placeholders."""
        seen: list[str] = []
        for name in PARAM_RE.findall(self.text):
            if name not in PLATFORM_PARAMS and name not in seen:
                seen.append(name)
        return seen

    @property
    def command(self) -> str | None:
        return self.fields.get("command")

    @property
    def memory(self) -> int | None:
        raw = self.fields.get("memory")
        return parse_memory(raw) if raw else None

    @property
    def hosts(self) -> int:
        """mpi.xml: the number of slaves (the run has hosts + 1 ranks: the master's and one per slave)."""
        raw = self.fields.get("hosts")
        if raw is None:
            raise AppError("mpi.xml has no hosts: line (the number of slaves)")
        if not raw.isdigit() or int(raw) < 1:
            raise AppError(f"hosts: {raw!r} in mpi.xml must be a whole number of at least 1")
        return int(raw)

    @property
    def scale(self) -> int | None:
        raw = self.fields.get("scale")
        if raw is None:
            return None
        if not raw.isdigit() or int(raw) < 1:
            raise AppError(f"scale: {raw!r} in {self.filename} is not a positive whole number")
        return int(raw)

    @property
    def health(self) -> dict[str, Any]:
        """The unit's health fields from ``check:``, ``check_interval:``, ``check_timeout:`` and
        ``check_grace:`` (AppError naming a bad one): ``Unit(**spec.health)``."""
        out: dict[str, Any] = {}
        check = self.fields.get("check")
        if check is not None:
            try:
                kind, path = units.parse_check(check)
            except ValueError as e:
                raise AppError(f"{e} (in {self.filename})") from None
            out["check"] = f"{kind} {path}".rstrip()
        for name, (lo, hi) in HEALTH_BOUNDS.items():
            raw = self.fields.get(name)
            if raw is None:
                continue
            if check is None:
                raise AppError(f"{name}: is set in {self.filename} but there is no check: line")
            try:
                seconds = units.parse_timespan(raw)
            except ValueError:
                seconds = -1.0
            if not lo <= seconds <= hi:
                raise AppError(f"{name}: {raw[:40]!r} in {self.filename} must be a time from {lo:g}s to {hi:g}s")
            out[name] = seconds
        if out.get("check_timeout", 2.0) > out.get("check_interval", 10.0):
            raise AppError(f"check_timeout: is longer than check_interval: in {self.filename}")
        return out


HEALTH_BOUNDS = {"check_interval": (0.5, 3600.0), "check_timeout": (0.1, 60.0), "check_grace": (0.0, 3600.0)}


def parse_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


MEMORY_MIN, MEMORY_MAX = 1024**2, 1024**5  # 1m .. 1024t: what a cgroup limit (and Slurm's --mem) holds


def parse_size(raw: str, what: str = "size") -> int:
    """A size like ``20g`` or ``512m`` (or bytes) in bytes; 400 when it is not one."""
    m = MEMORY_RE.fullmatch(raw) if isinstance(raw, str) else None
    if not m or len(raw) > 40:
        raise BadRequest(f"{what}: {str(raw)[:40]!r} is not a size like 512m or 20g")
    return int(m[1]) * UNITS[m[2].lower()]


def parse_memory(raw: str) -> int:
    m = MEMORY_RE.fullmatch(raw)
    if not m:
        raise AppError(f"memory: {raw[:40]!r} is not a size like 256m or 1g")
    value = int(m[1]) * UNITS[m[2].lower()]
    if not MEMORY_MIN <= value <= MEMORY_MAX:
        raise AppError(f"memory: {raw[:40]!r} is out of range (from 1m to 1024t)")
    return value


def load(app_dir: Path) -> AppSpec:
    """The app's spec from its folder: ``profile`` first, else ``mpi.xml``; AppError if neither."""
    for filename, kind in ((PROFILE, "common"), (MPI_XML, "mpi")):
        path = app_dir / filename
        if path.is_file() and not path.is_symlink():
            text = path.read_text(errors="replace")
            return AppSpec(kind, filename, text, parse_fields(text))
    raise AppError("the app has neither a profile nor an mpi.xml file at its top level")


def validate(spec: AppSpec) -> None:
    """Checks that make a deploy fail early rather than every launch later."""
    if spec.kind == "common":
        if not spec.command:
            raise AppError("the profile has no command: line")
        spec.memory, spec.scale, spec.health  # noqa: B018  (raise on bad values)
        split_command(spec.command)
    else:
        spec.hosts  # noqa: B018
        if spec.fields.get("from"):
            if not spec.fields.get("to"):
                raise AppError("mpi.xml has from: but no to: (the binary to build)")
        elif not spec.command:
            raise AppError("mpi.xml needs from: (a C source to build) or command: (an interpreted MPI program)")
        else:
            split_command(spec.command)


def split_command(command: str) -> list[str]:
    """The command template's words, split like a shell would (before any substitution)."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise AppError(f"command: cannot be split into words ({e})") from None
    if not words:
        raise AppError("command: is empty")
    return words


def _shown(name: str) -> str:
    """A name as errors quote it: its first 40 characters (it may be anything a client sent)."""
    return name if len(name) <= 40 else name[:40] + "..."


def check_text(value: str, what: str) -> str:
    """``value`` if it holds no control character, line or paragraph separator (``names.CONTROL_RE``:
    what a unit refuses too, so the API and the worker agree); else BadRequest naming ``what``."""
    ch = control_character(value)
    if ch is not None:
        raise BadRequest(f"{what}: control characters and line breaks are not allowed (U+{ord(ch):04X})")
    return value


def check_values(params: dict, required: list[str]) -> dict[str, str]:
    """Validate user parameter values: at most ``MAX_PARAMS``, none unknown, each a string (a number is
    taken as its text) of at most ``MAX_VALUE`` characters without control characters. BadRequest
    names the parameter."""
    if not isinstance(params, dict):
        raise BadRequest("params must be an object of name -> value")
    if len(params) > MAX_PARAMS:
        raise BadRequest(f"params has {len(params)} entries; at most {MAX_PARAMS} are allowed")
    for k in params:
        if not isinstance(k, str):
            raise BadRequest("parameter names must be strings")
        if len(k) > MAX_PARAM_NAME:
            raise BadRequest(f"parameter name {_shown(k)!r} is longer than {MAX_PARAM_NAME} characters")
        check_text(k, f"parameter name {_shown(k)!r}")
    unknown = [k for k in params if k not in required]
    if unknown:
        raise BadRequest(
            f"unknown parameter(s) {', '.join(map(_shown, unknown))}; this app takes: {', '.join(required) or 'none'}"
        )
    out = {}
    for k, v in params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRequest(f"parameter {k}: value must be a string or a finite number")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise BadRequest(f"parameter {k}: value must be a string")
        if len(v) > MAX_VALUE:
            raise BadRequest(f"parameter {k}: value is longer than {MAX_VALUE} characters")
        out[k] = check_text(v, f"parameter {k}")
    return out


def missing(params: dict[str, str], required: list[str]) -> list[str]:
    return [p for p in required if p not in params]


def launch_values(params: dict, required: list[str]) -> dict[str, str]:
    """``check_values``, and every parameter of the app given (else BadRequest naming the missing)."""
    values = check_values(params, required)
    absent = missing(values, required)
    if absent:
        raise BadRequest(f"missing parameter(s): {', '.join(absent)}")
    return values


def para_str_to_params(para_str: str, names: list[str]) -> dict[str, str]:
    """The seed's form: values in get_parameters' order, comma-joined."""
    if not isinstance(para_str, str):
        raise BadRequest("para_str must be a string (values comma-joined)")
    if len(para_str) > MAX_PARAMS * (MAX_VALUE + 1):
        raise BadRequest(f"para_str is longer than {MAX_PARAMS * (MAX_VALUE + 1)} characters")
    values = para_str.split(",") if para_str != "" else []
    if len(values) != len(names):
        raise BadRequest(f"para_str has {len(values)} value(s) but the app takes {len(names)}: {','.join(names)}")
    return dict(zip(names, values, strict=True))


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` for every name in values; other braces stay as they are."""
    return PARAM_RE.sub(lambda m: values.get(m[1], m[0]), text)
