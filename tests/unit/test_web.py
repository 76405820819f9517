"""The web manager's files (``nap_orch.web``): served from the package with their types and a
Content-Security-Policy, and nothing else reachable through them. The page itself is tested in a
browser by tests/integration/test_web.py."""

from __future__ import annotations

import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nap_orch import web as manager
from nap_orch.http import error_middleware


@pytest.fixture
async def client():
    app = web.Application(middlewares=[error_middleware()])
    app.add_routes(manager.routes())
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "ctype"), [("/", "text/html"), ("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")]
)
async def test_each_file_is_served_with_its_type_a_csp_and_nosniff(client, path, ctype):
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == ctype
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/web/../../pyproject.toml",
        "/web/%2e%2e/%2e%2e/pyproject.toml",
        "/web/..%2f..%2fpyproject.toml",
        "/web/static/app.js",
        "/web/index.html",
        "/web/nope.js",
        "/etc/passwd",
        "/web//etc/passwd",
    ],
)
async def test_no_other_path_reads_a_file(client, path):
    resp = await client.get(path)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


async def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere(client):
    html = await (await client.get("/")).text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
    assert "<style" not in html and "style=" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    js = await (await client.get("/web/app.js")).text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
