"""kill -9 of placement workers in the middle of a burst (docs/faults.md).

Claims held by a dead worker come back through the sweep (POOLQ_CLAIM_LEASE_S=2); its
unacknowledged Celery message is given back by the broker; no job is lost, placed
twice or run twice, and every reservation is released exactly once.
"""

from __future__ import annotations

from typing import Any

from tests.faults.checker import check
from tests.faults.conftest import Burst, Jobs, Stack, kill9, sleep_until

BURST = 1000


def test_kill9_placement_workers_mid_burst(app: Any, stack: Stack, jobs: Jobs, redis_client: Any, admin: Any) -> None:
    first, second = stack.worker(), stack.worker()
    stack.agent("n1")
    stack.agent("n2")
    burst = Burst(app, [jobs.body() for _ in range(BURST)]).start()

    # First kill: a third into the burst, at a moment when some jobs are claimed (held in
    # a round), so that a dead worker is likely to leave claims behind.
    burst.wait_accepted(BURST // 3)
    sleep_until(lambda: redis_client.zcard("poolq:claimed") > 0, 5, 0.005)
    kill9(first)
    replacement = stack.worker(wait=False)

    # Second kill: the other original worker, two thirds into the burst.
    burst.wait_accepted(2 * BURST // 3)
    sleep_until(lambda: redis_client.zcard("poolq:claimed") > 0, 5, 0.005)
    kill9(second)

    accepted = burst.join()
    assert len(accepted) == BURST
    outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=240)
    recovered = sum(1 for r in outcome.records.values() if r["lost_claims"])
    print("outcome:", dict(outcome.by_error()), "jobs recovered from a dead worker's claims:", recovered)
    # Only placement workers died: no job had a reason to fail.
    assert outcome.by_status() == {"SUCCEEDED": BURST}, outcome.by_error()
    assert replacement.alive(), replacement.output()[-3000:]
