"""The WSGI callable: the routing table, and the one place errors become responses."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterable

from marshmallow import ValidationError

from api_shim.http import WEBSOCKET, HTTPError, Request, Response, Route, Router
from api_shim.request_metrics import UNMATCHED, RequestMetrics
from api_shim.routes.jobs import Jobs
from api_shim.routes.meta import Meta
from api_shim.routes.metrics import Metrics
from api_shim.routes.nodes import Nodes
from api_shim.routes.overview import Overview
from api_shim.routes.packages import Packages
from api_shim.routes.ui import Ui
from poolq import tokens
from poolq.errors import Conflict, InvalidRequest, NotFound, PoolqError, StorageFull, TooMany, Unavailable
from poolq.messaging import Waker, celery_waker
from poolq.quotas import RateLimiter
from poolq.redis_io import connect
from poolq.schemas import parse_tenant
from poolq.settings import Settings
from poolq.store import JobStore

log = logging.getLogger("poolq.api")

OPEN_ROUTES = {
    "/healthz",
    "/livez",
    "/ui",
    "/ui/{file}",
}  # answered without a token (the dashboard's files hold no data)
TENANT_ROUTES = ("/api/jobs", "/api/packages", "/api/overview")  # scoped to the caller's tenant, and rate-limited
TAIL_ROUTE = "/api/jobs/{submission_id}/logs/tail"  # a WebSocket (api_shim/tail.py)
BAD_TICKET = (
    "this log tail's ticket is missing, altered or expired: open the tail at the API, "
    "GET /api/jobs/{id}/logs/tail, which redirects here with a new one"
)
UNAUTHENTICATED = "authentication required: send Authorization: Bearer <token>"

REASONS = {
    200: "OK",
    204: "No Content",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    426: "Upgrade Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class App:
    """The WSGI application serving poolq's HTTP API (docs/api.md), built with the store it
    uses: ``App(settings)`` connects to Redis itself, tests may hand it a ``store``."""

    def __init__(self, settings: Settings, *, store: JobStore | None = None, waker: Waker | None = None):
        self.settings = settings
        # Connections are made on first use, so each server process dials Redis itself.
        self.store = store or JobStore(connect(settings), settings, waker or celery_waker(settings))
        # Its own client, quick to give up: the check lets requests through when Redis
        # does not answer, and must not spend the request's 2 s finding that out. The
        # request counts share it: a lost flush is dropped, not sent twice.
        quick = connect(settings, timeout_s=0.25, retries=0)
        self.limiter = RateLimiter(quick, self.store.scripts)
        self.request_metrics = RequestMetrics(quick)
        # Requests reading their body at once, per process: the rest of the server's
        # threads stay free for everything else (see Request.read_body).
        self.body_readers = threading.BoundedSemaphore(max(1, settings.api_threads - settings.max_waiters - 2))
        jobs = Jobs(self.store, settings)
        packages = Packages(self.store, settings)
        nodes = Nodes(self.store.redis)
        meta = Meta(self.store, settings)
        ui = Ui()
        self.router = Router(
            [
                Route("/api/jobs", {"POST": jobs.submit, "GET": jobs.list_jobs}),
                Route("/api/jobs/batch", {"POST": jobs.submit_batch}),
                Route("/api/jobs/changes", {"GET": jobs.changes}),
                Route("/api/jobs/{submission_id}", {"GET": jobs.get, "DELETE": jobs.delete}),
                Route("/api/jobs/{submission_id}/stop", {"POST": jobs.stop}),
                Route("/api/jobs/{submission_id}/logs", {"GET": jobs.logs}),
                Route(TAIL_ROUTE, {"GET": jobs.tail}),
                Route("/api/packages/{protocol}/{name}", {"GET": packages.head, "PUT": packages.put}),
                Route("/api/nodes", {"GET": nodes.list_nodes}),
                Route("/api/pools", {"GET": nodes.list_pools}),
                Route("/api/overview", {"GET": Overview(self.store).overview}),
                Route("/api/version", {"GET": meta.version}),
                Route("/api/openapi.json", {"GET": meta.openapi}),
                Route("/healthz", {"GET": meta.healthz}),
                Route("/livez", {"GET": meta.livez}),
                Route("/metrics", {"GET": Metrics(self.store.redis, self.request_metrics.flush).metrics}),
                Route("/ui", {"GET": ui.index}),
                Route("/ui/{file}", {"GET": ui.file}),
            ]
        )

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        request = Request(environ, self.body_readers)
        response = self.handle(request)
        self.request_metrics.record(
            request.method, request.route or UNMATCHED, response.status, time.perf_counter() - started
        )
        headers = response.headers
        origin = environ.get("HTTP_ORIGIN")
        if origin and origin in self.settings.cors_origins:
            headers = [*headers, ("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        status = f"{response.status} {REASONS.get(response.status, '')}"
        if response.stream is not None:  # no length: the server sends it chunked
            start_response(status, headers)
            if request.method == "HEAD":
                response.stream.close()
                return [b""]
            return response.stream
        start_response(status, [*headers, ("Content-Length", str(len(response.body)))])
        return [b""] if request.method == "HEAD" else [response.body]

    def handle(self, request: Request) -> Response:
        found = self.router.match(request.path)
        if found is None:
            return error_response(HTTPError(404, f"no route for {request.path}"))
        route, params = found
        request.route = route.template
        if request.method == "OPTIONS":
            return Response(204, headers=[("Allow", route.allow), *self._preflight(request, route)])
        handler = route.handlers.get(request.method)
        if handler is None:
            return error_response(
                HTTPError(405, f"{request.method} is not allowed on {route.template}", [("Allow", route.allow)])
            )
        request.params = params
        try:
            if request.environ.get(WEBSOCKET):  # a tail's handshake at the server of tails
                self.tenant_from_ticket(request)
            elif self.settings.auth_mode == "tokens" and route.template not in OPEN_ROUTES:
                self.authenticate(request)
            else:
                self.tenant_from_header(request)
            if route.template.startswith(TENANT_ROUTES) and request.tenant is not None:
                self.limiter.check(request.tenant)
            return handler(request)
        except PoolqError as exc:
            return error_response(exc)
        except Exception:  # a bug: log it whole, answer without details
            log.exception("unhandled error for %s %s", request.method, request.path)
            return Response.json({"error": "internal error"}, 500)

    def tail_handshake(
        self, environ: dict[str, Any]
    ) -> tuple[tuple[int, list[tuple[str, str]], bytes], tuple[str, str] | None]:
        """Judge a log tail's WebSocket handshake (api_shim/tail.py) as the request it is,
        through the same checks as every request. Returns the answer to refuse it with,
        and on success the tenant and job to follow instead."""
        request = Request({**environ, WEBSOCKET: True}, self.body_readers)
        found = self.router.match(request.path)
        if found is None or found[0].template != TAIL_ROUTE:
            response = error_response(HTTPError(404, f"no log tail at {request.path}"))
        else:
            response = self.handle(request)
            if response.status == 200 and request.tenant is not None:
                return (200, [], b""), (request.tenant, request.params["submission_id"])
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        return (response.status, headers, response.body), None

    def tenant_from_ticket(self, request: Request) -> None:
        """The tenant of the ticket the API's redirect gave (poolq/tokens.py): the server of
        tails believes nothing else, since clients drop Authorization across the redirect."""
        query = {name: request.query(name) or "" for name in ("tenant", "expires", "ticket")}
        key = tokens.tail_key(self.store.redis)
        tenant = tokens.ticket_tenant(key, query, request.params["submission_id"], time.time())
        if tenant is None:
            raise HTTPError(403, BAD_TICKET)
        request.tenant = tenant

    def tenant_from_header(self, request: Request) -> None:
        """Tokens off: the tenant X-Tenant-Id names (absent or empty: ``default``)."""
        try:
            request.tenant = parse_tenant(request.header("X-Tenant-Id"))
        except ValidationError as exc:
            request.tenant_problem = list(exc.messages)  # type: ignore[arg-type]

    def authenticate(self, request: Request) -> None:
        """Tokens on: the tenant comes from the bearer token (docs/operations.md)."""
        scheme, _, token = (request.header("Authorization") or "").partition(" ")
        tenant = tokens.tenant_of(self.store.redis, token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise HTTPError(401, UNAUTHENTICATED, [("WWW-Authenticate", 'Bearer realm="poolq"')])
        named = (request.header("X-Tenant-Id") or "").strip()
        if named and named != tenant:
            raise HTTPError(403, f"the token's tenant is {tenant}, not {named}")
        request.tenant = tenant

    def _preflight(self, request: Request, route: Route) -> list[tuple[str, str]]:
        origin = request.header("Origin")
        if not origin or origin not in self.settings.cors_origins:
            return []
        return [
            ("Access-Control-Allow-Methods", route.allow),
            (
                "Access-Control-Allow-Headers",
                "Authorization, Content-Type, If-None-Match, Prefer, X-Tenant-Id, X-Pool-Label, X-Schedule-Timeout-Ms",
            ),
            ("Access-Control-Max-Age", "600"),
        ]


def error_response(exc: PoolqError) -> Response:
    """Every error answer is made here: ``{"error": ...}`` plus fields where stated."""
    if isinstance(exc, HTTPError):
        return Response.json({"error": exc.error, **exc.extra}, exc.status, exc.headers)
    if isinstance(exc, InvalidRequest):
        return Response.json({"error": str(exc), "fields": exc.fields}, 400)
    if isinstance(exc, NotFound):
        return Response.json({"error": str(exc)}, 404)
    if isinstance(exc, Conflict):
        return Response.json({"error": str(exc)}, 409)
    if isinstance(exc, StorageFull):
        return Response.json({"error": str(exc)}, 413)
    if isinstance(exc, TooMany):
        headers = [("Retry-After", str(max(1, math.ceil(exc.retry_after))))] if exc.retry_after else []
        return Response.json({"error": str(exc)}, 429, headers)
    if isinstance(exc, Unavailable):
        extra = {"submission_id": exc.submission_id} if exc.submission_id else {}
        return Response.json({"error": str(exc), **extra}, 503)
    return Response.json({"error": str(exc)}, 400)


def create_app(settings: Settings | None = None) -> App:
    return App(settings or Settings.from_env())
