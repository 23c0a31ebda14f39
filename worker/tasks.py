"""Celery tasks. Thin: each reads what to do from Redis and calls the modules that do it.

Queue publishers' ``poolq.submit`` messages are not Celery tasks of poolq's workers:
``worker.intake`` consumes them, so that none can be lost (see its docstring).
"""

from __future__ import annotations

import logging

from celery import shared_task

from poolq import queues
from worker import runtime

log = logging.getLogger("poolq.tasks")


@shared_task(name=queues.PLACE, ignore_result=True)
def place() -> int:
    """Place the jobs waiting in line (a wake-up; the line itself is in Redis)."""
    return runtime.scheduler().drain()


@shared_task(name=queues.NODE_WAKE, ignore_result=True)
def node_wake() -> None:
    """Start the jobs placed on this node agent's node."""
    agent = runtime.agent()
    if agent is None:
        log.warning("a node wake-up reached a process that runs no node agent")
        return
    agent.wake.set()
