"""The service's last hour: one sample every SAMPLE_S of the queue and the placement counters,
for the dashboard's charts (``GET /api/overview``).

Every placement worker's duties offer a sample each tick (worker/duties.py); the first for
a slot of SAMPLE_S seconds is kept (HSETNX of the slot in one hash), so several workers, or
a worker whose tick ran twice, keep one. The hash holds the slots of the last hour: a
sample that lands drops whatever has fallen out of it. A sample holds the cumulative
counters as they were; a reader takes the difference of neighbours, so that a sample lost
(no worker ran) widens an interval and loses nothing.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import redis

from poolq import keys
from poolq.model import PLACEMENT_LATENCY_BUCKETS_MS
from poolq.redis_io import redis_errors

SAMPLE_S = 10
KEPT_S = 3600
SLOT_MS = SAMPLE_S * 1000
SLOTS = KEPT_S // SAMPLE_S
COUNTERS = ["placement_count", *(f"placement_le:{le}" for le in PLACEMENT_LATENCY_BUCKETS_MS)]


def slot_of(now_ms: int) -> int:
    return now_ms // SLOT_MS


def waiting(client: redis.Redis) -> int:
    """Jobs waiting for placement, over every shape's line (claimed ones included)."""
    shapes = [*client.zrange(keys.SHAPES_READY, 0, -1), *client.zrange(keys.SHAPES_BLOCKED, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for sig in shapes:
        pipe.zcard(keys.shape_queue(sig))
    pipe.zcard(keys.CLAIMED)
    return sum(int(n) for n in pipe.execute())


def sample(client: redis.Redis, now_ms: int) -> bool:
    """Keep a sample for the slot of ``now_ms`` unless one is kept already; True if this one was."""
    counters = [int(value or 0) for value in client.hmget(keys.STATS, COUNTERS)]
    slot = slot_of(now_ms)
    value = json.dumps({"time": slot * SLOT_MS, "waiting": waiting(client), "counters": counters})
    if not client.hsetnx(keys.HISTORY, str(slot), value):
        return False
    if client.hlen(keys.HISTORY) > SLOTS + 1:  # about once a slot, once the hour is full
        old = [field for field in client.hkeys(keys.HISTORY) if int(field) < slot - SLOTS]
        if old:
            client.hdel(keys.HISTORY, *old)
    return True


@redis_errors("the history read")
def last_hour(client: redis.Redis, now_ms: int) -> list[dict[str, Any]]:
    """The samples of the last hour, oldest first: each interval's jobs waiting at its end,
    placements in it and their latency's p50 and p99 (the upper bound of the bucket it falls
    in, ms; None without placements, or beyond the largest bucket)."""
    last = slot_of(now_ms)
    kept = sorted((int(slot), value) for slot, value in client.hgetall(keys.HISTORY).items())
    samples = [json.loads(value) for slot, value in kept if last - SLOTS <= slot <= last]
    answer = []
    for before, after in itertools.pairwise(samples):
        deltas = [max(0, b - a) for a, b in zip(before["counters"], after["counters"])]
        placed, in_buckets = deltas[0], deltas[1:]
        answer.append(
            {
                "time": after["time"],
                "waiting": after["waiting"],
                "placed": placed,
                "latency_p50_ms": _quantile(0.5, placed, in_buckets),
                "latency_p99_ms": _quantile(0.99, placed, in_buckets),
            }
        )
    return answer


def _quantile(q: float, count: int, cumulative: list[int]) -> int | None:
    """The least bucket bound that at least ``q`` of ``count`` observations are within."""
    if count <= 0:
        return None
    for bound, within in zip(PLACEMENT_LATENCY_BUCKETS_MS, cumulative):
        if within >= q * count:
            return bound
    return None
