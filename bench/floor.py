"""The machine's floor and ceiling for one submission over HTTP (``python -m bench submit``):
two WSGI endpoints served exactly as the baseline is (granian, 2 workers).

- ``POST /floor/body`` reads the body and answers: what the server and the HTTP round
  trip cost, and nothing else (the ceiling for any submit route).
- ``POST /floor/evalsha`` also parses the body as JSON and makes one ``EVALSHA`` that
  stores it (expiring, so a long run cannot fill Redis): the cheapest durable submission,
  the floor of one Redis round trip per request that group commit works to get past.

    FLOOR_REDIS_URL=redis://... python -m granian --interface wsgi --workers 2 --port P bench.floor:application
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Iterable

import redis

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

client = redis.Redis.from_url(os.environ.get("FLOOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
store = client.register_script("redis.call('SET', KEYS[1], ARGV[1], 'EX', 60) return 1")


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if environ["REQUEST_METHOD"] != "POST" or path not in ("/floor/body", "/floor/evalsha"):
        return _answer(start_response, "404 Not Found", b'{"error":"not found"}')
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    submission_id = f"app-{uuid.uuid4()}"
    if path == "/floor/evalsha":
        json.loads(body)
        store(keys=[f"bench:floor:{submission_id}"], args=[body])
    return _answer(start_response, "200 OK", b'{"submission_id":"' + submission_id.encode() + b'"}')


def _answer(start_response: StartResponse, status: str, data: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
