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

log = logging.getLogger("poolq.worker")


def run_placement_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """A Celery worker on the placement and submit queues, plus the periodic duties.

    One task at a time per process (the solo pool): scale with processes.
    """
    runtime.configure(settings)
    app = create_celery(settings, with_tasks=True)
    stop = threading.Event()
    duties = Duties(runtime.store(), runtime.scheduler())
    thread = threading.Thread(target=duties.run, args=(stop,), name="poolq-duties", daemon=True)
    thread.start()
    try:
        run_worker(
            app,
            [
                "worker",
                "--pool=solo",
                f"--queues={queues.PLACEMENT},{queues.SUBMIT}",
                "--without-mingle",
                "--without-gossip",
                f"--loglevel={loglevel}",
                f"--hostname=placement-{os.getpid()}@{socket.gethostname()}",
            ],
        )
    finally:
        stop.set()
