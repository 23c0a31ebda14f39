"""GET /metrics: Prometheus text format, read from Redis at scrape time.

Every figure comes from Redis (counters the Lua scripts keep, the tenants' status
counts, the node inventory), so any API process answers for the whole service and
nothing needs prometheus_client's multiprocess mode under several server processes.
"""

from __future__ import annotations

from typing import Any, Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api_shim.http import Request, Response
from poolq import keys
from poolq.model import PLACEMENT_LATENCY_BUCKETS_MS, JobStatus
from poolq.nodes import describe_nodes
from poolq.redis_io import redis_errors
from poolq.store import Submitted

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RedisCollector:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def collect(self) -> Iterator[Any]:
        stats = self.redis.hgetall(keys.STATS)
        yield from self._submissions(stats)
        yield from self._placement(stats)
        yield from self._jobs()
        yield from self._queue()
        yield from self._nodes()

    def _submissions(self, stats: dict[str, str]) -> Iterator[Any]:
        submissions = CounterMetricFamily(
            "poolq_submissions", "Job submissions by tenant and outcome", labels=["tenant", "outcome"]
        )
        failures = CounterMetricFamily(
            "poolq_scheduling_failures", "Jobs failed at their scheduling deadline, by reason", labels=["reason"]
        )
        for field, value in stats.items():
            kind, _, rest = field.partition(":")
            if kind == "submissions":
                tenant, _, code = rest.rpartition(":")
                submissions.add_metric([tenant, Submitted.label_of(code)], float(value))
            elif kind == "schedule_failures":
                failures.add_metric([rest], float(value))
        invalid = CounterMetricFamily("poolq_invalid_messages", "Invalid poolq.submit queue messages")
        invalid.add_metric([], float(stats.get("invalid_messages", 0)))
        yield from (submissions, failures, invalid)

    def _placement(self, stats: dict[str, str]) -> Iterator[Any]:
        buckets = [(str(le / 1000), float(stats.get(f"placement_le:{le}", 0))) for le in PLACEMENT_LATENCY_BUCKETS_MS]
        count = float(stats.get("placement_count", 0))
        histogram = HistogramMetricFamily("poolq_placement_latency_seconds", "Submission to reservation")
        histogram.add_metric([], buckets + [("+Inf", count)], sum_value=float(stats.get("placement_sum_ms", 0)) / 1000)
        yield histogram

    def _jobs(self) -> Iterator[Any]:
        tenants = sorted(self.redis.smembers(keys.TENANTS))
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hgetall(keys.tenant_counts(tenant))
        totals = {status.value: 0 for status in JobStatus}
        for counts in pipe.execute():
            for status, value in counts.items():
                totals[status] = totals.get(status, 0) + int(value)
        jobs = GaugeMetricFamily("poolq_jobs", "Jobs kept in Redis, by status", labels=["status"])
        for status, value in sorted(totals.items()):
            jobs.add_metric([status], float(value))
        yield jobs

    def _queue(self) -> Iterator[Any]:
        sigs = [*self.redis.zrange(keys.SHAPES_READY, 0, -1), *self.redis.zrange(keys.SHAPES_BLOCKED, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for sig in sigs:
            pipe.zcard(keys.shape_queue(sig))
        pipe.zcard(keys.CLAIMED)
        depths = pipe.execute()
        queue = GaugeMetricFamily("poolq_queue_depth", "Jobs waiting for placement (claimed ones included)")
        queue.add_metric([], float(sum(depths)))
        yield queue

    def _nodes(self) -> Iterator[Any]:
        nodes = describe_nodes(self.redis)
        states = GaugeMetricFamily("poolq_nodes", "Nodes by state", labels=["pool", "state"])
        capacity = GaugeMetricFamily(
            "poolq_pool_capacity", "Capacity of a pool's live nodes", labels=["pool", "resource"]
        )
        reserved = GaugeMetricFamily(
            "poolq_pool_reserved", "Reserved on a pool's live nodes", labels=["pool", "resource"]
        )
        by_state: dict[tuple[str, str], int] = {}
        sums: dict[str, dict[tuple[str, str], float]] = {"capacity": {}, "reserved": {}}
        for node in nodes:
            state = "draining" if node["draining"] else node["state"] or "unknown"
            by_state[(node["pool"], state)] = by_state.get((node["pool"], state), 0) + 1
            if node["alive"]:
                for part in ("capacity", "reserved"):
                    for resource, amount in node[part].items():
                        key = (node["pool"], resource)
                        sums[part][key] = sums[part].get(key, 0) + amount
        for (pool, state), count in sorted(by_state.items()):
            states.add_metric([pool, state], float(count))
        for (pool, resource), amount in sorted(sums["capacity"].items()):
            capacity.add_metric([pool, resource], float(amount))
        for (pool, resource), amount in sorted(sums["reserved"].items()):
            reserved.add_metric([pool, resource], float(amount))
        yield from (states, capacity, reserved)


@redis_errors("the metrics read")
def _scrape(client: redis.Redis) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client))  # type: ignore[arg-type]
    return generate_latest(registry)


class Metrics:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def metrics(self, request: Request) -> Response:
        return Response(200, _scrape(self.redis), [("Content-Type", CONTENT_TYPE)])
