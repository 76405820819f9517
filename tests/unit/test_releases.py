"""Releases on disk (ops.releases) and the rollout's batches, without a server."""

from __future__ import annotations

import os

import pytest

from nap_orch.config import Settings
from nap_orch.errors import BadRequest, NotFound
from nap_orch.ops import apps, releases
from nap_orch.ops.instances.rollout import batch_size


def make(settings: Settings, n: int, text: str = "command: x\n") -> None:
    staged = settings.home / f"staged{n}"
    staged.mkdir(parents=True)
    (staged / "profile").write_text(text)
    releases.publish(settings, "alice", "web", staged, n)


def test_publish_point_and_current(tmp_path):
    settings = Settings(home=tmp_path)
    assert releases.current(settings, "alice", "web") is None
    make(settings, 1)
    make(settings, 2, "command: y\n")
    assert releases.current(settings, "alice", "web") == 2
    assert (apps.app_path(settings, "alice", "web") / "profile").read_text() == "command: y\n"
    releases.point(settings, "alice", "web", 1)
    assert releases.current(settings, "alice", "web") == 1
    assert (apps.app_path(settings, "alice", "web") / "profile").read_text() == "command: x\n"
    with pytest.raises(NotFound):
        releases.point(settings, "alice", "web", 7)
    assert releases.current(settings, "alice", "web") == 1  # a failed point changes nothing


def test_pruning_keeps_the_newest_and_the_current(tmp_path):
    settings = Settings(home=tmp_path)
    for n in range(1, 8):
        make(settings, n)
    releases.point(settings, "alice", "web", 1)  # rolled back to the oldest
    known = {n: {} for n in range(1, 8)}
    assert releases.doomed(settings, "alice", "web", known, keep=3) == [2, 3, 4]
    assert releases.doomed(settings, "alice", "web", known, keep=0) == [2, 3, 4, 5, 6]  # at least 1 kept


def test_a_name_that_starts_like_another_keeps_its_releases(tmp_path):
    settings = Settings(home=tmp_path)
    make(settings, 1)
    other = settings.home / "staged-x"
    other.mkdir()
    (other / "profile").write_text("command: z\n")
    releases.publish(settings, "alice", "web-x", other, 1)
    releases.remove_all(settings, "alice", "web")
    assert (apps.app_path(settings, "alice", "web-x") / "profile").is_file()


def test_the_digest_sees_contents_names_and_links(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_text("1")
    first = releases.digest(a)
    (a / "f").write_text("2")
    second = releases.digest(a)
    os.symlink("f", a / "l")
    third = releases.digest(a)
    assert len({first, second, third}) == 3 and first.startswith("sha256:")


@pytest.mark.parametrize("text, n", [("v3", 3), ("3", 3), ("v12", 12)])
def test_release_names(text, n):
    assert releases.parse_release(text) == n


@pytest.mark.parametrize("text", ["v0", "x", "v-1", "v1.5", "", "v" + "9" * 12, "../v1"])
def test_bad_release_names(text):
    with pytest.raises(BadRequest):
        releases.parse_release(text)


def test_batches_are_a_quarter_or_what_is_asked():
    assert batch_size(100, None) == 25
    assert batch_size(3, None) == 1
    assert batch_size(100, 10) == 10
    assert batch_size(100, 0) == 1
