"""The app formats: ``profile`` and ``mpi.xml`` (both ``key: value`` lines), and their ``{parameters}``.

Words in ``{}`` are parameters. The platform fills ``{port}``, ``{instance}``, ``{host}``, ``{user}``,
``{app}`` itself; the user gives the rest.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AppError, BadRequest
from ..names import MPI_XML, PROFILE

PLATFORM_PARAMS = ("port", "instance", "host", "user", "app")
PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MEMORY_RE = re.compile(r"(?i)\s*([0-9]+)\s*([kmgt]?)i?b?\s*")
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


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
        spec.memory, spec.scale  # noqa: B018  (raise on bad values)
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


def check_values(params: dict, required: list[str]) -> dict[str, str]:
    """Validate user parameter values: all required given, none unknown, no control characters."""
    if not isinstance(params, dict):
        raise BadRequest("params must be an object of name -> value")
    unknown = [k for k in params if k not in required]
    if unknown:
        raise BadRequest(
            f"unknown parameter(s) {', '.join(map(str, unknown))}; this app takes: {', '.join(required) or 'none'}"
        )
    out = {}
    for k, v in params.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise BadRequest(f"parameter {k}: value must be a string")
        if CONTROL_RE.search(v):
            raise BadRequest(f"parameter {k}: control characters and newlines are not allowed")
        out[k] = v
    return out


def missing(params: dict[str, str], required: list[str]) -> list[str]:
    return [p for p in required if p not in params]


def para_str_to_params(para_str: str, names: list[str]) -> dict[str, str]:
    """The seed's form: values in get_parameters' order, comma-joined."""
    values = para_str.split(",") if para_str != "" else []
    if len(values) != len(names):
        raise BadRequest(f"para_str has {len(values)} value(s) but the app takes {len(names)}: {','.join(names)}")
    return dict(zip(names, values))


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` for every name in values; other braces stay as they are."""
    return PARAM_RE.sub(lambda m: values.get(m[1], m[0]), text)
