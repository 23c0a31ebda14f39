"""A small HTTP/1.1 load generator (asyncio, keep-alive, no dependencies).

Run in its own process so that it measures the server, not the harness:
``python -m bench.loadgen SPEC_JSON`` (or ``@file`` holding the JSON) prints
one JSON result on stdout. The spec:

| key | meaning |
|---|---|
| port, host | the server (host defaults to 127.0.0.1) |
| requests | ``[{"method", "path", "headers", "body"}, ...]``, sent round robin |
| method, path, headers, body | the one request to send, when there is no ``requests`` list |
| connections | concurrent keep-alive connections |
| seconds | length of the measured window |
| warmup | seconds of load before the window, not counted (default 0) |
| rate | requests/s over all connections: a paced (open) loop, see below; absent: closed loop |
| once | send each request exactly once, then stop (no window, no warmup) |
| offset | the index of the request to start the round robin at (default 0) |
| count | a byte string counted in every answer body (e.g. ``"submission_id"``): the result's ``counted`` |
| capture | a header name whose value is returned per request index, in ``once`` mode |

Closed loop: each connection sends a request, reads the whole answer, sends the next.
Paced loop: request *i* is due at ``start + i / rate``; a free connection takes the
next due request and waits for its time. Its latency is counted from the time it was
due, not from when it was sent, so a server that falls behind shows its queueing in
the latency (no coordinated omission); ``p99_service_ms`` is counted from the send.
A server that closes the connection (``Connection: close``, or EOF) is dialled again.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

NO_BODY_STATUSES = {204, 304}


@dataclass
class Result:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)
    counted: int = 0
    errors: int = 0
    connects: int = 0
    seconds: float = 0.0
    captured: dict[int, str] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "rate": self.rate,
            "statuses": self.statuses,
            "counted": self.counted,
            "counted_rate": self.counted / self.seconds if self.seconds else 0.0,
            "errors": self.errors,
            "connects": self.connects,
            "p50_ms": percentile(self.latencies_ms, 50),
            "p90_ms": percentile(self.latencies_ms, 90),
            "p99_ms": percentile(self.latencies_ms, 99),
            "max_ms": max(self.latencies_ms) if self.latencies_ms else None,
            "p99_service_ms": percentile(self.service_ms, 99),
            "captured": self.captured,
        }


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least the first
    return ordered[int(min(rank, len(ordered))) - 1]


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", "Connection: keep-alive"]
    if body or method in ("POST", "PUT"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[bytes, bytes]

    @property
    def keep_alive(self) -> bool:
        return self.headers.get(b"connection", b"").lower() != b"close"


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response: Content-Length or chunked bodies; EOF raises ConnectionError."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ConnectionError("the server closed the connection in the headers")
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if status in NO_BODY_STATUSES or 100 <= status < 200:
        return Answer(status, b"", headers)
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return Answer(status, b"".join(chunks), headers)
    if b"content-length" in headers:
        return Answer(status, await reader.readexactly(int(headers[b"content-length"])), headers)
    return Answer(status, await reader.read(), {**headers, b"connection": b"close"})  # body until EOF


class Load:
    """The shared state of one run: what to send, when, and what came back."""

    def __init__(self, spec: dict[str, Any], requests: list[bytes]):
        self.host = spec.get("host", "127.0.0.1")
        self.port = int(spec["port"])
        self.requests = requests
        self.rate: float | None = spec.get("rate")
        self.once = bool(spec.get("once"))
        self.count = spec["count"].encode() if spec.get("count") else None
        self.capture = spec["capture"].lower().encode() if spec.get("capture") else None
        self.result = Result()
        self.offset = int(spec.get("offset", 0))  # where the round robin starts
        self.issued = 0
        self.start = 0.0
        self.window_start = 0.0
        self.window_end = float("inf")

    def take(self) -> tuple[int, float | None] | None:
        """The index of the next request to send and when it is due; None when done."""
        issued = self.issued
        if self.once and issued >= len(self.requests):
            return None
        self.issued += 1
        due = self.start + issued / self.rate if self.rate else None
        return (self.offset + issued) % len(self.requests), due

    async def connection(self) -> None:
        reader = writer = None
        try:
            while True:
                taken = self.take()
                if taken is None:
                    return
                index, due = taken
                if due is not None and due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                sent = time.perf_counter()
                if sent >= self.window_end:
                    return
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                        self.result.connects += 1
                    assert reader is not None
                    writer.write(self.requests[index])
                    answer = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    if self.counts(time.perf_counter()):
                        self.result.errors += 1
                    await asyncio.sleep(0.01)  # a refused dial must not spin
                    continue
                self.record(index, sent, due, answer)
                if not answer.keep_alive:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    def counts(self, done: float) -> bool:
        """Answers count when they arrive inside the measured window (throughput = answers / window)."""
        return self.once or self.window_start <= done <= self.window_end

    def record(self, index: int, sent: float, due: float | None, answer: Answer) -> None:
        done = time.perf_counter()
        if not self.counts(done):
            return
        result = self.result
        result.statuses[answer.status] = result.statuses.get(answer.status, 0) + 1
        result.latencies_ms.append((done - (due if due is not None else sent)) * 1000)
        result.service_ms.append((done - sent) * 1000)
        if self.count is not None:
            result.counted += answer.body.count(self.count)
        if self.capture is not None and self.capture in answer.headers:
            result.captured[index] = answer.headers[self.capture].decode()


async def run(spec: dict[str, Any], requests: list[bytes]) -> Result:
    load = Load(spec, requests)
    warmup = float(spec.get("warmup", 0)) if not load.once else 0.0
    load.start = time.perf_counter()
    load.window_start = load.start + warmup
    if not load.once:
        load.window_end = load.window_start + float(spec["seconds"])
    await asyncio.gather(*(load.connection() for _ in range(int(spec["connections"]))))
    finished = time.perf_counter()
    load.result.seconds = (
        (min(finished, load.window_end) - load.window_start) if not load.once else finished - load.start
    )
    return load.result


def build_requests(spec: dict[str, Any]) -> list[bytes]:
    items = spec.get("requests") or [spec]
    return [
        request_bytes(item.get("method", "GET"), item["path"], (item.get("body") or "").encode(), item.get("headers"))
        for item in items
    ]


def load_spec(argument: str) -> dict[str, Any]:
    if argument.startswith("@"):
        with open(argument[1:], encoding="utf-8") as handle:
            return dict(json.load(handle))
    return dict(json.loads(argument))


def main() -> None:
    """``python -m bench.loadgen SPEC_JSON|@FILE``: run one load and print a JSON result."""
    spec = load_spec(sys.argv[1])
    result = asyncio.run(run(spec, build_requests(spec)))
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
