"""A small closed-loop HTTP/1.1 load generator (asyncio, keep-alive, no dependencies).

Run in its own process so that it measures the server, not itself: each of
``connections`` connections sends a request, reads the whole answer, and sends
the next. Latencies are recorded per request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Result:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _connection(host: str, port: int, make_request: Callable[[int], bytes], stop_at: float, result: Result, counter: list[int], interval: float | None) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    next_send = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            if interval is not None:
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                next_send += interval
            counter[0] += 1
            request = make_request(counter[0])
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            status = int(status_line.split()[1]) if status_line else 0
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.requests += 1
            if not status_line:
                return
    finally:
        writer.close()


async def run(host: str, port: int, make_request: Callable[[int], bytes], *, seconds: float, connections: int, rate: float | None = None) -> Result:
    """Closed loop; with ``rate`` (requests/s over all connections), an open-ish paced loop."""
    result = Result()
    counter = [0]
    interval = connections / rate if rate else None
    start = time.monotonic()
    await asyncio.gather(*(
        _connection(host, port, make_request, start + seconds, result, counter, interval) for _ in range(connections)
    ))
    result.seconds = time.monotonic() - start
    return result


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", "Connection: keep-alive"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def main() -> None:
    """``python -m poolq.bench.loadgen SPEC_JSON``: run one load and print a JSON result."""
    spec = json.loads(sys.argv[1])
    template = spec["body"].encode() if spec.get("body") else b""
    vary = spec.get("vary_id", False)
    paths = spec.get("paths")

    def make(n: int) -> bytes:
        body = template.replace(b"@ID@", str(n).encode()) if vary else template
        path = paths[n % len(paths)] if paths else spec["path"]
        return request_bytes(spec["method"], path, body, spec.get("headers"))

    result = asyncio.run(run(spec.get("host", "127.0.0.1"), spec["port"], make, seconds=spec["seconds"], connections=spec["connections"], rate=spec.get("rate")))
    print(json.dumps({"requests": result.requests, "seconds": result.seconds, "rate": result.rate, "statuses": result.statuses,
                      "p50_ms": result.percentile(50), "p99_ms": result.percentile(99)}))


if __name__ == "__main__":
    main()
