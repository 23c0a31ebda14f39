"""The test kit: what tests share instead of copying it.

- units and a job that fits anywhere (``MiB``, ``GiB``, ``JOB``);
- one functional deadline, ``SETTLE_S``: how long something a test waits for may take on
  a busy two-core machine running other tests in parallel (a test that needs longer
  passes its own timeout);
- requests through the in-process WSGI app (``post``, ``submit``, ``submit_batch``,
  ``record``, ``wait_status``, ``wait_record``, ``stop``);
- static nodes (``add_node``), and waiting for a Celery worker process (``wait_ready``);
- ``Placement``: a placement worker's scheduler and periodic duties run by a thread of the
  test's own process (as arq's burst worker and dramatiq's ``join`` run theirs), for the
  tests that need placement to happen but are not about the ``poolq worker`` process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis

from poolq import keys, queues
from poolq.errors import Unavailable
from poolq.messaging import celery_waker
from poolq.model import TERMINAL_STATUSES
from poolq.nodes import NodeAdmin, capacity_of
from poolq.redis_io import connect
from poolq.settings import Settings
from poolq.store import JobStore
from tests.procs import Process, wait_for
from tests.wsgi import Result, call
from worker.duties import Duties
from worker.intake import Intake
from worker.scheduler import Scheduler

__all__ = [
    "CELERY_READY", "GiB", "JOB", "KiB", "MiB", "Placement", "SETTLE_S", "START_S", "TERMINAL_STATUSES", "add_node",
    "is_placed", "post", "record", "stop", "submit", "submit_batch", "wait_ready", "wait_record", "wait_status",
]

log = logging.getLogger("tests.placement")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
JOB = {"entrypoint": "true", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_num_cpus": 1, "entrypoint_memory": 128 * MiB}

SETTLE_S = 60.0  # how long what a test waits for may take, on two cores shared with other tests
START_S = 90.0  # how long a poolq process may take to come up on such a machine
CELERY_READY = " ready."  # what a Celery worker logs once it consumes its queues


# -- requests through the in-process app ------------------------------------------------


def job_headers(*, tenant: str | None = None, label: str | None = None, timeout_ms: int | None = None,
                headers: dict[str, str] | None = None) -> dict[str, str]:
    """poolq's request headers: X-Tenant-Id, X-Pool-Label, X-Schedule-Timeout-Ms (only those given)."""
    found: dict[str, str] = {}
    if tenant is not None:
        found["X-Tenant-Id"] = tenant
    if label is not None:
        found["X-Pool-Label"] = label
    if timeout_ms is not None:
        found["X-Schedule-Timeout-Ms"] = str(timeout_ms)
    return {**found, **(headers or {})}


def post(app: Any, body: Any = JOB, *, tenant: str | None = None, label: str | None = None,
         timeout_ms: int | None = None, headers: dict[str, str] | None = None) -> Result:
    """POST /api/jobs; the answer, whatever it is."""
    return call(app, "POST", "/api/jobs", body,
                headers=job_headers(tenant=tenant, label=label, timeout_ms=timeout_ms, headers=headers))


def submit(app: Any, body: dict[str, Any] | None = None, *, tenant: str | None = None, label: str | None = None,
           timeout_ms: int | None = None, headers: dict[str, str] | None = None, **fields: Any) -> str:
    """POST /api/jobs (``body``, JOB by default, with ``fields`` on top), which must answer
    200; the submission id."""
    result = post(app, {**(JOB if body is None else body), **fields}, tenant=tenant, label=label,
                  timeout_ms=timeout_ms, headers=headers)
    assert result.status == 200, result.body
    return str(result.json["submission_id"])


def submit_batch(app: Any, bodies: list[Any], *, tenant: str | None = None, timeout_ms: int | None = None,
                 headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """POST /api/jobs/batch, which must answer 200; the per-item results."""
    result = call(app, "POST", "/api/jobs/batch", {"jobs": bodies},
                  headers=job_headers(tenant=tenant, timeout_ms=timeout_ms, headers=headers))
    assert result.status == 200, result.body[:500]
    return list(result.json["results"])


def record(app: Any, submission_id: str, tenant: str | None = None) -> dict[str, Any]:
    """GET /api/jobs/{id}, which must answer 200."""
    result = call(app, "GET", f"/api/jobs/{submission_id}", headers=job_headers(tenant=tenant))
    assert result.status == 200, result.body
    return dict(result.json)


def stop(app: Any, submission_id: str, tenant: str | None = None) -> Result:
    """POST /api/jobs/{id}/stop; the answer."""
    return call(app, "POST", f"/api/jobs/{submission_id}/stop", headers=job_headers(tenant=tenant))


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


def wait_record(app: Any, submission_id: str, predicate: Callable[[dict[str, Any]], bool], what: str, *,
                timeout: float = SETTLE_S, tenant: str | None = None) -> dict[str, Any]:
    """Poll the job until ``predicate(record)``; that record."""

    def check() -> dict[str, Any] | None:
        found = record(app, submission_id, tenant)
        return found if predicate(found) else None

    return wait_for(check, timeout=timeout, interval=0.05, what=f"{submission_id} {what}")  # type: ignore[return-value]


def start(store: JobStore, job_ref: str, node_id: str) -> None:
    """What a node agent does when it starts a job placed on its node (start.lua)."""
    tenant = keys.split_ref(job_ref)[0]
    code = store.scripts.start(
        keys=[keys.job(job_ref), keys.node_inbox(node_id), keys.tenant_counts(tenant), keys.limits(tenant)],
        args=[job_ref, node_id, f"running on node {node_id}", 1, ""],
    )
    assert code[0] == 1, code


def is_placed(found: dict[str, Any]) -> bool:
    """Placed on a static node: still PENDING (no agent starts it), with its node."""
    return found["status"] == "PENDING" and found["driver_node_id"] is not None


# -- nodes and processes ------------------------------------------------------------------


def add_node(admin: NodeAdmin, node_id: str, cpus: Any = 8, memory: int = 64 * GiB, *, pool: str = "p",
             labels: dict[str, str | None] | None = None, gpus: Any = 0, resources: dict[str, Any] | None = None,
             kind: str = "static") -> None:
    """A node without an agent (``kind="static"``: live until removed; placed jobs stay PENDING)."""
    admin.upsert(node_id, pool=pool, labels=labels or {}, capacity=capacity_of(cpus, memory, gpus, resources or {}),
                 kind=kind, create=kind == "static")


def wait_ready(proc: Process, what: str | None = None, timeout: float = START_S) -> None:
    """Wait until the Celery worker inside the process (``poolq worker`` or ``poolq node``)
    consumes its queues."""
    what = what or proc.name
    wait_for(lambda: CELERY_READY in proc.output() or not proc.alive(), timeout, 0.1, what=f"{what} to be ready")
    assert proc.alive(), f"{what} exited:\n{proc.output()[-3000:]}"


# -- placement in the test's process --------------------------------------------------------

POLL_S = 0.02  # how often the placement thread looks for a wake-up
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, Unavailable)  # retried, as a worker retries them


class Placement:
    """What a ``poolq worker`` runs, in threads of the test's process: its ``Scheduler``
    placing when woken, its ``Duties`` ticking every ``duty_interval_s`` and, with
    ``intake``, its consumer of the ``poolq.submit`` queue. Nothing of it is faked: the
    same objects on the same Redis, built from the same ``Settings`` (POOLQ_* variables
    go through ``Settings.from_env``, as the command reads them).

    A wake-up is what the wake flag says (``poolq:wake:poolq.placement``, set by every
    path that sends one, coalesced as the Celery messages are): the thread places when it
    is set, and again while a call still found work. The Celery messages on the placement
    queue are dropped as they are acted on, as a worker's consumer would take them (so
    that they do not pile up in Redis). Losing Redis is logged and retried, as the worker
    does; any other error (a script's error reply among them) fails the test at ``stop()``.
    """

    def __init__(self, settings: Settings, *, intake: bool = False):
        self.settings = settings
        self.store = JobStore(connect(settings), settings, celery_waker(settings))
        self.redis: redis.Redis = self.store.redis
        self.scheduler = Scheduler(self.store)
        self.intake = Intake(self.store) if intake else None
        self.duties = Duties(self.store, self.scheduler, intake=self.intake)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Placement:
        targets: list[tuple[str, Callable[[], None]]] = [("placement", self._place), ("duties", self._tick)]
        if self.intake is not None:
            intake = self.intake
            targets.append(("intake", lambda: intake.run(self._stop)))
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"test-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _guarded(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except TRANSIENT as exc:
            log.warning("in-process placement lost Redis: %s", exc)
        except Exception as exc:
            log.exception("in-process placement failed")
            self.errors.append(exc)
        return None

    def _place(self) -> None:
        more = True  # what already waits is placed at start
        while not self._stop.is_set():
            if more or self._guarded(self._woken):
                more = bool(self._guarded(self.scheduler.place_waiting))
            self._stop.wait(POLL_S)

    def _woken(self) -> bool:
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.wake(queues.PLACEMENT))
        pipe.delete(queues.PLACEMENT)  # the messages of the wake-ups acted on
        return bool(pipe.execute()[0])

    def _tick(self) -> None:
        while not self._stop.wait(self.settings.duty_interval_s):
            self._guarded(self.duties.tick)

    def settle(self, timeout: float = SETTLE_S) -> int:
        """Place from the calling thread until a call finds nothing left to claim (jobs
        that fit are placed, those that do not wait with their reasons); returns how many
        jobs were handled. Rounds are one at a time per scheduler, so this waits for the
        thread's round, if one is under way."""
        deadline = time.monotonic() + timeout
        handled = 0
        while True:
            done = self.scheduler.place_waiting()
            handled += done
            if not done:
                return handled
            assert time.monotonic() < deadline, f"placement still found work after {timeout}s"

    def stop(self) -> None:
        """Stop and join the threads; fail if any of them raised."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        alive = [t.name for t in self._threads if t.is_alive()]
        if self.intake is not None:
            self.intake.leave()
        assert not alive, f"in-process placement threads did not stop: {alive}"
        assert not self.errors, f"in-process placement raised: {self.errors!r}"
