"""Log format for every poolq process: text, or one JSON object per line (POOLQ_LOG_FORMAT=json)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line, UTC times, for log collectors."""

    converter = time.gmtime  # type: ignore[assignment]  # UTC times

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def json_logs() -> bool:
    return os.environ.get("POOLQ_LOG_FORMAT", "text") == "json"


def configure_logging() -> None:
    handler = logging.StreamHandler()
    if json_logs():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def granian_log_config() -> dict[str, Any] | None:
    """granian's own logging (its dictConfig), in JSON when poolq's is."""
    if not json_logs():
        return None
    json_formatter = {"()": "poolq.logconfig.JsonFormatter"}
    return {"formatters": {"generic": json_formatter, "access": json_formatter}}
