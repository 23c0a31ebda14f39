"""Answers sent as they are made (docs/api.md): the change feed as Server-Sent Events and a
job's output with ``?follow=1``, on the real Redis.

In-process, the test takes each chunk of the body as a server would (tests/wsgi.py,
``open_stream``) and closes it as a server does when the client has gone. What only a
socket shows (chunks arriving before the answer ends, a client that hangs up freeing its
slot) is tested against a real ``poolq api``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from api_shim.app import App
from api_shim.routes import jobs as job_routes
from poolq import keys
from poolq.embedded import EmbeddedRedis, free_port
from poolq.model import JobStatus
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from poolq.store import Ending, JobStore
from tests import kit
from tests.kit import add_node
from tests.procs import Proc, wait_for
from tests.wsgi import call, open_stream
from worker.scheduler import Scheduler

EVENTS = {"Accept": "text/event-stream"}


def parse_events(chunk: bytes) -> list[dict[str, Any]]:
    """The events of a chunk of an event stream: kind, id and decoded data (comments skipped)."""
    events = []
    for block in chunk.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("event", "id", "data"):
                fields[name] = value
        if "event" in fields:
            events.append({"event": fields["event"], "id": fields.get("id"), "data": json.loads(fields["data"])})
    return events


def _run(store: JobStore, admin: NodeAdmin, submission_id: str) -> str:
    """Place the job on a static node and start it there, as an agent would; its ref."""
    add_node(admin, "n1", pool="default")
    Scheduler(store).place_waiting()
    job_ref = keys.ref("default", submission_id)
    kit.start(store, job_ref, "n1")
    return job_ref


def _append(store: JobStore, submission_id: str, data: bytes, offset: int) -> None:
    job_ref = keys.ref("default", submission_id)
    store.scripts.log_append(keys=[keys.log(job_ref), keys.job(job_ref)], args=[data, 1 << 20, offset])


@pytest.fixture
def one_waiter(settings: Settings) -> App:
    """An API process that may hold one waiting request or stream."""
    return App(dataclasses.replace(settings, max_waiters=1))


# -- the change feed as Server-Sent Events ---------------------------------------------------


def test_the_feed_as_events_gives_each_change_as_it_happens_with_its_cursor_as_id(app: App) -> None:
    status, headers, stream = open_stream(app, "GET", "/api/jobs/changes", headers=EVENTS)
    try:
        assert status == 200 and headers["Content-Type"] == "text/event-stream"
        assert "Content-Length" not in headers  # sent as it is made
        first = next(stream)
        assert first.startswith(b"retry: 1000\n")
        (ready,) = parse_events(first)
        assert ready["event"] == "cursor" and ready["id"] == ready["data"]["cursor"] == "0-0"

        submission_id = kit.submit(app, timeout_ms=0)
        (change,) = parse_events(next(stream))
        assert change["event"] == "change" and change["id"] == change["data"]["cursor"]
        assert change["data"]["submission_id"] == submission_id and change["data"]["status"] == "PENDING"
        assert change["data"]["etag"] == call(app, "GET", f"/api/jobs/{submission_id}").headers["ETag"]
    finally:
        stream.close()

    # An EventSource that reconnects sends the last id it saw: the stream resumes after it.
    kit.stop(app, submission_id)
    _, _, resumed = open_stream(app, "GET", "/api/jobs/changes", headers={**EVENTS, "Last-Event-ID": change["id"]})
    try:
        start, stopped = parse_events(next(resumed))
        assert start["event"] == "cursor" and start["id"] == change["id"]
        assert (stopped["data"]["submission_id"], stopped["data"]["status"]) == (submission_id, "STOPPED")
    finally:
        resumed.close()


def test_a_quiet_event_stream_sends_a_comment_every_heartbeat(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_routes, "HEARTBEAT_S", 0.2)
    _, _, stream = open_stream(app, "GET", "/api/jobs/changes?since=0-0", headers=EVENTS)
    try:
        next(stream)
        assert next(stream) == b": nothing new\n\n"  # how a client that left is noticed: the write fails
    finally:
        stream.close()


def test_bad_resume_points_are_400_and_a_cursor_too_old_is_410_before_any_event(app: App) -> None:
    bad = call(app, "GET", "/api/jobs/changes", headers={**EVENTS, "Last-Event-ID": "yesterday"})
    assert bad.status == 400 and "Last-Event-ID" in bad.json["fields"]
    bad = call(app, "GET", "/api/jobs/changes?since=soon", headers=EVENTS)
    assert bad.status == 400 and "since" in bad.json["fields"]
    old = call(app, "GET", "/api/jobs/changes?since=5-0", headers=EVENTS)  # a tenant without a feed
    assert old.status == 410 and old.json["cursor"] == "0-0" and "list the jobs again" in old.json["error"]


def test_streams_take_a_waiters_slot_and_give_it_back_however_they_end(one_waiter: App) -> None:
    app = one_waiter
    _, _, stream = open_stream(app, "GET", "/api/jobs/changes", headers=EVENTS)
    busy = [
        call(app, "GET", "/api/jobs/changes", headers=EVENTS),
        call(app, "GET", "/api/jobs/changes?since=0-0&wait=30"),  # a long poll is answered at once
    ]
    assert busy[0].status == 503 and busy[0].headers["Retry-After"] == "1" and "POOLQ_MAX_WAITERS" in busy[0].json["error"]
    assert busy[1].status == 200 and busy[1].headers["Retry-After"] == "1"
    stream.close()  # never read: the server closes it all the same
    submission_id = kit.submit(app, timeout_ms=0)
    status, _, follow = open_stream(app, "GET", f"/api/jobs/{submission_id}/logs?follow=1")
    assert status == 200
    follow.close()
    head = call(app, "HEAD", "/api/jobs/changes", headers=EVENTS)
    assert head.status == 200 and head.body == b""
    status, _, stream = open_stream(app, "GET", "/api/jobs/changes", headers=EVENTS)
    stream.close()
    assert status == 200  # HEAD closed its stream: the slot is free


# -- a job's output as it is written ---------------------------------------------------------


def test_follow_sends_the_output_as_it_is_written_and_ends_with_the_job(app: App, store: JobStore,
                                                                         admin: NodeAdmin) -> None:
    submission_id = kit.submit(app, {**kit.JOB, "submission_id": "app-follow"}, timeout_ms=0)
    job_ref = _run(store, admin, submission_id)
    _append(store, submission_id, b"one\n", 0)
    status, headers, stream = open_stream(app, "GET", f"/api/jobs/{submission_id}/logs?follow=1")
    try:
        assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
        assert headers["X-Log-Start"] == "0" and "Content-Length" not in headers
        assert next(stream) == b"one\n"
        _append(store, submission_id, "twö\n".encode(), 4)
        assert next(stream) == "twö\n".encode()
        assert store.finish(job_ref, JobStatus.SUCCEEDED) == Ending.MOVED
        assert list(stream) == []  # the job has ended and all was sent: the answer ends
    finally:
        stream.close()

    # From an offset: the rest, then the end at once (the job has ended).
    status, headers, stream = open_stream(app, "GET", f"/api/jobs/{submission_id}/logs?follow=1&offset=4")
    assert headers["X-Log-Start"] == "4" and b"".join(stream) == "twö\n".encode()


def test_follow_refuses_what_logs_refuses(app: App) -> None:
    submission_id = kit.submit(app, {**kit.JOB, "submission_id": "app-follow-mine"}, timeout_ms=0)
    bad = call(app, "GET", f"/api/jobs/{submission_id}/logs?follow=yes")
    assert bad.status == 400 and "follow" in bad.json["fields"]
    other = call(app, "GET", f"/api/jobs/{submission_id}/logs?follow=1", headers={"X-Tenant-Id": "other"})
    assert other.status == 404
    assert call(app, "GET", "/api/jobs/app-nobody/logs?follow=1").status == 404


# -- through a real server -------------------------------------------------------------------


class RawStream:
    """One request on a real socket, whose chunked answer is read a chunk at a time."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()

    def read_until(self, wanted: bytes) -> bytes:
        seen = b""
        while wanted not in seen:
            part = self.response.read1(65536)
            assert part, f"the answer ended before {wanted!r}: {seen!r}"
            seen += part
        return seen

    def hang_up(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


@pytest.fixture
def api_port(start_proc: Callable[..., Proc]) -> Iterator[int]:
    """A real ``poolq api`` (one server process) that may hold one waiting request or stream."""
    port = free_port()
    proc = start_proc(["api", "--port", str(port), "--workers", "1"], env={"POOLQ_MAX_WAITERS": "1"}, name="api")

    def answers() -> bool:
        assert proc.alive(), f"poolq api exited:\n{proc.output()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(answers, kit.START_S, 0.1, what="poolq api to listen")
    yield port


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def _slot_free(port: int) -> bool:
    """A short long poll is held only when the process has a waiter's slot free."""
    return _get(port, "/api/jobs/changes?since=0-0&wait=0.2&limit=1").getheader("Retry-After") is None


@pytest.mark.processes
def test_a_real_server_streams_events_and_frees_the_slot_of_a_client_that_hung_up(api_port: int, app: App,
                                                                                   store: JobStore,
                                                                                   admin: NodeAdmin) -> None:
    events = RawStream(api_port, "/api/jobs/changes", EVENTS)
    assert events.response.getheader("Transfer-Encoding") == "chunked"
    events.read_until(b"event: cursor")
    submission_id = kit.submit(app, {**kit.JOB, "submission_id": "app-real-stream"}, timeout_ms=0)
    assert b'"submission_id":"app-real-stream"' in events.read_until(b"event: change")
    assert _get(api_port, "/api/jobs/changes", EVENTS).status == 503  # its one slot is taken
    assert not _slot_free(api_port)

    # A log follow arrives in chunks, before the job has ended.
    events.hang_up()
    _run(store, admin, submission_id)  # changes: the server's next write fails
    wait_for(lambda: _slot_free(api_port), 30, 0.2, what="the slot of the client that hung up to be freed")
    _append(store, submission_id, b"hello\n", 0)
    follow = RawStream(api_port, f"/api/jobs/{submission_id}/logs?follow=1")
    try:
        assert follow.read_until(b"hello\n") == b"hello\n"
        _append(store, submission_id, b"world\n", 6)
        assert follow.read_until(b"world\n") == b"world\n"
        store.finish(keys.ref("default", submission_id), JobStatus.SUCCEEDED)
        assert follow.response.read() == b""  # ends with the job
    finally:
        follow.hang_up()


def test_an_event_stream_says_why_it_ends_when_redis_stops_answering(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    server.start()
    try:
        app = App(Settings(redis_url=server.url, data_dir=tmp_path / "data"), waker=lambda queue: None)
        _, _, stream = open_stream(app, "GET", "/api/jobs/changes", headers=EVENTS)
        next(stream)
        server.stop()
        (ended,) = parse_events(next(stream))  # within the heartbeat: the wait's next slice fails
        assert ended["event"] == "error" and ended["data"]["error"]
        assert list(stream) == []  # and the stream ends, giving back its slot
    finally:
        server.stop()
