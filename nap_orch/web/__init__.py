"""The web manager: a single page (``static/index.html``) with its script and style sheet, served by the
API itself at ``/`` and ``/web/...``.

The page signs in with a token it keeps in ``sessionStorage`` and calls the API with
``Authorization: Bearer`` (event streams and journals through ``fetch``, whose body it reads as it
comes: an ``EventSource`` cannot send the header). The files are fixed routes, never a path taken from
the request, so nothing outside ``static/`` can be asked for. Every answer carries a
Content-Security-Policy without inline scripts or styles.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# path -> (file in static/, content type)
FILES = {
    "/": ("index.html", "text/html"),
    "/web/app.js": ("app.js", "text/javascript"),
    "/web/style.css": ("style.css", "text/css"),
}


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath("static", name).read_bytes()


def _handler(name: str, content_type: str):
    body = _read(name)  # read once, at start: a missing file stops the API, not a page later

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)

    return serve


def routes() -> list[web.RouteDef]:
    return [web.get(path, _handler(name, ctype)) for path, (name, ctype) in FILES.items()]
