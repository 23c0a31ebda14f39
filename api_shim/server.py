"""Serve the WSGI app with granian, the faster server measured (BENCHMARKS.md), and, beside
it on a port of its own, the server of log tails (api_shim/front.py).

Each worker process imports ``api_shim.wsgi:application``, which builds the App from
the POOLQ_* environment, so the settings this process resolved are passed down as
environment variables. Connections are kept alive; WSGI calls run on a pool of
``POOLQ_API_THREADS`` threads per process.

The server of tails runs in a child process (granian's ASGI interface, one worker), started
first and stopped last; it also ends by itself when this process is gone (kill -9).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from granian import Granian
from granian.constants import Interfaces

from poolq.embedded import free_port
from poolq.logconfig import granian_log_config
from poolq.settings import Settings

TAIL_WORKERS = 1  # tails are few and mostly wait; POOLQ_MAX_LOG_TAILS bounds them per worker
TAILS_START_S = 30.0


def serve(settings: Settings, *, workers: int | None = None, threads: int | None = None) -> None:
    os.environ["POOLQ_AUTH"] = settings.auth_mode
    os.environ["POOLQ_HOST"] = settings.host
    if settings.redis_url:
        os.environ["POOLQ_REDIS_URL"] = settings.redis_url
    os.environ["POOLQ_DATA_DIR"] = str(settings.data_dir)
    if threads:
        os.environ["POOLQ_API_THREADS"] = str(threads)
    tails = None
    if settings.api_websockets:
        port = settings.api_tail_port or free_port(settings.host)
        os.environ["POOLQ_API_TAIL_PORT"] = str(port)  # the workers redirect tails there
        spawn = multiprocessing.get_context("spawn")
        tails = spawn.Process(target=serve_tails, args=(settings.host, port, os.getpid()), name="poolq-api-tails")
        tails.start()
        wait_listening(settings.host, port, tails)  # once the API answers, so do tails
    try:
        Granian(
            "api_shim.wsgi:application",
            address=settings.host,
            port=settings.port,
            interface=Interfaces.WSGI,
            workers=workers or settings.api_workers,
            blocking_threads=threads or settings.api_threads,
            log_access=False,
            log_dictconfig=granian_log_config(),
            respawn_failed_workers=True,
        ).serve()
    finally:
        if tails is not None:
            tails.terminate()
            tails.join(10)


def serve_tails(host: str, port: int, parent: int) -> None:
    """The server of tails (a child process of ``serve``'s)."""
    when_orphaned(parent, lambda: os.kill(os.getpid(), signal.SIGTERM))  # granian stops its worker
    Granian(
        "api_shim.asgi:application",
        address=host,
        port=port,
        interface=Interfaces.ASGINL,
        workers=TAIL_WORKERS,
        blocking_threads=1,  # the event loop's; the app's threads are Front's own
        websockets=True,
        log_access=False,
        log_dictconfig=granian_log_config(),
        respawn_failed_workers=True,
    ).serve()


def when_orphaned(parent: int, end: Callable[[], object]) -> None:
    """Call ``end`` once ``parent`` is no longer this process's parent: it died, kill -9 included.
    granian's workers do not watch their master, and would go on holding its port."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        end()

    threading.Thread(target=watch, name="poolq-watch-parent", daemon=True).start()


def wait_listening(host: str, port: int, tails: multiprocessing.process.BaseProcess) -> None:
    """Return once the server of tails accepts connections; exit if it could not start."""
    deadline = time.monotonic() + TAILS_START_S
    while time.monotonic() < deadline and tails.is_alive():
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    tails.terminate()
    raise SystemExit(
        f"poolq api: the server of log tails did not start on {host}:{port} (POOLQ_API_TAIL_PORT); see above"
    )
