"""Per-tenant quotas and fairness (DESIGN.md 8; docs/errors.md 400, 429).

``poolq quota set|show|clear`` runs as a real subprocess; limits live in Redis and hold
at once. Jobs go through the in-process WSGI app; placement runs in a real ``poolq
worker`` onto static nodes, so a placed job stays PENDING with its driver_node_id
until stopped. Deadlines are functional with generous margins (two shared cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.nodes import capacity_of
from poolq.settings import Settings
from tests.procs import Proc, wait_for
from tests.wsgi import Result, call
from worker.inventory import NodeAdmin

MiB = 1024 * 1024
GiB = 1024 * MiB
JOB = {"entrypoint": "true", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_num_cpus": 1, "entrypoint_memory": 128 * MiB}
QUOTA = "Tenant Quota Exceeded"
SETTLE_S = 60.0  # how long placement may take to do what the test waits for, on a busy machine


# -- helpers -------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poolq", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def quota(env: dict[str, str], tenant: str, *flags: str) -> None:
    done = cli(env, "quota", "set", tenant, *flags)
    assert done.returncode == 0, done.stderr


def headers(tenant: str, timeout_ms: int | None = 0) -> dict[str, str]:
    found = {"X-Tenant-Id": tenant}
    if timeout_ms is not None:
        found["X-Schedule-Timeout-Ms"] = str(timeout_ms)
    return found


def submit(app: App, tenant: str, body: dict[str, Any] = JOB, timeout_ms: int | None = 0) -> Result:
    return call(app, "POST", "/api/jobs", body, headers=headers(tenant, timeout_ms))


def accepted(app: App, tenant: str, body: dict[str, Any] = JOB, timeout_ms: int | None = 0) -> str:
    result = submit(app, tenant, body, timeout_ms)
    assert result.status == 200, result.body
    return str(result.json["submission_id"])


def poll(app: App, tenant: str, submission_id: str) -> dict[str, Any]:
    result = call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": tenant})
    assert result.status == 200, result.body
    return dict(result.json)


def wait_record(app: App, tenant: str, submission_id: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = SETTLE_S) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        record = poll(app, tenant, submission_id)
        return record if predicate(record) else None

    return wait_for(check, timeout=timeout, interval=0.05, what=f"{submission_id} {what}")  # type: ignore[return-value]


def is_placed(record: dict[str, Any]) -> bool:
    return record["status"] == "PENDING" and record["driver_node_id"] is not None


def waits_on_quota(record: dict[str, Any]) -> bool:
    return record["driver_node_id"] is None and [r["reason"] for r in record["scheduling"]["reasons"]] == [QUOTA]


def stop(app: App, tenant: str, submission_id: str) -> None:
    result = call(app, "POST", f"/api/jobs/{submission_id}/stop", headers={"X-Tenant-Id": tenant})
    assert result.status == 200 and result.json == {"stopped": True}, result.body


def ready(proc: Proc) -> None:
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), timeout=60, what="the placement worker to start")
    assert proc.alive(), proc.output()


def add_node(admin: NodeAdmin, node_id: str, cpus: int, memory: int = 64 * GiB, gpus: int = 0) -> None:
    admin.upsert(node_id, pool="p", labels={}, capacity=capacity_of(cpus, memory, gpus), kind="static")


def reserved_cpu(client: redis.Redis, node_id: str) -> int:
    return int(client.hget(keys.node(node_id), "res:CPU") or 0)


def on_node(client: redis.Redis, node_id: str) -> set[str]:
    return set(client.smembers(keys.node_jobs(node_id)))


# -- poolq quota set|show|clear ---------------------------------------------------------


def test_quota_set_show_clear(service_env: dict[str, str]) -> None:
    done = cli(service_env, "quota", "set", "team-q", "--cpus", "2", "--max-pending", "3", "--memory", "1Gi")
    assert done.returncode == 0, done.stderr
    shown = cli(service_env, "quota", "show", "team-q")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"CPU": "2000", "memory": str(GiB), "max_pending": "3"}, shown.stdout
    # Limits not given are left as they are.
    assert cli(service_env, "quota", "set", "team-q", "--max-pending", "5").returncode == 0
    after = json.loads(cli(service_env, "quota", "show", "team-q").stdout)
    assert after == {"CPU": "2000", "memory": str(GiB), "max_pending": "5"}, after
    assert cli(service_env, "quota", "clear", "team-q").returncode == 0
    assert json.loads(cli(service_env, "quota", "show", "team-q").stdout) == {}


@pytest.mark.parametrize("flags", [["--cpus", "lots"], ["--memory", "12Q"], ["--resources", "NPU"], ["--max-pending", "x"]])
def test_quota_set_refuses_bad_values(service_env: dict[str, str], redis_client: redis.Redis, flags: list[str]) -> None:
    done = cli(service_env, "quota", "set", "team-q", *flags)
    assert done.returncode != 0 and done.stderr.strip(), (done.returncode, done.stderr)
    assert redis_client.hgetall(keys.quota("team-q")) == {}


def test_max_pending_is_effective_at_once_and_clear_lifts_it(app: App, service_env: dict[str, str], redis_client: redis.Redis) -> None:
    accepted(app, "team-q")  # the app has served the tenant before the limit exists
    quota(service_env, "team-q", "--cpus", "2", "--max-pending", "3")
    accepted(app, "team-q")
    accepted(app, "team-q")
    refused = submit(app, "team-q")
    assert refused.status == 429, refused.body
    assert refused.json == {"error": "tenant team-q has 3 pending jobs, its limit"}
    assert len(redis_client.zrange(keys.tenant_jobs("team-q"), 0, -1)) == 3  # the refused one left nothing behind
    # Other tenants are not limited by team-q's quota.
    accepted(app, "team-r")
    # A batch: every item past the limit is refused on its own, in order.
    batch = call(app, "POST", "/api/jobs/batch", {"jobs": [JOB, JOB]}, headers=headers("team-q"))
    assert batch.status == 200, batch.body
    assert batch.json["results"] == [{"error": "tenant team-q has 3 pending jobs, its limit"}] * 2

    assert cli(service_env, "quota", "clear", "team-q").returncode == 0
    accepted(app, "team-q")


def test_max_pending_counts_only_pending_jobs(app: App, service_env: dict[str, str]) -> None:
    quota(service_env, "team-q", "--max-pending", "2")
    first, _ = accepted(app, "team-q"), accepted(app, "team-q")
    assert submit(app, "team-q").status == 429
    stop(app, "team-q", first)  # a PENDING job stopped is STOPPED: no longer pending
    assert poll(app, "team-q", first)["status"] == "STOPPED"
    accepted(app, "team-q")
    assert submit(app, "team-q").status == 429


@pytest.mark.parametrize(
    ("flags", "body", "field"),
    [
        (["--cpus", "2"], {"entrypoint_num_cpus": 4}, "entrypoint_num_cpus"),
        (["--cpus", "2"], {"entrypoint_num_cpus": 2.001}, "entrypoint_num_cpus"),
        (["--memory", "256Mi"], {"entrypoint_memory": 512 * MiB}, "entrypoint_memory"),
        (["--gpus", "1"], {"entrypoint_num_gpus": 2}, "entrypoint_num_gpus"),
        (["--resources", "NPU=4"], {"entrypoint_resources": {"NPU": 8}}, "entrypoint_resources.NPU"),
    ],
)
def test_a_job_alone_over_the_quota_is_refused_naming_its_field(app: App, service_env: dict[str, str], redis_client: redis.Redis,
                                                                  flags: list[str], body: dict[str, Any], field: str) -> None:
    quota(service_env, "team-q", *flags)
    refused = submit(app, "team-q", {**JOB, **body})
    assert refused.status == 400, refused.body
    assert refused.json["error"] == "invalid job request"
    assert list(refused.json["fields"]) == [field], refused.json
    assert refused.json["fields"][field] and all(isinstance(m, str) and m for m in refused.json["fields"][field])
    assert redis_client.keys("poolq:job:*") == []
    # Exactly at the limit is fine, and the same job in a batch is refused on its own.
    batch = call(app, "POST", "/api/jobs/batch", {"jobs": [JOB, {**JOB, **body}]}, headers=headers("team-q"))
    assert batch.status == 200, batch.body
    good, bad = batch.json["results"]
    assert "submission_id" in good and list(bad.get("fields", {})) == [field], batch.json
    # Another tenant has no such quota.
    assert submit(app, "team-r", {**JOB, **body}).status == 200


def test_raising_the_quota_is_effective_at_once(app: App, service_env: dict[str, str]) -> None:
    quota(service_env, "team-q", "--cpus", "2")
    assert submit(app, "team-q", {**JOB, "entrypoint_num_cpus": 4}).status == 400
    quota(service_env, "team-q", "--cpus", "4")
    assert submit(app, "team-q", {**JOB, "entrypoint_num_cpus": 4}).status == 200


# -- the running quota: jobs wait, and are placed when the tenant's usage drops -----------


def test_jobs_over_the_cpu_quota_wait_and_are_placed_when_usage_drops(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                                        placement_worker: Proc, redis_client: redis.Redis) -> None:
    ready(placement_worker)
    add_node(admin, "big", cpus=16)
    quota(service_env, "team-q", "--cpus", "2")
    jobs = [accepted(app, "team-q") for _ in range(3)]
    wait_for(lambda: reserved_cpu(redis_client, "big") == 2000, timeout=SETTLE_S, what="two jobs placed")
    records = {j: poll(app, "team-q", j) for j in jobs}
    placed = [j for j, r in records.items() if is_placed(r)]
    waiting = [j for j, r in records.items() if not is_placed(r)]
    assert len(placed) == 2 and len(waiting) == 1, records
    (third,) = waiting
    record = wait_record(app, "team-q", third, waits_on_quota, "to wait on the tenant quota")
    assert record["status"] == "PENDING" and record["error_type"] is None
    assert record["scheduling"]["attempts"] >= 1
    assert record["scheduling"]["reasons"] == [{"reason": QUOTA, "units": 0, "requirement": "CPU: 2000m/2000m"}]
    assert QUOTA in record["message"], record["message"]

    # The node has room for 14 more: another tenant's job is placed meanwhile.
    other = accepted(app, "team-r")
    wait_record(app, "team-r", other, is_placed, "placed (another tenant)")
    time.sleep(1.0)  # several placement rounds and backoffs: the quota still holds
    assert not is_placed(poll(app, "team-q", third))
    assert reserved_cpu(redis_client, "big") == 3000

    stop(app, "team-q", placed[0])
    record = wait_record(app, "team-q", third, is_placed, "placed once the tenant's usage dropped")
    assert record["driver_node_id"] == "big"
    assert reserved_cpu(redis_client, "big") == 3000
    assert redis_client.hget(keys.tenant_usage("team-q"), "CPU") == "2000"


def test_lowering_the_quota_holds_back_the_next_placements(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                            placement_worker: Proc, redis_client: redis.Redis) -> None:
    ready(placement_worker)
    add_node(admin, "big", cpus=16)
    first = accepted(app, "team-q")
    wait_record(app, "team-q", first, is_placed, "placed")
    quota(service_env, "team-q", "--cpus", "1")
    second = accepted(app, "team-q")
    record = wait_record(app, "team-q", second, waits_on_quota, "to wait on the new quota")
    assert record["scheduling"]["reasons"][0]["requirement"] == "CPU: 1000m/1000m"
    quota(service_env, "team-q", "--cpus", "3")
    wait_record(app, "team-q", second, is_placed, "placed once the quota was raised")


def test_schedule_timeout_while_waiting_on_quota_names_the_quota(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                                   placement_worker: Proc, redis_client: redis.Redis) -> None:
    ready(placement_worker)
    add_node(admin, "big", cpus=16)
    quota(service_env, "team-q", "--cpus", "2")
    for _ in range(2):
        accepted(app, "team-q")
    wait_for(lambda: reserved_cpu(redis_client, "big") == 2000, timeout=SETTLE_S, what="two jobs placed")
    job = accepted(app, "team-q", timeout_ms=3000)
    record = wait_record(app, "team-q", job, lambda r: r["status"] == "FAILED", "to fail at its deadline")
    attempts = record["scheduling"]["attempts"]
    assert attempts >= 1, record
    assert record["error_type"] == "SCHEDULE_TIMEOUT"
    assert record["message"] == (
        f"create app failed, submissionId:[{job}], err: \nthe instance cannot be scheduled within 3000 ms. "
        f"which has been scheduled for {attempts} times. The latest failure: no available resource that meets the "
        "request requirements, The reasons are as follows:\n"
        "\t0 unit with [Tenant Quota Exceeded] requirements: [CPU: 2000m/2000m].\n"
    )
    assert record["scheduling"]["reasons"] == [{"reason": QUOTA, "units": 0, "requirement": "CPU: 2000m/2000m"}]
    assert record["driver_node_id"] is None and reserved_cpu(redis_client, "big") == 2000


# -- the request rate ------------------------------------------------------------------


def burst(apps: list[App], tenant: str, count: int) -> tuple[list[Result], float]:
    started = time.monotonic()
    results = [call(apps[i % len(apps)], "GET", "/api/jobs", headers={"X-Tenant-Id": tenant}) for i in range(count)]
    return results, time.monotonic() - started


def retry_after(result: Result) -> int:
    text = result.headers.get("Retry-After", "")
    assert text.isdigit() and int(text) >= 1, result.headers
    return int(text)


@pytest.mark.parametrize("processes", [1, 2], ids=["one API process", "two API processes"])
def test_rate_limit_answers_429_with_retry_after_then_lets_requests_through(settings: Settings, service_env: dict[str, str],
                                                                            processes: int) -> None:
    quota(service_env, "team-q", "--rate", "5", "--burst", "5")
    apps = [App(settings) for _ in range(processes)]  # two App objects on one Redis: two processes' worth
    results, elapsed = burst(apps, "team-q", 20)
    statuses = [r.status for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[:5] == [200] * 5, statuses
    allowed = statuses.count(200)
    assert allowed <= 5 + math.ceil(elapsed * 5) + 1, (statuses, elapsed)  # the burst plus what refilled meanwhile
    assert 429 in statuses, statuses
    for refused in (r for r in results if r.status == 429):
        assert refused.json["error"].startswith("rate limit of tenant team-q exceeded"), refused.body
        assert retry_after(refused) <= 5  # at 5 requests/s, a token is back well within a few seconds
    wait = retry_after([r for r in results if r.status == 429][-1])

    # Other tenants, and the routes outside the jobs API, are not limited.
    assert call(apps[0], "GET", "/api/jobs", headers={"X-Tenant-Id": "team-r"}).status == 200
    assert call(apps[0], "GET", "/healthz").status == 200

    time.sleep(wait + 0.2)
    again = call(apps[-1], "GET", "/api/jobs", headers={"X-Tenant-Id": "team-q"})
    assert again.status == 200, (again.status, again.body)
    # Submissions count too.
    results = [submit(apps[0], "team-q") for _ in range(12)]
    assert 429 in [r.status for r in results] and all(r.status in (200, 429) for r in results)


def test_a_new_rate_limit_holds_within_seconds(app: App, service_env: dict[str, str]) -> None:
    assert [r.status for r in burst([app], "team-q", 10)[0]] == [200] * 10
    quota(service_env, "team-q", "--rate", "2", "--burst", "2")

    def limited() -> bool:
        return 429 in [r.status for r in burst([app], "team-q", 6)[0]]

    wait_for(limited, timeout=5, interval=0.2, what="the new rate limit to hold")
    assert cli(service_env, "quota", "clear", "team-q").returncode == 0
    time.sleep(1.5)
    wait_for(lambda: not limited(), timeout=5, interval=0.5, what="the cleared rate limit to lift")


# -- fairness between tenants ------------------------------------------------------------


SLOTS = 4  # 1-CPU jobs the pool holds at once
FLOOD = 2000


def flood(app: App, tenant: str, count: int) -> None:
    for start in range(0, count, 1000):
        result = call(app, "POST", "/api/jobs/batch", {"jobs": [JOB] * min(1000, count - start)}, headers=headers(tenant))
        assert result.status == 200, result.body
        assert all("submission_id" in item for item in result.json["results"])


@pytest.fixture
def flooded(app: App, admin: NodeAdmin, placement_worker: Proc, redis_client: redis.Redis) -> list[str]:
    """Tenant A's 2,000 jobs fill a pool of SLOTS slots; then tenant B submits three jobs."""
    ready(placement_worker)
    add_node(admin, "small-1", cpus=SLOTS // 2)
    add_node(admin, "small-2", cpus=SLOTS // 2)
    flood(app, "tenant-a", FLOOD)
    wait_for(lambda: reserved_cpu(redis_client, "small-1") + reserved_cpu(redis_client, "small-2") == SLOTS * 1000,
             timeout=SETTLE_S, what="tenant A's jobs to fill the pool")
    return [accepted(app, "tenant-b") for _ in range(3)]


def holders(client: redis.Redis) -> set[str]:
    return on_node(client, "small-1") | on_node(client, "small-2")


def refill(client: redis.Redis) -> None:
    wait_for(lambda: reserved_cpu(client, "small-1") + reserved_cpu(client, "small-2") == SLOTS * 1000,
             timeout=SETTLE_S, what="the freed slots to be taken again")


def test_a_flooding_tenant_does_not_starve_another_when_slots_free_one_at_a_time(app: App, redis_client: redis.Redis,
                                                                                  flooded: list[str]) -> None:
    """Jobs end one at a time (the usual case): each freed slot goes to a waiting job. A
    fair scheduler alternates between the tenants, so B's three jobs get slots among the
    first six freed; allowed here: all three within the first 15 (of A's 1,996 waiting)."""
    b_refs = {keys.ref("tenant-b", j) for j in flooded}
    winners: list[str] = []
    for _ in range(15):
        before = holders(redis_client)
        a_jobs = sorted(r for r in before if r.startswith("tenant-a:"))
        stop(app, "tenant-a", keys.split_ref(a_jobs[0])[1])
        refill(redis_client)
        winners += sorted(holders(redis_client) - before)
        if b_refs <= holders(redis_client):
            break
    b_won = [i for i, ref in enumerate(winners) if ref in b_refs]
    assert len(b_won) == 3, f"tenant B's jobs placed at free slots {b_won}; the {len(winners)} freed slots went to: {winners}"


def test_a_flooding_tenant_does_not_starve_another_when_slots_free_together(app: App, redis_client: redis.Redis,
                                                                             flooded: list[str]) -> None:
    """All of the pool frees at once: B's jobs take their turn in the next rounds."""
    b_refs = {keys.ref("tenant-b", j) for j in flooded}
    a_placed_after_b = 0
    for _ in range(3):
        before = holders(redis_client)
        for ref in sorted(r for r in before if r.startswith("tenant-a:")):
            stop(app, "tenant-a", keys.split_ref(ref)[1])
        refill(redis_client)
        a_placed_after_b += len([r for r in holders(redis_client) - before if r.startswith("tenant-a:")])
        if b_refs <= holders(redis_client):
            break
    assert b_refs <= holders(redis_client), f"B's jobs still wait after {a_placed_after_b} of A's were placed"
    assert a_placed_after_b <= 2 * SLOTS, a_placed_after_b
    for job in flooded:
        assert poll(app, "tenant-b", job)["driver_node_id"] in ("small-1", "small-2")
