"""The dashboard's routes: the page and its two files, public, with a strict
Content-Security-Policy, and nothing else from the package."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib import resources

import httpx
import pytest
from starlette.applications import Starlette

from accord.server.dashboard import dashboard_routes


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=dashboard_routes())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://accord") as c:
        yield c


@pytest.mark.parametrize(
    ("path", "media_type", "marker"),
    [
        ("/", "text/html", b'<script src="static/app.js" defer></script>'),
        ("/static/app.js", "text/javascript", b'"use strict";'),
        ("/static/style.css", "text/css", b".timeline-svg"),
    ],
)
async def test_serves_the_page_and_its_files(
    client: httpx.AsyncClient, path: str, media_type: str, marker: bytes
) -> None:
    """Each file with its media type, the security headers and an ETag."""
    resp = await client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert marker in resp.content
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{32}"', resp.headers["etag"])


async def test_an_unchanged_file_is_not_sent_again(client: httpx.AsyncClient) -> None:
    """If-None-Match with the current ETag answers 304 without a body."""
    etag = (await client.get("/static/app.js")).headers["etag"]
    again = await client.get("/static/app.js", headers={"If-None-Match": etag})
    assert (again.status_code, again.content) == (304, b"")
    stale = await client.get("/static/app.js", headers={"If-None-Match": '"0"'})
    assert stale.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/__init__.py",
        "/static/index.html",
        "/static/..%2F__init__.py",
        "/static/../__init__.py",
        "/static/",
        "/static/app.js.map",
    ],
)
async def test_nothing_else_is_served(client: httpx.AsyncClient, path: str) -> None:
    """Only the three named files: not the package's Python, not a traversal."""
    resp = await client.get(path)
    assert resp.status_code == 404
    assert b"import" not in resp.content


def test_the_script_never_parses_data_as_html() -> None:
    """app.js builds every node with createElement/textContent: no innerHTML,
    outerHTML, insertAdjacentHTML, document.write or eval anywhere."""
    script = resources.files("accord.server.dashboard").joinpath("app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    page = resources.files("accord.server.dashboard").joinpath("index.html").read_text()
    assert "<script>" not in page  # no inline script (the CSP would block it anyway)
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)  # no inline handlers
