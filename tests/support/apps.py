"""Small apps for tests, written as folders and packed as archives or git repositories."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

WEB_PROFILE = """command: python3 server.py --name {name} --greeting {greeting} --port {port}
memory: 256m
scale: 2
"""

SERVER_PY = """import json, os, sys, socket
args = sys.argv[1:]
with open("argv.json", "w") as f:
    json.dump({"argv": args, "port": os.environ.get("PORT")}, f)
print("started with", args, flush=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"]))); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"hello from " + os.environ["PORT"].encode()); c.close()
"""


def write_app(root: Path, files: dict[str, str], mode_x: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        if name in mode_x:
            p.chmod(0o755)
    return root


def web_app(root: Path) -> Path:
    return write_app(root, {"profile": WEB_PROFILE, "server.py": SERVER_PY})


def tar_gz(src: Path, dest: Path, top: str = "app") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=top)
    return dest


def zip_dir(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src))
    return dest


def tar_with_member(
    dest: Path, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> Path:
    """A tar.gz holding a profile plus one crafted member (for traversal tests)."""
    with tarfile.open(dest, "w:gz") as tf:
        prof = b"command: /bin/true\n"
        info = tarfile.TarInfo("profile")
        info.size = len(prof)
        tf.addfile(info, io.BytesIO(prof))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return dest


def git_repo(src: Path) -> Path:
    def git(*args):
        subprocess.run(["git", *args], cwd=src, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", "app")
    return src


# A tenant's program trying what the sandbox's seccomp filter denies; one line each,
# "syscall <name>: allowed" or the errno's name ("EPERM"), then "syscall-probe-done".
SYSCALL_PROBE_PY = r"""import ctypes, errno, fcntl, os, struct, sys, termios
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def say(name, rc, err=0):
    print(f"syscall {name}: " + ("allowed" if rc != -1 else errno.errorcode.get(err, str(err))), flush=True)


def call(name, fn, *args):
    ctypes.set_errno(0)
    rc = fn(*args)
    say(name, rc, ctypes.get_errno())


call("unshare_user", libc.unshare, 0x10000000)  # CLONE_NEWUSER
call("unshare_mount", libc.unshare, 0x00020000)  # CLONE_NEWNS
os.makedirs("probe-mnt", exist_ok=True)  # in its own folder: harmless should it work
call("mount", libc.mount, b"none", b"probe-mnt", b"tmpfs", ctypes.c_ulong(0), None)
libc.umount2(b"probe-mnt", 2)  # MNT_DETACH
# add_key("user", ..., KEY_SPEC_PROCESS_KEYRING): any user may, without the filter
call("keyctl", libc.syscall, ctypes.c_long(248), b"user", b"nap", b"x", ctypes.c_size_t(1), ctypes.c_long(-2))
# perf_event_open of a software clock on itself, user space only: allowed at perf_event_paranoid 2
attr = ctypes.create_string_buffer(struct.pack("<IIQ", 1, 128, 0) + bytes(24) + struct.pack("<Q", 1 | 32 | 64), 128)
call("perf_event_open", libc.syscall, ctypes.c_long(298), attr, 0, -1, -1, ctypes.c_ulong(0))
call("bpf", libc.syscall, ctypes.c_long(321), 0, ctypes.create_string_buffer(72), 72)  # BPF_MAP_CREATE
# TIOCSTI on its own controlling terminal (a new pty), as an attacker would on a shared one
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    try:
        fcntl.ioctl(slave, termios.TIOCSTI, b"x")
        os.write(w, b"0")
    except OSError as e:
        os.write(w, str(e.errno).encode())
    os._exit(0)
os.waitpid(pid, 0)
code = int(os.read(r, 16))
say("tiocsti", -1 if code else 0, code)
print("syscall-probe-done", flush=True)
if sys.argv[1:] == ["stay"]:  # as an instance: it stays up, so its launch succeeds
    os.execvp("sleep", ["sleep", "100000"])
"""
SYSCALL_PROBE = {"profile": "command: python3 probe.py stay\n", "probe.py": SYSCALL_PROBE_PY}
# what it tries (all of which the filter denies with EPERM)
SYSCALL_ATTACKS = ["unshare_user", "unshare_mount", "mount", "keyctl", "perf_event_open", "bpf", "tiocsti"]
