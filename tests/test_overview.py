"""GET /api/overview and the history behind it (poolq/history.py), in-process on the real Redis."""

from __future__ import annotations

from decimal import Decimal

import redis

from api_shim.app import App
from poolq import history, keys
from poolq.nodes import NodeAdmin
from poolq.quotas import set_quota
from poolq.redis_io import now_ms
from poolq.store import JobStore
from tests import kit
from tests.kit import GiB, add_node
from tests.wsgi import call
from worker.duties import Duties
from worker.scheduler import Scheduler


def overview(app: App, tenant: str = "default") -> dict:
    answer = call(app, "GET", "/api/overview", headers={"X-Tenant-Id": tenant})
    assert answer.status == 200, answer.body
    return dict(answer.json)


def test_the_overview_counts_the_tenants_jobs_and_its_quota_use_only(app: App, store: JobStore,
                                                                      admin: NodeAdmin, redis_client: redis.Redis) -> None:
    set_quota(redis_client, "team-a", cpus=Decimal(4), memory=8 * GiB, max_pending=10)
    before = overview(app, "team-a")
    assert before["counts"]["PENDING"] == 0 and before["quota"]["use"] == {}
    assert before["quota"] == {"limits": {"CPU": 4, "memory": 8 * GiB}, "use": {}, "max_pending": 10, "pending": 0}

    add_node(admin, "n1", pool="default")
    for _ in range(3):
        kit.submit(app, tenant="team-a", timeout_ms=0)
    kit.submit(app, tenant="team-b", timeout_ms=0)
    Scheduler(store).place_waiting()
    after = overview(app, "team-a")
    assert after["tenant"] == "team-a" and after["counts"]["PENDING"] == 3
    assert after["quota"]["use"] == {"CPU": 3, "memory": 3 * kit.JOB["entrypoint_memory"]}
    assert after["quota"]["pending"] == 3
    other = overview(app, "team-b")
    assert other["counts"]["PENDING"] == 1 and other["quota"] == {
        "limits": {}, "use": {"CPU": 1, "memory": kit.JOB["entrypoint_memory"]}, "max_pending": None, "pending": 1}


def test_one_sample_is_kept_per_slot_however_often_it_is_offered_and_an_hour_of_them(redis_client: redis.Redis) -> None:
    now = now_ms(redis_client) // history.SLOT_MS * history.SLOT_MS  # a slot's start: now + 1 is in the same slot
    assert history.sample(redis_client, now) is True
    assert history.sample(redis_client, now + 1) is False  # the same slot: another worker's, or a second tick
    assert redis_client.hlen(keys.HISTORY) == 1
    for n in range(1, history.SLOTS + 20):  # 20 slots more than an hour holds
        assert history.sample(redis_client, now + n * history.SLOT_MS) is True
    assert redis_client.hlen(keys.HISTORY) <= history.SLOTS + 2  # the oldest were dropped
    assert len(history.last_hour(redis_client, now + (history.SLOTS + 19) * history.SLOT_MS)) == history.SLOTS


def test_the_history_gives_each_intervals_placements_and_latency(app: App, store: JobStore, admin: NodeAdmin,
                                                                redis_client: redis.Redis) -> None:
    duties = Duties(store, Scheduler(store))
    now = now_ms(redis_client)
    duties.sample_history(now - 2 * history.SLOT_MS)
    for _ in range(4):
        kit.submit(app, timeout_ms=0)
    duties.sample_history(now - history.SLOT_MS)  # 4 waiting, none placed
    add_node(admin, "n1", pool="default", cpus=16, memory=64 * GiB)
    Scheduler(store).place_waiting()
    duties.sample_history(now)
    first, second = overview(app)["history"][-2:]
    assert (first["waiting"], first["placed"], first["latency_p50_ms"]) == (4, 0, None)
    assert (second["waiting"], second["placed"]) == (0, 4)
    assert second["latency_p50_ms"] is not None and second["latency_p50_ms"] <= second["latency_p99_ms"]
    assert second["time"] - first["time"] == history.SLOT_MS
