"""API requests by method, route template and status, with their latency, for /metrics.

Each API process counts its requests in memory and adds them to one shared Redis hash
(``poolq:stats:http``) about once a second, in one pipelined round trip of HINCRBYs, so
that any process's /metrics answers for all of them (a second late at most) and a
request costs a dictionary update, not a Redis call. Labels are bounded: the route is
the template (``/api/jobs/{submission_id}``, ``unmatched`` for a path no route serves),
a method outside the HTTP set is ``other``, statuses are the ones the app answers.

A flush whose reply is lost is not sent again (its client does not retry), so a Redis
fault can leave the counts short by a second's requests, never counted twice; a process
that exits loses the requests of its last second.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any

import redis

from poolq import keys

log = logging.getLogger("poolq.api")

# The bounds (ms) of the latency buckets: a request held by `Prefer: wait=60`, or a
# slow upload, takes a minute or more.
LATENCY_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000)
BOUNDS_S = tuple(le / 1000 for le in LATENCY_BUCKETS_MS)
FLUSH_S = 1.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"


class RequestMetrics:
    """Counts of this process's requests, flushed to Redis by a thread that runs while
    requests come (it ends after a second without any, and the next request starts it)."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        # (method, route, status, bucket index) -> [requests, seconds]: a request costs one
        # dictionary update here; the Redis fields are spelled out once a second.
        self._pending: dict[tuple[str, str, int, int], list[Any]] = {}
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status, bisect.bisect_left(BOUNDS_S, seconds))
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                self._pending[key] = [1, seconds]
            else:
                entry[0] += 1
                entry[1] += seconds
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_while_busy, name="poolq-request-metrics", daemon=True
                )
                self._flusher.start()

    def flush(self) -> None:
        """Add what was counted since the last flush to Redis (and forget it)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        self._write(batch)

    def _flush_while_busy(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            with self._lock:
                batch, self._pending = self._pending, {}
                if not batch:
                    self._flusher = None
                    return
            self._write(batch)

    def _write(self, batch: dict[tuple[str, str, int, int], list[Any]]) -> None:
        if not batch:
            return
        fields: dict[str, int] = {}
        for (method, route, status, index), (count, seconds) in batch.items():
            series = f"{method if method in METHODS else 'other'};{route}"
            bucket = str(LATENCY_BUCKETS_MS[index]) if index < len(LATENCY_BUCKETS_MS) else "inf"
            for field, amount in (
                (f"n;{series};{status}", count),
                (f"le;{series};{bucket}", count),
                (f"sum_us;{series}", round(seconds * 1_000_000)),
            ):
                fields[field] = fields.get(field, 0) + amount
        pipe = self.redis.pipeline(transaction=False)
        for field, amount in fields.items():
            pipe.hincrby(keys.HTTP_STATS, field, amount)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("request metrics not written (%d counters dropped): %s", len(fields), exc)
