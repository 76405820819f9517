"""The local agent's isolation: what it sandboxes every instance with (``engines.sandbox`` as the
unit's ``User=``, under the seccomp filter of ``engines.seccomp``, in a control group of
``engines.cgroups``), or why this host can't."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import seccomp
from ..cgroups import Hierarchy
from ..sandbox import Sandbox


@dataclass(frozen=True)
class Isolation:
    """What the agent sandboxes every instance with: the stack's cgroup hierarchy (one group per
    instance), the folders the sandbox hides (``NAP_HOME``) and the seccomp filter's file (each sandbox
    opens its own descriptor on it: ``filter_fd``)."""

    hierarchy: Hierarchy
    hidden: tuple[str, ...]
    seccomp: Path

    def sandbox(self, uid: int, gid: int, workdir: str) -> Sandbox:
        return Sandbox(uid, gid, workdir, hidden=self.hidden)

    def filter_fd(self) -> int:
        """A new read-only descriptor on the seccomp filter, for one sandbox's ``--seccomp`` (close-on-exec:
        pass it with ``pass_fds``)."""
        return os.open(self.seccomp, os.O_RDONLY | os.O_CLOEXEC)


def prepare(stack: str, home: str, state: Path) -> tuple[Isolation | None, str]:
    """The isolation this host can give the stack ``stack`` whose ``NAP_HOME`` is ``home``, or None and
    why not (what an operator has to fix). The seccomp filter is made into the agent's folder ``state``."""
    if os.geteuid() != 0:
        return None, "the agent does not run as root, so it cannot run instances as their tenants' uids"
    for tool, package in (("bwrap", "bubblewrap"), ("unshare", "util-linux")):
        if not shutil.which(tool):
            return None, f"{tool} is not installed (Debian package {package})"
    try:
        seccomp.write(state / "seccomp.bpf")
    except seccomp.SeccompError as e:
        return None, f"cannot make the sandbox's seccomp filter: {e}"
    hierarchy = Hierarchy.detect(stack)
    if hierarchy is None:
        return None, (
            "no usable cgroup hierarchy (cgroup v2 with the memory and pids controllers, or v1 memory, pids "
            "and freezer, writable by the agent)"
        )
    for folder in (Path(home), Path(home) / "apps"):  # tenants pass through, to their own folders only
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o711)
    why = unreachable(Path(home) / "apps")
    if why:
        return None, f"tenants' uids cannot reach their instance folders: {why}"
    return Isolation(hierarchy, (home,), state / "seccomp.bpf"), ""


def unreachable(path: Path) -> str | None:
    """Why another user's uid can't pass through ``path`` or a folder above it; None if it can."""
    for folder in [path, *path.parents]:
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            return f"{folder} (mode {mode & 0o777:o}) does not let other users pass through"
    return None
