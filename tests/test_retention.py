"""Retention and bounded Redis (docs/jobs.md: POOLQ_RETENTION_S, POOLQ_MAX_TERMINAL_JOBS;
2.1 and docs/errors.md: 503 when Redis is full, never a 500 and never an evicted job).

The periodic duties (retention among them) run in the test's process, as a placement
worker runs them (``start_placement``), with a short retention; jobs are submitted with the batch endpoint onto a static node and made
terminal through real paths: ``POST /api/jobs/{id}/stop`` and the scheduling deadline.
Bounds are generous: the point is "back to where it started", not a figure.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.embedded import EmbeddedRedis
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from poolq.store import JobStore
from tests import kit
from tests.kit import JOB, GiB, MiB, add_node
from tests.procs import wait_for
from tests.wsgi import Result, call

FITS = JOB
NEVER_FITS = {**FITS, "entrypoint": "sleep 1", "entrypoint_num_cpus": 8}  # the node has 4 CPUs
RETENTION_S = 2


# -- helpers -------------------------------------------------------------------------


def submit_batch(app: App, tenant: str, jobs: list[dict[str, Any]], timeout_ms: int = 0) -> list[str]:
    results = kit.submit_batch(app, jobs, tenant=tenant, timeout_ms=timeout_ms)
    ids = [item.get("submission_id") for item in results]
    assert all(ids), [item for item in results if "submission_id" not in item][:3]
    return ids


def stop_all(app: App, tenant: str, ids: list[str], threads: int = 4) -> None:
    def stop(submission_id: str) -> int:
        return call(app, "POST", f"/api/jobs/{submission_id}/stop", headers={"X-Tenant-Id": tenant}).status

    with ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(stop, ids, chunksize=64))
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def poolq_keys(client: redis.Redis) -> list[str]:
    return list(client.scan_iter("poolq:*", count=5000))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def structure_sizes(client: redis.Redis, tenants: list[str]) -> dict[str, int]:
    """The size of every collection that grows with jobs, to name the one that did not shrink."""
    pipe = client.pipeline(transaction=False)
    named = {
        "terminal": (pipe.zcard, keys.TERMINAL), "deadlines": (pipe.zcard, keys.DEADLINES),
        "claimed": (pipe.zcard, keys.CLAIMED), "shapes:ready": (pipe.zcard, keys.SHAPES_READY),
        "shapes:blocked": (pipe.zcard, keys.SHAPES_BLOCKED), "shapes:idle": (pipe.zcard, keys.SHAPES_IDLE),
        "tenants": (pipe.scard, keys.TENANTS), "stats fields": (pipe.hlen, keys.STATS),
    }
    for tenant in tenants:
        named[f"tenant {tenant} jobs"] = (pipe.zcard, keys.tenant_jobs(tenant))
        named[f"tenant {tenant} active"] = (pipe.zcard, keys.tenant_active(tenant))
        named[f"tenant {tenant} counts fields"] = (pipe.hlen, keys.tenant_counts(tenant))
    for command, key in named.values():
        command(key)
    sizes = dict(zip(named, pipe.execute()))
    found = poolq_keys(client)
    sizes["job hashes"] = sum(k.startswith("poolq:job:") for k in found)
    sizes["logs"] = sum(k.startswith("poolq:log:") for k in found)
    sizes["shape hashes"] = sum(k.startswith("poolq:shape:") and not k.endswith(":q") for k in found)
    sizes["shape queues"] = sum(k.startswith("poolq:shape:") and k.endswith(":q") for k in found)
    return sizes


# -- retention: everything a job leaves in Redis goes away ------------------------------


JOBS = 20_000


@pytest.mark.slow
def test_twenty_thousand_jobs_leave_redis_as_it_was(app: App, admin: NodeAdmin, redis_client: redis.Redis,
                                                    start_placement: Any) -> None:
    start_placement({"POOLQ_RETENTION_S": str(RETENTION_S), "POOLQ_MAX_TERMINAL_JOBS": str(10 * JOBS)})
    add_node(admin, "keep", cpus=4, memory=64 * GiB)

    # Warm up with both shapes, so the baseline holds what stays by design (the node,
    # one hash per shape, the counters) and the figures below count only what jobs leave.
    warm = submit_batch(app, "t-stop", [FITS] * 10) + submit_batch(app, "t-deadline", [NEVER_FITS] * 10, timeout_ms=1)
    stop_all(app, "t-stop", warm[:10])
    tenants = ["t-stop", "t-deadline"]
    wait_for(lambda: redis_client.zcard(keys.TERMINAL) == 0 and structure_sizes(redis_client, tenants)["job hashes"] == 0,
             timeout=60, what="the warm-up jobs to be removed")
    baseline_keys, baseline_memory = len(poolq_keys(redis_client)), used_memory(redis_client)

    # 20,000 jobs: half stopped by their caller (placed or still waiting), half failed by
    # their scheduling deadline (they ask for more than any node has).
    stopped: list[str] = []
    for _ in range(JOBS // 2 // 1000):
        stopped += submit_batch(app, "t-stop", [FITS] * 1000)
        submit_batch(app, "t-deadline", [NEVER_FITS] * 1000, timeout_ms=1)
    peak_keys, peak_memory = len(poolq_keys(redis_client)), used_memory(redis_client)
    assert peak_keys >= baseline_keys + JOBS // 2, (baseline_keys, peak_keys)  # the jobs were really there
    stop_all(app, "t-stop", stopped)

    def drained() -> bool:
        sizes = structure_sizes(redis_client, tenants)
        return sizes["job hashes"] == 0 and sizes["terminal"] == 0 and sizes["deadlines"] == 0

    wait_for(drained, timeout=150, interval=0.5, what="every terminal job to be removed after its retention")
    sizes = structure_sizes(redis_client, tenants)
    assert sizes["logs"] == 0 and sizes["claimed"] == 0, sizes
    for tenant in tenants:
        assert sizes[f"tenant {tenant} jobs"] == 0 and sizes[f"tenant {tenant} active"] == 0, sizes
        assert sizes[f"tenant {tenant} counts fields"] <= 5, sizes  # one per status at most
    assert sizes["tenants"] == 2, sizes
    assert sizes["shape hashes"] <= 2 and sizes["shape queues"] <= 2, sizes  # one per distinct shape
    assert sizes["shapes:ready"] + sizes["shapes:blocked"] + sizes["shapes:idle"] <= 2, sizes
    assert sizes["stats fields"] <= 40, sizes

    final_keys, final_memory = len(poolq_keys(redis_client)), used_memory(redis_client)
    assert final_keys <= baseline_keys + 5, (baseline_keys, peak_keys, final_keys, sizes)
    grown = final_memory - baseline_memory
    assert grown < (peak_memory - baseline_memory) / 4 and grown < 8 * MiB, (baseline_memory, peak_memory, final_memory)
    # The service still works after all that.
    again = submit_batch(app, "t-stop", [FITS])
    assert call(app, "GET", f"/api/jobs/{again[0]}", headers={"X-Tenant-Id": "t-stop"}).status == 200


@pytest.mark.slow
def test_a_terminal_job_is_kept_for_the_retention_period_then_removed(app: App, admin: NodeAdmin, redis_client: redis.Redis,
                                                                      start_placement: Any) -> None:
    retention_s = 4
    start_placement({"POOLQ_RETENTION_S": str(retention_s)})
    (job,) = submit_batch(app, "t", [FITS])
    assert call(app, "POST", f"/api/jobs/{job}/stop", headers={"X-Tenant-Id": "t"}).json == {"stopped": True}
    record = call(app, "GET", f"/api/jobs/{job}", headers={"X-Tenant-Id": "t"})
    assert record.status == 200 and record.json["status"] == "STOPPED", record.body
    end_ms = record.json["end_time"]

    def now_ms() -> int:
        seconds, micros = redis_client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # Kept while its retention runs (checked only while well inside it).
    while now_ms() < end_ms + retention_s * 1000 - 1500:
        found = call(app, "GET", f"/api/jobs/{job}", headers={"X-Tenant-Id": "t"})
        assert found.status == 200, f"removed {now_ms() - end_ms} ms after it ended, before its {retention_s} s retention"
        time.sleep(0.2)
    # Then removed: record, listing and index entries.
    wait_for(lambda: call(app, "GET", f"/api/jobs/{job}", headers={"X-Tenant-Id": "t"}).status == 404, timeout=60,
             what="the job to be removed after its retention")
    assert call(app, "GET", "/api/jobs", headers={"X-Tenant-Id": "t"}).json == []
    assert redis_client.zcard(keys.TERMINAL) == 0 and redis_client.zcard(keys.tenant_jobs("t")) == 0


def test_max_terminal_jobs_keeps_the_newest(app: App, redis_client: redis.Redis, start_placement: Any) -> None:
    cap = 100
    start_placement({"POOLQ_MAX_TERMINAL_JOBS": str(cap)})
    groups = [submit_batch(app, "t", [FITS] * cap) for _ in range(3)]
    live = submit_batch(app, "t", [FITS] * 5)  # never ended: never removed
    for group in groups:  # end them oldest group first, each group later than the one before
        stop_all(app, "t", group)
        time.sleep(0.05)

    wait_for(lambda: redis_client.zcard(keys.TERMINAL) == cap and redis_client.zcard(keys.tenant_jobs("t")) == cap + 5,
             timeout=60, what=f"the terminal jobs to be cut to {cap}")
    time.sleep(1.0)  # several duty ticks: the cut holds, nothing more goes
    assert redis_client.zcard(keys.TERMINAL) == cap

    def status(submission_id: str) -> int:
        return call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": "t"}).status

    assert [status(j) for j in groups[0] + groups[1]] == [404] * (2 * cap)
    assert [status(j) for j in groups[2]] == [200] * cap
    assert [status(j) for j in live] == [200] * 5
    listed = call(app, "GET", "/api/jobs?limit=1000", headers={"X-Tenant-Id": "t"}).json
    assert sorted(r["submission_id"] for r in listed) == sorted(groups[2] + live)


# -- Redis full: 503, never 500, nothing evicted ---------------------------------------


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "small-redis", appendonly=False, maxmemory="4mb")
    server.start()
    yield server
    server.stop()


CREATE_FAILED = re.compile(r"^create app failed, submissionId:\[(app-[a-z0-9-]+)\], err: .+", re.S)


def test_redis_full_answers_503_and_keeps_every_accepted_job(small_redis: EmbeddedRedis, tmp_path: Path) -> None:
    client = redis.Redis.from_url(small_redis.url, decode_responses=True)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    app = App(Settings(redis_url=small_redis.url, data_dir=tmp_path / "data"))
    body = {**FITS, "metadata": {"pad": "x" * 2000}}  # a bigger record fills Redis sooner
    accepted: list[str] = []
    refusals: list[Result] = []
    for number in range(20_000):
        submission_id = f"app-fill-{number}"
        started = time.monotonic()
        result = call(app, "POST", "/api/jobs", {**body, "submission_id": submission_id})
        assert time.monotonic() - started < 10, "a submission to a full Redis hung"
        assert result.status in (200, 503), (result.status, result.body)
        if result.status == 200:
            accepted.append(submission_id)
            continue
        found = CREATE_FAILED.match(result.json["error"])
        assert found and found.group(1) == submission_id, result.json
        refusals.append(result)
        if len(refusals) == 5:
            break
    assert len(accepted) > 100 and len(refusals) == 5, (len(accepted), len(refusals))

    # A batch is refused as a whole with its own text; reads still work; never a 500. (Redis
    # is put well past its limit first: right at it, a write that frees a little lets the
    # next one in, and part of a batch may be stored.)
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] // 2))
    batch = call(app, "POST", "/api/jobs/batch", {"jobs": [{**body, "submission_id": f"app-batch-{i}"} for i in range(20)]})
    assert batch.status == 503, (batch.status, batch.body)
    assert batch.json["error"].startswith("create app failed for the batch, err: "), batch.json
    invalid = call(app, "POST", "/api/jobs", {"entrypoint": ""})
    assert invalid.status == 400, invalid.body  # a bad request is still told what is wrong
    assert call(app, "GET", "/livez").status == 200
    stop = call(app, "POST", f"/api/jobs/{accepted[0]}/stop")
    assert stop.status in (200, 503), (stop.status, stop.body)

    # Nothing accepted was evicted or lost.
    assert client.info("stats")["evicted_keys"] == 0
    for start in range(0, len(accepted), 100):
        chunk = accepted[start:start + 100]
        listed = call(app, "GET", "/api/jobs?ids=" + ",".join(chunk))
        assert listed.status == 200, listed.body
        assert sorted(r["submission_id"] for r in listed.json) == sorted(chunk)
    assert call(app, "GET", f"/api/jobs/{accepted[-1]}").json["submission_id"] == accepted[-1]

    # Once Redis has room again, retrying the refused requests (same ids) is safe.
    client.config_set("maxmemory", "0")
    for result in refusals[:2]:
        submission_id = CREATE_FAILED.match(result.json["error"]).group(1)  # type: ignore[union-attr]
        retried = call(app, "POST", "/api/jobs", {**body, "submission_id": submission_id})
        assert retried.status == 200, retried.body
    retried = call(app, "POST", "/api/jobs/batch", {"jobs": [{**body, "submission_id": f"app-batch-{i}"} for i in range(20)]})
    assert retried.status == 200 and all("submission_id" in item for item in retried.json["results"]), retried.body
    assert len(client.keys("poolq:job:*")) == len(accepted) + 2 + 20
    client.close()


def test_a_tenant_with_no_job_left_is_forgotten(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    from worker.duties import Duties
    from worker.scheduler import Scheduler

    body = {"entrypoint": "true", "runtime_env": {"working_dir": "/tmp"}, "submission_id": "app-gone"}
    assert call(app, "POST", "/api/jobs", body, headers={"X-Tenant-Id": "ephemeral"}).status == 200
    assert call(app, "POST", "/api/jobs/app-gone/stop", headers={"X-Tenant-Id": "ephemeral"}).json == {"stopped": True}
    duties = Duties(store, Scheduler(store))
    duties.forget_idle_tenants(0)
    assert redis_client.sismember(keys.TENANTS, "ephemeral")  # it still has a (finished) job
    assert call(app, "DELETE", "/api/jobs/app-gone", headers={"X-Tenant-Id": "ephemeral"}).json == {"deleted": True}
    duties._next_tenant_check = 0
    duties.forget_idle_tenants(0)
    assert not redis_client.sismember(keys.TENANTS, "ephemeral")
    assert not redis_client.exists(keys.tenant_counts("ephemeral"), keys.tenant_active("ephemeral"))
    assert not [f for f in redis_client.hkeys(keys.STATS) if f.startswith("submissions:ephemeral:")]
