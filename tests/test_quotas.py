"""Per-tenant quotas and fairness (docs/operations.md; docs/errors.md 400, 429).

``poolq quota set|show|clear`` runs as a real subprocess; limits live in Redis and hold
at once. Jobs go through the in-process WSGI app; placement runs in the test's process
(``placement``: the scheduler and duties of a placement worker) onto static nodes, so a
placed job stays PENDING with its driver_node_id until stopped. Deadlines are functional
with generous margins (two shared cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from tests import kit
from tests.kit import JOB, SETTLE_S, GiB, MiB, Placement, add_node, is_placed, wait_record
from tests.procs import wait_for
from tests.wsgi import Result, call

QUOTA = "Tenant Quota Exceeded"


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
    return kit.post(app, body, tenant=tenant, timeout_ms=timeout_ms)


def accepted(app: App, tenant: str, body: dict[str, Any] = JOB, timeout_ms: int | None = 0) -> str:
    return kit.submit(app, body, tenant=tenant, timeout_ms=timeout_ms)


def waits_on_quota(record: dict[str, Any]) -> bool:
    return record["driver_node_id"] is None and [r["reason"] for r in record["scheduling"]["reasons"]] == [QUOTA]


def stop(app: App, tenant: str, submission_id: str) -> None:
    result = kit.stop(app, submission_id, tenant)
    assert result.status == 200 and result.json == {"stopped": True}, result.body


def reserved_cpu(client: redis.Redis, node_id: str) -> int:
    return int(client.hget(keys.node(node_id), "res:CPU") or 0)


def on_node(client: redis.Redis, node_id: str) -> set[str]:
    return set(client.smembers(keys.node_jobs(node_id)))


# -- poolq quota set|show|clear ---------------------------------------------------------


@pytest.mark.processes
def test_quota_set_show_clear(service_env: dict[str, str]) -> None:
    done = cli(service_env, "quota", "set", "team-q", "--cpus", "2", "--max-pending", "3", "--memory", "1Gi")
    assert done.returncode == 0, done.stderr
    shown = cli(service_env, "quota", "show", "team-q", "--json")
    assert shown.returncode == 0, shown.stderr
    view = {"tenant": "team-q", "resources": {"CPU": 2, "memory": GiB}, "limits": {"max_pending": 3}}
    assert json.loads(shown.stdout) == view, shown.stdout
    # Limits not given are left as they are.
    assert cli(service_env, "quota", "set", "team-q", "--max-pending", "5").returncode == 0
    after = json.loads(cli(service_env, "quota", "show", "team-q", "--json").stdout)
    assert after == {**view, "limits": {"max_pending": 5}}, after
    assert cli(service_env, "quota", "clear", "team-q").returncode == 0
    assert json.loads(cli(service_env, "quota", "show", "team-q", "--json").stdout)["limits"] == {}


@pytest.mark.processes
@pytest.mark.parametrize("flags", [["--cpus", "lots"], ["--memory", "12Q"], ["--resources", "NPU"], ["--max-pending", "x"]])
def test_quota_set_refuses_bad_values(service_env: dict[str, str], redis_client: redis.Redis, flags: list[str]) -> None:
    done = cli(service_env, "quota", "set", "team-q", *flags)
    assert done.returncode != 0 and done.stderr.strip(), (done.returncode, done.stderr)
    assert redis_client.hgetall(keys.quota("team-q")) == {}


@pytest.mark.processes
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


@pytest.mark.processes
def test_max_pending_counts_only_pending_jobs(app: App, service_env: dict[str, str]) -> None:
    quota(service_env, "team-q", "--max-pending", "2")
    first, _ = accepted(app, "team-q"), accepted(app, "team-q")
    assert submit(app, "team-q").status == 429
    stop(app, "team-q", first)  # a PENDING job stopped is STOPPED: no longer pending
    assert kit.record(app, first, "team-q")["status"] == "STOPPED"
    accepted(app, "team-q")
    assert submit(app, "team-q").status == 429


@pytest.mark.processes
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


@pytest.mark.processes
def test_raising_the_quota_is_effective_at_once(app: App, service_env: dict[str, str]) -> None:
    quota(service_env, "team-q", "--cpus", "2")
    assert submit(app, "team-q", {**JOB, "entrypoint_num_cpus": 4}).status == 400
    quota(service_env, "team-q", "--cpus", "4")
    assert submit(app, "team-q", {**JOB, "entrypoint_num_cpus": 4}).status == 200


# -- the running quota: jobs wait, and are placed when the tenant's usage drops -----------


@pytest.mark.processes
def test_jobs_over_the_cpu_quota_wait_and_are_placed_when_usage_drops(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                                        placement: Placement, redis_client: redis.Redis) -> None:
    add_node(admin, "big", cpus=16)
    quota(service_env, "team-q", "--cpus", "2")
    jobs = [accepted(app, "team-q") for _ in range(3)]
    wait_for(lambda: reserved_cpu(redis_client, "big") == 2000, timeout=SETTLE_S, what="two jobs placed")
    records = {j: kit.record(app, j, "team-q") for j in jobs}
    placed = [j for j, r in records.items() if is_placed(r)]
    waiting = [j for j, r in records.items() if not is_placed(r)]
    assert len(placed) == 2 and len(waiting) == 1, records
    (third,) = waiting
    record = wait_record(app, third, waits_on_quota, "to wait on the tenant quota", tenant="team-q")
    assert record["status"] == "PENDING" and record["error_type"] is None
    assert record["scheduling"]["attempts"] >= 1
    assert record["scheduling"]["reasons"] == [{"reason": QUOTA, "units": 0, "requirement": "CPU: 2000m/2000m"}]
    assert QUOTA in record["message"], record["message"]

    # The node has room for 14 more: another tenant's job is placed meanwhile.
    other = accepted(app, "team-r")
    wait_record(app, other, is_placed, "placed (another tenant)", tenant="team-r")
    time.sleep(1.0)  # several placement rounds and backoffs: the quota still holds
    placement.settle()  # and whatever is ready to be tried has been
    assert not is_placed(kit.record(app, third, "team-q"))
    assert reserved_cpu(redis_client, "big") == 3000

    stop(app, "team-q", placed[0])
    record = wait_record(app, third, is_placed, "placed once the tenant's usage dropped", tenant="team-q")
    assert record["driver_node_id"] == "big"
    assert reserved_cpu(redis_client, "big") == 3000
    assert redis_client.hget(keys.tenant_usage("team-q"), "CPU") == "2000"


@pytest.mark.processes
def test_lowering_the_quota_holds_back_the_next_placements(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                            placement: Placement, redis_client: redis.Redis) -> None:
    add_node(admin, "big", cpus=16)
    first = accepted(app, "team-q")
    wait_record(app, first, is_placed, "placed", tenant="team-q")
    quota(service_env, "team-q", "--cpus", "1")
    second = accepted(app, "team-q")
    record = wait_record(app, second, waits_on_quota, "to wait on the new quota", tenant="team-q")
    assert record["scheduling"]["reasons"][0]["requirement"] == "CPU: 1000m/1000m"
    quota(service_env, "team-q", "--cpus", "3")
    wait_record(app, second, is_placed, "placed once the quota was raised", tenant="team-q")


@pytest.mark.processes
def test_schedule_timeout_while_waiting_on_quota_names_the_quota(app: App, admin: NodeAdmin, service_env: dict[str, str],
                                                                   placement: Placement, redis_client: redis.Redis) -> None:
    add_node(admin, "big", cpus=16)
    quota(service_env, "team-q", "--cpus", "2")
    for _ in range(2):
        accepted(app, "team-q")
    wait_for(lambda: reserved_cpu(redis_client, "big") == 2000, timeout=SETTLE_S, what="two jobs placed")
    job = accepted(app, "team-q", timeout_ms=3000)
    record = wait_record(app, job, lambda r: r["status"] == "FAILED", "to fail at its deadline", tenant="team-q")
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


@pytest.mark.processes
def test_a_tenant_default_schedule_timeout_applies_when_the_header_is_absent(app: App, service_env: dict[str, str],
                                                                              settings: Settings) -> None:
    def waits_ms(submission_id: str, tenant: str) -> int | None:
        found = kit.record(app, submission_id, tenant)
        deadline = found["scheduling"]["deadline"]
        return None if deadline is None else deadline - found["submit_time"]

    before = accepted(app, "team-d", timeout_ms=None)
    quota(service_env, "team-d", "--schedule-timeout-ms", "2500")
    defaulted = accepted(app, "team-d", timeout_ms=None)
    given = accepted(app, "team-d", timeout_ms=0)  # the header still wins: 0 waits forever
    other = accepted(app, "team-e", timeout_ms=None)
    assert waits_ms(before, "team-d") == settings.schedule_timeout_ms
    assert waits_ms(defaulted, "team-d") == 2500
    assert waits_ms(given, "team-d") is None
    assert waits_ms(other, "team-e") == settings.schedule_timeout_ms
    # A resend without the header is the same request, whatever the default is by then.
    quota(service_env, "team-d", "--schedule-timeout-ms", "0")
    again = submit(app, "team-d", {**JOB, "submission_id": defaulted}, timeout_ms=None)
    assert again.status == 200 and again.json["submission_id"] == defaulted, again.body
    assert waits_ms(defaulted, "team-d") == 2500
    refused = cli(service_env, "quota", "set", "team-d", "--schedule-timeout-ms", "-1")
    assert refused.returncode != 0 and "--schedule-timeout-ms" in refused.stderr, refused.stderr


# -- the request rate ------------------------------------------------------------------


def burst(apps: list[App], tenant: str, count: int) -> tuple[list[Result], float]:
    started = time.monotonic()
    results = [call(apps[i % len(apps)], "GET", "/api/jobs", headers={"X-Tenant-Id": tenant}) for i in range(count)]
    return results, time.monotonic() - started


def retry_after(result: Result) -> int:
    text = result.headers.get("Retry-After", "")
    assert text.isdigit() and int(text) >= 1, result.headers
    return int(text)


@pytest.mark.serial
@pytest.mark.processes
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
    assert call(apps[0], "GET", "/livez").status == 200

    time.sleep(wait + 0.2)
    again = call(apps[-1], "GET", "/api/jobs", headers={"X-Tenant-Id": "team-q"})
    assert again.status == 200, (again.status, again.body)
    # Submissions count too.
    results = [submit(apps[0], "team-q") for _ in range(12)]
    assert 429 in [r.status for r in results] and all(r.status in (200, 429) for r in results)


@pytest.mark.serial
@pytest.mark.processes
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
def flooded(app: App, admin: NodeAdmin, placement: Placement, redis_client: redis.Redis) -> list[str]:
    """Tenant A's 2,000 jobs fill a pool of SLOTS slots; then tenant B submits three jobs."""
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
        assert kit.record(app, job, "tenant-b")["driver_node_id"] in ("small-1", "small-2")
