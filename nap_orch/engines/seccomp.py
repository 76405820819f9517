"""The seccomp filter every sandbox loads (``bwrap --seccomp FD``): a deny list in the manner of Docker's
and Flatpak's default profiles. What a tenant's service never needs fails with ``EPERM`` (the program
sees an ordinary error, as it would without the privilege); everything else is allowed.

Denied (``EPERM``): the system calls of ``units.SYSCALLS_DENIED``, which a sandboxed unit lists in its
``SystemCallFilter=`` (kernel modules, kexec, reboot, swap; mounts, the old API and the new; ``unshare``
and ``setns``; the kernel keyring; ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring``; setting
the clock; port I/O; ``syslog``, ``vhangup`` and obsolete calls), and by argument: ``clone`` with a
namespace flag (the unit's ``RestrictNamespaces=yes``), ``personality`` but for the values Docker allows
(the unit's ``LockPersonality=yes`` is stricter), ``ioctl`` ``TIOCSTI`` and ``TIOCLINUX`` (typing into,
or reading, a terminal; systemd has no key for it). ``clone3`` fails with ``ENOSYS``, as in Docker and
Flatpak: its flags are in memory that a filter cannot read, and libc falls back to ``clone``, whose
flags it can. A system call of another ABI than the native one (i386's ``int 0x80`` or x32's on
x86_64) kills the process (the unit's ``SystemCallArchitectures=native``): the rules are by native
syscall number.

Allowed on purpose: ``ptrace``, ``process_vm_readv`` and ``process_vm_writev`` (Open MPI's shared-memory
transport copies between ranks of the same tenant with them; the PID namespace keeps them inside the
sandbox), ``chroot`` and ``sethostname`` (harmless without capabilities, or in the sandbox's own UTS
namespace), NUMA calls (``mbind``, ``set_mempolicy``: MPI and hwloc).

The BPF program is made by libseccomp (Debian package ``libseccomp2``, ``libseccomp.so.2``) through the
few calls of its stable C API bound here with ``ctypes``: libseccomp knows every architecture's syscall
numbers and emits the architecture checks, which a hand-written program would have to get right itself.
It is made once (agent start, Slurm engine open) into a file the platform owns; every sandbox reads it
through a file descriptor of its own (bwrap reads the fd to its end, so one open file can't serve two).
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import units

LIBRARY = "libseccomp.so.2"

# Actions (seccomp.h of libseccomp)
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


# Filter attributes and argument comparisons (enum scmp_filter_attr, enum scmp_compare)
ATTR_ACT_BADARCH = 2
CMP_MASKED_EQ = 7

# Denied with EPERM, by name: what a sandboxed unit's SystemCallFilter= says.
DENIED = tuple(name for names in units.SYSCALLS_DENIED.values() for name in names.split())
# clone(2) with any of these flags (its first argument on x86_64 and arm64) makes a namespace.
CLONE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# personality(2) values allowed (Docker's): PER_LINUX and PER_LINUX32, each with or without UNAME26, and
# the query (0xffffffff): no flag that disables ASLR, maps page zero or makes data executable.
PERSONALITY_BITS = 0x20008  # the bits the allowed values (but the query) are made of
PERSONALITY_QUERY = 0xFFFFFFFF
# ioctl(2) requests denied: TIOCSTI pushes input into a terminal, TIOCLINUX reads or pastes a console's.
# The kernel takes the request as a 32-bit int: compare only those bits (Flatpak's CVE-2019-10063).
IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}


class SeccompError(Exception):
    """The filter can't be made here (libseccomp missing, or it refused a rule)."""


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as e:
        raise SeccompError(f"{LIBRARY} cannot be loaded (Debian package libseccomp2): {e}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@dataclass(frozen=True)
class Rule:
    """One rule of the filter: ``action`` for ``syscall`` when every comparison holds (op, arg, a, b)."""

    syscall: str
    action: int
    compare: tuple[tuple[int, int, int, int], ...] = ()


def rules() -> list[Rule]:
    """The filter's rules, in the order they are added."""
    eperm = act_errno(errno.EPERM)
    out = [Rule(name, eperm) for name in DENIED]
    out += [Rule("clone", eperm, ((CMP_MASKED_EQ, 0, flag, flag),)) for flag in CLONE_FLAGS.values()]
    out.append(Rule("clone3", act_errno(errno.ENOSYS)))
    out += [Rule("personality", eperm, ((CMP_MASKED_EQ, 0, mask, value),)) for mask, value in personality_denied()]
    out += [Rule("ioctl", eperm, ((CMP_MASKED_EQ, 1, 0xFFFFFFFF, request),)) for request in IOCTLS.values()]
    return out


def personality_denied() -> list[tuple[int, int]]:
    """``(mask, value)`` pairs: personality(2) is denied when ``arg & mask == value`` for any of them.

    A filter rule may compare an argument once, so "none but these five values" is said as a union:
    with the bits no allowed value has in a cycle, deny "bit ``b`` set and the next one clear" for each.
    A value passes them all only if it has none of those bits (then it is one of the four made of
    ``PERSONALITY_BITS``) or all of them, and of those only the query is allowed. The kernel reads the
    argument as a 32-bit int: every mask is within 32 bits, so the upper half of the register is ignored.
    """
    bad = [1 << b for b in range(32) if not PERSONALITY_BITS >> b & 1]
    out = [(bit | bad[(i + 1) % len(bad)], bit) for i, bit in enumerate(bad)]
    every = sum(bad)
    subsets = [s for s in range(PERSONALITY_BITS + 1) if s & PERSONALITY_BITS == s]
    out += [(PERSONALITY_QUERY, every | s) for s in subsets if every | s != PERSONALITY_QUERY]
    return out


def build() -> bytes:
    """The filter as a BPF program for ``bwrap --seccomp`` (native architecture only)."""
    lib = _library()
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        if lib.seccomp_attr_set(ctx, ATTR_ACT_BADARCH, ACT_KILL_PROCESS) != 0:
            raise SeccompError("libseccomp cannot set the action for other architectures")
        for rule in rules():
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr == -1:  # __NR_SCMP_ERROR: this libseccomp does not know it
                continue
            cmps = (_ArgCmp * max(len(rule.compare), 1))(*(_ArgCmp(a, op, x, y) for op, a, x, y in rule.compare))
            rc = lib.seccomp_rule_add_array(ctx, rule.action, nr, len(rule.compare), cmps)
            if rc != 0:
                raise SeccompError(f"libseccomp refused the rule for {rule.syscall}: {os.strerror(-rc)}")
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc != 0:
                raise SeccompError(f"libseccomp could not export the filter: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


def write(path: Path) -> None:
    """Make the filter into ``path`` (mode 0644: it is no secret), replacing what was there at once, if
    it differs (several processes of the platform make the same one)."""
    program = build()
    try:
        if path.read_bytes() == program:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(program)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
