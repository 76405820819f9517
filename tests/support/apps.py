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
