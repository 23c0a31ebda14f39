"""Jobs that run far longer than the broker's visibility timeout run once (docs/architecture.md).

Placement workers and the node agent run with a 2 s visibility timeout (injected by
tests/faults/inject.py, as poolq/messaging.py does not read it from the environment),
while jobs sleep 6 s. The first placement worker stalls in its first
task, so its message outlives the timeout and a second worker is handed the same
message: a redelivered message must not reserve twice or run a job twice.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any, Callable

from tests.faults.checker import check
from tests.faults.conftest import Burst, Jobs, PyProc, kill9, node_live, submit_batch
from tests.faults.inject import agent_code, worker_code
from tests.kit import wait_ready
from tests.procs import wait_for

VISIBILITY_S = 2
LONG_S = 6
STALL_S = 60  # the first worker's first task; the test kills it rather than wait
WORKER = worker_code()
AGENT = agent_code("--id", "n1", "--cpus", "16", "--memory", "32Gi")
RECEIVED = re.compile(r"Task ([\w.]+)\[([0-9a-f-]+)\] received")


def oldest_unacked_age_s(client: Any) -> float:
    """Age of the oldest message a consumer holds unacknowledged (kombu's unacked_index)."""
    oldest = client.zrange("unacked_index", 0, 0, withscores=True)
    return time.time() - oldest[0][1] if oldest else 0.0


def test_jobs_longer_than_the_visibility_timeout_run_once(app: Any, jobs: Jobs, run_py: Callable[..., PyProc],
                                                         redis_client: Any, admin: Any) -> None:
    env = {"FAULTS_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)}
    agent = run_py(AGENT, env=env, name="node-n1")
    stalled = run_py(WORKER, env={**env, "FAULTS_SLOW_FIRST_PLACE_S": str(STALL_S)}, name="worker-stalled")
    wait_for(lambda: node_live(redis_client, "n1") or not agent.alive(), 90, 0.1, what="n1 to register")
    wait_ready(agent, "node agent n1")
    wait_ready(stalled, "the first placement worker")

    long_jobs = submit_batch(app, [jobs.body(sleep_s=LONG_S) for _ in range(4)])
    wait_for(lambda: "stalling" in stalled.output(), 60, 0.05, what="the first worker to take the placement message")
    wait_for(lambda: oldest_unacked_age_s(redis_client) > VISIBILITY_S + 0.5, 30, 0.05,
             what="the placement message to outlive the visibility timeout")
    second = run_py(WORKER, env=env, name="worker-second")  # restores messages past the timeout as it starts
    wait_ready(second, "the second placement worker")

    wait_for(lambda: all(redis_client.hget(f"poolq:job:default:{i}", "status") == "RUNNING" for i in long_jobs), 90, 0.05,
             what="the long jobs to run (placed by the second worker while the first stalls)")
    burst = Burst(app, [jobs.body() for _ in range(200)], batch=50, pause_s=0.2).start()
    accepted = burst.join()
    outcome = check(redis_client, long_jobs + accepted, jobs.runs_file, admin, timeout=240)

    received = Counter(RECEIVED.findall("".join(p.output() for p in (stalled, second, agent))))
    redelivered = [task for task, n in received.items() if n > 1]
    print("outcome:", dict(outcome.by_error()), "messages delivered more than once:", redelivered)
    assert redelivered, "no message was delivered twice: the scenario did not exercise the visibility timeout"
    assert outcome.by_status() == {"SUCCEEDED": len(long_jobs) + len(accepted)}, outcome.by_error()
    for submission_id in long_jobs:
        record = outcome.records[submission_id]
        assert outcome.runs[submission_id] == 1 and record["exit_code"] == "0", (submission_id, record)
    assert all(p.alive() for p in (stalled, second, agent))
    kill9(stalled)  # it may still be stalled: a warm shutdown would wait for its task
