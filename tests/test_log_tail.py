"""The log tail and the ASGI front, in-process, on a real Redis (docs/api.md).

``JobStore.log_since`` reads what a follower has not seen; ``api_shim.front.Front`` is
driven the way granian drives an ASGI app, one connection's ``receive`` and ``send`` at a
time, around the real WSGI ``App``. What only a socket shows, Ray's own CLI and SDK over
a live server, is in tests/test_ray_sdk.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from api_shim.app import App
from api_shim.front import Front
from api_shim.http import WEBSOCKET
from poolq import keys, tokens
from poolq.errors import NotFound
from poolq.settings import Settings
from poolq.store import JobStore
from tests.kit import JOB, submit
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


def test_the_tail_route_over_plain_http(app: App, settings: Settings) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-plain"})
    plain = call(app, "GET", "/api/jobs/app-tail-plain/logs/tail")
    assert plain.status == 426 and plain.headers["Upgrade"] == "websocket"
    assert "WebSocket" in plain.json["error"]
    other = call(app, "GET", "/api/jobs/app-tail-plain/logs/tail", headers={"X-Tenant-Id": "team-b"})
    assert other.status == 404 and other.json == call(app, "GET", "/api/jobs/app-tail-plain/logs", headers={"X-Tenant-Id": "team-b"}).json
    assert call(app, "GET", "/api/version").json["version"] == "4"

    plain_wsgi = App(dataclasses.replace(settings, api_websockets=False))
    off = call(plain_wsgi, "GET", "/api/jobs/app-tail-plain/logs/tail")
    assert off.status == 501 and "POOLQ_API_WEBSOCKETS=0" in off.json["error"]
    assert call(plain_wsgi, "GET", "/api/version").json["version"] == "0"  # Ray's CLI does not try


def test_the_handshake_is_judged_as_the_logs_route(app: App) -> None:
    submit(app, {**JOB, "submission_id": "app-tail-judge"})
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/jobs/app-tail-judge/logs/tail", "QUERY_STRING": ""}
    assert app.tail_handshake(environ)[1] == ("default", "app-tail-judge")
    refused, target = app.tail_handshake({**environ, "HTTP_X_TENANT_ID": "bad tenant!"})
    assert target is None and refused[0] == 400
    refused, target = app.tail_handshake({**environ, "PATH_INFO": "/api/jobs/app-tail-judge/logs"})
    assert target is None and refused[0] == 404  # only the tail route opens a tail
    assert WEBSOCKET not in environ  # the caller's environ is left as it was


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


def scope(kind: str, path: str, headers: dict[str, bytes] | None = None, method: str = "GET") -> dict[str, Any]:
    return {
        "type": kind,
        "http_version": "1.1",
        "server": ("127.0.0.1", "8000"),
        "client": ("127.0.0.1", "50000"),
        "scheme": "http" if kind == "http" else "ws",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(name.lower().encode(), value) for name, value in (headers or {}).items()],
    }


@pytest.fixture
def front(settings: Settings) -> Front:
    return Front(App(dataclasses.replace(settings, api_threads=4, max_log_tails=1, log_tail_poll_s=0.05)))


async def http(front: Front, method: str, path: str, body: bytes = b"", **headers: bytes) -> tuple[int, dict[str, str], bytes]:
    if body:
        headers = {"content-type": b"application/json", "content-length": str(len(body)).encode(), **headers}
    connection = Connection({"type": "http.request", "body": body, "more_body": False})
    await asyncio.wait_for(front(scope("http", path, headers, method), connection.receive, connection.send), STEP_S)
    start, answer = await connection.next_sent(), await connection.next_sent()
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, answer["body"]


def test_http_through_the_front_is_the_wsgi_app(front: Front) -> None:
    async def scenario() -> None:
        status, _, body = await http(front, "POST", "/api/jobs", json.dumps({**JOB, "submission_id": "app-front"}).encode())
        assert status == 200 and json.loads(body)["submission_id"] == "app-front"
        status, headers, body = await http(front, "GET", "/api/jobs/app-front")
        assert (status, body) == (200, call(front.app, "GET", "/api/jobs/app-front").body)
        assert headers["ETag"] and headers["Content-Length"] == str(len(body))
        status, _, body = await http(front, "HEAD", "/api/jobs/app-front")
        assert status == 200 and body == b""
        # A header value that is not visible ASCII reaches the app as "", as under granian's WSGI.
        status, _, body = await http(front, "POST", "/api/jobs", json.dumps(JOB).encode(), **{"x-pool-label": "é".encode()})
        assert status == 400 and json.loads(body) == call(front.app, "POST", "/api/jobs", JOB, headers={"X-Pool-Label": ""}).json

    asyncio.run(scenario())


def test_a_body_that_stops_arriving_is_a_408(front: Front) -> None:
    front.body_wait_s = 0.2

    async def scenario() -> None:
        for length in (10, 1 << 20):  # read before the app runs, and streamed to it
            headers = {"content-type": b"application/json", "content-length": str(length).encode()}
            connection = Connection({"type": "http.request", "body": b"{", "more_body": True})  # then nothing
            await asyncio.wait_for(front(scope("http", "/api/jobs", headers, "POST"), connection.receive, connection.send), STEP_S)
            start, answer = await connection.next_sent(), await connection.next_sent()
            assert start["status"] == 408, (length, start)
            assert json.loads(answer["body"]) == {"error": "the request body stopped arriving before its end"}

    asyncio.run(scenario())


async def open_tail(front: Front, submission_id: str, connection: Connection, tenant: bytes | None = None) -> asyncio.Task[None]:
    headers = {"x-tenant-id": tenant} if tenant else {}
    connection.incoming.put_nowait({"type": "websocket.connect"})
    return asyncio.ensure_future(front(scope("websocket", f"/api/jobs/{submission_id}/logs/tail", headers), connection.receive, connection.send))


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
        task = await open_tail(front, "app-theirs", mine, tenant=b"team-b")
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


def test_with_tokens_the_handshake_needs_the_token_of_the_jobs_tenant(settings: Settings, redis_client: Any) -> None:
    front = Front(App(dataclasses.replace(settings, auth="tokens", api_threads=2)))
    token_a, token_b = tokens.create(redis_client, "team-a"), tokens.create(redis_client, "team-b")
    submit(front.app, {**JOB, "submission_id": "app-guarded"}, headers={"Authorization": f"Bearer {token_a}"})

    async def handshake(token: str | None) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {token}".encode()} if token else {}
        connection = Connection({"type": "websocket.connect"})
        path = "/api/jobs/app-guarded/logs/tail"
        task = asyncio.ensure_future(front(scope("websocket", path, headers), connection.receive, connection.send))
        first = await connection.next_sent()
        connection.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, STEP_S)
        return first

    async def scenario() -> None:
        missing = await handshake(None)
        assert missing["status"] == 401 and (b"WWW-Authenticate", b'Bearer realm="poolq"') in missing["headers"]
        assert (await handshake(token_b))["status"] == 404  # another tenant's job
        assert (await handshake(token_a)) == {"type": "websocket.accept"}

    asyncio.run(scenario())
