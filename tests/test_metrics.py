"""GET /metrics (Prometheus text) and POOLQ_LOG_FORMAT=json.

Each test does known things through the in-process WSGI app (with placement and the
periodic duties in the test's process where they are needed, ``placement``) on a Redis
emptied of poolq's keys, then parses /metrics with prometheus_client's own parser and
checks that every figure counts exactly what was done. The JSON log format is checked
on real ``poolq worker`` and ``poolq api`` processes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from api_shim.app import App
from api_shim.routes import metrics as metrics_route
from poolq import keys, tokens
from poolq.embedded import free_port
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from tests import kit
from tests.kit import JOB, SETTLE_S, GiB, MiB, Placement, add_node, record, wait_ready
from tests.procs import wait_for
from tests.wsgi import call

# -- helpers -------------------------------------------------------------------------


class Metrics:
    """The parsed exposition: ``value(sample_name, **labels)``."""

    def __init__(self, text: str):
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = [s for family in self.families.values() for s in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def labelled(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}


def scrape(app: App, headers: dict[str, str] | None = None) -> Metrics:
    result = call(app, "GET", "/metrics", headers=headers)
    assert result.status == 200, result.body
    assert result.headers["Content-Type"].startswith("text/plain"), result.headers
    assert "version=0.0.4" in result.headers["Content-Type"], result.headers
    return Metrics(result.body.decode())


def submit(app: App, body: Any = JOB, tenant: str = "default", label: str | None = None, timeout_ms: int = 0) -> Any:
    return kit.post(app, body, tenant=tenant, label=label, timeout_ms=timeout_ms)


def accepted(app: App, body: Any = JOB, tenant: str = "default", label: str | None = None, timeout_ms: int = 0) -> str:
    return kit.submit(app, body, tenant=tenant, label=label, timeout_ms=timeout_ms)


# -- the format, and who may read it ---------------------------------------------------


def test_metrics_is_prometheus_text_with_every_family(app: App) -> None:
    metrics = scrape(app)
    expected = {
        "poolq_api_requests": "counter",
        "poolq_api_request_duration_seconds": "histogram",
        "poolq_submissions": "counter",
        "poolq_scheduling_failures": "counter",
        "poolq_placement_latency_seconds": "histogram",
        "poolq_job_run_duration_seconds": "histogram",
        "poolq_jobs_completed": "counter",
        "poolq_job_retries": "counter",
        "poolq_jobs": "gauge",
        "poolq_queue_depth": "gauge",
        "poolq_queue_waiting": "gauge",
        "poolq_nodes": "gauge",
        "poolq_pool_capacity": "gauge",
        "poolq_pool_reserved": "gauge",
    }
    for name, kind in expected.items():
        assert name in metrics.families and metrics.families[name].type == kind, (name, metrics.families.get(name))
    # An empty service: nothing counted yet, and the histogram is well formed.
    assert metrics.value("poolq_placement_latency_seconds_count") == 0
    assert metrics.value("poolq_queue_depth") == 0
    assert {v for v in metrics.labelled("poolq_jobs").values()} == {0}


def test_metrics_needs_a_token_when_tokens_are_on(settings: Settings, redis_client: redis.Redis) -> None:
    app = App(dataclasses.replace(settings, auth="tokens"))
    refused = call(app, "GET", "/metrics")
    assert refused.status == 401 and refused.json == {"error": "authentication required: send Authorization: Bearer <token>"}
    refused = call(app, "GET", "/metrics", headers={"Authorization": "Bearer pq_000000000000_" + "x" * 43})
    assert refused.status == 401
    token = tokens.create(redis_client, "ops")
    metrics = scrape(app, {"Authorization": f"Bearer {token}"})
    assert "poolq_jobs" in metrics.families


# -- submissions by tenant and outcome ---------------------------------------------------


def test_submissions_count_each_outcome_per_tenant(app: App) -> None:
    for number in range(3):
        accepted(app, {**JOB, "submission_id": f"app-m-{number}"}, tenant="team-a")
    for _ in range(2):  # the same request again: an idempotent duplicate
        assert submit(app, {**JOB, "submission_id": "app-m-0"}, tenant="team-a").status == 200
    assert submit(app, {**JOB, "entrypoint": "false", "submission_id": "app-m-0"}, tenant="team-a").status == 409
    assert submit(app, {"runtime_env": {"working_dir": "/tmp"}}, tenant="team-a").status == 400
    assert submit(app, {**JOB, "entrypoint_num_cpus": 99}, tenant="team-a").status == 400
    assert submit(app, {**JOB, "submission_id": "app-m-0"}, tenant="team-b").status == 200  # same id, other tenant

    counted = scrape(app).labelled("poolq_submissions_total")
    assert {k: v for k, v in counted.items() if v} == {
        (("outcome", "accepted"), ("tenant", "team-a")): 3,
        (("outcome", "duplicate"), ("tenant", "team-a")): 2,
        (("outcome", "conflict"), ("tenant", "team-a")): 1,
        (("outcome", "invalid"), ("tenant", "team-a")): 2,
        (("outcome", "accepted"), ("tenant", "team-b")): 1,
    }, counted


def test_batch_submissions_are_counted_like_single_ones(app: App) -> None:
    jobs = [{**JOB, "submission_id": "app-b-1"}, {**JOB, "submission_id": "app-b-2"}, {**JOB, "submission_id": "app-b-1"},
            {**JOB, "entrypoint": "false", "submission_id": "app-b-2"}, {"entrypoint": "x"}]
    result = call(app, "POST", "/api/jobs/batch", {"jobs": jobs}, headers={"X-Tenant-Id": "team-c"})
    assert result.status == 200, result.body
    outcomes = ["submission_id" in item for item in result.json["results"]]
    assert outcomes == [True, True, True, False, False], result.json
    counted = scrape(app).labelled("poolq_submissions_total")
    assert {k: v for k, v in counted.items() if v} == {
        (("outcome", "accepted"), ("tenant", "team-c")): 2,
        (("outcome", "duplicate"), ("tenant", "team-c")): 1,
        (("outcome", "conflict"), ("tenant", "team-c")): 1,
        (("outcome", "invalid"), ("tenant", "team-c")): 1,
    }, counted


# -- jobs by status, queue depth ------------------------------------------------------------


def test_jobs_by_status_and_queue_depth_follow_what_happened(app: App) -> None:
    ids = [accepted(app, tenant=tenant) for tenant in ("t1", "t1", "t1", "t2", "t2")]
    metrics = scrape(app)
    assert metrics.value("poolq_jobs", status="PENDING") == 5
    assert metrics.value("poolq_queue_depth") == 5  # no placement worker: all wait

    for submission_id, tenant in ((ids[0], "t1"), (ids[3], "t2")):
        assert call(app, "POST", f"/api/jobs/{submission_id}/stop", headers={"X-Tenant-Id": tenant}).json == {"stopped": True}
    metrics = scrape(app)
    assert metrics.value("poolq_jobs", status="PENDING") == 3
    assert metrics.value("poolq_jobs", status="STOPPED") == 2
    assert metrics.value("poolq_queue_depth") == 3

    assert call(app, "DELETE", f"/api/jobs/{ids[0]}", headers={"X-Tenant-Id": "t1"}).status == 200
    metrics = scrape(app)
    assert metrics.value("poolq_jobs", status="STOPPED") == 1
    assert {metrics.value("poolq_jobs", status=s) for s in ("RUNNING", "SUCCEEDED", "FAILED")} == {0}


# -- placement latency, per-pool capacity and reserved ---------------------------------------


def test_placement_latency_counts_placed_jobs_and_pools_show_capacity_and_reserved(
        app: App, admin: NodeAdmin, placement: Placement) -> None:
    add_node(admin, "p1-a", pool="p1", cpus=4, memory=8 * GiB)
    add_node(admin, "p1-b", pool="p1", cpus=2, memory=4 * GiB, gpus=1)
    add_node(admin, "p2-a", pool="p2", cpus=8, memory=16 * GiB, resources={"NPU": 4})
    placed = [accepted(app, label="pool=p1") for _ in range(3)] + [accepted(app, {**JOB, "entrypoint_num_cpus": 2}, label="pool=p2")]
    waiting = accepted(app, {**JOB, "entrypoint_num_cpus": 16})  # fits no node
    for submission_id in placed:
        wait_for(lambda sid=submission_id: record(app, sid)["driver_node_id"], timeout=SETTLE_S, what=f"{submission_id} placed")
    wait_for(lambda: record(app, waiting)["scheduling"]["attempts"] >= 1, timeout=SETTLE_S, what="an attempt for the unfit job")

    metrics = scrape(app)
    assert metrics.value("poolq_placement_latency_seconds_count") == 4
    buckets = {s.labels["le"]: s.value for s in metrics.samples if s.name == "poolq_placement_latency_seconds_bucket"}
    assert buckets["+Inf"] == 4, buckets
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    assert all(a[1] <= b[1] for a, b in zip(ordered, ordered[1:])), ordered  # cumulative
    total = metrics.value("poolq_placement_latency_seconds_sum")
    assert total is not None and 0 <= total <= 4 * SETTLE_S, total
    assert metrics.value("poolq_queue_depth") == 1  # the unfit job waits; placed ones left the line

    assert metrics.value("poolq_pool_capacity", pool="p1", resource="CPU") == 6
    assert metrics.value("poolq_pool_capacity", pool="p1", resource="memory") == 12 * GiB
    assert metrics.value("poolq_pool_capacity", pool="p1", resource="GPU") == 1
    assert metrics.value("poolq_pool_capacity", pool="p2", resource="CPU") == 8
    assert metrics.value("poolq_pool_capacity", pool="p2", resource="NPU") == 4
    assert metrics.value("poolq_pool_reserved", pool="p1", resource="CPU") == 3
    assert metrics.value("poolq_pool_reserved", pool="p1", resource="memory") == 3 * 128 * MiB
    assert metrics.value("poolq_pool_reserved", pool="p2", resource="CPU") == 2
    assert metrics.value("poolq_pool_reserved", pool="p2", resource="NPU") in (0, None)
    # The same figures as GET /api/pools.
    for pool in call(app, "GET", "/api/pools").json:
        for part, family in (("capacity", "poolq_pool_capacity"), ("reserved", "poolq_pool_reserved")):
            for resource, amount in pool[part].items():
                assert metrics.value(family, pool=pool["pool"], resource=resource) in ((amount,) if amount else (0, None)), \
                    (pool, part, resource)

    # Stopping a placed job releases its reservation in the figures.
    assert call(app, "POST", f"/api/jobs/{placed[0]}/stop").json == {"stopped": True}
    assert scrape(app).value("poolq_pool_reserved", pool="p1", resource="CPU") == 2
    assert scrape(app).value("poolq_placement_latency_seconds_count") == 4


def test_placement_latency_buckets_go_past_a_minute_and_stay_cumulative(app: App, redis_client: redis.Redis) -> None:
    # Counters kept before the buckets past 60 s existed: placements up to 60 s, and one
    # slower (in +Inf only). A bucket that did not exist then is shown at least as high
    # as the one below it, so the histogram stays well formed across the upgrade.
    redis_client.hset(keys.STATS, mapping={"placement_le:10000": 4, "placement_le:60000": 5,
                                           "placement_count": 6, "placement_sum_ms": 200_000})
    buckets = {s.labels["le"]: s.value for s in scrape(app).samples if s.name == "poolq_placement_latency_seconds_bucket"}
    assert {le: buckets[le] for le in ("10.0", "60.0", "300.0", "600.0", "3600.0", "+Inf")} == {
        "10.0": 4, "60.0": 5, "300.0": 5, "600.0": 5, "3600.0": 5, "+Inf": 6}, buckets


# -- API requests by route and status, with latency --------------------------------------


def own_redis_app(settings: Settings, db: int) -> App:
    """An App on a Redis database of its own, emptied: the request counts of the Apps of
    earlier tests, flushed up to a second after their last request, cannot land in it."""
    url = settings.resolved_redis_url().rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return App(dataclasses.replace(settings, redis_url=url))


def test_api_requests_are_counted_by_route_template_and_status_with_latency(settings: Settings) -> None:
    app = own_redis_app(settings, 7)
    ids = [accepted(app, tenant="t-http") for _ in range(3)]
    assert submit(app, {"runtime_env": {"working_dir": "/tmp"}}).status == 400
    for submission_id in ids[:2]:
        assert call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": "t-http"}).status == 200
    assert call(app, "GET", f"/api/jobs/{ids[2]}/", headers={"X-Tenant-Id": "t-http"}).status == 200  # trailing slash
    assert call(app, "GET", "/api/jobs/app-none").status == 404
    assert call(app, "GET", "/no/such/path").status == 404
    assert call(app, "BREW", "/api/jobs").status == 405
    # Held for its whole second (no placement worker): a request that cannot be fast.
    held = kit.post(app, headers={"Prefer": "wait=1"})
    assert held.status == 200, held.body

    metrics = scrape(app)
    counted = {tuple(v for _, v in sorted(k)): n for k, n in metrics.labelled("poolq_api_requests_total").items()}
    assert counted == {
        ("POST", "/api/jobs", "200"): 4,
        ("POST", "/api/jobs", "400"): 1,
        ("GET", "/api/jobs/{submission_id}", "200"): 3,
        ("GET", "/api/jobs/{submission_id}", "404"): 1,
        ("GET", "unmatched", "404"): 1,
        ("other", "/api/jobs", "405"): 1,
    }, counted

    series = {"method": "POST", "route": "/api/jobs"}
    assert metrics.value("poolq_api_request_duration_seconds_count", **series) == 5
    buckets = {s.labels["le"]: s.value for s in metrics.samples
               if s.name == "poolq_api_request_duration_seconds_bucket" and s.labels["route"] == "/api/jobs"
               and s.labels["method"] == "POST"}
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    assert all(a[1] <= b[1] for a, b in zip(ordered, ordered[1:])), ordered  # cumulative
    assert ordered[-2][0] == "600.0" and buckets["+Inf"] == 5, ordered
    assert buckets["0.5"] <= 4, buckets  # the held request took a second at least
    total = metrics.value("poolq_api_request_duration_seconds_sum", **series)
    assert total is not None and 1 <= total <= 5 * SETTLE_S, total

    # The scrape counts itself, once it has answered.
    assert scrape(app).value("poolq_api_requests_total", method="GET", route="/metrics", status="200") == 1


def test_api_processes_add_their_counts_to_one_figure(settings: Settings) -> None:
    """Two Apps on one Redis, as two API processes: either one's /metrics shows the sum,
    the other's counts arriving within about a second, without a request to it."""
    first = own_redis_app(settings, 8)
    second = App(first.settings)
    for _ in range(2):
        assert call(first, "GET", "/api/version").status == 200
    for _ in range(3):
        assert call(second, "GET", "/api/version").status == 200

    def counted() -> float | None:
        return scrape(first).value("poolq_api_requests_total", method="GET", route="/api/version", status="200")

    wait_for(lambda: counted() == 5, timeout=SETTLE_S, what="the second process's counts to be flushed")
    assert scrape(second).value("poolq_api_request_duration_seconds_count", method="GET", route="/api/version") == 5


def test_a_server_with_two_workers_counts_every_request(start_proc: Any, redis_client: redis.Redis) -> None:
    """``poolq api --workers 2``: each request counted once, whichever process served it."""
    import http.client

    port = free_port()
    api = start_proc(["api", "--port", str(port), "--workers", "2"])

    def get(path: str) -> tuple[int, bytes]:
        assert api.alive(), api.output()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a new connection each: any worker
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def serving() -> bool:
        try:
            return get("/livez")[0] == 200
        except OSError:
            return False

    wait_for(serving, timeout=60, interval=0.2, what="poolq api to serve")
    for _ in range(40):
        assert get("/api/jobs/app-none")[0] == 404

    def counted() -> float | None:
        status, body = get("/metrics")
        assert status == 200, body
        return Metrics(body.decode()).value("poolq_api_requests_total", method="GET",
                                           route="/api/jobs/{submission_id}", status="404")

    wait_for(lambda: counted() == 40, timeout=SETTLE_S, what="all 40 requests to be counted")
    assert counted() == 40  # and not more: no flush is counted twice


# -- how long jobs ran, and how they ended --------------------------------------------------


AGENT_ENV = {"POOLQ_STOP_GRACE_S": "1", "POOLQ_DRAIN_S": "1", "POOLQ_HEARTBEAT_S": "0.5"}


def test_job_runs_and_completions_by_outcome(app: App, placement: Placement, start_proc: Any) -> None:
    node = start_proc(["node", "--id", "n1", "--cpus", "4", "--memory", "4Gi"], env=AGENT_ENV, name="node-n1")
    wait_for(lambda: any(n["node_id"] == "n1" and n["alive"] for n in call(app, "GET", "/api/nodes").json) or not node.alive(),
             SETTLE_S, what="node agent n1 to register")
    assert node.alive(), node.output()
    succeeded = [accepted(app, {**JOB, "entrypoint": "true"}), accepted(app, {**JOB, "entrypoint": "sleep 1.2"})]
    failed = accepted(app, {**JOB, "entrypoint": "exit 3"})
    retried = accepted(app, {**JOB, "entrypoint": "exit 4", "retry_policy": {"max_attempts": 2, "backoff_s": 0}})
    stopped_running = accepted(app, {**JOB, "entrypoint": "sleep 60"})
    kit.wait_status(app, stopped_running, "RUNNING")
    assert kit.stop(app, stopped_running).json == {"stopped": True}
    stopped_pending = accepted(app, {**JOB, "entrypoint_num_cpus": 16})  # fits no node: never runs
    assert kit.stop(app, stopped_pending).json == {"stopped": True}
    for submission_id in [*succeeded, failed, retried, stopped_running, stopped_pending]:
        kit.wait_record(app, submission_id, lambda r: r["status"] in ("SUCCEEDED", "FAILED", "STOPPED"),
                        what=f"{submission_id} to end")
    assert record(app, retried)["attempt_number"] == 2

    metrics = scrape(app)
    completed = {(dict(k)["status"], dict(k)["error_type"]): v for k, v in metrics.labelled("poolq_jobs_completed_total").items()}
    assert completed == {("SUCCEEDED", ""): 2, ("FAILED", "ENTRYPOINT_FAILED"): 2, ("STOPPED", "STOPPED_BY_USER"): 2}, completed
    assert metrics.labelled("poolq_job_retries_total") == {(("error_type", "ENTRYPOINT_FAILED"),): 1}
    # Runs: both successes, the failure, both attempts of the retried job, the stopped
    # running job; the job stopped while it waited never ran.
    counts = {status: metrics.value("poolq_job_run_duration_seconds_count", status=status)
              for status in ("SUCCEEDED", "FAILED", "STOPPED")}
    assert counts == {"SUCCEEDED": 2, "FAILED": 3, "STOPPED": 1}, counts
    buckets = {s.labels["le"]: s.value for s in metrics.samples
               if s.name == "poolq_job_run_duration_seconds_bucket" and s.labels["status"] == "SUCCEEDED"}
    assert buckets["0.1"] <= 1 and buckets["+Inf"] == 2, buckets  # `sleep 1.2` ran past 0.1 s
    assert "86400.0" in buckets and "3600.0" in buckets, buckets
    total = metrics.value("poolq_job_run_duration_seconds_sum", status="SUCCEEDED")
    assert total is not None and 1.2 <= total <= 2 * SETTLE_S, total


# -- jobs in line by pool label and tenant -------------------------------------------------


def test_jobs_in_line_by_pool_label_and_tenant(app: App, monkeypatch: Any) -> None:
    for tenant, label, jobs in (("t1", None, 3), ("t1", "pool=p1", 2), ("t2", "pool=p1", 1),
                                ("t2", "gpu,zone=a,unUseAntiOtherLabels", 1), ("t3", None, 1), ("t4", None, 1)):
        for _ in range(jobs):
            accepted(app, tenant=tenant, label=label)
    # Two shapes of one tenant and label (other amounts) count together.
    last = accepted(app, {**JOB, "entrypoint_num_cpus": 2}, tenant="t1")

    def waiting() -> dict[tuple[str, str], float]:
        return {(dict(k)["pool_label"], dict(k)["tenant"]): v for k, v in scrape(app).labelled("poolq_queue_waiting").items()}

    assert waiting() == {("", "t1"): 4, ("pool=p1", "t1"): 2, ("pool=p1", "t2"): 1,
                         ("gpu,zone=a,unUseAntiOtherLabels", "t2"): 1, ("", "t3"): 1, ("", "t4"): 1}
    assert scrape(app).value("poolq_queue_depth") == 10
    assert kit.stop(app, last, tenant="t1").json == {"stopped": True}
    assert waiting()[("", "t1")] == 3

    # Bounded: the largest pairs, the rest summed under (other), which no tenant can be.
    monkeypatch.setattr(metrics_route, "MAX_QUEUE_SERIES", 2)
    assert waiting() == {("", "t1"): 3, ("pool=p1", "t1"): 2, ("(other)", "(other)"): 4}


# -- scheduling failures by reason ----------------------------------------------------------


def test_scheduling_failures_are_counted_by_reason(app: App, admin: NodeAdmin, placement: Placement) -> None:
    add_node(admin, "small", pool="p1", cpus=2)
    too_big = accepted(app, {**JOB, "entrypoint_num_cpus": 4}, timeout_ms=1500)
    nowhere = accepted(app, label="gpu-pool", timeout_ms=1500)
    also_too_big = accepted(app, {**JOB, "entrypoint_num_cpus": 3}, timeout_ms=1500)
    for submission_id in (too_big, nowhere, also_too_big):
        wait_for(lambda sid=submission_id: record(app, sid)["status"] == "FAILED", timeout=SETTLE_S, what=f"{submission_id} to time out")
    reasons = {sid: [r["reason"] for r in record(app, sid)["scheduling"]["reasons"]] for sid in (too_big, nowhere, also_too_big)}
    assert reasons == {too_big: ["CPU: Out Of Capacity"], nowhere: ["Affinity can't be Satisfied"],
                       also_too_big: ["CPU: Out Of Capacity"]}, reasons

    metrics = scrape(app)
    counted = {dict(k)["reason"]: v for k, v in metrics.labelled("poolq_scheduling_failures_total").items() if v}
    assert counted == {"CPU: Out Of Capacity": 2, "Affinity can't be Satisfied": 1}, counted
    assert metrics.value("poolq_jobs", status="FAILED") == 3
    assert metrics.value("poolq_queue_depth") == 0
    assert metrics.value("poolq_placement_latency_seconds_count") == 0  # nothing was placed
    assert metrics.labelled("poolq_jobs_completed_total") == {(("error_type", "SCHEDULE_TIMEOUT"), ("status", "FAILED")): 3}
    assert metrics.labelled("poolq_job_run_duration_seconds_count") == {}  # none of them ran


# -- node liveness ---------------------------------------------------------------------------


def test_nodes_by_state(app: App, admin: NodeAdmin, start_placement: Any) -> None:
    start_placement({"POOLQ_NODE_TTL_S": "2"})
    add_node(admin, "static-1", pool="ag", cpus=4)
    add_node(admin, "static-2", pool="ag", cpus=4)
    admin.drain("static-2")
    add_node(admin, "agent-1", pool="ag", cpus=8, kind="agent")  # registered as an agent; no agent heartbeats for it
    add_node(admin, "other-1", pool="other", cpus=1)

    def states() -> dict[tuple[str, str], float]:
        return {(dict(k)["pool"], dict(k)["state"]): v for k, v in scrape(app).labelled("poolq_nodes").items() if v}

    wait_for(lambda: states().get(("ag", "dead")) == 1, timeout=SETTLE_S, what="the silent agent node to be declared dead")
    assert states() == {("ag", "live"): 1, ("ag", "draining"): 1, ("ag", "dead"): 1, ("other", "live"): 1}, states()
    metrics = scrape(app)
    # A dead node's capacity is no longer the pool's; a drained node is still live.
    assert metrics.value("poolq_pool_capacity", pool="ag", resource="CPU") == 8
    assert metrics.value("poolq_pool_capacity", pool="other", resource="CPU") == 1

    admin.remove("static-1")
    assert states() == {("ag", "draining"): 1, ("ag", "dead"): 1, ("other", "live"): 1}, states()


# -- POOLQ_LOG_FORMAT=json -------------------------------------------------------------------


TEXT_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]|(DEBUG|INFO|WARNING|ERROR|CRITICAL):)")


def json_records(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # one whole object per line
            assert isinstance(record, dict), line
            assert {"time", "level", "logger", "message"} <= set(record), record
            records.append(record)
    return records


def test_json_log_format_for_a_placement_worker(app: App, admin: NodeAdmin, start_proc: Any) -> None:
    worker = start_proc(["worker"], env={"POOLQ_LOG_FORMAT": "json"})
    wait_ready(worker)
    add_node(admin, "n1", pool="p1", cpus=1)
    accepted(app)  # some placement work to log about
    wait_for(lambda: any("ready" in r["message"] for r in json_records(worker.output())), timeout=30, what="the ready line")
    output = worker.output()
    records = json_records(output)
    assert records and all(r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for r in records), records
    assert any(r["logger"].startswith("celery") for r in records), records
    text_lines = [line for line in output.splitlines() if TEXT_LOG_LINE.match(line)]
    assert text_lines == [], text_lines


def test_json_log_format_for_the_api(start_proc: Any) -> None:
    """Every log line of ``poolq api`` (the server's own lines included) is a JSON object."""
    port = free_port()
    api = start_proc(["api", "--port", str(port), "--workers", "1"], env={"POOLQ_LOG_FORMAT": "json"})

    def serving() -> bool:
        import http.client

        assert api.alive(), api.output()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/livez")
            return conn.getresponse().status == 200
        except OSError:
            return False

    wait_for(serving, timeout=60, interval=0.2, what="poolq api to serve")
    output = api.output()
    json_records(output)  # whatever starts with "{" is one whole JSON record
    text_lines = [line for line in output.splitlines() if TEXT_LOG_LINE.match(line)]
    assert text_lines == [], text_lines


def test_custom_resource_names_do_not_become_metric_labels() -> None:
    from worker.duties import metric_reason

    assert metric_reason("CPU: Not Enough") == "CPU: Not Enough"
    assert metric_reason("Memory: Out Of Capacity") == "Memory: Out Of Capacity"
    assert metric_reason("Affinity can't be Satisfied") == "Affinity can't be Satisfied"
    assert metric_reason("NPU: Not Found") == metric_reason("anything-a-user-names: Not Found") == "custom resource: Not Found"
