"""The sandbox an instance runs in, on every engine: its tenant's own uid and gid, no capabilities,
``no_new_privs``, its own mount, PID, IPC, UTS and cgroup namespaces, the system read-only, ``NAP_HOME``
hidden but for the instance's folder (its only writable place besides a private ``/tmp``), the host
network shared.

The command line is util-linux's ``unshare --setgid=G --setuid=U`` (no namespace of its own: it only
drops to the tenant's gid, no supplementary groups, and uid, with every capability gone with uid 0),
then ``bwrap`` (bubblewrap) unprivileged, which sets ``no_new_privs`` and empties the capability sets,
the bounding set included, before the program runs. The order matters: ``bwrap --uid N`` started as
root only renames root inside a user namespace (measured here: the sandboxed process was uid 0 on the
host), while ``bwrap`` started as uid N makes a process that is uid N on the host too, with ``CapEff``
and ``CapBnd`` 0 and ``NoNewPrivs`` 1. Every folder above the instance's must let other users pass
through (bwrap binds it as the tenant).

Why ``unshare`` and not ``setpriv``: setpriv looks its numeric ``--reuid`` up as a user name first, and
on a host whose passwd database goes on to systemd's NSS module (Debian's default) that loads three
libraries for each start: 3.5 ms of CPU against unshare's 1.3 ms (``/bin/true`` alone: 0.5 ms), a
quarter of a sandbox's start. Its own ``--no-new-privs`` and capability drops are what bwrap does anyway.

``bwrap --block-fd`` holds the sandbox until whoever starts it has moved it into the instance's
control group (``cgroups.py``; bwrap's sandbox process exists already then, blocked:
``Group.join_tree`` moves it too): nothing of the tenant's runs outside its limits. No
``--die-with-parent``: instances outlive the agent. A program killed by signal N ends the sandbox with
code 128+N.

``bwrap --seccomp FD`` loads the seccomp filter (``seccomp.py``) from that file descriptor once the sandbox
is set up (after ``--block-fd`` is released): bwrap reads the fd to its end and closes it, then applies
the filter to the sandbox's init and to the program, just before it executes. So every sandbox needs a
file descriptor of its own on the filter's file, opened by whoever starts it.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass


@functools.cache
def tool(name: str) -> str:
    """The program's path on this host (looked up once: every start names it), or its bare name."""
    return shutil.which(name) or name


@dataclass(frozen=True)
class Sandbox:
    """Where and as whom one instance runs."""

    uid: int
    gid: int
    workdir: str  # the instance's folder: writable, and the working directory
    hidden: tuple[str, ...] = ()  # folders replaced by an empty one (NAP_HOME, the platform's state)

    def argv(self, command: list[str], block_fd: int | None = None, seccomp_fd: int | str | None = None) -> list[str]:
        """The command line that runs ``command`` in this sandbox; with ``block_fd``, it waits until
        something can be read from that file descriptor (passed to the child) before it starts; with
        ``seccomp_fd`` (a number, or a word the caller's shell expands to one), the program runs under the
        seccomp filter read from it."""
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("a sandbox runs as a tenant's own uid and gid, never as root")
        out = [
            tool("unshare"),
            f"--setgid={self.gid}",  # setgroups(0), then setgid: no supplementary groups
            f"--setuid={self.uid}",
            "--",
            tool("bwrap"),
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
        if seccomp_fd is not None:
            out += ["--seccomp", str(seccomp_fd)]
        return [*out, "--", *command]
