"""Group commit (poolq/commit.py): submissions of one API process that arrive together share
one round trip to Redis, and each still gets the answer it would have got alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.commit import GroupCommit
from poolq.embedded import EmbeddedRedis
from poolq.quotas import set_quota
from poolq.settings import Settings
from tests import kit
from tests.wsgi import Result, call

THREADS = 32


# -- the mechanism ----------------------------------------------------------------------------


def test_a_lone_caller_goes_at_once_and_callers_that_come_meanwhile_share_the_next_round_trip() -> None:
    groups: list[list[int]] = []
    started = threading.Event()

    def commit(items: list[int]) -> list[int]:
        groups.append(items)
        started.set()
        time.sleep(0.2)  # a round trip in flight, long enough for the others to queue
        return [item * 2 for item in items]

    group = GroupCommit(commit)
    assert group(1) == 2 and groups == [[1]]  # alone: its own round trip, nothing waited for

    groups.clear()
    started.clear()
    with ThreadPoolExecutor(20) as pool:
        first = pool.submit(group, 0)
        started.wait(5)
        rest = [pool.submit(group, n) for n in range(1, 20)]
        results = [first.result(10)] + [future.result(10) for future in rest]
    assert results == [n * 2 for n in range(20)]  # each its own result
    assert groups[0] == [0] and sorted(n for g in groups for n in g) == list(range(20))
    assert len(groups) == 2, groups  # the 19 that came during the first round trip went in one


def test_a_group_holds_items_up_to_their_size_and_a_larger_one_goes_alone() -> None:
    groups: list[list[list[int]]] = []
    started = threading.Event()

    def commit(items: list[list[int]]) -> list[int]:
        groups.append(items)
        started.set()
        time.sleep(0.2)
        return [len(item) for item in items]

    group = GroupCommit(commit, max_group=10, size=len)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group, [0])
        started.wait(5)
        sizes = [4, 4, 4, 30, 1]
        rest = []
        for size in sizes:  # queued in this order while the first round trip is in flight
            rest.append(pool.submit(group, list(range(size))))
            time.sleep(0.02)
        assert [f.result(10) for f in rest] == sizes and first.result(10) == 1
    assert [[len(item) for item in g] for g in groups] == [[1], [4, 4], [4], [30], [1]]


def test_callers_queued_behind_a_round_trip_redis_did_not_answer_fail_with_it_at_once() -> None:
    from poolq.errors import Unavailable

    calls: list[list[int]] = []
    started = threading.Event()

    def commit(items: list[int]) -> list[int]:
        calls.append(items)
        started.set()
        time.sleep(0.3)  # Redis not answering, until the socket timeout
        raise Unavailable("redis unavailable: timeout")

    group = GroupCommit(commit, shared_failures=(Unavailable,))
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group, 0)
        started.wait(5)
        rest = [pool.submit(group, n) for n in range(1, 8)]
        for future in [first, *rest]:
            with pytest.raises(Unavailable):
                future.result(10)
    assert calls == [[0]], "the callers queued meanwhile waited for a round trip of their own"
    assert group.largest == 1


def test_a_failing_commit_fails_each_caller_of_its_group_and_the_next_group_goes_on() -> None:
    calls = []

    def commit(items: list[str]) -> list[str]:
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("the commit broke")
        return [item.upper() for item in items]

    group = GroupCommit(commit)
    with pytest.raises(RuntimeError, match="the commit broke"):
        group("boom")
    assert group("next") == "NEXT"

    short = GroupCommit(lambda items: items[:-1])  # a commit that loses an answer is an error, not a mix-up
    with pytest.raises(RuntimeError, match="1 items"):
        short("x")


# -- submissions through the API -----------------------------------------------------------------


def _submit(app: App, body: dict[str, Any], tenant: str) -> Result:
    return call(app, "POST", "/api/jobs", body, headers={"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})


def test_concurrent_mixed_submissions_each_get_the_answer_they_would_get_alone(app: App,
                                                                               redis_client: redis.Redis) -> None:
    set_quota(redis_client, "small", cpus=Decimal(1))
    requests: list[tuple[str, str, dict[str, Any]]] = []  # (kind, tenant, body)
    for n in range(300):
        requests.append(("new", "grouped", {**kit.JOB, "submission_id": f"app-new-{n}"}))
    for n in range(50):  # the same request twice: both accepted, one job
        body = {**kit.JOB, "submission_id": f"app-twice-{n}"}
        requests += [("twice", "grouped", body), ("twice", "grouped", dict(body))]
    for n in range(50):  # two requests under one id: one accepted, the other a conflict
        requests += [
            ("rival", "grouped", {**kit.JOB, "submission_id": f"app-rival-{n}", "entrypoint": "echo a"}),
            ("rival", "grouped", {**kit.JOB, "submission_id": f"app-rival-{n}", "entrypoint": "echo b"}),
        ]
    for n in range(50):  # over the tenant's quota of 1 CPU
        requests.append(("over", "small", {**kit.JOB, "submission_id": f"app-big-{n}", "entrypoint_num_cpus": 2}))
    requests.sort(key=lambda r: hash(r[2]["submission_id"]) % 7)  # interleaved

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda r: _submit(app, r[2], r[1]), requests))
    assert app.store._grouped.largest > 1, "no two submissions shared a round trip: the test tested nothing"

    by_id: dict[str, list[tuple[str, Result, dict[str, Any]]]] = {}
    for (kind, _, body), answer in zip(requests, answers):
        by_id.setdefault(body["submission_id"], []).append((kind, answer, body))
    for submission_id, sent in by_id.items():
        kind = sent[0][0]
        statuses = sorted(answer.status for _, answer, _ in sent)
        if kind in ("new", "twice"):
            assert statuses == [200] * len(sent), (submission_id, [a.body for _, a, _ in sent])
            assert all(a.json["submission_id"] == submission_id for _, a, _ in sent)
        elif kind == "rival":
            assert statuses == [200, 409], (submission_id, statuses)
            (won,) = [body for _, answer, body in sent if answer.status == 200]
            assert kit.record(app, submission_id, tenant="grouped")["entrypoint"] == won["entrypoint"]
        else:
            (over,) = [answer for _, answer, _ in sent]
            assert over.status == 400 and "entrypoint_num_cpus" in over.json["fields"], over.body
    counts = redis_client.hgetall(keys.tenant_counts("grouped"))
    assert int(counts["PENDING"]) == 300 + 50 + 50  # each accepted job counted once
    assert redis_client.hgetall(keys.tenant_counts("small")).get("PENDING", "0") == "0"


@pytest.fixture
def paused_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    server.start()
    yield server
    os.kill(server.process.pid, signal.SIGCONT)  # whatever the test did
    server.stop()


def test_a_redis_pause_during_grouped_submissions_loses_none_and_stores_none_twice(paused_redis: EmbeddedRedis,
                                                                                   tmp_path: Path) -> None:
    app = App(Settings(redis_url=paused_redis.url, data_dir=tmp_path / "data"), waker=lambda queue: None)
    bodies = [{**kit.JOB, "submission_id": f"app-paused-{n}"} for n in range(200)]
    answers: dict[str, Result] = {}

    def send(body: dict[str, Any]) -> None:
        answers[body["submission_id"]] = _submit(app, body, "grouped")

    pid = paused_redis.process.pid
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(send, body) for body in bodies[:100]]
        time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)  # mid-stream: replies are lost, some commands may have run
        futures += [pool.submit(send, body) for body in bodies[100:]]
        time.sleep(1.5)
        os.kill(pid, signal.SIGCONT)
        for future in futures:
            future.result(60)

    unknown = [i for i, answer in answers.items() if answer.status == 503]
    assert {answer.status for answer in answers.values()} <= {200, 503}
    for submission_id in unknown:  # the contract: the outcome is unknown, send the same again
        assert answers[submission_id].json["error"].startswith(f"create app failed, submissionId:[{submission_id}]")
    assert unknown, "the pause answered nothing 503: it did not fall on a round trip"
    for body in bodies:
        if body["submission_id"] in unknown:
            assert _submit(app, body, "grouped").status == 200  # accepted now, or found accepted before
    client = redis.Redis.from_url(paused_redis.url, decode_responses=True)
    assert int(client.hgetall(keys.tenant_counts("grouped"))["PENDING"]) == len(bodies)  # none twice, none lost
    assert client.zcard(keys.tenant_jobs("grouped")) == len(bodies)


# -- polls through the API ---------------------------------------------------------------------


def test_concurrent_polls_each_get_the_answer_they_would_get_alone(app: App, redis_client: redis.Redis) -> None:
    # Pending jobs of two shapes, an array whose tasks placement has not created, another
    # tenant's job (a 404 here), a missing id; read by GET and by ?ids=, all at once.
    for n in range(40):
        assert _submit(app, {**kit.JOB, "submission_id": f"app-poll-{n}", "entrypoint_num_cpus": 1 + n % 2},
                       "polls").status == 200
    assert _submit(app, {**kit.JOB, "submission_id": "app-arr", "array": {"count": 5}}, "polls").status == 200
    assert _submit(app, {**kit.JOB, "submission_id": "app-theirs"}, "others").status == 200
    ids = [f"app-poll-{n}" for n in range(40)] + [f"app-arr-{i}" for i in range(5)] + ["app-theirs", "app-none"]
    paths = [f"/api/jobs/{i}" for i in ids] + ["/api/jobs?ids=" + ",".join(ids[n : n + 7]) for n in range(0, 47, 7)]

    def poll(path: str) -> Result:
        return call(app, "GET", path, headers={"X-Tenant-Id": "polls"})

    alone = [poll(path) for path in paths]
    before = app.store._grouped_reads.largest
    with ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(poll, paths * 4))
    assert app.store._grouped_reads.largest > max(before, 1), "no two polls shared a round trip: tested nothing"
    assert [(a.status, a.body) for a in together] == [(a.status, a.body) for a in alone] * 4
    statuses = {path: a.status for path, a in zip(paths, alone)}
    assert statuses["/api/jobs/app-theirs"] == statuses["/api/jobs/app-none"] == 404
    assert statuses["/api/jobs/app-arr-3"] == 200
    assert alone[0].json["scheduling"]["attempts"] == 0 and alone[0].json["status"] == "PENDING"


def test_a_redis_without_the_scripts_loads_them_and_the_group_goes_on(app: App, redis_client: redis.Redis) -> None:
    # A group commit sends each script by its SHA without asking SCRIPT EXISTS first; a
    # Redis that lost them (restarted, flushed, a new master) answers NOSCRIPT once.
    redis_client.script_flush()
    results = kit.submit_batch(app, [{**kit.JOB, "submission_id": f"app-noscript-{n}"} for n in range(3)],
                               timeout_ms=0)
    assert [r.get("submission_id") for r in results] == [f"app-noscript-{n}" for n in range(3)], results
    assert int(redis_client.hget(keys.tenant_counts("default"), "PENDING")) == 3  # each stored once
