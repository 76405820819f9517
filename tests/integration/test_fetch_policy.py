"""The deploy fetch policy against real servers on loopback: where a fetch may connect (every
redirect and every resolved address checked), what its errors never quote, when a silent server is
given up, and which local sources a deploy may read; at the fetcher and through a whole stack.

The servers listen on 127.0.0.1 and 127.0.0.2 (both loopback on Linux); the fetcher's allow list is
narrowed to 127.0.0.1/32, so that 127.0.0.2 stands for an address the policy refuses.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from nap_orch.cli.client import ApiError
from nap_orch.config import Settings
from nap_orch.errors import BadRequest, FetchError
from nap_orch.ops.fetch import fetch
from nap_orch.ops.fetch.git import pin
from tests.support.apps import tar_gz, web_app
from tests.support.flows import deploy, publish

SECRET_BODY = "TOP-SECRET-BODY-0123456789"
SECRET_REASON = "Secret-Reason-Phrase"


@dataclass
class Server:
    """An aiohttp server on ``host``: ``/files/<name>`` serves files, ``/to?url=U`` redirects to U
    (302), ``/moved/<path>`` to ``moved_to/<path>``, ``/loop`` to itself; ``/fail`` answers 500 with a
    secret reason phrase and body, ``/secret.tgz`` answers 200 with a secret body that is no archive,
    ``/trickle`` sends headers and one byte, then nothing. ``hits`` lists the paths it was asked for."""

    base: str
    root: Path
    hits: list[str] = field(default_factory=list)
    moved_to: str = ""

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.base}/files/{name}"

    def to(self, url: str) -> str:
        return f"{self.base}/to?url={quote(url, safe='')}"


async def start_server(host: str, root: Path) -> tuple[Server, web.AppRunner]:
    root.mkdir(parents=True, exist_ok=True)
    server = Server("", root)

    @web.middleware
    async def record(request: web.Request, handler):
        server.hits.append(request.path)
        return await handler(request)

    async def files(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def to(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["url"])

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(server.moved_to + request.path_qs[len("/moved") :])

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop")

    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, reason=SECRET_REASON, text=SECRET_BODY)

    async def secret(request: web.Request) -> web.StreamResponse:
        return web.Response(text=SECRET_BODY, content_type="text/plain")

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/gzip"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"\x1f")
        await asyncio.sleep(30)  # then nothing: the fetcher gives up long before
        return response

    app = web.Application(middlewares=[record])
    app.router.add_get("/files/{name}", files)
    app.router.add_get("/to", to)
    app.router.add_get("/moved/{tail:.*}", moved)
    app.router.add_get("/loop", loop)
    app.router.add_get("/fail", fail)
    app.router.add_get("/secret.tgz", secret)
    app.router.add_get("/trickle", trickle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    server.base = f"http://{host}:{runner.addresses[0][1]}"
    return server, runner


@pytest.fixture
async def allowed(tmp_path) -> AsyncIterator[Server]:
    """The server the allow list lets through (127.0.0.1)."""
    server, runner = await start_server("127.0.0.1", tmp_path / "www")
    yield server
    await runner.cleanup()


@pytest.fixture
async def refused(tmp_path) -> AsyncIterator[Server]:
    """A server at an address the allow list leaves out (127.0.0.2): it must never be asked anything."""
    server, runner = await start_server("127.0.0.2", tmp_path / "www2")
    yield server
    await runner.cleanup()


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "staging" / "app"


def settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(**{"home": tmp_path / "home", "fetch_allow": "127.0.0.1/32", **overrides})


def app_tgz(tmp_path: Path) -> bytes:
    return tar_gz(web_app(tmp_path / "src"), tmp_path / "app.tgz").read_bytes()


# -- where a fetch may connect ---------------------------------------------------------------------


async def test_a_redirect_within_the_allowed_addresses_is_followed(allowed, dest, tmp_path):
    url = allowed.put("app.tgz", app_tgz(tmp_path))

    summary = await fetch(allowed.to(url), dest, settings=settings(tmp_path))

    assert summary["kind"] == "archive" and (dest / "profile").exists()
    assert allowed.hits == ["/to", "/files/app.tgz"]


async def test_a_redirect_to_a_refused_address_is_not_followed(allowed, refused, dest, tmp_path):
    target = refused.put("app.tgz", app_tgz(tmp_path))

    with pytest.raises(FetchError, match=r"refused: the fetch policy refuses 127\.0\.0\.2: a loopback address"):
        await fetch(allowed.to(target), dest, settings=settings(tmp_path))
    assert refused.hits == []
    assert not dest.exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ("http://0x7f000002:{port}/files/app.tgz", "is an IP address not written as a.b.c.d"),
        ("http://2130706434:{port}/files/app.tgz", "is an IP address not written as a.b.c.d"),
        ("file:///etc/passwd", "only http and https are followed"),
        ("http://u:p@127.0.0.2:{port}/files/app.tgz", "credentials"),
    ],
)
async def test_a_redirect_to_an_odd_url_is_refused(allowed, refused, dest, tmp_path, target, message):
    target = target.format(port=refused.base.rpartition(":")[2])

    with pytest.raises(FetchError, match="redirect to .* refused: .*" + message):
        await fetch(allowed.to(target), dest, settings=settings(tmp_path))
    assert refused.hits == []


async def test_a_redirect_to_the_metadata_service_is_refused_before_connecting(allowed, dest, tmp_path):
    with pytest.raises(FetchError, match=r"the fetch policy refuses 169\.254\.169\.254: a link-local address"):
        await fetch(allowed.to("http://169.254.169.254/latest/meta-data/"), dest, settings=settings(tmp_path))


async def test_endless_redirects_stop(allowed, dest, tmp_path):
    with pytest.raises(FetchError, match=f"more than 10 redirects from {allowed.base}/loop$"):
        await fetch(f"{allowed.base}/loop", dest, settings=settings(tmp_path))
    assert allowed.hits == ["/loop"] * 11


async def test_a_name_that_resolves_only_to_refused_addresses_is_refused(allowed, dest, tmp_path):
    port = allowed.base.rpartition(":")[2]

    with pytest.raises(FetchError, match=r"refused: the fetch policy refuses localhost \((127\.0\.0\.1|::1)\)"):
        await fetch(f"http://localhost:{port}/files/x.tgz", dest, settings=settings(tmp_path, fetch_allow=""))
    assert allowed.hits == []


async def test_a_name_connects_only_to_its_permitted_addresses(allowed, dest, tmp_path):
    # localhost is 127.0.0.1 and ::1 here; only the first is allowed, and it is where the server is.
    url = allowed.put("app.tgz", app_tgz(tmp_path)).replace("127.0.0.1", "localhost")

    await fetch(url, dest, settings=settings(tmp_path))
    assert allowed.hits == ["/files/app.tgz"]


@pytest.mark.parametrize(
    "url",
    ["http://0x7f000001:{port}/files/x", "http://2130706433:{port}/files/x", "http://127.1:{port}/files/x"],
)
async def test_odd_spellings_of_an_address_are_refused_even_when_allowed(allowed, dest, tmp_path, url):
    url = url.format(port=allowed.base.rpartition(":")[2])

    with pytest.raises(BadRequest, match="not written as a.b.c.d"):
        await fetch(url, dest, settings=settings(tmp_path, fetch_allow="127.0.0.0/8"))
    assert allowed.hits == []


# -- what errors say -------------------------------------------------------------------------------


async def test_an_error_names_the_status_and_content_type_but_quotes_nothing_sent(allowed, dest, tmp_path):
    with pytest.raises(FetchError) as caught:
        await fetch(f"{allowed.base}/fail", dest, settings=settings(tmp_path))
    message = caught.value.message
    assert message == f"HTTP 500 Internal Server Error (content type text/plain) from {allowed.base}/fail"
    assert SECRET_BODY[:6] not in message and SECRET_REASON not in message

    with pytest.raises(FetchError, match=r"not an archive or repository \(content type text/plain, 26 bytes\)$"):
        await fetch(f"{allowed.base}/secret.tgz", dest, settings=settings(tmp_path))


async def test_a_server_that_does_not_speak_http_is_not_quoted(dest, tmp_path):
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"-ERR {SECRET_BODY}\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(FetchError) as caught:
            await fetch(f"http://127.0.0.1:{port}/x.tgz", dest, settings=settings(tmp_path))
    finally:
        server.close()
    assert "not valid HTTP" in caught.value.message, caught.value.message
    assert "SECRET" not in caught.value.message and "ERR" not in caught.value.message


# -- a server that goes silent ---------------------------------------------------------------------


async def test_a_download_that_stalls_after_a_byte_fails_at_the_idle_timeout(allowed, dest, tmp_path):
    started = asyncio.get_running_loop().time()

    with pytest.raises(FetchError, match=r"stalled: no byte received for 0\.5 seconds \(after 1 bytes\)"):
        await fetch(f"{allowed.base}/trickle", dest, settings=settings(tmp_path, download_idle_timeout=0.5))
    assert asyncio.get_running_loop().time() - started < 5
    assert not dest.exists()


async def test_a_server_that_never_answers_fails_at_the_idle_timeout(dest, tmp_path):
    with socket.socket() as listener:  # accepts (the kernel's backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(FetchError, match=r"stalled: no byte received for 0\.5 seconds \(after 0 bytes\)"):
            await fetch(f"http://127.0.0.1:{port}/x.tgz", dest, settings=settings(tmp_path, download_idle_timeout=0.5))


# -- git over the network --------------------------------------------------------------------------


async def test_git_is_pinned_to_the_checked_addresses(tmp_path):
    git_settings = settings(tmp_path, download_idle_timeout=7.5)

    url, options = await pin("https://localhost:8443/alice/app.git", git_settings)
    assert url == "https://localhost:8443/alice/app.git"
    assert options == [
        *("-c", "http.followRedirects=false", "-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=8"),
        *("-c", "http.curloptResolve=localhost:8443:127.0.0.1"),
    ]
    # git's own transport resolves names itself: it is given the checked address instead
    assert await pin("git://localhost/alice/app.git", git_settings) == ("git://127.0.0.1:9418/alice/app.git", [])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_git_over_http_follows_no_redirect(allowed, refused, dest, tmp_path, host):
    # git asks for <repo>/info/refs first: the allowed server redirects that to the refused one.
    allowed.moved_to = refused.base

    with pytest.raises(FetchError, match="git clone of .* failed"):
        await fetch(f"{allowed.base}/moved/repo.git".replace("127.0.0.1", host), dest, settings=settings(tmp_path))
    assert allowed.hits and allowed.hits[0] == "/moved/repo.git/info/refs"
    assert refused.hits == []


async def test_git_to_a_name_with_only_refused_addresses_is_refused(allowed, dest, tmp_path):
    port = allowed.base.rpartition(":")[2]

    for url in (f"http://localhost:{port}/repo.git", f"git://localhost:{port}/repo.git"):
        with pytest.raises(FetchError, match=r"git clone of .* refused: the fetch policy refuses localhost"):
            await fetch(url, dest, settings=settings(tmp_path, fetch_allow=""))
    assert allowed.hits == []


async def test_git_that_stalls_fails_at_the_idle_timeout(dest, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for url in (f"http://127.0.0.1:{port}/repo.git", f"git://127.0.0.1:{port}/repo.git"):
            with pytest.raises(FetchError, match="git clone of .* (stalled|too slow)"):
                await fetch(url, dest, settings=settings(tmp_path, download_idle_timeout=1))


# -- local sources ---------------------------------------------------------------------------------


def local(tmp_path: Path) -> Settings:
    """Local sources from ``tmp_path/sources``; NAP_HOME at ``tmp_path/sources/home``, inside it."""
    (tmp_path / "sources" / "home" / "apps" / "bob" / "bob_web_1").mkdir(parents=True)
    (tmp_path / "sources" / "home" / "admin.token").write_text("secret token\n")
    return Settings(
        home=tmp_path / "sources" / "home", allow_local_sources=True, local_sources_dir=str(tmp_path / "sources")
    )


async def test_a_local_source_inside_the_allowed_folder_is_read(dest, tmp_path):
    settings = local(tmp_path)
    web_app(tmp_path / "sources" / "web")

    summary = await fetch(str(tmp_path / "sources" / "web"), dest, settings=settings)
    assert summary["kind"] == "local" and (dest / "profile").exists()


async def test_a_local_source_outside_the_allowed_folder_is_refused(dest, tmp_path):
    settings = local(tmp_path)
    web_app(tmp_path / "elsewhere")
    (tmp_path / "sources" / "sneaky").symlink_to(tmp_path / "elsewhere")

    for path in (tmp_path / "elsewhere", tmp_path / "sources" / "sneaky", Path("/etc")):
        with pytest.raises(BadRequest, match="outside .* where local sources may be"):
            await fetch(str(path), dest, settings=settings)
    assert not dest.exists()


async def test_a_local_source_reaching_nap_home_through_a_symlink_is_refused(dest, tmp_path):
    settings = local(tmp_path)
    (tmp_path / "sources" / "bob").symlink_to(tmp_path / "sources" / "home" / "apps" / "bob")
    (tmp_path / "sources" / "token").symlink_to(tmp_path / "sources" / "home" / "admin.token")
    repo = web_app(tmp_path / "sources" / "repo")
    (repo / ".git").symlink_to(tmp_path / "sources" / "home" / "apps" / "bob" / "bob_web_1")

    for path in ("bob", "token", "repo", "home", "."):
        with pytest.raises(BadRequest, match=r"reaches into the platform's folder \(NAP_HOME\)"):
            await fetch((tmp_path / "sources" / path).as_uri(), dest, settings=settings)
    assert not dest.exists()


# -- through a stack: the API's 400s and the worker's refusals -------------------------------------


def test_the_api_refuses_urls_the_policy_refuses(stack, user, file_server, tmp_path):
    _, client = user
    port = file_server.port
    cases = [
        (f"http://alice:s3cret@127.0.0.1:{port}/app.tgz", "the URL carries credentials"),
        (f"http://0x7f000001:{port}/app.tgz", "not written as a.b.c.d"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("git+https://10.0.0.1/app.git", "a private address"),
        ("/etc", "outside"),
        (str(stack.home / "admin.token"), "NAP_HOME"),
    ]
    (tmp_path / "into-home").symlink_to(stack.home)
    cases.append((f"file://{tmp_path}/into-home/services", "NAP_HOME"))
    for url, message in cases:
        with pytest.raises(ApiError) as caught:
            client.post("/v1/apps", {"app": "x", "url": url})
        assert caught.value.status == 400, (url, caught.value.body)
        assert caught.value.body["error"] == "bad_request" and message in caught.value.body["message"], url
        assert "s3cret" not in caught.value.body["message"]


def test_a_deploy_redirected_to_a_refused_address_fails_without_quoting(stack, user, file_server, tmp_path):
    _, client = user
    url = f"{file_server.url}/redirect?to=" + quote("http://[::1]:9/app.tgz", safe="")
    job = deploy(stack, client, "redir", url)
    assert job["state"] == "failed" and "the fetch policy refuses ::1: a loopback address" in job["error"], job

    url = f"{file_server.url}/fail/503?reason={SECRET_REASON}&body={SECRET_BODY}"
    job = deploy(stack, client, "fail", url)
    assert job["state"] == "failed", job
    assert "HTTP 503 Service Unavailable (content type text/plain)" in job["error"], job
    said = job["error"].replace(url, "<url>")  # the URL carries them, as the server's test hook wants
    assert said.endswith("from <url>") and SECRET_REASON not in said and SECRET_BODY not in said, said


def test_a_deploy_from_an_allowed_server_still_works(stack, user, file_server, tmp_path):
    _, client = user
    url = publish(file_server, web_app(tmp_path / "src"), "tgz")
    job = deploy(stack, client, "ok", f"{file_server.url}/redirect?to=" + quote(url, safe=""))
    assert job["state"] == "succeeded", job
