"""The server of log tails: the ASGI application that ``poolq api`` runs beside the WSGI app,
on its own port, for Ray's log-tail WebSocket (``/api/jobs/{id}/logs/tail``).

A WSGI application cannot speak WebSocket, and putting an ASGI front before all of the API
cost about a quarter of its requests a second at saturation. So the WSGI app judges a
tail's handshake like any request (token, tenant, rate limit, a job the tenant can see)
and answers it with a 307 to this server, with a ticket in the query (poolq/tokens.py);
Ray's client (aiohttp) follows it. Here the ticket makes the tenant, and ``LogTails``
(api_shim/tail.py) follows the job's output. Plain HTTP here is a 404.

ASGI rather than granian's faster RSGI: RSGI cannot give a WebSocket's closing frame a
code, and Ray's client reads a close without one as an abnormal end (1006) and fails.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from api_shim.app import App
from api_shim.tail import LogTails
from api_shim.threads import AppThreads

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ONLY_TAILS = json.dumps({"error": "this port serves only log tails (WebSocket); the API is on its own port"}).encode()


class Front:
    """The ASGI application of the server of tails."""

    def __init__(self, app: App):
        self.app = app
        self.threads = AppThreads(app.settings.api_threads)
        self.tails = LogTails(app, self.threads)
        self.base_environ: dict[str, Any] = {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SCRIPT_NAME": "",
            "SERVER_SOFTWARE": "Granian",
            "wsgi.errors": sys.stderr,
            "wsgi.input_terminated": True,
            "wsgi.multiprocess": False,
            "wsgi.multithread": True,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
        }

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.tails.serve(self.environ(scope), receive, send)
        elif kind == "http":
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ONLY_TAILS)).encode())]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": ONLY_TAILS})

    def environ(self, scope: dict[str, Any]) -> dict[str, Any]:
        """The WSGI environ granian's WSGI interface builds for the same request."""
        raw_path: bytes = scope["raw_path"]
        # PEP 3333: the percent-decoded path's bytes, as latin-1.
        path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode("latin-1")
        server, server_port = scope["server"]
        environ = self.base_environ | {
            "SERVER_PROTOCOL": "HTTP/" + scope["http_version"],
            "SERVER_NAME": server,
            "SERVER_PORT": server_port,
            "REMOTE_ADDR": scope["client"][0],
            "REQUEST_METHOD": scope.get("method", "GET"),
            "PATH_INFO": path,
            "QUERY_STRING": scope["query_string"].decode("latin-1"),
            "wsgi.url_scheme": "https" if scope["scheme"] in ("https", "wss") else "http",
        }
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1")
            value = _header_text(raw_value)
            if name == "content-type":
                environ["CONTENT_TYPE"] = value
            elif name == "content-length":
                environ["CONTENT_LENGTH"] = value
            else:
                key = "HTTP_" + name.upper().replace("-", "_")
                if key in environ:  # a repeated header: its values joined, as granian does
                    value = environ[key] + (";" if key == "HTTP_COOKIE" else ",") + value
                environ[key] = value
        return environ


def _header_text(value: bytes) -> str:
    """A header value as granian's WSGI interface hands it over: visible ASCII as is,
    anything else an empty string (docs/api.md, "Header values are ASCII")."""
    text = value.decode("latin-1")
    if text.isascii() and text.isprintable():
        return text
    return text if all(" " <= char <= "~" or char == "\t" for char in text) else ""
