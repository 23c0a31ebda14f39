"""redis-server stopped and restarted under load (docs/faults.md).

A real ``poolq api`` process takes submissions from several HTTP clients while Redis
is shut down (``SHUTDOWN`` flushes the append-only file) and started again on the same
port, password and directory (it replays the file). While Redis is down every answer
is a 503 in the documented form, never a 200 for a job it could not store and never a
500; every job accepted before the stop completes after the restart; and the API, the
placement worker and the node agent work again without being restarted.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

from poolq.client import ApiError, Client
from poolq.embedded import EmbeddedRedis, free_port
from tests.faults.checker import check
from tests.faults.conftest import PLACEMENT_DEADLINE_MS, Jobs, PyProc, Stack, submit_batch
from tests.faults.inject import worker_code
from tests.kit import START_S, wait_ready
from tests.procs import Proc, wait_for

CLIENTS = 3
PAUSE_S = 0.05  # between one client's requests: load, without a backlog the agent needs minutes for
DOWN_ANSWERS = 30  # answers to collect while Redis is down
DOWN_S = 4.0  # and at least this long: the long jobs below end while Redis is down
LONG_JOBS = 4
LONG_SLEEP_S = 3.0  # < DOWN_S: a job running at the stop ends while Redis is down
STALL_S = 3.0  # how long the placement task runs after Redis stops


@dataclasses.dataclass
class Answer:
    kind: str  # "submit" | "poll" | "health"
    submission_id: str | None
    sent: float
    received: float
    status: int | None  # None: no HTTP answer at all
    body: Any


class Load:
    """HTTP clients submitting (and polling) as fast as PAUSE_S allows, recording every answer."""

    def __init__(self, server: str, jobs: Jobs):
        self.server, self.jobs = server, jobs
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.submitter, daemon=True) for _ in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self.poller, daemon=True))

    def record(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def call(self, client: Client, kind: str, submission_id: str | None, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Answer:
        sent = time.monotonic()
        try:
            status, _, payload = client.request(method, path, body, headers)
        except ApiError as exc:  # an error status: an answer all the same
            status, payload = exc.status, exc.body
        except Exception as exc:  # no answer: connection refused, timeout…
            status, payload = None, repr(exc)
        answer = Answer(kind, submission_id, sent, time.monotonic(), status, payload)
        self.record(answer)
        return answer

    def submitter(self) -> None:
        client = Client(self.server, timeout=30)
        with self.lock:
            bodies = [self.jobs.body() for _ in range(5000)]
        for body in bodies:
            if self.stop.is_set():
                return
            self.call(client, "submit", body["submission_id"], "POST", "/api/jobs", body,
                      {"X-Schedule-Timeout-Ms": str(PLACEMENT_DEADLINE_MS)})
            time.sleep(PAUSE_S)

    def poller(self) -> None:
        client = Client(self.server, timeout=30)
        while not self.stop.wait(0.1):
            self.call(client, "health", None, "GET", "/livez")
            accepted = self.accepted()
            if accepted:
                self.call(client, "poll", accepted[0], "GET", f"/api/jobs/{accepted[0]}")

    def accepted(self) -> list[str]:
        with self.lock:
            return [a.submission_id for a in self.answers if a.kind == "submit" and a.status == 200]  # type: ignore[misc]

    def count(self, predicate: Callable[[Answer], bool]) -> int:
        with self.lock:
            return sum(1 for a in self.answers if predicate(a))

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> list[Answer]:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self.threads), "an HTTP client hung"
        return list(self.answers)


def test_redis_restart_under_load(start_proc: Callable[..., Proc], stack: Stack, jobs: Jobs, redis_client: Any,
                                  redis_server: EmbeddedRedis, restart_redis: Callable[[], EmbeddedRedis],
                                  fault_env: dict[str, str], admin: Any) -> None:
    port = free_port()
    api = start_proc(["api", "--port", str(port)], env=fault_env, name="api")
    worker = stack.worker()
    agent = stack.agent("n1")
    server = f"http://127.0.0.1:{port}"
    probe = Client(server, timeout=10)

    def healthy() -> bool:
        try:
            return probe.request("GET", "/livez")[0] == 200
        except (OSError, ApiError):
            return False

    wait_for(lambda: healthy() or not api.alive(), START_S, 0.2, what="the API to answer")
    assert api.alive(), api.output()[-3000:]

    load = Load(server, jobs).start()
    wait_for(lambda: len(load.accepted()) >= 60, 90, 0.05, what="submissions accepted before the stop")

    # A few longer jobs, running when Redis stops: their entrypoints exit while it is down.
    long_ids = []
    for _ in range(LONG_JOBS):
        status, _, answer = probe.request("POST", "/api/jobs", jobs.body(sleep_s=LONG_SLEEP_S),
                                          {"X-Schedule-Timeout-Ms": str(PLACEMENT_DEADLINE_MS)})
        assert status == 200, answer
        long_ids.append(answer["submission_id"])

    def long_jobs_started() -> bool:
        found = [redis_client.hget(f"poolq:job:default:{i}", "status") for i in long_ids]
        return "RUNNING" in found and all(s not in (None, "PENDING") for s in found)

    wait_for(long_jobs_started, 90, 0.02, what="the long jobs to run")

    pending_at_stop = sum(1 for i in load.accepted() + long_ids
                          if redis_client.hget(f"poolq:job:default:{i}", "status") in ("PENDING", "RUNNING"))
    redis_server.stop()  # SHUTDOWN: the append-only file is flushed
    down_from = time.monotonic()
    wait_for(lambda: load.count(lambda a: a.sent >= down_from) >= DOWN_ANSWERS and time.monotonic() - down_from >= DOWN_S,
             90, 0.05, what="answers while Redis is down")
    down_until = time.monotonic()
    restarted = restart_redis()
    up_from = time.monotonic()
    wait_for(lambda: load.count(lambda a: a.kind == "submit" and a.sent >= up_from and a.status == 200) >= 60, 120, 0.1,
             what="submissions accepted again after the restart, by the same API processes")
    answers = load.finish()
    assert restarted.port == redis_server.port

    # Each contract below is checked and reported on its own, so that one broken
    # contract does not hide another: the scenario is too slow to run once per assertion.
    problems: list[str] = []

    # Every request got an HTTP answer, only 200 or 503, never a 500.
    no_answer = [a for a in answers if a.status is None]
    if no_answer:
        problems.append(f"requests without an answer: {[(a.kind, a.body) for a in no_answer[:5]]}")
    unexpected = [(a.kind, a.status, a.body) for a in answers if a.status not in (200, 503, None)]
    if unexpected:
        problems.append(f"answers other than 200 or 503 (a 500 is a bug): {len(unexpected)}, e.g. {unexpected[:5]}")

    # While Redis was down: 503 only (never a 200 for a job it could not store), and a
    # submission's 503 in the documented form (docs/api.md).
    down = [a for a in answers if a.sent >= down_from and a.received <= down_until]
    assert down, "no request was answered while Redis was down"
    not_503 = [(a.kind, a.status, a.body) for a in down if a.status != 503]
    if not_503:
        problems.append(f"answers other than 503 while Redis was down: {not_503[:5]}")
    down_submits = [a for a in down if a.kind == "submit"]
    assert down_submits and any(a.kind == "health" for a in down)
    malformed = [a.body for a in down_submits
                 if not (isinstance(a.body, dict) and str(a.body.get("error", "")).startswith(
                     f"create app failed, submissionId:[{a.submission_id}], err: "))]
    if malformed:
        problems.append(f"{len(malformed)} of {len(down_submits)} submissions answered while Redis was down did not say "
                        f"'create app failed, submissionId:[<id>], err: <cause>', e.g. {malformed[:3]}")

    # After the restart: the same API processes work again (the last answers are all 200).
    tail = [a for a in answers if a.kind == "submit"][-20:]
    if not all(a.status == 200 for a in tail):
        problems.append(f"the API did not recover: {[(a.status, a.body) for a in tail if a.status != 200][:5]}")
    for name, proc in (("api", api), ("worker", worker), ("agent", agent)):
        if not proc.alive():
            problems.append(f"poolq {name} exited across the Redis restart:\n{proc.output()[-2000:]}")

    # Every job accepted (before the stop, running across it, or after the restart)
    # completes, once.
    accepted = [a.submission_id for a in answers if a.kind == "submit" and a.status == 200] + long_ids
    before_stop = [a.submission_id for a in answers if a.kind == "submit" and a.status == 200 and a.received <= down_from]
    assert len(before_stop) >= 60
    try:
        outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=60)  # type: ignore[arg-type]
    except AssertionError as exc:
        problems.append(str(exc))
    else:
        refused_but_stored = [a.submission_id for a in answers if a.kind == "submit" and a.status == 503
                              and redis_client.exists(f"poolq:job:default:{a.submission_id}")]
        print("outcome:", dict(outcome.by_error()), "accepted:", len(accepted), "unfinished at the stop:", pending_at_stop, "503s:",
              sum(1 for a in answers if a.status == 503), "503 but stored:", len(refused_but_stored))
        if outcome.by_status() != {"SUCCEEDED": len(accepted)}:
            problems.append(f"accepted jobs that did not succeed: {dict(outcome.by_error())}")
    assert not problems, "\n".join(problems)


def test_processes_survive_a_redis_restart_in_the_middle_of_a_task(stack: Stack, jobs: Jobs, app: Any, redis_client: Any,
                                                                   redis_server: EmbeddedRedis,
                                                                   restart_redis: Callable[[], EmbeddedRedis],
                                                                   run_py: Callable[..., PyProc], admin: Any) -> None:
    """A placement worker whose task is running (its message not yet acknowledged) when
    Redis goes away keeps running, and places the job once Redis is back: Redis is the
    only state, so a Redis restart must not need a restart of every poolq process."""
    agent = stack.agent("n1")
    worker = run_py(worker_code(), env={"FAULTS_SLOW_FIRST_PLACE_S": str(STALL_S)}, name="worker")
    wait_ready(worker, "placement worker")
    accepted = submit_batch(app, [jobs.body()])  # its wake-up starts the stalled task
    wait_for(lambda: "stalling" in worker.output() or not worker.alive(), 60, 0.05, what="the placement task to start")
    redis_server.stop()
    wait_for(lambda: "the stall is over" in worker.output() or not worker.alive(), 60, 0.05, what="the stall to end")
    time.sleep(1.0)  # the task fails on the dead connection, then Celery tries to acknowledge its message
    restart_redis()
    outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=60)
    assert outcome.by_status() == {"SUCCEEDED": 1}, outcome.by_error()
    assert worker.alive(), f"the placement worker exited across the Redis restart:\n{worker.output()[-3000:]}"
    assert agent.alive(), f"the node agent exited across the Redis restart:\n{agent.output()[-3000:]}"
