"""Placement end to end (docs/placement.md): real Redis, the placement worker's scheduler
and duties in the test's process (``placement``), and real ``poolq worker`` processes for
the tests about them (several workers racing, kill -9, Celery wake-ups).

Jobs are submitted through the in-process WSGI app and polled through it; nodes are
static (``NodeAdmin.upsert``), so a placed job stays PENDING with its driver_node_id.
Reservations are checked from the records in Redis (``NodeAdmin.check`` and the job
hashes). Deadlines below are functional, with generous margins: the machine is small
and shared.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any, Callable

import pytest
import redis

from api_shim.app import App
from poolq import keys, queues
from poolq.messaging import create_celery
from poolq.model import JobStatus
from poolq.nodes import NodeAdmin, capacity_of
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import Ending, JobStore
from tests.conftest import SEED_BODY
from tests.kit import JOB, SETTLE_S, GiB, Placement, add_node, is_placed, record, submit, wait_ready, wait_record
from tests.procs import Proc, wait_for
from tests.wsgi import call
from worker.duties import Duties
from worker.scheduler import Scheduler

AFFINITY_ABC = (
    'resource { aff { condition { subConditions { expressions { key: "abc" op { exits { } } } weight: 100 } '
    "orderPriority: true } } antiAff { } }"
)
NO_ATTEMPT = (
    "the possible cause is that the scheduling queue is busy or the scheduling timeout configuration is not proper."
)


# -- helpers -------------------------------------------------------------------------

def failed(found: dict[str, Any]) -> bool:
    return found["status"] == "FAILED"


def timeout_failure(submission_id: str, timeout_ms: int, attempts: int, lines: str) -> str:
    """The SCHEDULE_TIMEOUT message of docs/placement.md, written out independently of the code."""
    return (
        f"create app failed, submissionId:[{submission_id}], err: \nthe instance cannot be scheduled within "
        f"{timeout_ms} ms. which has been scheduled for {attempts} times. The latest failure: no available resource "
        f"that meets the request requirements, The reasons are as follows:\n{lines}"
    )


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def job_hashes(client: redis.Redis, refs: list[str]) -> dict[str, dict[str, str]]:
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.hgetall(keys.job(ref))
    return dict(zip(refs, pipe.execute()))


def reserved_of(client: redis.Redis, node_id: str, resource: str = "CPU") -> int:
    return int(client.hget(keys.node(node_id), f"res:{resource}") or 0)


def check_paused(client: redis.Redis, admin: NodeAdmin, pause_ms: int = 400) -> list[str] | None:
    """``admin.check()`` on a consistent snapshot: Redis holds every write (and script)
    while it reads. None if the read outlasted the pause (then it proves nothing)."""
    client.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
    started = time.monotonic()
    try:
        problems = admin.check()
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    return problems if time.monotonic() - started < pause_ms / 1000 * 0.8 else None


def ledger(client: redis.Redis, refs: list[str], node_ids: list[str]) -> dict[str, Any]:
    """Every job's outcome from its record, and each placed job's node set memberships."""
    records = job_hashes(client, refs)
    pipe = client.pipeline(transaction=False)
    for node_id in node_ids:
        pipe.smembers(keys.node_jobs(node_id))
    members = dict(zip(node_ids, pipe.execute()))
    holders = Counter(ref for refs_on in members.values() for ref in refs_on)
    placed_refs = [r for r, f in records.items() if f.get("node")]
    return {
        "records": records,
        "placed": placed_refs,
        "failed": [r for r, f in records.items() if f.get("status") == "FAILED"],
        "waiting": [r for r, f in records.items() if f.get("status") == "PENDING" and not f.get("node")],
        "holders": holders,
        "members": members,
    }


def settle(
    client: redis.Redis, refs: list[str], node_ids: list[str], timeout: float, during: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Wait until no job waits unplaced; the ledger then. Fails naming what still waits."""
    give_up = time.monotonic() + timeout
    while True:
        during()
        book = ledger(client, refs, node_ids)
        if not book["waiting"]:
            return book
        if time.monotonic() > give_up:
            sample = book["records"][book["waiting"][0]]
            raise AssertionError(
                f"after {timeout:.0f} s, {len(book['waiting'])} jobs still wait unplaced "
                f"({len(book['placed'])} placed, {len(book['failed'])} failed); one of them: {sample}; "
                f"claimed: {client.zcard(keys.CLAIMED)}, ready shapes: {client.zrange(keys.SHAPES_READY, 0, -1, withscores=True)}, "
                f"blocked shapes: {client.zrange(keys.SHAPES_BLOCKED, 0, -1, withscores=True)}, now {redis_now_ms(client)}"
            )
        time.sleep(0.3)


def assert_placed_exactly_once(book: dict[str, Any], client: redis.Redis, per_job_cpu: int) -> None:
    for ref in book["placed"]:
        fields = book["records"][ref]
        assert fields["status"] == "PENDING", (ref, fields["status"])
        assert book["holders"][ref] == 1 and ref in book["members"][fields["node"]], ref
        assert dict(re.findall(r"([^=,]+)=(\d+)", fields["res"])).get("CPU") == str(per_job_cpu), fields["res"]
    assert sum(book["holders"].values()) == len(book["placed"])  # no set holds an unplaced or foreign job
    total = sum(reserved_of(client, node_id) for node_id in book["members"])
    assert total == per_job_cpu * len(book["placed"])


# -- the scheduling-failure message, end to end ----------------------------------------


@pytest.mark.slow
def test_seed_affinity_failure_after_the_default_18_s(app: App, admin: NodeAdmin, placement: Placement) -> None:
    """The seed: X-Pool-Label abc, one node without that label, the default deadline."""
    add_node(admin, "n0", cpus=8, memory=4 * GiB, labels={"zone": "a"})
    submission_id = submit(app, SEED_BODY, label="abc")
    assert submission_id == "app-1234"
    found = wait_record(app, submission_id, failed, "to fail at its 18 s deadline", timeout=18 + SETTLE_S)
    assert found["error_type"] == "SCHEDULE_TIMEOUT"
    assert found["driver_node_id"] is None
    assert found["end_time"] - found["submit_time"] >= 18000
    attempts = found["scheduling"]["attempts"]
    assert attempts >= 1
    assert found["message"] == timeout_failure(
        "app-1234",
        18000,
        attempts,
        f"\t1 unit with [Affinity can't be Satisfied] requirements: [{AFFINITY_ABC} ].\n",
    )
    [reason] = found["scheduling"]["reasons"]
    assert (reason["reason"], reason["units"], reason["requirement"].strip()) == (
        "Affinity can't be Satisfied",
        1,
        AFFINITY_ABC,
    )
    assert reserved_of(admin.redis, "n0") == 0


def test_no_nodes_at_all(app: App, admin: NodeAdmin, placement: Placement) -> None:
    submission_id = submit(app, timeout_ms=1500)
    found = wait_record(app, submission_id, failed, "to fail with no node at all")
    assert found["error_type"] == "SCHEDULE_TIMEOUT"
    attempts = found["scheduling"]["attempts"]
    assert attempts >= 1
    assert found["message"] == timeout_failure(submission_id, 1500, attempts, "\t0 unit with [No Available Node].\n")
    assert [(r["reason"], r["units"]) for r in found["scheduling"]["reasons"]] == [("No Available Node", 0)]


def test_no_placement_worker_means_no_attempt(app: App, store: JobStore, admin: NodeAdmin) -> None:
    """The deadline passes with no placement worker running: the duties fail the job
    with the no-attempt message, even though a node would have fitted."""
    add_node(admin, "n1", cpus=4)
    submission_id = submit(app, timeout_ms=1000)
    found = record(app, submission_id)
    wait_for(lambda: redis_now_ms(store.redis) > found["scheduling"]["deadline"], timeout=10, what="the deadline")
    assert record(app, submission_id)["status"] == "PENDING"  # nothing expires a job but the duties
    Duties(store, Scheduler(store)).tick()
    found = record(app, submission_id)
    assert (found["status"], found["error_type"]) == ("FAILED", "SCHEDULE_TIMEOUT")
    assert found["message"] == (
        f"create app failed, submissionId:[{submission_id}], err: \nthe instance cannot be scheduled within 1000 ms. "
        + NO_ATTEMPT
    )
    assert found["scheduling"]["attempts"] == 0 and found["scheduling"]["reasons"] == []
    assert found["driver_node_id"] is None


def test_a_job_past_its_deadline_is_not_placed(app: App, store: JobStore, admin: NodeAdmin) -> None:
    """A placement round that runs after the deadline (a worker started late, before its
    duties swept) must not place the job: at its deadline it becomes FAILED (docs/placement.md)."""
    add_node(admin, "n1", cpus=4)
    submission_id = submit(app, timeout_ms=1000)
    deadline = record(app, submission_id)["scheduling"]["deadline"]
    wait_for(lambda: redis_now_ms(store.redis) > deadline + 200, timeout=10, what="the deadline")
    Scheduler(store).place_waiting()
    Duties(store, Scheduler(store)).tick()
    found = record(app, submission_id)
    assert (found["status"], found["error_type"], found["driver_node_id"]) == ("FAILED", "SCHEDULE_TIMEOUT", None)
    assert reserved_of(store.redis, "n1") == 0


# -- waiting, and being placed when things change ------------------------------------


def test_timeout_zero_waits_until_a_node_joins(settings: Settings, admin: NodeAdmin, start_placement: Any) -> None:
    app = App(dataclasses.replace(settings, schedule_timeout_ms=1000))
    start_placement({"POOLQ_SCHEDULE_TIMEOUT_MS": "1000"})
    forever = submit(app, timeout_ms=0)
    default = submit(app)
    found = wait_record(app, default, failed, "to fail at the 1 s default deadline")
    attempts = found["scheduling"]["attempts"]
    assert found["error_type"] == "SCHEDULE_TIMEOUT"
    assert found["message"] == timeout_failure(default, 1000, attempts, "\t0 unit with [No Available Node].\n")
    time.sleep(1.5)  # well past the default deadline, and several sweeps
    found = record(app, forever)
    assert (found["status"], found["error_type"], found["driver_node_id"]) == ("PENDING", None, None)
    assert found["scheduling"]["deadline"] is None
    add_node(admin, "late", cpus=2)
    found = wait_record(app, forever, is_placed, "to be placed on the node that joined")
    assert found["driver_node_id"] == "late"
    assert record(app, default)["status"] == "FAILED"  # a terminal status never changes
    assert admin.check() == []


@pytest.mark.serial
def test_waiting_job_placed_at_once_when_capacity_is_released(app: App, admin: NodeAdmin, start_placement: Any) -> None:
    """Released capacity retries blocked jobs at once, not after their backoff."""
    start_placement({"POOLQ_MAX_BACKOFF_S": "30"})
    add_node(admin, "n1", cpus=1)
    first = submit(app, timeout_ms=0)
    wait_record(app, first, is_placed, "to be placed")
    second = submit(app, timeout_ms=0)
    client = admin.redis
    sig = client.hget(keys.job(keys.ref("default", second)), "shape")

    def backoff_left_ms() -> int:
        retry_at = client.zscore(keys.SHAPES_BLOCKED, sig)
        return int(retry_at) - redis_now_ms(client) if retry_at else 0

    wait_for(lambda: backoff_left_ms() > 2500, timeout=SETTLE_S, what="the waiting job's backoff to exceed 2.5 s")
    assert record(app, second)["driver_node_id"] is None
    stop = call(app, "POST", f"/api/jobs/{first}/stop")
    released = time.monotonic()
    assert (stop.status, stop.json) == (200, {"stopped": True})
    found = wait_record(app, second, is_placed, "to take the released capacity")
    elapsed = time.monotonic() - released
    assert elapsed < 1.0, f"placed {elapsed:.2f} s after the release"
    assert found["driver_node_id"] == "n1"
    stopped = record(app, first)
    assert (stopped["status"], stopped["error_type"]) == ("STOPPED", "STOPPED_BY_USER")
    assert reserved_of(client, "n1") == 1000 and admin.check() == []


def test_pool_label_terms_in_order_end_to_end(app: App, admin: NodeAdmin, placement: Placement) -> None:
    add_node(admin, "gpu-node", cpus=2, labels={"gpu": None})
    add_node(admin, "big-node", cpus=2, labels={"size": "big"})
    add_node(admin, "other", cpus=64)
    ids = [submit(app, label="gpu, size=big", timeout_ms=0) for _ in range(5)]
    for submission_id in ids[:4]:
        wait_record(app, submission_id, is_placed, "to be placed")
    nodes = [record(app, i)["driver_node_id"] for i in ids[:4]]
    assert sorted(nodes) == ["big-node", "big-node", "gpu-node", "gpu-node"]
    time.sleep(1.0)  # past a backoff: the fifth job is tried again
    placement.settle()  # and whatever is ready to be tried has been
    assert record(app, ids[4])["driver_node_id"] is None  # "other" matches no term: never used
    spill = submit(app, label="gpu,unUseAntiOtherLabels", timeout_ms=0)
    assert wait_record(app, spill, is_placed, "to use the last resort")["driver_node_id"] == "other"
    assert admin.check() == []


def test_draining_a_node_stops_new_placements(app: App, admin: NodeAdmin, placement: Placement) -> None:
    add_node(admin, "small", cpus=2)
    add_node(admin, "big", cpus=4)
    first = submit(app, timeout_ms=0)
    assert wait_record(app, first, is_placed, "to be placed")["driver_node_id"] == "small"  # tightest fit
    admin.drain("small")
    later = [submit(app, timeout_ms=0) for _ in range(4)]
    for submission_id in later:
        assert wait_record(app, submission_id, is_placed, "to be placed")["driver_node_id"] == "big"
    late = submit(app, timeout_ms=1500)
    found = wait_record(app, late, failed, "to fail: only the drained node has room")
    attempts = found["scheduling"]["attempts"]
    # the drained node, with a free CPU, is not considered and not counted
    assert found["message"] == timeout_failure(
        late, 1500, attempts, "\t1 unit with [CPU: Not Enough] requirements: [CPU: 1000m].\n"
    )
    found = record(app, first)
    assert is_placed(found) and found["driver_node_id"] == "small"  # its jobs stay
    assert reserved_of(admin.redis, "small") == 1000 and admin.check() == []


def test_removing_a_node_fails_its_jobs_and_releases_them(app: App, admin: NodeAdmin, placement: Placement) -> None:
    add_node(admin, "n1", cpus=2, labels={"host": "n1"})
    add_node(admin, "n2", cpus=2, labels={"host": "n2"})
    on_n1 = [submit(app, label="host=n1", timeout_ms=0) for _ in range(2)]
    on_n2 = submit(app, label="host=n2", timeout_ms=0)
    for submission_id in [*on_n1, on_n2]:
        wait_record(app, submission_id, is_placed, "to be placed")
    waiting = submit(app, label="host=n1", timeout_ms=0)
    removed = admin.remove("n1")
    assert sorted(removed) == sorted(keys.ref("default", i) for i in on_n1)
    for submission_id in on_n1:
        found = record(app, submission_id)
        assert (found["status"], found["error_type"]) == ("FAILED", "NODE_LOST")
        assert "n1" in found["message"] and found["end_time"] is not None
    assert is_placed(record(app, on_n2))
    assert [n["node_id"] for n in admin.describe()] == ["n2"]
    assert admin.check() == []
    # The same id comes back empty: nothing of the failed jobs is held on it.
    add_node(admin, "n1", cpus=2, labels={"host": "n1"})
    assert wait_record(app, waiting, is_placed, "to be placed on the new n1")["driver_node_id"] == "n1"
    assert reserved_of(admin.redis, "n1") == 1000 and admin.check() == []


# -- integer arithmetic --------------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_reserve_release_cycles_leave_nothing_reserved(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """10,000 jobs of 0.3 CPU reserved (Scheduler.round, reserve.lua) and released
    (JobStore.finish, finish.lua) on a 10-CPU node: 33 fit at a time (9.9 CPU), never a
    34th (10.2), and at the end exactly nothing is reserved."""
    store = JobStore(connect(settings), settings)  # no waker: this test runs the rounds itself
    admin, scheduler = NodeAdmin(store), Scheduler(store)
    add_node(admin, "n1", cpus=10, memory=1024 * GiB)
    body = {**JOB, "entrypoint_num_cpus": Decimal("0.3")}
    jobs = [store.prepare(body, schedule_timeout_ms=0) for _ in range(10_000)]
    assert all(outcome is True for outcome in store.submit_many(jobs))
    released = 0
    while released < 10_000:
        scheduler.unblock_on_kick()
        assert scheduler.round() > 0, f"nothing left to claim after {released} releases"
        holding = sorted(redis_client.smembers(keys.node_jobs("n1")))
        assert len(holding) == min(33, 10_000 - released)
        assert reserved_of(redis_client, "n1") == 300 * len(holding)
        for ref in holding:
            assert store.finish(ref, JobStatus.SUCCEEDED) == Ending.MOVED
        released += len(holding)
    assert reserved_of(redis_client, "n1") == 0
    assert reserved_of(redis_client, "n1", "memory") == 0
    assert redis_client.scard(keys.node_jobs("n1")) == 0
    statuses = Counter(f["status"] for f in job_hashes(redis_client, [job.ref for job in jobs]).values())
    assert statuses == {"SUCCEEDED": 10_000}
    assert admin.check() == []


# -- concurrency and failures: real worker processes -------------------------------------


@pytest.mark.processes
def test_four_workers_place_exactly_the_capacity(
    app: App, admin: NodeAdmin, redis_client: redis.Redis, start_proc: Any
) -> None:
    """2,000 jobs of 1 CPU in four tenants against 500 CPUs, four placement workers."""
    for proc in [start_proc(["worker"], name=f"worker-{i}") for i in range(4)]:
        wait_ready(proc)
    node_ids = [f"n{i}" for i in range(10)]
    for node_id in node_ids:
        add_node(admin, node_id, cpus=50, memory=1024 * GiB)
    tenants = ["t0", "t1", "t2", "t3"]
    refs, checks = [], []
    for start in range(0, 2000, 100):
        for i in range(start, start + 100):
            tenant = tenants[i % 4]
            refs.append(keys.ref(tenant, submit(app, tenant=tenant, timeout_ms=10_000)))
        checks.append(check_paused(redis_client, admin))

    book = settle(
        redis_client, refs, node_ids, timeout=10 + 60, during=lambda: checks.append(check_paused(redis_client, admin))
    )
    conclusive = [c for c in checks if c is not None]
    assert len(conclusive) >= 10, f"only {len(conclusive)} of {len(checks)} snapshots were conclusive"
    assert [c for c in conclusive if c] == []
    assert admin.check() == []
    assert len(book["placed"]) == 500
    assert len(book["failed"]) == 1500
    assert_placed_exactly_once(book, redis_client, per_job_cpu=1000)
    for ref in book["failed"]:
        fields = book["records"][ref]
        assert fields["error_type"] == "SCHEDULE_TIMEOUT"
        assert int(fields["end_time"]) >= int(fields["submit_time"]) + 10_000
        attempts = int(fields["attempts"])
        assert attempts >= 1  # four workers were running all along
        assert fields["message"] == timeout_failure(
            keys.split_ref(ref)[1], 10_000, attempts, "\t10 unit with [CPU: Not Enough] requirements: [CPU: 1000m].\n"
        )


@pytest.mark.processes
@pytest.mark.parametrize("held", ["claims", "duties-lock"])
def test_kill_9_of_a_placement_worker_mid_burst(
    held: str, app: App, admin: NodeAdmin, redis_client: redis.Redis, start_proc: Any
) -> None:
    """A worker is killed while it holds claimed jobs (or the duties lock). Every job still
    ends placed exactly once or FAILED, no later than its deadline plus the sweep interval
    plus the claim lease (2 s here), with a margin for a busy machine."""
    env = {"POOLQ_CLAIM_LEASE_S": "2"}
    lease_ms, interval_ms, margin_ms = 2000, 100, 1500
    node_ids = [f"n{i}" for i in range(4)]
    for node_id in node_ids:
        add_node(admin, node_id, cpus=50, memory=1024 * GiB)
    victim = start_proc(["worker"], env=env, name="victim")
    lock_key = keys.lock("duties")

    def holds() -> bool:
        if held == "claims":
            return redis_client.zcard(keys.CLAIMED) > 0 and not redis_client.exists(lock_key)
        return bool(redis_client.exists(lock_key))

    # Caught while the burst fills the nodes: a round claims no more than the free CPU takes
    # (scheduler.claim_size), so once they are full its claims are few and brief.
    caught, give_up = threading.Event(), time.monotonic() + 60

    def catch() -> None:
        while time.monotonic() < give_up:
            os.kill(victim.pid, signal.SIGSTOP)
            if holds():
                caught.set()
                return
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.002)

    catcher = threading.Thread(target=catch, daemon=True)
    catcher.start()
    refs: list[str] = []
    while not caught.is_set() and time.monotonic() < give_up:  # keep the burst going until the moment comes
        refs += [keys.ref("default", submit(app, timeout_ms=4000)) for _ in range(50)]
        if len(refs) >= 300:
            caught.wait(0.5)
    catcher.join()
    assert caught.is_set(), f"never caught the worker holding {held}"
    victim.signal(signal.SIGKILL)
    killed_at = redis_now_ms(redis_client)
    if held == "claims":
        assert redis_client.zcard(keys.CLAIMED) > 0  # orphaned by the dead worker
    # The burst goes on: jobs due soon after the kill, then more.
    refs += [keys.ref("default", submit(app, timeout_ms=500)) for _ in range(100)]
    start_proc(["worker"], env=env, name="survivor-1")
    start_proc(["worker"], env=env, name="survivor-2")
    refs += [keys.ref("default", submit(app, timeout_ms=4000)) for _ in range(max(0, 700 - len(refs)))]

    book = settle(redis_client, refs, node_ids, timeout=4 + (interval_ms + lease_ms + margin_ms) / 1000 + 60)
    assert len(book["placed"]) + len(book["failed"]) == len(refs)
    assert len(book["placed"]) == 200  # far more jobs than room: the capacity is used
    assert_placed_exactly_once(book, redis_client, per_job_cpu=1000)
    assert admin.check() == []
    lateness = {}
    for ref in book["failed"]:
        fields = book["records"][ref]
        assert fields["error_type"] == "SCHEDULE_TIMEOUT", fields
        lateness[ref] = int(fields["end_time"]) - int(fields["deadline"])
    assert min(lateness.values()) >= 0  # never before the deadline
    late = {ref: ms for ref, ms in lateness.items() if ms > interval_ms + lease_ms + margin_ms}
    assert not late, (
        f"{len(late)} jobs failed up to {max(late.values())} ms after their deadline (the worker was killed "
        f"at {killed_at} ms); allowed: sweep interval {interval_ms} + claim lease {lease_ms} + margin {margin_ms} ms"
    )


@pytest.mark.processes
def test_duplicate_wakeups_and_concurrent_rounds_never_reserve_twice(
    app: App, settings: Settings, admin: NodeAdmin, redis_client: redis.Redis, placement_worker: Proc
) -> None:
    """Extra ``poolq.place`` messages and four in-process schedulers (each with its own
    view) race the worker over the same jobs: each job is reserved at most once."""
    node_ids = [f"n{i}" for i in range(3)]
    for node_id in node_ids:
        add_node(admin, node_id, cpus=50, memory=1024 * GiB)
    celery = create_celery(settings)
    stop = threading.Event()
    errors: list[BaseException] = []
    claimed_by_threads: list[int] = []

    def race() -> None:
        scheduler = Scheduler(JobStore(connect(settings), settings))
        try:
            while not stop.is_set():
                scheduler.unblock_on_kick()
                claimed = scheduler.round()
                claimed_by_threads.append(claimed)
                if not claimed:
                    time.sleep(0.002)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        refs = []
        for i in range(500):
            refs.append(keys.ref("default", submit(app, timeout_ms=0)))
            if i % 5 == 0:
                celery.send_task(queues.PLACE, queue=queues.PLACEMENT)
        wait_for(
            lambda: len(ledger(redis_client, refs, node_ids)["placed"]) >= 150, timeout=60, what="the nodes to fill"
        )
        for _ in range(50):
            celery.send_task(queues.PLACE, queue=queues.PLACEMENT)
        time.sleep(2.0)  # let the extra wake-ups and rounds run against full nodes
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert sum(claimed_by_threads) > 0  # the in-process schedulers did take part
    book = ledger(redis_client, refs, node_ids)
    assert len(book["placed"]) == 150
    assert len(book["waiting"]) == 350
    assert_placed_exactly_once(book, redis_client, per_job_cpu=1000)
    assert admin.check() == []

    # A placed job put back in line (as a lease recovery racing a slow reservation
    # would) is claimed and decided again, on a node with room: reserve.lua refuses it.
    placement_worker.stop()
    for ref in book["waiting"]:  # only the replayed job may want the spare node
        assert call(app, "POST", f"/api/jobs/{keys.split_ref(ref)[1]}/stop").json == {"stopped": True}
    add_node(admin, "spare", cpus=4)
    ref = book["placed"][0]
    fields = book["records"][ref]
    redis_client.zadd(keys.shape_queue(fields["shape"]), {ref: int(fields["seq"])})
    redis_client.zadd(keys.SHAPES_READY, {fields["shape"]: 0})
    assert Scheduler(JobStore(connect(settings), settings)).round() >= 1
    assert redis_client.hget(keys.job(ref), "node") == fields["node"]
    assert reserved_of(redis_client, "spare") == 0
    assert_placed_exactly_once(ledger(redis_client, refs, [*node_ids, "spare"]), redis_client, per_job_cpu=1000)
    assert admin.check() == []


def test_an_operators_drain_outlives_the_agent_registering_again(admin: NodeAdmin) -> None:
    capacity = capacity_of(4, 4 << 30)
    admin.upsert("n1", pool="p", labels={}, capacity=capacity, kind="agent", create=False)
    admin.drain("n1")
    incarnation = admin.upsert("n1", pool="p", labels={}, capacity=capacity, kind="agent", create=False)  # restarts
    assert [node["draining"] for node in admin.describe()] == [True]
    admin.remove("n1", incarnation=incarnation)  # the agent shuts down: its node goes
    admin.upsert("n1", pool="p", labels={}, capacity=capacity, kind="agent", create=False)
    admin.drain("n1", shutdown=True)  # the agent's own SIGTERM drain
    admin.upsert("n1", pool="p", labels={}, capacity=capacity, kind="agent", create=False)
    assert [node["draining"] for node in admin.describe()] == [False]
