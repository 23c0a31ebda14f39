"""A process of the fleet scenario: many node agents, each a real ``worker.agent.Agent``.

``python -m bench.fleet --first I --count N --cpus C --memory BYTES`` registers N agents,
``fleet-<I>`` to ``fleet-<I+N-1>``, in pool ``fleet``, with the settings of the
environment (POOLQ_*), and runs them until SIGTERM. What they send Redis is what a
``poolq node`` process sends: ``Agent.register``, then ``Agent.tick`` — heartbeat.lua
every POOLQ_HEARTBEAT_S, the inbox read (wake flag cleared) every ``LOOP_S`` or when
woken, stop flags of running jobs, the reconcile every 5 s — and each job is a
``JobRun`` thread, start.lua to finish.lua, its entrypoint a real ``/bin/sh -c`` process.

What the agents of one process share, so that a thousand fit on two cores:

- one ``JobStore`` (one Redis client and its connection pool) instead of one each;
- one thread that turns every agent's loop (``Agent.tick``) when woken or ``LOOP_S``
  after its last turn, as ``Agent.loop`` does with a thread per agent (an agent's wake
  flag wakes that thread too: ``Wake``);
- one Celery worker consuming all their queues (``poolq.node.<id>``): its ``poolq.node.wake``
  task wakes the agent whose queue the message came from. A ``poolq node`` runs one
  Celery worker per agent, which a real fleet pays per node (its BRPOP every second);
- one job guardian process (worker/guardian.py), since the jobs run without cgroups
  (POOLQ_ENFORCE_RESOURCES=0); the guardian talks to no one but the agents.

The log janitor (once a minute, the node's log files) does not run.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import sys
import threading
import time
from typing import Any

from poolq import queues
from poolq.messaging import celery_waker, create_celery
from poolq.nodes import capacity_of
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import JobStore
from worker.agent import LOOP_S, Agent, Guardian
from worker.celery_worker import run_worker
from worker.cgroups import Cgroups
from worker.main import quiet_celery

POOL = "fleet"


class Wake(threading.Event):
    """An agent's wake flag (``Agent.wake``) that also wakes the driver of its process."""

    def __init__(self, driver: threading.Event):
        super().__init__()
        self.driver = driver

    def set(self) -> None:
        super().set()
        self.driver.set()


def node_id(index: int) -> str:
    return f"fleet-{index:04d}"


def drive(agents: list[Agent], kick: threading.Event, stop: threading.Event) -> None:
    """Turn each agent's loop when woken (its wake flag, a ``Wake`` on ``kick``), or LOOP_S
    after its last turn, as ``Agent.loop``'s ``wake.wait(LOOP_S)`` does; the first turns are
    spread over LOOP_S, as independent agents' would be, and so are their heartbeats."""
    now = time.monotonic()
    due = [now + random.uniform(0, LOOP_S) for _ in agents]
    while not stop.is_set():
        kick.wait(max(0.0, min(due) - time.monotonic()))
        kick.clear()  # before looking: a wake-up from now on is seen next time
        now = time.monotonic()
        for i, agent in enumerate(agents):
            if agent.wake.is_set() or now >= due[i]:
                agent.wake.clear()
                agent.tick()
                due[i] = time.monotonic() + LOOP_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--cpus", default="4")
    parser.add_argument("--memory", type=int, default=1 << 40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(enforce_resources=False)
    store = JobStore(connect(settings), settings, celery_waker(settings))
    guardian = Guardian(settings.fence_s, Cgroups("none", "the fleet runs its jobs without cgroups"))
    capacity = capacity_of(args.cpus, args.memory)
    agent_log = logging.getLogger("poolq.agent")
    agent_log.setLevel(logging.ERROR)  # not a warning per agent that its jobs run without cgroups
    agents = [
        Agent(store, node_id=node_id(i), pool=POOL, labels={}, capacity=capacity, guardian=guardian)
        for i in range(args.first, args.first + args.count)
    ]
    kick = threading.Event()
    for agent in agents:
        agent.wake = Wake(kick)
        agent.register()
    agent_log.setLevel(logging.NOTSET)
    by_queue = {queues.node_queue(agent.node_id): agent for agent in agents}
    stop = threading.Event()
    threading.Thread(target=drive, args=(agents, kick, stop), name="fleet-driver", daemon=True).start()

    app = create_celery(settings)

    @app.task(name=queues.NODE_WAKE, ignore_result=True, bind=True)
    def node_wake(self: Any) -> None:
        """Start the jobs placed on the node whose queue this message came from."""
        agent = by_queue.get((self.request.delivery_info or {}).get("routing_key", ""))
        for woken in [agent] if agent is not None else agents:  # not known: every agent looks
            woken.wake.set()

    print(f"fleet {args.first}: {len(agents)} agents registered", flush=True)
    try:
        run_worker(
            app,
            [
                *quiet_celery(),
                "worker",
                "--pool=solo",
                f"--queues={','.join(by_queue)}",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=INFO",  # for its "ready." line
                f"--hostname=fleet-{args.first}-{os.getpid()}@{socket.gethostname()}",
            ],
        )
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
