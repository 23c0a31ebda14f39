"""SIGTERM to every placement worker and node agent during a burst, then a restart
(docs/architecture.md, docs/running.md): the agents drain (no new jobs; running jobs get POOLQ_DRAIN_S to
finish, then are stopped and end FAILED / NODE_SHUTDOWN; jobs placed but not started
end FAILED / NODE_SHUTDOWN), submissions go on being accepted while nothing runs, and
after the restart every accepted job ends, none twice, every reservation released.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.faults.checker import check
from tests.faults.conftest import Burst, Jobs, Stack, lingering_job_processes, sleep_until, statuses, submit_batch
from tests.procs import wait_for


@pytest.mark.parametrize(
    ("drain_s", "job_s", "burst"),
    [
        pytest.param(15, 0.3, 600, id="jobs-finish-within-the-drain"),
        pytest.param(1, 3.0, 300, id="jobs-outlast-the-drain"),
    ],
)
def test_sigterm_everything_mid_burst_then_restart(app: Any, stack: Stack, jobs: Jobs, redis_client: Any, admin: Any,
                                                   drain_s: float, job_s: float, burst: int) -> None:
    stack.env["POOLQ_DRAIN_S"] = str(drain_s)
    procs = [stack.worker(), stack.worker(), stack.agent("n1"), stack.agent("n2")]
    during = 2 * burst // 3  # submitted while the processes are signalled and stop; the rest once all stopped
    load = Burst(app, [jobs.body(sleep_s=job_s) for _ in range(during)], pause_s=0.1).start()

    load.wait_accepted(burst // 3)
    wait_for(lambda: "RUNNING" in {s for s, _ in statuses(redis_client, list(load.accepted))}, 60, 0.01,
             what="some jobs to run")
    seen = list(load.accepted)
    running_at_term = [i for i, (s, _) in zip(seen, statuses(redis_client, seen)) if s == "RUNNING"]
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        assert proc.process is not None
        proc.process.wait(90)
    accepted = load.join()
    after_stop = len(accepted)
    accepted += submit_batch(app, [jobs.body(sleep_s=job_s) for _ in range(burst - during)])  # nothing runs now
    # The agents have exited: nothing they held may be left RUNNING, or placed and waiting for them.
    left = [(i, s, n) for i, (s, n) in zip(accepted, statuses(redis_client, accepted)) if s == "RUNNING" or (s == "PENDING" and n)]
    assert not left, f"jobs left running or placed on agents that shut down: {left[:10]}"
    assert sleep_until(lambda: not lingering_job_processes(str(jobs.runs_file)), 10, 0.2), \
        f"job processes outlived their agent's shutdown: {lingering_job_processes(str(jobs.runs_file))}"

    stack.worker()
    stack.worker()
    stack.agent("n1")
    stack.agent("n2")
    assert len(accepted) == burst
    outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=240)
    print("outcome:", dict(outcome.by_error()), "running at SIGTERM:", len(running_at_term), "accepted while down from", after_stop)

    for submission_id, record in outcome.with_status("FAILED").items():
        assert record["error_type"] in ("NODE_SHUTDOWN", "NODE_LOST"), (submission_id, record)
    assert not outcome.with_status("STOPPED")
    later = [i for i in accepted[after_stop:] if outcome.records[i]["status"] != "SUCCEEDED"]
    assert not later, f"jobs accepted while nothing ran that did not succeed after the restart: {later[:10]}"
    at_term = {i: (outcome.records[i]["status"], outcome.records[i]["error_type"]) for i in running_at_term}
    if job_s < drain_s:
        unfinished = {i: s for i, s in at_term.items() if s[0] != "SUCCEEDED"}
        assert not unfinished, f"jobs running at SIGTERM that did not finish within the drain time: {unfinished}"
    else:
        wrong = {i: s for i, s in at_term.items() if s not in (("SUCCEEDED", None), ("FAILED", "NODE_SHUTDOWN"))}
        assert not wrong, f"jobs running at SIGTERM that neither finished nor ended NODE_SHUTDOWN: {wrong}"
        assert ("FAILED", "NODE_SHUTDOWN") in at_term.values(), at_term
