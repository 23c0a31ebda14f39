"""POST /api/jobs and GET /api/jobs/{id} against the contract (docs/api.md, docs/jobs.md).

The WSGI app runs in-process against the session's real redis-server; no placement
worker runs, so every accepted job stays PENDING. Tables list each rule of 2.1 with
the values just inside and just outside its range; every refusal is also checked to
leave no job behind in Redis.
"""

from __future__ import annotations

import copy
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from api_shim.app import App
from poolq import keys
from tests.conftest import SEED_BODY
from tests.kit import MiB
from tests.wsgi import Result, call

MINIMAL = {"entrypoint": "echo hello", "runtime_env": {"working_dir": "/srv/job"}}
DEFAULT_CPUS, DEFAULT_MEMORY, DEFAULT_TIMEOUT_MS = 1, 536870912, 18000
MAX_BODY = 1 * MiB
GENERATED_ID = re.compile(r"^app-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
DROP = object()  # as a value in ``with_value``: remove the field
RECORD_TYPES: dict[str, tuple[type, ...]] = {  # docs/jobs.md, for a job just accepted
    "type": (str,),
    "job_id": (type(None),),
    "submission_id": (str,),
    "entrypoint": (str,),
    "tenant_id": (str,),
    "status": (str,),
    "message": (str,),
    "error_type": (str, type(None)),
    "metadata": (dict,),
    "runtime_env": (dict,),
    "entrypoint_resources": (dict,),
    "entrypoint_label_selector": (dict,),
    "entrypoint_num_cpus": (int, float),
    "entrypoint_num_gpus": (int, float),
    "entrypoint_memory": (int, float),
    "pool_label": (str, type(None)),
    "submit_time": (int,),
    "start_time": (int, type(None)),
    "end_time": (int, type(None)),
    "driver_node_id": (str, type(None)),
    "pool": (str, type(None)),
    "driver_exit_code": (int, type(None)),
    "driver_info": (type(None),),
    "driver_agent_http_address": (type(None),),
    "scheduling": (dict,),
}


# -- helpers -----------------------------------------------------------------


def with_value(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value`` (or removed: DROP)."""
    body = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node.setdefault(part, {})
    if value is DROP:
        node.pop(last, None)
    else:
        node[last] = value
    return body


def at_path(record: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        record = record[part]
    return record


def raw_with_literal(path: str, literal: str, base: dict[str, Any] = MINIMAL) -> bytes:
    """The body as JSON text with the value at ``path`` written as ``literal`` verbatim."""
    text = json.dumps(with_value(base, path, "\x00RAW\x00"))
    return text.replace(json.dumps("\x00RAW\x00"), literal).encode()


def submit(app: App, body: Any = MINIMAL, headers: dict[str, str] | None = None, **kwargs: Any) -> Result:
    return call(app, "POST", "/api/jobs", body, headers=headers, **kwargs)


def record_of(app: App, submission_id: str, tenant: str | None = None) -> dict[str, Any]:
    result = call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": tenant} if tenant else None)
    assert result.status == 200, result.body
    return result.json


def accepted(app: App, body: Any = MINIMAL, headers: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Submit, expect 200 with exactly Ray's two keys, return the stored job record."""
    result = submit(app, body, headers, **kwargs)
    assert result.status == 200, result.body
    assert result.headers["Content-Type"].startswith("application/json")
    answer = result.json
    assert set(answer) == {"submission_id", "job_id"} and answer["job_id"] == answer["submission_id"]
    tenant = (headers or {}).get("X-Tenant-Id")
    return record_of(app, answer["submission_id"], tenant)


def job_keys(redis_client: redis.Redis) -> list[str]:
    return sorted(redis_client.scan_iter("poolq:job:*"))


def assert_refused(result: Result, redis_client: redis.Redis, field: str | None, exact: bool = False) -> None:
    """400 ``{"error": "invalid job request", "fields": {...}}`` naming ``field`` (itself or
    a dotted path below it, unless ``exact``), and nothing stored."""
    assert result.status == 400, result.body
    assert result.headers["Content-Type"].startswith("application/json")
    answer = result.json
    assert set(answer) == {"error", "fields"}, answer
    assert answer["error"] == "invalid job request"
    fields = answer["fields"]
    assert fields and all(
        isinstance(messages, list) and messages and all(isinstance(m, str) and m for m in messages)
        for messages in fields.values()
    ), fields
    if field is not None:
        named = [k for k in fields if k == field or (not exact and k.startswith(field + "."))]
        assert named, f"{field!r} not named in {fields}"
    assert job_keys(redis_client) == []
    assert redis_client.get(keys.SEQ) is None


def assert_error(result: Result, status: int) -> dict[str, Any]:
    assert result.status == status, result.body
    assert result.headers["Content-Type"].startswith("application/json")
    answer = result.json
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"]
    return answer


def many(count: int, key: str = "K{}", value: str = "v") -> dict[str, str]:
    return {key.format(i): value for i in range(count)}


def queued_once(redis_client: redis.Redis, tenant: str, submission_id: str) -> None:
    """The job is stored once, in its tenant's index once, and in its shape's queue once."""
    ref = keys.ref(tenant, submission_id)
    sig = redis_client.hget(keys.job(ref), "shape")
    assert sig, f"no job hash for {ref}"
    assert redis_client.zrange(keys.shape_queue(sig), 0, -1) == [ref]
    assert redis_client.zrange(keys.tenant_jobs(tenant), 0, -1) == [submission_id]


# -- body fields: accepted at both ends of each range -------------------------

ACCEPTED = [
    ("entrypoint", "a" * 16384),
    ("entrypoint", "é" * 8192),  # 16 KiB of UTF-8
    ("entrypoint", "python run.py --flag 'x y'\necho done"),
    ("metadata", {}),
    ("metadata", many(64)),
    ("metadata", {"k" * 256: "v"}),
    ("metadata", {"k": "v" * 4096}),
    ("metadata", {"k": "é" * 2048}),
    ("metadata", {"k": ""}),
    ("runtime_env.working_dir", "/srv/job"),
    ("runtime_env.working_dir", "file:///usr1/deploy/file.zip"),
    ("runtime_env.working_dir", "file:///usr1/deploy/dir"),
    ("runtime_env.working_dir", "file:///usr1/deploy/file.tar.gz"),
    ("runtime_env.working_dir", "file:///usr1/deploy/file.tgz"),
    ("runtime_env.working_dir", "file:///usr1/deploy/file.tar.xz"),
    ("runtime_env.env_vars", {"A": "1", "_x": "", "a_B9": "v", "PATH": "/bin:/usr/bin"}),
    ("runtime_env.env_vars", many(256, "V{}")),
    ("runtime_env.pip", ["numpy==1.24", "scipy==1.11.0"]),
    ("runtime_env.pip", []),
    ("runtime_env.pip", [f"pkg{i}" for i in range(256)]),
    ("runtime_env.pip", {"packages": ["numpy==1.24"], "pip_check": False}),
    ("runtime_env.pip", {"packages": ["numpy"], "pip_check": True, "pip_version": "==23.3.1"}),
    ("runtime_env.excludes", ["*.log", "data/"]),
    ("runtime_env.excludes", []),
    ("entrypoint_num_cpus", 0.3),
    ("entrypoint_num_cpus", 16),
    ("entrypoint_num_cpus", 16.0),
    ("entrypoint_num_cpus", 2.5),
    ("entrypoint_memory", 134217728),
    ("entrypoint_memory", 1125899906842624),
    ("entrypoint_num_gpus", 0),
    ("entrypoint_num_gpus", 0.5),
    ("entrypoint_num_gpus", 1024),
    ("entrypoint_resources", {}),
    ("entrypoint_resources", {"NPU": 0}),
    ("entrypoint_resources", {"NPU": 1e9}),
    ("entrypoint_resources", {"NPU": 0.5, "x.y/z-w_1": 2}),
    ("entrypoint_resources", {"a" * 63: 1}),
    ("entrypoint_resources", {"CPUS": 1, "gpu2": 1, "Memory_fast": 1}),  # only the exact names are reserved
    ("entrypoint_label_selector", {}),
    ("entrypoint_label_selector", {"zone": "a", "k/x.y-z_1": "v.1"}),
]


@pytest.mark.parametrize(("path", "value"), ACCEPTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(ACCEPTED)])
def test_value_at_the_edge_of_its_range_is_accepted_and_recorded(app: App, path: str, value: Any) -> None:
    record = accepted(app, with_value(MINIMAL, path, value))
    assert at_path(record, path) == value


# -- body fields: refused just outside, and wrong types -----------------------

RESERVED_NAMES = ["CPU", "cpu", "Cpu", "memory", "Memory", "MEMORY", "GPU", "gpu", "gPu"]

REFUSED = [
    ("entrypoint", "", "entrypoint"),
    ("entrypoint", "   ", "entrypoint"),
    ("entrypoint", "\n\t ", "entrypoint"),
    ("entrypoint", "a" * 16385, "entrypoint"),
    ("entrypoint", "é" * 8193, "entrypoint"),  # 8193 characters, 16386 bytes
    ("entrypoint", "echo a\x00b", "entrypoint"),
    ("entrypoint", 5, "entrypoint"),
    ("entrypoint", ["echo", "hi"], "entrypoint"),
    ("entrypoint", True, "entrypoint"),
    ("metadata", many(65), "metadata"),
    ("metadata", {"k" * 257: "v"}, "metadata"),
    ("metadata", {"": "v"}, "metadata"),
    ("metadata", {"k": "v" * 4097}, "metadata"),
    ("metadata", {"k": "é" * 2049}, "metadata"),
    ("metadata", {"k": 1}, "metadata"),
    ("metadata", {"k": {"nested": "v"}}, "metadata"),
    ("metadata", ["k"], "metadata"),
    ("metadata", "k=v", "metadata"),
    ("runtime_env", "/srv/job", "runtime_env"),
    ("runtime_env", ["/srv/job"], "runtime_env"),
    ("runtime_env", 5, "runtime_env"),
    ("runtime_env.working_dir", "", "runtime_env.working_dir"),
    ("runtime_env.working_dir", "   ", "runtime_env.working_dir"),
    ("runtime_env.working_dir", 5, "runtime_env.working_dir"),
    ("runtime_env.working_dir", ["/srv/job"], "runtime_env.working_dir"),
    ("runtime_env.working_dir", {"path": "/srv/job"}, "runtime_env.working_dir"),
    ("runtime_env.env_vars", {"1A": "x"}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", {"A-B": "x"}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", {"A B": "x"}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", {"": "x"}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", {"A": 1}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", {"A": True}, "runtime_env.env_vars"),
    ("runtime_env.env_vars", many(257, "V{}"), "runtime_env.env_vars"),
    ("runtime_env.env_vars", ["A=1"], "runtime_env.env_vars"),
    ("runtime_env.pip", "numpy", "runtime_env.pip"),
    ("runtime_env.pip", [1], "runtime_env.pip"),
    ("runtime_env.pip", [f"pkg{i}" for i in range(257)], "runtime_env.pip"),
    ("runtime_env.pip", {"pip_check": False}, "runtime_env.pip"),
    ("runtime_env.pip", {"packages": "numpy"}, "runtime_env.pip"),
    ("runtime_env.pip", {"packages": [f"pkg{i}" for i in range(257)]}, "runtime_env.pip"),
    ("runtime_env.pip", {"packages": ["numpy"], "pip_check": "no"}, "runtime_env.pip"),
    ("runtime_env.pip", {"packages": ["numpy"], "extra": 1}, "runtime_env.pip"),
    ("runtime_env.excludes", "*.log", "runtime_env.excludes"),
    ("runtime_env.excludes", [1], "runtime_env.excludes"),
    ("runtime_env.excludes", {"a": "b"}, "runtime_env.excludes"),
    ("entrypoint_num_cpus", 0.29999, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", 16.00001, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", 0, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", -1, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", True, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", False, "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", "3", "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", [3], "entrypoint_num_cpus"),
    ("entrypoint_num_cpus", {"n": 3}, "entrypoint_num_cpus"),
    ("entrypoint_memory", 134217727, "entrypoint_memory"),
    ("entrypoint_memory", 1125899906842625, "entrypoint_memory"),
    ("entrypoint_memory", 134217728.5, "entrypoint_memory"),
    ("entrypoint_memory", -1, "entrypoint_memory"),
    ("entrypoint_memory", True, "entrypoint_memory"),
    ("entrypoint_memory", "134217728", "entrypoint_memory"),
    ("entrypoint_memory", [134217728], "entrypoint_memory"),
    ("entrypoint_num_gpus", -0.00001, "entrypoint_num_gpus"),
    ("entrypoint_num_gpus", 1024.00001, "entrypoint_num_gpus"),
    ("entrypoint_num_gpus", True, "entrypoint_num_gpus"),
    ("entrypoint_num_gpus", "1", "entrypoint_num_gpus"),
    ("entrypoint_num_gpus", [1], "entrypoint_num_gpus"),
    ("entrypoint_resources", {"NPU": -0.00001}, "entrypoint_resources"),
    ("entrypoint_resources", {"NPU": 1000000000.001}, "entrypoint_resources"),
    ("entrypoint_resources", {"NPU": True}, "entrypoint_resources"),
    ("entrypoint_resources", {"NPU": "1"}, "entrypoint_resources"),
    ("entrypoint_resources", {"NPU": [1]}, "entrypoint_resources"),
    ("entrypoint_resources", {"a" * 64: 1}, "entrypoint_resources"),
    ("entrypoint_resources", {"": 1}, "entrypoint_resources"),
    ("entrypoint_resources", {"a b": 1}, "entrypoint_resources"),
    ("entrypoint_resources", {"a:b": 1}, "entrypoint_resources"),
    ("entrypoint_resources", ["NPU"], "entrypoint_resources"),
    ("entrypoint_resources", 5, "entrypoint_resources"),
    *[("entrypoint_resources", {name: 1}, f"entrypoint_resources.{name}") for name in RESERVED_NAMES],
    ("entrypoint_label_selector", {"zone": 1}, "entrypoint_label_selector"),
    ("entrypoint_label_selector", {"zone": True}, "entrypoint_label_selector"),
    ("entrypoint_label_selector", {"zone": {"in": ["a"]}}, "entrypoint_label_selector"),
    ("entrypoint_label_selector", ["zone"], "entrypoint_label_selector"),
    ("entrypoint_label_selector", "zone=a", "entrypoint_label_selector"),
]


def test_package_working_dir_is_accepted_once_uploaded(app: App, redis_client: redis.Redis) -> None:
    body = with_value(MINIMAL, "runtime_env.working_dir", "gcs://_ray_pkg_0123456789abcdef.zip")
    assert_refused(submit(app, body), redis_client, "runtime_env.working_dir", exact=True)
    redis_client.set(keys.package("default", "_ray_pkg_0123456789abcdef.zip"), "PK\x05\x06" + "\x00" * 18)  # an empty zip
    assert accepted(app, body)["runtime_env"] == body["runtime_env"]


@pytest.mark.parametrize(("path", "value", "field"), REFUSED, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(REFUSED)])
def test_value_outside_its_range_or_of_the_wrong_type_is_refused(
    app: App, redis_client: redis.Redis, path: str, value: Any, field: str
) -> None:
    assert_refused(submit(app, with_value(MINIMAL, path, value)), redis_client, field)


# Number literals as written on the wire: exact decimals, not floats; no fraction or
# exponent for the integer memory; no NaN or Infinity; no unbounded integers.
LITERALS = [
    ("entrypoint_num_cpus", "16.0", 200),
    ("entrypoint_num_cpus", "3e0", 200),
    ("entrypoint_num_cpus", "0.30", 200),
    ("entrypoint_num_cpus", "0.2999999999999999999999", 400),  # a float would round it to 0.3
    ("entrypoint_num_cpus", "16.000000000000000000001", 400),
    ("entrypoint_num_gpus", "1024.0000000000000000001", 400),
    ("entrypoint_resources.NPU", "1e9", 200),
    ("entrypoint_resources.NPU", "1.000000000000000000001e9", 400),
    ("entrypoint_memory", "1.5e8", 400),
    ("entrypoint_memory", "134217728.0", 400),
    ("entrypoint_memory", "134217728.5", 400),
    ("entrypoint_memory", "1342177280e-1", 400),
    ("entrypoint_memory", "1" + "0" * 4999, 400),  # a 5000-digit integer
    ("entrypoint_num_cpus", "1" + "0" * 4999, 400),
    ("entrypoint_num_cpus", "1e999999999", 400),
    ("entrypoint_num_cpus", "NaN", 400),
    ("entrypoint_num_cpus", "Infinity", 400),
    ("entrypoint_resources.NPU", "-Infinity", 400),
]


@pytest.mark.parametrize(("path", "literal", "status"), LITERALS, ids=[f"{p}={lit[:20]}" for p, lit, _ in LITERALS])
def test_number_literals_are_judged_by_their_exact_value(
    app: App, redis_client: redis.Redis, path: str, literal: str, status: int
) -> None:
    result = submit(app, raw=raw_with_literal(path, literal))
    if status == 200:
        assert result.status == 200, result.body
    else:
        assert_refused(result, redis_client, None)


@pytest.mark.parametrize("path", ["entrypoint", "runtime_env", "runtime_env.working_dir"])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_required_field_missing_or_null_is_refused_naming_it(
    app: App, redis_client: redis.Redis, path: str, how: str
) -> None:
    body = with_value(MINIMAL, path, DROP if how == "missing" else None)
    assert_refused(submit(app, body), redis_client, path, exact=True)


NULL_IS_ABSENT = [
    ("metadata", "metadata", {}),
    ("entrypoint_num_cpus", "entrypoint_num_cpus", DEFAULT_CPUS),
    ("entrypoint_memory", "entrypoint_memory", DEFAULT_MEMORY),
    ("entrypoint_num_gpus", "entrypoint_num_gpus", 0),
    ("entrypoint_resources", "entrypoint_resources", {}),
    ("entrypoint_label_selector", "entrypoint_label_selector", {}),
    ("runtime_env.env_vars", "runtime_env", MINIMAL["runtime_env"]),
    ("runtime_env.pip", "runtime_env", MINIMAL["runtime_env"]),
    ("runtime_env.excludes", "runtime_env", MINIMAL["runtime_env"]),
]


@pytest.mark.parametrize(("path", "shown", "expected"), NULL_IS_ABSENT)
def test_null_optional_field_is_treated_as_absent(app: App, path: str, shown: str, expected: Any) -> None:
    record = accepted(app, with_value(MINIMAL, path, None))
    assert at_path(record, shown) == expected


@pytest.mark.parametrize("path", ["submission_id", "job_id"])
def test_null_id_is_treated_as_absent_and_an_id_is_generated(app: App, path: str) -> None:
    record = accepted(app, with_value(MINIMAL, path, None))
    assert GENERATED_ID.match(record["submission_id"]), record["submission_id"]


UNKNOWN = [
    ("entrypoint_num_cpu", "entrypoint_num_cpu"),
    ("jobId", "jobId"),
    ("entrypoint_num_npus", "entrypoint_num_npus"),
    ("_ray_commit", "_ray_commit"),  # only runtime_env ignores _ray keys
    ("_schema", "_schema"),
    ("runtime_env.workingdir", "runtime_env.workingdir"),
    ("runtime_env.conda", "runtime_env.conda"),
    ("runtime_env.env-vars", "runtime_env.env-vars"),
    ("runtime_env._schema", "runtime_env._schema"),
]


@pytest.mark.parametrize(("path", "field"), UNKNOWN)
def test_unknown_field_is_refused_naming_it(app: App, redis_client: redis.Redis, path: str, field: str) -> None:
    assert_refused(submit(app, with_value(MINIMAL, path, 1)), redis_client, field, exact=True)


def test_every_unknown_field_is_named_at_once(app: App, redis_client: redis.Redis) -> None:
    body = with_value(with_value(MINIMAL, "entrypoint_num_cpu", 2), "runtime_env.conda", {"deps": []})
    result = submit(app, body)
    assert_refused(result, redis_client, "entrypoint_num_cpu", exact=True)
    assert "runtime_env.conda" in result.json["fields"]


def test_runtime_env_keys_starting_with_ray_are_accepted_and_ignored(app: App) -> None:
    body = with_value(MINIMAL, "runtime_env._ray_commit", "abc123")
    body["runtime_env"]["_ray_internal"] = {"anything": [1, None, {"x": True}]}
    record = accepted(app, body)
    assert record["runtime_env"]["working_dir"] == MINIMAL["runtime_env"]["working_dir"]


@pytest.mark.parametrize("name", ["\ud800", "bad\udfffname"], ids=["lone-high", "lone-low"])
@pytest.mark.parametrize("path", ["{}", "runtime_env.{}", "metadata.{}", "runtime_env.env_vars.{}"])
def test_lone_surrogate_in_a_field_name_is_a_400_not_a_crash(
    app: App, redis_client: redis.Redis, path: str, name: str
) -> None:
    # JSON may escape a lone surrogate (\ud800); Python decodes it into a str that cannot
    # be encoded back to UTF-8, so echoing the name in the error must not crash.
    raw = json.dumps(with_value(MINIMAL, path.format(name), "v")).encode()  # ensure_ascii escapes it
    assert_refused(submit(app, raw=raw), redis_client, None)


# -- body: shape, encoding, content type, size --------------------------------

BAD_BODIES = [
    (b"", "empty"),
    (b"{", "truncated"),
    (b"{'entrypoint': 'x'}", "single-quotes"),
    (b"[]", "array"),
    (json.dumps([MINIMAL]).encode(), "array-of-job"),
    (b'"echo hi"', "string"),
    (b"42", "number"),
    (b"true", "bool"),
    (b"null", "null"),
    (b'{"entrypoint": "\xff\xfe", "runtime_env": {"working_dir": "/x"}}', "invalid-utf8"),
    (json.dumps(MINIMAL).encode() + b" {}", "trailing-data"),
    (b"[" * 100_000 + b"]" * 100_000, "deep-array"),
    (
        b'{"entrypoint": "x", "runtime_env": {"working_dir": "/x"}, "metadata": '
        + b'{"a":' * 50_000
        + b'"v"'
        + b"}" * 50_001,
        "deep-object",
    ),
    (
        b'{"entrypoint": "x", "runtime_env": {"working_dir": "/x"}, "entrypoint_num_cpus": ' + b"9" * 5000 + b"}",
        "5000-digits",
    ),
]


@pytest.mark.parametrize("raw", [raw for raw, _ in BAD_BODIES], ids=[name for _, name in BAD_BODIES])
def test_a_body_that_is_not_one_json_object_is_400(app: App, redis_client: redis.Redis, raw: bytes) -> None:
    assert_refused(submit(app, raw=raw), redis_client, None)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_content_type_with_parameters_is_accepted(app: App, content_type: str) -> None:
    accepted(app, MINIMAL, content_type=content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "text/json",
        "multipart/form-data; boundary=x",
    ],
)
def test_other_or_missing_content_type_is_415(app: App, redis_client: redis.Redis, content_type: str | None) -> None:
    assert_error(submit(app, MINIMAL, content_type=content_type), 415)
    assert job_keys(redis_client) == []


class ExplodingInput:
    """A wsgi.input that records every read and fails it: the body must not be read."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.reads.append(size)
        raise AssertionError("the body was read")

    readline = read


class EndlessInput:
    """A chunked body that never ends; counts the bytes handed out."""

    def __init__(self) -> None:
        self.given = 0

    def read(self, size: int = -1) -> bytes:
        size = 65536 if size is None or size < 0 else size
        self.given += size
        return b" " * size


def send(app: App, stream: Any, headers: dict[str, str]) -> Result:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/jobs",
        "QUERY_STRING": "",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": stream,
        "CONTENT_TYPE": "application/json",
        **headers,
    }
    captured: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"], captured["headers"] = int(status.split()[0]), dict(response_headers)

    body = b"".join(app(environ, start_response))
    return Result(captured["status"], captured["headers"], body)


@pytest.mark.parametrize("length", [MAX_BODY + 1, 10 * MAX_BODY, 10**15])
def test_body_over_the_limit_is_413_decided_from_content_length_without_reading_it(
    app: App, redis_client: redis.Redis, length: int
) -> None:
    stream = ExplodingInput()
    assert_error(send(app, stream, {"CONTENT_LENGTH": str(length)}), 413)
    assert stream.reads == []
    assert job_keys(redis_client) == []


def test_chunked_body_over_the_limit_is_413_after_reading_little_more_than_the_limit(
    app: App, redis_client: redis.Redis
) -> None:
    stream = EndlessInput()
    assert_error(send(app, stream, {"HTTP_TRANSFER_ENCODING": "chunked"}), 413)
    assert MAX_BODY < stream.given <= 2 * MAX_BODY
    assert job_keys(redis_client) == []


def test_chunked_body_under_the_limit_is_accepted(app: App) -> None:
    result = send(app, io.BytesIO(json.dumps(MINIMAL).encode()), {"HTTP_TRANSFER_ENCODING": "chunked"})
    assert result.status == 200, result.body


def test_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(app: App, redis_client: redis.Redis) -> None:
    text = json.dumps(SEED_BODY).encode()
    exact = text + b" " * (MAX_BODY - len(text))
    assert submit(app, raw=exact).status == 200
    redis_client.delete(*job_keys(redis_client))
    assert_error(submit(app, raw=exact + b" "), 413)
    assert job_keys(redis_client) == []


def test_error_body_names_the_field_with_a_message(app: App) -> None:
    result = submit(
        app, with_value(with_value(MINIMAL, "entrypoint_num_cpus", 100), "runtime_env.env_vars", {"1X": "v"})
    )
    assert result.status == 400
    answer = result.json
    assert answer["error"] == "invalid job request"
    assert set(answer["fields"]) == {"entrypoint_num_cpus", "runtime_env.env_vars.1X"}
    assert "0.3" in answer["fields"]["entrypoint_num_cpus"][0] and "16" in answer["fields"]["entrypoint_num_cpus"][0]


# -- headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "tenant"),
    [
        ({}, "default"),
        ({"X-Tenant-Id": ""}, "default"),
        ({"X-Tenant-Id": "team-a.1_B"}, "team-a.1_B"),
        ({"X-Tenant-Id": "t" * 64}, "t" * 64),
    ],
)
def test_tenant_header_names_the_owner(app: App, headers: dict[str, str], tenant: str) -> None:
    record = accepted(app, MINIMAL, headers)
    assert record["tenant_id"] == tenant


@pytest.mark.parametrize("tenant", ["t" * 65, "a b", "a:b", "a/b", "a*", "\xe9quipe", "a\tb"])
def test_malformed_tenant_is_400(app: App, redis_client: redis.Redis, tenant: str) -> None:
    assert_refused(submit(app, MINIMAL, {"X-Tenant-Id": tenant}), redis_client, "X-Tenant-Id")
    assert_error(call(app, "GET", "/api/jobs/app-1", headers={"X-Tenant-Id": tenant}), 400)


@pytest.mark.parametrize(
    ("header", "stored"),
    [
        (None, None),
        ("gpu", "gpu"),
        ("pool=a", "pool=a"),
        (" a , b=c ", "a,b=c"),
        ("a,unUseAntiOtherLabels", "a,unUseAntiOtherLabels"),
        ("x/y.z-1_2=v.1,other", "x/y.z-1_2=v.1,other"),
        ("k" * 63 + "=" + "v" * 63, "k" * 63 + "=" + "v" * 63),
    ],
)
def test_pool_label_is_recorded_trimmed(app: App, header: str | None, stored: str | None) -> None:
    record = accepted(app, MINIMAL, {"X-Pool-Label": header} if header is not None else None)
    assert record["pool_label"] == stored


@pytest.mark.parametrize(
    "header", ["a,,b", "a,", ",a", " , ", "a=", "=b", "a=b=c", "a b", "k" * 64, "a=" + "v" * 64, "a;b", "a=b c", "\xe9"]
)
def test_malformed_pool_label_is_400(app: App, redis_client: redis.Redis, header: str) -> None:
    assert_refused(submit(app, MINIMAL, {"X-Pool-Label": header}), redis_client, "X-Pool-Label")


@pytest.mark.parametrize(
    ("header", "timeout"), [(None, DEFAULT_TIMEOUT_MS), ("0", 0), ("1", 1), ("18000", 18000), ("604800000", 604800000)]
)
def test_schedule_timeout_sets_the_deadline(app: App, header: str | None, timeout: int) -> None:
    record = accepted(app, MINIMAL, {"X-Schedule-Timeout-Ms": header} if header is not None else None)
    expected = None if timeout == 0 else record["submit_time"] + timeout
    assert record["scheduling"]["deadline"] == expected


@pytest.mark.parametrize(
    "header", ["604800001", "-1", "1.5", "abc", "1e3", "0x10", "99999999999", "18000ms", "\xb2", "1\xb2"]
)
def test_malformed_schedule_timeout_is_400(app: App, redis_client: redis.Redis, header: str) -> None:
    assert_refused(submit(app, MINIMAL, {"X-Schedule-Timeout-Ms": header}), redis_client, "X-Schedule-Timeout-Ms")


# -- submission_id and job_id ---------------------------------------------------


def test_absent_id_is_generated_as_app_and_a_canonical_uuid4(app: App) -> None:
    ids = {accepted(app, MINIMAL)["submission_id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(GENERATED_ID.match(i) for i in ids), ids


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"submission_id": "1234"}, "app-1234"),
        ({"submission_id": "app-1234"}, "app-1234"),
        ({"submission_id": "app-0-a-b-"}, "app-0-a-b-"),
        ({"submission_id": "a" * 60}, "app-" + "a" * 60),
        ({"submission_id": "app-" + "a" * 60}, "app-" + "a" * 60),
        ({"submission_id": "-"}, "app--"),
        ({"job_id": "1234"}, "app-1234"),
        ({"job_id": "app-1234"}, "app-1234"),
        ({"submission_id": "app-1234", "job_id": "app-1234"}, "app-1234"),
        ({"submission_id": "1234", "job_id": "app-1234"}, "app-1234"),
    ],
)
def test_given_id_is_prefixed_when_needed(app: App, body: dict[str, str], expected: str) -> None:
    result = submit(app, {**MINIMAL, **body})
    assert result.status == 200, result.body
    assert result.json == {"submission_id": expected, "job_id": expected}
    assert record_of(app, expected)["submission_id"] == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("submission_id", ""),
        ("submission_id", "app-"),
        ("submission_id", "ABC"),
        ("submission_id", "app-ABC"),
        ("submission_id", "APP-1234"),
        ("submission_id", "a_b"),
        ("submission_id", "a b"),
        ("submission_id", "a.b"),
        ("submission_id", "a/b"),
        ("submission_id", "a:b"),
        ("submission_id", "é"),
        ("submission_id", "a" * 61),
        ("submission_id", "app-" + "a" * 61),
        ("submission_id", 1234),
        ("submission_id", ["app-1"]),
        ("job_id", "ABC"),
        ("job_id", "a" * 61),
        ("job_id", 1234),
    ],
)
def test_malformed_id_is_400(app: App, redis_client: redis.Redis, field: str, value: Any) -> None:
    assert_refused(submit(app, {**MINIMAL, field: value}), redis_client, field)


def test_job_id_different_from_submission_id_is_400(app: App, redis_client: redis.Redis) -> None:
    result = submit(app, {**MINIMAL, "submission_id": "app-1", "job_id": "app-2"})
    assert_refused(result, redis_client, None)
    assert {"job_id", "submission_id"} & set(result.json["fields"])


def test_path_ids_are_never_prefixed(app: App) -> None:
    assert submit(app, {**MINIMAL, "submission_id": "1234"}).json["submission_id"] == "app-1234"
    result = call(app, "GET", "/api/jobs/1234")
    assert result.status == 404
    assert result.json == {"error": "not found app, submissionId: 1234"}
    assert record_of(app, "app-1234")["submission_id"] == "app-1234"


# -- idempotent resubmission ------------------------------------------------------

SAME_REQUEST = [
    ("identical", {}, {}, {}, {}),
    ("cpus-3-vs-3.0", {"entrypoint_num_cpus": 3}, {}, {"entrypoint_num_cpus": 3.0}, {}),
    ("cpus-absent-vs-default", {}, {}, {"entrypoint_num_cpus": DEFAULT_CPUS}, {}),
    ("cpus-absent-vs-null", {}, {}, {"entrypoint_num_cpus": None}, {}),
    ("memory-absent-vs-default", {}, {}, {"entrypoint_memory": DEFAULT_MEMORY}, {}),
    ("gpus-absent-vs-0", {}, {}, {"entrypoint_num_gpus": 0}, {}),
    ("gpus-0-vs-0.0", {"entrypoint_num_gpus": 0}, {}, {"entrypoint_num_gpus": 0.0}, {}),
    ("metadata-absent-vs-empty", {}, {}, {"metadata": {}}, {}),
    ("metadata-order", {"metadata": {"a": "1", "b": "2"}}, {}, {"metadata": {"b": "2", "a": "1"}}, {}),
    ("job-id-folded", {}, {}, {"submission_id": DROP, "job_id": "app-dup"}, {}),
    ("id-unprefixed", {}, {}, {"submission_id": "dup"}, {}),
    ("ray-private-key", {}, {}, {"runtime_env": {**MINIMAL["runtime_env"], "_ray_commit": "x"}}, {}),
    ("pool-label-trimmed", {}, {"X-Pool-Label": "a,b=c"}, {}, {"X-Pool-Label": " a , b=c "}),
    ("tenant-empty-vs-absent", {}, {}, {}, {"X-Tenant-Id": ""}),
]


@pytest.mark.parametrize(
    ("first", "first_headers", "second", "second_headers"),
    [row[1:] for row in SAME_REQUEST],
    ids=[row[0] for row in SAME_REQUEST],
)
def test_the_same_request_again_is_an_idempotent_retry(
    app: App,
    redis_client: redis.Redis,
    first: dict[str, Any],
    first_headers: dict[str, str],
    second: dict[str, Any],
    second_headers: dict[str, str],
) -> None:
    base = {**MINIMAL, "submission_id": "app-dup"}
    bodies = [{k: v for k, v in {**base, **changes}.items() if v is not DROP} for changes in (first, second)]
    answers = [submit(app, body, headers) for body, headers in zip(bodies, (first_headers, second_headers))]
    for answer in answers:
        assert answer.status == 200, answer.body
        assert answer.json == {"submission_id": "app-dup", "job_id": "app-dup"}
    assert job_keys(redis_client) == [keys.job(keys.ref("default", "app-dup"))]
    assert redis_client.get(keys.SEQ) == "1"
    queued_once(redis_client, "default", "app-dup")


DIFFERENT_REQUEST = [
    ("entrypoint", {"entrypoint": "echo other"}, {}),
    ("cpus", {"entrypoint_num_cpus": 2}, {}),
    ("memory", {"entrypoint_memory": 134217728}, {}),
    ("gpus", {"entrypoint_num_gpus": 1}, {}),
    ("resources", {"entrypoint_resources": {"NPU": 1}}, {}),
    ("selector", {"entrypoint_label_selector": {"zone": "a"}}, {}),
    ("metadata", {"metadata": {"a": "1"}}, {}),
    ("working-dir", {"runtime_env": {"working_dir": "/elsewhere"}}, {}),
    ("env-vars", {"runtime_env": {**MINIMAL["runtime_env"], "env_vars": {"A": "1"}}}, {}),
    ("pool-label", {}, {"X-Pool-Label": "a"}),
    ("schedule-timeout", {}, {"X-Schedule-Timeout-Ms": "1000"}),
    # Absent means "the tenant's default, else the service's", whatever it is by then.
    ("schedule-timeout-named", {}, {"X-Schedule-Timeout-Ms": str(DEFAULT_TIMEOUT_MS)}),
]


@pytest.mark.parametrize(
    ("changes", "headers"), [row[1:] for row in DIFFERENT_REQUEST], ids=[row[0] for row in DIFFERENT_REQUEST]
)
def test_a_different_request_with_the_same_id_is_409(
    app: App, redis_client: redis.Redis, changes: dict[str, Any], headers: dict[str, str]
) -> None:
    base = {**MINIMAL, "submission_id": "dup"}
    first = record_of(app, submit(app, base).json["submission_id"])
    result = submit(app, {**base, **changes}, headers)
    assert result.status == 409, result.body
    assert result.json == {"error": "submit job has already exist, submissionId: app-dup"}
    assert record_of(app, "app-dup") == first
    assert redis_client.get(keys.SEQ) == "1"
    queued_once(redis_client, "default", "app-dup")


def test_concurrent_identical_submissions_make_one_job(app: App, redis_client: redis.Redis) -> None:
    threads = 100
    barrier = threading.Barrier(threads)

    def one(_: int) -> Result:
        barrier.wait(timeout=30)
        return submit(app, SEED_BODY)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(threads)))
    assert [r.status for r in results] == [200] * threads
    assert {r.body for r in results} == {b'{"submission_id":"app-1234","job_id":"app-1234"}'}
    assert job_keys(redis_client) == [keys.job(keys.ref("default", "app-1234"))]
    assert redis_client.get(keys.SEQ) == "1"
    queued_once(redis_client, "default", "app-1234")


def test_the_same_id_in_two_tenants_makes_two_jobs(app: App, redis_client: redis.Redis) -> None:
    one = accepted(app, SEED_BODY, {"X-Tenant-Id": "one"})
    two = accepted(app, {**SEED_BODY, "entrypoint": "echo two"}, {"X-Tenant-Id": "two"})
    assert (one["tenant_id"], one["entrypoint"]) == ("one", SEED_BODY["entrypoint"])
    assert (two["tenant_id"], two["entrypoint"]) == ("two", "echo two")
    assert len(job_keys(redis_client)) == 2
    queued_once(redis_client, "one", "app-1234")
    queued_once(redis_client, "two", "app-1234")


# -- the job record and reading it back -------------------------------------------


def test_record_has_every_field_typed_with_defaults_applied(app: App) -> None:
    before = int(time.time() * 1000)
    record = accepted(app, MINIMAL)
    after = int(time.time() * 1000)
    assert set(RECORD_TYPES) <= set(record), set(RECORD_TYPES) - set(record)
    for name, types in RECORD_TYPES.items():
        assert isinstance(record[name], types) and not isinstance(record[name], bool), (name, record[name])
    assert record["type"] == "SUBMISSION"
    assert record["status"] == "PENDING" and record["message"].strip()
    assert record["error_type"] is None and record["pool_label"] is None
    assert record["tenant_id"] == "default" and record["entrypoint"] == MINIMAL["entrypoint"]
    assert record["runtime_env"] == MINIMAL["runtime_env"]
    assert (record["entrypoint_num_cpus"], record["entrypoint_memory"], record["entrypoint_num_gpus"]) == (
        DEFAULT_CPUS,
        DEFAULT_MEMORY,
        0,
    )
    assert record["metadata"] == record["entrypoint_resources"] == record["entrypoint_label_selector"] == {}
    assert before - 5000 <= record["submit_time"] <= after + 5000  # Redis's clock, same machine
    for name in ("start_time", "end_time", "driver_node_id", "pool", "driver_exit_code"):
        assert record[name] is None, name
    scheduling = record["scheduling"]
    assert set(scheduling) >= {"attempts", "deadline", "reasons"}
    assert scheduling["attempts"] == 0 and scheduling["reasons"] == []
    assert scheduling["deadline"] == record["submit_time"] + DEFAULT_TIMEOUT_MS


def test_seed_example_is_accepted_as_is(app: App) -> None:
    result = submit(app, SEED_BODY)
    assert result.status == 200
    assert result.json == {"submission_id": "app-1234", "job_id": "app-1234"}
    record = record_of(app, "app-1234")
    for name in (
        "entrypoint",
        "metadata",
        "runtime_env",
        "entrypoint_num_cpus",
        "entrypoint_memory",
        "entrypoint_resources",
    ):
        assert record[name] == SEED_BODY[name], name
    assert record["entrypoint_num_gpus"] == 0


def test_another_tenants_job_is_404_like_an_unknown_id(app: App) -> None:
    accepted(app, SEED_BODY, {"X-Tenant-Id": "owner"})
    foreign = call(app, "GET", "/api/jobs/app-1234", headers={"X-Tenant-Id": "other"})
    default = call(app, "GET", "/api/jobs/app-1234")
    unknown = call(app, "GET", "/api/jobs/app-1234", headers={"X-Tenant-Id": "nobody"})
    assert foreign.status == default.status == unknown.status == 404
    assert foreign.body == default.body == unknown.body
    assert unknown.json == {"error": "not found app, submissionId: app-1234"}
    assert record_of(app, "app-1234", "owner")["tenant_id"] == "owner"


# -- routes ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api", "/api/job", "/api/jobs/a/b/c", "/api/versions", "/healthz/x"])
def test_unknown_route_is_404_json(app: App, path: str) -> None:
    assert_error(call(app, "GET", path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/jobs", {"POST"}),
        ("PATCH", "/api/jobs/", {"POST"}),
        ("POST", "/api/jobs/app-1", {"GET"}),
        ("PUT", "/api/version", {"GET"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_known_route_with_another_method_is_405_with_allow(app: App, method: str, path: str, allowed: set[str]) -> None:
    result = call(app, method, path, MINIMAL)
    assert_error(result, 405)
    allow = {m.strip() for m in result.headers["Allow"].split(",")}
    assert allowed <= allow and method not in allow


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/api/jobs", "POST"),
        ("/api/jobs/", "POST"),
        ("/api/jobs/app-1", "GET"),
        ("/api/version", "GET"),
        ("/healthz", "GET"),
    ],
)
def test_options_is_204_with_allow(app: App, path: str, method: str) -> None:
    result = call(app, "OPTIONS", path, content_type=None)
    assert result.status == 204
    assert result.body == b""
    assert method in {m.strip() for m in result.headers["Allow"].split(",")}


def test_trailing_slash_is_accepted(app: App) -> None:
    result = call(app, "POST", "/api/jobs/", SEED_BODY)
    assert result.status == 200 and result.json["submission_id"] == "app-1234"
    assert call(app, "GET", "/api/jobs/app-1234/").json["submission_id"] == "app-1234"
    assert call(app, "GET", "/api/version/").status == 200


def test_version_shape(app: App) -> None:
    result = call(app, "GET", "/api/version")
    assert result.status == 200 and result.headers["Content-Type"].startswith("application/json")
    answer = result.json
    # Ray's Jobs API level: 4 with log streaming, where `poolq api` serves tails beside the app
    # (tests/test_log_tail.py); an App on its own, as here, serves none: 0, so Ray's CLI does not try.
    assert answer["version"] == "0"
    assert tuple(int(p) for p in answer["ray_version"].split(".")[:2]) >= (2, 0)
    assert isinstance(answer["poolq_version"], str) and answer["poolq_version"]


def test_livez_is_200_json_while_redis_answers(app: App) -> None:
    result = call(app, "GET", "/livez")
    assert result.status == 200 and result.json == {"status": "ok"}


# -- no input makes a 500 ----------------------------------------------------------

JSON_TEXT = st.text(st.characters(codec=None), max_size=12) | st.sampled_from(  # lone surrogates included
    ["", " ", "\x00", "\ud800", "_schema", "_ray_x", "app-1234", "1234", "CPU", "NPU", "/srv/job", "é" * 3000]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from([*SEED_BODY, "job_id", "entrypoint_num_gpus", "entrypoint_label_selector"]) | JSON_TEXT
ENV_NAMES = st.sampled_from(["working_dir", "env_vars", "pip", "excludes", "_ray_x"]) | JSON_TEXT
HEADER_TEXT = (  # WSGI carries header values as latin-1 text
    st.text(st.characters(max_codepoint=255), max_size=24)
    | st.sampled_from(["", "default", "a,b=c", " a , ,b", "unUseAntiOtherLabels", "0", "604800000", "18000"])
    | st.integers(-(10**12), 10**12).map(str)
)
HEADERS = st.fixed_dictionaries(
    {}, optional={"X-Tenant-Id": HEADER_TEXT, "X-Pool-Label": HEADER_TEXT, "X-Schedule-Timeout-Ms": HEADER_TEXT}
)


@st.composite
def seed_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """The seed body with fields dropped, replaced by random JSON and added, at both levels."""
    body = copy.deepcopy(SEED_BODY)
    for level, names in ((body, FIELD_NAMES), (body["runtime_env"], ENV_NAMES)):
        for name in draw(st.sets(st.sampled_from(sorted(level)))):
            del level[name]
        level.update(draw(st.dictionaries(names, JSON_VALUES, max_size=3)))
    return body


@pytest.mark.slow
@hsettings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=JSON_VALUES | seed_mutations(), headers=HEADERS)
def test_no_input_makes_a_500(app: App, body: Any, headers: dict[str, str]) -> None:
    try:
        result = submit(app, raw=json.dumps(body).encode(), headers=headers)
    except Exception as exc:  # the app must answer, not raise into the server
        raise AssertionError(f"the app raised {exc!r} instead of answering") from exc
    assert result.status != 500, result.body
    answer = result.json
    if result.status == 200:
        assert set(answer) == {"submission_id", "job_id"}
    else:
        assert result.status in (400, 409), result.body
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str)
