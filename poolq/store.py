"""Jobs in Redis: turn a validated request into a stored, queued job, and read jobs back.

Both the HTTP shim and the ``poolq.submit`` queue task submit through ``JobStore``;
each state change is one Lua script (``poolq/lua``), so concurrent callers never
see half a job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from decimal import Decimal
from typing import Any, Callable, Iterable

import redis
from marshmallow import ValidationError

from poolq import keys, queues
from poolq.errors import Conflict, InvalidRequest, NotFound, Unavailable
from poolq.model import CPU, GPU, MEMORY, ErrorType, JobFields, JobStatus, canonical_number, mebibytes, render_record, to_milli
from poolq.redis_io import Scripts
from poolq.schemas import check_headers, load_job_request, normalise_submission_id
from poolq.settings import Settings

log = logging.getLogger("poolq.store")

WAKE_TTL_MS = 2000  # a wake-up lost with its message is re-sent by the sweep after this

Waker = Callable[[str], None]  # sends a wake-up task to a Celery queue


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A validated, normalised job request, ready to store."""

    tenant: str
    submission_id: str
    spec: dict[str, Any]  # the immutable part of the job record
    fingerprint: str  # identifies "the same request" for idempotent retries
    shape_sig: str
    shape: dict[str, Any]  # what placement needs: amounts, affinity terms, selector
    timeout_ms: int

    @property
    def ref(self) -> str:
        return keys.ref(self.tenant, self.submission_id)


def _redis_errors(what: str) -> Any:
    """Decorator: a Redis failure becomes Unavailable (a 503), never a 500."""

    def wrap(func: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise Unavailable(f"redis unavailable: {exc}") from exc
            except redis.ResponseError as exc:  # OOM, READONLY, MISCONF: Redis refuses writes
                raise Unavailable(f"redis refused {what}: {exc}") from exc

        inner.__name__, inner.__doc__ = func.__name__, func.__doc__
        return inner

    return wrap


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings, waker: Waker | None = None):
        self.redis = client
        self.settings = settings
        self.scripts = Scripts(client)
        self.waker = waker
        self.default_cpus = Decimal(settings.default_cpus)
        self._raw: redis.Redis | None = None

    @property
    def raw(self) -> redis.Redis:
        """A client that returns bytes, for logs and packages."""
        if self._raw is None:
            from poolq.redis_io import connect

            self._raw = connect(self.settings, decode=False)
        return self._raw

    # -- submitting ------------------------------------------------------------

    def prepare(
        self,
        body: Any,
        *,
        tenant: str | None = None,
        pool_label: str | None = None,
        schedule_timeout_ms: str | int | None = None,
        default_id: Callable[[], str] | None = None,
    ) -> NewJob:
        """Validate and normalise one request; raise InvalidRequest naming every bad field."""
        timeout_text = None if schedule_timeout_ms is None else str(schedule_timeout_ms)
        errors, tenant_id, terms, anti, timeout = check_headers(tenant, pool_label, timeout_text)
        try:
            request = load_job_request(body)
        except ValidationError as exc:
            errors.update(exc.messages)  # type: ignore[arg-type]
            request = None
        submission_id = None
        if request is not None:
            submission_id, id_errors = _submission_id(request, default_id)
            errors.update(id_errors)
        if errors or request is None or submission_id is None:
            raise InvalidRequest(errors)
        return self._normalise(request, tenant_id, submission_id, terms, anti, pool_label, timeout)

    def _normalise(
        self,
        request: dict[str, Any],
        tenant: str,
        submission_id: str,
        terms: list[tuple[str, str | None]] | None,
        anti: bool,
        pool_label: str | None,
        timeout: int | None,
    ) -> NewJob:
        cpus = request.get("entrypoint_num_cpus", self.default_cpus)
        memory = request.get("entrypoint_memory", self.settings.default_memory)
        gpus = request.get("entrypoint_num_gpus", 0)
        resources = request.get("entrypoint_resources", {})
        selector = request.get("entrypoint_label_selector", {})
        timeout_ms = self.settings.schedule_timeout_ms if timeout is None else timeout
        label = None
        if terms is not None or anti:
            label = ",".join(t.strip() for t in (pool_label or "").split(","))
        spec = {
            "submission_id": submission_id,
            "tenant_id": tenant,
            "entrypoint": request["entrypoint"],
            "metadata": request.get("metadata", {}),
            "runtime_env": request["runtime_env"],
            "entrypoint_num_cpus": canonical_number(cpus),
            "entrypoint_num_gpus": canonical_number(gpus),
            "entrypoint_memory": memory,
            "entrypoint_resources": {k: canonical_number(v) for k, v in resources.items()},
            "entrypoint_label_selector": selector,
            "pool_label": label,
        }
        fingerprint = _digest({"spec": spec, "timeout_ms": timeout_ms})
        shape = build_shape(tenant, cpus, memory, gpus, resources, terms or [], anti, selector)
        return NewJob(tenant, submission_id, spec, fingerprint, _digest(shape)[:24], shape, timeout_ms)

    @_redis_errors("the submission")
    def submit(self, job: NewJob) -> bool:
        """Store and queue the job. True if stored now, False if this exact request was
        already stored (an idempotent retry); Conflict if another request holds the id."""
        code, wake = self.scripts.submit(keys=_submit_keys(job), args=_submit_args(job))
        return self._outcome(job, code, wake)

    @_redis_errors("the submissions")
    def submit_many(self, jobs: Iterable[NewJob]) -> list[bool | Conflict]:
        """Store many jobs in one round trip; per job, like ``submit``."""
        jobs = list(jobs)
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            self.scripts.submit(keys=_submit_keys(job), args=_submit_args(job), client=pipe)
        outcomes: list[bool | Conflict] = []
        for job, (code, wake) in zip(jobs, pipe.execute()):
            try:
                outcomes.append(self._outcome(job, code, wake))
            except Conflict as exc:
                outcomes.append(exc)
        return outcomes

    def _outcome(self, job: NewJob, code: int, wake: int) -> bool:
        if code == 2:
            raise Conflict(f"submit job has already exist, submissionId: {job.submission_id}")
        if wake:
            self.wake(queues.PLACEMENT)
        return code == 0

    def wake(self, queue: str) -> None:
        """Send a wake-up; a failure is logged, not raised: the sweep re-sends it."""
        if self.waker is None:
            return
        try:
            self.waker(queue)
        except Exception:  # the job is stored and queued either way
            log.warning("could not send a wake-up to %s; the sweep will", queue, exc_info=True)

    # -- ending ----------------------------------------------------------------

    @_redis_errors("the status change")
    def finish(
        self,
        job_ref: str,
        status: JobStatus,
        *,
        error_type: ErrorType | None = None,
        message: str = "",
        exit_code: int | None = None,
        from_statuses: Iterable[JobStatus] = (JobStatus.PENDING, JobStatus.RUNNING),
        expected_node: str | None = None,
        deadline_passed: bool = False,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Move a job to a terminal status and release what it holds, exactly once.

        Returns False if the job is already terminal or not in ``from_statuses`` (or,
        with ``expected_node``, placed elsewhere). See ``poolq/lua/finish.lua``.
        """
        allowed = "," + ",".join(s.value for s in from_statuses) + ","
        extra_args = [item for pair in (extra or {}).items() for item in pair]
        for _ in range(5):
            node, sig = self.redis.hmget(keys.job(job_ref), [JobFields.NODE, JobFields.SHAPE])
            node = node or ""
            if expected_node is not None and node != expected_node:
                return False
            code, wake = self.scripts.finish(
                keys=[
                    keys.job(job_ref), keys.node(node), keys.node_jobs(node), keys.node_inbox(node),
                    keys.shape_queue(sig or ""), keys.DEADLINES, keys.CLAIMED, keys.TERMINAL,
                    keys.INVENTORY_LOG, keys.KICK, keys.wake(queues.PLACEMENT),
                ],
                args=[
                    job_ref, node, status.value, error_type.value if error_type else "", message,
                    "" if exit_code is None else exit_code, allowed, WAKE_TTL_MS, "1" if deadline_passed else "0",
                    *extra_args,
                ],
            )
            if code != -1:
                if wake:
                    self.wake(queues.PLACEMENT)
                return code == 1
        raise Unavailable(f"job {job_ref} kept changing while it was being ended")

    @_redis_errors("the stop")
    def stop(self, tenant: str, submission_id: str) -> bool:
        """Request a stop: True if the job was PENDING or RUNNING and is now stopping."""
        job_ref = keys.ref(tenant, submission_id)
        before = self.scripts.request_stop(keys=[keys.job(job_ref)])
        if before is None:
            raise NotFound(f"not found app, submissionId: {submission_id}")
        if before == JobStatus.PENDING:
            # Not started: end it here. If an agent starts it meanwhile, the agent sees
            # the stop flag and ends it instead.
            self.finish(job_ref, JobStatus.STOPPED, error_type=ErrorType.STOPPED_BY_USER,
                        message="stopped by user request", from_statuses=[JobStatus.PENDING])
        elif before == JobStatus.RUNNING:
            node = self.redis.hget(keys.job(job_ref), JobFields.NODE)
            if node:
                self.wake(queues.node_queue(node))
        return before in (JobStatus.PENDING, JobStatus.RUNNING)

    @_redis_errors("the removal")
    def purge(self, job_refs: list[str]) -> list[int]:
        """Remove terminal jobs (record, log, index entries); per ref 1 done, 0 not terminal, -1 absent."""
        key_list, args = [keys.TERMINAL], []
        for job_ref in job_refs:
            tenant, submission_id = keys.split_ref(job_ref)
            key_list += [keys.job(job_ref), keys.log(job_ref), keys.tenant_jobs(tenant)]
            args += [job_ref, submission_id]
        return [int(x) for x in self.scripts.purge(keys=key_list, args=args)]

    # -- reading ---------------------------------------------------------------

    @_redis_errors("the read")
    def get(self, tenant: str, submission_id: str) -> dict[str, Any]:
        """The job record, or NotFound (also for another tenant's job)."""
        job_ref = keys.ref(tenant, submission_id)
        fields = self.redis.hgetall(keys.job(job_ref))
        if not fields or JobFields.SPEC not in fields:
            raise NotFound(f"not found app, submissionId: {submission_id}")
        return render_record(fields, self._shape_of(fields))

    @_redis_errors("the log read")
    def logs(self, tenant: str, submission_id: str, offset: int | None = None) -> tuple[str, int]:
        """The output kept so far (from ``offset`` in the whole output, if given) and the
        offset just past it. Only whole UTF-8 characters are returned."""
        job_ref = keys.ref(tenant, submission_id)
        pipe = self.raw.pipeline(transaction=False)
        pipe.hget(keys.job(job_ref), JobFields.LOG_BASE)
        pipe.exists(keys.job(job_ref))
        pipe.get(keys.log(job_ref))
        base_raw, exists, data = pipe.execute()
        if not exists:
            raise NotFound(f"not found app, submissionId: {submission_id}")
        base, data = int(base_raw or 0), data or b""
        start = 0 if offset is None else min(max(offset - base, 0), len(data))
        while start < len(data) and start > 0 and data[start] & 0xC0 == 0x80:
            start += 1  # the offset fell inside a character: begin at the next one
        end = len(data) - _incomplete_tail(data)
        chunk = data[start:max(start, end)]
        return chunk.decode("utf-8", "replace"), base + start + len(chunk)

    def _shape_of(self, fields: dict[str, str]) -> dict[str, str] | None:
        """While a job waits for placement its attempts and reasons live on its shape."""
        if fields.get(JobFields.STATUS) != JobStatus.PENDING or fields.get(JobFields.NODE) or fields.get(JobFields.ATTEMPTS):
            return None
        return self.redis.hgetall(keys.shape(fields[JobFields.SHAPE]))

    @_redis_errors("the health check")
    def ping(self) -> bool:
        return bool(self.redis.ping())


def build_shape(
    tenant: str,
    cpus: Decimal | int,
    memory: int,
    gpus: Decimal | int,
    resources: dict[str, Decimal | int],
    terms: list[tuple[str, str | None]],
    anti: bool,
    selector: dict[str, str],
) -> dict[str, Any]:
    """What placement needs to know of a job; jobs with equal shapes place alike.

    ``req`` holds the integer amounts (milli-units, bytes) of every non-zero request,
    ``show`` the renderings the scheduling-failure message uses (``CPU: 3000m``).
    """
    req: dict[str, int] = {}
    show: dict[str, str] = {}
    for name, amount, rendered in (
        (CPU, to_milli(cpus), None),
        (MEMORY, int(memory), f"{mebibytes(int(memory))}MB"),
        (GPU, to_milli(gpus), _plain(gpus)),
    ):
        if amount > 0:
            req[name] = amount
            show[name] = rendered if rendered is not None else f"{amount}m"
    for name in sorted(resources):
        if to_milli(resources[name]) > 0:
            req[name] = to_milli(resources[name])
            show[name] = _plain(resources[name])
    return {
        "tenant": tenant,
        "req": req,
        "show": show,
        "terms": [[key, value] for key, value in terms],
        "anti": anti,
        "selector": dict(sorted(selector.items())),
    }


def _submission_id(request: dict[str, Any], default_id: Callable[[], str] | None) -> tuple[str | None, dict[str, list[str]]]:
    given = {}
    errors: dict[str, list[str]] = {}
    for name in ("submission_id", "job_id"):
        if name in request:
            try:
                given[name] = normalise_submission_id(request[name])
            except ValidationError as exc:
                errors[name] = list(exc.messages)  # type: ignore[arg-type]
    if errors:
        return None, errors
    if len(set(given.values())) > 1:
        return None, {"job_id": ["must equal submission_id when both are given (job_id is its deprecated alias)"]}
    if given:
        return next(iter(given.values())), {}
    return (default_id() if default_id else f"app-{uuid.uuid4()}"), {}


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character not yet complete."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


def _submit_keys(job: NewJob) -> list[str]:
    return [
        keys.job(job.ref),
        keys.tenant_jobs(job.tenant),
        keys.shape(job.shape_sig),
        keys.shape_queue(job.shape_sig),
        keys.SHAPES_READY,
        keys.SHAPES_BLOCKED,
        keys.DEADLINES,
        keys.SEQ,
        keys.wake(queues.PLACEMENT),
    ]


def _submit_args(job: NewJob) -> list[Any]:
    return [
        job.fingerprint,
        json.dumps(job.spec, separators=(",", ":"), ensure_ascii=False),
        job.shape_sig,
        json.dumps(job.shape, separators=(",", ":"), sort_keys=True),
        job.timeout_ms,
        job.submission_id,
        job.ref,
        WAKE_TTL_MS,
    ]


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, separators=(",", ":")).encode(), digest_size=16).hexdigest()


def _plain(amount: Decimal | int) -> str:
    return str(canonical_number(amount))

