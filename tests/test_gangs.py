"""Gangs (docs/scheduling.md, "Gangs"), on the real Redis with real schedulers.

The items of one batch that share a ``gang_id`` are placed all or none, in one
``reserve.lua`` step: a gang that fits only as a whole waits, never partly placed, and
then places together, also while several placement workers compete for the nodes. Its
members share their deadline and the reasons they wait; one that ends before the gang is
placed ends the others. A gang that cannot be formed whole is not stored at all.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.commands.client import _rows, _trailing_gang
from poolq.model import ErrorType, JobStatus
from poolq.nodes import NodeAdmin
from poolq.store import Ending, JobStore
from tests import kit
from tests.kit import add_node
from tests.procs import wait_for
from tests.wsgi import call
from worker.duties import Duties
from worker.placement import GANG
from worker.scheduler import Decision, Reservation, Scheduler, claim, reserve


def member(submission_id: str, gang: str, cpus: int = 1, **fields: Any) -> dict[str, Any]:
    return {**kit.JOB, "submission_id": submission_id, "entrypoint_num_cpus": cpus, "gang_id": gang, **fields}


def gang_of(app: App, gang: str, count: int, cpus: int = 1, timeout_ms: int = 0, **fields: Any) -> list[str]:
    ids = [f"app-{gang}-{i}" for i in range(count)]
    results = kit.submit_batch(app, [member(i, gang, cpus, **fields) for i in ids], timeout_ms=timeout_ms)
    assert results == [{"submission_id": i} for i in ids]
    return ids


def ref(submission_id: str) -> str:
    return keys.ref("default", submission_id)


def nodes_of(client: redis.Redis, ids: list[str]) -> list[str | None]:
    """Where each job is, read in one transaction: a snapshot no reservation is half into."""
    pipe = client.pipeline(transaction=True)
    for submission_id in ids:
        pipe.hget(keys.job(ref(submission_id)), "node")
    return list(pipe.execute())


def test_a_gang_that_fits_only_whole_waits_then_places_together_under_concurrent_workers(
    app: App,
    store: JobStore,
    admin: NodeAdmin,
    redis_client: redis.Redis,
    start_placement: Callable[..., kit.Placement],
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    add_node(admin, "n2", cpus=4, pool="default")
    blocker = kit.submit(app, {**kit.JOB, "submission_id": "app-blocker"}, timeout_ms=0)
    Scheduler(store).place_waiting()
    assert nodes_of(redis_client, [blocker]) != [None]
    ids = gang_of(app, "g8", 8)  # 8 CPUs in all: 7 are free
    workers = [start_placement(), start_placement()]
    seen: list[int] = []
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every moment: none of the gang placed or all of it, and no node over-committed
        while not stop.is_set():
            seen.append(sum(node is not None for node in nodes_of(redis_client, ids)))
            problems.extend(admin.check())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for worker in workers:
            store.wake("poolq.placement")
            worker.settle()
        time.sleep(0.5)
        assert nodes_of(redis_client, ids) == [None] * 8, "7 free CPUs must not take part of a gang of 8"
        record = kit.record(app, ids[0])
        assert record["status"] == "PENDING" and record["gang_id"] == "g8"
        assert record["scheduling"]["reasons"][0] == {
            "reason": GANG,
            "units": 7,
            "requirement": "gang g8: 8 members",
        }, record["scheduling"]
        # Singles of another tenant compete for the capacity the blocker frees.
        others = [
            kit.submit(app, {**kit.JOB, "submission_id": f"app-other-{i}"}, tenant="other", timeout_ms=0)
            for i in range(3)
        ]
        assert store.finish(ref(blocker), JobStatus.SUCCEEDED) == Ending.MOVED

        def gang_placed() -> bool:
            for other in others:  # whatever single was placed ends, making room again
                other_ref = keys.ref("other", other)
                if redis_client.hget(keys.job(other_ref), "node"):
                    store.finish(other_ref, JobStatus.SUCCEEDED)
            return None not in nodes_of(redis_client, ids)

        wait_for(gang_placed, kit.SETTLE_S, what="the gang to be placed whole")
        wait_for(lambda: 8 in seen, kit.SETTLE_S, what="the watcher to see the gang placed")
    finally:
        stop.set()
        watcher.join()
    assert set(seen) <= {0, 8} and 8 in seen, f"a gang was seen partly placed: {sorted(set(seen))}"
    assert problems == []
    placed = [kit.record(app, i) for i in ids]
    assert {r["driver_node_id"] for r in placed} == {"n1", "n2"}  # on several nodes, as room allows
    assert {r["scheduling"]["attempts"] for r in placed} == {placed[0]["scheduling"]["attempts"]}
    assert admin.check() == []


def test_a_gang_shares_its_deadline_and_its_failure(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=4, pool="default")
    add_node(admin, "n2", cpus=4, pool="default")
    ids = gang_of(app, "wide", 3, cpus=3, timeout_ms=1500)  # 9 CPUs: two of the three fit, never the third
    deadlines = {redis_client.hget(keys.job(ref(i)), "deadline") for i in ids}
    assert len(deadlines) == 1, f"one deadline for the gang, not {deadlines}"
    scheduler, duties = Scheduler(store), Duties(store, Scheduler(store))

    def all_ended() -> bool:
        scheduler.place_waiting()
        duties.tick()
        return all(kit.record(app, i)["status"] == "FAILED" for i in ids)

    wait_for(all_ended, kit.SETTLE_S, what="the gang to reach its deadline")
    records = [kit.record(app, i) for i in ids]
    assert {r["error_type"] for r in records} == {ErrorType.SCHEDULE_TIMEOUT.value}
    assert all(r["driver_node_id"] is None for r in records)
    reasons = [r["scheduling"]["reasons"] for r in records]
    assert reasons[0] == reasons[1] == reasons[2]
    assert reasons[0][0] == {"reason": GANG, "units": 2, "requirement": "gang wide: 3 members"}
    assert "CPU: Not Enough" in records[0]["message"] and f"[{GANG}]" in records[0]["message"]
    assert admin.check() == []


def test_a_member_that_ends_before_the_gang_is_placed_ends_the_others(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    ids = gang_of(app, "trio", 3)
    Scheduler(store).place_waiting()
    assert nodes_of(redis_client, ids) == [None] * 3
    assert kit.stop(app, ids[1]).json == {"stopped": True}
    Duties(store, Scheduler(store)).tick()
    records = {i: kit.record(app, i) for i in ids}
    assert records[ids[1]]["message"] == "stopped by user request"
    for other in (ids[0], ids[2]):
        assert records[other]["status"] == "STOPPED"
        assert records[other]["error_type"] == ErrorType.STOPPED_BY_USER.value
        assert records[other]["message"].startswith(f"gang trio: member {ids[1]} ended STOPPED before the gang")
    assert not redis_client.smembers(keys.GANGS_BROKEN)
    # Nothing is left in line: the capacity goes to the next job.
    later = kit.submit(app, {**kit.JOB, "submission_id": "app-later"}, timeout_ms=0)
    Scheduler(store).place_waiting()
    assert nodes_of(redis_client, [later]) == ["n1"]


def test_the_gang_reservation_is_all_or_none_and_safe_to_repeat(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis
) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    add_node(admin, "n2", cpus=1, pool="default")
    ids = gang_of(app, "pair", 2, cpus=1)
    sig = redis_client.hget(keys.job(ref(ids[0])), "shape")
    lead = ref(ids[-1])
    claimed = claim(store.scripts, "c1", [sig], ["default"], 256, 30_000, 60_000)
    assert claimed[0::3] == [lead], "the gang waits in line as its last member, alone"
    seq = int(claimed[2])

    def decisions(first: str, second: str, cpus: int = 1000) -> list[Decision]:
        return [
            Decision(ref(ids[0]), sig, first, "default", seq, f"CPU={cpus},memory={128 * kit.MiB}", lead),
            Decision(lead, sig, second, "default", seq, f"CPU={cpus},memory={128 * kit.MiB}", lead),
        ]

    before = [redis_client.hget(keys.node(n), "res:CPU") for n in ("n1", "n2")]
    results, _ = reserve(store.scripts, "c1", decisions("n2", "n2"), store.settings)  # n2 holds one, not two
    assert results == [Reservation.NO_CAPACITY] * 2
    assert nodes_of(redis_client, ids) == [None, None]
    assert [redis_client.hget(keys.node(n), "res:CPU") for n in ("n1", "n2")] == before
    results, _ = reserve(store.scripts, "c1", decisions("n1", "n1"), store.settings)
    assert results == [Reservation.RESERVED] * 2
    results, _ = reserve(store.scripts, "c1", decisions("n1", "n1"), store.settings)  # a lost reply's retry
    assert results == [Reservation.RESERVED] * 2
    assert nodes_of(redis_client, ids) == ["n1", "n1"]
    assert redis_client.hget(keys.node("n1"), "res:CPU") == "2000"
    assert not redis_client.zscore(keys.CLAIMED, lead) and not redis_client.hget(keys.CLAIMS, lead)
    assert admin.check() == []


def test_a_gang_not_formed_whole_is_not_stored(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    bad = [member("app-b0", "broken"), member("app-b1", "broken", cpus=99), member("app-b2", "broken")]
    results = kit.submit_batch(app, bad, timeout_ms=0)
    assert "entrypoint_num_cpus" in results[1]["fields"]
    assert "gang_id" in results[0]["fields"] and "gang_id" in results[2]["fields"]
    # A member Redis refuses (its id is taken by another request): the gang is not formed.
    kit.submit(app, {**kit.JOB, "submission_id": "app-taken", "entrypoint": "echo other"}, timeout_ms=0)
    results = kit.submit_batch(
        app, [member("app-t0", "taken"), member("app-taken", "taken"), member("app-t2", "taken")], timeout_ms=0
    )
    assert "already exist" in results[1]["error"]
    assert "gang_id" in results[0]["fields"] and "gang_id" in results[2]["fields"], results
    for submission_id in ("app-b0", "app-b2", "app-t0", "app-t2"):
        assert call(app, "GET", f"/api/jobs/{submission_id}").status == 404
    # Sent again without the refused member, the gang is formed, under ids now free again.
    assert kit.submit_batch(app, [member("app-t0", "taken"), member("app-t2", "taken")], timeout_ms=0) == [
        {"submission_id": "app-t0"},
        {"submission_id": "app-t2"},
    ]
    assert kit.record(app, "app-t0")["gang_id"] == "taken"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"gang_id": "has space"}, "gang_id"),
        ({"gang_id": "x" * 65}, "gang_id"),
        ({"gang_id": "g", "depends_on": {"afterok": ["app-x"]}}, "depends_on"),
        ({"gang_id": "g", "retry_policy": {"max_attempts": 2}}, "retry_policy"),
    ],
)
def test_bad_gang_fields_are_a_400_naming_the_field(app: App, fields: dict[str, Any], field: str) -> None:
    result = kit.post(app, {**kit.JOB, **fields})
    assert result.status == 400 and field in result.json["fields"], result.body


def test_members_of_a_gang_share_one_priority(app: App) -> None:
    results = kit.submit_batch(app, [member("app-p0", "prio", priority=1), member("app-p1", "prio")])
    assert all("priority" in r["fields"] for r in results), results


def test_a_job_without_a_gang_is_as_before_and_a_lone_gang_member_places(
    app: App, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    plain = kit.submit(app, {**kit.JOB, "submission_id": "app-plain"}, timeout_ms=0)
    lone = kit.submit(app, member("app-lone", "solo"), timeout_ms=0)
    assert "gang" not in redis_client.hgetall(keys.job(ref(plain)))
    Scheduler(store).place_waiting()
    assert nodes_of(redis_client, [plain, lone]) == ["n1", "n1"]
    records = [kit.record(app, plain), kit.record(app, lone)]
    assert [r["gang_id"] for r in records] == [None, "solo"]
    _rows(records, header=True)  # what `poolq list` prints
    lines = capsys.readouterr().out.splitlines()
    assert "GANG" in lines[0].split()
    assert lines[1].split()[3] == "-" and lines[2].split()[3] == "solo"


def test_submit_file_keeps_a_gang_in_one_batch() -> None:
    lines = [(1, {"gang_id": "a"}), (2, {}), (3, {"gang_id": "b"}), (4, ValueError("bad")), (5, {"gang_id": "b"})]
    assert _trailing_gang(lines) == 3  # lines 3 to 5: an unreadable line does not split the gang
    assert _trailing_gang(lines[:3]) == 1
    assert _trailing_gang(lines[:2]) == 0
    assert _trailing_gang([(1, {"gang_id": "b"}), (2, {"gang_id": "b"})]) == 2


def test_sending_a_gang_again_is_idempotent(app: App, store: JobStore, redis_client: redis.Redis) -> None:
    ids = gang_of(app, "again", 3)
    sig = redis_client.hget(keys.job(ref(ids[0])), "shape")
    results = kit.submit_batch(app, [member(i, "again") for i in ids], timeout_ms=0)  # a lost reply's resend
    assert results == [{"submission_id": i} for i in ids]
    assert redis_client.zrange(keys.shape_queue(sig), 0, -1) == [ref(ids[-1])], "one line entry, the lead's"
    assert redis_client.hget(keys.shape(sig), "live") == "3"
    changed = kit.submit_batch(app, [member(i, "again", cpus=2) for i in ids], timeout_ms=0)
    assert all("already exist" in r["error"] for r in changed), changed  # another request under the same ids
    assert kit.record(app, ids[0])["status"] == "PENDING"
