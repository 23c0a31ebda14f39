"""The log tail, its redirect and the server of tails, in-process, on a real Redis (docs/api.md).

``JobStore.log_since`` reads what a follower has not seen; the WSGI ``App`` redirects a
tail's handshake with a ticket; ``api_shim.front.Front``, the server of tails, is driven
the way granian drives an ASGI app, one connection's ``receive`` and ``send`` at a time,
around the real ``App``. What only a socket shows, Ray's own CLI and SDK over
a live server, is in tests/test_ray_sdk.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from api_shim.app import App
from api_shim.front import Front
from api_shim.http import WEBSOCKET
from poolq import keys, tokens
from poolq.embedded import EmbeddedRedis, free_port
from poolq.errors import NotFound
from poolq.settings import Settings
from poolq.store import JobStore
from tests.kit import JOB, START_S, submit
from tests.procs import Proc, wait_for
from tests.wsgi import call

STEP_S = 10.0  # a functional deadline: each awaited step happens well within it


# -- JobStore.log_since -----------------------------------------------------------------


def _append(store: JobStore, submission_id: str, data: bytes, offset: int, limit: int = 1 << 20) -> None:
    job_ref = keys.ref("default", submission_id)
    store.scripts.log_append(keys=[keys.log(job_ref), keys.job(job_ref)], args=[data, limit, offset])


def test_log_since_reads_what_is_new(app: App, store: JobStore) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-new"})
    assert store.log_since("default", "app-tail-new", 0) == (b"", 0, False)
    _append(store, "app-tail-new", b"one\n", 0)
    _append(store, "app-tail-new", b"two\n", 4)
    first = store.log_since("default", "app-tail-new", 0)
    assert first == (b"one\ntwo\n", 8, False)
    assert store.log_since("default", "app-tail-new", first.offset) == (b"", 8, False)
    for n in range(100):  # many chunks: a read from near the end is still just the new part
        _append(store, "app-tail-new", f"line {n}\n".encode(), 8 + sum(len(f"line {k}\n") for k in range(n)))
    end = 8 + sum(len(f"line {k}\n") for k in range(100))
    assert store.log_since("default", "app-tail-new", end - len(b"line 99\n")) == (b"line 99\n", end, False)
    assert store.log_since("default", "app-tail-new", 0).data.startswith(b"one\ntwo\nline 0\n")


def test_log_since_keeps_characters_whole_until_the_job_ends(app: App, store: JobStore) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-utf8"})
    euro = "€".encode()  # three bytes
    _append(store, "app-tail-utf8", b"price " + euro[:2], 0)
    read = store.log_since("default", "app-tail-utf8", 0)
    assert read == (b"price ", 6, False)  # the character still arriving waits
    store.stop("default", "app-tail-utf8")  # a PENDING job stops at once: it has ended
    ended = store.log_since("default", "app-tail-utf8", read.offset)
    assert ended.ended and ended.offset == 8 and ended.data == euro[:2]  # the rest, as it is


def test_log_since_starts_at_the_oldest_byte_kept(app: App, store: JobStore) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-trim"})
    for n in range(10):  # 10 chunks of 10 bytes through a tail of 40
        _append(store, "app-tail-trim", f"chunk-{n:02d}-\n".encode(), n * 10, limit=40)
    read = store.log_since("default", "app-tail-trim", 0)
    assert read.data == b"chunk-06-\nchunk-07-\nchunk-08-\nchunk-09-\n" and read.offset == 100


def test_log_since_of_a_job_that_does_not_exist(app: App, store: JobStore) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-mine"})
    with pytest.raises(NotFound):
        store.log_since("default", "app-tail-none", 0)
    with pytest.raises(NotFound):
        store.log_since("team-b", "app-tail-mine", 0)


# -- the route, as the WSGI app answers it ---------------------------------------------------


def test_the_api_redirects_a_tail_to_the_server_of_tails_with_a_ticket(app: App, settings: Settings) -> None:
    served = App(dataclasses.replace(settings, api_tail_port=8001))  # as `poolq api` passes it down
    submit(served, {**JOB, "submission_id": "app-tail-plain"})
    plain = call(served, "GET", "/api/jobs/app-tail-plain/logs/tail")
    assert plain.status == 426 and plain.headers["Upgrade"] == "websocket"
    assert "WebSocket" in plain.json["error"]
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Host": "poolq.example:8000"}
    redirect = call(served, "GET", "/api/jobs/app-tail-plain/logs/tail", headers=upgrade)
    assert redirect.status == 307
    location = urlsplit(redirect.headers["Location"])
    assert (location.scheme, location.hostname, location.port) == ("http", "poolq.example", 8001)
    assert location.path == "/api/jobs/app-tail-plain/logs/tail"
    query = {name: values[0] for name, values in parse_qs(location.query).items()}
    key = tokens.tail_key(served.store.redis)
    assert tokens.ticket_tenant(key, query, "app-tail-plain", time.time()) == "default"
    assert tokens.ticket_tenant(key, query, "app-tail-other", time.time()) is None  # this job's only
    assert tokens.ticket_tenant(key, query, "app-tail-plain", time.time() + tokens.TICKET_S + 1) is None
    v6 = call(served, "GET", "/api/jobs/app-tail-plain/logs/tail", headers={**upgrade, "Host": "[::1]:8000"})
    assert urlsplit(v6.headers["Location"]).netloc == "[::1]:8001"
    odd = call(served, "GET", "/api/jobs/app-tail-plain/logs/tail", headers={**upgrade, "Host": "a/b@c"})
    assert urlsplit(odd.headers["Location"]).hostname != "c"  # not a host: the server's own name instead
    other = call(served, "GET", "/api/jobs/app-tail-plain/logs/tail", headers={**upgrade, "X-Tenant-Id": "team-b"})
    assert other.status == 404  # judged before any redirect, as GET .../logs is
    assert other.json == call(served, "GET", "/api/jobs/app-tail-plain/logs", headers={"X-Tenant-Id": "team-b"}).json
    assert call(served, "GET", "/api/version").json["version"] == "4"
    elsewhere = App(dataclasses.replace(settings, api_tail_port=8001, api_tail_url="https://logs.example/"))
    moved = call(elsewhere, "GET", "/api/jobs/app-tail-plain/logs/tail", headers=upgrade)
    assert moved.headers["Location"].startswith("https://logs.example/api/jobs/app-tail-plain/logs/tail?")

    # A WSGI server other than `poolq api` (no tail port), or tails turned off: no tail.
    for plain_wsgi in (app, App(dataclasses.replace(settings, api_websockets=False, api_tail_port=8001))):
        off = call(plain_wsgi, "GET", "/api/jobs/app-tail-plain/logs/tail", headers=upgrade)
        assert off.status == 501 and "POOLQ_API_WEBSOCKETS=0" in off.json["error"]
        assert call(plain_wsgi, "GET", "/api/version").json["version"] == "0"  # Ray's CLI does not try


def test_the_handshake_is_judged_as_the_logs_route_with_the_tickets_tenant(app: App) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-judge"})
    path = "/api/jobs/app-tail-judge/logs/tail"
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ticket_query(app, "app-tail-judge")}
    assert app.tail_handshake(environ)[1] == ("default", "app-tail-judge")
    # The ticket makes the tenant: a header naming another changes nothing.
    assert app.tail_handshake({**environ, "HTTP_X_TENANT_ID": "team-b"})[1] == ("default", "app-tail-judge")
    for query in ("", ticket_query(app, "app-tail-judge").replace("tenant=default", "tenant=team-b"),
                  ticket_query(app, "app-tail-other")):
        refused, target = app.tail_handshake({**environ, "QUERY_STRING": query})
        assert target is None and refused[0] == 403 and b"ticket" in refused[2]
    refused, target = app.tail_handshake({**environ, "PATH_INFO": "/api/jobs/app-tail-judge/logs"})
    assert target is None and refused[0] == 404  # only the tail route opens a tail
    assert WEBSOCKET not in environ  # the caller's environ is left as it was


def ticket_query(app: App, submission_id: str, tenant: str = "default") -> str:
    return urlencode(tokens.tail_ticket(tokens.tail_key(app.store.redis), tenant, submission_id, time.time()))


# -- the ASGI front, driven as granian drives it ------------------------------------------------


class Connection:
    """One connection's ASGI ``receive`` and ``send``; ``sent`` is what the app sent."""

    def __init__(self, *incoming: dict[str, Any], send_blocks: bool = False):
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in incoming:
            self.incoming.put_nowait(message)
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.send_blocks = send_blocks

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        if self.send_blocks and message["type"] == "websocket.send":
            await asyncio.Event().wait()  # a client that takes nothing
        await self.sent.put(message)

    async def next_sent(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), STEP_S)


def scope(kind: str, path: str, headers: dict[str, bytes] | None = None, method: str = "GET", query: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "http_version": "1.1",
        "server": ("127.0.0.1", "8000"),
        "client": ("127.0.0.1", "50000"),
        "scheme": "http" if kind == "http" else "ws",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(name.lower().encode(), value) for name, value in (headers or {}).items()],
    }


@pytest.fixture
def front(settings: Settings) -> Front:
    return Front(App(dataclasses.replace(settings, api_threads=4, max_log_tails=1, log_tail_poll_s=0.05)))


def test_plain_http_at_the_server_of_tails_is_a_404(front: Front) -> None:
    async def scenario() -> None:
        connection = Connection({"type": "http.request", "body": b"", "more_body": False})
        await asyncio.wait_for(front(scope("http", "/api/jobs"), connection.receive, connection.send), STEP_S)
        start, answer = await connection.next_sent(), await connection.next_sent()
        assert start["status"] == 404 and "only log tails" in json.loads(answer["body"])["error"]

    asyncio.run(scenario())


async def open_tail(front: Front, submission_id: str, connection: Connection, tenant: str = "default") -> asyncio.Task[None]:
    """A tail's handshake at the server of tails, with the ticket the API's redirect gives ``tenant``."""
    query = await asyncio.to_thread(ticket_query, front.app, submission_id, tenant)
    connection.incoming.put_nowait({"type": "websocket.connect"})
    path = f"/api/jobs/{submission_id}/logs/tail"
    return asyncio.ensure_future(front(scope("websocket", path, query=query), connection.receive, connection.send))


def test_a_tail_sends_the_output_then_follows_it_until_the_job_ends(front: Front) -> None:
    store = front.app.store
    submit(front.app, {**JOB, "submission_id": "app-follow"})
    _append(store, "app-follow", b"before the tail\n", 0)

    async def scenario() -> None:
        connection = Connection()
        tail = await open_tail(front, "app-follow", connection)
        assert (await connection.next_sent()) == {"type": "websocket.accept"}
        assert (await connection.next_sent()) == {"type": "websocket.send", "text": "before the tail\n"}
        await asyncio.to_thread(_append, store, "app-follow", b"while it runs\n", 16)
        assert (await connection.next_sent()) == {"type": "websocket.send", "text": "while it runs\n"}
        await asyncio.to_thread(store.stop, "default", "app-follow")
        assert (await connection.next_sent()) == {"type": "websocket.close", "code": 1000}
        await asyncio.wait_for(tail, STEP_S)
        assert front.tails.open == 0

    asyncio.run(scenario())


def test_a_tail_of_another_tenants_job_is_refused_with_the_logs_answer(front: Front) -> None:
    submit(front.app, {**JOB, "submission_id": "app-theirs"}, tenant="team-b")

    async def scenario() -> None:
        connection = Connection()
        await asyncio.wait_for(await open_tail(front, "app-theirs", connection), STEP_S)
        start, body = await connection.next_sent(), await connection.next_sent()
        assert start["type"] == "websocket.http.response.start" and start["status"] == 404
        assert json.loads(body["body"]) == call(front.app, "GET", "/api/jobs/app-theirs/logs").json
        assert connection.sent.empty() and front.tails.open == 0  # never accepted

        mine = Connection()
        task = await open_tail(front, "app-theirs", mine, tenant="team-b")
        assert (await mine.next_sent()) == {"type": "websocket.accept"}
        mine.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, STEP_S)

    asyncio.run(scenario())


def test_tails_beyond_the_limit_are_refused_and_a_slot_frees_when_the_client_leaves(front: Front) -> None:
    submit(front.app, {**JOB, "submission_id": "app-popular"})

    async def scenario() -> None:
        first = Connection()
        first_task = await open_tail(front, "app-popular", first)
        assert (await first.next_sent()) == {"type": "websocket.accept"}
        second = Connection()
        await asyncio.wait_for(await open_tail(front, "app-popular", second), STEP_S)
        start, body = await second.next_sent(), await second.next_sent()
        assert start["status"] == 503 and (b"Retry-After", b"1") in start["headers"]
        assert "too many log tails" in json.loads(body["body"])["error"]

        first.incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})  # the client leaves
        await asyncio.wait_for(first_task, STEP_S)
        assert front.tails.open == 0
        third = Connection()
        third_task = await open_tail(front, "app-popular", third)
        assert (await third.next_sent()) == {"type": "websocket.accept"}
        third.incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})
        await asyncio.wait_for(third_task, STEP_S)

    asyncio.run(scenario())


def test_a_client_that_takes_nothing_is_dropped(front: Front) -> None:
    front.tails.send_timeout_s = 0.2
    submit(front.app, {**JOB, "submission_id": "app-stuck"})
    _append(front.app.store, "app-stuck", b"x" * 100_000, 0)

    async def scenario() -> None:
        connection = Connection(send_blocks=True)
        tail = await open_tail(front, "app-stuck", connection)
        assert (await connection.next_sent()) == {"type": "websocket.accept"}
        await asyncio.wait_for(tail, STEP_S)  # the send timed out: the tail ended, its slot is free
        assert (await connection.next_sent()) == {"type": "websocket.close", "code": 1000}
        assert front.tails.open == 0

    asyncio.run(scenario())


def test_with_tokens_the_server_of_tails_believes_the_ticket_alone(settings: Settings, redis_client: Any) -> None:
    front = Front(App(dataclasses.replace(settings, auth="tokens", api_threads=2)))
    token_a = tokens.create(redis_client, "team-a")
    submit(front.app, {**JOB, "submission_id": "app-guarded"}, headers={"Authorization": f"Bearer {token_a}"})

    async def handshake(query: str, token: str | None = None) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {token}".encode()} if token else {}
        connection = Connection({"type": "websocket.connect"})
        path = "/api/jobs/app-guarded/logs/tail"
        task = asyncio.ensure_future(front(scope("websocket", path, headers, query=query), connection.receive, connection.send))
        first = await connection.next_sent()
        connection.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, STEP_S)
        return first

    async def scenario() -> None:
        assert (await handshake("", token=token_a))["status"] == 403  # a token is not a ticket
        theirs = await asyncio.to_thread(ticket_query, front.app, "app-guarded", "team-b")
        assert (await handshake(theirs))["status"] == 404  # a ticket of another tenant: not its job
        mine = await asyncio.to_thread(ticket_query, front.app, "app-guarded", "team-a")
        assert (await handshake(mine)) == {"type": "websocket.accept"}  # no Authorization: the ticket is enough

    asyncio.run(scenario())


# -- the server of tails beside `poolq api` ------------------------------------------------------


def _tail_port(port: int, submission_id: str) -> int:
    """Where the API at ``port`` redirects a tail of ``submission_id`` (raw HTTP, not followed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET /api/jobs/{submission_id}/logs/tail HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
        )
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 307"), head
    location = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("location:"))
    return int(urlsplit(location).port or 0)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.processes
def test_the_server_of_tails_and_the_workers_live_and_die_with_poolq_api(redis_server: EmbeddedRedis, tmp_path: Path, app: App) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-life"})
    env = {"POOLQ_REDIS_URL": redis_server.url, "POOLQ_DATA_DIR": str(tmp_path / "data")}
    for ending in (signal.SIGTERM, signal.SIGKILL):
        port = free_port()
        api = Proc(["api", "--port", str(port), "--workers", "1"], env, tmp_path / f"api-{ending}.log").start()
        try:
            wait_for(lambda p=port: _accepts(p), START_S, 0.1, what="poolq api to listen")
            tail_port = _tail_port(port, "app-tail-life")
            assert tail_port != port and _accepts(tail_port)  # listening before the API answered
            os.kill(api.pid, ending)  # the api process only, as kill -9 would
            wait_for(lambda p=tail_port: not _accepts(p), 15, 0.1, what=f"the server of tails to end after {ending!r}")
            # granian's workers, which hold the API's port, end with their master too.
            wait_for(lambda p=port: not _accepts(p), 15, 0.1, what=f"the API's workers to end after {ending!r}")
        finally:
            api.stop()
