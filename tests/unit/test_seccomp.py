"""The sandbox's seccomp filter (``engines.seccomp``): made by libseccomp, then loaded for real in a child
process (``prctl(PR_SET_SECCOMP)``, as bwrap does) to see what it denies and what it lets through."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from nap_orch import units
from nap_orch.engines import seccomp
from nap_orch.engines.local import sandbox as local_sandbox
from nap_orch.engines.slurm import scripts

try:
    PROGRAM = seccomp.build()
except seccomp.SeccompError as e:  # pragma: no cover - libseccomp2 is on every machine the tests run on
    pytest.skip(f"no libseccomp: {e}", allow_module_level=True)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers below are x86_64's")

# Runs in a child: loads the filter read from stdin, then makes each call of argv[1] (a JSON list of
# [name, nr, args...]) and prints {name: errno or 0}.
CHILD = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
program = sys.stdin.buffer.read()
buf = ctypes.create_string_buffer(program, len(program))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(program) // 8, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
out = {}
for name, nr, *args in json.loads(sys.argv[1]):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    out[name] = ctypes.get_errno() if rc == -1 else 0
    if name == "fork" and rc == 0:
        os._exit(0)
    if name == "fork" and rc > 0:
        os.waitpid(rc, 0)
print(json.dumps(out), flush=True)
"""

X32 = 0x40000000
NR = {
    "getpid": 39,
    "clone": 56,
    "ioctl": 16,
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "fsopen": 430,
    "open_tree": 428,
    "mount_setattr": 442,
    "keyctl": 250,
    "add_key": 248,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "init_module": 175,
    "kexec_load": 246,
    "reboot": 169,
    "swapon": 167,
    "clock_settime": 227,
    "settimeofday": 164,
    "adjtimex": 159,
    "iopl": 172,
    "syslog": 103,
    "acct": 163,
    "personality": 135,
    "clone3": 435,
    "ptrace": 101,
    "process_vm_readv": 310,
}
SIGCHLD = 17
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID = 0x10000000, 0x00020000, 0x20000000
TIOCSTI, TIOCGWINSZ = 0x5412, 0x5413


def run(calls: list[list]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(calls)], input=PROGRAM, capture_output=True, timeout=30
    )


def results(calls: list[list]) -> dict[str, int]:
    proc = run(calls)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_the_program_is_whole_bpf_instructions_checking_the_architecture_first():
    assert len(PROGRAM) % 8 == 0 and 50 < len(PROGRAM) // 8 < 4096  # BPF_MAXINSNS
    insns = [struct.unpack("<HBBI", PROGRAM[i : i + 8]) for i in range(0, len(PROGRAM), 8)]
    assert insns[0] == (0x20, 0, 0, 4)  # ld [4]: seccomp_data.arch
    code, jt, jf, k = insns[1]
    assert code == 0x15 and k == 0xC000003E  # jeq AUDIT_ARCH_X86_64
    # anything else (i386 through int 0x80) ends at "ret KILL_PROCESS"
    assert insns[2 + jf] == (0x06, 0, 0, seccomp.ACT_KILL_PROCESS)
    assert seccomp.build() == PROGRAM  # the same every time


def test_the_denied_calls_fail_with_eperm():
    denied = [
        "unshare",
        "setns",
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "open_tree",
        "mount_setattr",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "init_module",
        "kexec_load",
        "reboot",
        "swapon",
        "clock_settime",
        "settimeofday",
        "adjtimex",
        "iopl",
        "syslog",
        "acct",
    ]
    # harmless arguments: as root outside the filter, none of these would do anything lasting
    got = results([[name, NR[name], 0, 0, 0, 0, 0] for name in denied])
    assert got == dict.fromkeys(denied, errno.EPERM)


def test_new_namespaces_through_clone_are_denied_and_clone3_is_enosys_so_libc_falls_back():
    got = results(
        [
            ["newuser", NR["clone"], SIGCHLD | CLONE_NEWUSER, 0, 0, 0, 0],
            ["newns", NR["clone"], SIGCHLD | CLONE_NEWNS | CLONE_NEWPID, 0, 0, 0, 0],
            ["clone3", NR["clone3"], 0, 0],
            ["fork", NR["clone"], SIGCHLD, 0, 0, 0, 0],
        ]
    )
    assert got == {"newuser": errno.EPERM, "newns": errno.EPERM, "clone3": errno.ENOSYS, "fork": 0}


def test_personality_allows_only_the_harmless_values():
    addr_no_randomize, read_implies_exec, mmap_page_zero = 0x0040000, 0x0400000, 0x0100000
    calls = [[f"ok_{v:#x}", NR["personality"], v] for v in (0xFFFFFFFF, 0, 0x20000, 0)]
    calls += [
        [f"bad_{v:#x}", NR["personality"], v]
        for v in (addr_no_randomize, read_implies_exec, mmap_page_zero, 0xFFFFFFF7, 0x1_0004_0000, 1)
    ]
    got = results(calls)
    assert {k: v for k, v in got.items() if k.startswith("ok")} == {f"ok_{v:#x}": 0 for v in (0xFFFFFFFF, 0, 0x20000)}
    assert all(v == errno.EPERM for k, v in got.items() if k.startswith("bad")), got


def test_tiocsti_is_denied_whatever_the_upper_bits_while_other_ioctls_pass():
    got = results(
        [
            ["tiocsti", NR["ioctl"], 0, TIOCSTI, 0],
            ["tiocsti_hi", NR["ioctl"], 0, (1 << 32) | TIOCSTI, 0],
            ["winsz", NR["ioctl"], 12345, TIOCGWINSZ, 0],  # not filtered: EBADF from the kernel
        ]
    )
    assert got == {"tiocsti": errno.EPERM, "tiocsti_hi": errno.EPERM, "winsz": errno.EBADF}


def test_what_mpi_and_ordinary_programs_need_still_works():
    got = results(
        [
            ["getpid", NR["getpid"]],
            ["ptrace", NR["ptrace"], 0xFFFF, 0, 0, 0],  # PTRACE_PEEK... on nothing: ESRCH, not EPERM
            ["process_vm_readv", NR["process_vm_readv"], 0, 0, 0, 0, 0, 0],
        ]
    )
    assert got["getpid"] == 0
    assert got["ptrace"] != errno.EPERM and got["process_vm_readv"] != errno.EPERM
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.replace(
                "out = {}", "import threading; t = threading.Thread(target=print); t.start(); t.join(); out = {}"
            ),
            "[]",
        ],
        input=PROGRAM,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()  # threads: clone3 refused, clone used


def test_a_syscall_of_the_x32_abi_kills_the_process():
    proc = run([["x32_getpid", X32 | NR["getpid"]]])
    assert proc.returncode == -signal.SIGSYS


def test_the_unit_says_what_the_filter_denies():
    unit = units.Unit("alice_web_common@3", "x", ["/bin/true"], "/tmp", {}, user=200001, group=200001)
    text = units.render(unit)
    said = [n for line in text.splitlines() if line.startswith("SystemCallFilter=~") for n in line[18:].split()]
    assert said == list(seccomp.DENIED)
    assert "SystemCallErrorNumber=EPERM" in text and "SystemCallArchitectures=native" in text
    assert "RestrictNamespaces=yes" in text and "LockPersonality=yes" in text
    assert units.parse(text) == unit
    if shutil.which("systemd-analyze"):
        assert units.verify(text, unit.name) == ""


def test_without_libseccomp_the_filter_cannot_be_made_and_the_agent_refuses_to_sandbox(monkeypatch, tmp_path):
    monkeypatch.setattr(seccomp, "LIBRARY", "libseccomp-missing.so.2")
    with pytest.raises(seccomp.SeccompError, match="Debian package libseccomp2"):
        seccomp.build()
    isolation, why = local_sandbox.prepare("test", str(tmp_path / "home"), tmp_path / "agent")
    assert isolation is None
    if os.geteuid() == 0 and shutil.which("bwrap") and shutil.which("unshare"):  # else it says that first
        assert why.startswith("cannot make the sandbox's seccomp filter: libseccomp-missing.so.2 cannot be loaded")
    assert not (tmp_path / "agent" / "seccomp.bpf").exists()


def test_the_filter_file_is_written_once_readable_by_all(tmp_path):
    path = tmp_path / "slurm" / "seccomp.bpf"
    seccomp.write(path)
    assert path.read_bytes() == PROGRAM and path.stat().st_mode & 0o777 == 0o644
    before = path.stat().st_ino
    seccomp.write(path)  # the same program: left as it is
    assert path.stat().st_ino == before and [p.name for p in path.parent.iterdir()] == ["seccomp.bpf"]


def test_a_slurm_task_opens_the_filter_for_its_sandbox_or_starts_none(tmp_path):
    path = tmp_path / "slurm" / "seccomp.bpf"
    seccomp.write(path)
    unit = units.Unit("alice_web_common@3", "x", ["/bin/true"], str(tmp_path), {}, user=200001, group=200001)
    show = 'printf "%s\\n" "$(readlink "/proc/$$/fd/$nap_sfd")" "${nap_box[@]}"'
    for filter_file in (path, tmp_path / "missing.bpf"):
        lines = scripts.NodeSandbox("st", "/var/lib/nap", str(filter_file)).lines(unit)
        script = "\n".join(['nap_event() { echo "nap: $*"; }', *lines, show])
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30).stdout.splitlines()
        box = out[out.index("--seccomp") :]
        if filter_file == path:
            assert out[0] == str(path) and box[1].isdigit()  # its own descriptor, in bwrap's argv
        else:  # bwrap then refuses "--seccomp ''": no sandbox at all rather than one without the filter
            assert out[0] == f"nap: cannot read the seccomp filter {filter_file}: no sandbox starts"
            assert box[1] == ""
    lines = scripts.NodeSandbox("st", "/var/lib/nap").lines(unit)
    assert "--seccomp" not in " ".join(lines)
