"""The baseline: the submission service a user would write in an afternoon from poolq's parts.

One plain WSGI endpoint: parse the JSON body, validate it with poolq's marshmallow
schema, publish one Celery task per job with ``send_task``, answer the id. Every
poolq submission figure in BENCHMARKS.md is also given as a ratio to this service,
measured in the same run under gunicorn and under granian (the faster counts)::

    BASELINE_REDIS_URL=redis://... python -m gunicorn -w 2 -k sync -b 127.0.0.1:P bench.baseline:application
    BASELINE_REDIS_URL=redis://... python -m granian --interface wsgi --workers 2 --port P bench.baseline:application

The tasks go to the queue ``BASELINE_QUEUE`` (default ``bench.baseline``), which no
worker consumes: the benchmark measures accepting jobs, as poolq's submit figure does.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Iterable

from celery import Celery
from marshmallow import ValidationError

from poolq.schemas import load_job_request

QUEUE = os.environ.get("BASELINE_QUEUE", "bench.baseline")
celery_app = Celery(broker=os.environ.get("BASELINE_REDIS_URL", "redis://127.0.0.1:6379/0"))

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST" or environ.get("PATH_INFO", "").rstrip("/") != "/api/jobs":
        return _answer(start_response, "404 Not Found", {"error": "not found"})
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length))
        load_job_request(body)
    except ValidationError as exc:
        return _answer(start_response, "400 Bad Request", {"error": "invalid job request", "fields": exc.messages})
    except ValueError:
        return _answer(start_response, "400 Bad Request", {"error": "the body must be JSON"})
    submission_id = body.get("submission_id") or f"app-{uuid.uuid4()}"
    celery_app.send_task("poolq.place", kwargs={"body": body, "submission_id": submission_id}, queue=QUEUE)
    return _answer(start_response, "200 OK", {"submission_id": submission_id})


def _answer(start_response: StartResponse, status: str, payload: dict[str, Any]) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
