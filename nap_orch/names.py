"""Names: users, apps, instances and units (the only shapes the platform accepts), and app files."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TypeGuard

from .errors import BadRequest

# An app's description, at the top of its folder: ``profile`` for common apps, ``mpi.xml`` for MPI apps.
PROFILE = "profile"
MPI_XML = "mpi.xml"

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
# What no name or value given by a user may hold, wherever it ends up (a unit's line, a log line, an event):
# control characters (C0, DEL and C1, U+0085 included: Unicode category Cc), lone surrogates (Cs: not
# text, they can't even be encoded) and the line and paragraph separators (Zl, Zp: U+2028, U+2029), which
# end a line for some readers. Those categories are fixed by Unicode, so this class is exactly them
# (tests/unit/test_names.py checks it against ``unicodedata`` over every code point).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# What an engine accepts as a unit's instance name (no ``.service``): wider than the platform's own
# names (``InstanceName``), narrow enough to be a file name and a systemd unit name.
UNIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,200}")
# <user>_<app>_common@<n>, <user>_<app>_mpi_master@<run>, <user>_<app>_mpi_slave@<run>-<i>
INSTANCE_RE = re.compile(
    r"(?P<user>[a-z][a-z0-9-]{0,30})_(?P<app>[a-z][a-z0-9-]{0,30})_"
    r"(?P<kind>common|mpi_master|mpi_slave)@(?P<inst>[0-9]{1,9}(?:-[0-9]{1,4})?)"
)


def is_unit_name(value: object) -> TypeGuard[str]:
    """A unit's instance name: safe as a file name (no ``/``, no ``..``) and as a systemd unit name."""
    return (
        isinstance(value, str)
        and bool(UNIT_NAME_RE.fullmatch(value))
        and ".." not in value
        and not value.endswith(".service")
    )


class Kind(enum.StrEnum):
    """What an instance is: one of an app's common instances, or the master or a slave of an MPI run."""

    COMMON = "common"
    MPI_MASTER = "mpi_master"
    MPI_SLAVE = "mpi_slave"

    @property
    def mpi(self) -> bool:
        return self is not Kind.COMMON


def control_character(text: str) -> str | None:
    """The first character of ``text`` that no user's name or value may hold (``CONTROL_RE``), or None."""
    m = CONTROL_RE.search(text)
    return m[0] if m else None


def check_name(value, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadRequest(f"{what} {value!r} is not valid: use [a-z][a-z0-9-]{{0,30}}")
    return value


def split_service(value, user: str | None = None) -> tuple[str, str]:
    """``username_appname`` -> (user, app). With ``user`` given, the username must be the caller's."""
    if not isinstance(value, str) or value.count("_") != 1:
        raise BadRequest(f"{value!r} is not of the form username_appname")
    u, a = value.split("_")
    check_name(u, "user name")
    check_name(a, "app name")
    if user is not None and u != user:
        raise BadRequest(f"{value!r} names user {u!r}, but you are {user!r}")
    return u, a


@dataclass(frozen=True)
class InstanceName:
    """An instance's name is its unit's name without ``.service``."""

    user: str
    app: str
    kind: Kind
    inst: str  # "3" for common; "<run>" for a master; "<run>-<i>" for a slave

    @classmethod
    def parse(cls, value, user: str | None = None) -> InstanceName:
        if isinstance(value, str) and value.endswith(".service"):
            value = value[: -len(".service")]
        m = INSTANCE_RE.fullmatch(value) if isinstance(value, str) else None
        if not m:
            raise BadRequest(f"{value!r} is not an instance name (like alice_web_common@3)")
        if user is not None and m["user"] != user:
            raise BadRequest(f"{value!r} names user {m['user']!r}, but you are {user!r}")
        return cls(m["user"], m["app"], Kind(m["kind"]), m["inst"])

    @property
    def name(self) -> str:
        return f"{self.user}_{self.app}_{self.kind}@{self.inst}"

    @property
    def unit(self) -> str:
        return self.name + ".service"

    @property
    def number(self) -> int:
        return int(self.inst.split("-")[0])

    def __str__(self) -> str:
        return self.name
