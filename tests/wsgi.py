"""Call a WSGI app in-process, the way falcon's ``simulate_request`` does."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None, content_type: str | None = "application/json") -> Result:
    """Send one request; ``body`` is JSON-encoded unless ``raw`` bytes are given."""
    status, response_headers, chunks = open_stream(app, method, path, body, headers, raw, content_type)
    try:
        return Result(status, response_headers, b"".join(chunks))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def open_stream(app: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None, content_type: str | None = "application/json") -> tuple[int, dict[str, str], Any]:
    """Send one request and return its status, headers and the body's iterable, unread:
    the test takes each chunk (``next``) as a server would, and closes it as a server
    does when the client has gone."""
    url = urlsplit(path)
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query,
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(data),
        "wsgi.url_scheme": "http",
        "CONTENT_LENGTH": str(len(data)),
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    captured: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"] = int(status.split(" ", 1)[0])
        captured["headers"] = dict(response_headers)

    chunks = app(environ, start_response)
    return captured["status"], captured["headers"], chunks
