"""Whether the service can place jobs: what ``GET /healthz`` and ``poolq up`` report.

Three components, each read from Redis with Redis's clock:

- ``redis``: it answers;
- ``placement_workers``: placement workers that beat within ``POOLQ_INTAKE_LEASE_S``
  (every placement worker beats as a consumer of the poolq.submit queue at least once a
  second, ``poolq:intake:consumers``);
- ``nodes``: nodes that can take a job: live, not drained, and (for an agent's node) a
  heartbeat within ``POOLQ_NODE_TTL_S``, so that a node whose agent died counts as gone
  even when no placement worker is left to declare it lost.

The service can place jobs when all three are ``ok``.
"""

from __future__ import annotations

from typing import Any

import redis

from poolq import keys
from poolq.redis_io import now_ms
from poolq.settings import Settings

OK = "ok"
DOWN = "unavailable"
UNKNOWN = "unknown"


def check(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """``{"status": "ok" | "unavailable", "components": {name: {"status": …, …}}}``, with
    ``error`` when not ok; never raises."""
    components: dict[str, dict[str, Any]] = {}
    try:
        now = now_ms(client)
    except redis.RedisError as exc:
        components["redis"] = {"status": DOWN, "error": f"redis does not answer: {exc}"}
        components["placement_workers"] = {"status": UNKNOWN}
        components["nodes"] = {"status": UNKNOWN}
        return _report(components)
    components["redis"] = {"status": OK}
    try:
        components["placement_workers"] = _workers(client, settings, now)
        components["nodes"] = _nodes(client, settings, now)
    except redis.RedisError as exc:
        components["redis"] = {"status": DOWN, "error": f"redis failed a read: {exc}"}
        components.setdefault("placement_workers", {"status": UNKNOWN})
        components.setdefault("nodes", {"status": UNKNOWN})
    return _report(components)


def _report(components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The answer; when a component is not ok, ``error`` says what is missing, as every
    error answer of the API does."""
    missing = [part["error"] for part in components.values() if part["status"] == DOWN]
    if not missing:
        return {"status": OK, "components": components}
    return {"status": DOWN, "error": "; ".join(missing), "components": components}


def _workers(client: redis.Redis, settings: Settings, now: int) -> dict[str, Any]:
    since = now - int(settings.intake_lease_s * 1000)
    live = int(client.zcount(keys.INTAKE_CONSUMERS, since, "+inf"))
    if live:
        return {"status": OK, "live": live}
    return {"status": DOWN, "live": 0, "error": "no live placement worker: start one with `poolq worker`"}


def _nodes(client: redis.Redis, settings: Settings, now: int) -> dict[str, Any]:
    heartbeats = dict(client.zrange(keys.HEARTBEATS, 0, -1, withscores=True))
    ids = sorted(client.smembers(keys.NODES))
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hmget(keys.node(node_id), ["state", "drained", "kind"])
    since = now - settings.node_ttl_s * 1000
    live = schedulable = 0
    for node_id, (state, drained, kind) in zip(ids, pipe.execute()):
        beat = heartbeats.get(node_id)
        if state != "live" or (kind == "agent" and (beat is None or beat < since)):
            continue
        live += 1
        schedulable += (drained or "0") == "0"
    if schedulable:
        return {"status": OK, "live": live, "schedulable": schedulable}
    why = "every live node is drained" if live else "no live node: start a node agent with `poolq node`"
    return {"status": DOWN, "live": live, "schedulable": 0, "error": why}
