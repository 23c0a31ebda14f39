"""Messaging: the Celery app (Redis broker, poolq's queues, the settings that protect
accepted work) and the waker that sends a wake-up to a queue.

Celery carries only wake-ups ("look at Redis"); jobs live in Redis (docs/architecture.md).
Every process builds the app from here; the worker processes register their own
tasks on it (worker/tasks.py), the API only sends wake-ups by task name. Celery's own
tools (``celery -A poolq.celery_app …``, Flower) use one built the same way.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from celery import Celery
from kombu import Exchange, Queue

from poolq import queues, sentinel
from poolq.settings import Settings

# kombu's Redis transport re-delivers an unacknowledged message once it is older than
# the visibility timeout, when a consumer starts or restores (every ~100 s in kombu
# 5.7). poolq's tasks are short (a placement round is capped at a few seconds and
# then re-wakes itself; a node agent's task only sets a flag) and idempotent, so a
# short timeout costs at most a harmless duplicate wake-up. Nothing waits on a lost
# message: the periodic sweep re-wakes placement, and agents poll their inbox.
VISIBILITY_TIMEOUT_S = 60


# A consumer waits in BRPOP, on a connection no socket timeout guards: when its Redis
# is cut off (a partition, not a crash) nothing says so, and kombu drops the connection
# only after ~48 s of silence. TCP notices in a few seconds instead: keepalive probes
# while the BRPOP waits, a user timeout while a request goes unacknowledged (Linux).
DEAD_PEER_OPTIONS = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2), ("TCP_USER_TIMEOUT", 3000))
    if (option := getattr(socket, name, None)) is not None
}


Waker = Callable[[str], None]  # sends a wake-up task to a Celery queue


def create_celery(settings: Settings) -> Celery:
    """The Celery app of every poolq process, without tasks."""
    url = settings.resolved_redis_url()
    transport: dict[str, Any] = {}
    use_ssl = None
    if sentinel.is_sentinel_url(url):  # kombu's Sentinel transport follows the master too
        url, transport, use_ssl = sentinel.celery_broker(sentinel.parse(url), settings.redis_timeout_s)
    app = Celery("poolq", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # a message is acknowledged only after its task ran
        task_reject_on_worker_lost=True,  # a worker killed mid-task gives the message back
        worker_prefetch_multiplier=1,  # never hold messages another worker could take
        task_ignore_result=True,  # results live in the job records, not a result backend
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=queues.PLACEMENT,
        # Each queue on its own direct exchange, keyed by its name: what `send_task(...,
        # queue=NAME)` from any plain Celery app (a queue publisher) routes to.
        task_queues=(Queue(queues.PLACEMENT, Exchange(queues.PLACEMENT, type="direct"), routing_key=queues.PLACEMENT),),
        task_routes={queues.PLACE: {"queue": queues.PLACEMENT}},
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            "socket_keepalive": True,
            "socket_keepalive_options": DEAD_PEER_OPTIONS,
            **transport,
        },
        broker_connection_timeout=settings.redis_timeout_s,
        broker_connection_retry_on_startup=True,
        # A publish that fails is not retried for long: wake-ups are re-sent by the sweep.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1},
        # Task events (POOLQ_TASK_EVENTS) for Flower and `celery events`: the workers'
        # received/started/succeeded, the publishers' sent. Worker heartbeats go regardless.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        broker_pool_limit=4,
    )
    if use_ssl is not None:
        app.conf.broker_use_ssl = use_ssl
    return app


def celery_waker(settings: Settings) -> Waker:
    """A function that sends a wake-up task to a queue, building the app on first use."""
    app: list[Celery] = []

    def wake(queue: str) -> None:
        if not app:
            app.append(create_celery(settings))
        task = queues.PLACE if queue == queues.PLACEMENT else queues.NODE_WAKE
        app[0].send_task(task, queue=queue)

    return wake
