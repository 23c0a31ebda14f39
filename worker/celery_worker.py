"""Running a Celery worker in a poolq process (the placement worker, a node agent)."""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.signals import worker_shutting_down

log = logging.getLogger("poolq.celery")


def run_worker(app: Celery, argv: list[str]) -> None:
    """Run a Celery worker until it is asked to stop (SIGTERM, SIGINT).

    Celery can end its worker on a broker failure it does not recover from (seen: an
    error in kombu while Redis restarts). Nothing is lost then, but a process that
    exits stops placing or running jobs: start the worker again instead.
    """
    requested = threading.Event()
    worker_shutting_down.connect(lambda **_: requested.set(), weak=False)
    while True:
        try:
            app.worker_main(argv)
        except SystemExit as exc:
            if requested.is_set():
                raise
            log.error("the Celery worker ended unexpectedly (exit %s); starting it again in 1 s", exc.code)
        else:
            if requested.is_set():
                return
            log.error("the Celery worker ended unexpectedly; starting it again in 1 s")
        time.sleep(1)
