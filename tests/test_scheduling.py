"""Priorities and holds (docs/scheduling.md), in-process on the real Redis.

Placement runs as a placement worker runs it (``Scheduler.place_waiting``) on static
nodes, so that each test decides when a job ends (``JobStore.finish``) and can look at
the state in between. The rules: within a tenant, higher priority places first, then
older; a job that no node has room for holds the node nearest to fitting it, and jobs of
lower priority are kept off that node until it fits (no starvation by a stream of small
jobs); jobs of the same priority are not; a tenant's default priority applies to its jobs
that name none, and a priority above the tenant's maximum is refused.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.commands.cli import build_parser
from poolq.commands.client import job_body
from poolq.model import ErrorType, JobStatus, priority_of
from poolq.nodes import NodeAdmin
from poolq.quotas import set_quota
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import Ending, JobStore
from tests import kit
from tests.kit import add_node
from tests.procs import wait_for
from tests.wsgi import call
from worker.duties import Duties
from worker.placement import HELD
from worker.scheduler import Scheduler


def body(submission_id: str, cpus: int = 1, **fields: Any) -> dict[str, Any]:
    return {**kit.JOB, "submission_id": submission_id, "entrypoint_num_cpus": cpus, **fields}


def submit(app: App, submission_id: str, cpus: int = 1, tenant: str = "default", **fields: Any) -> None:
    kit.submit(app, body(submission_id, cpus, **fields), tenant=tenant, timeout_ms=0)


def node_of(client: redis.Redis, submission_id: str, tenant: str = "default") -> str | None:
    return client.hget(keys.job(keys.ref(tenant, submission_id)), "node")


def finish(store: JobStore, submission_id: str, tenant: str = "default") -> None:
    assert store.finish(keys.ref(tenant, submission_id), JobStatus.SUCCEEDED) == Ending.MOVED


def placed(client: redis.Redis, ids: list[str]) -> list[str]:
    return [i for i in ids if node_of(client, i)]


# -- priority order --------------------------------------------------------------------


def test_higher_priority_places_first_then_oldest(app: App, store: JobStore, admin: NodeAdmin,
                                                  redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=1, pool="default")
    order = [("app-a", 0), ("app-b", 0), ("app-c", 10), ("app-d", -5), ("app-e", 5), ("app-f", 10)]
    for submission_id, priority in order:
        submit(app, submission_id, priority=priority)
    scheduler, seen = Scheduler(store), []
    for _ in order:
        scheduler.place_waiting()
        now = placed(redis_client, [i for i, _ in order if i not in seen])
        assert len(now) == 1, f"one CPU holds one job at a time, placed {now}"
        seen += now
        finish(store, now[0])
    assert seen == ["app-c", "app-f", "app-e", "app-a", "app-b", "app-d"]


def test_priority_orders_jobs_of_different_shapes_too(app: App, store: JobStore, admin: NodeAdmin,
                                                      redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    submit(app, "app-small-low", cpus=1)
    submit(app, "app-wide-high", cpus=2, priority=1)
    Scheduler(store).place_waiting()
    assert placed(redis_client, ["app-small-low", "app-wide-high"]) == ["app-wide-high"]


def test_a_job_without_priority_keeps_todays_place_in_line(app: App, store: JobStore,
                                                           redis_client: redis.Redis) -> None:
    submit(app, "app-plain")
    fields = redis_client.hgetall(keys.job(keys.ref("default", "app-plain")))
    assert "prio" not in fields and priority_of(int(fields["seq"])) == 0
    assert int(fields["seq"]) == int(redis_client.get(keys.SEQ))
    assert kit.record(app, "app-plain")["priority"] == 0


# -- holds: no starvation of a large job by small ones -------------------------------------


def test_a_large_high_priority_job_is_not_starved_by_a_stream_of_small_ones(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    small = [f"app-s{i}" for i in range(4)]
    for submission_id in small:
        submit(app, submission_id)
    scheduler = Scheduler(store)
    scheduler.place_waiting()
    assert placed(redis_client, small) == small
    submit(app, "app-big", cpus=4, priority=10)
    scheduler.place_waiting()
    assert node_of(redis_client, "app-big") is None
    assert redis_client.hget(keys.node("n1"), "hold"), "the big job holds the node it waits for"
    # A stream of small jobs: each one that ends makes room that a newer small job would take.
    for round_number, submission_id in enumerate(small):
        finish(store, submission_id)
        newcomer = f"app-new{round_number}"
        submit(app, newcomer)
        scheduler.place_waiting()
        assert node_of(redis_client, newcomer) is None, "a lower-priority job took the held capacity"
        assert admin.check() == []
    assert node_of(redis_client, "app-big") == "n1"
    assert redis_client.hget(keys.node("n1"), "hold") is None, "the hold ends once its job is placed"
    finish(store, "app-big")
    scheduler.place_waiting()
    assert placed(redis_client, [f"app-new{i}" for i in range(4)]) == [f"app-new{i}" for i in range(4)]


def test_the_reservation_itself_refuses_a_held_node_whatever_the_worker_believed(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    """A worker whose view does not show the hold yet (made by another worker a moment
    ago) is refused by reserve.lua, reads the node again, and leaves the job waiting."""
    add_node(admin, "n1", cpus=4, pool="default")
    scheduler = Scheduler(store)
    scheduler.refresh()  # its view of n1: no hold
    until = int(redis_client.time()[0]) * 1000 + 60_000
    redis_client.hset(keys.node("n1"), "hold", f"9|another-shape|{until}")  # no inventory log entry
    submit(app, "app-low", priority=8)
    scheduler.place_waiting()
    assert node_of(redis_client, "app-low") is None
    assert [r["reason"] for r in kit.record(app, "app-low")["scheduling"]["reasons"]] == [HELD]
    submit(app, "app-high", priority=9)  # its shape waits out the failed round's backoff first

    def high_placed() -> bool:
        Duties(store, scheduler).unblock_due(int(redis_client.time()[0]) * 1000 + 1000)
        scheduler.place_waiting()
        return node_of(redis_client, "app-high") == "n1"

    wait_for(high_placed, timeout=kit.SETTLE_S, what="a job of the hold's own priority to be placed")


def test_a_hold_keeps_lower_priority_off_one_node_only(app: App, store: JobStore, admin: NodeAdmin,
                                                       redis_client: redis.Redis) -> None:
    add_node(admin, "n-big", cpus=4, pool="default")
    add_node(admin, "n-small", cpus=2, pool="default")
    for i in range(5):
        submit(app, f"app-fill{i}")
    scheduler = Scheduler(store)
    scheduler.place_waiting()
    submit(app, "app-big", cpus=4, priority=1)
    scheduler.place_waiting()
    assert redis_client.hget(keys.node("n-big"), "hold"), "only n-big could ever hold a 4-CPU job"
    assert redis_client.hget(keys.node("n-small"), "hold") is None
    fillers_on_small = [f"app-fill{i}" for i in range(5) if node_of(redis_client, f"app-fill{i}") == "n-small"]
    finish(store, fillers_on_small[0])
    submit(app, "app-backfill")
    scheduler.place_waiting()
    assert node_of(redis_client, "app-backfill") == "n-small", "the node that is not held stays open"


def test_jobs_of_the_same_priority_are_not_held_off(app: App, store: JobStore, admin: NodeAdmin,
                                                    redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    for i in range(4):
        submit(app, f"app-s{i}", priority=3)
    scheduler = Scheduler(store)
    scheduler.place_waiting()
    submit(app, "app-big", cpus=4, priority=3)
    scheduler.place_waiting()
    finish(store, "app-s0")
    submit(app, "app-peer", priority=3)
    scheduler.place_waiting()
    assert node_of(redis_client, "app-peer") == "n1", "equal priority backfills (docs/scheduling.md)"


def test_a_hold_ends_by_itself_when_its_job_goes_away(app: App, store: JobStore, admin: NodeAdmin,
                                                      redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    submit(app, "app-a")
    submit(app, "app-b")
    # Holds last three times the longest backoff and a second: 1.3 s here.
    scheduler = Scheduler(JobStore(store.redis, dataclasses.replace(store.settings, max_backoff_s=0.1)))
    scheduler.place_waiting()
    submit(app, "app-big", cpus=2, priority=5)
    scheduler.place_waiting()
    assert redis_client.hget(keys.node("n1"), "hold")
    assert kit.stop(app, "app-big").json == {"stopped": True}
    finish(store, "app-a")
    submit(app, "app-low", priority=-1)
    scheduler.place_waiting()
    assert node_of(redis_client, "app-low") is None, "the hold outlives its job for a while"

    def low_placed() -> bool:
        Duties(store, scheduler).unblock_due(int(redis_client.time()[0]) * 1000)  # backoffs that ended
        scheduler.place_waiting()
        return node_of(redis_client, "app-low") == "n1"

    wait_for(low_placed, timeout=kit.SETTLE_S, what="the hold of a stopped job to end")


# -- a tenant's default and maximum --------------------------------------------------------


def test_a_tenant_default_priority_applies_to_jobs_that_name_none(app: App, store: JobStore,
                                                                   redis_client: redis.Redis) -> None:
    set_quota(redis_client, "team-a", default_priority=7)
    submit(app, "app-defaulted", tenant="team-a")
    submit(app, "app-own", tenant="team-a", priority=-2)
    assert kit.record(app, "app-defaulted", tenant="team-a")["priority"] == 7
    assert kit.record(app, "app-own", tenant="team-a")["priority"] == -2


def test_a_priority_above_the_tenant_maximum_is_refused_naming_the_field(app: App, redis_client: redis.Redis) -> None:
    set_quota(redis_client, "team-a", max_priority=5)
    answer = kit.post(app, body("app-jump", priority=6), tenant="team-a")
    assert answer.status == 400, answer.text
    assert "priority" in answer.json["fields"]
    assert "5" in answer.json["fields"]["priority"][0]
    assert redis_client.exists(keys.job(keys.ref("team-a", "app-jump"))) == 0
    assert kit.post(app, body("app-ok", priority=5), tenant="team-a").status == 200
    set_quota(redis_client, "team-a", default_priority=9)  # a default above the maximum is refused too
    assert kit.post(app, body("app-defaulted"), tenant="team-a").status == 400


@pytest.mark.parametrize("value", [1001, -1001, 1.5, "high", True])
def test_an_invalid_priority_is_a_400_naming_it(app: App, value: Any) -> None:
    answer = kit.post(app, body("app-bad", priority=value))
    assert answer.status == 400 and "priority" in answer.json["fields"], answer.text


def test_quota_limits_on_priority_are_checked(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="--max-priority"):
        set_quota(redis_client, "team-a", max_priority=5000)
    with pytest.raises(ValueError, match="--priority"):
        set_quota(redis_client, "team-a", default_priority=-1001)


def test_poolq_submit_priority_flag_sets_the_body_field() -> None:
    args = build_parser().parse_args(["submit", "--priority", "7", "--", "true"])
    assert job_body(args)["priority"] == 7
    args = build_parser().parse_args(["submit", "--", "true"])
    assert "priority" not in job_body(args) and "depends_on" not in job_body(args)
    args = build_parser().parse_args(["submit", "--after", "app-a", "--after", "b", "--after-any", "c", "--", "true"])
    assert job_body(args)["depends_on"] == {"afterok": ["app-a", "b"], "afterany": ["c"]}


def test_the_node_listing_shows_a_hold(app: App, admin: NodeAdmin, store: JobStore) -> None:
    add_node(admin, "n1", cpus=1, pool="default")
    submit(app, "app-a")
    scheduler = Scheduler(store)
    scheduler.place_waiting()
    assert call(app, "GET", "/api/nodes").json[0]["held_for"] is None
    submit(app, "app-urgent", priority=2)
    scheduler.place_waiting()
    held_for = call(app, "GET", "/api/nodes").json[0]["held_for"]
    assert held_for is not None and held_for["priority"] == 2


# -- dependencies ------------------------------------------------------------------------


def resolve(store: JobStore, scheduler: Scheduler) -> None:
    """What the duties do for dependencies (as many ticks as it takes), then a placement round."""
    duties = Duties(store, scheduler)
    for _ in range(10):
        duties.resolve_dependencies(0)
        if not store.redis.llen(keys.RESOLVE):
            break
    scheduler.place_waiting()


def test_afterok_waits_for_success_and_its_deadline_starts_when_it_may_run(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    scheduler = Scheduler(store)
    submit(app, "app-first")
    kit.submit(app, body("app-then", depends_on={"afterok": ["first"]}), timeout_ms=5000)  # "first": app- is added
    resolve(store, scheduler)
    assert node_of(redis_client, "app-first") == "n1" and node_of(redis_client, "app-then") is None
    waiting = kit.record(app, "app-then")
    assert waiting["status"] == "PENDING" and waiting["scheduling"]["deadline"] is None
    assert waiting["scheduling"]["reasons"] == [{"reason": "Waiting For Dependencies", "units": 1, "requirement": None}]
    assert waiting["depends_on"] == {"afterok": ["app-first"], "afterany": []}
    finish(store, "app-first")
    resolve(store, scheduler)
    assert node_of(redis_client, "app-then") == "n1"
    record = kit.record(app, "app-then")
    assert record["scheduling"]["deadline"] is not None and record["scheduling"]["reasons"] == []


def test_a_failed_afterok_dependency_fails_its_dependents_down_the_chain(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    scheduler = Scheduler(store)
    submit(app, "app-a")
    submit(app, "app-b", depends_on={"afterok": ["app-a"]})
    submit(app, "app-c", depends_on={"afterok": ["app-b"]})
    submit(app, "app-cleanup", depends_on={"afterany": ["app-b"]})
    resolve(store, scheduler)
    ref = keys.ref("default", "app-a")
    assert store.finish(ref, JobStatus.FAILED, error_type=ErrorType.ENTRYPOINT_FAILED, exit_code=3) == Ending.MOVED
    for _ in range(3):
        resolve(store, scheduler)
    b, c = kit.record(app, "app-b"), kit.record(app, "app-c")
    assert (b["status"], b["error_type"]) == ("FAILED", "DEPENDENCY_FAILED")
    assert "app-a ended FAILED" in b["message"]
    assert (c["status"], c["error_type"]) == ("FAILED", "DEPENDENCY_FAILED")
    assert "app-b ended FAILED" in c["message"]
    assert node_of(redis_client, "app-cleanup") == "n1", "afterany runs whatever its dependency's end"
    assert redis_client.llen(keys.RESOLVE) == 0 and redis_client.hlen(keys.DEPENDENCY_FAILED) == 0


@pytest.mark.slow
def test_a_fan_in_of_a_thousand_dependencies(app: App, store: JobStore, admin: NodeAdmin,
                                             redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=16, memory=1024 * 1024 * 1024 * 1024, pool="default")
    scheduler = Scheduler(store)
    ids = [f"app-part{i}" for i in range(1000)]
    results = kit.submit_batch(app, [body(i) for i in ids], timeout_ms=0)
    assert [r.get("submission_id") for r in results] == ids
    submit(app, "app-merge", depends_on={"afterok": ids})
    assert kit.record(app, "app-merge")["scheduling"]["reasons"][0]["units"] == 1000
    for i in ids[:-1]:
        store.finish(keys.ref("default", i), JobStatus.SUCCEEDED)
    resolve(store, scheduler)
    assert kit.record(app, "app-merge")["scheduling"]["reasons"][0]["units"] == 1
    assert node_of(redis_client, "app-merge") is None
    store.finish(keys.ref("default", ids[-1]), JobStatus.SUCCEEDED)
    resolve(store, scheduler)
    assert node_of(redis_client, "app-merge") == "n1"


def test_a_dependency_that_ended_before_the_submission_resolves_at_once(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    scheduler = Scheduler(store)
    submit(app, "app-done")
    resolve(store, scheduler)
    finish(store, "app-done")
    submit(app, "app-after", depends_on={"afterok": ["app-done"]})
    resolve(store, scheduler)
    assert node_of(redis_client, "app-after") == "n1"


def test_unknown_and_foreign_dependencies_are_refused_naming_the_field(app: App, redis_client: redis.Redis) -> None:
    submit(app, "app-theirs", tenant="team-b")
    for missing in ("app-nowhere", "app-theirs"):
        answer = kit.post(app, body("app-orphan", depends_on={"afterok": [missing]}), tenant="team-a")
        assert answer.status == 400, answer.text
        assert answer.json["fields"]["depends_on.afterok"][0].startswith(f"no job {missing} in tenant team-a")
    assert redis_client.exists(keys.job(keys.ref("team-a", "app-orphan"))) == 0


@pytest.mark.parametrize(
    "depends_on, field",
    [
        ({"afterok": "app-a"}, "depends_on.afterok"),
        ({"afterok": ["Not An Id"]}, "depends_on.afterok"),
        ({}, "depends_on.afterok"),
        ({"after": ["app-a"]}, "depends_on.after"),
        ({"afterok": [f"app-{i}" for i in range(1001)]}, "depends_on.afterok"),
        (["app-a"], "depends_on"),
    ],
)
def test_invalid_dependencies_are_a_400_naming_the_field(app: App, depends_on: Any, field: str) -> None:
    answer = kit.post(app, body("app-bad", depends_on=depends_on))
    assert answer.status == 400 and field in answer.json["fields"], answer.text


def test_stopping_a_job_that_waits_for_dependencies(app: App, store: JobStore, admin: NodeAdmin,
                                                    redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    scheduler = Scheduler(store)
    submit(app, "app-slow")
    submit(app, "app-next", depends_on={"afterany": ["app-slow"]})
    assert kit.stop(app, "app-next").json == {"stopped": True}
    finish(store, "app-slow")
    resolve(store, scheduler)
    assert kit.record(app, "app-next")["status"] == "STOPPED"
    assert node_of(redis_client, "app-next") is None
    assert admin.check() == []


# -- weighted fair share -------------------------------------------------------------------


@pytest.mark.serial
def test_weights_three_to_one_share_the_cpu_seconds_three_to_one(settings: Settings, redis_client: redis.Redis) -> None:
    """Two tenants keep a 4-CPU node saturated with 1-CPU jobs of about 0.2 s; tenant a has
    weight 3, b weight 1. Over the run, a's jobs hold 70-80 % of the CPU-seconds."""
    store = JobStore(connect(settings), dataclasses.replace(settings, fair_share_half_life_s=5.0))
    admin, scheduler = NodeAdmin(store), Scheduler(store)
    add_node(admin, "n1", cpus=4, pool="default")
    set_quota(redis_client, "a", weight=3)
    set_quota(redis_client, "b", weight=1)
    backlog = {t: [store.prepare({**kit.JOB}, tenant=t, schedule_timeout_ms=0) for _ in range(400)] for t in "ab"}
    for jobs in backlog.values():
        assert all(outcome is True for outcome in store.submit_many(jobs))
    started: dict[str, float] = {}
    used = {"a": 0.0, "b": 0.0}
    end = time.monotonic() + 12.0
    while time.monotonic() < end:
        now = time.monotonic()
        for ref, at in list(started.items()):
            if now - at >= 0.2:
                store.finish(ref, JobStatus.SUCCEEDED)
                used[keys.split_ref(ref)[0]] += now - at
                del started[ref]
        scheduler.unblock_on_kick()
        scheduler.round()
        for ref in redis_client.smembers(keys.node_jobs("n1")):
            started.setdefault(ref, time.monotonic())
        time.sleep(0.02)
    share = used["a"] / (used["a"] + used["b"])
    assert 0.70 <= share <= 0.80, f"tenant a held {share:.0%} of the CPU-seconds ({used})"
    assert admin.check() == []


def test_a_round_fills_from_many_shapes_and_a_tenant_behind_them_gets_its_turn(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=1000, memory=1 << 40, pool="default")
    # 300 jobs of "many", each of its own shape (its memory), all older than "late"'s one job.
    bodies = [body(f"app-m{i}", entrypoint_memory=(128 << 20) + i * (1 << 20)) for i in range(300)]
    answer = call(app, "POST", "/api/jobs/batch", {"jobs": bodies},
                  headers={"X-Tenant-Id": "many", "X-Schedule-Timeout-Ms": "0"})
    assert answer.status == 200 and [r for r in answer.json["results"] if "submission_id" not in r] == []
    assert redis_client.zcard(keys.SHAPES_READY) == 300
    submit(app, "app-late", tenant="late")
    scheduler = Scheduler(store)
    claimed = scheduler.round()  # one round: a round's worth of jobs, not a few shapes' (placement.md)
    assert claimed == store.settings.placement_batch == 256
    assert node_of(redis_client, "app-late", "late") == "n1", "the tenant behind 300 shapes waits no round"
    many = [f"app-m{i}" for i in range(300)]
    placed_many = [i for i in many if node_of(redis_client, i, "many")]
    assert placed_many == many[:255], "the oldest shapes first"
    scheduler.place_waiting()
    assert all(node_of(redis_client, i, "many") for i in many) and admin.check() == []


def batch(app: App, tenant: str, bodies: list[dict[str, Any]]) -> None:
    answer = call(app, "POST", "/api/jobs/batch", {"jobs": bodies},
                  headers={"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})
    assert answer.status == 200 and [r for r in answer.json["results"] if "submission_id" not in r] == []


def test_a_round_keeps_priorities_across_a_tenants_shapes(app: App, store: JobStore, admin: NodeAdmin,
                                                            redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=1000, memory=1 << 40, pool="default")
    # Shape X is the oldest ready (its head is priority 10), but 300 jobs of priority 0 follow
    # its head; shape Y holds 300 of priority 5. The round's 256: X's head and 255 of Y.
    wide = 129 << 20
    batch(app, "p", [body("app-x-high", priority=10)] + [body(f"app-x{i}") for i in range(300)])
    batch(app, "p", [body(f"app-y{i}", priority=5, entrypoint_memory=wide) for i in range(300)])
    assert Scheduler(store).round() == 256
    assert node_of(redis_client, "app-x-high", "p") == "n1"
    assert sum(1 for i in range(300) if node_of(redis_client, f"app-y{i}", "p")) == 255
    assert not any(node_of(redis_client, f"app-x{i}", "p") for i in range(300))


def test_a_tenant_of_many_small_shapes_has_its_share_beside_a_deep_one(app: App, store: JobStore, admin: NodeAdmin,
                                                                       redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=1000, memory=1 << 40, pool="default")
    batch(app, "deep", [body(f"app-d{i}") for i in range(300)])  # one shape, oldest
    batch(app, "thin", [body(f"app-t{i}", entrypoint_memory=(130 << 20) + (i << 12)) for i in range(300)])
    assert Scheduler(store).round() == 256
    deep = sum(1 for i in range(300) if node_of(redis_client, f"app-d{i}", "deep"))
    thin = sum(1 for i in range(300) if node_of(redis_client, f"app-t{i}", "thin"))
    assert deep + thin == 256 and abs(deep - thin) <= 2, (deep, thin)  # equal weights: turns go round


def test_a_tenant_that_used_less_lately_goes_first(app: App, store: JobStore, admin: NodeAdmin,
                                                   redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=1, pool="default")
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    # heavy used 50 CPU-seconds just now; old used 400 five half-lives ago: 12.5 left
    redis_client.hset(keys.FAIR_SHARE, mapping={"heavy": "50000", "heavy@": str(now_ms),
                                                "old": "400000", "old@": str(now_ms - 300_000)})
    submit(app, "app-heavy", tenant="heavy")
    submit(app, "app-old", tenant="old")
    Scheduler(store).place_waiting()
    assert node_of(redis_client, "app-old", "old") == "n1", "past use decays by its half-life (60 s)"
    assert node_of(redis_client, "app-heavy", "heavy") is None


def test_use_is_charged_exactly_when_what_a_tenant_holds_changes(app: App, store: JobStore, admin: NodeAdmin,
                                                                 redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    submit(app, "app-two", cpus=2, tenant="t")
    Scheduler(store).place_waiting()
    assert float(redis_client.hget(keys.FAIR_SHARE, "t")) == 0.0  # nothing held before it
    time.sleep(0.5)
    finish(store, "app-two", tenant="t")
    used = float(redis_client.hget(keys.FAIR_SHARE, "t"))
    assert 900 <= used <= 1500, used  # 2 CPUs for about half a second, in milli-CPU-seconds


def test_a_weight_must_be_positive(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="--weight"):
        set_quota(redis_client, "team-a", weight=0)


def test_a_full_pool_is_not_claimed_and_given_back_a_round_at_a_time(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    """400 jobs wait for 8 CPUs. Each time some finish, a round claims about as many as
    fit (scheduler.claim_size), not placement_batch to give nearly all of them back: the
    claims a job goes through, placed or given back, stay near one."""
    add_node(admin, "n1", cpus=8, memory=1 << 40, pool="default")
    ids = [f"app-f{i}" for i in range(400)]
    answer = call(app, "POST", "/api/jobs/batch", {"jobs": [body(i) for i in ids]},
                  headers={"X-Schedule-Timeout-Ms": "0"})
    assert answer.status == 200
    scheduler, claimed, done = Scheduler(store), 0, 0
    while done < len(ids):
        claimed += scheduler.place_waiting()
        running = placed(redis_client, ids[done:])
        assert len(running) == 8 or done + len(running) == len(ids), "the node is kept full"
        for submission_id in running:
            finish(store, submission_id)
        done += len(running)
    assert claimed <= 3 * len(ids), f"{claimed} claims for {len(ids)} jobs"
    assert admin.check() == []
