"""The tenants' status counts (``poolq:tenant:<t>:counts``, the ``poolq_jobs`` gauge) never
go negative, and a count that drifted is recounted from the jobs (issue 11, item 2).

The drift seen: two ``poolq up`` in one checkout ran two redis-servers on one append-only
file; each applied the same change of status to its own copy, the file held both, and
its replay counted the change twice (PENDING read -1). The test does exactly that with
two real redis-servers on one directory, then replays the file in a third.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import redis

from api_shim.app import App
from poolq import keys
from poolq.embedded import EmbeddedRedis
from poolq.settings import Settings
from poolq.store import JobStore
from tests import kit
from tests.kit import JOB
from tests.procs import wait_for
from tests.test_metrics import scrape

TENANT = "counted"


def counts(client: redis.Redis, tenant: str = TENANT) -> dict[str, int]:
    return {status: int(n) for status, n in client.hgetall(keys.tenant_counts(tenant)).items()}


def test_one_change_in_two_servers_appending_to_one_file_replays_to_no_negative_count(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    first = EmbeddedRedis(directory)
    first.start()
    second = EmbeddedRedis(directory)
    try:
        # Each write in the file before its reply: with everysec, a busy disk lets Redis
        # answer before it writes, and the second server would load the file without it.
        redis.Redis.from_url(first.url).config_set("appendfsync", "always")
        app_1 = App(Settings(redis_url=first.url, data_dir=tmp_path / "d1"), waker=lambda queue: None)
        submission_id = kit.submit(app_1, copy.deepcopy(JOB), tenant=TENANT, timeout_ms=0)
        client_1 = redis.Redis.from_url(first.url, decode_responses=True)
        assert counts(client_1) == {"PENDING": 1}
        # The second server loads the file the first appends to: the job, PENDING 1.
        second.start()
        client_2 = redis.Redis.from_url(second.url, decode_responses=True)
        assert counts(client_2) == {"PENDING": 1}
        app_2 = App(Settings(redis_url=second.url, data_dir=tmp_path / "d2"), waker=lambda queue: None)
        # The same change in each: PENDING -> STOPPED, appended to the one file twice.
        for app in (app_1, app_2):
            assert kit.stop(app, submission_id, TENANT).json == {"stopped": True}
        assert counts(client_1) == counts(client_2) == {"PENDING": 0, "STOPPED": 1}
    finally:
        second.stop()
        first.stop()
    replayed = EmbeddedRedis(directory)
    replayed.start()
    try:
        client = redis.Redis.from_url(replayed.url, decode_responses=True)
        assert client.hget(keys.job(keys.ref(TENANT, submission_id)), "status") == "STOPPED"
        # Written as deltas, the replay gave PENDING -1 and STOPPED 2.
        assert counts(client) == {"PENDING": 0, "STOPPED": 1}
        metrics = scrape(App(Settings(redis_url=replayed.url, data_dir=tmp_path / "d3"), waker=lambda queue: None))
        assert metrics.value("poolq_jobs", status="PENDING") == 0
        assert all(value >= 0 for value in metrics.labelled("poolq_jobs").values())
    finally:
        replayed.stop()


def test_a_recount_makes_pending_and_running_match_the_jobs(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    ids = [kit.submit(app, copy.deepcopy(JOB), tenant=TENANT, timeout_ms=0) for _ in range(3)]
    kit.stop(app, ids[0], TENANT)
    assert counts(redis_client) == {"PENDING": 2, "STOPPED": 1}
    assert store.recount(TENANT) is False  # right already: nothing changes
    redis_client.hset(keys.tenant_counts(TENANT), mapping={"PENDING": -1, "RUNNING": 4, "FAILED": -2})
    assert store.recount(TENANT) is True
    assert counts(redis_client) == {"PENDING": 2, "RUNNING": 0, "STOPPED": 1, "FAILED": 0}
    assert store.recount(TENANT) is False


def test_a_tenant_with_more_live_jobs_than_a_recount_reads_is_left_alone(app: App, store: JobStore,
                                                                        redis_client: redis.Redis) -> None:
    for _ in range(3):
        kit.submit(app, copy.deepcopy(JOB), tenant=TENANT, timeout_ms=0)
    redis_client.hset(keys.tenant_counts(TENANT), "PENDING", 7)
    assert store.recount(TENANT, most=2) is None
    assert counts(redis_client)["PENDING"] == 7
    assert store.recount(TENANT, most=3) is True
    assert counts(redis_client)["PENDING"] == 3


def test_the_duties_recount_a_drifted_tenant(app: App, start_placement: Callable[..., Any],
                                             redis_client: redis.Redis) -> None:
    kit.submit(app, copy.deepcopy(JOB), tenant=TENANT, timeout_ms=0)
    redis_client.hset(keys.tenant_counts(TENANT), "PENDING", -1)
    start_placement()  # its duties check every tenant on their first tick
    wait_for(lambda: counts(redis_client)["PENDING"] == 1, timeout=30, what="the duties to recount the tenant")
