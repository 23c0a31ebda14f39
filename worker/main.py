"""Entry points of the worker processes: ``poolq worker`` (placement) and ``poolq node``.

Each builds what its process runs from the settings, registers only its own Celery
tasks, and runs the Celery worker in the foreground; its other loops run in threads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings

from celery.signals import worker_shutting_down

from poolq import queues
from poolq.messaging import celery_waker, create_celery
from poolq.nodes import parse_labels
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import JobStore
from worker.agent import Agent
from worker.celery_worker import run_worker
from worker.duties import Duties
from worker.intake import Intake
from worker.scheduler import Scheduler
from worker.tasks import register_node, register_placement

log = logging.getLogger("poolq.worker")
REGISTER_WAIT_S = 30.0  # how long a starting node agent tries to register while Redis does not answer


def quiet_celery() -> list[str]:
    """For a process whose output a person reads (``poolq up``): no Celery banner, no
    line per task, no warning about root (``poolq up`` says it once). Celery's options to add."""
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    return ["--quiet"]


def run_placement_worker(settings: Settings, *, loglevel: str = "INFO", quiet: bool = False) -> None:
    """A Celery worker on the placement queue, plus the periodic duties and a consumer of
    the poolq.submit queue, each in a thread.

    One task at a time per process (the solo pool): scale with processes.
    """
    store = JobStore(connect(settings), settings, celery_waker(settings))
    scheduler = Scheduler(store)
    app = create_celery(settings)
    register_placement(app, scheduler)
    stop = threading.Event()
    intake = Intake(store)
    duties = Duties(store, scheduler, intake=intake)
    threads = [
        threading.Thread(target=target, args=(stop,), name=name, daemon=True)
        for name, target in (("poolq-duties", duties.run), ("poolq-intake", intake.run))
    ]
    for thread in threads:
        thread.start()
    try:
        run_worker(
            app,
            [
                *(quiet_celery() if quiet else []),  # Celery's own options come before the command
                "worker",
                "--pool=solo",
                f"--queues={queues.PLACEMENT}",
                "--without-mingle",
                "--without-gossip",
                f"--loglevel={loglevel}",
                f"--hostname=placement-{os.getpid()}@{socket.gethostname()}",
            ],
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        intake.leave()


def run_node_agent(
    settings: Settings,
    *,
    node_id: str,
    pool: str,
    labels: str,
    capacity: dict[str, int],
    devices: dict[str, list[str]] | None = None,
    loglevel: str = "INFO",
    quiet: bool = False,
) -> int:
    """A node agent: its loop and janitor in threads, a Celery worker on the node's own queue."""
    store = JobStore(connect(settings), settings, celery_waker(settings))
    agent = Agent(store, node_id=node_id, pool=pool, labels=parse_labels(labels), capacity=capacity, devices=devices)
    # Started while Redis does not answer (restarting, slow), it keeps trying for a while;
    # then the error goes up, and the command says which Redis did not answer. Registering
    # again is safe: nothing runs under an incarnation whose reply was lost.
    agent.until_answered(agent.register, give_up_s=REGISTER_WAIT_S)
    for name, target in (("poolq-agent", agent.loop), ("poolq-agent-janitor", agent.janitor)):
        threading.Thread(target=target, name=name, daemon=True).start()
    app = create_celery(settings)
    register_node(app, agent)
    # Celery handles SIGTERM with a warm shutdown that ends worker_main later; stop taking
    # jobs the moment it begins, so that none starts during the shutdown.
    worker_shutting_down.connect(lambda **_: agent.stop_accepting(), weak=False)
    try:
        run_worker(
            app,
            [
                *(quiet_celery() if quiet else []),  # Celery's own options come before the command
                "worker",
                "--pool=solo",
                f"--queues={queues.node_queue(node_id)}",
                "--without-mingle",
                "--without-gossip",
                f"--loglevel={loglevel}",
                f"--hostname=node-{node_id}-{os.getpid()}@{socket.gethostname()}",
            ],
        )
    finally:
        log.info("node %s shutting down (its jobs get up to %gs)", node_id, settings.drain_s)
        agent.shut_down()
    return 0
