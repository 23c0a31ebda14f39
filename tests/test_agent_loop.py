"""Node agents in the test's process, their loop turned by the test (``Agent.tick``): what
the fleet benchmark (bench/fleet.py) runs, many agents sharing one store and one guardian."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from poolq import keys
from poolq.messaging import celery_waker
from poolq.nodes import capacity_of
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import JobStore
from tests import kit
from tests.kit import GiB, Placement
from worker.agent import Agent, Guardian
from worker.cgroups import Cgroups


def test_agents_sharing_a_store_and_a_guardian_run_their_jobs(
    settings: Settings, app: object, placement: Placement, tmp_path: Path
) -> None:
    plain = dataclasses.replace(settings, enforce_resources=False)
    store = JobStore(connect(plain), plain, celery_waker(plain))
    guardian = Guardian(plain.fence_s, Cgroups("none", "the test's jobs run without cgroups"))
    agents = [
        Agent(store, node_id=f"shared-{i}", pool="p", labels={}, capacity=capacity_of(1, GiB), guardian=guardian)
        for i in range(2)
    ]
    for agent in agents:
        agent.register()
    body = {**kit.JOB, "runtime_env": {"working_dir": str(tmp_path)}}
    ids = [kit.submit(app, body, label="pool=p") for _ in range(2)]  # 1 CPU each: one on each node
    deadline = time.monotonic() + kit.SETTLE_S
    while any(kit.record(app, i)["status"] != "SUCCEEDED" for i in ids):
        assert time.monotonic() < deadline, [kit.record(app, i) for i in ids]
        for agent in agents:
            assert agent.tick()
        time.sleep(0.02)
    assert {kit.record(app, i)["driver_node_id"] for i in ids} == {"shared-0", "shared-1"}
    assert all(store.redis.zscore(keys.HEARTBEATS, agent.node_id) for agent in agents)

    agents[0].shut_down()
    assert guardian.process.poll() is None, "an agent's shutdown closed the guardian the other still uses"
    agents[1].shut_down()
    guardian.close()
    assert not store.redis.exists(keys.node("shared-0"), keys.node("shared-1"))
