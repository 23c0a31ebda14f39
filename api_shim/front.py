"""The ASGI application granian serves when WebSockets are on: the log tail natively,
every other request handed to the WSGI app unchanged.

Ray's CLI and SDK follow a job's logs over a WebSocket (``/api/jobs/{id}/logs/tail``),
which a WSGI application cannot serve. granian's ASGI interface can, so ``Front`` takes
every connection: a WebSocket goes to ``LogTails`` (api_shim/tail.py); any other request
becomes the WSGI environ granian's own WSGI interface would build, and runs the same
``App`` on one of ``POOLQ_API_THREADS`` threads. The app stays a plain WSGI callable.

ASGI rather than granian's faster RSGI: RSGI cannot give a WebSocket's closing frame a
code, and Ray's client reads a close without one as an abnormal end (1006) and fails.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from api_shim.app import App
from api_shim.http import HTTPError
from api_shim.tail import LogTails
from api_shim.threads import AppThreads

# A body up to this size, announced by Content-Length, is read before the app runs,
# without holding a thread; a larger or chunked one is streamed to the app as it reads
# (so that its size limits refuse it before it is all received).
EAGER_BODY = 64 * 1024
BODY_WAIT_S = (
    30.0  # a body that stops arriving this long (the whole small one, or a streamed one's next chunk) is a 408
)
BODYLESS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE"))
BODY_STALLED = "the request body stopped arriving before its end"
STALLED_BODY = json.dumps({"error": BODY_STALLED}).encode()
STALLED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(STALLED_BODY)).encode()),
    (b"connection", b"close"),
]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Front:
    """The ASGI application granian serves: log tails here, HTTP to the WSGI ``app``."""

    def __init__(self, app: App):
        self.app = app
        self.threads = AppThreads(app.settings.api_threads)
        self.tails = LogTails(app, self.threads)
        self.body_wait_s = BODY_WAIT_S
        self.eager_body = min(EAGER_BODY, app.settings.max_body)  # a larger body is refused before it is read
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
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            await self.tails.serve(self.environ(scope), receive, send)

    async def http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        environ = self.environ(scope)
        if scope["method"] in BODYLESS:
            environ["wsgi.input"] = io.BytesIO(b"")
        else:
            length = environ.get("CONTENT_LENGTH", "")
            if length.isdigit() and int(length) <= self.eager_body and "HTTP_TRANSFER_ENCODING" not in environ:
                body = await _read_body(receive, int(length), self.body_wait_s)
                if body is None:  # the client stalled or left mid-body
                    await send({"type": "http.response.start", "status": 408, "headers": STALLED_HEADERS})
                    await send({"type": "http.response.body", "body": STALLED_BODY})
                    return
                environ["wsgi.input"] = io.BytesIO(body)
            else:
                environ["wsgi.input"] = StreamedBody(receive, asyncio.get_running_loop(), self.body_wait_s)
        status, headers, body = await self.threads.call(self.call_app, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def call_app(self, environ: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run the WSGI app (on an app thread): status, headers as ASGI wants them, body."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started[:] = [status, headers]

        body = b"".join(self.app(environ, start_response))
        status, headers = started
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        return int(status[:3]), encoded, body

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


async def _read_body(receive: Receive, length: int, wait_s: float) -> bytes | None:
    """A small body announced by Content-Length, whole; None if the client stalls or leaves."""
    parts: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(wait_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                part = message.get("body", b"")
                parts.append(part)
                received += len(part)
                # Stop at the announced length: waiting for the empty last message costs a wake-up.
                if received >= length or not message.get("more_body", False):
                    return b"".join(parts)
    except TimeoutError:
        return None


class StreamedBody(io.RawIOBase):
    """``wsgi.input`` for a body that is still arriving: each read, on an app thread,
    waits on the event loop for the next chunk (at most BODY_WAIT_S). A client
    that stalls or leaves mid-body gets a 408, the answer the app makes of the HTTPError
    a read raises then."""

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop, wait_s: float):
        self._receive = receive
        self._loop = loop
        self._wait_s = wait_s
        self._pending = b""
        self._done = False
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            if size is None or size < 0:
                parts = [self._pending]
                self._pending = b""
                while (chunk := self._next()) is not None:
                    parts.append(chunk)
                return b"".join(parts)
            while not self._pending and not self._done:
                self._pending = self._next() or b""
            data, self._pending = self._pending[:size], self._pending[size:]
            return data

    def _next(self) -> bytes | None:
        if self._done:
            return None
        future = asyncio.run_coroutine_threadsafe(self._chunk(), self._loop)
        try:
            chunk = future.result(self._wait_s)
        except Exception as exc:  # timed out (the client stalled), or the loop is gone
            future.cancel()
            self._done = True
            raise HTTPError(408, BODY_STALLED, [("Connection", "close")]) from exc
        if chunk is None:
            self._done = True
        return chunk

    async def _chunk(self) -> bytes | None:
        message = await self._receive()
        if message["type"] != "http.request":  # the client left
            raise ConnectionError("the client left")
        if not message.get("more_body", False):
            self._done = True
        return bytes(message.get("body", b"")) or (None if self._done else b"")
