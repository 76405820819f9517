"""deploy_app and the app half of the interface, through the real API, worker and etcd."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import threading
import uuid
from pathlib import Path

import pytest

from nap_orch.cli.client import ApiError
from nap_orch.store.redis import RedisStore
from tests.support.apps import WEB_PROFILE, git_repo, tar_with_member, web_app, write_app
from tests.support.flows import deploy, etcd_get, publish


@pytest.mark.parametrize("fmt", ["tar.gz", "tgz", "tar", "zip"])
def test_deploy_archive_publishes_app_and_url(stack, user, file_server, tmp_path, fmt):
    name, client = user
    url = publish(file_server, web_app(tmp_path / "src"), fmt)
    job = deploy(stack, client, "web", url)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    assert job["result"]["parameters"] == ["name", "greeting"]
    folder = stack.home / "services" / name / f"{name}_web"
    assert (folder / "profile").read_text() == WEB_PROFILE
    assert (folder / "server.py").exists()
    assert etcd_get(stack, f"/services/url/{name}/web") == url
    assert client.get("/v1/apps")["apps"] == [f"{name}_web"]
    assert client.get(f"/v1/apps/{name}_web/url")["url"] == url
    params = client.get("/v1/apps/web/parameters")
    assert params == {"app": "web", "parameters": ["name", "greeting"], "para_str": "name,greeting"}
    assert client.get("/v1/apps/web/profile")["text"] == WEB_PROFILE


def test_deploy_git_repository_is_a_shallow_clone(stack, user, tmp_path):
    name, client = user
    repo = git_repo(web_app(tmp_path / "repo"))
    job = deploy(stack, client, "gitapp", f"file://{repo}")
    assert job["state"] == "succeeded", job
    folder = stack.home / "services" / name / f"{name}_gitapp"
    assert (folder / "profile").exists() and not (folder / ".git").exists()


def test_deploy_local_folder_when_allowed(stack, user, tmp_path):
    name, client = user
    src = web_app(tmp_path / "local")
    job = deploy(stack, client, "loc", str(src))
    assert job["state"] == "succeeded", job
    assert (stack.home / "services" / name / f"{name}_loc" / "server.py").exists()


def test_local_sources_refused_by_default(redis_stack, tmp_path):
    _, client = redis_stack.add_user()
    for url in (str(tmp_path), f"file://{tmp_path}"):
        with pytest.raises(ApiError) as e:
            client.post("/v1/apps", {"app": "x", "url": url})
        assert e.value.status == 400 and "local sources" in e.value.body["message"]


def test_redis_store_keeps_the_same_keys(redis_stack, file_server, tmp_path):
    name, client = redis_stack.add_user()
    url = publish(file_server, web_app(tmp_path / "src"), "tgz")
    job = deploy(redis_stack, client, "web", url)
    assert job["state"] == "succeeded", job

    async def go():
        async with RedisStore(redis_stack.env["NAP_REDIS_URL"], namespace=redis_stack.namespace) as s:
            return await s.get(f"/services/url/{name}/web")

    assert asyncio.run(go()) == url
    assert client.get("/v1/apps/web/url")["url"] == url


def test_redeploy_replaces_app_atomically(stack, user, file_server, tmp_path):
    name, client = user
    v1 = write_app(tmp_path / "v1", {"profile": "command: /bin/sleep 100\n", "data.txt": "one" * 1000})
    v2 = write_app(tmp_path / "v2", {"profile": "command: /bin/sleep 200\n", "data.txt": "two" * 1000})
    assert deploy(stack, client, "flip", publish(file_server, v1, "tgz"))["state"] == "succeeded"
    folder = stack.home / "services" / name / f"{name}_flip"
    # A reader that loops during redeploys must always see one whole version, never a partial folder.
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                version = Path(os.path.realpath(folder))  # one version, as a reader that opens the link sees it
                prof = (version / "profile").read_text()
                data = (version / "data.txt").read_text()
            except FileNotFoundError:
                continue  # a retired version being removed as a whole after the swap
            try:
                assert (prof, data) in {
                    ("command: /bin/sleep 100\n", "one" * 1000),
                    ("command: /bin/sleep 200\n", "two" * 1000),
                }
                seen.add(data[:3])
            except AssertionError as e:
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for src in (v2, v1, v2):
            assert deploy(stack, client, "flip", publish(file_server, src, "tgz"))["state"] == "succeeded"
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert (folder / "profile").read_text() == "command: /bin/sleep 200\n"
    versions = [p.name for p in (stack.home / "services" / name / ".versions" / "flip").iterdir()]
    assert sorted(versions) == ["v1", "v2", "v3", "v4"], versions  # every release kept (NAP_KEEP_RELEASES: 5)
    assert not list((stack.home / "services" / name / ".staging").iterdir())


def test_app_without_profile_fails_and_writes_nothing(stack, user, file_server, tmp_path):
    name, client = user
    url = publish(file_server, write_app(tmp_path / "bare", {"README": "no profile here"}), "tgz")
    job = deploy(stack, client, "bare", url)
    assert job["state"] == "failed"
    assert "neither a profile nor an mpi.xml" in job["error"]
    assert not (stack.home / "services" / name / f"{name}_bare").exists()
    assert etcd_get(stack, f"/services/url/{name}/bare") is None


def test_profile_without_command_fails(stack, user, file_server, tmp_path):
    _, client = user
    url = publish(file_server, write_app(tmp_path / "nocmd", {"profile": "memory: 1g\n"}), "tgz")
    job = deploy(stack, client, "nocmd", url)
    assert job["state"] == "failed" and "command" in job["error"]


@pytest.mark.parametrize("bad", ["../x", "Alice", "", "a" * 40, "x/y", "1abc", None, 7])
def test_bad_app_names_are_refused(stack, user, file_server, bad):
    _, client = user
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", {"app": bad, "url": f"{file_server.url}/x.tgz"})
    assert 400 <= e.value.status < 500 and e.value.body["message"]


def test_username_in_service_must_be_the_callers(stack, user, file_server):
    _, client = user
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", {"app": "someoneelse_web", "url": f"{file_server.url}/x.tgz"})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", {"app": "a_b_c", "url": f"{file_server.url}/x.tgz"})
    assert e.value.status == 400


@pytest.mark.parametrize(
    "url", ["ftp://example.invalid/a.tgz", "ssh://host/repo", "javascript:alert(1)", "relative/path", "", "data:,x"]
)
def test_bad_url_schemes_are_refused(redis_stack, url):
    _, client = redis_stack.add_user()
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", {"app": "web", "url": url})
    assert e.value.status == 400 and e.value.body["error"] == "bad_request"


@pytest.mark.parametrize(
    "path, cause",
    [
        ("CLOSED", "cannot reach"),
        ("missing.tgz", "404"),
        ("page.html", "not an archive"),
    ],
)
def test_download_failures_name_the_cause(stack, user, file_server, path, cause):
    name, client = user
    (file_server.root / "page.html").write_text("<html><body>hello</body></html>")
    if path == "CLOSED":
        from tests.support.services import free_port

        url = f"http://127.0.0.1:{free_port()}/app.tgz"
    else:
        url = f"{file_server.url}/{path}"
    job = deploy(stack, client, "broken", url)
    assert job["state"] == "failed"
    assert cause in job["error"], job["error"]
    assert not (stack.home / "services" / name / f"{name}_broken").exists()


@pytest.mark.parametrize(
    "member, kind, linkname",
    [
        ("../evil.txt", tarfile.REGTYPE, ""),
        ("/tmp/nap-evil-abs.txt", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("link", tarfile.SYMTYPE, "../../outside"),
        ("hard", tarfile.LNKTYPE, "../outside"),
    ],
)
def test_archive_members_outside_the_target_are_refused(stack, user, file_server, member, kind, linkname):
    name, client = user
    archive = tar_with_member(
        file_server.root / f"evil-{uuid.uuid4().hex[:6]}.tgz", member, kind=kind, linkname=linkname
    )
    job = deploy(stack, client, "evil", f"{file_server.url}/{archive.name}")
    assert job["state"] == "failed", job
    assert not (stack.home / "services" / name / f"{name}_evil").exists()
    assert not Path("/tmp/nap-evil-abs.txt").exists()
    assert not list((stack.home / "services" / name).rglob("evil.txt"))


def test_download_over_the_limit_fails_while_streaming(stack, user, file_server):
    _, client = user
    big = file_server.root / "big.tgz"
    big.write_bytes(b"\x1f\x8b" + os.urandom(2 * 1024 * 1024))  # 2 MiB > the 1 MiB limit of the test stack
    job = deploy(stack, client, "big", f"{file_server.url}/big.tgz")
    assert job["state"] == "failed" and "limit" in job["error"], job


def test_archive_expanding_past_the_limits_fails(stack, user, file_server, tmp_path):
    name, client = user
    bomb = write_app(tmp_path / "bomb", {"profile": "command: /bin/true\n", "zeros": "0" * (6 * 1024 * 1024)})
    job = deploy(stack, client, "bomb", publish(file_server, bomb, "tgz"))
    assert job["state"] == "failed" and "limit" in job["error"], job
    many = write_app(tmp_path / "many", {"profile": "command: /bin/true\n", **{f"f{i}": "x" for i in range(150)}})
    job = deploy(stack, client, "many", publish(file_server, many, "zip"))
    assert job["state"] == "failed" and ("files" in job["error"] or "limit" in job["error"]), job
    assert not (stack.home / "services" / name / f"{name}_bomb").exists()
    assert not (stack.home / "services" / name / f"{name}_many").exists()


def test_unknown_app_answers_404(stack, user):
    _, client = user
    for path in ("/v1/apps/nosuch/url", "/v1/apps/nosuch/parameters", "/v1/apps/nosuch/profile"):
        with pytest.raises(ApiError) as e:
            client.get(path)
        assert e.value.status == 404


def test_other_users_apps_and_jobs_answer_404(stack, file_server, tmp_path):
    alice, a = stack.add_user()
    bob, b = stack.add_user()
    url = publish(file_server, web_app(tmp_path / "src"), "tgz")
    job = deploy(stack, a, "web", url)
    assert job["state"] == "succeeded"
    for path in (f"/v1/jobs/{job['id']}", "/v1/apps/web/url", "/v1/apps/web/profile"):
        with pytest.raises(ApiError) as e:
            b.get(path)
        assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        b.get(f"/v1/apps/{alice}_web/url")
    assert e.value.status == 403
    assert b.get("/v1/jobs")["jobs"] == []
    assert b.get("/v1/apps")["apps"] == []
    assert list(b.events("/v1/events?follow=0")) == []


def test_requests_need_a_valid_token(stack):
    for token in ("", "wrong"):
        with pytest.raises(ApiError) as e:
            stack.client(token).get("/v1/apps")
        assert e.value.status == 401 and e.value.body["error"] == "unauthorized"


def test_only_admin_adds_users(stack, user):
    _, client = user
    with pytest.raises(ApiError) as e:
        client.post("/v1/users", {"name": "mallory"})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        stack.client().post("/v1/users", {"name": "Bad_Name"})
    assert e.value.status == 400


def test_bad_bodies_are_refused(stack, user):
    _, client = user
    import urllib.request

    req = urllib.request.Request(
        stack.url + "/v1/apps", data=b"{not json", method="POST", headers={"Authorization": f"Bearer {client.token}"}
    )
    with pytest.raises(Exception) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["message"] == "the request body is not valid JSON"
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", {"app": "web"})
    assert e.value.status == 400 and "url" in e.value.body["message"]
    with pytest.raises(ApiError) as e:
        client.post("/v1/apps", ["web"])
    assert e.value.status == 400
