"""The chaos test's clients: threads that submit jobs (POST /api/jobs to either API, POST
/api/jobs/batch, the ``poolq.submit`` queue), stop some of them and poll them all,
recording in a ``Ledger`` every acknowledgement and every answer.

An ambiguous answer (none at all, a timeout, a reset, a 5xx) may hide a request that took
effect: the same request, with the same submission_id, is sent again until it gets a
definite answer, for at most RESOLVE_S. A 429 (the rate quota) waits its Retry-After.
A queued job is acknowledged when its publish returns.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import random
import threading
import time
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from celery import Celery

from tests.faults.conftest import Jobs

RESOLVE_S = 60.0  # how long one request is retried before it counts as never answered
HTTP_TIMEOUT_S = 10.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
Reply = tuple[int | None, dict[str, str], Any]  # HTTP status (None: no answer), headers, body


@dataclasses.dataclass(frozen=True)
class Plan:
    """One job as a client made it: its tenant, how it was sent, what its entrypoint does."""

    submission_id: str
    tenant: str
    via: str  # "http", "batch" or "queue"
    cpus: int  # milli-CPU
    sleep_s: float
    exit_code: int
    body: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Seen:
    """A job's record as a poll answered it; ``sent`` is when the poll was sent (time.time())."""

    sent: float
    status: str
    error_type: str | None
    start_time: int | None  # ms
    end_time: int | None  # ms


class Ledger:
    """What the clients did and saw, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plans: dict[str, Plan] = {}
        self.acks: dict[str, float] = {}  # id -> when it was acknowledged
        self.counts: collections.Counter[tuple[str, int | None]] = collections.Counter()  # (what, status)
        self.odd: list[str] = []  # answers other than 200, 404 to a poll, 429 and the ambiguous ones
        self.errors: list[str] = []  # 500s
        self.unresolved: list[str] = []  # requests never answered definitely
        self.stops: dict[str, float] = {}  # id -> when its first stop request was sent
        self.seen: dict[str, list[Seen]] = collections.defaultdict(list)
        self.vanished: list[str] = []  # acknowledged jobs a poll or stop did not find

    def answer(self, what: str, server: str, status: int | None, body: Any) -> None:
        with self.lock:
            self.counts[what, status] += 1
            if status == 500:
                self.errors.append(f"{what} via {server}: {str(body)[:300]}")

    def ack(self, plan: Plan) -> None:
        with self.lock:
            self.acks.setdefault(plan.submission_id, time.time())

    def acked(self, *vias: str) -> list[Plan]:
        with self.lock:
            return [self.plans[i] for i in self.acks if not vias or self.plans[i].via in vias]

    def note(self, kind: str, what: str) -> None:
        with self.lock:
            getattr(self, kind).append(what)


class Http:
    """Requests over http.client: one kept-alive connection per API, dialled again after any failure."""

    def __init__(self) -> None:
        self.connections: dict[str, http.client.HTTPConnection] = {}

    def call(self, server: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        connection = self.connections.get(server)
        if connection is None:
            url = urlsplit(server)
            connection = self.connections[server] = http.client.HTTPConnection(url.hostname, url.port,
                                                                                 timeout=HTTP_TIMEOUT_S)
        payload = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            del self.connections[server]
            return None, {}, repr(exc)
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw[:300].decode(errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer


class Clients:
    """The client threads: two single submitters, a batch submitter, a queue publisher, a
    stopper and a poller, each with its own seeded random generator."""

    def __init__(self, ledger: Ledger, jobs: Jobs, *, servers: list[str], broker_url: str, tenants: list[str],
                 seed: object):
        self.ledger, self.jobs, self.servers, self.broker_url, self.tenants = ledger, jobs, servers, broker_url, tenants
        self.submitting, self.polling = threading.Event(), threading.Event()
        workers: list[tuple[str, Callable[[random.Random], None]]] = [
            ("single-1", self.submit_singles), ("single-2", self.submit_singles), ("batch", self.submit_batches),
            ("queue", self.publish), ("stopper", self.stop_some), ("poller", self.poll),
        ]
        self.threads = [threading.Thread(target=self._guard, args=(work, random.Random(f"{seed}-{name}")), name=name,
                                         daemon=True) for name, work in workers]
        self.failures: list[str] = []

    def start(self) -> "Clients":
        self.submitting.set()
        self.polling.set()
        for thread in self.threads:
            thread.start()
        return self

    def stop_submitting(self, timeout: float = RESOLVE_S + 30) -> None:
        """No new submissions or stops; wait for those under way to be answered."""
        self.submitting.clear()
        self._join([t for t in self.threads if t.name != "poller"], timeout)

    def halt(self) -> None:
        """Tell every thread to stop, without waiting (after a failure)."""
        self.submitting.clear()
        self.polling.clear()

    def stop_polling(self, timeout: float = 30) -> None:
        self.polling.clear()
        self._join(self.threads, timeout)

    def _join(self, threads: list[threading.Thread], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        assert not hung, f"client threads did not finish in {timeout:g}s: {hung}"

    def _guard(self, work: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            work(rng)
        except Exception as exc:  # a bug of the test: reported, not hidden
            self.failures.append(f"{threading.current_thread().name}: {exc!r}")
            raise

    # -- making jobs -----------------------------------------------------------------

    def plan(self, rng: random.Random, via: str, tenant: str | None = None) -> Plan:
        """A job that sleeps 0-1.5 s (one in twenty 6-9 s: longer than a paused agent is away,
        so that it may still run when the agent returns), asks for 1 CPU (one in five 2), and
        exits non-zero one time in seven."""
        sleep_s = rng.uniform(6.0, 9.0) if rng.random() < 0.05 else rng.uniform(0.0, 1.5)
        exit_code = rng.choice([1, 3]) if rng.random() < 1 / 7 else 0
        cpus = 2 if rng.random() < 0.2 else 1
        with self.ledger.lock:
            body = self.jobs.timed_body(sleep_s=sleep_s, exit_code=exit_code, entrypoint_num_cpus=cpus)
            plan = Plan(body["submission_id"], tenant or rng.choice(self.tenants), via, cpus * 1000,
                        round(sleep_s, 3), exit_code, body)
            self.ledger.plans[plan.submission_id] = plan
        return plan

    @staticmethod
    def headers(tenant: str) -> dict[str, str]:
        return {"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"}  # 0: no scheduling deadline

    # -- sending ---------------------------------------------------------------------

    def resolve(self, rng: random.Random, http: Http, what: str, path: str, request: Any, tenant: str) -> Reply:
        """POST, to either API, until the answer is definite; after RESOLVE_S, the last answer."""
        deadline = time.monotonic() + RESOLVE_S
        while True:
            server = rng.choice(self.servers)
            status, headers, body = http.call(server, "POST", path, request, self.headers(tenant))
            self.ledger.answer(what, server, status, body)
            definite = status is not None and status < 500 and status != 429
            if definite or time.monotonic() > deadline:
                return status, headers, body
            wait = float(headers.get("retry-after") or 1) if status == 429 else rng.uniform(0.1, 0.4)
            time.sleep(min(wait, 2.0))

    def settle(self, plan: Plan, status: int | None, item: Any, what: str) -> None:
        """Record how a submission ended: acknowledged, never answered, or refused (odd)."""
        if status == 200 and isinstance(item, dict) and item.get("submission_id") == plan.submission_id:
            self.ledger.ack(plan)
        elif status is None or status >= 500 or status == 429:
            self.ledger.note("unresolved", f"{what} {plan.submission_id}: last answer {status}")
        else:
            self.ledger.note("odd", f"{what} {plan.submission_id}: {status} {str(item)[:200]}")

    def submit_singles(self, rng: random.Random) -> None:
        http = Http()
        while self.submitting.is_set():
            plan = self.plan(rng, "http")
            status, _, body = self.resolve(rng, http, "submit", "/api/jobs", plan.body, plan.tenant)
            self.settle(plan, status, body, "POST /api/jobs")
            time.sleep(rng.uniform(0.6, 1.4))

    def submit_batches(self, rng: random.Random) -> None:
        http = Http()
        while self.submitting.is_set():
            tenant = rng.choice(self.tenants)
            plans = [self.plan(rng, "batch", tenant) for _ in range(rng.randint(3, 8))]
            request = {"jobs": [p.body for p in plans]}
            status, _, body = self.resolve(rng, http, "batch", "/api/jobs/batch", request, tenant)
            items = body["results"] if status == 200 else [body] * len(plans)
            for plan, item in zip(plans, items):
                self.settle(plan, status, item, "POST /api/jobs/batch")
            time.sleep(rng.uniform(2.5, 4.0))

    def publish(self, rng: random.Random) -> None:
        """Queue publishers: a plain Celery app on the real Redis, as the README shows."""
        app = Celery(broker=self.broker_url, set_as_current=False)
        app.conf.update(broker_connection_timeout=2, broker_connection_retry=False,
                        broker_transport_options={"socket_timeout": 2, "socket_connect_timeout": 2})
        while self.submitting.is_set():
            plan = self.plan(rng, "queue")
            kwargs = {"body": plan.body, "tenant_id": plan.tenant, "schedule_timeout_ms": 0}
            deadline = time.monotonic() + RESOLVE_S
            while True:
                try:
                    app.send_task("poolq.submit", queue="poolq.submit", kwargs=kwargs, retry=False)
                except Exception as exc:  # kombu's OperationalError, a socket error…: it may have been sent
                    self.ledger.answer("queue", "redis", None, repr(exc))
                    if time.monotonic() > deadline:
                        self.ledger.note("unresolved", f"publish {plan.submission_id}: {exc!r}")
                        break
                    time.sleep(rng.uniform(0.2, 0.5))
                    continue
                self.ledger.answer("queue", "redis", 200, None)
                self.ledger.ack(plan)
                break
            time.sleep(rng.uniform(1.5, 2.5))

    def stop_some(self, rng: random.Random) -> None:
        """Stop one of the last jobs acknowledged over HTTP now and then (likely PENDING or RUNNING)."""
        http = Http()
        while self.submitting.is_set():
            time.sleep(rng.uniform(0.8, 2.0))
            recent = [p for p in self.ledger.acked("http", "batch")[-20:] if p.submission_id not in self.ledger.stops]
            if not recent:
                continue
            plan = rng.choice(recent)
            self.ledger.stops[plan.submission_id] = time.time()
            path = f"/api/jobs/{quote(plan.submission_id)}/stop"
            status, _, body = self.resolve(rng, http, "stop", path, None, plan.tenant)
            if status == 404:
                self.ledger.note("vanished", f"{plan.submission_id}: stop answered 404 {body}")
            elif status != 200:
                self.ledger.note("odd" if status and status < 500 else "unresolved",
                                 f"stop {plan.submission_id}: {status} {str(body)[:200]}")

    # -- polling -----------------------------------------------------------------------

    def poll(self, rng: random.Random) -> None:
        """GET /api/jobs/{id} and GET /api/jobs?ids=…, one at a time (so their answers are in
        order), on jobs still running more often than on ended ones."""
        http = Http()
        while self.polling.is_set():
            time.sleep(0.1)
            plans = self.poll_sample(rng)
            if not plans:
                continue
            server = rng.choice(self.servers)
            sent = time.time()
            if len(plans) == 1 or rng.random() < 0.3:
                plans = plans[:1]
                status, _, body = http.call(server, "GET", f"/api/jobs/{quote(plans[0].submission_id)}",
                                            headers=self.headers(plans[0].tenant))
                records = [body] if status == 200 else []
            else:
                ids = ",".join(p.submission_id for p in plans)
                status, _, body = http.call(server, "GET", f"/api/jobs?ids={ids}", headers=self.headers(plans[0].tenant))
                records = body if status == 200 else []
            self.ledger.answer("poll", server, status, body)
            if status in (200, 404):
                self.record_polls(plans, records, sent)

    def poll_sample(self, rng: random.Random) -> list[Plan]:
        """Up to 40 acknowledged jobs of one tenant: most not yet seen ended, some ended."""
        tenant = rng.choice(self.tenants)
        plans = [p for p in self.ledger.acked() if p.tenant == tenant]
        with self.ledger.lock:
            ended = [p for p in plans if self.ledger.seen[p.submission_id][-1:]
                     and self.ledger.seen[p.submission_id][-1].status in TERMINAL]
        ended_ids = {p.submission_id for p in ended}
        active = [p for p in plans if p.submission_id not in ended_ids]
        return rng.sample(active, min(30, len(active))) + rng.sample(ended, min(10, len(ended)))

    def record_polls(self, plans: list[Plan], records: list[dict[str, Any]], sent: float) -> None:
        found = {r.get("submission_id"): r for r in records if isinstance(r, dict)}
        with self.ledger.lock:
            for plan in plans:
                record, history = found.get(plan.submission_id), self.ledger.seen[plan.submission_id]
                if record is not None:
                    history.append(Seen(sent, record["status"], record.get("error_type"), record.get("start_time"),
                                        record.get("end_time")))
                elif history or (plan.via != "queue" and self.ledger.acks[plan.submission_id] < sent):
                    self.ledger.vanished.append(f"{plan.submission_id} ({plan.via}): not found by a poll at {sent:.3f}")
