"""Per-tenant limits, in Redis so that a change is effective at once (docs/operations.md).

Two hashes, so that a limit can never be mistaken for a resource of the same name:
``poolq:quota:<tenant>`` holds integer limits on what the tenant's placed and running
jobs may hold (resource names as placement uses them: CPU and GPU in milli-units,
memory in bytes); ``poolq:limits:<tenant>`` holds ``max_pending`` (PENDING jobs; more
is a 429 at submit), ``rate``/``burst`` (a request token bucket per tenant; over
it, 429 with Retry-After), ``runtime_limit_ms`` (for its jobs that name none) and
``schedule_timeout_ms`` (for its jobs sent without X-Schedule-Timeout-Ms),
``default_priority`` (for its jobs that name none), ``max_priority`` (a job above it
is refused at submit, so that a tenant cannot jump everyone) and ``weight`` (its fair
share of the pool against other tenants', default 1) and ``preempt`` ("1": its waiting
jobs may preempt running jobs of lower priority; absent or "0": never). A job over the running
quota waits; a job that alone exceeds it is refused at submit.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import redis

from poolq import keys
from poolq.errors import TooMany
from poolq.model import CPU, GPU, MEMORY, to_milli
from poolq.redis_io import Scripts, redis_errors
from poolq.schemas import MAX_PRIORITY, MAX_SCHEDULE_TIMEOUT_MS

CACHE_S = 1.0  # how long an API process trusts what it read of a tenant's rate limit
MAX_CACHED_TENANTS = 10_000
MAX_WEIGHT = 1e6


@redis_errors("the quota change")
def set_quota(
    client: redis.Redis,
    tenant: str,
    *,
    cpus: Decimal | None = None,
    memory: int | None = None,
    gpus: Decimal | None = None,
    resources: dict[str, Decimal] | None = None,
    max_pending: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
    runtime_limit_s: float | None = None,
    schedule_timeout_ms: int | None = None,
    default_priority: int | None = None,
    max_priority: int | None = None,
    weight: float | None = None,
    preempt: bool | None = None,
) -> dict[str, str]:
    """Set the given limits (others are left as they are); returns the tenant's quota."""
    amounts: dict[str, str] = {}
    if cpus is not None:
        amounts[CPU] = str(to_milli(cpus))
    if memory is not None:
        amounts[MEMORY] = str(memory)
    if gpus is not None:
        amounts[GPU] = str(to_milli(gpus))
    for name, amount in (resources or {}).items():
        amounts[name] = str(to_milli(amount))
    limits: dict[str, str] = {}
    if max_pending is not None:
        limits["max_pending"] = str(max_pending)
    if rate is not None:
        limits["rate"] = repr(float(rate))
        limits["burst"] = str(burst if burst is not None else max(1, int(rate)))
    elif burst is not None:
        limits["burst"] = str(burst)
    if runtime_limit_s is not None:  # the tenant's jobs that name no runtime limit (start.lua); 0: none
        if runtime_limit_s < 0:
            raise ValueError("--runtime-limit-s must be 0 (none) or more")
        limits["runtime_limit_ms"] = str(int(runtime_limit_s * 1000))
    if schedule_timeout_ms is not None:  # for its jobs sent without X-Schedule-Timeout-Ms (submit.lua)
        if not 0 <= schedule_timeout_ms <= MAX_SCHEDULE_TIMEOUT_MS:
            raise ValueError(f"--schedule-timeout-ms must be 0 (wait forever) to {MAX_SCHEDULE_TIMEOUT_MS}")
        limits["schedule_timeout_ms"] = str(schedule_timeout_ms)
    for flag, value, name in (
        ("--priority", default_priority, "default_priority"),
        ("--max-priority", max_priority, "max_priority"),
    ):
        if value is not None:  # submit.lua applies both
            if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
                raise ValueError(f"{flag} must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
            limits[name] = str(value)
    if weight is not None:  # its share of the pool against other tenants' (claim.lua)
        if not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"--weight must be above 0 and at most {MAX_WEIGHT:g}")
        limits["weight"] = repr(float(weight))
    if preempt is not None:  # read by each placement round (worker/scheduler.py)
        limits["preempt"] = "1" if preempt else "0"
    pipe = client.pipeline(transaction=True)
    if amounts:
        pipe.hset(keys.quota(tenant), mapping=amounts)
    if limits:
        pipe.hset(keys.limits(tenant), mapping=limits)
    pipe.execute()
    return get_quota(client, tenant)


@redis_errors("the quota read")
def get_quota(client: redis.Redis, tenant: str) -> dict[str, str]:
    """The tenant's resource quota and other limits, as one mapping for people to read."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.quota(tenant))
    pipe.hgetall(keys.limits(tenant))
    amounts, limits = pipe.execute()
    return {**amounts, **limits}


@redis_errors("the quota change")
def clear_quota(client: redis.Redis, tenant: str) -> None:
    client.delete(keys.quota(tenant), keys.limits(tenant), keys.rate_bucket(tenant))


class RateLimiter:
    """Checks a tenant's request rate; reads its limit at most once a second per process."""

    def __init__(self, client: redis.Redis, scripts: Scripts):
        self.redis, self.scripts = client, scripts
        self._cache: dict[str, tuple[float, float | None, int]] = {}  # bounded: see _check
        self._lock = threading.Lock()

    def check(self, tenant: str) -> None:
        """Raise TooMany (with retry_after) when the tenant is over its rate.

        When Redis does not answer (or refuses, out of memory) the check lets the
        request through: the request then fails on its own Redis call, with its own
        answer (a submit's names its id).
        """
        try:
            self._check(tenant)
        except redis.RedisError:
            return

    def _check(self, tenant: str) -> None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant)
        if cached is None or cached[0] < now:
            rate_text, burst_text = self.redis.hmget(keys.limits(tenant), ["rate", "burst"])
            cached = (now + CACHE_S, float(rate_text) if rate_text else None, int(burst_text or 1))
            with self._lock:
                if len(self._cache) >= MAX_CACHED_TENANTS:  # any X-Tenant-Id may come: stay bounded
                    self._cache.clear()
                self._cache[tenant] = cached
        _, rate, burst = cached
        if not rate:
            return
        allowed, wait_ms = self.scripts.rate_limit(
            keys=[keys.rate_bucket(tenant)], args=[rate, burst], client=self.redis
        )
        if not allowed:
            raise TooMany(
                f"rate limit of tenant {tenant} exceeded ({rate:g} requests/s)", retry_after=int(wait_ms) / 1000
            )
