"""Celery tasks. Thin: each reads what to do from Redis and calls the modules that do it."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from poolq import queues
from worker import runtime

log = logging.getLogger("poolq.tasks")


@shared_task(name=queues.PLACE, ignore_result=True)
def place() -> int:
    """Place the jobs waiting in line (a wake-up; the line itself is in Redis)."""
    return runtime.scheduler().drain()


@shared_task(name=queues.SUBMIT, bind=True, ignore_result=True)
def submit(
    self: Any,
    body: Any = None,
    tenant_id: str | None = None,
    pool_label: str | None = None,
    schedule_timeout_ms: Any = None,
) -> str | None:
    """A job published straight onto the queue (DESIGN.md 5)."""
    import redis

    from poolq.errors import TooMany, Unavailable
    from worker.intake import submit_message

    try:
        return submit_message(runtime.store(), self.request.id, body, tenant_id, pool_label, schedule_timeout_ms)
    except (TooMany, Unavailable, redis.RedisError) as exc:
        # The tenant's max pending is reached, or Redis did not answer: keep the message
        # and try again later (same message id, so the same derived submission id).
        # A failed task would be acknowledged (acks_late acks failures) and lost.
        raise self.retry(exc=exc, countdown=2, max_retries=None) from exc


@shared_task(name=queues.NODE_WAKE, ignore_result=True)
def node_wake() -> None:
    """Start the jobs placed on this node agent's node."""
    agent = runtime.agent()
    if agent is None:
        log.warning("a node wake-up reached a process that runs no node agent")
        return
    agent.wake.set()
