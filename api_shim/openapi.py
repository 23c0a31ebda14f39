"""The OpenAPI 3 document of the API, generated with apispec from the marshmallow schemas.

Request bodies come from the very schemas that validate them (``poolq.schemas``);
the response shapes are declared here, for documentation only.
"""

from __future__ import annotations

import functools
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from poolq import __version__
from poolq.model import ErrorType, JobStatus
from poolq.schemas import (
    MAX_ARRAY_TASKS,
    PACKAGE_NAME,
    SEED_EXAMPLE,
    Amount,
    JobRequestSchema,
    RuntimeEnvSchema,
    StringList,
    StringMap,
    Text,
)

JSON = "application/json"
TENANT = {
    "name": "X-Tenant-Id",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{0,64}$"},
    "description": "the tenant that owns the job; absent or empty means `default`",
}
POOL_LABEL = {
    "name": "X-Pool-Label",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "ordered, comma-separated pool-label terms (`key` or `key=value`); `unUseAntiOtherLabels` allows other nodes last",
}
TIMEOUT = {
    "name": "X-Schedule-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": 604800000},
    "description": "scheduling deadline in ms after submission; 0 waits until placed or stopped",
}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "`wait=<seconds>` (at most 60): answer once the job is placed, fails to place, or the wait ends",
}
_COMPONENT = {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok", "unavailable", "unknown"]}}}
HEALTH = {
    "type": "object",
    "required": ["status", "components"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]},
        "components": {
            "type": "object",
            "properties": {name: _COMPONENT for name in ("redis", "placement_workers", "nodes")},
        },
    },
}
ID = {"name": "submission_id", "in": "path", "required": True, "schema": {"type": "string"}}

# Authentication (docs/api.md, "Authentication and tenants"): with POOLQ_AUTH=tokens every
# route but /healthz and /livez need a bearer token; without, none does, hence the `{}` alternative.
# The routes a tenant's request rate limits (api_shim.app.TENANT_ROUTES) may answer 429.
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API token (`poolq token create TENANT`), bound to its tenant. Required only when the "
    "server runs with POOLQ_AUTH=tokens (the default on any address but loopback): each operation's security "
    "also lists `{}`, no authentication, which is how a server with POOLQ_AUTH=none answers.",
}
OPEN_PATHS = {"/healthz", "/livez", "/ui", "/ui/{file}"}
RATE_LIMITED = ("/api/jobs", "/api/packages", "/api/overview")
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 1},
        "description": "seconds until the tenant's request rate allows another request (sent with a rate-limit 429)",
    }
}


class ErrorBody(Schema):
    error = fields.String(required=True)
    fields_ = fields.Dict(keys=fields.String(), values=fields.List(fields.String()), data_key="fields")
    submission_id = fields.String(
        metadata={"description": "a 503 to a submission: the job's id, to send the same request again with"}
    )
    cursor = fields.String(metadata={"description": "a 410 from the change feed: the feed's position now"})


class SubmitAnswer(Schema):
    submission_id = fields.String(required=True)
    job_id = fields.String(required=True, metadata={"description": "the same id; Ray's SDK requires both keys"})


class Reason(Schema):
    reason = fields.String(required=True)
    units = fields.Integer(required=True)
    requirement = fields.String(allow_none=True)


class Scheduling(Schema):
    attempts = fields.Integer(required=True)
    deadline = fields.Integer(allow_none=True)
    reasons = fields.List(fields.Nested(Reason), required=True)


class PreviousAttempt(Schema):
    attempt_number = fields.Integer(required=True)
    status = fields.String(required=True)
    error_type = fields.String(allow_none=True)
    message = fields.String(allow_none=True)
    node = fields.String(allow_none=True)
    devices = fields.Dict(required=True)
    start_time = fields.Integer(allow_none=True)
    end_time = fields.Integer(allow_none=True)
    driver_exit_code = fields.Integer(allow_none=True)


class ArraySummary(Schema):
    count = fields.Integer(required=True, metadata={"description": "how many tasks it has"})
    created = fields.Integer(required=True, metadata={"description": "how many placement has reached (records)"})
    tasks = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        required=True,
        metadata={"description": "status -> how many of its tasks are in it (those not created yet: PENDING)"},
    )


class JobRecord(Schema):
    type = fields.String(required=True, metadata={"enum": ["SUBMISSION"]})
    job_id = fields.Raw(allow_none=True, metadata={"nullable": True, "description": "always null"})
    submission_id = fields.String(required=True)
    tenant_id = fields.String(required=True)
    entrypoint = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": [s.value for s in JobStatus]})
    message = fields.String(required=True)
    error_type = fields.String(allow_none=True, metadata={"enum": [e.value for e in ErrorType] + [None]})
    metadata = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    runtime_env = fields.Dict(required=True)
    entrypoint_num_cpus = fields.Float(required=True)
    entrypoint_num_gpus = fields.Float(required=True)
    entrypoint_memory = fields.Integer(required=True)
    entrypoint_resources = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    entrypoint_label_selector = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    pool_label = fields.String(allow_none=True)
    submit_time = fields.Integer(required=True)
    start_time = fields.Integer(allow_none=True)
    end_time = fields.Integer(allow_none=True)
    driver_node_id = fields.String(allow_none=True)
    pool = fields.String(allow_none=True)
    driver_exit_code = fields.Integer(allow_none=True)
    driver_info = fields.Raw(allow_none=True, metadata={"nullable": True})
    driver_agent_http_address = fields.Raw(allow_none=True, metadata={"nullable": True})
    devices = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        required=True,
        metadata={"description": 'the device ids the job was given, e.g. {"GPU": ["0", "1"]}'},
    )
    runtime_limit_s = fields.Float(allow_none=True)
    run_deadline = fields.Integer(allow_none=True, metadata={"description": "ms: when its runtime limit ends"})
    retry_policy = fields.Dict(allow_none=True)
    priority = fields.Integer(required=True, metadata={"description": "its own, else its tenant's default, else 0"})
    depends_on = fields.Dict(
        allow_none=True, metadata={"description": '{"afterok": [ids], "afterany": [ids]}, as accepted'}
    )
    gang_id = fields.String(allow_none=True, metadata={"description": "the gang it was placed with, all or none"})
    array = fields.Nested(
        ArraySummary,
        allow_none=True,
        metadata={"description": "an array's record: its tasks by status (null for a job or a task)"},
    )
    array_id = fields.String(allow_none=True, metadata={"description": "a task's array (null for others)"})
    array_index = fields.Integer(allow_none=True, metadata={"description": "a task's index in its array"})
    attempt_number = fields.Integer(required=True)
    previous_attempts = fields.List(fields.Nested(PreviousAttempt), required=True)
    scheduling = fields.Nested(Scheduling, required=True)


class BatchRequest(Schema):
    jobs = fields.List(fields.Nested(JobRequestSchema), required=True, metadata={"maxItems": 1000})


class BatchItem(Schema):
    submission_id = fields.String()
    error = fields.String()
    fields_ = fields.Dict(data_key="fields")


class BatchAnswer(Schema):
    results = fields.List(fields.Nested(BatchItem), required=True)


class Node(Schema):
    node_id = fields.String(required=True)
    pool = fields.String(required=True)
    labels = fields.Dict(required=True)
    kind = fields.String()
    state = fields.String()
    alive = fields.Boolean(required=True)
    draining = fields.Boolean(required=True)
    held_for = fields.Dict(
        allow_none=True,
        metadata={"description": 'held for a waiting job: {"priority": P, "until": ms}; lower priorities wait'},
    )
    last_heartbeat = fields.Integer(allow_none=True)
    enforcement = fields.Dict(
        allow_none=True,
        metadata={"description": 'how the node limits its jobs: {"mode": "v1"|"v2"|"none", "reason": …}'},
    )
    capacity = fields.Dict(required=True)
    reserved = fields.Dict(required=True)
    free = fields.Dict(required=True)
    devices = fields.Dict(
        required=True, metadata={"description": 'per device, the share in use: {"GPU": {"0": 1.0, "1": 0.5}}'}
    )


class Pool(Schema):
    pool = fields.String(required=True)
    nodes = fields.Integer(required=True)
    alive = fields.Integer(required=True)
    capacity = fields.Dict(required=True)
    reserved = fields.Dict(required=True)
    free = fields.Dict(required=True)


def _answer(description: str, schema: Any = None, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {JSON: {"schema": schema}}
    if headers:
        answer["headers"] = headers
    return answer


def _with_stream(answer: dict[str, Any], media_type: str) -> dict[str, Any]:
    """An answer that is also sent as a stream of ``media_type``, when asked for."""
    answer["content"][media_type] = {"schema": {"type": "string"}}
    return answer


def _errors(*codes: int, schema: Any = "ErrorBody") -> dict[str, Any]:
    text = {
        400: "invalid request (fields name each problem)",
        401: "with POOLQ_AUTH=tokens: no valid bearer token (missing, unknown, malformed or revoked)",
        403: "with POOLQ_AUTH=tokens: X-Tenant-Id names another tenant than the token's",
        404: "not found in the caller's tenant",
        409: "conflict",
        410: "the cursor is older than the oldest change the feed keeps (the body's cursor: the feed's position now)",
        413: "body too large",
        415: "Content-Type must be application/json",
        426: "this route is a WebSocket: send Upgrade: websocket",
        501: "this server does not serve WebSockets (POOLQ_API_WEBSOCKETS=0)",
        429: "a tenant limit: its request rate (with Retry-After) or, for a submission, its max pending jobs",
        503: "Redis unavailable",
    }
    headers: dict[int, dict[str, Any]] = {
        401: {
            "WWW-Authenticate": {"required": True, "schema": {"type": "string"}, "description": 'Bearer realm="poolq"'}
        },
        429: RETRY_AFTER,
    }
    return {str(code): _answer(text[code], schema, headers.get(code)) for code in codes}


def _secure(paths: dict[str, Any]) -> None:
    """Every operation but the open ones: the bearer token, and the 401, 403 (and on the
    rate-limited routes 429) that come with it. Runs on the finished document."""
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in paths.items():
        for operation in operations.values():
            if path in OPEN_PATHS:
                operation["security"] = []
                continue
            operation["security"] = [{"bearerAuth": []}, {}]
            codes = (401, 403, 429) if path.startswith(RATE_LIMITED) else (401, 403)
            operation["responses"].update(_errors(*codes, schema=error_body))
            operation["responses"] = dict(sorted(operation["responses"].items()))


def _obj(schema_fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": schema_fields,
        "required": list(schema_fields),
        "additionalProperties": False,
    }


@functools.cache
def document() -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="poolq",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={
            "description": "Job submission API (openYuanrong's POST /api/jobs, a dialect of Ray's Job Submission API)"
        },
    )
    plugin.map_to_openapi_type(Text, "string", None)
    plugin.map_to_openapi_type(Amount, "number", None)
    plugin.map_to_openapi_type(StringMap, "object", None)
    plugin.map_to_openapi_type(StringList, "array", None)
    for name, schema in (
        ("RuntimeEnv", RuntimeEnvSchema),
        ("JobRequest", JobRequestSchema),
        ("ErrorBody", ErrorBody),
        ("SubmitAnswer", SubmitAnswer),
        ("JobRecord", JobRecord),
        ("BatchRequest", BatchRequest),
        ("BatchAnswer", BatchAnswer),
        ("Node", Node),
        ("Pool", Pool),
    ):
        spec.components.schema(name, schema=schema)
    spec.components.security_scheme("bearerAuth", BEARER)
    etag = {"ETag": {"schema": {"type": "string"}}}
    spec.path(
        "/api/jobs",
        operations={
            "post": {
                "summary": "Submit a job",
                "parameters": [TENANT, POOL_LABEL, TIMEOUT, PREFER],
                "requestBody": {"required": True, "content": {JSON: {"schema": "JobRequest", "example": SEED_EXAMPLE}}},
                "responses": {
                    "200": _answer("stored and queued (or an identical earlier submission)", "SubmitAnswer"),
                    **_errors(400, 409, 413, 415, 503),
                },
            },
            "get": {
                "summary": "List the caller's jobs, newest first",
                "parameters": [
                    TENANT,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                    },
                    {"name": "pool_label", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "ids",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma-separated, at most 100",
                    },
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 2**62}},
                    {
                        "name": "array",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "an array's id: its tasks in index order, with status and limit",
                    },
                    {
                        "name": "start",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ARRAY_TASKS},
                        "description": "with array: the first index of the page",
                    },
                ],
                "responses": {
                    "200": _answer(
                        "job records",
                        {"type": "array", "items": "JobRecord"},
                        {"Link": {"schema": {"type": "string"}, "description": 'the next page, rel="next"'}},
                    ),
                    **_errors(400, 404, 503),
                },
            },
        },
    )
    spec.path(
        "/api/jobs/batch",
        operations={
            "post": {
                "summary": "Submit up to 1,000 jobs",
                "parameters": [TENANT, POOL_LABEL, TIMEOUT],
                "requestBody": {"required": True, "content": {JSON: {"schema": "BatchRequest"}}},
                "responses": {
                    "200": _answer("per-job results, in request order", "BatchAnswer"),
                    **_errors(400, 413, 415, 503),
                },
            }
        },
    )
    change = _obj(
        {
            "submission_id": {"type": "string"},
            "status": {"type": "string", "description": "a job status; ARRAY: an array's record changed; DELETED"},
            "node": {"type": "string", "nullable": True},
            "time": {"type": "integer", "description": "when the change was made, ms since the epoch"},
            "cursor": {"type": "string", "description": "follow from here to read what came after this change"},
            "etag": {"type": "string", "nullable": True, "description": "the record's ETag now; null once deleted"},
        }
    )
    spec.path(
        "/api/jobs/changes",
        operations={
            "get": {
                "summary": "Follow the tenant's job changes (the change feed)",
                "description": (
                    "The changes of the tenant's jobs' status or node after the cursor `since`, oldest first, "
                    "with the cursor to follow from next. Without `since`: no changes, only the feed's position "
                    "now (take it, list the jobs, then follow from it). With `wait`, the answer is held until "
                    "there is a change or the wait ends; an API process holds a bounded number of waits "
                    "(POOLQ_MAX_WAITERS, shared with `Prefer: wait`), beyond which it answers at once with "
                    "Retry-After: 1. The feed keeps a tenant's last 100,000 changes: an older cursor is 410. "
                    "With `Accept: text/event-stream`, the changes are sent as Server-Sent Events as they "
                    "happen (event `change`, its id the change's cursor; `Last-Event-ID` resumes after it); "
                    "beyond POOLQ_MAX_WAITERS such a stream is 503 with Retry-After: 1."
                ),
                "parameters": [
                    TENANT,
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}-[0-9]{1,18}$"},
                    },
                    {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 60}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
                "responses": {
                    "200": _with_stream(
                        _answer(
                            "the changes after the cursor and the cursor to follow from",
                            _obj({"changes": {"type": "array", "items": change}, "cursor": {"type": "string"}}),
                            {"Retry-After": {"schema": {"type": "integer"}, "description": "the wait was not held"}},
                        ),
                        "text/event-stream",
                    ),
                    **_errors(400, 410, 503),
                },
            }
        },
    )
    spec.path(
        "/api/jobs/{submission_id}",
        operations={
            "get": {
                "summary": "Poll one job",
                "parameters": [TENANT, ID, {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
                "responses": {
                    "200": _answer("the job record", "JobRecord", etag),
                    "304": _answer("unchanged", headers=etag),
                    **_errors(400, 404, 503),
                },
            },
            "delete": {
                "summary": "Delete a finished job",
                "parameters": [TENANT, ID],
                "responses": {
                    "200": _answer("deleted", _obj({"deleted": {"type": "boolean"}})),
                    **_errors(400, 404, 409, 503),
                },
            },
        },
    )
    spec.path(
        "/api/jobs/{submission_id}/stop",
        operations={
            "post": {
                "summary": "Stop a job",
                "parameters": [TENANT, ID],
                "responses": {
                    "200": _answer(
                        "whether it was PENDING or RUNNING and is now stopping", _obj({"stopped": {"type": "boolean"}})
                    ),
                    **_errors(400, 404, 503),
                },
            }
        },
    )
    spec.path(
        "/api/jobs/{submission_id}/logs",
        operations={
            "get": {
                "summary": "The job's output",
                "parameters": [
                    TENANT,
                    ID,
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "1: the output itself (text/plain, chunked) as it is written, to the job's end",
                        "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                    },
                ],
                "responses": {
                    "200": _with_stream(
                        _answer(
                            "output kept so far; with follow=1, the output as it is written (X-Log-Start: its offset)",
                            _obj({"logs": {"type": "string"}}),
                            {
                                "X-Log-Offset": {
                                    "schema": {"type": "integer"},
                                    "description": "offset after this output",
                                }
                            },
                        ),
                        "text/plain",
                    ),
                    **_errors(400, 404, 503),
                },
            }
        },
    )
    spec.path(
        "/api/jobs/{submission_id}/logs/tail",
        operations={
            "get": {
                "summary": "Follow the job's output over a WebSocket (Ray's log tail)",
                "description": (
                    "Send a WebSocket upgrade. The API judges it as the same request to /logs, then "
                    "redirects it (307) to the server of tails with a ticket for 60 s; there the server "
                    "sends the job's output from the start as text frames, then new output as it is "
                    "written, and closes normally (1000) once the job has ended and everything was sent. "
                    "A refused handshake is answered with the status and body the same request to /logs "
                    "would get; a request without an upgrade is 426 (501 when the server does not serve "
                    "WebSockets); at the server of tails, a missing, altered or expired ticket is 403."
                ),
                "parameters": [TENANT, ID],
                "responses": {
                    "307": {
                        "description": "judged: follow the Location, the server of tails with a ticket",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "101": {"description": "at the server of tails: switching to the WebSocket"},
                    **_errors(400, 403, 404, 426, 501, 503),
                },
            }
        },
    )
    package = [
        {"name": "protocol", "in": "path", "required": True, "schema": {"type": "string", "enum": ["gcs"]}},
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": PACKAGE_NAME.pattern}},
    ]
    spec.path(
        "/api/packages/{protocol}/{name}",
        operations={
            "get": {
                "summary": "Whether a working_dir package was uploaded",
                "parameters": package,
                "responses": {"200": _answer("present", {"type": "object"}), **_errors(400, 404, 503)},
            },
            "put": {
                "summary": "Upload a working_dir package (zip bytes)",
                "parameters": package,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}
                    },
                },
                "responses": {"200": _answer("stored", {"type": "object"}), **_errors(400, 413, 503)},
            },
        },
    )
    spec.path(
        "/api/nodes",
        operations={
            "get": {
                "summary": "Nodes",
                "responses": {
                    "200": _answer(
                        "nodes with capacity, reserved and free amounts", {"type": "array", "items": "Node"}
                    ),
                    **_errors(503),
                },
            }
        },
    )
    spec.path(
        "/api/pools",
        operations={
            "get": {
                "summary": "Pools",
                "responses": {
                    "200": _answer(
                        "capacity, reserved and free per pool (alive nodes)", {"type": "array", "items": "Pool"}
                    ),
                    **_errors(503),
                },
            }
        },
    )
    spec.path(
        "/api/version",
        operations={
            "get": {
                "summary": "Versions",
                "responses": {
                    "200": _answer(
                        "versions",
                        _obj(
                            {
                                "version": {"type": "string"},
                                "ray_version": {"type": "string"},
                                "poolq_version": {"type": "string"},
                            }
                        ),
                    )
                },
            }
        },
    )
    spec.path(
        "/api/openapi.json",
        operations={
            "get": {"summary": "This document", "responses": {"200": _answer("OpenAPI 3", {"type": "object"})}}
        },
    )
    spec.path(
        "/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(503),
                },
            }
        },
    )
    sample = _obj(
        {
            "time": {"type": "integer", "description": "the end of the interval, ms since the epoch"},
            "waiting": {"type": "integer", "description": "jobs waiting for placement then (whole service)"},
            "placed": {"type": "integer", "description": "jobs placed in the interval"},
            "latency_p50_ms": {"type": "integer", "nullable": True},
            "latency_p99_ms": {"type": "integer", "nullable": True},
        }
    )
    amounts = {"type": "object", "additionalProperties": {"type": "number"}}
    spec.path(
        "/api/overview",
        operations={
            "get": {
                "summary": "The tenant at a glance: its jobs by status, its quota and use; the last hour's queue",
                "description": (
                    "`history` holds one sample per 10 s of the last hour, oldest first, for the whole "
                    "service: jobs waiting for placement, jobs placed in the interval and the p50 and p99 of "
                    "their placement latency (the upper bound of its histogram bucket, ms; null without any)."
                ),
                "parameters": [TENANT],
                "responses": {
                    "200": _answer(
                        "the overview",
                        _obj(
                            {
                                "tenant": {"type": "string"},
                                "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                                "quota": _obj(
                                    {
                                        "limits": amounts,
                                        "use": amounts,
                                        "max_pending": {"type": "integer", "nullable": True},
                                        "pending": {"type": "integer"},
                                    }
                                ),
                                "history": {"type": "array", "items": sample},
                            }
                        ),
                    ),
                    **_errors(400, 503),
                },
            }
        },
    )
    for path, summary in (
        ("/ui", "The dashboard (a redirect to /ui/, which is its page)"),
        ("/ui/{file}", "The dashboard's files: index.html, ui.js, ui.css"),
    ):
        parameters = [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}]
        spec.path(
            path,
            operations={
                "get": {
                    "summary": summary,
                    "parameters": parameters if "{file}" in path else [],
                    "responses": {
                        "200": {
                            "description": "the file",
                            "content": {
                                kind: {"schema": {"type": "string"}}
                                for kind in ("text/html", "text/javascript", "text/css")
                            },
                        },
                        "304": _answer("unchanged (If-None-Match)"),
                        "308": {"description": "to /ui/", "headers": {"Location": {"schema": {"type": "string"}}}},
                        **_errors(404),
                    },
                }
            },
        )
    spec.path(
        "/healthz",
        operations={
            "get": {
                "summary": "Whether the service can place jobs: Redis, placement workers, nodes",
                "responses": {
                    "200": _answer("Redis answers, a placement worker and a schedulable node are live", HEALTH),
                    "503": _answer("a component is missing; `components` says which", HEALTH),
                },
            }
        },
    )
    spec.path(
        "/livez",
        operations={
            "get": {
                "summary": "Liveness: this API process serves and Redis answers",
                "responses": {
                    "200": _answer("Redis answers", {"type": "object"}),
                    "503": _answer("Redis unavailable", {"type": "object"}),
                },
            }
        },
    )
    doc = spec.to_dict()
    _secure(doc["paths"])
    return doc
