"""A node agent holds its node as a lease (docs/faults.md, "Fencing").

- SIGSTOP of an agent for longer than the node TTL: its guardian kills the agent's
  jobs before the reaper can declare the node lost and hand their capacity (or, once
  resubmitted, the jobs themselves) to others; on SIGCONT the agent registers again
  only once its jobs are gone, so its node never runs more than it has.
- A guardian killed under a live agent is started again: a job started afterwards is
  still killed when the agent dies.
- A job's ``setsid`` (double-forked) children die with it, on stop and on node loss,
  where the node has cgroups.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.faults.conftest import Jobs, Stack, kill9, redis_ms, sleep_until
from tests.procs import wait_for
from tests.wsgi import call

TTL_S = 3  # fencing at TTL less its margin: 2 s without a heartbeat


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def submit(app: Any, job: dict[str, Any]) -> str:
    result = call(app, "POST", "/api/jobs", job, headers={"X-Schedule-Timeout-Ms": "0"})
    assert result.status == 200, result.body
    return str(result.json["submission_id"])


def pid_of(path: Path, timeout: float = 60) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), timeout, 0.05, what=f"{path} to be written")
    return int(path.read_text().split()[0])


def record(client: Any, submission_id: str) -> dict[str, str]:
    return dict(client.hgetall(f"poolq:job:default:{submission_id}"))


def test_an_agent_paused_past_its_ttl_has_its_jobs_killed_before_its_node_is_declared_lost(
    app: Any, stack: Stack, jobs: Jobs, redis_client: Any, admin: Any, tmp_path: Path
) -> None:
    stack.env.update(POOLQ_NODE_TTL_S=str(TTL_S), POOLQ_HEARTBEAT_S="0.3")
    stack.worker()
    agent = stack.agent("n1", cpus="2")
    pid_file = tmp_path / "job.pid"
    first = submit(app, jobs.body(extra=f"echo $$ > {pid_file}; exec sleep 120", entrypoint_num_cpus=2))
    job_pid = pid_of(pid_file)
    wait_for(lambda: record(redis_client, first).get("status") == "RUNNING", 30, what="the job to run")

    os.kill(agent.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Killed by the guardian while the agent itself cannot act, within the fencing time.
        assert sleep_until(lambda: not alive(job_pid), TTL_S + 5, 0.02), "the paused agent's job kept running"
        killed_at_ms = redis_ms(redis_client)
        killed_after = time.monotonic() - stopped_at
        wait_for(lambda: record(redis_client, first).get("status") == "FAILED", 30, what="the node to be declared lost")
        lost = record(redis_client, first)
        assert lost["error_type"] == "NODE_LOST", lost
        assert killed_at_ms <= int(lost["end_time"]) + 50, (
            f"the job was killed at {killed_at_ms}, after its node was declared lost at {lost['end_time']}"
        )
        # A job submitted now waits: the only node is lost; nothing is placed on it.
        second = submit(app, jobs.body(extra=f"echo $$ > {tmp_path / 'second.pid'}", entrypoint_num_cpus=2))
        time.sleep(1.0)
        assert not record(redis_client, second).get("node")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    print(f"job killed {killed_after:.2f} s after SIGSTOP (fencing at {TTL_S - 1} s, TTL {TTL_S} s)")
    # Back: it registers again (a new incarnation), and the waiting job runs there.
    wait_for(lambda: record(redis_client, second).get("status") == "SUCCEEDED", 60, what="the job after the agent came back")
    assert redis_client.hget("poolq:node:n1", "state") == "live"
    assert jobs.runs_file.read_text().count(first) == 1
    assert admin.check() == []
    assert agent.alive(), agent.output()[-3000:]
    assert "fenced" in agent.output()


def test_a_guardian_killed_under_a_live_agent_is_replaced(app: Any, stack: Stack, jobs: Jobs, redis_client: Any,
                                                          tmp_path: Path) -> None:
    stack.worker()
    agent = stack.agent("n1", cpus="4")
    guardians = [int(pid) for pid in os.popen(f"pgrep -f 'worker.guardian' -P {agent.pid}").read().split()]
    assert len(guardians) == 1, guardians
    os.kill(guardians[0], signal.SIGKILL)
    pid_file = tmp_path / "job.pid"
    started = submit(app, jobs.body(extra=f"echo $$ > {pid_file}; exec sleep 120"))
    job_pid = pid_of(pid_file)
    wait_for(lambda: record(redis_client, started).get("status") == "RUNNING", 30, what="the job to run")
    kill9(agent)
    assert sleep_until(lambda: not alive(job_pid), 10, 0.05), "a job outlived its agent: no guardian watched it"


def test_a_jobs_setsid_children_die_on_stop_and_on_node_loss(app: Any, stack: Stack, jobs: Jobs, redis_client: Any,
                                                             tmp_path: Path) -> None:
    """Without cgroups a double-forked child leaves the job's process group and outlives a
    stop; with them (this machine) it is killed as part of the job."""
    stack.worker()
    agent = stack.agent("n1", cpus="4")
    nodes = call(app, "GET", "/api/nodes").json
    assert nodes[0]["enforcement"]["mode"] in ("v1", "v2"), nodes[0]["enforcement"]
    escapees = []
    for name in ("stopped", "lost"):
        pid_file = tmp_path / f"{name}.pid"
        job = jobs.body(extra=f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' & sleep 300")
        escapees.append((name, submit(app, job), pid_file))
    pids = {name: pid_of(pid_file) for name, _, pid_file in escapees}
    for name, pid in pids.items():
        assert os.getsid(pid) != os.getsid(agent.pid) and os.getpgid(pid) == pid, f"{name}: not in its own session"
    assert call(app, "POST", f"/api/jobs/{escapees[0][1]}/stop").json == {"stopped": True}
    assert sleep_until(lambda: not alive(pids["stopped"]), 20, 0.05), "a stopped job's setsid child kept running"
    kill9(agent)  # the guardian kills the node's job cgroups
    assert sleep_until(lambda: not alive(pids["lost"]), 10, 0.05), "a lost node's job's setsid child kept running"
