"""The feed scenario's clients, each in its own process: the changer and the followers.

``python -m bench.feedload @SPEC_FILE`` gets ready (opens its connections, learns what it
must know before the window: the feed's position, the jobs' ETags), prints ``ready``,
reads the window's start (a wall-clock time, seconds) from stdin, runs until the window
ends, and a follower ``grace`` seconds more (it still learns of the window's last changes,
as a dashboard left open would), then prints one JSON result. Times are wall-clock
milliseconds (``time.time()``), which the changer, the follower and Redis (the feed's
``time``) share on one machine.

| role | what it does in the window |
|---|---|
| changer | stops job ``i`` of ``ids`` (POST /api/jobs/{id}/stop) at ``start + i / rate``, over ``connections`` |
| feed | long-polls GET /api/jobs/changes?since=<cursor>&wait=<wait> on one connection, back to back |
| ids | every ``interval`` s, GET /api/jobs?ids= of 100 ids until all ``ids`` are read, over ``connections`` |
| etag | every ``interval`` s, GET /api/jobs/{id} with If-None-Match of each of ``ids``, over ``connections`` |

A sweep that takes longer than ``interval`` is followed by the next at once. Requests,
bytes and CPU count inside the window only; a request still out when the grace ends is
dropped.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, Callable

from bench.loadgen import Answer, load_spec, read_answer, request_bytes

IDS_A_REQUEST = 100  # what GET /api/jobs?ids= takes at most
OnAnswer = Callable[[int, Answer, float], None]  # a request's index, its answer, when it came (ms)


class Connection:
    """One keep-alive HTTP/1.1 connection, dialled again when the server closes it."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        try:
            self.writer.write(request)
            answer = await read_answer(self.reader)
        except BaseException:
            self.close()
            raise
        if not answer.keep_alive:
            self.close()
        return answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Client:
    """What every role shares: its connections, the window, and what it counts."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.headers = {"X-Tenant-Id": spec["tenant"]}
        self.connections = [Connection(int(spec["port"])) for _ in range(int(spec.get("connections", 1)))]
        self.start = self.end = self.stop = 0.0  # the window [start, end], and when to stop
        self.requests = 0
        self.bytes = 0
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.seen: dict[str, float] = {}  # submission_id -> when its stop was first seen (ms)
        self.sweep_seconds: list[float] = []

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
        return request_bytes(method, path, b"", {**self.headers, **(headers or {})})

    async def send(self, connection: Connection, request: bytes) -> Answer | None:
        """One request; its answer, counted if it came inside the window (None on a broken connection)."""
        try:
            answer = await connection.send(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
            await asyncio.sleep(0.01)
            return None
        if self.start <= time.time() <= self.end:
            self.requests += 1
            self.bytes += len(answer.body)
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        return answer

    def saw_stopped(self, submission_id: str, when_ms: float) -> None:
        self.seen.setdefault(submission_id, when_ms)

    async def prepare(self) -> None:
        """What the role learns before the window."""

    async def run(self) -> None:
        """The role's work in the window."""

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "statuses": self.statuses,
            "errors": self.errors,
            "seen": self.seen,
            "sweep_seconds": self.sweep_seconds,
        }

    async def sweep(self, requests: list[bytes], on_answer: OnAnswer) -> None:
        """Send every request once over the connections; ``on_answer(index, answer, ms)``."""
        queue = iter(range(len(requests)))

        async def work(connection: Connection) -> None:
            for index in queue:
                answer = await self.send(connection, requests[index])
                if answer is not None:
                    on_answer(index, answer, time.time() * 1000)

        await asyncio.gather(*(work(c) for c in self.connections))

    async def sweeps(self, build: Callable[[], list[bytes]], on_answer: OnAnswer) -> None:
        """A sweep of ``build()`` every ``interval`` s from the window's start; one that
        overran is followed by the next at once (not by a burst of the missed ones)."""
        interval = float(self.spec["interval"])
        count = 0
        while True:
            due = self.start + count * interval
            if due >= self.stop:
                return
            await asyncio.sleep(max(0.0, due - time.time()))
            began = time.time()
            await self.sweep(build(), on_answer)
            self.sweep_seconds.append(time.time() - began)
            count = max(count + 1, int((time.time() - self.start) // interval))


class Changer(Client):
    """Stops the jobs one after another at a fixed rate; records when each stop was answered."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.answered: dict[str, float] = {}
        self.late_ms: list[float] = []

    async def run(self) -> None:
        rate, ids = float(self.spec["rate"]), list(self.spec["ids"])
        count = min(len(ids), int(rate * (self.end - self.start)))
        queue = iter(range(count))

        async def work(connection: Connection) -> None:
            for i in queue:
                due = self.start + i / rate
                await asyncio.sleep(max(0.0, due - time.time()))
                if time.time() >= self.end:
                    return
                self.late_ms.append((time.time() - due) * 1000)
                answer = await self.send(connection, self.request("POST", f"/api/jobs/{ids[i]}/stop"))
                done = time.time()
                if answer is not None and answer.status == 200 and json.loads(answer.body).get("stopped"):
                    if done <= self.end:
                        self.answered[ids[i]] = done * 1000

        await asyncio.gather(*(work(c) for c in self.connections))

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.late_ms)
        return {
            **super().summary(),
            "answered": self.answered,
            "late_p99_ms": ordered[int(len(ordered) * 0.99)] if ordered else None,
        }


class Feed(Client):
    """A long-polling follower of the tenant's change feed."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.cursor = ""
        self.changes = 0
        self.made_ms: dict[str, int] = {}  # submission_id -> the change's own time (Redis's clock)
        self.retry_after = 0

    async def prepare(self) -> None:
        answer = await self.connections[0].send(self.request("GET", "/api/jobs/changes"))
        self.cursor = json.loads(answer.body)["cursor"]

    async def run(self) -> None:
        wait = self.spec["wait"]
        connection = self.connections[0]
        while time.time() < self.stop:
            request = self.request("GET", f"/api/jobs/changes?since={self.cursor}&wait={wait}")
            answer = await self.send(connection, request)
            received = time.time() * 1000
            if answer is None or answer.status != 200:
                continue
            if b"retry-after" in answer.headers:
                self.retry_after += 1
            page = json.loads(answer.body)
            self.cursor = page["cursor"]
            for change in page["changes"]:
                if received <= self.end * 1000:
                    self.changes += 1
                if change["status"] == "STOPPED":
                    self.saw_stopped(change["submission_id"], received)
                    self.made_ms.setdefault(change["submission_id"], int(change["time"]))

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "changes": self.changes, "made": self.made_ms, "retry_after": self.retry_after}


class IdsPoller(Client):
    """Reads every job's record in requests of 100 ids, every interval."""

    async def run(self) -> None:
        ids = list(self.spec["ids"])
        chunks = [ids[i : i + IDS_A_REQUEST] for i in range(0, len(ids), IDS_A_REQUEST)]
        requests = [self.request("GET", "/api/jobs?ids=" + ",".join(chunk)) for chunk in chunks]

        def on_answer(index: int, answer: Answer, received: float) -> None:
            if answer.status == 200:
                for record in json.loads(answer.body):
                    if record["status"] == "STOPPED":
                        self.saw_stopped(record["submission_id"], received)

        await self.sweeps(lambda: requests, on_answer)


class EtagPoller(Client):
    """Reads every job's record with If-None-Match (its last ETag), every interval."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.ids = list(spec["ids"])
        self.etags: list[str] = [""] * len(self.ids)

    async def prepare(self) -> None:
        plain = [self.request("GET", f"/api/jobs/{i}") for i in self.ids]

        def keep(index: int, answer: Answer, received: float) -> None:
            self.etags[index] = answer.headers.get(b"etag", b"").decode()

        await self.sweep(plain, keep)
        if not all(self.etags):
            raise RuntimeError(f"{self.etags.count('')} of {len(self.ids)} jobs answered without an ETag")

    async def run(self) -> None:
        def request(index: int) -> bytes:
            return self.request("GET", f"/api/jobs/{self.ids[index]}", {"If-None-Match": self.etags[index]})

        def on_answer(index: int, answer: Answer, received: float) -> None:
            if answer.status == 200:
                self.etags[index] = answer.headers.get(b"etag", b"").decode()
                if json.loads(answer.body)["status"] == "STOPPED":
                    self.saw_stopped(self.ids[index], received)

        # Each sweep sends the ETags the last one learnt.
        await self.sweeps(lambda: [request(i) for i in range(len(self.ids))], on_answer)


ROLES: dict[str, type[Client]] = {"changer": Changer, "feed": Feed, "ids": IdsPoller, "etag": EtagPoller}


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    client = ROLES[spec["role"]](spec)
    await client.prepare()
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    client.start = float(line)
    client.end = client.start + float(spec["seconds"])
    client.stop = client.end + float(spec.get("grace", 0))
    await asyncio.sleep(max(0.0, client.start - time.time()))
    cpu: list[float] = []

    async def window_cpu() -> None:
        cpu.append(time.process_time())
        await asyncio.sleep(max(0.0, client.end - time.time()))
        cpu.append(time.process_time())

    measuring = asyncio.ensure_future(window_cpu())
    try:
        await asyncio.wait_for(client.run(), timeout=max(0.1, client.stop - time.time()))
    except asyncio.TimeoutError:
        pass  # it stopped with a request out
    await measuring
    result = client.summary()
    result["cpu_seconds"] = cpu[1] - cpu[0]
    return result


def main() -> None:
    """``python -m bench.feedload @FILE``: prepare, print ``ready``, read the start, run, print JSON."""
    spec = load_spec(sys.argv[1])
    print(json.dumps(asyncio.run(main_async(spec))))


if __name__ == "__main__":
    main()
