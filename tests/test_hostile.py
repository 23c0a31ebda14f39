"""Hostile input (docs/api.md): every answer a 4xx, quickly, never a 500, never a hang.

What only a socket shows (bodies declared but not sent, sent slowly or chunked, CR/LF
and NUL on the wire) is sent to a real ``poolq api`` (granian, its default workers and
threads) over raw sockets; the rest goes through the WSGI app in-process. Time bounds
are functional and generous (two shared cores): "answered at once" means well within
QUICK_S, not a speed figure.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from api_shim.app import App
from poolq.embedded import EmbeddedRedis, free_port
from poolq.schemas import SEED_EXAMPLE
from poolq.settings import Settings
from tests.kit import START_S, MiB
from tests.procs import Proc, wait_for
from tests.wsgi import Result, call

QUICK_S = 10.0  # an answer that is "at once" comes well within this, even on a loaded machine
MAX_BODY, MAX_BATCH_BODY, MAX_PACKAGE = MiB, 16 * MiB, 100 * MiB
ALLOWED_ORIGIN = "https://dash.example"
JOB = {"entrypoint": "true", "runtime_env": {"working_dir": "/tmp"}}
PACKAGE = "/api/packages/gcs/_ray_pkg_0123456789abcdef.zip"
SERVER_THREADS = 2 * 16  # POOLQ_API_WORKERS x POOLQ_API_THREADS, the defaults

# Every route, a concrete path for it, and the methods it serves (docs/api.md, README).
ROUTES = [
    ("/api/jobs", "/api/jobs", {"GET", "POST"}),
    ("/api/jobs/batch", "/api/jobs/batch", {"POST"}),
    ("/api/jobs/app-x", "/api/jobs/{submission_id}", {"GET", "DELETE"}),
    ("/api/jobs/app-x/stop", "/api/jobs/{submission_id}/stop", {"POST"}),
    ("/api/jobs/app-x/logs", "/api/jobs/{submission_id}/logs", {"GET"}),
    ("/api/jobs/app-x/logs/tail", "/api/jobs/{submission_id}/logs/tail", {"GET"}),
    (PACKAGE, "/api/packages/{protocol}/{name}", {"GET", "PUT"}),
    ("/api/nodes", "/api/nodes", {"GET"}),
    ("/api/pools", "/api/pools", {"GET"}),
    ("/api/version", "/api/version", {"GET"}),
    ("/api/openapi.json", "/api/openapi.json", {"GET"}),
    ("/healthz", "/healthz", {"GET"}),
    ("/livez", "/livez", {"GET"}),
    ("/metrics", "/metrics", {"GET"}),
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]


# -- a real server and a raw HTTP/1.1 client ----------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    elapsed: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class Server:
    port: int
    proc: Proc

    def pids(self) -> list[int]:
        """The server process and every process under it (granian's workers)."""
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        found = [self.proc.pid]
        for pid in found:
            found += [child for child, parent in parents.items() if parent == pid]
        return found

    def rss_kib(self) -> dict[int, int]:
        sizes = {}
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if found:
                sizes[pid] = int(found.group(1))
        return sizes


@pytest.fixture(scope="module")
def server(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = {"POOLQ_REDIS_URL": redis_server.url, "POOLQ_DATA_DIR": str(base / "data"), "POOLQ_CORS_ORIGINS": ALLOWED_ORIGIN}
    proc = Proc(["api", "--port", str(port)], env, base / "api.log").start()
    try:
        running = Server(port, proc)

        def up() -> bool:
            assert proc.alive(), proc.output()
            try:
                return exchange(running, request_bytes("GET", "/livez"), timeout=5).status == 200
            except OSError:
                return False

        wait_for(up, timeout=START_S, interval=0.2, what="poolq api to serve")
        wait_for(lambda: len(running.pids()) >= 3, timeout=START_S, what="granian's workers to start")
        yield running
    finally:
        proc.stop()


def request_bytes(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: poolq"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_answer(sock: socket.socket, started: float, head_only: bool = False) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer (got {data[:200]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only or status in (204, 304) else int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status, headers, body[:length], time.monotonic() - started)


def exchange(server: Server, head: bytes, body: Iterable[bytes] = (), timeout: float = QUICK_S * 3) -> Answer:
    """Send ``head`` (and ``body`` pieces from a thread, so that an early answer is read
    while the rest is still being pushed); return the answer."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    started = time.monotonic()
    try:
        sock.sendall(head)
        sender = None
        pieces = list(body) if not isinstance(body, Iterator) else body
        if pieces:
            def push() -> None:
                try:
                    for piece in pieces:
                        sock.sendall(piece)
                except OSError:
                    pass  # the server answered and closed: expected for a refused body

            sender = threading.Thread(target=push, daemon=True)
            sender.start()
        answer = read_answer(sock, started, head_only=head.startswith(b"HEAD "))
        return answer
    finally:
        sock.close()


def assert_quick_4xx(answer: Answer, status: int | None = None) -> None:
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    if status is not None:
        assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.elapsed < QUICK_S, f"answered after {answer.elapsed:.1f} s"


def still_serving(server: Server) -> None:
    answer = exchange(server, request_bytes("GET", "/api/jobs", {"X-Tenant-Id": "probe-only"}))  # a tenant no test submits to
    assert answer.status == 200 and answer.json == [], (answer.status, answer.body)


def chunked(total: int, piece: int = 65536) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        yield b"%x\r\n" % size + b"a" * size + b"\r\n"
        sent += size
    yield b"0\r\n\r\n"


def too_large(limit: int) -> dict[str, str]:
    return {"error": f"request body is larger than the limit of {limit} bytes"}


# -- bodies: declared too large, chunked too large, sent slowly ------------------------------


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize(
    ("method", "path", "declared", "limit"),
    [
        ("POST", "/api/jobs", 50 * MiB, MAX_BODY),
        ("POST", "/api/jobs", MAX_BODY + 1, MAX_BODY),
        ("POST", "/api/jobs/batch", 50 * MiB, MAX_BATCH_BODY),
        ("PUT", PACKAGE, 10 * MAX_PACKAGE, MAX_PACKAGE),
    ],
)
def test_a_body_declared_too_large_is_refused_before_it_is_sent(server: Server, method: str, path: str, declared: int, limit: int) -> None:
    head = request_bytes(method, path, {"Content-Type": "application/json", "Content-Length": str(declared)})
    answer = exchange(server, head)  # not one byte of the body is sent
    assert_quick_4xx(answer, 413)
    assert answer.json == too_large(limit)
    still_serving(server)


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize(
    ("path", "size", "limit"),
    [("/api/jobs", MAX_BODY + 1, MAX_BODY), ("/api/jobs", 50 * MiB, MAX_BODY), ("/api/jobs/batch", MAX_BATCH_BODY + MiB, MAX_BATCH_BODY)],
)
def test_a_chunked_body_over_the_limit_is_413(server: Server, path: str, size: int, limit: int) -> None:
    head = request_bytes("POST", path, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    answer = exchange(server, head, chunked(size))
    assert_quick_4xx(answer, 413)
    assert answer.json == too_large(limit)
    still_serving(server)


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_a_chunked_body_within_the_limit_is_accepted(server: Server) -> None:
    body = json.dumps(JOB).encode()
    head = request_bytes("POST", "/api/jobs", {"Content-Type": "application/json", "Transfer-Encoding": "chunked", "X-Tenant-Id": "hostile"})
    pieces = [b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)] + [b"0\r\n\r\n"]
    answer = exchange(server, head, pieces)
    assert answer.status == 200, answer.body
    assert answer.json["submission_id"].startswith("app-")


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_a_slow_body_does_not_hold_up_other_requests(server: Server) -> None:
    body = json.dumps({**JOB, "submission_id": "app-slow-body"}).encode()
    head = request_bytes("POST", "/api/jobs", {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-Tenant-Id": "hostile"})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        sock.sendall(head + body[:1])
        for position in range(1, len(body), max(1, len(body) // 10)):
            still_serving(server)  # others are answered while this body trickles in
            assert exchange(server, request_bytes("GET", "/livez")).status == 200
            sock.sendall(body[position:position + max(1, len(body) // 10)])
            time.sleep(0.3)
        answer = read_answer(sock, time.monotonic())
    except (ConnectionError, OSError):
        answer = None  # timed out by the server: also fine, as long as others were served
    finally:
        sock.close()
    if answer is not None:
        assert answer.status == 200 and answer.json["submission_id"] == "app-slow-body", (answer.status, answer.body)


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_many_slow_bodies_do_not_hang_the_server_for_others(server: Server) -> None:
    """More stalled uploads than the server has request threads (a slowloris): other
    clients must still be answered; each stalled request may be timed out or left alone."""
    stalled: list[socket.socket] = []
    head = request_bytes("POST", "/api/jobs", {"Content-Type": "application/json", "Content-Length": "100"})
    try:
        for _ in range(SERVER_THREADS + 8):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(head + b"{")  # one byte of the 100 declared, then nothing
            stalled.append(sock)
        time.sleep(1.0)
        try:
            answer = exchange(server, request_bytes("GET", "/livez"), timeout=20)
        except OSError as exc:  # socket.timeout included
            pytest.fail(f"with {len(stalled)} stalled uploads open, GET /livez got no answer within 20 s ({exc!r})")
        assert answer.status == 200, (answer.status, answer.body)
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: exchange(server, request_bytes("GET", "/livez"), timeout=5).status == 200, timeout=60,
             what="the server to serve again once the stalled uploads closed")


# -- bodies that are hard to parse -----------------------------------------------------------


def job_with(field_json: str) -> bytes:
    return ('{"entrypoint":"true","runtime_env":{"working_dir":"/tmp"},' + field_json + "}").encode()


DEEP = 100_000
MILLION = 10**6
HARD_BODIES = {
    "100,000-deep array": (b"[" * DEEP + b"]" * DEEP, "body"),
    "100,000-deep object in metadata": (job_with('"metadata":' + '{"a":' * DEEP + "1" + "}" * DEEP), "body"),
    "100,000-deep array in entrypoint": (job_with('"entrypoint_resources":' + "[" * DEEP + "]" * DEEP), "body"),
    "10^6-digit integer CPU": (job_with('"entrypoint_num_cpus":' + "7" * MILLION), None),
    "10^6-digit integer memory": (job_with('"entrypoint_memory":' + "7" * MILLION), None),
    "10^6-digit decimal CPU": (job_with('"entrypoint_num_cpus":' + "7" * MILLION + ".5"), "entrypoint_num_cpus"),
    "10^6-digit fraction GPU": (job_with('"entrypoint_num_gpus":2000.' + "7" * (MILLION - 10)), "entrypoint_num_gpus"),
    "10^6-digit exponent": (job_with('"entrypoint_num_cpus":1e' + "9" * (MILLION - 100)), None),
    "exponent past Decimal's range": (job_with('"entrypoint_num_cpus":1e1000000000000000000'), None),
}

# Numbers at the edges of what the decimal parser takes; each must be a 200 or a 400.
EDGE_NUMBERS = ["1e999999999999999999", "1e1000000000000000000", "-1e1000000000000000000", "1e-1000000000000000000",
                "1e-999999999", "0." + "0" * 5000 + "1", "1" + "0" * 4299, "-0", "0e0", "1E+2", "16.0000000000000000001"]


@pytest.mark.parametrize("name", list(HARD_BODIES))
def test_hard_to_parse_bodies_are_400_in_process(app: App, name: str) -> None:
    body, field = HARD_BODIES[name]
    started = time.monotonic()
    result = call(app, "POST", "/api/jobs", raw=body)
    assert time.monotonic() - started < QUICK_S
    assert result.status == 400, (result.status, result.body[:300])
    assert result.json["error"] == "invalid job request"
    if field is not None:
        assert list(result.json["fields"]) == [field], result.json
    # In a batch: a 400 for the whole body, or this item refused on its own.
    batch = call(app, "POST", "/api/jobs/batch", raw=b'{"jobs":[' + body + b"]}")
    assert batch.status in (200, 400), (batch.status, batch.body[:300])
    if batch.status == 200:
        assert "submission_id" not in batch.json["results"][0] and batch.json["results"][0]["fields"], batch.json


@pytest.mark.parametrize("number", EDGE_NUMBERS, ids=lambda n: n if len(n) < 30 else n[:12] + f"...({len(n)} chars)")
@pytest.mark.parametrize("field", ["entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources.NPU"])
def test_edge_numbers_are_200_or_400_never_500(app: App, field: str, number: str) -> None:
    literal = '{"NPU":%s}' % number if field == "entrypoint_resources.NPU" else number
    name = field.split(".")[0]
    result = call(app, "POST", "/api/jobs", raw=job_with(f'"{name}":{literal}'))
    assert result.status in (200, 400), (result.status, result.body[:300])
    if result.status == 400:
        assert list(result.json["fields"]) in ([field], ["body"]), result.json
    else:  # accepted: its record reads back
        record = call(app, "GET", f"/api/jobs/{result.json['submission_id']}")
        assert record.status == 200, record.body


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize("name", list(HARD_BODIES))
def test_hard_to_parse_bodies_are_400_over_the_wire(server: Server, name: str) -> None:
    body, _ = HARD_BODIES[name]
    answer = exchange(server, request_bytes("POST", "/api/jobs", {"Content-Type": "application/json"}, body))
    assert_quick_4xx(answer, 400)
    assert answer.json["error"] == "invalid job request"
    still_serving(server)


# -- CR, LF and NUL in headers, paths and ids ------------------------------------------------


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize(
    "header_line",
    [b"X-Tenant-Id: a\rb", b"X-Tenant-Id: a\nb", b"X-Tenant-Id: a\x00b", b"X-Pool-Label: gpu\r\nX-Injected: 1\rx",
     b"Authorization: Bearer pq_\x00", b"X-Schedule-Timeout-Ms: 1\x00", b"X-Bad\x00Name: v", b"X Space: v"],
    ids=["CR", "LF", "NUL", "CRLF+CR", "NUL in Authorization", "NUL in timeout", "NUL in name", "space in name"],
)
def test_control_characters_in_headers_over_the_wire_are_4xx(server: Server, header_line: bytes) -> None:
    body = json.dumps(JOB).encode()
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: poolq\r\nContent-Type: application/json\r\n" + header_line
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    try:
        answer = exchange(server, head)
    except ConnectionError:
        answer = None  # refused by the HTTP parser by closing the connection: no 500 either
    if answer is not None:
        assert_quick_4xx(answer)
    still_serving(server)


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize(
    "path",
    [b"/api/jobs/app-a%00b", b"/api/jobs/app-a%0d%0ab", b"/api/jobs/app-a%0A", b"/api/jobs/app-a\x00b", b"/api/jobs/%ff%fe",
     b"/api/jobs/app-a%00b/logs", b"/api/jobs?ids=app-a%00,app-b%0d%0a", b"/api/jobs?status=%00", b"/api/jobs?limit=1%00"],
)
def test_control_characters_in_paths_over_the_wire_are_4xx_or_empty(server: Server, path: bytes) -> None:
    try:
        answer = exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: poolq\r\n\r\n")
    except ConnectionError:
        answer = None
    if answer is not None:
        if answer.status == 200:  # an ids= read of ids that do not exist
            assert answer.json == [], answer.body
        else:
            assert_quick_4xx(answer)
    still_serving(server)


def environ_for(method: str, path_info: str, headers: dict[str, str] | None = None, body: bytes = b"") -> dict[str, Any]:
    """A WSGI environ with PATH_INFO exactly as given (tests.wsgi.call parses a URL,
    which drops CR, LF and tab)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path_info, "QUERY_STRING": "", "SERVER_NAME": "test",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(body),
               "wsgi.url_scheme": "http", "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call_environ(app: App, environ: dict[str, Any]) -> Result:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"], captured["headers"] = int(status.split()[0]), dict(headers)

    body = b"".join(app(environ, start_response))
    return Result(captured["status"], captured["headers"], body)


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "\r\n", "\t", "\x0b", "\u2028"], ids=repr)
@pytest.mark.parametrize("template", ["/api/jobs/app-a{}b", "/api/jobs/app-a{}", "/api/jobs/app-a{}b/logs", "/api/jobs/app-a{}b/stop"])
def test_control_characters_in_path_ids_in_process_are_404(app: App, bad: str, template: str) -> None:
    path = template.format(bad)
    method = "POST" if path.endswith("/stop") else "GET"
    result = call_environ(app, environ_for(method, path))
    assert result.status == 404, (result.status, result.body)
    assert result.json["error"].startswith("not found app, submissionId: ") or result.json["error"].startswith("no route for ")
    deleted = call_environ(app, environ_for("DELETE", "/api/jobs/app-a" + bad + "b"))
    assert deleted.status == 404, deleted.body


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "\r\n", "\t", "\u2028"], ids=repr)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_control_characters_in_a_submitted_id_are_400(app: App, redis_client: Any, bad: str, where: str) -> None:
    """``^app-[a-z0-9-]{1,60}$`` admits no control character anywhere, also not a trailing newline."""
    submission_id = {"start": bad + "app-abc", "middle": "app-a" + bad + "bc", "end": "app-abc" + bad}[where]
    for field in ("submission_id", "job_id"):
        result = call(app, "POST", "/api/jobs", {**JOB, field: submission_id})
        assert result.status == 400, (field, repr(submission_id), result.status, result.body)
        assert field in result.json["fields"], result.json
        batch = call(app, "POST", "/api/jobs/batch", {"jobs": [{**JOB, field: submission_id}]})
        assert batch.status == 200 and "submission_id" not in batch.json["results"][0], (field, batch.body)
    assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"entrypoint_resources": {"NPU\n": 1}}, "entrypoint_resources"),
        ({"runtime_env": {"working_dir": "/tmp", "env_vars": {"PATH\n": "x"}}}, "runtime_env"),
        ({"entrypoint_label_selector": {"zone\n": "a"}}, "entrypoint_label_selector"),
        ({"entrypoint_label_selector": {"zone": "a\n"}}, "entrypoint_label_selector"),
    ],
    ids=["resource name", "env var name", "selector key", "selector value"],
)
def test_a_trailing_newline_in_a_name_is_400(app: App, redis_client: Any, extra: dict[str, Any], field: str) -> None:
    """Names have a pattern (docs/api.md) that admits no newline, also not at the end."""
    result = call(app, "POST", "/api/jobs", {**JOB, **extra})
    assert result.status == 400, (extra, result.status, result.body)
    assert any(name.startswith(field) for name in result.json["fields"]), result.json
    assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Tenant-Id", "a\r\nb"), ("X-Tenant-Id", "a\x00b"), ("X-Tenant-Id", "te\nam"), ("X-Pool-Label", "gpu\r\nb"),
     ("X-Pool-Label", "gpu\x00"), ("X-Pool-Label", "a,\n,b"), ("X-Schedule-Timeout-Ms", "1\x00"), ("X-Schedule-Timeout-Ms", "1\r\n2")],
)
def test_control_characters_in_headers_in_process_are_400(app: App, redis_client: Any, header: str, value: str) -> None:
    result = call(app, "POST", "/api/jobs", JOB, headers={header: value})
    assert result.status == 400, (result.status, result.body)
    assert header in result.json["fields"], result.json
    if header == "X-Tenant-Id":
        listed = call(app, "GET", "/api/jobs", headers={header: value})
        assert listed.status == 400, listed.body
    assert redis_client.keys("poolq:job:*") == []


def test_control_characters_in_authorization_are_401(settings: Settings) -> None:
    app = App(dataclasses.replace(settings, auth="tokens"))
    for value in ("Bearer pq_\r\nX", "Bearer \x00", "Bearer\r\n", "\x00"):
        result = call(app, "GET", "/api/jobs", headers={"Authorization": value})
        assert result.status == 401, (repr(value), result.status, result.body)


# -- methods, OPTIONS and CORS ---------------------------------------------------------------


def allow_set(header: str) -> set[str]:
    return {m.strip() for m in header.split(",") if m.strip()}


def expected_allow(methods: set[str]) -> set[str]:
    return methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())


@pytest.mark.parametrize(("path", "template", "methods"), ROUTES, ids=[p for p, _, _ in ROUTES])
def test_every_unsupported_method_is_405_with_allow(app: App, path: str, template: str, methods: set[str]) -> None:
    for suffix in ("", "/"):
        for method in METHODS:
            if method in expected_allow(methods):
                continue
            result = call(app, method, path + suffix, JOB if method in ("POST", "PUT", "PATCH") else None)
            assert result.status == 405, (method, path + suffix, result.status, result.body)
            assert allow_set(result.headers["Allow"]) == expected_allow(methods), (method, path, result.headers)
            if method != "HEAD":
                assert result.json == {"error": f"{method} is not allowed on {template}"}, result.body


@pytest.mark.parametrize(("path", "template", "methods"), ROUTES, ids=[p for p, _, _ in ROUTES])
def test_options_is_204_with_allow(app: App, path: str, template: str, methods: set[str]) -> None:
    result = call(app, "OPTIONS", path)
    assert result.status == 204, (result.status, result.body)
    assert result.body == b""
    assert allow_set(result.headers["Allow"]) == expected_allow(methods), result.headers


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
@pytest.mark.parametrize("method", ["PATCH", "DELETE", "PUT", "TRACE", "PROPFIND"])
def test_unsupported_methods_over_the_wire_are_405(server: Server, method: str) -> None:
    answer = exchange(server, request_bytes(method, "/api/jobs", {"Content-Type": "application/json"}, b"{}"))
    assert_quick_4xx(answer, 405)
    assert allow_set(answer.headers["allow"]) == {"GET", "HEAD", "POST", "OPTIONS"}
    assert answer.json == {"error": f"{method} is not allowed on /api/jobs"}


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_options_over_the_wire(server: Server) -> None:
    answer = exchange(server, request_bytes("OPTIONS", "/api/jobs/app-x"))
    assert answer.status == 204 and allow_set(answer.headers["allow"]) == {"GET", "HEAD", "DELETE", "OPTIONS"}, answer


@pytest.fixture
def cors_app(settings: Settings) -> App:
    return App(dataclasses.replace(settings, cors_origins=(ALLOWED_ORIGIN, "http://localhost:3000")))


@pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, "http://localhost:3000"])
@pytest.mark.parametrize(("method", "path"), [("GET", "/api/jobs"), ("OPTIONS", "/api/jobs"), ("GET", "/api/jobs/app-none"), ("GET", "/livez")])
def test_cors_headers_for_a_listed_origin(cors_app: App, origin: str, method: str, path: str) -> None:
    result = call(cors_app, method, path, headers={"Origin": origin})
    assert result.status in (200, 204, 404), result.body
    assert result.headers.get("Access-Control-Allow-Origin") == origin, result.headers
    assert "Origin" in result.headers.get("Vary", ""), result.headers
    if method == "OPTIONS":
        assert allow_set(result.headers["Access-Control-Allow-Methods"]) == {"GET", "HEAD", "POST", "OPTIONS"}
        allowed_headers = {h.strip().lower() for h in result.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-tenant-id"} <= allowed_headers, result.headers


@pytest.mark.parametrize("origin", [None, "https://evil.example", "https://dash.example.evil.com", "null", "*", "https://DASH.example.", ""])
@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_no_cors_headers_for_another_origin(cors_app: App, app: App, origin: str | None, method: str) -> None:
    headers = {"Origin": origin} if origin is not None else {}
    for target in (cors_app, app):  # app: no origins configured at all
        result = call(target, method, "/api/jobs", headers=headers)
        assert result.status in (200, 204), result.body
        assert not [h for h in result.headers if h.lower().startswith("access-control-")], (origin, result.headers)


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_cors_over_the_wire(server: Server) -> None:
    allowed = exchange(server, request_bytes("OPTIONS", "/api/jobs", {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}))
    assert allowed.status == 204 and allowed.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN, allowed.headers
    got = exchange(server, request_bytes("GET", "/api/jobs", {"Origin": ALLOWED_ORIGIN}))
    assert got.status == 200 and got.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN, got.headers
    other = exchange(server, request_bytes("GET", "/api/jobs", {"Origin": "https://evil.example"}))
    assert other.status == 200 and not [h for h in other.headers if h.startswith("access-control-")], other.headers


# -- the whole battery: quick 4xx answers, bounded memory --------------------------------------


def battery() -> list[tuple[str, bytes, Iterable[bytes]]]:
    json_head = {"Content-Type": "application/json"}
    return [
        ("declared 50 MB", request_bytes("POST", "/api/jobs", {**json_head, "Content-Length": str(50 * MiB)}), ()),
        ("chunked 8 MB", request_bytes("POST", "/api/jobs", {**json_head, "Transfer-Encoding": "chunked"}), chunked(8 * MiB)),
        ("deep nesting", request_bytes("POST", "/api/jobs", json_head, HARD_BODIES["100,000-deep array"][0]), ()),
        ("10^6 digits", request_bytes("POST", "/api/jobs", json_head, HARD_BODIES["10^6-digit decimal CPU"][0]), ()),
        ("batch of bad items", request_bytes("POST", "/api/jobs/batch", json_head,
                                             json.dumps({"jobs": [{"entrypoint": "", "runtime_env": {}}] * 1000}).encode()), ()),
        ("unknown route", request_bytes("GET", "/api/" + "x" * 4000), ()),
        ("405", request_bytes("PATCH", "/api/jobs/app-x"), ()),
        ("NUL in id", request_bytes("GET", "/api/jobs/app-%00"), ()),
        ("415", request_bytes("POST", "/api/jobs", {"Content-Type": "text/plain"}, b"{}"), ()),
        ("bad JSON", request_bytes("POST", "/api/jobs", json_head, b'{"entrypoint": "x",'), ()),
    ]


@pytest.mark.xdist_group("hostile-server")
@pytest.mark.processes
def test_hostile_battery_answers_4xx_quickly_and_memory_stays_bounded(server: Server) -> None:
    for name, head, body in battery():  # warm up: first-use allocations are not growth
        answer = exchange(server, head, body)
        assert 400 <= answer.status < 500 or (name == "batch of bad items" and answer.status == 200), (name, answer.status)
    before, log_start = server.rss_kib(), len(server.proc.output())
    for _ in range(8):
        for name, head, body in battery():
            answer = exchange(server, head, body)
            if name == "batch of bad items":  # 200 with each item refused on its own
                assert answer.status == 200 and all("submission_id" not in r for r in answer.json["results"])
                assert answer.elapsed < QUICK_S * 2, (name, answer.elapsed)
                continue
            assert 400 <= answer.status < 500, (name, answer.status, answer.body[:300])
            assert answer.elapsed < QUICK_S, (name, answer.elapsed)
    still_serving(server)
    after = server.rss_kib()
    assert set(before) == set(after), f"server processes changed (a worker died?): {before} -> {after}\n{server.proc.output()[-3000:]}"
    grown_mib = (sum(after.values()) - sum(before.values())) / 1024
    assert grown_mib < 200, f"the API processes grew by {grown_mib:.0f} MiB: {before} -> {after}"
    logged = server.proc.output()[log_start:]
    assert "Traceback" not in logged and "unhandled error" not in logged, logged[-3000:]


# -- pip input that is not a requirement ------------------------------------------------------

PIP_OPTIONS = [
    "-r /etc/passwd",
    "--index-url http://x",
    "--index-url=http://x",
    "--python /bin/sh",
    "-e .",
    "--trusted-host x",
    "-i x",
    "-ihttp://x",
    "  -r /etc/passwd",
    "\t--extra-index-url=http://x",
]


def pip_job(pip: Any) -> dict[str, Any]:
    return {**JOB, "runtime_env": {"working_dir": "/tmp", "pip": pip}}


def assert_refused(app: App, body: dict[str, Any], field: str) -> list[str]:
    """A 400 naming exactly ``field``, alone and as a batch item; returns the field's messages."""
    result = call(app, "POST", "/api/jobs", body)
    assert result.status == 400, (result.status, result.body[:300])
    assert result.json["error"] == "invalid job request"
    assert list(result.json["fields"]) == [field], result.json
    batch = call(app, "POST", "/api/jobs/batch", {"jobs": [body]})
    assert batch.status == 200 and list(batch.json["results"][0]["fields"]) == [field], batch.body
    return result.json["fields"][field]


@pytest.mark.parametrize("option", PIP_OPTIONS, ids=repr)
@pytest.mark.parametrize("form", ["list", "object"])
def test_a_pip_option_is_refused_as_a_requirement(app: App, redis_client: Any, option: str, form: str) -> None:
    packages = ["numpy==1.24", option]
    pip = packages if form == "list" else {"packages": packages, "pip_check": False}
    field = "runtime_env.pip.1" if form == "list" else "runtime_env.pip.packages.1"
    messages = assert_refused(app, pip_job(pip), field)
    assert any("pip option" in m and "not a requirement" in m for m in messages), messages
    assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize("form", ["list", "object"])
def test_a_line_break_in_a_requirement_is_refused(app: App, redis_client: Any, form: str) -> None:
    """A requirements file line of its own (``-r ...`` after the break) cannot be smuggled in."""
    packages = ["numpy==1.24\n-r /etc/passwd"]
    pip = packages if form == "list" else {"packages": packages}
    assert_refused(app, pip_job(pip), "runtime_env.pip.0" if form == "list" else "runtime_env.pip.packages.0")
    assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize(
    "version",
    [
        "latest",
        "; rm -rf /",
        "-r /etc/passwd",
        "==",
        "== 22.0.2 --index-url http://x",
        "==22.0.2 -i http://x",
        "pip==22",
        ">>22",
        "=22.0",
        "==22\n-r x",
        "==22;\n-r x",
        "",
        " ",
    ],
    ids=repr,
)
def test_a_pip_version_that_is_no_version_specifier_is_refused(app: App, redis_client: Any, version: str) -> None:
    pip = {"packages": ["numpy==1.24"], "pip_version": version}
    messages = assert_refused(app, pip_job(pip), "runtime_env.pip.pip_version")
    assert any("version" in m for m in messages), messages
    assert redis_client.keys("poolq:job:*") == []


@pytest.mark.parametrize(
    "version",
    [
        "==22.0.2;python_version=='3.8.11'",
        "==22.0.2",
        "22.0.2",
        ">=22.0",
        "<=24",
        "~=23.1",
        "!=23.0",
        "<24",
        ">22",
        "===23.1",
        "==23.*",
        ">=22,<24",
        "==24.0rc1",
        "== 22.0.2 ; python_version >= '3.8'",
    ],
    ids=repr,
)
def test_a_pip_version_specifier_is_accepted(app: App, redis_client: Any, version: str) -> None:
    pip = {"packages": ["numpy==1.24"], "pip_version": version}
    result = call(app, "POST", "/api/jobs", pip_job(pip))
    assert result.status == 200, (result.status, result.body[:300])


@pytest.mark.parametrize(
    "requirement",
    [
        "numpy==1.24",
        "scipy>=1.11,<2",
        "requests[socks]~=2.31",
        "torch @ https://example.com/torch.whl",
        "pkg; python_version < '3.12'",
        "/abs/path/to/pkg-1.0-py3-none-any.whl",
        "git+https://example.com/r.git#egg=r",
        "name-with-dash",
    ],
)
def test_requirements_are_still_accepted(app: App, redis_client: Any, requirement: str) -> None:
    for pip in ([requirement], {"packages": [requirement]}):
        result = call(app, "POST", "/api/jobs", pip_job(pip))
        assert result.status == 200, (pip, result.status, result.body[:300])


def test_the_seed_example_is_still_accepted(app: App, redis_client: Any) -> None:
    result = call(app, "POST", "/api/jobs", SEED_EXAMPLE)
    assert result.status == 200, (result.status, result.body[:300])
    assert result.json["submission_id"] == SEED_EXAMPLE["submission_id"]
