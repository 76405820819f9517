"""The fetcher's archive rules (``ops.fetch.archive``), run on archive files made here: nothing lands
outside the app, no devices, limits on entries and bytes. (tests/integration/test_fetch.py fetches
them from a real HTTP server.)"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

from nap_orch.config import Settings
from nap_orch.errors import FetchError
from nap_orch.ops.fetch import archive
from nap_orch.ops.fetch.common import Stopped


def make_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def extract(tmp_path: Path, entries, stop: threading.Event | None = None, **limits) -> tuple[Path, int, int]:
    settings = Settings(home=tmp_path, **limits)
    path = make_tar(tmp_path / "app.tar.gz", entries)
    assert archive.archive_format(path)[0] == "gzip"
    return archive.extract(path, "gzip", tmp_path / "tree", settings, stop or threading.Event(), lambda line: None)


def test_a_single_top_folder_is_flattened(tmp_path):
    app, files, size = extract(tmp_path, [("web/profile", b"command: x\n"), ("web/lib/a.py", b"1")])
    assert app.name == "web" and (app / "profile").read_bytes() == b"command: x\n"
    assert (files, size) == (2, len(b"command: x\n") + 1)


def test_links_inside_are_kept_and_hard_links_become_copies(tmp_path):
    app, _, _ = extract(tmp_path, [("a/data", b"x"), link("a/sym", "data"), link("a/hard", "a/data", tarfile.LNKTYPE)])
    assert (app / "sym").is_symlink() and (app / "sym").read_bytes() == b"x"
    assert not (app / "hard").is_symlink() and (app / "hard").stat().st_ino != (app / "data").stat().st_ino


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../evil", b"x")], "climbs out"),
        ([("/etc/evil", b"x")], "absolute path"),
        ([link("a", "../../etc/passwd")], "points outside"),
        ([link("a", "/etc/passwd")], "absolute path"),
        ([link("l", "sub"), ("l/file", b"x")], "under the symlink"),
        ([link("h", "nowhere", tarfile.LNKTYPE)], "not a file earlier"),
        ([link("dev", "", tarfile.CHRTYPE)], "device or fifo"),
        ([link("fifo", "", tarfile.FIFOTYPE)], "device or fifo"),
    ],
)
def test_entries_that_would_escape_or_are_special_refuse_the_whole_archive(tmp_path, entries, message):
    with pytest.raises(FetchError, match=message):
        extract(tmp_path, [("profile", b"command: x\n"), *entries])


def test_a_link_to_the_flattened_folders_parent_resolves_outside_the_app(tmp_path):
    with pytest.raises(FetchError, match="resolves outside"):
        extract(tmp_path, [("top/profile", b"command: x\n"), link("top/up", "..")])


def test_the_entry_count_is_limited(tmp_path):
    with pytest.raises(FetchError, match="more than 3 files"):
        extract(tmp_path, [(f"f{i}", b"x") for i in range(4)], max_files=3)


def test_the_bytes_written_are_limited(tmp_path):
    with pytest.raises(FetchError, match="expands past the limit of 1000 bytes"):
        extract(tmp_path, [("big", b"x" * 1001)], max_extract=1000)


def test_an_empty_archive_is_refused(tmp_path):
    with pytest.raises(FetchError, match="empty"):
        extract(tmp_path, [])


def test_a_stop_request_stops_the_extraction(tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        extract(tmp_path, [("profile", b"command: x\n")], stop=stop)


@pytest.mark.parametrize(("name", "normal"), [("a/./b//c", "a/b/c"), ("./", ""), ("x", "x")])
def test_names_are_normalized(name, normal):
    assert archive.normalize(name, what="entry") == normal


def test_a_file_that_is_no_archive_is_named_so(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<html>not an archive</html>")
    assert archive.archive_format(path) == (None, b"<html>not an archive</html>")


def test_an_error_quotes_a_bounded_prefix_of_a_name_and_no_staging_path(tmp_path):
    long_name = "../" + "x" * 6000
    with pytest.raises(FetchError) as err:
        extract(tmp_path, [(long_name, b"data"), ("profile", b"command: true\n")])
    message = err.value.message
    assert "climbs out of the app folder" in message
    assert len(message) < 300 and "(6003 characters)" in message
    assert str(tmp_path) not in message
    with pytest.raises(FetchError) as err:
        (tmp_path / "second").mkdir()
        extract(tmp_path / "second", [link("evil", "/" + "y" * 5000), ("profile", b"command: true\n")])
    assert len(err.value.message) < 400 and "(5001 characters)" in err.value.message
