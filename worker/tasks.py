"""Celery tasks, registered by each process for what it runs: thin, they read what to do
from Redis and call the objects that do it, which the process built at start (arq's
``ctx``): no module-level state, and a node agent registers only the node's task.

Queue publishers' ``poolq.submit`` messages are not Celery tasks of poolq's workers:
``worker.intake`` consumes them, so that none can be lost (see its docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from poolq import queues

if TYPE_CHECKING:
    from worker.agent import Agent
    from worker.scheduler import Scheduler


def register_placement(app: Celery, scheduler: Scheduler) -> None:
    @app.task(name=queues.PLACE, ignore_result=True)
    def place() -> int:
        """Place the jobs waiting in line (a wake-up; the line itself is in Redis)."""
        return scheduler.place_waiting()


def register_node(app: Celery, agent: Agent) -> None:
    @app.task(name=queues.NODE_WAKE, ignore_result=True)
    def node_wake() -> None:
        """Start the jobs placed on this node."""
        agent.wake.set()
