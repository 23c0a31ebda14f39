"""The HTTP API beyond submit-one (docs/api.md-2.5) and queue publishing (docs/api.md).

Most tests call the WSGI app in-process against the session's real redis-server; those
that need placement (or the poolq.submit consumer) run it in the test's process
(``placement``), those that need RUNNING jobs start a real ``poolq node``, and those
about what only a socket shows start a real ``poolq api``. Every deadline is functional,
with a generous margin: other suites share the two cores.
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis
from celery import Celery

from api_shim.app import App
from poolq.embedded import EmbeddedRedis, free_port
from poolq.settings import Settings
from tests import kit
from tests.kit import SETTLE_S, GiB, Placement, add_node, record, stop, wait_status
from tests.procs import Proc, wait_for
from tests.wsgi import Result, call

MINIMAL = {"entrypoint": "echo hello", "runtime_env": {"working_dir": "/srv/job"}}
NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="next"')
GENERATED_UUID_ID = re.compile(r"^app-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
AGENT_ENV = {"POOLQ_STOP_GRACE_S": "1", "POOLQ_DRAIN_S": "1", "POOLQ_HEARTBEAT_S": "0.5"}


# -- helpers -------------------------------------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    """MINIMAL with ``fields`` set on top."""
    return {**copy.deepcopy(MINIMAL), **fields}


def tenant_headers(tenant: str | None) -> dict[str, str]:
    return {"X-Tenant-Id": tenant} if tenant is not None else {}


def submit(app: App, job: dict[str, Any] | None = None, *, tenant: str | None = None,
           headers: dict[str, str] | None = None) -> str:
    return kit.submit(app, job or MINIMAL, tenant=tenant, headers=headers)


def submit_batch(app: App, jobs: list[Any], *, tenant: str | None = None, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return kit.submit_batch(app, jobs, tenant=tenant, headers=headers)


def submit_many(app: App, count: int, *, tenant: str | None = None, headers: dict[str, str] | None = None) -> list[str]:
    """``count`` jobs through POST /api/jobs/batch; their ids in submission order."""
    ids: list[str] = []
    while len(ids) < count:
        results = submit_batch(app, [MINIMAL] * min(1000, count - len(ids)), tenant=tenant, headers=headers)
        assert all("submission_id" in r for r in results), [r for r in results if "submission_id" not in r][:3]
        ids += [r["submission_id"] for r in results]
    return ids


def get(app: App, submission_id: str, tenant: str | None = None, headers: dict[str, str] | None = None) -> Result:
    return call(app, "GET", f"/api/jobs/{submission_id}", headers={**tenant_headers(tenant), **(headers or {})})



def listed(app: App, query: str = "", tenant: str | None = None) -> list[str]:
    """The submission ids of one GET /api/jobs page, in the order given."""
    result = call(app, "GET", "/api/jobs" + (f"?{query}" if query else ""), headers=tenant_headers(tenant))
    assert result.status == 200, result.body
    return [r["submission_id"] for r in result.json]


def walk(app: App, path: str, tenant: str | None = None, max_pages: int = 5000) -> tuple[list[str], int]:
    """Follow the Link rel="next" headers from ``path``; all ids seen and the page count."""
    ids: list[str] = []
    pages = 0
    next_path: str | None = path
    while next_path is not None:
        result = call(app, "GET", next_path, headers=tenant_headers(tenant))
        assert result.status == 200, (next_path, result.body)
        ids += [r["submission_id"] for r in result.json]
        pages += 1
        assert pages <= max_pages, f"more than {max_pages} pages: the Link header never ends"
        link = NEXT_LINK.search(result.headers.get("Link", ""))
        next_path = link.group(1) if link else None
    return ids, pages



def node_view(app: App, node_id: str) -> dict[str, Any]:
    result = call(app, "GET", "/api/nodes")
    assert result.status == 200, result.body
    found = [n for n in result.json if n["node_id"] == node_id]
    assert len(found) == 1, result.json
    return dict(found[0])


def pool_view(app: App, pool: str) -> dict[str, Any]:
    result = call(app, "GET", "/api/pools")
    assert result.status == 200, result.body
    found = [p for p in result.json if p["pool"] == pool]
    assert len(found) == 1, result.json
    return dict(found[0])


def job_count(redis_client: redis.Redis) -> int:
    return sum(1 for _ in redis_client.scan_iter("poolq:job:*", count=1000))


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def static_node(admin: Any) -> Callable[..., None]:
    """Add a static node (no agent: placed jobs stay PENDING with driver_node_id)."""

    def add(node_id: str = "n1", *, pool: str = "p", labels: dict[str, str | None] | None = None,
            cpus: Any = 4, memory: int = 8 * GiB, gpus: Any = 0, resources: dict[str, Any] | None = None) -> None:
        add_node(admin, node_id, cpus, memory, pool=pool, labels=labels, gpus=gpus, resources=resources)

    return add


@pytest.fixture
def consumer(start_placement: Callable[..., Placement]) -> Placement:
    """Placement in the test's process with its consumer of the poolq.submit queue (worker/intake.py)."""
    return start_placement(intake=True)


@pytest.fixture
def agent_node(start_proc: Callable[..., Proc], placement: Placement, app: App) -> Proc:
    """Placement in the test's process and a real node agent ``n1`` (4 CPUs, 4 GiB), registered and live."""
    proc = start_proc(["node", "--id", "n1", "--cpus", "4", "--memory", "4Gi"], env=AGENT_ENV, name="node-n1")

    def live() -> bool:
        assert proc.alive(), f"poolq node exited:\n{proc.output()}"
        nodes = call(app, "GET", "/api/nodes").json
        return any(n["node_id"] == "n1" and n["alive"] for n in nodes)

    wait_for(live, SETTLE_S, what="node agent n1 to register")
    return proc


@pytest.fixture
def api_server(start_proc: Callable[..., Proc]) -> Callable[..., int]:
    """Start a real ``poolq api`` (one server process) and return its port once /livez answers."""

    def start(env: dict[str, str] | None = None, workers: int = 1) -> int:
        port = free_port()
        proc = start_proc(["api", "--port", str(port), "--workers", str(workers)], env=env, name=f"api-{port}")

        def healthy() -> bool:
            assert proc.alive(), f"poolq api exited:\n{proc.output()}"
            try:
                return http_request(port, "GET", "/livez", timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(healthy, SETTLE_S, interval=0.1, what="poolq api to answer /livez")
        return port

    return start


def http_request(port: int, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None,
                 timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection to a real server: status, headers (lower-cased
    names), decoded JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if payload is None else json.dumps(payload).encode()
        all_headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        headers_out = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers_out, (json.loads(raw) if raw else None)
    finally:
        conn.close()


@pytest.fixture
def publisher(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Celery]:
    """A plain Celery app, nothing of poolq: what a queue publisher would use."""
    redis_client.delete("poolq.submit")  # no message an earlier (failed) test left unconsumed
    app = Celery(broker=redis_server.url)
    yield app
    app.close()


def publish(publisher: Celery, task_id: str | None = None, **kwargs: Any) -> str:
    """Send ``poolq.submit`` with these kwargs; returns the Celery message id."""
    sent = publisher.send_task("poolq.submit", queue="poolq.submit", kwargs=kwargs, task_id=task_id)
    return str(sent.id)


# -- routes, methods and answers -----------------------------------------------------


@pytest.mark.parametrize("path", ["/api/jobs", "/api/nodes", "/api/pools", "/api/version", "/livez", "/api/openapi.json"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_get_routes_answer_json_with_or_without_a_trailing_slash(app: App, path: str, slash: str) -> None:
    result = call(app, "GET", path + slash)
    assert result.status == 200, result.body
    assert result.headers["Content-Type"].startswith("application/json")
    assert isinstance(result.json, (dict, list))


def test_unknown_route_is_a_json_404(app: App) -> None:
    result = call(app, "GET", "/api/nothing-here")
    assert result.status == 404
    assert result.headers["Content-Type"].startswith("application/json") and "error" in result.json


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/jobs", {"GET", "POST"}),
        ("DELETE", "/api/jobs", {"GET", "POST"}),
        ("GET", "/api/jobs/batch", {"POST"}),
        ("POST", "/api/jobs/app-x", {"GET", "DELETE"}),
        ("GET", "/api/jobs/app-x/stop", {"POST"}),
        ("DELETE", "/api/jobs/app-x/logs", {"GET"}),
        ("POST", "/api/nodes", {"GET"}),
        ("DELETE", "/api/pools", {"GET"}),
        ("POST", "/api/packages/gcs/_ray_pkg_abc.zip", {"GET", "PUT"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_a_method_a_route_does_not_serve_is_405_with_allow(app: App, method: str, path: str, allowed: set[str]) -> None:
    result = call(app, method, path, {} if method in ("POST", "PUT") else None)
    assert result.status == 405, result.body
    assert "error" in result.json
    allow = {m.strip() for m in result.headers["Allow"].split(",")}
    assert allowed <= allow and method not in allow


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/batch", "/api/jobs/app-x", "/api/jobs/app-x/stop", "/api/nodes"])
def test_options_is_204_with_allow(app: App, path: str) -> None:
    result = call(app, "OPTIONS", path)
    assert result.status == 204
    assert "OPTIONS" in {m.strip() for m in result.headers["Allow"].split(",")}


def test_submit_stop_delete_and_logs_answer_exactly_the_keys_rays_sdk_expects(app: App) -> None:
    submitted = call(app, "POST", "/api/jobs", MINIMAL)
    assert submitted.status == 200 and set(submitted.json) == {"submission_id", "job_id"}
    submission_id = submitted.json["submission_id"]
    assert submitted.json["job_id"] == submission_id

    logs = call(app, "GET", f"/api/jobs/{submission_id}/logs")
    assert logs.status == 200 and logs.json == {"logs": ""}

    stopped = stop(app, submission_id)
    assert stopped.status == 200 and stopped.json == {"stopped": True}
    assert record(app, submission_id)["status"] == "STOPPED"
    again = stop(app, submission_id)
    assert again.status == 200 and again.json == {"stopped": False}

    deleted = call(app, "DELETE", f"/api/jobs/{submission_id}")
    assert deleted.status == 200 and deleted.json == {"deleted": True}


# -- tenants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/jobs/{id}"),
        ("POST", "/api/jobs/{id}/stop"),
        ("DELETE", "/api/jobs/{id}"),
        ("GET", "/api/jobs/{id}/logs"),
        ("GET", "/api/jobs/{id}/logs?offset=0"),
    ],
)
def test_another_tenants_job_is_not_found_and_left_alone(app: App, method: str, path: str) -> None:
    owned = submit(app, body(submission_id="app-shared"), tenant="team-a")
    stop(app, submit(app, body(submission_id="app-done"), tenant="team-a"), tenant="team-a")  # a terminal one too

    for target in (owned, "app-done"):
        foreign = call(app, method, path.format(id=target), headers={"X-Tenant-Id": "team-b"})
        missing = call(app, method, path.format(id="app-never-submitted"), headers={"X-Tenant-Id": "team-b"})
        assert foreign.status == missing.status == 404, (foreign.body, missing.body)
        # The same answer as for an id that does not exist: nothing is leaked.
        assert foreign.json == {"error": f"not found app, submissionId: {target}"}
        assert missing.json == {"error": "not found app, submissionId: app-never-submitted"}

    # The owner's jobs are untouched by the other tenant's stop and delete.
    assert record(app, owned, "team-a")["status"] == "PENDING"
    assert record(app, "app-done", "team-a")["status"] == "STOPPED"


def test_the_same_id_in_two_tenants_names_two_jobs(app: App) -> None:
    submit(app, body(submission_id="app-twin", entrypoint="echo a"), tenant="team-a")
    submit(app, body(submission_id="app-twin", entrypoint="echo b"), tenant="team-b")
    assert record(app, "app-twin", "team-a")["entrypoint"] == "echo a"
    assert record(app, "app-twin", "team-b")["entrypoint"] == "echo b"
    assert stop(app, "app-twin", "team-b").json == {"stopped": True}
    assert record(app, "app-twin", "team-a")["status"] == "PENDING"
    assert record(app, "app-twin", "team-b")["status"] == "STOPPED"


@pytest.mark.parametrize("header", [None, ""])
def test_an_absent_or_empty_tenant_header_is_the_default_tenant(app: App, header: str | None) -> None:
    submission_id = submit(app, tenant=header)
    assert record(app, submission_id, "default")["tenant_id"] == "default"
    assert submission_id in listed(app, tenant=header)


def test_another_tenants_jobs_are_absent_from_lists_and_ids(app: App) -> None:
    mine = submit_many(app, 3, tenant="team-a")
    theirs = submit_many(app, 3, tenant="team-b")
    stop(app, theirs[0], "team-b")

    for query in ("", "status=PENDING", "status=STOPPED", "limit=1000"):
        assert not set(listed(app, query, "team-a")) & set(theirs), query
    assert set(listed(app, "", "team-a")) == set(mine)
    assert listed(app, "ids=" + ",".join(theirs), "team-a") == []
    assert listed(app, "", "team-c") == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/jobs"), ("GET", "/api/jobs/app-x"), ("POST", "/api/jobs/app-x/stop"),
                                              ("DELETE", "/api/jobs/app-x"), ("GET", "/api/jobs/app-x/logs")])
def test_a_malformed_tenant_header_is_400(app: App, method: str, path: str) -> None:
    result = call(app, method, path, headers={"X-Tenant-Id": "team a/../b"})
    assert result.status == 400, result.body
    assert "error" in result.json


# -- listing: filters, limits, errors ------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=BOGUS", "status"),
        ("status=", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("limit=%C2%B2", "limit"),  # "²" is a Unicode digit, not an integer
        ("limit=99999999999999999999999999", "limit"),
        ("cursor=x", "cursor"),
        ("cursor=0", "cursor"),
        ("cursor=-5", "cursor"),
        ("cursor=%C2%B2", "cursor"),
        ("cursor=99999999999999999999999999", "cursor"),
        ("ids=" + ",".join(f"app-{i}" for i in range(101)), "ids"),
    ],
)
def test_a_bad_list_query_is_400_naming_the_parameter(app: App, query: str, field: str) -> None:
    result = call(app, "GET", f"/api/jobs?{query}")
    assert result.status == 400, result.body
    assert field in result.json["fields"], result.json
    assert isinstance(result.json["error"], str) and result.json["error"]


def test_every_bad_list_parameter_is_named_at_once(app: App) -> None:
    result = call(app, "GET", "/api/jobs?status=NOPE&limit=0&cursor=x")
    assert result.status == 400
    assert {"status", "limit", "cursor"} <= set(result.json["fields"])


@pytest.mark.parametrize(("query", "field"), [("offset=abc", "offset"), ("offset=-1", "offset"), ("offset=%C2%B2", "offset")])
def test_a_bad_logs_offset_is_400(app: App, query: str, field: str) -> None:
    submission_id = submit(app)
    result = call(app, "GET", f"/api/jobs/{submission_id}/logs?{query}")
    assert result.status == 400, result.body
    assert field in result.json["fields"]


def test_list_is_newest_first(app: App) -> None:
    ids = [submit(app, body(entrypoint=f"echo {i}")) for i in range(5)]
    ids += submit_many(app, 5)
    assert listed(app) == ids[::-1]


@pytest.mark.parametrize("limit", [1, 4, 9, 10])
def test_limit_caps_the_page_and_links_the_rest(app: App, limit: int) -> None:
    ids = submit_many(app, 9)
    result = call(app, "GET", f"/api/jobs?limit={limit}")
    assert result.status == 200
    assert [r["submission_id"] for r in result.json] == ids[::-1][:limit]
    assert ("Link" in result.headers) == (limit < 9), result.headers


def test_the_default_limit_is_100(app: App) -> None:
    ids = submit_many(app, 101)
    result = call(app, "GET", "/api/jobs")
    assert [r["submission_id"] for r in result.json] == ids[::-1][:100]
    assert NEXT_LINK.search(result.headers.get("Link", ""))


@pytest.mark.slow
@pytest.mark.parametrize("limit", [None, 1000, 333])
def test_paging_2500_jobs_by_the_link_header_returns_each_once_newest_first(app: App, limit: int | None) -> None:
    ids = submit_many(app, 2500, tenant="pager")
    first = "/api/jobs" + ("" if limit is None else f"?limit={limit}")
    seen, pages = walk(app, first, "pager")
    assert len(seen) == len(set(seen)) == 2500
    assert seen == ids[::-1]
    assert pages == -(-2500 // (limit or 100))


def test_the_page_boundary_holds_while_new_jobs_arrive(app: App) -> None:
    ids = submit_many(app, 10)
    first = call(app, "GET", "/api/jobs?limit=4")
    later = submit_many(app, 3)  # newer than every listed job: must not appear on later pages
    rest, _ = walk(app, NEXT_LINK.search(first.headers["Link"]).group(1))  # type: ignore[union-attr]
    assert [r["submission_id"] for r in first.json] + rest == ids[::-1]
    assert not set(rest) & set(later)


@pytest.mark.parametrize(("status", "limit"), [("PENDING", 7), ("PENDING", 1000), ("STOPPED", 3), ("STOPPED", 1000)])
def test_status_filter_pages_through_exactly_the_jobs_in_that_status(app: App, status: str, limit: int) -> None:
    ids = submit_many(app, 30)
    stopped = ids[::3]
    for submission_id in stopped:
        assert stop(app, submission_id).json == {"stopped": True}
    expected = [i for i in ids[::-1] if (i in stopped) == (status == "STOPPED")]
    seen, _ = walk(app, f"/api/jobs?status={status}&limit={limit}")
    assert seen == expected


def test_status_filter_over_every_status(app: App, agent_node: Proc, tmp_path: Path) -> None:
    """PENDING and RUNNING come from the active index, the terminal ones from the main one."""

    def run(entrypoint: str, **fields: Any) -> str:
        job = {"entrypoint": entrypoint, "runtime_env": {"working_dir": str(tmp_path)}, **fields}
        return submit(app, job, tenant="filters", headers={"X-Schedule-Timeout-Ms": "0"})

    succeeded = run("true")
    failed = run("exit 3")
    running = run("sleep 60")
    pending = run("true", entrypoint_num_cpus=16)  # more than the node has: waits forever
    stopped = run("true", entrypoint_num_cpus=16)
    assert stop(app, stopped, "filters").json == {"stopped": True}
    wait_status(app, succeeded, "SUCCEEDED", tenant="filters")
    wait_status(app, failed, "FAILED", tenant="filters")
    wait_status(app, running, "RUNNING", tenant="filters")

    expected = {"PENDING": [pending], "RUNNING": [running], "SUCCEEDED": [succeeded], "FAILED": [failed], "STOPPED": [stopped]}
    assert {status: listed(app, f"status={status}", "filters") for status in expected} == expected
    everything = [succeeded, failed, running, pending, stopped]
    assert listed(app, "", "filters") == everything[::-1]
    assert listed(app, "ids=" + ",".join(everything) + "&status=RUNNING", "filters") == [running]

    assert stop(app, running, "filters").json == {"stopped": True}
    wait_status(app, running, "STOPPED", tenant="filters")
    assert listed(app, "status=RUNNING", "filters") == []
    assert listed(app, "status=STOPPED", "filters") == [stopped, running]  # newest first by submission


def test_pool_label_filter(app: App) -> None:
    gpu = submit(app, headers={"X-Pool-Label": "gpu"})
    spaced = submit(app, headers={"X-Pool-Label": " gpu , fast "})
    cpu = submit(app, headers={"X-Pool-Label": "cpu"})
    unlabelled = submit(app)
    assert listed(app, "pool_label=gpu") == [gpu]
    assert listed(app, "pool_label=gpu%2Cfast") == [spaced]  # terms trimmed, as the record shows
    assert listed(app, "pool_label=cpu") == [cpu]
    assert listed(app, "pool_label=nowhere") == []
    assert listed(app) == [unlabelled, cpu, spaced, gpu]
    assert listed(app, f"ids={gpu},{cpu},{unlabelled}&pool_label=cpu") == [cpu]


def test_pool_label_filter_pages(app: App) -> None:
    labelled = []
    for _ in range(5):
        labelled += submit_many(app, 7, headers={"X-Pool-Label": "gpu"})
        submit_many(app, 13)
    seen, pages = walk(app, "/api/jobs?pool_label=gpu&limit=4")
    assert seen == labelled[::-1]
    assert pages >= 9


# -- ids=: the batch status read -------------------------------------------------------


def test_ids_reads_the_callers_jobs_and_omits_unknown_and_foreign_ids(app: App) -> None:
    mine = submit_many(app, 3, tenant="team-a")
    foreign = submit(app, tenant="team-b")
    asked = [mine[0], "app-unknown", foreign, mine[2], mine[0]]
    result = call(app, "GET", "/api/jobs?ids=" + ",".join(asked), headers={"X-Tenant-Id": "team-a"})
    assert result.status == 200
    assert sorted(r["submission_id"] for r in result.json) == sorted([mine[0], mine[2]])
    assert all(r["tenant_id"] == "team-a" for r in result.json)
    assert foreign not in result.body.decode()


def test_ids_accepts_100_ids(app: App) -> None:
    ids = submit_many(app, 100)
    result = call(app, "GET", "/api/jobs?ids=" + ",".join(ids))
    assert result.status == 200, result.body
    assert sorted(r["submission_id"] for r in result.json) == sorted(ids)


def test_a_real_server_takes_100_long_ids_and_answers_304(api_server: Callable[..., int], app: App) -> None:
    ids = [f"app-{i:03d}-" + "x" * 55 for i in range(100)]  # 64 characters each
    for start in range(0, 100, 50):
        assert all("submission_id" in r for r in submit_batch(app, [body(submission_id=i) for i in ids[start:start + 50]]))
    port = api_server()
    # 100 ids of 64 characters are 6.5 KB; percent-encoding the separators and the first
    # ids whole (as a client may) takes the request line past the 8 KiB docs/api.md names.
    encoded = [("".join(f"%{b:02X}" for b in i.encode()) if n < 16 else i) for n, i in enumerate(ids)]
    path = "/api/jobs?ids=" + "%2C".join(encoded)
    assert 8 * 1024 < len(f"GET {path} HTTP/1.1") < 9 * 1024
    status, _, records = http_request(port, "GET", path)
    assert status == 200
    assert sorted(r["submission_id"] for r in records) == sorted(ids)

    # ETag and 304 survive the real server too.
    status, headers, _ = http_request(port, "GET", f"/api/jobs/{ids[0]}")
    assert status == 200 and headers["etag"]
    status, headers, payload = http_request(port, "GET", f"/api/jobs/{ids[0]}", headers={"If-None-Match": headers["etag"]})
    assert status == 304 and payload is None


# -- batch submission -----------------------------------------------------------------


def test_batch_answers_per_item_in_request_order_and_accepts_the_valid_ones(app: App, redis_client: redis.Redis) -> None:
    items: list[Any] = [
        body(submission_id="app-first"),
        {"entrypoint": "", "runtime_env": {"working_dir": "/srv"}},  # empty entrypoint
        body(),  # no id: one is generated
        "not an object",
        body(entrypoint_num_cpus=99),  # out of range
        body(submission_id="app-last", metadata={"k": "v"}),
    ]
    results = submit_batch(app, items)
    assert len(results) == len(items)
    assert results[0] == {"submission_id": "app-first"}
    assert set(results[1]) == {"error", "fields"} and "entrypoint" in results[1]["fields"]
    assert set(results[2]) == {"submission_id"} and re.fullmatch(r"app-[0-9a-f-]{36}", results[2]["submission_id"])
    assert set(results[3]) == {"error", "fields"}
    assert set(results[4]) == {"error", "fields"} and "entrypoint_num_cpus" in results[4]["fields"]
    assert results[5] == {"submission_id": "app-last"}

    accepted = [results[i]["submission_id"] for i in (0, 2, 5)]
    assert sorted(listed(app)) == sorted(accepted)
    assert listed(app) == accepted[::-1]  # stored in request order
    assert record(app, "app-last")["metadata"] == {"k": "v"}
    assert job_count(redis_client) == 3


def test_batch_headers_apply_to_every_item(app: App) -> None:
    results = submit_batch(app, [MINIMAL] * 3, tenant="team-x", headers={"X-Pool-Label": "gpu", "X-Schedule-Timeout-Ms": "0"})
    for result in results:
        job = record(app, result["submission_id"], "team-x")
        assert (job["tenant_id"], job["pool_label"], job["scheduling"]["deadline"]) == ("team-x", "gpu", None)


def test_a_batch_of_1000_makes_1000_jobs(app: App, redis_client: redis.Redis) -> None:
    results = submit_batch(app, [body(entrypoint=f"echo {i}") for i in range(1000)])
    ids = [r["submission_id"] for r in results]
    assert len(set(ids)) == 1000
    assert job_count(redis_client) == 1000
    assert record(app, ids[617])["entrypoint"] == "echo 617"
    seen, _ = walk(app, "/api/jobs?limit=1000")
    assert seen == ids[::-1]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"jobs": [MINIMAL] * 1001}, id="1001-jobs"),
        pytest.param([MINIMAL], id="a-list"),
        pytest.param({"jobs": MINIMAL}, id="jobs-not-a-list"),
        pytest.param({"jobs": [MINIMAL], "extra": 1}, id="extra-key"),
        pytest.param({}, id="empty-object"),
        pytest.param(MINIMAL, id="a-single-job"),
        pytest.param("jobs", id="a-string"),
        pytest.param(None, id="null"),
    ],
)
def test_a_batch_not_shaped_jobs_list_of_at_most_1000_is_400_and_stores_nothing(app: App, redis_client: redis.Redis, payload: Any) -> None:
    result = call(app, "POST", "/api/jobs/batch", raw=json.dumps(payload).encode())
    assert result.status == 400, result.body
    assert "error" in result.json and "fields" in result.json
    assert job_count(redis_client) == 0


def test_a_batch_over_the_batch_body_limit_is_413_and_stores_nothing(settings: Settings, redis_client: redis.Redis) -> None:
    # The batch limit, not the single-job one, applies to a batch.
    app = App(dataclasses.replace(settings, max_batch_body=4096, max_body=256))
    fits = json.dumps({"jobs": [MINIMAL] * 40}).encode()
    assert 256 < len(fits) <= 4096
    assert call(app, "POST", "/api/jobs/batch", raw=fits).status == 200
    too_big = call(app, "POST", "/api/jobs/batch", raw=json.dumps({"jobs": [MINIMAL] * 80}).encode())
    assert too_big.status == 413 and "error" in too_big.json
    assert job_count(redis_client) == 40


def test_a_batch_needs_json(app: App) -> None:
    assert call(app, "POST", "/api/jobs/batch", raw=b'{"jobs": [', content_type="application/json").status == 400
    assert call(app, "POST", "/api/jobs/batch", {"jobs": []}, content_type="text/plain").status == 415


def test_an_empty_batch_is_an_empty_answer(app: App) -> None:
    assert submit_batch(app, []) == []


def test_the_same_id_twice_with_the_same_body_in_a_batch_is_one_job(app: App, redis_client: redis.Redis) -> None:
    results = submit_batch(app, [body(submission_id="app-dup"), body(submission_id="app-dup")])
    assert results == [{"submission_id": "app-dup"}, {"submission_id": "app-dup"}]
    assert listed(app) == ["app-dup"]
    assert job_count(redis_client) == 1


def test_the_same_id_twice_with_different_bodies_in_a_batch_refuses_the_second(app: App) -> None:
    results = submit_batch(app, [body(submission_id="app-dup", entrypoint="echo 1"),
                                 body(submission_id="app-dup", entrypoint="echo 2"), body()])
    assert results[0] == {"submission_id": "app-dup"}
    assert "submission_id" not in results[1]
    assert "already exist" in results[1]["error"] and "app-dup" in results[1]["error"]
    assert "submission_id" in results[2]
    assert record(app, "app-dup")["entrypoint"] == "echo 1"


def test_a_batch_item_may_retry_a_job_already_stored(app: App) -> None:
    submit(app, body(submission_id="app-old"))
    results = submit_batch(app, [body(submission_id="app-old"), body(submission_id="app-old", entrypoint="changed")])
    assert results[0] == {"submission_id": "app-old"}
    assert "already exist" in results[1]["error"]


# -- ETag and 304 ---------------------------------------------------------------------


def test_get_answers_304_to_a_matching_etag_and_a_new_etag_after_a_change(app: App) -> None:
    submission_id = submit(app)
    first = get(app, submission_id)
    etag = first.headers["ETag"]
    assert first.status == 200 and etag

    not_modified = get(app, submission_id, headers={"If-None-Match": etag})
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.headers["ETag"] == etag
    assert get(app, submission_id).headers["ETag"] == etag  # stable while nothing changes

    assert stop(app, submission_id).json == {"stopped": True}
    changed = get(app, submission_id, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.json["status"] == "STOPPED"
    assert changed.headers["ETag"] != etag
    assert get(app, submission_id, headers={"If-None-Match": changed.headers["ETag"]}).status == 304


@pytest.mark.parametrize(
    ("header", "status"),
    [("{etag}", 304), ("W/{etag}", 304), ('"other", {etag}', 304), ("*", 304), ('"other"', 200), ("", 200)],
)
def test_if_none_match_forms(app: App, header: str, status: int) -> None:
    submission_id = submit(app)
    etag = get(app, submission_id).headers["ETag"]
    assert get(app, submission_id, headers={"If-None-Match": header.format(etag=etag)}).status == status


def test_etags_differ_between_jobs_and_tenants(app: App) -> None:
    one = submit(app, body(submission_id="app-e"), tenant="team-a")
    two = submit(app, body(submission_id="app-e"), tenant="team-b")
    assert one == two
    etag_a = get(app, one, "team-a").headers["ETag"]
    # team-b's job has an ETag of its own, and team-a's ETag reveals nothing about it.
    assert get(app, two, "team-b", headers={"If-None-Match": etag_a}).status == 200
    assert get(app, one, "team-c", headers={"If-None-Match": etag_a}).status == 404


# -- stop and delete ------------------------------------------------------------------


def test_delete_of_a_pending_job_is_409_and_leaves_it(app: App) -> None:
    submission_id = submit(app)
    result = call(app, "DELETE", f"/api/jobs/{submission_id}")
    assert result.status == 409 and "error" in result.json
    assert record(app, submission_id)["status"] == "PENDING"


def test_delete_of_a_running_job_is_409_and_leaves_it(app: App, agent_node: Proc, tmp_path: Path) -> None:
    submission_id = submit(app, {"entrypoint": "sleep 60", "runtime_env": {"working_dir": str(tmp_path)}})
    wait_status(app, submission_id, "RUNNING")
    result = call(app, "DELETE", f"/api/jobs/{submission_id}")
    assert result.status == 409 and "error" in result.json
    assert record(app, submission_id)["status"] == "RUNNING"
    assert stop(app, submission_id).json == {"stopped": True}
    wait_status(app, submission_id, "STOPPED")
    assert call(app, "DELETE", f"/api/jobs/{submission_id}").json == {"deleted": True}


def test_delete_of_a_finished_job_removes_it_everywhere_and_frees_the_id(app: App) -> None:
    submission_id = submit(app, body(submission_id="app-gone"))
    kept = submit(app)
    stop(app, submission_id)
    assert call(app, "DELETE", f"/api/jobs/{submission_id}").json == {"deleted": True}

    assert get(app, submission_id).status == 404
    assert call(app, "GET", f"/api/jobs/{submission_id}/logs").status == 404
    assert listed(app) == [kept]
    assert listed(app, "status=STOPPED") == []
    assert listed(app, f"ids={submission_id},{kept}") == [kept]
    again = call(app, "DELETE", f"/api/jobs/{submission_id}")
    assert again.status == 404 and again.json == {"error": f"not found app, submissionId: {submission_id}"}
    # After DELETE the id may be used again, for a different request.
    assert submit(app, body(submission_id="app-gone", entrypoint="echo again")) == "app-gone"
    assert record(app, "app-gone")["entrypoint"] == "echo again"


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/jobs/{id}"), ("POST", "/api/jobs/{id}/stop"),
                                              ("DELETE", "/api/jobs/{id}"), ("GET", "/api/jobs/{id}/logs")])
def test_an_unknown_id_is_404_everywhere(app: App, method: str, path: str) -> None:
    result = call(app, method, path.format(id="app-nope"))
    assert result.status == 404
    assert result.json == {"error": "not found app, submissionId: app-nope"}


def test_paths_are_never_prefixed(app: App) -> None:
    submit(app, body(submission_id="1234"))
    assert get(app, "app-1234").status == 200
    assert get(app, "1234").json == {"error": "not found app, submissionId: 1234"}


# -- Prefer: wait -----------------------------------------------------------------------


def test_prefer_wait_answers_once_the_job_is_placed(app: App, static_node: Callable[..., None], placement: Placement) -> None:
    static_node("n1", cpus=4)
    result = call(app, "POST", "/api/jobs", body(submission_id="app-waited"), headers={"Prefer": "wait=50"})
    assert result.status == 200, result.body
    assert result.json == {"submission_id": "app-waited", "job_id": "app-waited"}
    assert "wait" in result.headers.get("Preference-Applied", "")
    job = record(app, "app-waited")
    assert job["status"] == "PENDING" and job["driver_node_id"] == "n1" and job["pool"] == "p"


@pytest.mark.parametrize(
    ("node_cpus", "reason_lines"),
    [
        (2, "\t1 unit with [CPU: Out Of Capacity] requirements: [CPU: 3000m].\n"),
        (None, "\t0 unit with [No Available Node].\n"),
    ],
    ids=["too-small-node", "no-node"],
)
def test_prefer_wait_answers_503_with_the_scheduling_message_when_placement_fails(
    app: App, static_node: Callable[..., None], placement: Placement, node_cpus: int | None, reason_lines: str
) -> None:
    if node_cpus is not None:
        static_node("n1", cpus=node_cpus)
    result = call(app, "POST", "/api/jobs", body(submission_id="app-too-big", entrypoint_num_cpus=3),
                  headers={"Prefer": "wait=50", "X-Schedule-Timeout-Ms": "2000"})
    assert result.status == 503, result.body
    assert set(result.json) == {"error"}
    error = result.json["error"]
    assert error.startswith("create app failed, submissionId:[app-too-big], err: \n"
                            "the instance cannot be scheduled within 2000 ms. "), error
    assert re.search(r"which has been scheduled for \d+ times\. The latest failure: no available resource that meets "
                     r"the request requirements, The reasons are as follows:\n", error), error
    assert error.endswith(reason_lines), error
    job = record(app, "app-too-big")
    assert (job["status"], job["error_type"], job["message"]) == ("FAILED", "SCHEDULE_TIMEOUT", error)
    # It left the active index for the main one.
    assert "app-too-big" not in listed(app, "status=PENDING")
    assert listed(app, "status=FAILED") == ["app-too-big"]


def test_prefer_wait_that_ends_first_answers_200_and_the_job_goes_on(app: App) -> None:
    # No placement worker runs: the job cannot be placed while the request waits.
    started = time.monotonic()
    result = call(app, "POST", "/api/jobs", body(submission_id="app-patient"), headers={"Prefer": "wait=1"})
    assert result.status == 200, result.body
    assert result.json == {"submission_id": "app-patient", "job_id": "app-patient"}
    assert time.monotonic() - started >= 0.9  # it did wait (a lower bound, not a speed check)
    job = record(app, "app-patient")
    assert job["status"] == "PENDING" and job["driver_node_id"] is None


def test_waiting_submissions_do_not_starve_other_requests(api_server: Callable[..., int], admin: Any,
                                                          start_placement: Callable[..., Placement]) -> None:
    """POOLQ_MAX_WAITERS submissions wait; the rest answer at once; GETs are still served."""
    max_waiters = 8
    extra = 4
    # Fewer server threads than waiting submissions: without the cap they would take them all.
    port = api_server({"POOLQ_MAX_WAITERS": str(max_waiters), "POOLQ_API_THREADS": str(max_waiters + 2)})
    answers: dict[str, tuple[int, dict[str, str], Any]] = {}

    def submit_and_wait(submission_id: str) -> None:
        answers[submission_id] = http_request(port, "POST", "/api/jobs", body(submission_id=submission_id),
                                              {"Prefer": "wait=60", "X-Schedule-Timeout-Ms": "0"}, timeout=120)

    ids = [f"app-waiter-{i}" for i in range(max_waiters + extra)]
    threads = [threading.Thread(target=submit_and_wait, args=(i,), daemon=True) for i in ids]
    for thread in threads:
        thread.start()
    # Nothing places yet, so only the requests beyond the cap can answer.
    wait_for(lambda: len(answers) >= extra, SETTLE_S, what=f"{extra} submissions beyond the cap to answer")
    assert len(answers) == extra, f"more answered than the cap allows: {sorted(answers)}"
    for status, headers, payload in answers.values():
        assert status == 200 and set(payload) == {"submission_id", "job_id"}
        assert "preference-applied" not in headers

    waiting = [i for i in ids if i not in answers]
    assert len(waiting) == max_waiters
    health = http_request(port, "GET", "/livez", timeout=SETTLE_S)
    polled = http_request(port, "GET", f"/api/jobs/{waiting[0]}", timeout=SETTLE_S)
    listed_page = http_request(port, "GET", "/api/jobs?limit=5", timeout=SETTLE_S)
    assert health[0] == 200 and health[2]["status"] == "ok"
    assert polled[0] == 200 and polled[2]["status"] == "PENDING"
    assert listed_page[0] == 200 and len(listed_page[2]) == 5
    assert sorted(i for i in ids if i not in answers) == sorted(waiting), "the waiting requests ended too early"

    # Now let them be placed: every waiting request answers 200, with Preference-Applied.
    add_node(admin, "n1", cpus=16, memory=16 * GiB)
    start_placement()
    for thread in threads:
        thread.join(90)
    assert sorted(answers) == sorted(ids)
    for submission_id in waiting:
        status, headers, payload = answers[submission_id]
        assert status == 200 and payload == {"submission_id": submission_id, "job_id": submission_id}
        assert "preference-applied" in headers


# -- packages ---------------------------------------------------------------------------


def test_package_upload_then_use(app: App) -> None:
    path = "/api/packages/gcs/_ray_pkg_0123abcd.zip"
    assert call(app, "GET", path).status == 404
    put = call(app, "PUT", path, raw=b"PK\x05\x06" + b"\x00" * 18, content_type=None)
    assert put.status == 200, put.body
    assert call(app, "GET", path).status == 200
    job = body(runtime_env={"working_dir": "gcs://_ray_pkg_0123abcd.zip"})
    assert record(app, submit(app, job))["runtime_env"]["working_dir"] == "gcs://_ray_pkg_0123abcd.zip"


def test_a_package_over_the_limit_is_413(settings: Settings) -> None:
    app = App(dataclasses.replace(settings, max_package_bytes=1024))
    path = "/api/packages/gcs/_ray_pkg_big.zip"
    too_big = call(app, "PUT", path, raw=b"x" * 1025, content_type=None)
    assert too_big.status == 413 and "error" in too_big.json
    assert call(app, "GET", path).status == 404
    assert call(app, "PUT", path, raw=b"x" * 1024, content_type=None).status == 200
    assert call(app, "GET", path).status == 200


@pytest.mark.parametrize("path", ["/api/packages/gcs/evil.zip", "/api/packages/s3/_ray_pkg_abc.zip",
                                  "/api/packages/gcs/_ray_pkg_abc.tar", "/api/packages/gcs/_ray_pkg_.zip",
                                  "/api/packages/gcs/_ray_pkg_a%20b.zip"])
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_bad_package_name_is_400(app: App, path: str, method: str) -> None:
    result = call(app, method, path, raw=b"zipbytes", content_type=None)
    assert result.status == 400, result.body
    assert "error" in result.json


def test_submitting_a_package_never_uploaded_is_400(app: App, redis_client: redis.Redis) -> None:
    result = call(app, "POST", "/api/jobs", body(runtime_env={"working_dir": "gcs://_ray_pkg_x.zip"}))
    assert result.status == 400, result.body
    assert "runtime_env.working_dir" in result.json["fields"]
    assert job_count(redis_client) == 0
    batch = submit_batch(app, [body(runtime_env={"working_dir": "gcs://_ray_pkg_x.zip"})])
    assert "runtime_env.working_dir" in batch[0]["fields"]


# -- nodes and pools --------------------------------------------------------------------


def test_nodes_and_pools_show_capacity_reserved_free_labels_and_liveness(
    app: App, static_node: Callable[..., None], admin: Any, placement: Placement
) -> None:
    static_node("n1", pool="p1", labels={"gpu": None, "zone": "a"}, cpus=4, memory=8 * GiB, gpus=1, resources={"NPU": 8})
    static_node("n2", pool="p1", cpus=2, memory=4 * GiB)
    static_node("n3", pool="p2", cpus=1, memory=2 * GiB)

    n1 = node_view(app, "n1")
    assert n1["pool"] == "p1" and n1["labels"] == {"gpu": None, "zone": "a", "pool": "p1"}
    assert (n1["alive"], n1["draining"]) == (True, False)
    assert n1["capacity"] == {"CPU": 4, "memory": 8 * GiB, "GPU": 1, "NPU": 8}
    assert all(amount == 0 for amount in n1["reserved"].values())
    assert n1["free"] == n1["capacity"]
    p1 = pool_view(app, "p1")
    assert (p1["nodes"], p1["alive"]) == (2, 2)
    assert p1["capacity"]["CPU"] == 6 and p1["capacity"]["memory"] == 12 * GiB

    job = body(submission_id="app-placed", entrypoint_num_cpus=1.5, entrypoint_memory=GiB, entrypoint_resources={"NPU": 2})
    result = call(app, "POST", "/api/jobs", job, headers={"X-Pool-Label": "gpu", "Prefer": "wait=50"})
    assert result.status == 200, result.body
    assert record(app, "app-placed")["driver_node_id"] == "n1"

    n1 = node_view(app, "n1")
    assert {k: v for k, v in n1["reserved"].items() if v} == {"CPU": 1.5, "memory": GiB, "NPU": 2}
    assert n1["free"] == {"CPU": 2.5, "memory": 7 * GiB, "GPU": 1, "NPU": 6}
    p1 = pool_view(app, "p1")
    assert p1["reserved"]["CPU"] == 1.5 and p1["free"]["CPU"] == 4.5 and p1["free"]["memory"] == 11 * GiB
    assert all(amount == 0 for amount in pool_view(app, "p2")["reserved"].values())

    assert stop(app, "app-placed").json == {"stopped": True}
    wait_for(lambda: node_view(app, "n1")["free"] == node_view(app, "n1")["capacity"], SETTLE_S,
             what="the stopped job's reservation to be released")

    admin.drain("n2")
    assert node_view(app, "n2")["draining"] is True
    admin.declare_lost("n3")
    assert node_view(app, "n3")["alive"] is False
    p2 = pool_view(app, "p2")
    assert (p2["nodes"], p2["alive"]) == (1, 0)


def test_an_agent_node_shows_its_heartbeat(app: App, agent_node: Proc) -> None:
    n1 = node_view(app, "n1")
    assert n1["alive"] is True and n1["kind"] == "agent"
    assert isinstance(n1["last_heartbeat"], int) and n1["last_heartbeat"] > 0
    assert n1["capacity"]["CPU"] == 4 and n1["capacity"]["memory"] == 4 * GiB


# -- queue publishing (docs/api.md) -----------------------------------------------------


@pytest.mark.parametrize("explicit_id", [True, False], ids=["with-submission-id", "id-from-message"])
def test_a_queued_message_becomes_a_job(app: App, publisher: Celery, consumer: Placement, explicit_id: bool) -> None:
    job = body(entrypoint="python train.py", entrypoint_num_cpus=2, metadata={"from": "queue"})
    if explicit_id:
        job["submission_id"] = "train-42"
    message_id = publish(publisher, body=job, tenant_id="team-q", pool_label="gpu", schedule_timeout_ms=0)
    submission_id = "app-train-42" if explicit_id else f"app-{message_id}"

    wait_for(lambda: get(app, submission_id, "team-q").status == 200, SETTLE_S, what=f"job {submission_id} to appear")
    stored = record(app, submission_id, "team-q")
    assert stored["tenant_id"] == "team-q" and stored["pool_label"] == "gpu"
    assert stored["entrypoint"] == "python train.py" and stored["entrypoint_num_cpus"] == 2
    assert stored["metadata"] == {"from": "queue"} and stored["scheduling"]["deadline"] is None
    assert stored["status"] == "PENDING"
    assert listed(app, "", "team-q") == [submission_id]


@pytest.mark.parametrize(
    ("submission_id", "message_id"),
    [("app-once", str(uuid.uuid4())), (None, str(uuid.uuid4())), (None, "order-17/retry")],
    ids=["with-submission-id", "id-from-uuid-message-id", "id-from-other-message-id"],
)
def test_the_same_message_delivered_twice_makes_one_job(app: App, publisher: Celery, consumer: Placement,
                                                        redis_client: redis.Redis, submission_id: str | None,
                                                        message_id: str) -> None:
    job = body(submission_id=submission_id) if submission_id else body()
    publish(publisher, task_id=message_id, body=job, tenant_id="team-q")
    publish(publisher, task_id=message_id, body=job, tenant_id="team-q")
    publish(publisher, body=body(submission_id="app-marker"), tenant_id="team-q")  # consumed after both

    wait_for(lambda: get(app, "app-marker", "team-q").status == 200, SETTLE_S, what="the marker job")
    ids = listed(app, "", "team-q")
    assert len(ids) == 2 and ids[1] != "app-marker" and ids[0] == "app-marker", ids
    if submission_id:
        assert ids[1] == submission_id
    elif GENERATED_UUID_ID.match(f"app-{message_id}"):
        assert ids[1] == f"app-{message_id}"
    else:  # not a UUID: still a valid id, derived from the message id alone
        assert re.fullmatch(r"app-[a-z0-9-]{1,60}", ids[1])
    assert not redis_client.hget("poolq:stats", "invalid_messages")


def test_an_invalid_message_naming_an_id_polls_as_failed(app: App, publisher: Celery, consumer: Placement,
                                                          redis_client: redis.Redis) -> None:
    bad = {"entrypoint": "echo", "runtime_env": {"working_dir": "/srv"}, "entrypoint_num_cpus": 99,
           "entrypoint_num_cpu": 1, "submission_id": "app-broken"}
    publish(publisher, body=bad, tenant_id="team-q")

    wait_for(lambda: get(app, "app-broken", "team-q").status == 200, SETTLE_S, what="the invalid job's record")
    job = record(app, "app-broken", "team-q")
    assert (job["status"], job["error_type"]) == ("FAILED", "INVALID_REQUEST")
    # Both field errors are in the message: the out-of-range value and the unknown (misspelt) field.
    assert re.search(r"\bentrypoint_num_cpus\b", job["message"]) and re.search(r"\bentrypoint_num_cpu\b", job["message"])
    assert job["end_time"] is not None
    assert get(app, "app-broken").status == 404  # it belongs to the tenant named in the message
    assert listed(app, "status=FAILED", "team-q") == ["app-broken"]
    assert redis_client.hget("poolq:stats", "invalid_messages") == "1"


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"body": {"entrypoint": "echo"}}, id="no-runtime-env"),
        pytest.param({"body": "not an object"}, id="body-not-an-object"),
        pytest.param({}, id="no-body"),
        pytest.param({"body": MINIMAL, "tenant_id": "bad tenant!"}, id="bad-tenant"),
        pytest.param({"body": MINIMAL, "pool_label": ","}, id="bad-pool-label"),
        pytest.param({"body": MINIMAL, "schedule_timeout_ms": -1}, id="bad-timeout"),
    ],
)
def test_an_invalid_message_without_an_id_is_counted(app: App, publisher: Celery, consumer: Placement,
                                                     redis_client: redis.Redis, kwargs: dict[str, Any]) -> None:
    publish(publisher, **kwargs)
    wait_for(lambda: redis_client.hget("poolq:stats", "invalid_messages") == "1", SETTLE_S,
             what="the invalid message to be counted")
    publish(publisher, body=body(submission_id="app-marker"))  # the worker is still consuming after it
    wait_for(lambda: get(app, "app-marker").status == 200, SETTLE_S, what="the marker job")
    assert job_count(redis_client) == 1
    assert redis_client.hget("poolq:stats", "invalid_messages") == "1"
