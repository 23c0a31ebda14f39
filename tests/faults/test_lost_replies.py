"""Lost replies: the script ran in Redis, its reply never reached the caller (docs/faults.md).

A relay between one poolq process and Redis holds back the reply to a chosen script
past the 0.5 s socket timeout, so the process sees a timeout for a step that took
effect. Each case failed before its fix: a lost reply to the agent's start script left
the job RUNNING forever, unrun, holding its reservation; a lost reply to the claim left
its jobs to the 30 s lease; a lost reply to a submission answered 503 "could not be
stored" for a stored job; a lost reply to the queue consumer's move lost the message.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery import Celery

from poolq.nodes import capacity_of
from poolq.redis_io import script_sha
from tests.faults.conftest import Jobs, Stack
from tests.faults.relay import Relay
from tests.procs import wait_for


def sha(script: str) -> str:
    return script_sha(script)


@pytest.fixture
def relay_for(redis_server: Any) -> Iterator[Any]:
    """A relay to the test's Redis that loses the first ``limit`` replies to ``scripts``."""
    relays: list[Relay] = []

    def make(*scripts: str, limit: int | None = 1, probability: float = 1.0) -> Relay:
        relay = Relay(redis_server.port, seed=1, probability=probability, scripts=[sha(s) for s in scripts],
                      limit=limit).start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.stop()


def record(client: Any, submission_id: str, tenant: str = "default") -> dict[str, str]:
    return dict(client.hgetall(f"poolq:job:{tenant}:{submission_id}"))


def submit(app: Any, job: dict[str, Any]) -> None:
    from tests.wsgi import call

    result = call(app, "POST", "/api/jobs", job, headers={"X-Schedule-Timeout-Ms": "0"})
    assert result.status == 200, result.body


def test_a_lost_reply_to_the_start_script_still_runs_the_job_once(
    app: Any, stack: Stack, jobs: Jobs, redis_client: Any, redis_server: Any, relay_for: Any, admin: Any
) -> None:
    stack.worker()
    relay = relay_for("start")
    stack.agent("n1", env={"POOLQ_REDIS_URL": relay.url(redis_server.password)})
    job = jobs.body(sleep_s=0.2)
    submit(app, job)
    wait_for(lambda: record(redis_client, job["submission_id"]).get("status") in ("SUCCEEDED", "FAILED", "STOPPED"),
             60, what="the job whose start reply was lost to end")
    assert relay.delayed == 1, "the relay held back no reply: the test proved nothing"
    fields = record(redis_client, job["submission_id"])
    assert fields["status"] == "SUCCEEDED", fields
    assert jobs.runs_file.read_text().split() == [job["submission_id"]]
    assert admin.check() == []


def test_a_lost_reply_to_the_claim_does_not_leave_its_jobs_to_the_lease(
    app: Any, stack: Stack, redis_client: Any, redis_server: Any, relay_for: Any, admin: Any, jobs: Jobs
) -> None:
    admin.upsert("static", pool="p", labels={}, capacity=capacity_of(64, 256 << 30), kind="static")
    relay = relay_for("claim")
    stack.worker(env={"POOLQ_REDIS_URL": relay.url(redis_server.password), "POOLQ_CLAIM_LEASE_S": "30"})
    bodies = [jobs.body() for _ in range(10)]
    started = time.monotonic()
    for body in bodies:
        submit(app, body)
    wait_for(lambda: all(record(redis_client, b["submission_id"]).get("node") for b in bodies), 60,
             what="the claimed jobs to be placed")
    took = time.monotonic() - started
    assert relay.delayed == 1, "the relay held back no reply: the test proved nothing"
    assert took < 20, f"the jobs waited {took:.1f} s: out the 30 s lease of a claim whose reply was lost"
    assert redis_client.zcard("poolq:claimed") == 0 and redis_client.hlen("poolq:claims") == 0
    assert admin.check() == []


def test_a_lost_reply_to_a_submission_is_answered_as_accepted_once(
    stack: Stack, redis_client: Any, redis_server: Any, relay_for: Any, jobs: Jobs
) -> None:
    from poolq.client import Client

    relay = relay_for("submit")
    _, server = stack.api(env={"POOLQ_REDIS_URL": relay.url(redis_server.password)})
    client = Client(server, timeout=30)
    job = jobs.body()
    assert client.submit(job, timeout_ms=0) == job["submission_id"]
    assert relay.delayed == 1, "the relay held back no reply: the test proved nothing"
    assert record(redis_client, job["submission_id"])["status"] == "PENDING"
    assert redis_client.zcard("poolq:tenant:default:jobs") == 1
    # Nothing was sent twice into line: one job in its shape's queue.
    sig = record(redis_client, job["submission_id"])["shape"]
    assert redis_client.zcard(f"poolq:shape:{sig}:q") == 1


def test_lost_replies_to_the_queue_consumer_lose_no_message(
    stack: Stack, redis_client: Any, redis_server: Any, relay_for: Any, jobs: Jobs, tmp_path: Path
) -> None:
    relay = relay_for("intake_take", limit=5, probability=0.5)
    stack.worker(env={"POOLQ_REDIS_URL": relay.url(redis_server.password)})
    publisher = Celery(broker=redis_server.url)
    ids = []
    try:
        for _ in range(40):
            body = jobs.body()
            publisher.send_task("poolq.submit", queue="poolq.submit", kwargs={"body": body, "schedule_timeout_ms": 0},
                                task_id=str(uuid.uuid4()))
            ids.append(body["submission_id"])
    finally:
        publisher.close()
    wait_for(lambda: all(record(redis_client, i) for i in ids), 60, what="every queued message to become a job")
    assert relay.delayed >= 1, "the relay held back no reply: the test proved nothing"
    assert redis_client.llen("poolq.submit") == 0
    wait_for(lambda: not any(redis_client.llen(key) for key in redis_client.scan_iter("poolq:taken:*")), 30,
             what="the consumer to let go of every message it handled")
    assert sum(1 for i in ids if record(redis_client, i)) == 40
