"""/api/overview: the caller's tenant at a glance, and the service's last hour (the dashboard's
"Queue and quota" page)."""

from __future__ import annotations

from typing import Any

from api_shim.http import Request, Response
from poolq import history, keys
from poolq.model import JobStatus
from poolq.nodes import show_amounts
from poolq.redis_io import now_ms, redis_errors
from poolq.store import JobStore


class Overview:
    def __init__(self, store: JobStore):
        self.store = store

    def overview(self, request: Request) -> Response:
        return Response.json(self.read(request.tenant_or_400()))

    @redis_errors("the overview")
    def read(self, tenant: str) -> dict[str, Any]:
        client = self.store.redis
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.tenant_counts(tenant))
        pipe.hgetall(keys.quota(tenant))
        pipe.hgetall(keys.tenant_usage(tenant))
        pipe.hget(keys.limits(tenant), "max_pending")
        counts, quota, usage, max_pending = pipe.execute()
        counts = {status.value: int(counts.get(status.value) or 0) for status in JobStatus}
        pending_limit = int(max_pending) if max_pending is not None else None
        quota_answer = {
            "limits": show_amounts({name: int(amount) for name, amount in quota.items()}),
            "use": show_amounts({name: int(float(amount)) for name, amount in usage.items()}),
            # Apart from the amounts: a custom resource may be called anything, max_pending too.
            "max_pending": pending_limit,
            "pending": counts[JobStatus.PENDING.value],
        }
        return {
            "tenant": tenant,
            "counts": counts,
            "quota": quota_answer,
            "history": history.last_hour(client, now_ms(client)),
        }
