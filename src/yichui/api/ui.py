"""The web dashboard: ``GET /ui`` (its one page) and ``GET /ui/static/{path}`` (its assets).

The assets ship inside the package (``yichui/web/static``) and are read with importlib.resources.
Every response here carries a Content-Security-Policy that allows no inline script, style or
frame, and the page talks to ``/api`` (and ``/v1`` in the playground) only.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from yichui.errors import error_body

router = APIRouter(include_in_schema=False)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
"""On every /ui response, errors included."""

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}
"""What is served, by suffix: any other file is a 404 (no guessing, no sniffing)."""
CACHE = "no-cache"
"""Revalidated on every load (a 304 by ETag): an upgraded package is never served stale."""
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_DEPTH = 2  # static/<file> and static/vendor/<file>


@lru_cache(maxsize=64)
def _asset(path: str) -> tuple[bytes, str, str] | None:
    """The bytes, content type and ETag of ``static/<path>``, or None when it is no asset."""
    parts = path.split("/")
    if len(parts) > _MAX_DEPTH or not all(_SEGMENT.fullmatch(p) for p in parts):
        return None  # "..", "", "\\", "%2e" decoded, a dotfile: none is a name of ours
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    kind = TYPES.get(suffix)
    if kind is None:
        return None
    node = resources.files("yichui.web").joinpath("static", *parts)
    if not node.is_file():
        return None
    data = node.read_bytes()
    return data, kind, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, path: str) -> Response:
    found = _asset(path)
    if found is None:
        body = error_body(404, f"no such dashboard file: {path}", code="not_found")
        return JSONResponse(body, status_code=404, headers=HEADERS)
    data, kind, etag = found
    headers = {**HEADERS, "Cache-Control": CACHE, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=kind, headers=headers)


@router.get("/")
async def root() -> Response:
    """The dashboard is the front page."""
    return RedirectResponse("/ui", status_code=307, headers=HEADERS)


@router.get("/ui")
@router.get("/ui/")
async def index(request: Request) -> Response:
    """The dashboard's one page (its routes are in the URL's fragment: ``/ui#/tasks``)."""
    return _serve(request, "index.html")


@router.get("/ui/static/{path:path}")
async def static(request: Request, path: str) -> Response:
    """A file of ``yichui/web/static``."""
    return _serve(request, path)
