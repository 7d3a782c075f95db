"""The operator's dashboard: static files served by the coordinator itself.

No build step and no third-party code: ``index.html``, ``app.js`` (vanilla
JavaScript) and ``style.css`` in this package. The page is public; it calls
the API with the bearer token the operator types in (kept in the tab's
``sessionStorage``). Served with a Content-Security-Policy that allows only
this origin's script, style and API, as a second line of defence: the script
itself never parses API data as HTML.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

# The only files served: name -> media type. Nothing else in the package is.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (cheap: ETag), so an upgrade is picked up at once.
    "Cache-Control": "no-cache",
}


class _File:
    __slots__ = ("body", "etag", "media_type")

    def __init__(self, body: bytes, media_type: str) -> None:
        self.body = body
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        headers = dict(SECURITY_HEADERS, ETag=self.etag)
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def _load() -> dict[str, _File]:
    package = resources.files(__name__)
    return {name: _File(package.joinpath(name).read_bytes(), kind) for name, kind in FILES.items()}


def dashboard_routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``GET /static/{name}`` (its script and style).

    Both are public: they hold no data. The files are read once, here."""
    files = _load()
    index = files["index.html"]

    async def page(request: Request) -> Response:
        return index.response(request)

    async def static(request: Request) -> Response:
        found = files.get(request.path_params["name"])
        if found is None or found is index:
            return Response(
                b'{"error": "no such file"}', status_code=404, media_type="application/json"
            )
        return found.response(request)

    return [
        Route("/", page, methods=["GET"], name="dashboard"),
        Route("/static/{name}", static, methods=["GET"], name="dashboard_static"),
    ]
