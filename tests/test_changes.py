"""The change feed (docs/api.md, "Following changes"), in-process on the real Redis.

Every step that changes a job's status or node adds an entry to its tenant's feed in the
same Lua step; GET /api/jobs/changes reads them after a cursor, oldest first, and with
``wait`` holds the answer until there is one. A cursor older than what the feed keeps is
a 410 carrying the feed's position now; bad parameters are a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.model import JobStatus
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from poolq.store import Ending, JobStore
from tests import kit
from tests.kit import add_node
from tests.wsgi import call
from worker.scheduler import Scheduler

LIB = Path(__file__).parent.parent / "poolq" / "lua" / "lib" / "changes.lua"


def changes(app: App, since: str | None = None, tenant: str = "default", **query: Any) -> Any:
    params = {**({"since": since} if since is not None else {}), **{k: str(v) for k, v in query.items()}}
    path = "/api/jobs/changes" + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
    return call(app, "GET", path, headers={"X-Tenant-Id": tenant})


def follow(app: App, since: str, tenant: str = "default") -> tuple[list[dict[str, Any]], str]:
    result = changes(app, since, tenant)
    assert result.status == 200, result.body
    return result.json["changes"], result.json["cursor"]


def test_a_jobs_life_is_in_the_feed_in_order_with_the_records_etag(app: App, store: JobStore,
                                                                    admin: NodeAdmin) -> None:
    add_node(admin, "n1", pool="default")
    bookmark = changes(app)
    assert bookmark.status == 200 and bookmark.json == {"changes": [], "cursor": "0-0"}
    submission_id = kit.submit(app, timeout_ms=0)
    Scheduler(store).place_waiting()
    kit.start(store, keys.ref("default", submission_id), "n1")
    assert store.finish(keys.ref("default", submission_id), JobStatus.SUCCEEDED) == Ending.MOVED

    seen, cursor = follow(app, "0-0")
    assert [(c["submission_id"], c["status"], c["node"]) for c in seen] == [
        (submission_id, "PENDING", None),
        (submission_id, "PENDING", "n1"),  # placed
        (submission_id, "RUNNING", "n1"),
        (submission_id, "SUCCEEDED", "n1"),
    ]
    assert cursor == seen[-1]["cursor"]
    assert [c["cursor"] for c in seen] == sorted({c["cursor"] for c in seen}, key=lambda c: tuple(map(int, c.split("-"))))
    assert all(abs(c["time"] - time.time() * 1000) < 60_000 for c in seen)
    record = call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": "default"})
    assert {c["etag"] for c in seen} == {record.headers["ETag"]}, "each change carries the record's ETag as it is now"
    again = call(app, "GET", f"/api/jobs/{submission_id}",
                 headers={"X-Tenant-Id": "default", "If-None-Match": seen[-1]["etag"]})
    assert again.status == 304

    assert follow(app, cursor) == ([], cursor), "nothing after the last change"
    assert follow(app, seen[1]["cursor"])[0] == seen[2:], "a cursor reads on from its change"
    now = changes(app)
    assert now.json == {"changes": [], "cursor": cursor}, "no since: only the feed's position now"

    assert call(app, "DELETE", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": "default"}).status == 200
    gone, _ = follow(app, cursor)
    assert [(c["submission_id"], c["status"], c["etag"]) for c in gone] == [(submission_id, "DELETED", None)]


def test_a_tenant_sees_only_its_own_changes(app: App) -> None:
    mine = kit.submit(app, tenant="alice")
    theirs = kit.submit(app, tenant="bob")
    assert [c["submission_id"] for c in follow(app, "0-0", "alice")[0]] == [mine]
    assert [c["submission_id"] for c in follow(app, "0-0", "bob")[0]] == [theirs]
    assert follow(app, "0-0", "carol") == ([], "0-0")


def test_an_array_and_its_placed_tasks_are_in_the_feed(app: App, store: JobStore, admin: NodeAdmin) -> None:
    add_node(admin, "n1", pool="default")
    array_id = kit.submit(app, {**kit.JOB, "array": {"count": 3}}, timeout_ms=0)
    Scheduler(store).place_waiting()
    seen, _ = follow(app, "0-0")
    assert (array_id, "ARRAY") == (seen[0]["submission_id"], seen[0]["status"])
    assert sorted((c["submission_id"], c["status"], c["node"]) for c in seen[1:]) == [
        (f"{array_id}-{i}", "PENDING", "n1") for i in range(3)
    ]


def test_a_wait_answers_as_soon_as_a_change_comes(app: App) -> None:
    _, cursor = follow(app, "0-0")
    submitted: list[str] = []
    timer = threading.Timer(0.5, lambda: submitted.append(kit.submit(app)))
    started = time.monotonic()
    timer.start()
    try:
        result = changes(app, cursor, wait=30)
    finally:
        timer.join()
    took = time.monotonic() - started
    assert result.status == 200 and [c["submission_id"] for c in result.json["changes"]] == submitted
    assert took < 20, f"the answer waited {took:.1f} s for a change made after 0.5 s"


def test_a_wait_with_no_change_ends_with_the_wait(app: App) -> None:
    kit.submit(app)
    _, cursor = follow(app, "0-0")
    started = time.monotonic()
    result = changes(app, cursor, wait=1)
    took = time.monotonic() - started
    assert result.status == 200 and result.json == {"changes": [], "cursor": cursor}
    assert 0.9 <= took < 15, f"a wait of 1 s took {took:.2f} s"


def test_waits_beyond_the_processes_bound_answer_at_once(settings: Settings) -> None:
    app = App(dataclasses.replace(settings, max_waiters=1))
    held = threading.Thread(target=lambda: changes(app, "0-0", wait=3))
    held.start()
    try:
        time.sleep(0.5)  # the one wait this process may hold is taken
        started = time.monotonic()
        result = changes(app, "0-0", wait=3)
        took = time.monotonic() - started
    finally:
        held.join()
    assert result.status == 200 and result.json["changes"] == []
    assert result.headers.get("Retry-After") == "1", "a refused wait says when to ask again"
    assert took < 2, f"a wait beyond the bound was held {took:.2f} s"


def test_no_change_is_missed_or_doubled_under_concurrent_submissions(app: App) -> None:
    _, cursor = follow(app, "0-0")
    stop, got = threading.Event(), []

    def watcher() -> None:
        nonlocal cursor
        while not stop.is_set() or got_all() is False:
            page, cursor = follow_wait(cursor)
            got.extend(page)

    def follow_wait(since: str) -> tuple[list[dict[str, Any]], str]:
        result = changes(app, since, wait=0.2, limit=37)
        assert result.status == 200, result.body
        return result.json["changes"], result.json["cursor"]

    expected: list[str] = []
    got_all = lambda: len(got) >= len(expected)  # noqa: E731
    thread = threading.Thread(target=watcher)
    thread.start()
    writers = [
        threading.Thread(target=lambda n=n: expected.extend(
            r["submission_id"] for r in kit.submit_batch(app, [{**kit.JOB, "submission_id": f"app-w{n}-{i}"}
                                                            for i in range(50)])))
        for n in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert sorted(c["submission_id"] for c in got) == sorted(expected) and len(expected) == 200
    assert all(c["status"] == "PENDING" for c in got)


def kept() -> int:
    found = re.search(r"CHANGES_KEPT = (\d+)", LIB.read_text())
    assert found
    return int(found.group(1))


def test_the_feed_is_capped_and_a_cursor_older_than_it_keeps_is_410(app: App, redis_client: redis.Redis) -> None:
    first = kit.submit(app)
    (change,), _ = follow(app, "0-0")
    stream = keys.tenant_changes("default")
    pipe = redis_client.pipeline(transaction=False)
    for i in range(kept() + 500):  # as if that many jobs had changed since
        pipe.xadd(stream, {"id": f"app-x{i}", "s": "PENDING", "n": ""})
        if i % 10_000 == 0:
            pipe.execute()
    pipe.execute()
    last = kit.submit(app)  # the step that writes a change trims the feed to its cap
    assert redis_client.xlen(stream) < kept() + 1000, "the feed is bounded"
    result = changes(app, change["cursor"])
    assert result.status == 410
    assert "list the jobs again" in result.json["error"]
    position = result.json["cursor"]
    assert changes(app, position).json == {"changes": [], "cursor": position}
    assert redis_client.xrevrange(stream, count=1)[0][1]["id"] == last
    assert changes(app, "0-0").status == 410, "a feed that lost entries has nothing for a cursor from before them"
    assert first != last


def test_a_cursor_of_a_tenant_forgotten_since_is_410(app: App, redis_client: redis.Redis) -> None:
    kit.submit(app, tenant="gone")
    (change,), _ = follow(app, "0-0", "gone")
    redis_client.delete(keys.tenant_changes("gone"))  # what forget_tenant.lua does once its last job is removed
    result = changes(app, change["cursor"], tenant="gone")
    assert result.status == 410 and result.json["cursor"] == "0-0"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"since": "abc"}, "since"),
        ({"since": "1-2-3"}, "since"),
        ({"since": "18446744073709551615-18446744073709551615"}, "since"),  # the largest id: nothing after it
        ({"since": "0-0", "wait": "-1"}, "wait"),
        ({"since": "0-0", "wait": "61"}, "wait"),
        ({"since": "0-0", "wait": "nan"}, "wait"),
        ({"since": "0-0", "limit": "0"}, "limit"),
        ({"since": "0-0", "limit": "1001"}, "limit"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(app: App, query: dict[str, str], field: str) -> None:
    path = "/api/jobs/changes?" + "&".join(f"{k}={v}" for k, v in query.items())
    result = call(app, "GET", path, headers={"X-Tenant-Id": "default"})
    assert result.status == 400 and field in result.json["fields"], result.body
