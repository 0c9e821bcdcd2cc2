"""The web dashboard at ``/ui``: a static page and its assets, shipped in the package (``api/ui``).

Contract: ``GET /ui`` serves the page, ``GET /ui/assets/<name>`` the files beside it (uPlot, the app's script
and styles), gzipped when the client accepts it. Nothing here needs a token: the page holds no data, and
reads everything from the API with the token the user gives it. A Content-Security-Policy keeps the page to
this server's own scripts, styles and API (no CDN, no third-party request), so it works offline.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

router = APIRouter(include_in_schema=False)

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Asset:
    def __init__(self, name: str, data: bytes):
        self.type = TYPES[name[name.rindex(".") :]]
        self.data, self.gzipped = data, gzip.compress(data, 9, mtime=0)
        self.etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'

    def response(self, request: Request) -> Response:
        headers = {**HEADERS, "ETag": self.etag, "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(self.gzipped, media_type=self.type, headers={**headers, "Content-Encoding": "gzip"})
        return Response(self.data, media_type=self.type, headers=headers)


def load_assets() -> dict[str, Asset]:
    """Every file of the dashboard, by name (``index.html`` and ``assets/...``), read once at start-up."""
    root = resources.files("api") / "ui"
    found = {"index.html": Asset("index.html", (root / "index.html").read_bytes())}
    for folder in (root, root / "vendor"):
        for item in folder.iterdir():
            suffix = item.name[item.name.rfind(".") :]
            if item.is_file() and suffix in (".js", ".css"):
                found[f"assets/{item.name}"] = Asset(item.name, item.read_bytes())
    return found


ASSETS = load_assets()


@router.get("/ui")
def index(request: Request) -> Response:
    return ASSETS["index.html"].response(request)


@router.get("/ui/")
def index_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/assets/{name}")
def asset(name: str, request: Request) -> Response:
    found = ASSETS.get(f"assets/{name}")
    if found is None:
        return Response("no such asset", status_code=404, media_type="text/plain")
    return found.response(request)
