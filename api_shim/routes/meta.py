"""Service routes: version, health (``/healthz``, ``/livez``) and the OpenAPI document."""

from __future__ import annotations

from api_shim.http import Request, Response
from poolq import __version__, health
from poolq.errors import Unavailable
from poolq.store import JobStore

# The Jobs SDK protocol level. Ray's CLI tails logs over a WebSocket only above 0,
# which a WSGI app cannot serve; at 0 it skips the tail with a warning (docs/api.md).
JOBS_API_VERSION = "0"
RAY_API_LEVEL = "2.9.0"


class Meta:
    def __init__(self, store: JobStore):
        self.store = store

    def version(self, request: Request) -> Response:
        return Response.json({"version": JOBS_API_VERSION, "ray_version": RAY_API_LEVEL, "poolq_version": __version__})

    def openapi(self, request: Request) -> Response:
        from api_shim.openapi import document

        return Response.json(document())

    def healthz(self, request: Request) -> Response:
        """Whether the service can place jobs: Redis, live placement workers, live nodes
        (poolq/health.py); 503 naming what is missing otherwise."""
        report = health.check(self.store.redis, self.store.settings)
        return Response.json(report, 200 if report["status"] == health.OK else 503)

    def livez(self, request: Request) -> Response:
        """Whether this API process serves and Redis answers: for a liveness probe or a
        load balancer, which must not fail only because no node is there yet."""
        try:
            self.store.ping()
        except Unavailable as exc:
            return Response.json({"status": "unavailable", "error": str(exc)}, 503)
        return Response.json({"status": "ok"})
