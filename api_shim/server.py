"""Serve the WSGI app with granian, the faster server measured (BENCHMARKS.md).

Each worker process imports ``api_shim.wsgi:application``, which builds the App from
the POOLQ_* environment, so the settings this process resolved are passed down as
environment variables. Connections are kept alive; WSGI calls run on a pool of
``POOLQ_API_THREADS`` threads per process.
"""

from __future__ import annotations

import os

from granian import Granian
from granian.constants import Interfaces

from poolq.logconfig import granian_log_config
from poolq.settings import Settings


def serve(settings: Settings, *, workers: int | None = None, threads: int | None = None) -> None:
    os.environ["POOLQ_AUTH"] = settings.auth_mode
    os.environ["POOLQ_HOST"] = settings.host
    if settings.redis_url:
        os.environ["POOLQ_REDIS_URL"] = settings.redis_url
    os.environ["POOLQ_DATA_DIR"] = str(settings.data_dir)
    if threads:
        os.environ["POOLQ_API_THREADS"] = str(threads)
    if settings.api_websockets:
        # ASGI: the app's threads are Front's own (api_shim/front.py); granian's one runs the loop.
        target, interface, blocking = "api_shim.asgi:application", Interfaces.ASGINL, 1
    else:
        target, interface, blocking = "api_shim.wsgi:application", Interfaces.WSGI, threads or settings.api_threads
    Granian(
        target,
        address=settings.host,
        port=settings.port,
        interface=interface,
        workers=workers or settings.api_workers,
        blocking_threads=blocking,
        websockets=settings.api_websockets,
        log_access=False,
        log_dictconfig=granian_log_config(),
        respawn_failed_workers=True,
    ).serve()
