"""The small amount of HTTP a plain WSGI app needs: a request, a response, a router.

No framework: the app is ``api_shim.app.App``, a WSGI callable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

from poolq.errors import InvalidRequest, PoolqError

JSON = "application/json"
BUSY_READING = "too many request bodies are being received at once; retry"
BODY_SLOT_WAIT_S = 2.0
WEBSOCKET = "poolq.websocket"  # in the environ of a handshake at the server of tails (api_shim/front.py)


class HTTPError(PoolqError):
    """An answer decided at the HTTP edge (bad header, body too large, wrong method)."""

    def __init__(self, status: int, error: str, headers: Iterable[tuple[str, str]] = (), **extra: Any):
        super().__init__(error)
        self.status, self.error, self.headers, self.extra = status, error, list(headers), extra


class Stream:
    """A response body sent as it is made (chunked): the chunks of ``chunks``, then
    ``done()``, called once however the stream ends: at its last chunk, when the client
    has gone (the server closes the stream at its next write), or before it started.

    A stream holds one of the server's threads from its first chunk to its close, so
    every route that answers with one bounds how many it holds (docs/api.md).
    """

    def __init__(self, chunks: Iterator[bytes], done: Callable[[], object]):
        self._chunks, self._done, self._closed = chunks, done, False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._done()


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stream: Stream | None = None  # sent instead of body, as it is made

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate echoed from the request (in a field name)
            body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, body, [("Content-Type", JSON), *headers])


class Request:
    """A thin view of the WSGI environ.

    ``tenant`` is decided once, before the handler runs (``App.handle``): the token's
    tenant, else the one X-Tenant-Id names; None when that header is malformed, which
    ``tenant_or_400`` answers for the routes that need a tenant.
    """

    __slots__ = ("environ", "method", "path", "route", "params", "tenant", "tenant_problem", "_body_readers", "_query")

    def __init__(self, environ: dict[str, Any], body_readers: threading.BoundedSemaphore):
        self.environ = environ
        self.method: str = environ["REQUEST_METHOD"].upper()
        self.path: str = environ.get("PATH_INFO") or "/"
        self.route: str | None = None  # the template of the route that matched its path
        self.params: dict[str, str] = {}
        self.tenant: str | None = None
        self.tenant_problem: list[str] = []  # what is wrong with X-Tenant-Id, when tenant is None
        self._body_readers = body_readers
        self._query: dict[str, list[str]] | None = None

    def tenant_or_400(self) -> str:
        if self.tenant is None:
            raise InvalidRequest({"X-Tenant-Id": self.tenant_problem}, "invalid X-Tenant-Id header")
        return self.tenant

    def tenant_as_given(self) -> str | None:
        """For validating a submission with its other headers: the tenant, or the
        malformed header as it came (so that the 400 names it with the other fields)."""
        return self.tenant if self.tenant is not None else self.header("X-Tenant-Id")

    def header(self, name: str) -> str | None:
        """A request header by its HTTP name (``X-Tenant-Id``)."""
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            return self.environ.get(key)
        return self.environ.get("HTTP_" + key)

    def query(self, name: str) -> str | None:
        if self._query is None:
            self._query = parse_qs(self.environ.get("QUERY_STRING", ""), keep_blank_values=True)
        values = self._query.get(name)
        return values[-1] if values else None

    def read_body(self, limit: int) -> bytes:
        """The body, refusing more than ``limit`` bytes before reading it (413).

        Reading holds a server thread until the client has sent the body, and granian
        has no timeout for that: at most ``body_readers`` requests of a process
        read at once, so that slow or stalled uploads cannot take every thread. A body
        waits up to BODY_SLOT_WAIT_S for its turn, then gets a 503 with Retry-After;
        requests without a body are never held up.
        """
        length_header = self.environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in (self.header("Transfer-Encoding") or "").lower()
        if length_header and not chunked:
            if not is_digits(length_header):
                raise HTTPError(400, "invalid Content-Length header")
            length = int(length_header)
            if length > limit:
                raise HTTPError(413, f"request body is larger than the limit of {limit} bytes")
            if length == 0:
                return b""
            with self._body_slot():
                return _read_exactly(self.environ["wsgi.input"], length)
        if not chunked:
            return b""
        with self._body_slot():
            return self._read_chunked(limit)

    @contextlib.contextmanager
    def _body_slot(self) -> Iterator[None]:
        readers = self._body_readers
        if not readers.acquire(timeout=BODY_SLOT_WAIT_S):
            raise HTTPError(503, BUSY_READING, [("Retry-After", "1")])
        try:
            yield
        finally:
            readers.release()

    def _read_chunked(self, limit: int) -> bytes:
        # A chunked body has no length up front: read until it ends or passes the limit.
        stream = self.environ["wsgi.input"]
        parts: list[bytes] = []
        total = 0
        while True:
            part = stream.read(min(65536, limit + 1 - total))
            if not part:
                return b"".join(parts)
            parts.append(part)
            total += len(part)
            if total > limit:
                raise HTTPError(413, f"request body is larger than the limit of {limit} bytes")


def is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _read_exactly(stream: Any, length: int) -> bytes:
    parts, remaining = [], length
    while remaining > 0:
        part = stream.read(min(remaining, 1 << 20))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


Handler = Callable[[Request], Response]


class Route:
    """A path template such as ``/api/jobs/{submission_id}`` and its handlers by method.

    A trailing slash is accepted on every route (Ray's SDK posts to ``/api/jobs/``).
    A ``{name}`` segment matches one path segment.
    """

    def __init__(self, template: str, handlers: dict[str, Handler]):
        self.template = template
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template.rstrip("/"))
        self.regex = re.compile(f"^{pattern}/?$")
        self.handlers = dict(handlers)
        if "GET" in self.handlers:
            self.handlers.setdefault("HEAD", self.handlers["GET"])
        self.allow = ", ".join(sorted({*self.handlers, "OPTIONS"}))


class Router:
    def __init__(self, routes: Iterable[Route]):
        self.routes = list(routes)

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            found = route.regex.match(path)
            if found:
                return route, found.groupdict()
        return None
