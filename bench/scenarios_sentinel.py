"""Redis through Sentinel (issue 15, docs/operations.md): what the durability setting
costs, and how long a failover takes.

- ``durable``: closed-loop single submissions through the sentinels, with
  POOLQ_REDIS_WAIT_REPLICAS=0 and =1, on the same master and two replicas;
- ``failover``: the master killed (SIGKILL) under a steady stream of submissions; the
  time from its death to the first acceptance by the new master, and what was answered
  meanwhile (only 200s and 503s).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

from bench.figures import ScenarioResult
from bench.scenarios import SEED_BODY, Context, check_statuses, describe, run_load, submit_spec
from bench.stack import Api, BenchError, Stack, wait_for

STREAM_CLIENTS = 4  # the stream during the kill: this many clients, one request at a time each
RECOVERY_S = 60.0


def failover(ctx: Context) -> None:
    result = ctx.result("failover")
    for run in range(ctx.runs):
        with Stack("failover") as stack:
            stack.start_replicated(replicas=2)
            assert stack.replicated is not None
            wait_for(lambda: int(stack.redis.info("replication")["connected_slaves"]) == 2, 30, "both replicas")
            master = stack.replicated.members["redis"]
            direct = stack.api(POOLQ_REDIS_URL=master.url)  # the same master, not through the sentinels
            plain, durable = stack.api(), stack.api(POOLQ_REDIS_WAIT_REPLICAS="1")
            rates = {}
            apis = [
                ("direct", direct, "the master's redis:// URL, not through Sentinel"),
                ("plain", plain, "without waiting for replicas"),
                ("wait", durable, "with POOLQ_REDIS_WAIT_REPLICAS=1"),
            ]
            for key, api, label in apis[run % 3 :] + apis[: run % 3]:  # each goes first in one run
                spec = submit_spec(ctx, api.port, headers={"X-Schedule-Timeout-Ms": "0"})
                load = run_load(stack, spec)
                check_statuses(result, f"submit {key}", load)
                rates[key] = load["counted_rate"]
                result.add(f"{key}.rate", rates[key], label=f"accepted jobs/s, {label}", unit="jobs/s")
                result.add(f"{key}.p99", load["p99_ms"], label=f"p99 latency, {label}", unit="ms")
            result.add(
                "wait.ratio", rates["wait"] / rates["plain"], label="with WAIT ÷ without (the same run)", unit="×"
            )
            measure_failover(stack, durable, result)
    spec = submit_spec(ctx, 0)
    result.note(
        f"durable: {describe(spec)}; one master, two replicas and three sentinels on this machine "
        "(poolq.embedded.ReplicatedRedis, `poolq up --replicas 2`); three APIs (2 processes each) on it, "
        "measured in turn, a different one first each run"
    )
    result.note(
        f"failover: {STREAM_CLIENTS} clients submitting one request at a time to the API with "
        "POOLQ_REDIS_WAIT_REPLICAS=1; the master killed with SIGKILL; sentinels with down-after-milliseconds "
        "1000 and a quorum of 2; time from the kill to the first 200 of a request sent after it"
    )


def measure_failover(stack: Stack, api: Api, result: ScenarioResult) -> None:
    assert stack.replicated is not None
    answers: list[tuple[float, float, int]] = []  # (sent, received, status; 0: no answer)
    lock, stop = threading.Lock(), threading.Event()
    body = json.dumps({k: v for k, v in SEED_BODY.items() if k != "submission_id"})

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                connection.request(
                    "POST", "/api/jobs", body, {"Content-Type": "application/json", "X-Schedule-Timeout-Ms": "0"}
                )
                answer = connection.getresponse()
                answer.read()
                status = answer.status
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
            with lock:
                answers.append((sent, time.monotonic(), status))
            time.sleep(0.005)
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(STREAM_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        master = stack.replicated.members["redis"]
        assert master.process is not None
        os.kill(master.process.pid, signal.SIGKILL)
        master.process.wait(10)
        killed = time.monotonic()

        def accepted_again() -> bool:
            with lock:
                return any(sent > killed and status == 200 for sent, _, status in answers)

        wait_for(accepted_again, RECOVERY_S, "an acceptance by the new master", interval_s=0.02)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    after = [(sent, received, status) for sent, received, status in answers if sent > killed]
    first = min(received for sent, received, status in after if status == 200)
    others = [status for _, _, status in answers if status not in (200, 503)]
    if others:
        raise BenchError(f"answers other than 200 and 503 across the failover: {sorted(set(others))}")
    result.add("failover.s", first - killed, label="master killed → first acceptance by the new master", unit="s")
    result.add(
        "failover.503",
        sum(1 for _, received, status in after if status == 503 and received <= first),
        label="503s answered in between",
        unit="answers",
    )
