"""/ui/: the dashboard's static files (docs/operations.md, "The dashboard").

They ship inside the package and are read once, when the app is built: no build step and
nothing fetched from elsewhere. They hold no data, so they are served without a token;
the page asks for one and sends it with each API request. The Content-Security-Policy
lets the page load only these files and talk only to this API: no inline script or
style, no frames, no other origin.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from api_shim.http import HTTPError, Request, Response

FILES = {"index.html": "text/html; charset=utf-8", "ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css"}
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = [
    ("Content-Security-Policy", POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),  # kept, but checked (ETag) so that an upgrade shows at once
]


class Ui:
    def __init__(self) -> None:
        folder = resources.files("api_shim") / "ui"
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for name, content_type in FILES.items():
            data = (folder / name).read_bytes()
            etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
            self.files[name] = (data, content_type, etag)

    def index(self, request: Request) -> Response:
        if not request.path.endswith("/"):  # the page's links are relative to /ui/
            return Response(308, headers=[("Location", "/ui/")])
        return self._serve(request, "index.html")

    def file(self, request: Request) -> Response:
        return self._serve(request, request.params["file"])

    def _serve(self, request: Request, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            raise HTTPError(404, f"the dashboard has no file {name}")
        data, content_type, etag = found
        if request.header("If-None-Match") == etag:
            return Response(304, headers=[("ETag", etag), *HEADERS])
        return Response(200, data, [("Content-Type", content_type), ("ETag", etag), *HEADERS])
