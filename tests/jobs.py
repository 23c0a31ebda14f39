"""Reading jobs back through the in-process app, for the tests that wait on them."""

from __future__ import annotations

from typing import Any

from poolq.model import TERMINAL_STATUSES
from tests.procs import wait_for
from tests.wsgi import call

SETTLE_S = 30.0  # how long a job may take to reach the state a test waits for, on a busy machine


def record(app: Any, submission_id: str, tenant: str | None = None) -> dict[str, Any]:
    """GET /api/jobs/{id}, which must answer 200."""
    result = call(app, "GET", f"/api/jobs/{submission_id}", headers={"X-Tenant-Id": tenant} if tenant else {})
    assert result.status == 200, result.body
    return dict(result.json)


def wait_status(
    app: Any, submission_id: str, *statuses: str, timeout: float = SETTLE_S, tenant: str | None = None
) -> dict[str, Any]:
    """Poll until the job's status is one of ``statuses``; fail early if it ends otherwise."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(record(app, submission_id, tenant))
        if seen["status"] in TERMINAL_STATUSES and seen["status"] not in statuses:
            raise AssertionError(f"job {submission_id} ended {seen['status']} ({seen['message']}), wanted {statuses}")
        return seen["status"] in statuses

    wait_for(reached, timeout, what=f"job {submission_id} to be {'/'.join(statuses)}")
    return seen
