"""Serve the WSGI app with gunicorn, configured from poolq's settings.

gunicorn's threaded worker keeps client connections alive (batch producers reuse
them); each worker process builds its own App, and with it its own Redis pool.
"""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from api_shim.app import App
from poolq.settings import Settings


class Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, *, workers: int | None = None, threads: int | None = None):
        self.settings = settings
        self.options = {
            "bind": f"{_bracket(settings.host)}:{settings.port}",
            "workers": workers or settings.api_workers,
            "worker_class": "gthread",
            "threads": threads or settings.api_threads,
            "keepalive": 30,
            "timeout": 60,
            "graceful_timeout": 10,
            # Request lines of 8 KiB and more: `GET /api/jobs?ids=` with 100 ids.
            "limit_request_line": 16384,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "proc_name": "poolq-api",
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return App(self.settings)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(settings: Settings, **kwargs: Any) -> None:
    Server(settings, **kwargs).run()
