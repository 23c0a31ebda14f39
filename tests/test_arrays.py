"""Job arrays (docs/scheduling.md, "Arrays"), in-process on the real Redis.

An array is accepted as one record whatever its size; placement creates its tasks as it
reaches them (claim.lua), each a job of its own named ``<array id>-<index>``; a task not
reached yet answers a PENDING record made from the array's; list, stop and delete act on
the whole array by its id, and on each task by its own; the tenant's counts and max
pending count every task.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.model import JobStatus
from poolq.nodes import NodeAdmin
from poolq.quotas import set_quota
from poolq.store import Ending, JobStore
from tests import kit
from tests.kit import add_node
from tests.test_agent import PLACEMENT_DEADLINE_MS, start_node  # noqa: F401 (a fixture)
from tests.wsgi import call
from worker.duties import Duties
from worker.scheduler import CLAIM_FLOOR, Scheduler


def array_body(submission_id: str, count: int, **fields: Any) -> dict[str, Any]:
    return {**kit.JOB, "submission_id": submission_id, "array": {"count": count}, **fields}


def counts(client: redis.Redis, tenant: str = "default") -> dict[str, int]:
    return {k: int(v) for k, v in client.hgetall(keys.tenant_counts(tenant)).items()}


def records(client: redis.Redis, tenant: str = "default") -> int:
    """How many job records of the tenant exist in Redis."""
    return sum(1 for _ in client.scan_iter(f"{keys.JOB_PREFIX}{tenant}:*", count=1000))


def listing(app: App, query: str) -> tuple[list[dict[str, Any]], str | None]:
    result = call(app, "GET", f"/api/jobs?{query}")
    assert result.status == 200, result.body
    return list(result.json), result.headers.get("Link")


def finish_all_placed(store: JobStore, client: redis.Redis, ids: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for submission_id in ids:
        pipe.hmget(keys.job(keys.ref("default", submission_id)), ["node", "status"])
    for submission_id, (node, status) in zip(ids, pipe.execute()):
        if node and status == "PENDING":
            assert store.finish(keys.ref("default", submission_id), JobStatus.SUCCEEDED) == Ending.MOVED


def test_an_array_of_10000_is_one_request_and_one_record(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    kit.submit(app, array_body("app-big", 10_000), timeout_ms=0)
    assert records(redis_client) == 1, "the array is stored once, its tasks not yet"
    assert counts(redis_client)["PENDING"] == 10_000
    whole = kit.record(app, "app-big")
    assert whole["status"] == "PENDING"
    assert whole["array"] == {
        "count": 10_000,
        "created": 0,
        "tasks": {"PENDING": 10_000, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0, "STOPPED": 0},
    }
    task = kit.record(app, "app-big-9999")
    assert task["submission_id"] == "app-big-9999"
    assert (task["status"], task["array_id"], task["array_index"]) == ("PENDING", "app-big", 9999)
    assert task["entrypoint"] == "true" and task["scheduling"]["deadline"] is None
    assert call(app, "GET", "/api/jobs/app-big-10000").status == 404
    assert call(app, "GET", "/api/jobs/app-big-0017").status == 404, "not a task's id"
    assert records(redis_client) == 1, "reading a task writes nothing"
    logs = call(app, "GET", "/api/jobs/app-big-17/logs")
    assert (logs.status, logs.json) == (200, {"logs": ""})


def test_placement_creates_tasks_as_it_reaches_them(app: App, store: JobStore, admin: NodeAdmin,
                                                    redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=3, pool="default")
    kit.submit(app, array_body("app-arr", 600), timeout_ms=0)
    Scheduler(store).place_waiting()
    placed = [i for i in range(300) if kit.record(app, f"app-arr-{i}")["driver_node_id"]]
    assert placed == [0, 1, 2], "three fit, in index order"
    # A round claims what the node's free CPU could take, and at least CLAIM_FLOOR (scheduler.claim_size):
    # of 600 tasks, only those are created.
    batch = max(3, CLAIM_FLOOR)
    assert records(redis_client) == 1 + batch, "the array, and the tasks of the round that reached it"
    assert kit.record(app, "app-arr-3")["status"] == "PENDING"
    assert kit.record(app, "app-arr")["array"]["created"] == batch
    add_node(admin, "n2", cpus=64, pool="default")
    scheduler, ids = Scheduler(store), [f"app-arr-{i}" for i in range(600)]
    for _ in range(400):
        finish_all_placed(store, redis_client, ids)
        scheduler.place_waiting()
        if not redis_client.hget(keys.job("default:app-arr"), "n:PENDING") == "0":
            continue
        break
    whole = kit.record(app, "app-arr")
    assert whole["status"] == "SUCCEEDED" and whole["array"]["tasks"]["SUCCEEDED"] == 600
    assert counts(redis_client)["PENDING"] == 0 and counts(redis_client)["SUCCEEDED"] == 600
    assert redis_client.zscore(keys.TERMINAL, "default:app-arr") is not None, "the array ended with its last task"


def test_listing_an_array_by_its_id_pages_through_its_tasks(app: App, store: JobStore, admin: NodeAdmin) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    kit.submit(app, array_body("app-l", 7), timeout_ms=0)
    Scheduler(store).place_waiting()
    page, link = listing(app, "array=app-l&limit=3")
    assert [r["array_index"] for r in page] == [0, 1, 2]
    assert [r["driver_node_id"] is not None for r in page] == [True, True, False]
    assert link is not None and "start=3" in link
    page, link = listing(app, "array=app-l&limit=3&start=6")
    assert [r["submission_id"] for r in page] == ["app-l-6"] and link is None
    tenant_list, _ = listing(app, "limit=10")
    assert {r["submission_id"] for r in tenant_list} == {"app-l", *(f"app-l-{i}" for i in range(7))}
    assert call(app, "GET", "/api/jobs?array=app-none").status == 404
    both, _ = listing(app, "array=app-l&ids=app-l-2,app-other")
    assert [r["submission_id"] for r in both] == ["app-l-2"], "ids of the array's tasks only"


def test_stopping_an_array_stops_its_tasks_and_creates_no_more(app: App, store: JobStore, admin: NodeAdmin,
                                                               redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    kit.submit(app, array_body("app-s", 1000), timeout_ms=0)
    Scheduler(store).place_waiting()
    result = kit.stop(app, "app-s")
    assert (result.status, result.json) == (200, {"stopped": True})
    Scheduler(store).place_waiting()
    whole = kit.record(app, "app-s")
    assert whole["status"] == "STOPPED"
    batch = max(2, CLAIM_FLOOR)  # what the first round claimed (scheduler.claim_size)
    assert whole["array"]["tasks"]["STOPPED"] == 1000 and whole["array"]["created"] == batch
    assert kit.record(app, "app-s-0")["status"] == "STOPPED"
    late = kit.record(app, "app-s-999")
    assert (late["status"], late["error_type"]) == ("STOPPED", "STOPPED_BY_USER")
    assert records(redis_client) == 1 + batch, "the tasks never reached stay without records"
    assert {s: counts(redis_client).get(s, 0) for s in ("PENDING", "RUNNING", "STOPPED")} == {
        "PENDING": 0, "RUNNING": 0, "STOPPED": 1000}
    assert redis_client.hgetall(keys.node("n1"))["res:CPU"] == "0"
    again = kit.stop(app, "app-s")
    assert (again.status, again.json) == (200, {"stopped": False})


def test_one_task_can_be_stopped_before_placement_reaches_it(app: App, store: JobStore, admin: NodeAdmin,
                                                             redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=8, pool="default")
    kit.submit(app, array_body("app-t", 4), timeout_ms=0)
    assert kit.stop(app, "app-t-2").json == {"stopped": True}
    assert kit.record(app, "app-t-2")["status"] == "STOPPED"
    Scheduler(store).place_waiting()
    nodes = [kit.record(app, f"app-t-{i}")["driver_node_id"] for i in range(4)]
    assert nodes == ["n1", "n1", None, "n1"], "placement passes over the stopped task"
    whole = kit.record(app, "app-t")
    assert whole["array"]["created"] == 4
    assert whole["array"]["tasks"] == {"PENDING": 3, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0, "STOPPED": 1}
    assert counts(redis_client)["PENDING"] == 3


def test_a_task_stopped_and_deleted_early_is_never_created_again(app: App, store: JobStore, admin: NodeAdmin,
                                                                 redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=8, pool="default")
    kit.submit(app, array_body("app-e", 4), timeout_ms=0)
    kit.stop(app, "app-e-1")
    assert call(app, "DELETE", "/api/jobs/app-e-1").json == {"deleted": True}
    assert call(app, "GET", "/api/jobs/app-e-1").status == 404
    Scheduler(store).place_waiting()
    assert call(app, "GET", "/api/jobs/app-e-1").status == 404, "placement passed over it"
    assert [kit.record(app, f"app-e-{i}")["driver_node_id"] for i in (0, 2, 3)] == ["n1"] * 3
    assert counts(redis_client)["PENDING"] == 3


def test_deleting_an_array_removes_it_and_all_its_tasks(app: App, store: JobStore, admin: NodeAdmin,
                                                        redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    kit.submit(app, array_body("app-d", 500), timeout_ms=0)
    Scheduler(store).place_waiting()
    refused = call(app, "DELETE", "/api/jobs/app-d")
    assert refused.status == 409 and "stop it first" in refused.json["error"]
    assert call(app, "DELETE", "/api/jobs/app-d-300").status == 409
    kit.stop(app, "app-d")
    assert call(app, "DELETE", "/api/jobs/app-d-300").status == 409, "never created: the array is deleted whole"
    assert call(app, "DELETE", "/api/jobs/app-d-0").json == {"deleted": True}
    assert call(app, "DELETE", "/api/jobs/app-d").json == {"deleted": True}
    assert records(redis_client) == 0
    assert call(app, "GET", "/api/jobs/app-d").status == 404
    assert call(app, "GET", "/api/jobs/app-d-7").status == 404
    assert counts(redis_client).get("STOPPED", 0) == 0, "the tasks never created leave the counts with the array"


def test_max_pending_counts_every_task(app: App, redis_client: redis.Redis) -> None:
    set_quota(redis_client, "default", max_pending=100)
    refused = kit.post(app, array_body("app-q", 101), timeout_ms=0)
    assert refused.status == 429, refused.body
    kit.submit(app, array_body("app-q", 100), timeout_ms=0)
    assert kit.post(app, {**kit.JOB, "submission_id": "app-one"}, timeout_ms=0).status == 429


def test_task_ids_stay_free(app: App) -> None:
    kit.submit(app, array_body("app-x", 10), timeout_ms=0)
    taken = kit.post(app, {**kit.JOB, "submission_id": "app-x-3"})
    assert taken.status == 409 and "task of array app-x" in taken.json["error"]
    assert kit.post(app, {**kit.JOB, "submission_id": "app-x-10"}).status == 200, "beyond its count: free"
    assert kit.post(app, {**kit.JOB, "submission_id": "app-x-03"}).status == 200, "not a task's id"
    kit.submit(app, {**kit.JOB, "submission_id": "app-y-2"})
    clash = kit.post(app, array_body("app-y", 5))
    assert clash.status == 409 and "app-y-<index>" in clash.json["error"]
    assert kit.post(app, array_body("app-x", 10), timeout_ms=0).status == 200, "the same request again: idempotent"
    assert kit.post(app, array_body("app-x", 11), timeout_ms=0).status == 409


def test_an_array_past_its_deadline_fails_the_tasks_never_created(settings: Any, app: App, store: JobStore,
                                                                  redis_client: redis.Redis) -> None:
    kit.submit(app, array_body("app-late", 300), timeout_ms=1)
    duties = Duties(store, Scheduler(store))
    kit.wait_for(lambda: duties.tick() is not None and kit.record(app, "app-late")["status"] == "FAILED",
                 kit.SETTLE_S, what="the array to fail")
    task = kit.record(app, "app-late-123")
    assert (task["status"], task["error_type"]) == ("FAILED", "SCHEDULE_TIMEOUT")
    assert "submissionId:[app-late-123]" in task["message"]
    assert counts(redis_client) == {"PENDING": 0, "FAILED": 300}
    assert records(redis_client) == 1


@pytest.mark.parametrize(
    ("array", "field"),
    [({"count": 0}, "array.count"), ({"count": 100_001}, "array.count"), ({}, "array.count"), (5, "array")],
)
def test_an_invalid_array_is_a_400_naming_the_field(app: App, array: Any, field: str) -> None:
    result = kit.post(app, {**kit.JOB, "array": array})
    assert result.status == 400 and field in result.json["fields"], result.body


def test_an_array_cannot_have_or_be_a_dependency(app: App) -> None:
    kit.submit(app, {**kit.JOB, "submission_id": "app-first"})
    result = kit.post(app, {**array_body("app-z", 3), "depends_on": {"afterok": ["app-first"]}})
    assert result.status == 400 and "array" in result.json["fields"]
    kit.submit(app, array_body("app-z", 3), timeout_ms=0)
    result = kit.post(app, {**kit.JOB, "depends_on": {"afterok": ["app-z"]}})
    assert result.status == 400 and "depends_on.afterok" in result.json["fields"]


def test_a_request_without_array_is_as_before(app: App) -> None:
    submission_id = kit.submit(app)
    found = kit.record(app, submission_id)
    assert (found["array"], found["array_id"], found["array_index"]) == (None, None, None)


def test_each_running_task_sees_its_index(app: App, start_node: Any, tmp_path: Any) -> None:  # noqa: F811
    start_node(cpus="2")
    body = array_body("app-env", 3, entrypoint='echo "$POOLQ_ARRAY_ID $POOLQ_ARRAY_INDEX $POOLQ_SUBMISSION_ID"',
                      runtime_env={"working_dir": str(tmp_path)}, entrypoint_num_cpus=0.5)
    kit.submit(app, body, timeout_ms=PLACEMENT_DEADLINE_MS)
    whole = kit.wait_record(app, "app-env", lambda r: r["status"] == "SUCCEEDED", "to succeed")
    assert whole["array"]["tasks"]["SUCCEEDED"] == 3
    for index in range(3):
        logs = call(app, "GET", f"/api/jobs/app-env-{index}/logs").json["logs"]
        assert logs == f"app-env {index} app-env-{index}\n"
        assert kit.record(app, f"app-env-{index}")["driver_exit_code"] == 0


def test_a_recount_counts_the_tasks_not_created_yet(app: App, store: JobStore, admin: NodeAdmin,
                                                    redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    kit.submit(app, array_body("app-r", 1000), timeout_ms=0)
    Scheduler(store).place_waiting()
    assert store.recount("default") is False, "1000 PENDING: the created tasks and the rest of the array"
    redis_client.hset(keys.tenant_counts("default"), "PENDING", 3)
    assert store.recount("default") is True
    assert counts(redis_client)["PENDING"] == 1000


def test_claiming_twice_under_one_id_creates_the_tasks_once(app: App, store: JobStore,
                                                            redis_client: redis.Redis) -> None:
    from worker.scheduler import claim

    kit.submit(app, array_body("app-c", 10), timeout_ms=0)
    sig = redis_client.hget(keys.job("default:app-c"), "shape")
    first = claim(store.scripts, "w.1", [sig], ["default"], 4, 30_000, 60_000)
    again = claim(store.scripts, "w.1", [sig], ["default"], 4, 30_000, 60_000)  # a retry after a lost reply
    assert first == again and first[0::3] == [f"default:app-c-{i}" for i in range(4)]
    assert redis_client.hget(keys.job("default:app-c"), "anext") == "4"
    assert records(redis_client) == 5


def test_retention_removes_the_tasks_and_then_the_array(app: App, store: JobStore, admin: NodeAdmin,
                                                        start_placement: Any, redis_client: redis.Redis) -> None:
    add_node(admin, "n1", cpus=16, pool="default")
    kit.submit(app, array_body("app-old", 10), timeout_ms=0)
    Scheduler(store).place_waiting()
    finish_all_placed(store, redis_client, [f"app-old-{i}" for i in range(10)])
    assert kit.record(app, "app-old")["status"] == "SUCCEEDED"
    start_placement({"POOLQ_RETENTION_S": "1"})
    kit.wait_for(lambda: records(redis_client) == 0, kit.SETTLE_S, what="retention to remove the array and its tasks")
    assert call(app, "GET", "/api/jobs/app-old").status == 404
    assert call(app, "GET", "/api/jobs/app-old-3").status == 404
    assert {s: n for s, n in counts(redis_client).items() if n} == {}


def test_a_batch_item_may_be_an_array(app: App, redis_client: redis.Redis) -> None:
    results = kit.submit_batch(app, [array_body("app-b1", 500), {**kit.JOB, "submission_id": "app-b2"}], timeout_ms=0)
    assert results == [{"submission_id": "app-b1"}, {"submission_id": "app-b2"}]
    assert counts(redis_client)["PENDING"] == 501


def test_poolq_submit_array_flag_sets_the_body_field() -> None:
    from poolq.commands.cli import build_parser
    from poolq.commands.client import job_body

    assert job_body(build_parser().parse_args(["submit", "--array", "50", "--", "true"]))["array"] == {"count": 50}
    assert "array" not in job_body(build_parser().parse_args(["submit", "--", "true"]))
