"""Authentication with API tokens (docs/operations.md; docs/errors.md 401 and 403).

With ``auth="tokens"`` every route but ``/healthz`` and ``/livez`` needs ``Authorization: Bearer
<token>``; the tenant comes from the token. The WSGI app runs in-process against the
session's real redis-server; the ``poolq token …`` commands and ``poolq api`` run as
real subprocesses. Only behaviour is asserted: nothing here reads the implementation.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import secrets
import subprocess
import sys
from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import tokens
from poolq.embedded import free_port
from poolq.settings import Settings
from tests import kit
from tests.kit import START_S
from tests.procs import Proc, wait_for
from tests.wsgi import Result, call

JOB = {"entrypoint": "true", "runtime_env": {"working_dir": "/tmp"}}
UNAUTHENTICATED = {"error": "authentication required: send Authorization: Bearer <token>"}
TOKEN_FORM = re.compile(r"^pq_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
CLI_TIMEOUT_S = 60  # a `python -m poolq` command on a busy machine

# Every route and method the API serves except /healthz and /livez, with the body each needs to
# get past its own checks (so that a 401 can only come from the missing token).
PROTECTED = [
    ("POST", "/api/jobs", JOB),
    ("GET", "/api/jobs", None),
    ("GET", "/api/jobs?ids=app-1,app-2", None),
    ("POST", "/api/jobs/", JOB),
    ("POST", "/api/jobs/batch", {"jobs": [JOB]}),
    ("GET", "/api/jobs/app-someone", None),
    ("HEAD", "/api/jobs/app-someone", None),
    ("DELETE", "/api/jobs/app-someone", None),
    ("POST", "/api/jobs/app-someone/stop", None),
    ("GET", "/api/jobs/app-someone/logs", None),
    ("GET", "/api/packages/gcs/_ray_pkg_0123456789abcdef.zip", None),
    ("PUT", "/api/packages/gcs/_ray_pkg_0123456789abcdef.zip", None),
    ("GET", "/api/nodes", None),
    ("GET", "/api/pools", None),
    ("GET", "/api/version", None),
    ("GET", "/api/openapi.json", None),
    ("GET", "/metrics", None),
]


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def tokens_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth="tokens")


@pytest.fixture
def token_app(tokens_settings: Settings) -> App:
    return App(tokens_settings)


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def request(app: App, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Result:
    raw = b"PK\x05\x06" + b"\x00" * 18 if method == "PUT" else None  # an empty zip, for the package route
    return call(app, method, path, body, headers=headers, raw=raw,
                content_type="application/zip" if method == "PUT" else "application/json")


def submit(app: App, headers: dict[str, str], body: dict[str, Any] = JOB) -> str:
    return kit.submit(app, body, headers=headers)


def unknown_token() -> str:
    """A token of the right form that no one created."""
    return f"pq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m poolq <args>`` as a user runs it; waits for it to end."""
    return subprocess.run([sys.executable, "-m", "poolq", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


def assert_unauthenticated(result: Result) -> None:
    assert result.status == 401, (result.status, result.body)
    assert result.headers.get("WWW-Authenticate", "").lower().startswith("bearer"), result.headers
    if result.body:  # HEAD answers carry no body
        assert result.json == UNAUTHENTICATED


# -- 401: one answer for every bad credential -------------------------------------


def bad_credentials(redis_client: redis.Redis) -> dict[str, dict[str, str]]:
    """Header sets that must all be refused alike: missing, unknown, malformed, revoked."""
    good = tokens.create(redis_client, "team-a")
    revoked = tokens.create(redis_client, "team-a")
    assert tokens.revoke(redis_client, revoked)
    token_id = good.split("_")[1]
    return {
        "missing": {},
        "empty header": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "scheme and blank": {"Authorization": "Bearer    "},
        "unknown": bearer(unknown_token()),
        "malformed": bearer("not-a-token"),
        "malformed, right prefix": bearer("pq_zz_short"),
        "right id, wrong secret": bearer(f"pq_{token_id}_{secrets.token_urlsafe(32)}"),
        "right token, one character more": bearer(good + "x"),
        "right token, one character less": bearer(good[:-1]),
        "right token, other scheme": {"Authorization": f"Basic {good}"},
        "right token without a scheme": {"Authorization": good},
        "right token in X-Tenant-Id": {"X-Tenant-Id": good},
        "revoked": bearer(revoked),
    }


def test_every_bad_credential_gets_the_same_401_on_every_protected_route(token_app: App, redis_client: redis.Redis) -> None:
    credentials = bad_credentials(redis_client)
    bodies = set()
    for method, path, body in PROTECTED:
        for name, headers in credentials.items():
            result = request(token_app, method, path, body, headers)
            assert result.status == 401, (method, path, name, result.status, result.body)
            assert_unauthenticated(result)
            if result.body:
                bodies.add(result.body)
    assert len(bodies) == 1, bodies  # byte for byte the same answer
    assert redis_client.keys("poolq:job:*") == []  # nothing was stored by a refused request


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_a_valid_token_opens_every_protected_route(token_app: App, redis_client: redis.Redis, method: str, path: str, body: Any) -> None:
    result = request(token_app, method, path, body, bearer(tokens.create(redis_client, "team-a")))
    assert result.status not in (401, 403, 500), (result.status, result.body)


@pytest.mark.parametrize("path", ["/healthz", "/livez"])
def test_health_needs_no_token(token_app: App, path: str) -> None:
    result = call(token_app, "GET", path)
    # /livez: Redis answers; /healthz is a 503 here (no placement worker, no node), but not a 401.
    assert result.status == (200 if path == "/livez" else 503), result.body
    assert result.json["status"] in ("ok", "unavailable"), result.body


def test_the_bearer_scheme_is_case_insensitive(token_app: App, redis_client: redis.Redis) -> None:
    token = tokens.create(redis_client, "team-a")
    for scheme in ("Bearer", "bearer", "BEARER"):
        result = call(token_app, "GET", "/api/jobs", headers={"Authorization": f"{scheme} {token}"})
        assert result.status == 200, (scheme, result.body)


def test_without_tokens_no_authorization_is_needed(app: App) -> None:
    """The in-process default (loopback settings): auth none."""
    assert app.settings.auth_mode == "none"
    assert call(app, "GET", "/api/jobs").status == 200


# -- the tenant comes from the token ---------------------------------------------------


def test_a_job_belongs_to_the_tenant_of_its_token(token_app: App, redis_client: redis.Redis) -> None:
    token_a, token_b = tokens.create(redis_client, "tenant-a"), tokens.create(redis_client, "tenant-b")
    job = submit(token_app, bearer(token_a), {**JOB, "submission_id": "app-secret-a"})
    record = call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token_a))
    assert record.status == 200 and record.json["tenant_id"] == "tenant-a", record.body

    # Tenant B sees nothing of it, with exactly the answer of an id that does not exist.
    not_found = {"error": f"not found app, submissionId: {job}"}
    for method, path in (("GET", f"/api/jobs/{job}"), ("GET", f"/api/jobs/{job}/logs"),
                         ("POST", f"/api/jobs/{job}/stop"), ("DELETE", f"/api/jobs/{job}")):
        result = call(token_app, method, path, headers=bearer(token_b))
        assert result.status == 404 and result.json == not_found, (method, path, result.status, result.body)
    nobody = call(token_app, "GET", "/api/jobs/app-does-not-exist", headers=bearer(token_b))
    assert nobody.status == 404 and nobody.json == {"error": "not found app, submissionId: app-does-not-exist"}
    for path in ("/api/jobs", f"/api/jobs?ids={job}", "/api/jobs?status=PENDING"):
        listed = call(token_app, "GET", path, headers=bearer(token_b))
        assert listed.status == 200 and listed.json == [], (path, listed.body)
    for path in ("/api/jobs", f"/api/jobs?ids={job}"):
        listed = call(token_app, "GET", path, headers=bearer(token_a))
        assert [r["submission_id"] for r in listed.json] == [job], (path, listed.body)

    # B's stop did nothing to A's job; B may use the same id for a job of its own.
    assert call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token_a)).json["status"] == "PENDING"
    assert submit(token_app, bearer(token_b), {**JOB, "entrypoint": "false", "submission_id": "app-secret-a"}) == job
    mine = call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token_b)).json
    assert (mine["tenant_id"], mine["entrypoint"]) == ("tenant-b", "false")
    theirs = call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token_a)).json
    assert (theirs["tenant_id"], theirs["entrypoint"]) == ("tenant-a", "true")


def test_batch_jobs_belong_to_the_tenant_of_the_token(token_app: App, redis_client: redis.Redis) -> None:
    token_a, token_b = tokens.create(redis_client, "tenant-a"), tokens.create(redis_client, "tenant-b")
    result = call(token_app, "POST", "/api/jobs/batch", {"jobs": [JOB, JOB]}, headers=bearer(token_a))
    assert result.status == 200, result.body
    ids = [item["submission_id"] for item in result.json["results"]]
    listed = call(token_app, "GET", "/api/jobs?ids=" + ",".join(ids), headers=bearer(token_a)).json
    assert sorted(r["submission_id"] for r in listed) == sorted(ids)
    assert {r["tenant_id"] for r in listed} == {"tenant-a"}
    assert call(token_app, "GET", "/api/jobs?ids=" + ",".join(ids), headers=bearer(token_b)).json == []


@pytest.mark.parametrize("named", ["tenant-b", "default", "TENANT-A", "tenant-a "])
def test_x_tenant_id_naming_another_tenant_is_403(token_app: App, redis_client: redis.Redis, named: str) -> None:
    token = tokens.create(redis_client, "tenant-a")
    shown = named.strip()
    for method, path, body in (("POST", "/api/jobs", JOB), ("GET", "/api/jobs", None), ("GET", "/api/jobs/app-x", None),
                               ("POST", "/api/jobs/batch", {"jobs": [JOB]})):
        result = call(token_app, method, path, body, headers=bearer(token, **{"X-Tenant-Id": named}))
        if shown == "tenant-a":
            assert result.status == 200 or result.status == 404, result.body
            continue
        assert result.status == 403, (method, path, result.status, result.body)
        assert result.json == {"error": f"the token's tenant is tenant-a, not {shown}"}
    if shown != "tenant-a":
        assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize("named", ["tenant-a", " tenant-a", ""])
def test_x_tenant_id_naming_the_tokens_tenant_is_fine(token_app: App, redis_client: redis.Redis, named: str) -> None:
    token = tokens.create(redis_client, "tenant-a")
    job = submit(token_app, bearer(token, **{"X-Tenant-Id": named}))
    record = call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token, **{"X-Tenant-Id": named}))
    assert record.status == 200 and record.json["tenant_id"] == "tenant-a", record.body


# -- revocation ----------------------------------------------------------------------


@pytest.mark.processes
def test_revocation_is_effective_at_once_in_every_api_process(tokens_settings: Settings, redis_client: redis.Redis,
                                                               service_env: dict[str, str]) -> None:
    """Two App objects on one Redis stand for two API processes; the CLI revokes."""
    first, second = App(tokens_settings), App(tokens_settings)
    token = tokens.create(redis_client, "tenant-a")
    other = tokens.create(redis_client, "tenant-a")
    job = submit(first, bearer(token))
    for app in (first, second):  # both have seen (and may have cached) the token
        assert call(app, "GET", f"/api/jobs/{job}", headers=bearer(token)).status == 200

    done = cli(service_env, "token", "revoke", token.split("_")[1])
    assert done.returncode == 0, done.stderr

    for app in (first, second):
        for method, path, body in (("GET", f"/api/jobs/{job}", None), ("POST", "/api/jobs", JOB), ("GET", "/api/jobs", None)):
            assert_unauthenticated(call(app, method, path, body, headers=bearer(token)))
        # The tenant's other token still works, and the job is still there.
        assert call(app, "GET", f"/api/jobs/{job}", headers=bearer(other)).status == 200


@pytest.mark.processes
def test_a_new_token_works_at_once_in_every_api_process(tokens_settings: Settings, service_env: dict[str, str]) -> None:
    first, second = App(tokens_settings), App(tokens_settings)
    for app in (first, second):
        assert_unauthenticated(call(app, "GET", "/api/jobs", headers=bearer(unknown_token())))
    created = cli(service_env, "token", "create", "tenant-new")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    job = submit(first, bearer(token))
    assert call(second, "GET", f"/api/jobs/{job}", headers=bearer(token)).json["tenant_id"] == "tenant-new"


# -- the poolq token commands ----------------------------------------------------------


@pytest.mark.processes
def test_token_create_prints_the_token_alone_on_one_line(token_app: App, redis_client: redis.Redis, service_env: dict[str, str]) -> None:
    done = cli(service_env, "token", "create", "team-x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.endswith("\n"), repr(done.stdout)
    token = done.stdout[:-1]
    assert TOKEN_FORM.match(token), repr(token)
    job = submit(token_app, bearer(token))
    assert call(token_app, "GET", f"/api/jobs/{job}", headers=bearer(token)).json["tenant_id"] == "team-x"
    # Redis never holds the token itself (it is shown once, then only its digest is kept).
    for key in redis_client.scan_iter("poolq:token*"):
        kind = redis_client.type(key)
        values = redis_client.hvals(key) if kind == "hash" else list(redis_client.smembers(key)) if kind == "set" else []
        assert not any(token in str(v) or token.split("_", 2)[2] in str(v) for v in values), key


@pytest.mark.processes
def test_two_tokens_are_different(service_env: dict[str, str]) -> None:
    made = {cli(service_env, "token", "create", "team-x").stdout.strip() for _ in range(2)}
    assert len(made) == 2 and all(TOKEN_FORM.match(t) for t in made), made


@pytest.mark.processes
@pytest.mark.parametrize("tenant", ["bad tenant", "a:b", "x" * 65])
def test_token_create_refuses_a_malformed_tenant(service_env: dict[str, str], redis_client: redis.Redis, tenant: str) -> None:
    done = cli(service_env, "token", "create", tenant)
    assert done.returncode != 0 and done.stdout == "", (done.returncode, done.stdout)
    assert done.stderr.strip(), "no message"
    assert list(redis_client.scan_iter("poolq:token*")) == []


@pytest.mark.processes
def test_token_list_shows_tenants_and_ids_never_tokens(service_env: dict[str, str]) -> None:
    made = {tenant: cli(service_env, "token", "create", tenant).stdout.strip() for tenant in ("team-x", "team-y")}
    listed = cli(service_env, "token", "list")
    assert listed.returncode == 0, listed.stderr
    for tenant, token in made.items():
        token_id, secret = token.split("_")[1], token.split("_", 2)[2]
        lines = [line for line in listed.stdout.splitlines() if token_id in line]
        assert len(lines) == 1 and tenant in lines[0].split(), listed.stdout
        assert token not in listed.stdout and secret not in listed.stdout
        assert secret[:12] not in listed.stdout  # not even a prefix of the secret
    assert "team-x" in listed.stdout and "team-y" in listed.stdout


@pytest.mark.processes
@pytest.mark.parametrize("by", ["id", "token"])
def test_token_revoke_by_id_or_by_token(token_app: App, service_env: dict[str, str], by: str) -> None:
    token = cli(service_env, "token", "create", "team-x").stdout.strip()
    keep = cli(service_env, "token", "create", "team-x").stdout.strip()
    assert call(token_app, "GET", "/api/jobs", headers=bearer(token)).status == 200
    done = cli(service_env, "token", "revoke", token.split("_")[1] if by == "id" else token)
    assert done.returncode == 0, done.stderr
    assert_unauthenticated(call(token_app, "GET", "/api/jobs", headers=bearer(token)))
    assert call(token_app, "GET", "/api/jobs", headers=bearer(keep)).status == 200
    listed = cli(service_env, "token", "list").stdout
    assert token.split("_")[1] not in listed and keep.split("_")[1] in listed
    again = cli(service_env, "token", "revoke", token.split("_")[1])
    assert again.returncode != 0 and again.stderr.strip(), (again.returncode, again.stderr)


# -- the default, and the refusal of an open bind ----------------------------------------


@pytest.mark.parametrize(
    ("host", "auth", "mode"),
    [
        ("127.0.0.1", "", "none"),
        ("127.0.0.53", "", "none"),
        ("localhost", "", "none"),
        ("::1", "", "none"),
        ("0.0.0.0", "", "tokens"),
        ("::", "", "tokens"),
        ("10.1.2.3", "", "tokens"),
        ("192.168.0.7", "", "tokens"),
        ("127.0.0.1", "tokens", "tokens"),
        ("0.0.0.0", "none", "none"),
    ],
)
def test_auth_default_is_tokens_unless_loopback(host: str, auth: str, mode: str) -> None:
    assert Settings(host=host, auth=auth).auth_mode == mode
    env = {"POOLQ_HOST": host, **({"POOLQ_AUTH": auth} if auth else {})}
    assert Settings.from_env(env).auth_mode == mode


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def serving(proc: Proc, port: int) -> bool:
    assert proc.alive(), proc.output()
    try:
        return http_get(port, "/livez")[0] == 200
    except OSError:
        return False


def test_open_bind_without_auth_is_refused(start_proc: Any) -> None:
    port = free_port()
    proc = start_proc(["api", "--host", "0.0.0.0", "--port", str(port)], env={"POOLQ_AUTH": "none"})
    assert proc.process.wait(CLI_TIMEOUT_S) == 2, proc.output()
    output = proc.output()
    assert "refusing" in output and "--insecure-no-auth" in output and "0.0.0.0" in output, output
    with pytest.raises(OSError):
        http_get(port, "/livez")


@pytest.mark.parametrize("auth_env", [{"POOLQ_AUTH": "none"}, {}], ids=["POOLQ_AUTH=none", "POOLQ_AUTH unset"])
def test_open_bind_with_insecure_no_auth_serves_without_tokens(start_proc: Any, auth_env: dict[str, str]) -> None:
    port = free_port()
    proc = start_proc(["api", "--host", "0.0.0.0", "--port", str(port), "--workers", "1", "--insecure-no-auth"], env=auth_env)
    wait_for(lambda: serving(proc, port), timeout=START_S, what="poolq api to serve")
    status, body = http_get(port, "/api/jobs")
    assert status == 200 and body == [], (status, body)


def test_open_bind_defaults_to_tokens(start_proc: Any, redis_client: redis.Redis) -> None:
    port = free_port()
    proc = start_proc(["api", "--host", "0.0.0.0", "--port", str(port), "--workers", "1"])
    wait_for(lambda: serving(proc, port), timeout=START_S, what="poolq api to serve")
    status, body = http_get(port, "/api/jobs")
    assert (status, body) == (401, UNAUTHENTICATED)
    token = tokens.create(redis_client, "team-z")
    status, body = http_get(port, "/api/jobs", bearer(token))
    assert (status, body) == (200, [])
    tokens.revoke(redis_client, token)
    assert http_get(port, "/api/jobs", bearer(token)) == (401, UNAUTHENTICATED)


def test_loopback_bind_defaults_to_no_auth(start_proc: Any) -> None:
    port = free_port()
    proc = start_proc(["api", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"])
    wait_for(lambda: serving(proc, port), timeout=START_S, what="poolq api to serve")
    assert http_get(port, "/api/jobs") == (200, [])
