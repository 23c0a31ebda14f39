"""/api/jobs: submit, poll."""

from __future__ import annotations

from typing import Any

from api_shim.http import JSON, HTTPError, Request, Response
from poolq.errors import InvalidRequest, Unavailable
from poolq.schemas import TENANT, parse_json


def submit(request: Request) -> Response:
    app = request.app
    body = json_body(request, app.settings.max_body)
    job = app.store.prepare(
        body,
        tenant=request.header("X-Tenant-Id"),
        pool_label=request.header("X-Pool-Label"),
        schedule_timeout_ms=request.header("X-Schedule-Timeout-Ms"),
    )
    try:
        app.store.submit(job)
    except Unavailable as exc:
        raise Unavailable(f"create app failed, submissionId:[{job.submission_id}], err: {exc}") from exc
    return Response.json({"submission_id": job.submission_id, "job_id": job.submission_id})


def get(request: Request) -> Response:
    record = request.app.store.get(tenant_of(request), request.params["submission_id"])
    return Response.json(record)


def stop(request: Request) -> Response:
    stopped = request.app.store.stop(tenant_of(request), request.params["submission_id"])
    return Response.json({"stopped": stopped})


def logs(request: Request) -> Response:
    offset_text = request.query("offset")
    offset = None
    if offset_text is not None:
        if not offset_text.isdigit() or len(offset_text) > 18:
            raise InvalidRequest({"offset": ["must be a non-negative integer"]}, "invalid query")
        offset = int(offset_text)
    text, next_offset = request.app.store.logs(tenant_of(request), request.params["submission_id"], offset)
    return Response.json({"logs": text}, headers=[("X-Log-Offset", str(next_offset))])


def tenant_of(request: Request) -> str:
    """The caller's tenant: X-Tenant-Id, absent or empty meaning ``default``."""
    tenant = (request.header("X-Tenant-Id") or "").strip() or "default"
    if not TENANT.match(tenant):
        raise InvalidRequest({"X-Tenant-Id": ["must match [A-Za-z0-9._-]{1,64}"]}, "invalid X-Tenant-Id header")
    return tenant


def json_body(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 unless application/json, 413 over ``limit``, 400 if malformed."""
    content_type = (request.header("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type != JSON:
        raise HTTPError(415, "Content-Type must be application/json")
    raw = request.read_body(limit)
    try:
        return parse_json(raw)
    except UnicodeDecodeError:
        problem = "is not valid UTF-8"
    except RecursionError:
        problem = "is nested too deeply"
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        problem = f"is not valid JSON: {exc}"
    raise InvalidRequest({"body": [problem]})
