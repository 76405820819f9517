"""The sandbox an instance runs in: its tenant's own uid and gid, no capabilities, ``no_new_privs``, its
own mount, PID, IPC, UTS and cgroup namespaces, the system read-only, ``NAP_HOME`` hidden but for the
instance's folder (its only writable place besides a private ``/tmp``), the host network shared.

The command line is ``setpriv`` (util-linux) dropping to the tenant's uid, gid and no supplementary
groups, then ``bwrap`` (bubblewrap) unprivileged. The order matters: ``bwrap --uid N`` started as root
only renames root inside a user namespace (measured here: the sandboxed process was uid 0 on the
host), while ``bwrap`` started as uid N makes a process that is uid N on the host too, with
``CapEff`` 0 and ``NoNewPrivs`` 1.

``bwrap --block-fd`` holds the sandbox until the agent has moved it into the instance's control group
(``cgroups.py``; bwrap's sandbox process exists already then, blocked: ``Group.join_tree`` moves it
too): nothing of the tenant's runs outside its limits, and spawning stays a plain
``subprocess.Popen`` (no ``preexec_fn``). No ``--die-with-parent``: instances outlive the agent.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .cgroups import Hierarchy


@dataclass(frozen=True)
class Sandbox:
    """Where and as whom one instance runs."""

    uid: int
    gid: int
    workdir: str  # the instance's folder: writable, and the working directory
    hidden: tuple[str, ...] = ()  # folders replaced by an empty one (NAP_HOME, the platform's state)

    def argv(self, command: list[str], block_fd: int | None = None) -> list[str]:
        """The command line that runs ``command`` in this sandbox; with ``block_fd``, it waits until
        something can be read from that file descriptor (passed to the child) before it starts."""
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("a sandbox runs as a tenant's own uid and gid, never as root")
        setpriv = shutil.which("setpriv") or "setpriv"
        bwrap = shutil.which("bwrap") or "bwrap"
        out = [
            setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            bwrap,
            "--unshare-all",
            "--unshare-user",
            "--share-net",
            "--disable-userns",
            "--new-session",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
        ]
        for path in self.hidden:
            out += ["--tmpfs", path]
        out += ["--bind", self.workdir, self.workdir]
        for path in self.hidden:  # read-only once the instance's folder is mounted inside it
            out += ["--remount-ro", path]
        out += ["--chdir", self.workdir]
        if block_fd is not None:
            out += ["--block-fd", str(block_fd)]
        return [*out, "--", *command]


@dataclass(frozen=True)
class Isolation:
    """What the agent sandboxes every instance with: the stack's cgroup hierarchy (one group per
    instance) and the folders the sandbox hides (``NAP_HOME``)."""

    hierarchy: Hierarchy
    hidden: tuple[str, ...]

    def sandbox(self, uid: int, gid: int, workdir: str) -> Sandbox:
        return Sandbox(uid, gid, workdir, hidden=self.hidden)


def prepare(stack: str, home: str) -> tuple[Isolation | None, str]:
    """The isolation this host can give the stack ``stack`` whose ``NAP_HOME`` is ``home``, or None and
    why not (what an operator has to fix)."""
    if os.geteuid() != 0:
        return None, "the agent does not run as root, so it cannot run instances as their tenants' uids"
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if not shutil.which(tool):
            return None, f"{tool} is not installed (Debian package {package})"
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
    return Isolation(hierarchy, (home,)), ""


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
