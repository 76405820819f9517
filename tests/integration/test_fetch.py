"""The fetcher turns a URL into a folder of app files, and never writes outside it.

Real things only: archives built with tarfile/zipfile, an aiohttp server on 127.0.0.1 serving them,
git repositories made with the git command.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from nap_orch.config import MiB, Settings
from nap_orch.errors import BadRequest, Cancelled, FetchError
from nap_orch.ops.fetch import fetch

# -- fixtures and helpers --------------------------------------------------------------------------


@dataclass
class Server:
    """A real HTTP server: ``/files/<name>`` serves ``root/<name>`` (404 if absent); ``/stream``
    sends ``mib`` MiB of zeros with no Content-Length, pausing ``delay`` seconds between 64 KiB chunks."""

    root: Path
    base: str

    def url(self, name: str) -> str:
        return f"{self.base}/files/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)


@pytest.fixture
async def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    async def files(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def stream(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("mib", "64")) * MiB
        delay = float(request.query.get("delay", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = bytes(64 * 1024)
        sent = 0
        try:
            while sent < size:
                await response.write(chunk)
                sent += len(chunk)
                if delay:
                    await asyncio.sleep(delay)
        except ConnectionError:
            pass  # the fetcher hung up, as it should
        return response

    app = web.Application()
    app.router.add_get("/files/{name}", files)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield Server(root, f"http://127.0.0.1:{port}")
    await runner.cleanup()


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "staging" / "app"


def settings(tmp_path: Path, **overrides) -> Settings:
    """Local sources from anywhere in the test's folder; the test servers on loopback allowed."""
    return Settings(
        home=tmp_path / "home",
        **{"allow_local_sources": True, "local_sources_dir": str(tmp_path), "fetch_allow": "127.0.0.0/8", **overrides},
    )


class Recorder:
    """A ``log`` callback that keeps the lines."""

    def __init__(self):
        self.lines: list[str] = []

    async def __call__(self, message: str) -> None:
        self.lines.append(message)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def assert_nothing_left(dest: Path) -> None:
    assert not os.path.lexists(dest)
    # Nor any temporary file or folder beside it.
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tar_bytes(entries: list[tarfile.TarInfo | tuple], mode: str = "w:gz") -> bytes:
    """A tar archive. Entries are TarInfo (no data) or ``(name, data, file_mode)``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data, file_mode = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = file_mode
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def tar_special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def zip_bytes(entries: list[tuple], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive made on "unix". Entries are ``(name, data, mode)``; mode includes the file type."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = mode << 16
            info.compress_type = compression
            zf.writestr(info, data)
    return buffer.getvalue()


APP_FILES = [
    ("web-1a2b3c/profile", b"command: ./bin/run {port}\n", 0o644),
    ("web-1a2b3c/bin/run", b"#!/bin/sh\nexec python3 -m http.server $1\n", 0o755),
    ("web-1a2b3c/src/app.py", b"print('hello')\n", 0o644),
]
APP_BYTES = sum(len(data) for _, data, _ in APP_FILES)


def app_archive(kind: str) -> bytes:
    if kind == "zip":
        return zip_bytes([(name, data, stat.S_IFREG | mode) for name, data, mode in APP_FILES])
    return tar_bytes(APP_FILES, mode={"tar.gz": "w:gz", "tgz": "w:gz", "tar": "w"}[kind])


def assert_app(dest: Path) -> None:
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "bin",
        "bin/run",
        "profile",
        "src",
        "src/app.py",
    ]
    assert (dest / "profile").read_text() == "command: ./bin/run {port}\n"
    assert os.access(dest / "bin" / "run", os.X_OK)
    assert not os.access(dest / "src" / "app.py", os.X_OK)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def make_repo(path: Path) -> str:
    """A git repository of two commits; returns the head commit."""
    path.mkdir(parents=True)
    git("init", "-q", cwd=path)
    (path / "profile").write_text("command: python3 app.py\n")
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "first", cwd=path)
    (path / "app.py").write_text("print('hi')\n")
    (path / "run.sh").write_text("#!/bin/sh\n")
    (path / "run.sh").chmod(0o755)
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "second", cwd=path)
    (path / "uncommitted.txt").write_text("not part of the app\n")
    return git("rev-parse", "HEAD", cwd=path)


# -- archives over http ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar.gz", "tgz", "tar", "zip"])
async def test_archive_is_extracted_with_its_top_folder_flattened(server, dest, tmp_path, kind):
    url = server.put(f"web.{kind}", app_archive(kind))
    log = Recorder()

    summary = await fetch(url, dest, settings=settings(tmp_path), log=log)

    assert_app(dest)
    assert summary == {"kind": "archive", "files": 3, "bytes": APP_BYTES}
    assert log.lines[0] == f"downloading {url}"
    assert log.has(f"downloaded {len(app_archive(kind))} bytes")
    assert log.lines[-1] == f"extracted 3 files ({APP_BYTES} bytes)"
    assert [p.name for p in dest.parent.iterdir()] == ["app"]


async def test_archive_with_several_top_entries_is_kept_as_is(server, dest, tmp_path):
    data = tar_bytes([("profile", b"command: x\n", 0o644), ("lib/a.py", b"", 0o644)])
    url = server.put("app.tar.gz", data)

    await fetch(url, dest, settings=settings(tmp_path))

    assert (dest / "profile").read_text() == "command: x\n"
    assert (dest / "lib" / "a.py").exists()


async def test_archive_is_recognised_by_content_not_by_name(server, dest, tmp_path):
    url = server.put("download", app_archive("zip"))  # no extension at all

    summary = await fetch(url, dest, settings=settings(tmp_path))

    assert_app(dest)
    assert summary["kind"] == "archive"


async def test_download_of_known_size_reports_progress(server, dest, tmp_path):
    url = server.put("big.tar", tar_bytes([("blob", os.urandom(3 * MiB), 0o644)], mode="w"))
    log = Recorder()

    await fetch(url, dest, settings=settings(tmp_path), log=log)

    progress = [line for line in log.lines if line.endswith("%)")]
    assert len(progress) >= 5, log.lines
    assert "of 3.0 MiB" in progress[0]


async def test_an_html_page_is_not_an_archive(server, dest, tmp_path):
    url = server.put("index.html", b"<!DOCTYPE html><html><body>Hello</body></html>")

    expected = r"not an archive or repository \(content type text/html, 46 bytes\)$"
    with pytest.raises(FetchError, match=expected):
        await fetch(url, dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_missing_file_reports_the_http_status(server, dest, tmp_path):
    url = server.url("nothing.tar.gz")

    with pytest.raises(FetchError, match=f"HTTP 404 Not Found \\(content type text/plain\\) from {url}"):
        await fetch(url, dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_unreachable_host_is_named(dest, tmp_path):
    port = closed_port()

    with pytest.raises(FetchError, match=f"cannot reach host 127.0.0.1:{port}: Connection refused"):
        await fetch(f"http://127.0.0.1:{port}/app.tar.gz", dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_credentials_in_the_url_are_refused_and_stay_out_of_messages(server, dest, tmp_path):
    url = server.url("nothing.zip").replace("http://", "http://alice:s3cret@")
    log = Recorder()

    with pytest.raises(BadRequest, match="the URL carries credentials") as caught:
        await fetch(url, dest, settings=settings(tmp_path), log=log)
    assert "s3cret" not in caught.value.message
    assert not log.has("s3cret")
    assert_nothing_left(dest)


async def test_download_past_the_limit_stops_while_streaming(server, dest, tmp_path):
    log = Recorder()

    with pytest.raises(FetchError, match=f"download exceeds the limit of {MiB} bytes$"):
        await fetch(f"{server.base}/stream?mib=64", dest, settings=settings(tmp_path, max_download=MiB), log=log)
    assert_nothing_left(dest)
    assert not log.has("downloaded 64")


async def test_download_announced_too_big_fails_before_streaming(server, dest, tmp_path):
    url = server.put("big.tar", bytes(2 * MiB))

    expected = f"download exceeds the limit of {MiB} bytes \\(the server announces {2 * MiB}\\)"
    with pytest.raises(FetchError, match=expected):
        await fetch(url, dest, settings=settings(tmp_path, max_download=MiB))
    assert_nothing_left(dest)


async def test_slow_download_times_out(server, dest, tmp_path):
    with pytest.raises(FetchError, match="timed out after 0.5 seconds"):
        await fetch(f"{server.base}/stream?mib=64&delay=0.05", dest, settings=settings(tmp_path, download_timeout=0.5))
    assert_nothing_left(dest)


# -- URLs that are refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://example.com/app.tar.gz", "unsupported URL scheme 'ftp:'"),
        ("ssh://git@example.com/app.git", "unsupported URL scheme 'ssh:'"),
        ("javascript:alert(1)", "unsupported URL scheme 'javascript:'"),
        ("data:application/zip;base64,UEsDBA==", "unsupported URL scheme 'data:'"),
        ("", "empty URL"),
        ("app/site.tar.gz", "not a URL"),
        ("git@github.com:alice/app.git", "not a URL"),
        ("http:///no-host.tar.gz", "has no host"),
        ("https://example.com/app.tar.gz\nHost: evil", "control characters"),
    ],
)
async def test_bad_urls_are_refused(dest, tmp_path, url, message):
    with pytest.raises(BadRequest, match=message) as caught:
        await fetch(url, dest, settings=settings(tmp_path))
    if "scheme" in message or "not a URL" in message:
        assert "http://, https://" in caught.value.message  # says what is allowed
    assert_nothing_left(dest)


async def test_existing_destination_is_left_alone(server, dest, tmp_path):
    dest.mkdir(parents=True)
    (dest / "keep").write_text("mine")

    with pytest.raises(FileExistsError):
        await fetch(server.put("a.zip", app_archive("zip")), dest, settings=settings(tmp_path))
    assert (dest / "keep").read_text() == "mine"


# -- unsafe archives -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "../../evil", "top/../../evil", "top/../../../evil", "ABSOLUTE"])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
async def test_entries_outside_the_folder_refuse_the_whole_archive(server, dest, tmp_path, name, kind):
    absolute = tmp_path / "abs-evil"
    name = str(absolute) if name == "ABSOLUTE" else name
    entries = [("top/profile", b"command: x\n", 0o644), (name, b"pwned", 0o644)]
    data = app_archive_of(kind, entries)

    with pytest.raises(FetchError, match=r"absolute path|climbs out"):
        await fetch(server.put(f"evil.{kind}", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)
    assert not absolute.exists()
    assert [p for p in tmp_path.rglob("*evil*") if p.parent != server.root] == []


def app_archive_of(kind: str, entries: list[tuple]) -> bytes:
    if kind == "zip":
        return zip_bytes([(name, data, stat.S_IFREG | mode) for name, data, mode in entries])
    return tar_bytes(entries)


async def test_zip_entry_with_backslash_climb_is_refused(server, dest, tmp_path):
    data = zip_bytes([("..\\..\\evil", b"pwned", stat.S_IFREG | 0o644)])

    with pytest.raises(FetchError, match="climbs out"):
        await fetch(server.put("evil.zip", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


@pytest.mark.parametrize(
    "name, target, message",
    [
        ("top/link", "/etc/passwd", "points to an absolute path"),
        ("top/link", "../../../outside", "points outside the app"),
        ("top/deep/link", "../../../../../etc", "points outside the app"),
        ("link", "..", "points outside the app"),
    ],
)
async def test_symlinks_pointing_outside_are_refused(server, dest, tmp_path, name, target, message):
    data = tar_bytes([("top/profile", b"command: x\n", 0o644), tar_link(name, target)])

    with pytest.raises(FetchError, match=f"symlink '{name}' {message}"):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_symlink_escaping_the_flattened_top_folder_is_refused(server, dest, tmp_path):
    # Inside the archive's root, but the app is the top folder's content: "top/up -> .." escapes it.
    data = tar_bytes([("top/profile", b"command: x\n", 0o644), tar_link("top/up", "..")])

    with pytest.raises(FetchError, match="symlink 'top/up' resolves outside the app"):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_chain_of_symlinks_escaping_is_refused(server, dest, tmp_path):
    # Each looks harmless on paper; on disk d/a -> d/b/../.. climbs two levels above the app.
    data = tar_bytes(
        [
            ("profile", b"command: x\n", 0o644),
            ("d/keep", b"", 0o644),
            tar_link("d/b", ".."),
            tar_link("d/a", "b/../.."),
        ]
    )

    with pytest.raises(FetchError, match="symlink 'd/a' resolves outside the app"):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_file_under_a_symlink_is_refused(server, dest, tmp_path):
    data = tar_bytes(
        [
            ("top/sub/keep", b"", 0o644),
            tar_link("top/d", "sub"),
            ("top/d/evil", b"pwned", 0o644),
        ]
    )

    with pytest.raises(FetchError, match="lies under the symlink 'top/d'"):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_symlinks_and_hard_links_inside_are_kept(server, dest, tmp_path):
    data = tar_bytes(
        [
            ("top/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
            tar_link("top/start", "run.sh"),
            tar_link("top/bin/again", "top/run.sh", tarfile.LNKTYPE),
        ]
    )

    summary = await fetch(server.put("ok.tar.gz", data), dest, settings=settings(tmp_path))

    assert os.readlink(dest / "start") == "run.sh"
    assert (dest / "bin" / "again").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert not (dest / "bin" / "again").is_symlink()
    assert os.access(dest / "bin" / "again", os.X_OK)
    assert summary["files"] == 3


@pytest.mark.parametrize(
    "target, message",
    [
        ("/etc/passwd", "absolute path"),
        ("../../outside", "climbs out"),
        ("top/missing", "not a file earlier in the archive"),
        ("top/link", "not a file earlier in the archive"),
    ],
)
async def test_hard_links_outside_or_to_non_members_are_refused(server, dest, tmp_path, target, message):
    (tmp_path / "outside").write_text("secret")
    data = tar_bytes(
        [
            ("top/profile", b"command: x\n", 0o644),
            tar_link("top/link", "profile"),
            tar_link("top/hard", target, tarfile.LNKTYPE),
        ]
    )

    with pytest.raises(FetchError, match=message):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
async def test_devices_and_fifos_are_refused(server, dest, tmp_path, kind):
    data = tar_bytes([("top/profile", b"command: x\n", 0o644), tar_special("top/dev", kind)])

    with pytest.raises(FetchError, match="'top/dev' is a device or fifo"):
        await fetch(server.put("evil.tar.gz", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_zip_symlink_pointing_outside_is_refused(server, dest, tmp_path):
    data = zip_bytes(
        [
            ("top/profile", b"command: x\n", stat.S_IFREG | 0o644),
            ("top/link", b"../../etc/passwd", stat.S_IFLNK | 0o777),
        ]
    )

    with pytest.raises(FetchError, match="symlink 'top/link' points outside the app"):
        await fetch(server.put("evil.zip", data), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_zip_symlink_inside_is_kept(server, dest, tmp_path):
    data = zip_bytes(
        [
            ("top/profile", b"command: x\n", stat.S_IFREG | 0o644),
            ("top/link", b"profile", stat.S_IFLNK | 0o777),
        ]
    )

    await fetch(server.put("ok.zip", data), dest, settings=settings(tmp_path))

    assert os.readlink(dest / "link") == "profile"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
async def test_too_many_files_are_refused(server, dest, tmp_path, kind):
    entries = [(f"top/f{i}", b"x", 0o644) for i in range(10)]

    with pytest.raises(FetchError, match="more than 5 files and folders"):
        url = server.put(f"many.{kind}", app_archive_of(kind, entries))
        await fetch(url, dest, settings=settings(tmp_path, max_files=5))
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
async def test_expansion_past_the_limit_is_refused(server, dest, tmp_path, kind):
    # 64 MiB of zeros compress to a few dozen KiB: a small download, a big folder.
    entries = [("top/profile", b"command: x\n", 0o644), ("top/zeros", bytes(64 * MiB), 0o644)]
    data = app_archive_of(kind, entries)
    assert len(data) < MiB

    with pytest.raises(FetchError, match=f"expands past the limit of {4 * MiB} bytes"):
        await fetch(server.put(f"bomb.{kind}", data), dest, settings=settings(tmp_path, max_extract=4 * MiB))
    assert_nothing_left(dest)


async def test_zip_whose_header_understates_the_size_is_refused(server, dest, tmp_path):
    data = bytearray(zip_bytes([("zeros", bytes(8 * MiB), stat.S_IFREG | 0o644)]))
    # Claim 100 bytes uncompressed, in the local header and in the central directory.
    data[22:26] = (100).to_bytes(4, "little")
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")

    with pytest.raises(FetchError):
        await fetch(server.put("liar.zip", bytes(data)), dest, settings=settings(tmp_path, max_extract=MiB))
    assert_nothing_left(dest)


async def test_truncated_archive_is_reported(server, dest, tmp_path):
    data = tar_bytes([("top/blob", os.urandom(256 * 1024), 0o644)])

    with pytest.raises(FetchError, match="cannot extract the gzip archive"):
        await fetch(server.put("cut.tar.gz", data[: len(data) // 2]), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


# -- git -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file-url", "path"])
async def test_git_repository_is_cloned_without_its_git_folder(dest, tmp_path, form):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    url = repo.as_uri() if form == "file-url" else str(repo)
    log = Recorder()

    summary = await fetch(url, dest, settings=settings(tmp_path), log=log)

    assert sorted(p.name for p in dest.iterdir()) == ["app.py", "profile", "run.sh"]
    assert os.access(dest / "run.sh", os.X_OK)
    size = sum(p.stat().st_size for p in dest.iterdir())
    assert summary == {"kind": "git", "files": 3, "bytes": size, "commit": head}
    assert log.has(f"at commit {head[:12]}")
    assert [p.name for p in dest.parent.iterdir()] == ["app"]


def bare_clone(repo: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(dest)], check=True)
    return dest


async def test_a_bare_repository_given_as_a_path_is_cloned_not_copied(dest, tmp_path):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    bare = bare_clone(repo, tmp_path / "app.git")

    summary = await fetch(str(bare), dest, settings=settings(tmp_path))

    assert sorted(p.name for p in dest.iterdir()) == ["app.py", "profile", "run.sh"]
    assert summary["kind"] == "git" and summary["commit"] == head


async def test_git_clone_failure_says_why(dest, tmp_path):
    port = closed_port()

    url = f"http://127.0.0.1:{port}/alice/app.git"

    with pytest.raises(FetchError, match=f"git clone of {url} failed: fatal:"):
        await fetch(url, dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_git_clone_past_the_file_limit_is_refused(dest, tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo)

    with pytest.raises(FetchError, match="more than 2 files and folders"):
        await fetch(str(repo), dest, settings=settings(tmp_path, max_files=2))
    assert_nothing_left(dest)


async def test_git_repository_with_a_symlink_outside_is_refused(dest, tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo)
    (repo / "passwd").symlink_to("/etc/passwd")
    git("add", "passwd", cwd=repo)
    git("commit", "-q", "-m", "sneaky", cwd=repo)

    with pytest.raises(FetchError, match="symlink 'passwd' points to an absolute path"):
        await fetch(str(repo), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


# -- local sources ---------------------------------------------------------------------------------


def make_folder(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "profile").write_text("command: ./bin/run\n")
    (path / "bin" / "run").write_text("#!/bin/sh\n")
    (path / "bin" / "run").chmod(0o755)
    (path / "start").symlink_to("bin/run")
    return path


@pytest.mark.parametrize("form", ["path", "file-url"])
async def test_local_folder_is_copied_when_allowed(dest, tmp_path, form):
    folder = make_folder(tmp_path / "src")
    url = folder.as_uri() if form == "file-url" else str(folder)

    summary = await fetch(url, dest, settings=settings(tmp_path))

    assert (dest / "profile").read_text() == "command: ./bin/run\n"
    assert os.access(dest / "bin" / "run", os.X_OK)
    assert os.readlink(dest / "start") == "bin/run"
    assert summary == {"kind": "local", "files": 3, "bytes": 29}


@pytest.mark.parametrize("form", ["path", "file-url"])
async def test_local_sources_are_refused_unless_allowed(dest, tmp_path, form):
    folder = make_folder(tmp_path / "src")
    url = folder.as_uri() if form == "file-url" else str(folder)

    with pytest.raises(BadRequest, match="local sources are not allowed on this server"):
        await fetch(url, dest, settings=settings(tmp_path, allow_local_sources=False))
    assert_nothing_left(dest)


async def test_local_folder_with_a_symlink_outside_is_refused(dest, tmp_path):
    folder = make_folder(tmp_path / "src")
    (folder / "secrets").symlink_to("../../..")

    with pytest.raises(FetchError, match="symlink 'secrets' points outside the app"):
        await fetch(str(folder), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_local_archive_file_is_extracted(dest, tmp_path):
    archive = tmp_path / "web.tgz"
    archive.write_bytes(app_archive("tgz"))

    summary = await fetch(archive.as_uri(), dest, settings=settings(tmp_path))

    assert_app(dest)
    assert summary["kind"] == "archive"


async def test_missing_local_path_is_reported(dest, tmp_path):
    with pytest.raises(FetchError, match="no such file or folder"):
        await fetch(str(tmp_path / "nowhere"), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


async def test_local_folder_holding_the_destination_is_refused(tmp_path):
    dest = tmp_path / "src" / "staging" / "app"
    make_folder(tmp_path / "src")

    with pytest.raises(FetchError, match="into a folder inside it"):
        await fetch(str(tmp_path / "src"), dest, settings=settings(tmp_path))
    assert_nothing_left(dest)


# -- cancellation ----------------------------------------------------------------------------------


class CancelAfter:
    """A ``check`` that raises Cancelled from its n-th call on (or when ``when()`` says so)."""

    def __init__(self, calls: int = 1, when=None):
        self.calls = 0
        self.limit = calls
        self.when = when

    async def __call__(self) -> None:
        self.calls += 1
        due = self.when() if self.when is not None else self.calls >= self.limit
        if due:
            raise Cancelled("the job was cancelled")


async def test_cancellation_before_anything_happens(server, dest, tmp_path):
    log = Recorder()

    with pytest.raises(Cancelled):
        url = server.put("a.zip", app_archive("zip"))
        await fetch(url, dest, settings=settings(tmp_path), log=log, check=CancelAfter(1))
    assert_nothing_left(dest)
    assert log.lines == []


async def test_cancellation_during_a_download(server, dest, tmp_path):
    log = Recorder()
    check = CancelAfter(4)

    with pytest.raises(Cancelled):
        url = f"{server.base}/stream?mib=64&delay=0.02"
        await fetch(url, dest, settings=settings(tmp_path), log=log, check=check)
    assert check.calls == 4
    assert log.has("downloading") and not log.has("bytes")  # stopped mid-stream
    assert_nothing_left(dest)


async def test_cancellation_during_extraction_stops_the_thread(server, dest, tmp_path):
    data = tar_bytes([("top/f%d" % i, bytes(MiB), 0o644) for i in range(200)])
    staging = dest.parent
    # Cancel once extraction has visibly begun (the hidden work folder holds a file).
    check = CancelAfter(when=lambda: any(p.name == "f0" for p in staging.rglob("f0")))

    with pytest.raises(Cancelled):
        await fetch(server.put("big.tar.gz", data), dest, settings=settings(tmp_path), check=check)
    assert_nothing_left(dest)


async def test_cancellation_during_a_clone_stops_git(dest, tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo)
    # Incompressible, so that cloning lasts a good fraction of a second.
    (repo / "blob").write_bytes(os.urandom(16 * MiB))
    git("add", "blob", cwd=repo)
    git("commit", "-q", "-m", "big", cwd=repo)
    log = Recorder()
    check = CancelAfter(when=lambda: log.has("cloning"))

    with pytest.raises(Cancelled):
        await fetch(str(repo), dest, settings=settings(tmp_path), log=log, check=check)
    assert not log.has("at commit")  # git was stopped mid-clone
    assert_nothing_left(dest)
