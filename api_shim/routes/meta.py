"""Service routes: version, health (``/healthz``, ``/livez``) and the OpenAPI document."""

from __future__ import annotations

from api_shim.http import Request, Response
from poolq import __version__, health
from poolq.errors import Unavailable
from poolq.settings import Settings
from poolq.store import JobStore

# The Jobs API protocol level, as Ray numbers it (ray/dashboard/modules/version.py):
# 1 log streaming, 2 submission_id and list answers, 3 entrypoint resources, 4 DELETE.
# Ray's CLI follows logs over the WebSocket only above 0, so a server that does not serve
# it (POOLQ_API_WEBSOCKETS=0, or a WSGI server other than `poolq api`) answers 0, and the
# CLI skips the tail with a warning.
JOBS_API_VERSION = "4"
JOBS_API_VERSION_NO_TAIL = "0"
RAY_API_LEVEL = "2.9.0"


class Meta:
    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.jobs_api_version = JOBS_API_VERSION if settings.serves_tails else JOBS_API_VERSION_NO_TAIL

    def version(self, request: Request) -> Response:
        return Response.json(
            {"version": self.jobs_api_version, "ray_version": RAY_API_LEVEL, "poolq_version": __version__}
        )

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
