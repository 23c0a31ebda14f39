"""GET /metrics: Prometheus text format, read from Redis at scrape time.

Every figure comes from Redis (counters the Lua scripts keep, the request counts every
API process adds about once a second, the tenants' status counts, the shapes' queues,
the node inventory), so any API process answers for the whole service and nothing
needs prometheus_client's multiprocess mode under several server processes. The
series are listed in docs/operations.md ("Metrics and logs").
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api_shim.http import Request, Response
from api_shim.request_metrics import LATENCY_BUCKETS_MS
from poolq import keys
from poolq.model import PLACEMENT_LATENCY_BUCKETS_MS, RUN_DURATION_BUCKETS_MS, JobStatus
from poolq.nodes import describe_nodes
from poolq.redis_io import redis_errors
from poolq.schemas import UNUSE_ANTI_OTHER_LABELS
from poolq.store import Submitted

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# poolq_queue_waiting has a series per (pool label, tenant) pair with jobs in line: the
# largest this many are shown, the rest summed under OTHER (which no tenant can be named).
MAX_QUEUE_SERIES = 100
OTHER = "(other)"


def _seconds(ms: int) -> str:
    return str(ms / 1000)


def _cumulative(per_bucket: dict[str, float], bounds_ms: Iterable[int]) -> list[tuple[str, float]]:
    """Buckets counted one per observation ("<ms>" or "inf") as Prometheus's cumulative ones."""
    running, buckets = 0.0, []
    for le in bounds_ms:
        running += per_bucket.get(str(le), 0)
        buckets.append((_seconds(le), running))
    buckets.append(("+Inf", running + per_bucket.get("inf", 0)))
    return buckets


def pool_label_of(shape: dict[str, Any]) -> str:
    """A shape's affinity as X-Pool-Label spells it ("" for none)."""
    terms = [key if value is None else f"{key}={value}" for key, value in shape.get("terms", [])]
    if shape.get("anti"):
        terms.append(UNUSE_ANTI_OTHER_LABELS)
    return ",".join(terms)


class RedisCollector:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def collect(self) -> Iterator[Any]:
        stats = self.redis.hgetall(keys.STATS)
        yield from self._requests(self.redis.hgetall(keys.HTTP_STATS))
        yield from self._submissions(stats)
        yield from self._placement(stats)
        yield from self._runs(stats)
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

    def _requests(self, stats: dict[str, str]) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "poolq_api_requests", "API requests by method, route and status", labels=["method", "route", "status"]
        )
        per_bucket: dict[tuple[str, str], dict[str, float]] = {}
        sums: dict[tuple[str, str], float] = {}
        for field, value in sorted(stats.items()):
            kind, *series, last = field.split(";")  # (api_shim.request_metrics spells them)
            if kind == "n" and len(series) == 2:
                requests.add_metric([*series, last], float(value))
            elif kind == "le" and len(series) == 2:
                per_bucket.setdefault((series[0], series[1]), {})[last] = float(value)
            elif kind == "sum_us" and len(series) == 1:
                sums[(series[0], last)] = float(value) / 1_000_000
        latency = HistogramMetricFamily(
            "poolq_api_request_duration_seconds", "API request latency, by method and route", labels=["method", "route"]
        )
        for pair, buckets in sorted(per_bucket.items()):
            latency.add_metric(list(pair), _cumulative(buckets, LATENCY_BUCKETS_MS), sum_value=sums.get(pair, 0.0))
        yield from (requests, latency)

    def _placement(self, stats: dict[str, str]) -> Iterator[Any]:
        # Cumulative as reserve.lua keeps them; a bucket added after placements were
        # counted starts at 0, so each is shown at least as high as the one below it.
        buckets, below = [], 0.0
        for le in PLACEMENT_LATENCY_BUCKETS_MS:
            below = max(below, float(stats.get(f"placement_le:{le}", 0)))
            buckets.append((_seconds(le), below))
        count = float(stats.get("placement_count", 0))
        histogram = HistogramMetricFamily("poolq_placement_latency_seconds", "Submission to reservation")
        histogram.add_metric([], buckets + [("+Inf", count)], sum_value=float(stats.get("placement_sum_ms", 0)) / 1000)
        yield histogram

    def _runs(self, stats: dict[str, str]) -> Iterator[Any]:
        runs: dict[str, dict[str, float]] = {}
        completed = CounterMetricFamily(
            "poolq_jobs_completed", "Jobs that ended, by status and error_type", labels=["status", "error_type"]
        )
        retried = CounterMetricFamily(
            "poolq_job_retries", "Attempts that failed and will run again, by error_type", labels=["error_type"]
        )
        for field, value in sorted(stats.items()):
            kind, _, rest = field.partition(":")
            if kind == "run_le":
                status, _, bucket = rest.partition(":")
                runs.setdefault(status, {})[bucket] = float(value)
            elif kind == "completed":
                status, _, error_type = rest.partition(":")
                completed.add_metric([status, error_type], float(value))
            elif kind == "retried":
                retried.add_metric([rest], float(value))
        histogram = HistogramMetricFamily(
            "poolq_job_run_duration_seconds",
            "How long attempts ran (RUNNING to their end), by how they ended",
            labels=["status"],
        )
        for status, buckets in sorted(runs.items()):
            total = float(stats.get(f"run_sum_ms:{status}", 0)) / 1000
            histogram.add_metric([status], _cumulative(buckets, RUN_DURATION_BUCKETS_MS), sum_value=total)
        yield from (histogram, completed, retried)

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
            pipe.hget(keys.shape(sig), "spec")
        pipe.zcard(keys.CLAIMED)
        answers = pipe.execute()
        claimed = answers.pop()
        waiting: dict[tuple[str, str], int] = {}
        for depth, spec in zip(answers[0::2], answers[1::2]):
            if depth and spec:  # a shape forgotten meanwhile has no spec, and no jobs
                shape = json.loads(spec)
                pair = (pool_label_of(shape), shape["tenant"])
                waiting[pair] = waiting.get(pair, 0) + depth
        queue = GaugeMetricFamily("poolq_queue_depth", "Jobs waiting for placement (claimed ones included)")
        queue.add_metric([], float(sum(answers[0::2]) + claimed))
        by_pair = GaugeMetricFamily(
            "poolq_queue_waiting",
            f"Jobs in line for placement, by the pool label they ask for and tenant (the {MAX_QUEUE_SERIES} largest)",
            labels=["pool_label", "tenant"],
        )
        largest = sorted(waiting.items(), key=lambda item: (-item[1], item[0]))
        for (pool_label, tenant), depth in largest[:MAX_QUEUE_SERIES]:
            by_pair.add_metric([pool_label, tenant], float(depth))
        if len(largest) > MAX_QUEUE_SERIES:
            by_pair.add_metric([OTHER, OTHER], float(sum(depth for _, depth in largest[MAX_QUEUE_SERIES:])))
        yield from (queue, by_pair)

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
    """``flush`` first adds this process's request counts, so that a scrape includes them."""

    def __init__(self, client: redis.Redis, flush: Callable[[], None] = lambda: None):
        self.redis, self.flush = client, flush

    def metrics(self, request: Request) -> Response:
        self.flush()
        return Response(200, _scrape(self.redis), [("Content-Type", CONTENT_TYPE)])
