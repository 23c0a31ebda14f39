"""Preemption (docs/scheduling.md, "Preemption"): off unless a tenant's policy allows
it; then a waiting job that nothing has room for stops the fewest running jobs of strictly
lower priority on one node, which end FAILED PREEMPTED (their retry policy may run them
again), and it is placed on the capacity they free, which no third job may take in
between. Real node agents (SIGTERM, grace, SIGKILL), placement in the test's process, and
the reservation invariant (``poolq nodes check``) watched throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from poolq import keys
from poolq.model import ErrorType, JobStatus
from poolq.nodes import NodeAdmin
from poolq.quotas import set_quota
from poolq.store import JobStore
from tests import kit
from tests.kit import add_node
from tests.procs import Proc, wait_for
from worker.placement import Node
from worker.scheduler import Preempted, Scheduler, fewest_victims

AGENT_ENV = {"POOLQ_HEARTBEAT_S": "0.5", "POOLQ_STOP_GRACE_S": "1", "POOLQ_DRAIN_S": "1"}
STUBBORN = "trap '' TERM; sleep 60"  # ignores SIGTERM (so does its sleep): only the SIGKILL after the grace ends it


def job(tmp_path: Path, submission_id: str, command: str = "sleep 60", cpus: int = 1, **fields: Any) -> dict[str, Any]:
    return {"entrypoint": command, "runtime_env": {"working_dir": str(tmp_path)}, "entrypoint_num_cpus": cpus,
            "entrypoint_memory": 128 * kit.MiB, "submission_id": submission_id, **fields}


@pytest.fixture
def agent(start_proc: Callable[..., Proc], admin: NodeAdmin) -> Proc:
    proc = start_proc(["node", "--id", "n1", "--cpus", "4", "--memory", "4Gi"], env=AGENT_ENV, name="node-n1")
    wait_for(lambda: any(n["node_id"] == "n1" and n["alive"] for n in admin.describe()) or not proc.alive(),
             kit.START_S, 0.1, what="node n1 to register")
    kit.wait_ready(proc, "node agent n1")
    return proc


class Watch:
    """``poolq nodes check`` over and over while the test runs: every problem it finds."""

    def __init__(self, admin: NodeAdmin):
        self.admin, self.problems, self.checks = admin, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.problems += self.admin.check()
            self.checks += 1
            time.sleep(0.01)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.processes
def test_preemption_is_off_unless_enabled_then_frees_exactly_enough_and_requeues_its_victims(
    app: Any, placement: kit.Placement, agent: Proc, admin: NodeAdmin, redis_client: redis.Redis, tmp_path: Path,
    service_env: dict[str, str],
) -> None:
    retried = {"max_attempts": 2, "retry_on": ["PREEMPTED"], "backoff_s": 0}
    low = [
        kit.submit(app, job(tmp_path, "app-low-a", STUBBORN, priority=-1, retry_policy=retried), tenant="low",
                   timeout_ms=0),
        kit.submit(app, job(tmp_path, "app-low-b", STUBBORN, priority=-1), tenant="low", timeout_ms=0),
        kit.submit(app, job(tmp_path, "app-zero-c"), tenant="low", timeout_ms=0),
        kit.submit(app, job(tmp_path, "app-zero-d"), tenant="low", timeout_ms=0),
    ]
    for submission_id in low:
        kit.wait_status(app, submission_id, "RUNNING", tenant="low")
    with Watch(admin) as watch:
        high = kit.submit(app, job(tmp_path, "app-high", cpus=2, priority=10), tenant="high", timeout_ms=0)
        wait_for(lambda: kit.record(app, high, "high")["scheduling"]["attempts"] >= 3, kit.SETTLE_S,
                 what="the high-priority job to fail a few rounds")
        assert [kit.record(app, i, "low")["status"] for i in low] == ["RUNNING"] * 4, "preemption is off by default"
        assert not redis_client.hget(keys.node("n1"), "taken")

        done = subprocess.run([sys.executable, "-m", "poolq", "quota", "set", "high", "--preempt", "on"],
                              env={**os.environ, **service_env}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "preempt" in done.stdout, done.stderr
        # A third job, of the highest priority but no preemption, arrives while the victims stop.
        wait_for(lambda: redis_client.hget(keys.node("n1"), "taken"), kit.SETTLE_S, what="the preemption")
        third = kit.submit(app, job(tmp_path, "app-third", priority=100), tenant="third", timeout_ms=0)
        placed = kit.wait_status(app, high, "RUNNING", tenant="high")
        kit.wait_record(app, "app-low-a", lambda r: r["attempt_number"] == 2, "to be put back in line", tenant="low")
        time.sleep(1.0)  # rounds go on: nothing else may squeeze in
    assert watch.checks > 10 and watch.problems == []
    assert placed["driver_node_id"] == "n1"
    assert not redis_client.hget(keys.node("n1"), "taken"), "placed, the job no longer keeps capacity"
    victim = kit.record(app, "app-low-b", "low")
    assert (victim["status"], victim["error_type"]) == ("FAILED", "PREEMPTED")
    assert victim["message"] == "preempted by app-high (priority 10), which needed room on node n1"
    requeued = kit.record(app, "app-low-a", "low")
    assert requeued["status"] == "PENDING" and requeued["driver_node_id"] is None
    assert [(a["error_type"], a["message"]) for a in requeued["previous_attempts"]] == [("PREEMPTED", victim["message"])]
    others = [kit.record(app, i, "low") for i in low[2:]]
    assert [r["status"] for r in others] == ["RUNNING", "RUNNING"], [(r["error_type"], r["message"]) for r in others]
    assert kit.record(app, third, "third")["driver_node_id"] is None, "the freed capacity went to the preemptor only"
    assert admin.check() == []


def test_the_fewest_victims_lowest_priority_first() -> None:
    node = Node("n", "p", {}, {"CPU": 8000, "memory": 8000}, {"CPU": 7000, "memory": 1000})
    jobs = [("a", 0, {"CPU": 1000}), ("b", 0, {"CPU": 3000}), ("c", -5, {"CPU": 3000}), ("d", 0, {"CPU": 2000})]
    assert fewest_victims(node, {"CPU": 4000}, jobs) == [("c", -5, {"CPU": 3000})]  # one frees 3000 + 1000 free
    assert [v[0] for v in fewest_victims(node, {"CPU": 6000}, jobs) or []] == ["c", "d"]
    assert fewest_victims(node, {"CPU": 8000, "memory": 8000}, jobs) is None  # no job frees memory
    assert fewest_victims(node, {"CPU": 1000}, jobs) is None  # it fits already: no one is stopped


def test_preemption_step_by_step_keeps_the_freed_room_for_its_job(
    app: Any, store: JobStore, admin: NodeAdmin, redis_client: redis.Redis, tmp_path: Path
) -> None:
    add_node(admin, "n1", cpus=2, pool="default")
    low = [kit.submit(app, job(tmp_path, f"app-low-{i}"), tenant="low", timeout_ms=0) for i in range(2)]
    scheduler = Scheduler(store)
    scheduler.place_waiting()
    for submission_id in low:
        kit.start(store, keys.ref("low", submission_id), "n1")
    set_quota(redis_client, "high", preempt=True)

    def flagged() -> list[str]:
        return [i for i in low if redis_client.hget(keys.job(keys.ref("low", i)), "stop")]

    equal = kit.submit(app, job(tmp_path, "app-equal"), tenant="high", timeout_ms=0)  # priority 0, as theirs
    scheduler.place_waiting()
    assert flagged() == [], "only strictly lower priorities are preempted"
    assert kit.stop(app, equal, "high").json == {"stopped": True}

    # (a shape of its own: the equal job's is blocked for its backoff)
    high = kit.submit(app, job(tmp_path, "app-high", priority=5, entrypoint_memory=256 * kit.MiB), tenant="high",
                      timeout_ms=0)
    high_ref = keys.ref("high", high)
    scheduler.place_waiting()
    assert len(flagged()) == 1, "one job frees the one CPU it needs"
    victim_ref = keys.ref("low", flagged()[0])
    assert redis_client.hget(keys.node("n1"), "taken").startswith(high_ref + "|")
    reasons = kit.record(app, high, "high")["scheduling"]["reasons"]
    assert {"reason": "Preempting Lower Priority", "units": 1, "requirement": "node n1"} in reasons
    claims_before = redis_client.hget(keys.CLAIMS, high_ref)
    assert claims_before is None  # the round requeued it; a second preemption is refused outright
    again = store.scripts.preempt(
        keys=[keys.job(high_ref), keys.node("n1"), keys.node_jobs("n1"), keys.CLAIMS, keys.INVENTORY_LOG,
              keys.HEARTBEATS, keys.job(victim_ref)],
        args=[high_ref, "any-claim", "n1", "CPU=1000", 10_000, 15_000, "m", victim_ref],
    )
    assert again == Preempted.ALREADY
    scheduler.place_waiting()  # its later rounds wait for the victim: no second one
    assert len(flagged()) == 1

    third = kit.submit(app, job(tmp_path, "app-third", priority=100), tenant="third", timeout_ms=0)
    # The victim's executor stops it, as an agent would (SIGTERM, grace, SIGKILL), and says so.
    store.finish(victim_ref, JobStatus.FAILED, error_type=ErrorType.ENTRYPOINT_FAILED, message="killed by signal 15")
    ended = kit.record(app, keys.split_ref(victim_ref)[1], "low")
    assert (ended["status"], ended["error_type"]) == ("FAILED", "PREEMPTED")
    assert ended["message"] == "preempted by app-high (priority 5), which needed room on node n1"
    assert admin.check() == []
    scheduler.place_waiting()
    assert kit.record(app, high, "high")["driver_node_id"] == "n1"
    assert kit.record(app, third, "third")["driver_node_id"] is None, "the freed CPU was the preemptor's"
    assert redis_client.hget(keys.node("n1"), "taken") is None
    assert admin.check() == []
