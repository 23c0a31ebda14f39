"""kill -9 of a node agent in the middle of a burst (docs/faults.md).

The agent's jobs die with it (its guardian kills their process groups); after
POOLQ_NODE_TTL_S without a heartbeat the node is lost and every job placed or running
on it ends FAILED / NODE_LOST naming the node, its reservations released; an agent
restarted before that fails what its predecessor was running (NODE_LOST) and runs what
was placed but not started. The other jobs are placed on the other agent or on the
restarted one, and nothing runs twice.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.checker import check
from tests.faults.conftest import Burst, Jobs, Stack, kill9, lingering_job_processes, sleep_until
from tests.procs import wait_for

BURST = 600


def running_on(client: Any, node_id: str, status: str = "RUNNING") -> list[str]:
    refs = sorted(client.smembers(f"poolq:node:{node_id}:jobs"))
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.hget(f"poolq:job:{ref}", "status")
    return [ref.split(":", 1)[1] for ref, found in zip(refs, pipe.execute()) if found == status]


@pytest.mark.parametrize(
    ("restart", "node_ttl_s"),
    [
        # The node is declared lost (no heartbeat for POOLQ_NODE_TTL_S), then its agent restarts.
        pytest.param("after-lost", 3, id="restarted-after-the-node-is-lost"),
        # The agent restarts at once, well within the TTL: the new agent fails what the old
        # one was running and runs what was placed on the node but not started.
        pytest.param("at-once", 60, id="restarted-within-the-ttl"),
    ],
)
def test_kill9_node_agent_mid_burst(app: Any, stack: Stack, jobs: Jobs, redis_client: Any, admin: Any,
                                    restart: str, node_ttl_s: int) -> None:
    stack.env["POOLQ_NODE_TTL_S"] = str(node_ttl_s)
    stack.worker()
    victim = stack.agent("n1")
    stack.agent("n2")
    burst = Burst(app, [jobs.body(sleep_s=0.5) for _ in range(BURST)]).start()

    burst.wait_accepted(BURST // 3)
    wait_for(lambda: len(running_on(redis_client, "n1")) >= 3, 60, 0.01, what="jobs running on n1")
    kill9(victim)
    running_at_kill = running_on(redis_client, "n1")  # nobody but the reaper or a new agent can end these now
    placed_at_kill = running_on(redis_client, "n1", "PENDING")  # placed on n1, not started
    assert running_at_kill

    if restart == "after-lost":
        wait_for(lambda: redis_client.hget("poolq:node:n1", "state") == "dead", 90, 0.1,
                 what="n1 to be declared lost (no heartbeat for POOLQ_NODE_TTL_S)")
    restarted = stack.agent("n1")

    accepted = burst.join()
    assert len(accepted) == BURST
    outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=240)
    print("outcome:", dict(outcome.by_error()), "running at kill:", len(running_at_kill), "placed at kill:", len(placed_at_kill))

    lost = {i: outcome.records[i] for i in running_at_kill}
    wrong = {i: (r["status"], r["error_type"]) for i, r in lost.items() if (r["status"], r["error_type"]) != ("FAILED", "NODE_LOST")}
    assert not wrong, f"jobs running on the killed agent that did not end FAILED/NODE_LOST: {wrong}"
    for submission_id, record in outcome.with_status("FAILED").items():
        assert record["error_type"] == "NODE_LOST" and record["node"] == "n1", (submission_id, record)
        assert "n1" in str(record["message"]), (submission_id, record["message"])
    assert not outcome.with_status("STOPPED")
    not_on_victim = [i for i, r in outcome.records.items() if r["node"] != "n1" and r["status"] != "SUCCEEDED"]
    assert not not_on_victim, f"jobs off the lost node that did not succeed: {not_on_victim[:10]}"
    if restart == "at-once":
        # Never started, so never lost: the restarted agent runs them.
        unrun = {i: (outcome.records[i]["status"], outcome.records[i]["error_type"]) for i in placed_at_kill
                 if outcome.records[i]["status"] != "SUCCEEDED"}
        assert not unrun, f"jobs placed on n1 but not started when its agent died, not run by the restarted agent: {unrun}"
        assert len(outcome.with_status("FAILED")) == len(running_at_kill), outcome.by_error()
    # Nothing the dead agent started keeps running unsupervised.
    assert sleep_until(lambda: not lingering_job_processes(str(jobs.runs_file)), 10, 0.2), \
        lingering_job_processes(str(jobs.runs_file))
    assert restarted.alive(), restarted.output()[-3000:]
