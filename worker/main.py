"""Entry points of the worker processes: ``poolq worker`` (placement) and ``poolq node``."""

from __future__ import annotations

import logging
import os
import socket
import threading

from poolq import queues
from poolq.settings import Settings
from worker import runtime
from worker.celery_app import create_celery, run_worker
from worker.duties import Duties
from worker.intake import Intake

log = logging.getLogger("poolq.worker")


def run_placement_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """A Celery worker on the placement queue, plus the periodic duties and a consumer of
    the poolq.submit queue, each in a thread.

    One task at a time per process (the solo pool): scale with processes.
    """
    runtime.configure(settings)
    app = create_celery(settings, with_tasks=True)
    stop = threading.Event()
    intake = Intake(runtime.store())
    duties = Duties(runtime.store(), runtime.scheduler(), intake=intake)
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
