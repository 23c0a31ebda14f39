"""GET /api/openapi.json (docs/api.md) and schemathesis against a live API.

First the document itself, read from the in-process app: a valid OpenAPI 3 document,
covering every route the app serves, whose request schema states the validator's rules
(it is generated from the marshmallow schemas, so a rule the generator drops shows up
here). Then schemathesis generates requests from that document and sends them to a live
``poolq api`` (granian, its own Redis, no placement worker): no answer may be a
500, and every answer must conform to the document (status codes, content types,
headers, bodies).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterator

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)

from api_shim.app import OPEN_ROUTES, TENANT_ROUTES
from api_shim.openapi import document
from poolq.embedded import EmbeddedRedis, free_port
from poolq.schemas import JobRequestSchema, RuntimeEnvSchema
from tests.kit import START_S
from tests.procs import Proc, wait_for
from tests.wsgi import call

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
MAX_EXAMPLES = 30

# Every check schemathesis has (the CLI's `--checks all`); object_level_authorization
# is left out: it needs two configured identities and the live server runs without auth.
ALL_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    use_after_free,
    ensure_resource_availability,
    ignored_auth,
]

# Operations where positive_data_acceptance cannot apply, by design: a job body that the
# document calls valid may still be refused, because some rules depend on state or are
# not expressible in OpenAPI 3.0 (no propertyNames, no cross-field rules): a gcs:// package
# must have been uploaded first; working_dir must be an absolute path or URI the node
# can use (poolq refuses relative paths); metadata keys are 1-256 characters, resource
# names may not be CPU/memory/GPU, env var names must be identifiers; job_id must equal
# submission_id when both are given. Every rule that *is* expressible is checked against
# the document in test_request_schema_agrees_with_validator below instead.
# A plain GET of the log tail is 426 by design: only a WebSocket upgrade, which
# schemathesis does not send, succeeds there (tests/test_ray_sdk.py opens it). A cursor
# of the right form may be older than what the change feed keeps, which is a 410
# (tests/test_changes.py).
POSITIVE_ACCEPTANCE_INAPPLICABLE = {
    ("POST", "/api/jobs"),
    ("POST", "/api/jobs/batch"),
    ("GET", "/api/jobs/{submission_id}/logs/tail"),
    ("GET", "/api/jobs/changes"),
}


def _doc() -> dict[str, Any]:
    return copy.deepcopy(document())


# -- the document, in-process ------------------------------------------------------------


def test_openapi_json_is_served(app: Any) -> None:
    for path in ("/api/openapi.json", "/api/openapi.json/"):
        result = call(app, "GET", path, content_type=None)
        assert result.status == 200, (path, result.body[:300])
        assert result.headers["Content-Type"].startswith("application/json")
        assert result.json == json.loads(json.dumps(document()))


def test_document_is_valid_openapi_3(app: Any) -> None:
    doc = call(app, "GET", "/api/openapi.json", content_type=None).json
    assert re.match(r"^3\.\d+\.\d+$", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]

    # The official OpenAPI 3.0 meta-schema, as schemathesis ships it.
    from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR, OPENAPI_31_VALIDATOR

    validator = OPENAPI_31_VALIDATOR if doc["openapi"].startswith("3.1") else OPENAPI_30_VALIDATOR
    problems = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert problems == [], "\n".join(problems[:20])

    # schemathesis loads it without complaint, and finds every operation.
    loaded = schemathesis.openapi.from_dict(copy.deepcopy(doc))
    loaded.validate()
    results: list[Any] = list(loaded.get_all_operations())
    operations = {(r.ok().method.upper(), r.ok().path) for r in results}
    assert operations == {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m in HTTP_METHODS}

    # Each component is itself a well-formed JSON Schema, and every $ref resolves.
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft4Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise AssertionError(f"component {name}: {exc.message}") from None
    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc)):
        node: Any = doc
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            assert part in node, f"unresolvable $ref {ref}"
            node = node[part]


def test_document_covers_every_route(app: Any) -> None:
    doc = _doc()
    served: dict[str, set[str]] = {}
    for route in app.router.routes:
        # A route answers with and without a trailing slash; the document names the bare path.
        path = route.template.rstrip("/") or "/"
        served.setdefault(path, set()).update(m.lower() for m in route.handlers if m not in ("HEAD", "OPTIONS"))
    documented = {path: {m for m in ops if m in HTTP_METHODS} for path, ops in doc["paths"].items()}
    assert set(documented) == set(served), (
        f"served but not documented: {sorted(set(served) - set(documented))}; "
        f"documented but not served: {sorted(set(documented) - set(served))}"
    )
    for path, methods in served.items():
        assert documented[path] == methods, (path, documented[path], methods)

    for path, ops in doc["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            if method not in HTTP_METHODS:
                continue
            params = op.get("parameters", []) + ops.get("parameters", [])
            declared = {p["name"] for p in params if p.get("in") == "path"}
            assert declared == names, (method, path, declared)
            assert all(p.get("required") for p in params if p.get("in") == "path"), (method, path)
            # The log tail is a WebSocket: its success is the switch to it.
            assert ("101" if path.endswith("/logs/tail") else "200") in op["responses"], (method, path)
            for code, answer in op["responses"].items():
                if code.startswith(("4", "5")) and path not in ("/healthz", "/livez"):
                    # Every error is JSON {"error": ...} (docs/api.md).
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code, schema)


def test_document_declares_the_bearer_token_where_the_app_asks_for_it() -> None:
    doc = _doc()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "POOLQ_AUTH=tokens" in scheme["description"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in OPEN_ROUTES:  # api_shim.app: answered without a token
                assert op["security"] == [] and not {"401", "403"} & set(op["responses"]), (method, path)
                continue
            # Required only when tokens are on: `{}` is the alternative of no authentication.
            assert op["security"] == [{"bearerAuth": []}, {}], (method, path, op.get("security"))
            answers = op["responses"]
            assert {"401", "403"} <= set(answers), (method, path, sorted(answers))
            assert answers["401"]["headers"]["WWW-Authenticate"]["required"] is True, (method, path)
            rate_limited = path.startswith(TENANT_ROUTES)  # api_shim.app: the routes RateLimiter checks
            assert ("429" in answers) == rate_limited, (method, path, sorted(answers))
            if rate_limited:
                assert answers["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer", (method, path)


def _prop(doc: dict[str, Any], component: str, name: str) -> dict[str, Any]:
    return dict(doc["components"]["schemas"][component]["properties"][name])


def _header(doc: dict[str, Any], path: str, method: str, name: str, where: str = "header") -> dict[str, Any]:
    params = doc["paths"][path][method]["parameters"]
    return dict(next(p for p in params if p["name"] == name and p["in"] == where)["schema"])


def test_request_schema_ranges() -> None:
    """The document states the validator's ranges (docs/api.md), field by field."""
    doc = _doc()
    job = doc["components"]["schemas"]["JobRequest"]
    env = doc["components"]["schemas"]["RuntimeEnv"]
    assert set(job["properties"]) == set(JobRequestSchema().fields)
    assert set(env["properties"]) == set(RuntimeEnvSchema().fields)
    assert sorted(job["required"]) == ["entrypoint", "runtime_env"]
    assert env["required"] == ["working_dir"]
    # Unknown fields are refused (400), at the top level and in runtime_env.
    assert job["additionalProperties"] is False and env["additionalProperties"] is False

    cpus = _prop(doc, "JobRequest", "entrypoint_num_cpus")
    assert cpus["type"] == "number" and Decimal(str(cpus["minimum"])) == Decimal("0.3") and cpus["maximum"] == 16
    memory = _prop(doc, "JobRequest", "entrypoint_memory")
    assert memory["type"] == "integer" and memory["minimum"] == 134217728 and memory["maximum"] == 1125899906842624
    gpus = _prop(doc, "JobRequest", "entrypoint_num_gpus")
    assert gpus["type"] == "number" and gpus["minimum"] == 0 and gpus["maximum"] == 1024
    assert _prop(doc, "JobRequest", "metadata")["maxProperties"] == 64
    assert _prop(doc, "RuntimeEnv", "env_vars")["maxProperties"] == 256
    assert _prop(doc, "RuntimeEnv", "excludes")["maxItems"] == 256
    assert doc["components"]["schemas"]["BatchRequest"]["properties"]["jobs"]["maxItems"] == 1000

    timeout = _header(doc, "/api/jobs", "post", "X-Schedule-Timeout-Ms")
    assert timeout["type"] == "integer" and timeout["minimum"] == 0 and timeout["maximum"] == 604800000
    limit = _header(doc, "/api/jobs", "get", "limit", "query")
    assert limit["minimum"] == 1 and limit["maximum"] == 1000

    # Expressible rules the generator must not drop: all listed at once.
    gaps = []
    resource_value = _prop(doc, "JobRequest", "entrypoint_resources")["additionalProperties"]
    if resource_value.get("minimum") != 0 or resource_value.get("maximum") != 1e9:
        gaps.append(f"entrypoint_resources values: 0 <= x <= 1e9, document says {resource_value}")
    working_dir = _prop(doc, "RuntimeEnv", "working_dir")
    if working_dir.get("type") != "string" or working_dir.get("minLength") != 1:
        gaps.append(f"runtime_env.working_dir: a non-empty string, document says {working_dir}")
    entrypoint = _prop(doc, "JobRequest", "entrypoint")
    if entrypoint.get("type") != "string" or entrypoint.get("minLength", 0) < 1:
        gaps.append(f"entrypoint: a non-empty string, document says {entrypoint}")
    cursor = _header(doc, "/api/jobs", "get", "cursor", "query")
    if cursor.get("minimum") != 1 or cursor.get("maximum") != 2**62:
        gaps.append(f"cursor: 1 <= x <= 2**62 (api_shim/routes/jobs.py list_jobs), document says {cursor}")
    offset = _header(doc, "/api/jobs/{submission_id}/logs", "get", "offset", "query")
    if offset.get("minimum") != 0 or offset.get("maximum") != 10**18 - 1:
        gaps.append(f"offset: 0 <= x <= 10**18-1 (at most 18 digits, api_shim/routes/jobs.py logs), document says {offset}")
    tenant = _header(doc, "/api/jobs", "post", "X-Tenant-Id")
    if tenant.get("pattern") and not re.search(tenant["pattern"], ""):
        gaps.append(f"X-Tenant-Id: empty means default (docs/api.md), document pattern {tenant['pattern']} refuses it")
    package_name = next(p for p in doc["paths"]["/api/packages/{protocol}/{name}"]["get"]["parameters"] if p["name"] == "name")["schema"]
    if "pattern" not in package_name:
        gaps.append(f"package name: _ray_pkg_<hash>.zip (poolq/packages.py NAME), document says {package_name}")
    submission_id = _prop(doc, "JobRequest", "submission_id")
    if "pattern" not in submission_id:
        gaps.append(f"submission_id: [a-z0-9-]{{1,60}} after an optional app- prefix, document says {submission_id}")
    assert gaps == [], "the document drops rules the validator applies:\n" + "\n".join(gaps)


# -- the document's verdict and the validator's, case by case ---------------------------------


def _inline(node: Any, doc: dict[str, Any]) -> Any:
    """The schema with every local $ref replaced by its target (the components are acyclic)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = doc
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            return _inline(target, doc)
        return {k: _inline(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, doc) for v in node]
    return node


def _doc_accepts(schema: dict[str, Any], value: Any) -> bool:
    # OpenAPI 3.0 schema objects are a dialect of JSON Schema draft 4 (plus nullable,
    # which requests here never use).
    return jsonschema.Draft4Validator(schema).is_valid(value)


def _job(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"entrypoint": "echo hi", "runtime_env": {"working_dir": "/tmp"}}
    for key, value in changes.items():
        if key.startswith("env__"):
            body["runtime_env"][key[len("env__"):]] = value
        else:
            body[key] = value
    return body


# (what, body): the document must accept exactly the bodies the validator accepts,
# for every rule OpenAPI 3.0 can state.
AGREEMENT = [
    ("minimal", _job()),
    ("cpus at min", _job(entrypoint_num_cpus=0.3)),
    ("cpus under min", _job(entrypoint_num_cpus=0.29)),
    ("cpus at max", _job(entrypoint_num_cpus=16)),
    ("cpus over max", _job(entrypoint_num_cpus=16.01)),
    ("cpus bool", _job(entrypoint_num_cpus=True)),
    ("cpus string", _job(entrypoint_num_cpus="1")),
    ("memory at min", _job(entrypoint_memory=134217728)),
    ("memory under min", _job(entrypoint_memory=134217727)),
    ("memory at max", _job(entrypoint_memory=1125899906842624)),
    ("memory over max", _job(entrypoint_memory=1125899906842625)),
    ("memory fraction", _job(entrypoint_memory=134217728.5)),
    ("gpus at 0", _job(entrypoint_num_gpus=0)),
    ("gpus negative", _job(entrypoint_num_gpus=-0.5)),
    ("gpus at max", _job(entrypoint_num_gpus=1024)),
    ("gpus over max", _job(entrypoint_num_gpus=1024.5)),
    ("resource 0", _job(entrypoint_resources={"NPU": 0})),
    ("resource at max", _job(entrypoint_resources={"NPU": 1e9})),
    ("resource negative", _job(entrypoint_resources={"NPU": -1})),
    ("resource over max", _job(entrypoint_resources={"NPU": 1e9 + 1})),
    ("resource string", _job(entrypoint_resources={"NPU": "1"})),
    ("metadata", _job(metadata={"k": "v"})),
    ("metadata non-string", _job(metadata={"k": 1})),
    ("metadata 65 entries", _job(metadata={f"k{i}": "v" for i in range(65)})),
    ("label selector", _job(entrypoint_label_selector={"zone": "a"})),
    ("entrypoint empty", _job(entrypoint="")),
    ("entrypoint missing", {"runtime_env": {"working_dir": "/tmp"}}),
    ("entrypoint not string", _job(entrypoint=["echo"])),
    ("runtime_env missing", {"entrypoint": "echo hi"}),
    ("working_dir missing", _job(runtime_env={})),
    ("working_dir empty", _job(env__working_dir="")),
    ("working_dir number", _job(env__working_dir=5)),
    ("working_dir object", _job(env__working_dir={"path": "/tmp"})),
    ("working_dir file uri", _job(env__working_dir="file:///tmp")),
    ("pip list", _job(env__pip=["numpy==1.24"])),
    ("pip object", _job(env__pip={"packages": ["numpy"], "pip_check": False})),
    ("pip object without packages", _job(env__pip={"pip_check": False})),
    ("pip string", _job(env__pip="numpy")),
    ("env_vars", _job(env__env_vars={"A": "1"})),
    ("env_vars non-string", _job(env__env_vars={"A": 1})),
    ("excludes", _job(env__excludes=["*.log"])),
    ("unknown top-level field", _job(entrypoint_num_cpu=1)),
    ("unknown runtime_env field", _job(env__conda={"dependencies": []})),
    ("submission_id plain", _job(submission_id="abc-123")),
    ("submission_id prefixed", _job(submission_id="app-abc-123")),
    ("submission_id upper case", _job(submission_id="ABC")),
    ("submission_id empty", _job(submission_id="")),
    ("submission_id too long", _job(submission_id="a" * 61)),
]


@pytest.mark.parametrize(("what", "body"), AGREEMENT, ids=[a[0] for a in AGREEMENT])
def test_request_schema_agrees_with_validator(app: Any, what: str, body: dict[str, Any]) -> None:
    doc = _doc()
    schema = _inline({"$ref": "#/components/schemas/JobRequest"}, doc)
    result = call(app, "POST", "/api/jobs", body)
    assert result.status in (200, 400), (result.status, result.body[:300])
    server_accepts = result.status == 200
    assert _doc_accepts(schema, body) == server_accepts, (
        f"{what}: the document {'accepts' if _doc_accepts(schema, body) else 'refuses'} {json.dumps(body)[:200]}, "
        f"poolq answered {result.status} {result.body[:300]!r}"
    )


# (header, value, accepted by poolq): headers the document describes.
HEADER_AGREEMENT = [
    ("X-Tenant-Id", "team-a", True),
    ("X-Tenant-Id", "", True),  # docs/api.md: absent or empty = default
    ("X-Tenant-Id", "bad tenant!", False),
    ("X-Tenant-Id", "t" * 65, False),
    ("X-Schedule-Timeout-Ms", "0", True),
    ("X-Schedule-Timeout-Ms", "604800000", True),
    ("X-Schedule-Timeout-Ms", "604800001", False),
    ("X-Schedule-Timeout-Ms", "-1", False),
]


@pytest.mark.parametrize(("name", "value", "accepted"), HEADER_AGREEMENT, ids=[f"{h}={v[:8]!r}" for h, v, _ in HEADER_AGREEMENT])
def test_header_schema_agrees_with_validator(app: Any, name: str, value: str, accepted: bool) -> None:
    doc = _doc()
    result = call(app, "POST", "/api/jobs", _job(), headers={name: value})
    assert (result.status == 200) == accepted, (result.status, result.body[:300])
    schema = _header(doc, "/api/jobs", "post", name)
    # Headers travel as strings: an integer schema is about the value the string spells.
    instance: Any = value
    if schema.get("type") == "integer":
        instance = int(value) if re.fullmatch(r"-?\d+", value) else value
    assert _doc_accepts(schema, instance) == accepted, f"document schema {schema} vs {name}: {value!r} ({'accepted' if accepted else 'refused'} by poolq)"


# -- schemathesis against a live API ----------------------------------------------------------


@dataclass
class LiveAPI:
    url: str
    seeded_jobs: list[str]
    proc: Proc


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/livez", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAPI]:
    """``poolq api`` on a free port, on a Redis of its own (so that the in-process tests'
    key wipes never reach it), with a static node and a few jobs to find."""
    base = tmp_path_factory.mktemp("openapi_live")
    server = EmbeddedRedis(base / "redis", appendonly=False)
    server.start()
    env = {"POOLQ_REDIS_URL": server.url, "POOLQ_DATA_DIR": str(base / "data")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(["api", "--port", str(port)], env, base / "api.log").start()
    try:
        wait_for(lambda: _healthy(url), START_S, 0.1, what="poolq api to answer /livez")
        added = subprocess.run(
            [sys.executable, "-m", "poolq", "nodes", "add", "--id", "st-static", "--pool", "st", "--labels", "gpu,zone=a",
             "--cpus", "2", "--memory", "2Gi", "--resources", "NPU=2"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )
        assert added.returncode == 0, added.stderr
        seeded = []
        extras: list[dict[str, Any]] = [{}, {"metadata": {"k": "v"}, "entrypoint_resources": {"NPU": 1}}, {"entrypoint_num_cpus": 16}]
        for index, extra in enumerate(extras):
            sid = f"app-st-seed-{index}"
            answer = requests.post(f"{url}/api/jobs", json={**_job(submission_id=sid), **extra}, timeout=10)
            assert answer.status_code == 200, answer.text
            seeded.append(sid)
        assert requests.post(f"{url}/api/jobs/{seeded[2]}/stop", timeout=10).json() == {"stopped": True}
        yield LiveAPI(url, seeded, proc)
    finally:
        proc.stop()
        server.stop()


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
def test_live_document_is_the_same(live_api: LiveAPI) -> None:
    served = requests.get(f"{live_api.url}/api/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(document()))


SCHEMA = schemathesis.openapi.from_dict(_doc())


def _steer(case: Any, live: LiveAPI) -> None:
    """Lead positive cases deeper into the API without leaving the document.

    Generated submission ids almost never exist: half of the positive ones are swapped
    for a seeded job's id, so that records, logs, stop and delete answer for real.
    A positive job body gets a working_dir the server can accept (see
    POSITIVE_ACCEPTANCE_INAPPLICABLE), so that submissions, duplicates and batch results
    are exercised too. `Prefer: wait=N` and a wait for changes would hold the answer N s (no placement worker
    here), and a log follow until the job ends.
    """
    from schemathesis.core.parameters import ParameterLocation

    meta = case.meta
    if meta is None:
        return
    path = case.path_parameters or {}
    if "submission_id" in path and not meta.is_negative_at(ParameterLocation.PATH):
        generated = str(path["submission_id"]).encode()
        if zlib.crc32(generated) % 2 == 0:
            path["submission_id"] = live.seeded_jobs[zlib.crc32(generated) // 2 % len(live.seeded_jobs)]
    if case.method == "POST" and case.path in ("/api/jobs", "/api/jobs/batch") and not meta.is_negative_at(ParameterLocation.BODY):
        bodies = [case.body] if case.path == "/api/jobs" else (case.body or {}).get("jobs", []) if isinstance(case.body, dict) else []
        for body in bodies:
            if isinstance(body, dict) and isinstance(body.get("runtime_env"), dict):
                body["runtime_env"]["working_dir"] = "/tmp"
    if case.headers and "wait" in str(case.headers.get("Prefer", "")).lower():
        del case.headers["Prefer"]
    if case.query and "wait" in case.query and not meta.is_negative_at(ParameterLocation.QUERY):
        case.query["wait"] = 0  # a wait for changes would hold the answer as long (tests/test_changes.py waits)
    if case.query and "follow" in case.query and not meta.is_negative_at(ParameterLocation.QUERY):
        case.query["follow"] = "0"  # a follow of a job that never ends never ends (tests/test_streams.py follows)
    tenant = (case.headers or {}).get("X-Tenant-Id")
    if isinstance(tenant, str) and not tenant.isascii():
        # granian hands a header value with non-ASCII bytes to the app as "", which the
        # contract reads as the default tenant (README, "Headers"); keep the negative case
        # negative with a value that reaches the app.
        case.headers["X-Tenant-Id"] = "not a tenant!"


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
@SCHEMA.parametrize()
@hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
def test_schemathesis_live(case: Any, live_api: LiveAPI) -> None:
    _steer(case, live_api)
    excluded = [positive_data_acceptance] if (case.method.upper(), case.path) in POSITIVE_ACCEPTANCE_INAPPLICABLE else []
    if (case.method.upper(), case.path) == ("POST", "/api/jobs/batch"):
        # A batch answers 200 with a result per item, an error for each invalid one
        # (docs/api.md), so an invalid item does not make the request a 400; a batch
        # invalid as a whole is a 400, which tests/test_api.py checks.
        excluded.append(negative_data_rejection)
    if any(name.lower().startswith("x-schemathesis-unknown") for name in case.headers or {}):
        # An undocumented header makes the case "negative" to schemathesis, but HTTP
        # recipients ignore header fields they do not recognise (RFC 9110 5.1); only the
        # rejection check is wrong for such a case, every other check still runs.
        excluded.append(negative_data_rejection)
    if case.path == "/healthz":
        # Its documented 503 says the service cannot place jobs (no placement worker runs
        # here): an answer, not a server error. The body is still checked against its schema.
        excluded.append(not_a_server_error)
    case.call_and_validate(base_url=live_api.url, checks=ALL_CHECKS, excluded_checks=excluded, timeout=20)


# -- a live API with tokens: its 401, 403 and 429 answers are the documented ones -------------


@dataclass
class TokensAPI:
    url: str
    token: str  # tenant team-a
    slow_token: str  # tenant slow, over its request rate


def _poolq(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "poolq", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def tokens_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokensAPI]:
    """``poolq api`` with POOLQ_AUTH=tokens on a Redis of its own; tenant ``slow`` may
    send one request per thousand seconds, and has sent it."""
    base = tmp_path_factory.mktemp("openapi_tokens")
    server = EmbeddedRedis(base / "redis", appendonly=False)
    server.start()
    env = {"POOLQ_REDIS_URL": server.url, "POOLQ_DATA_DIR": str(base / "data"), "POOLQ_AUTH": "tokens"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(["api", "--port", str(port)], env, base / "api.log").start()
    try:
        wait_for(lambda: _healthy(url), START_S, 0.1, what="poolq api (tokens) to answer /healthz")
        token, slow = _poolq(env, "token", "create", "team-a"), _poolq(env, "token", "create", "slow")
        _poolq(env, "quota", "set", "slow", "--rate", "0.001", "--burst", "1")
        first = requests.get(f"{url}/api/jobs", headers={"Authorization": f"Bearer {slow}"}, timeout=10)
        assert first.status_code == 200, first.text  # the one request its bucket held
        yield TokensAPI(url, token, slow)
    finally:
        proc.stop()
        server.stop()


def _operations() -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, ops in _doc()["paths"].items() for method in ops
            if method in HTTP_METHODS and path not in OPEN_ROUTES]


def _case(method: str, path: str, headers: dict[str, str]) -> Any:
    """A request the document allows, but for its credentials."""
    operation = SCHEMA[path][method]
    params = {name: value for name, value in (("submission_id", "app-st-none"), ("protocol", "gcs"),
                                                 ("name", "_ray_pkg_0123456789abcdef.zip")) if "{" + name + "}" in path}
    bodies: dict[tuple[str, str], tuple[Any, str]] = {
        ("POST", "/api/jobs"): (_job(), "application/json"),
        ("POST", "/api/jobs/batch"): ({"jobs": [_job()]}, "application/json"),
        ("PUT", "/api/packages/{protocol}/{name}"): (b"PK\x05\x06" + b"\0" * 18, "application/octet-stream"),
    }
    if (method, path) in bodies:
        body, media_type = bodies[(method, path)]
        return operation.Case(path_parameters=params, headers=headers, body=body, media_type=media_type)
    return operation.Case(path_parameters=params, headers=headers)


CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance]


@pytest.mark.xdist_group("openapi-tokens")
@pytest.mark.processes
@pytest.mark.parametrize(("method", "path"), _operations(), ids=[f"{m} {p}" for m, p in _operations()])
def test_live_auth_and_rate_answers_conform(tokens_api: TokensAPI, method: str, path: str) -> None:
    def sent(headers: dict[str, str], expected: int) -> Any:  # schemathesis's Response: headers lowercase, in lists
        case = _case(method, path, headers)
        answer = case.call(base_url=tokens_api.url, timeout=20)
        assert answer.status_code == expected, (headers, answer.status_code, answer.text[:300])
        case.validate_response(answer, checks=CONFORMANCE)
        assert isinstance(answer.json()["error"], str), answer.text[:300]
        return answer

    for headers in ({}, {"Authorization": "Bearer pq_000000000000_" + "x" * 43}, {"Authorization": "Basic dXNlcg=="}):
        refused = sent(headers, 401)
        assert refused.headers["www-authenticate"] == ['Bearer realm="poolq"']
    sent({"Authorization": f"Bearer {tokens_api.token}", "X-Tenant-Id": "team-b"}, 403)
    if path.startswith(TENANT_ROUTES):
        limited = sent({"Authorization": f"Bearer {tokens_api.slow_token}"}, 429)
        assert int(limited.headers["retry-after"][0]) >= 1, limited.headers


# -- requests a generator seldom makes: still never a 500, always JSON ----------------------------


AWKWARD = [
    ("huge integer", "POST", "/api/jobs", {}, b'{"entrypoint": "x", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_memory": ' + b"9" * 5000 + b"}"),
    ("huge exponent", "POST", "/api/jobs", {}, b'{"entrypoint": "x", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_num_cpus": 1e400}'),
    ("NaN", "POST", "/api/jobs", {}, b'{"entrypoint": "x", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_num_cpus": NaN}'),
    ("deep nesting", "POST", "/api/jobs", {}, b"[" * 100000 + b"]" * 100000),
    ("invalid UTF-8", "POST", "/api/jobs", {}, b'{"entrypoint": "\xff", "runtime_env": {"working_dir": "/tmp"}}'),
    ("lone surrogate", "POST", "/api/jobs", {}, b'{"entrypoint": "\\ud800", "runtime_env": {"working_dir": "/tmp"}}'),
    ("surrogate key", "POST", "/api/jobs", {}, b'{"entrypoint": "x", "runtime_env": {"working_dir": "/tmp"}, "metadata": {"\\ud800": "v"}}'),
    ("NUL entrypoint", "POST", "/api/jobs", {}, b'{"entrypoint": "a\\u0000b", "runtime_env": {"working_dir": "/tmp"}}'),
    ("batch of non-objects", "POST", "/api/jobs/batch", {}, b'{"jobs": [1, "x", null, []]}'),
    ("unicode digits in query", "GET", "/api/jobs?limit=%D9%A1%D9%A0&cursor=%C2%B2", {}, b""),
    ("unicode digits in offset", "GET", "/api/jobs/app-st-seed-0/logs?offset=%C2%B2", {}, b""),
    ("NUL in path", "GET", "/api/jobs/%00", {}, b""),
    ("empty package", "PUT", "/api/packages/gcs/_ray_pkg_0123456789abcdef.zip", {"Content-Type": None}, b""),  # as Ray's SDK: no Content-Type
]


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
@pytest.mark.parametrize(("what", "method", "path", "headers", "body"), AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_requests_get_json_answers(live_api: LiveAPI, what: str, method: str, path: str, headers: dict[str, Any], body: bytes) -> None:
    sent_headers = {"Content-Type": "application/json", **headers}
    try:
        answer = requests.request(method, live_api.url + path, data=body, headers=sent_headers, timeout=20)
    except requests.RequestException as exc:  # e.g. the server refused malformed HTTP: outside the rule
        pytest.skip(f"the HTTP layer refused the request before the app: {exc}")
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), (what, answer.status_code, answer.headers)
    if answer.status_code >= 400:
        assert isinstance(answer.json().get("error"), str), (what, answer.text[:300])


NON_ASCII_HEADERS = [
    ("X-Pool-Label", "gpü"),
    ("X-Schedule-Timeout-Ms", "١٢"),  # Arabic-Indic digits
]


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
@pytest.mark.parametrize(("name", "value"), NON_ASCII_HEADERS, ids=[h for h, _ in NON_ASCII_HEADERS])
def test_non_ascii_header_values_are_refused(live_api: LiveAPI, name: str, value: str) -> None:
    # docs/api.md: a malformed X-Pool-Label / X-Schedule-Timeout-Ms is a 400. granian
    # hands a value with bytes above 0x7F (RFC 9110 obs-text) to the app as "", so poolq
    # refuses an empty value of these headers rather than reading it as absent: the
    # job must not silently lose its pool affinity or its deadline.
    answer = requests.post(f"{live_api.url}/api/jobs", data=json.dumps(_job()).encode(),
                           headers={"Content-Type": "application/json", name: value.encode("utf-8")}, timeout=20)
    assert answer.status_code == 400, f"{name}: {value!r} -> {answer.status_code} {answer.text[:300]}"
    assert name in answer.json().get("fields", {}), answer.text[:300]


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
def test_non_ascii_tenant_reads_as_the_default_tenant_both_ways(live_api: LiveAPI) -> None:
    # An empty X-Tenant-Id means `default` (docs/api.md), and granian hands a non-ASCII
    # value over as empty: such a job is filed under, and found in, the default tenant,
    # consistently (README, "Headers"). With tokens the tenant comes from the token.
    headers = {"Content-Type": "application/json", "X-Tenant-Id": "équipe".encode("utf-8")}
    answer = requests.post(f"{live_api.url}/api/jobs", data=json.dumps(_job()).encode(), headers=headers, timeout=20)
    assert answer.status_code == 200, answer.text[:300]
    submission_id = answer.json()["submission_id"]
    record = requests.get(f"{live_api.url}/api/jobs/{submission_id}", headers={"X-Tenant-Id": "équipe".encode()}, timeout=20)
    assert record.status_code == 200 and record.json()["tenant_id"] == "default"
    assert requests.get(f"{live_api.url}/api/jobs/{submission_id}", timeout=20).status_code == 200


@pytest.mark.xdist_group("openapi-live")
@pytest.mark.processes
def test_long_request_line_with_100_ids(live_api: LiveAPI) -> None:
    # docs/api.md: request lines of at least 8 KiB (100 ids in ids=).
    # Unknown ids are simply absent; 82-character ones make the line pass 8 KiB.
    ids = [f"app-{uuid.uuid4()}-{'x' * 41}" for _ in range(99)] + [live_api.seeded_jobs[0]]
    query = "ids=" + ",".join(ids)
    assert len(query) > 8 * 1024
    answer = requests.get(f"{live_api.url}/api/jobs?{query}", timeout=20)
    assert answer.status_code == 200, answer.text[:300]
    assert [job["submission_id"] for job in answer.json()] == [live_api.seeded_jobs[0]]
