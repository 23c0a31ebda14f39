"""Jobs in Redis: turn a validated request into a stored, queued job, and read jobs back.

Both the HTTP shim and the ``poolq.submit`` queue task submit through ``JobStore``;
each state change is one Lua script (``poolq/lua``), so concurrent callers never
see half a job.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple

import redis
from marshmallow import ValidationError

from poolq import keys, packages, queues
from poolq.arrays import Arrays
from poolq.changes import ChangeFeed
from poolq.commit import GroupCommit
from poolq.errors import Conflict, InvalidRequest, NotFound, PoolqError, TooMany, Unavailable
from poolq.model import (
    ARRAY,
    CPU,
    GPU,
    MEMORY,
    RETRY_ON_DEFAULT,
    RUN_DURATION_BUCKETS_MS,
    TERMINAL_STATUSES,
    ErrorType,
    JobFields,
    JobStatus,
    array_status,
    canonical_number,
    render_record,
    show_amount,
    to_milli,
    utf8_bounds,
)
from poolq.redis_io import Scripts, redis_errors
from poolq.schemas import JobHeaders, check_headers, load_job_request, normalise_submission_id, parse_tenant
from poolq.settings import Settings

if TYPE_CHECKING:
    from poolq.messaging import Waker

log = logging.getLogger("poolq.store")

WAKE_TTL_MS = 2000  # a wake-up lost with its message is re-sent by the sweep after this
LIST_SCAN = 5000  # records a filtered listing reads at most per page
RUN_BUCKETS = ",".join(map(str, RUN_DURATION_BUCKETS_MS))  # finish.lua's ARGV[12]


class Submitted(enum.IntEnum):
    """submit.lua's answer; /metrics counts each per tenant (poolq:stats, under its number)."""

    ACCEPTED = 0
    DUPLICATE = 1  # the same request was already stored: an idempotent retry
    CONFLICT = 2  # another request holds the id
    TOO_MANY_PENDING = 3  # the tenant's max pending
    OVER_QUOTA = 4  # the job alone asks for more than the tenant's quota
    NO_PACKAGE = 5  # the package its working_dir names was not uploaded
    INVALID = 6  # refused before submit.lua ran (counted by count_invalid)
    OVER_PRIORITY = 7  # its priority is above the tenant's maximum
    NO_DEPENDENCY = 8  # a job it depends on does not exist in its tenant
    GANG_INCOMPLETE = 9  # a gang's last member found another member missing: the gang is not formed
    ARRAY_DEPENDENCY = 10  # it depends on an array (arrays cannot be dependencies)
    TASK_ID_TAKEN = 11  # its id is a task's of an array, or (an array) jobs hold its tasks' ids

    @classmethod
    def label_of(cls, code: str) -> str:
        """The metric label of a counted code (a name as is: counted by an earlier version)."""
        return cls(int(code)).name.lower() if code.isdigit() and int(code) in cls._value2member_map_ else code


class Ending(enum.IntEnum):
    """finish.lua's answer."""

    NO_SUCH_JOB = -2
    NODE_CHANGED = -1  # the job was placed (or moved) since the caller read it: read again
    NOT_ALLOWED = 0  # already terminal, from a status not allowed, or its deadline not reached
    MOVED = 1
    STOP_FLAGGED = 2  # a stop of a RUNNING job: its agent ends it
    RETRIED = 3  # the attempt ended; its retry policy runs the job again


READ_GROUP = 1000  # jobs that polls share one read.lua call for, at most
RECOUNT_MOST = 5000  # a recount reads this many job records at most, in one script (a few ms)


class Purged(enum.IntEnum):
    """purge.lua's answer for one job."""

    ABSENT = -1
    NOT_TERMINAL = 0
    REMOVED = 1


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A validated, normalised job request, ready to store."""

    tenant: str
    submission_id: str
    spec: dict[str, Any]  # the immutable part of the job record
    spec_json: str
    fingerprint: str  # identifies "the same request" for idempotent retries
    shape_sig: str
    shape: dict[str, Any]  # what placement needs: amounts, affinity terms, selector
    shape_json: str
    timeout_ms: int | None  # its X-Schedule-Timeout-Ms; None: the tenant's default, else the service's
    package: str  # the name of the uploaded package its working_dir names, or ""
    retry: str = ""  # its retry policy as finish.lua reads it ("attempts|OUTCOME,…|backoff ms"), or ""
    runtime_limit_ms: int = 0  # its own runtime limit, or 0 (the tenant's or the node's, if any)
    priority: int | None = None  # its own priority; None: the tenant's default, else 0
    dependencies: str = ""  # what it waits for, as submit.lua reads it: "ok|<id>,any|<id>", or ""
    gang_id: str = ""  # the gang it belongs to, or ""
    gang_role: str = ""  # "member", or "lead" for the gang's last item, which forms it (form_gangs)
    gang_members: tuple[str, ...] = ()  # the lead's: refs of the gang's other members
    array_count: int = 0  # an array of this many tasks; 0: one job
    task_template: str = ""  # an array's task spec text, cut where the index goes (JSON list)

    @property
    def ref(self) -> str:
        return keys.ref(self.tenant, self.submission_id)


class LogRead(NamedTuple):
    """A follower's read of a job's output (``JobStore.log_since``)."""

    data: bytes  # the new output, whole UTF-8 characters unless the job has ended
    offset: int  # where the next read starts, in the job's whole output
    ended: bool  # the job is terminal: nothing follows this read


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings, waker: Waker | None = None):
        self.redis = client
        self.settings = settings
        self.scripts = Scripts(client)
        self.waker = waker
        self.default_cpus = Decimal(settings.default_cpus)
        self._raw: redis.Redis | None = None
        self.arrays = Arrays(self)
        self.changes = ChangeFeed(client, self.scripts, settings.redis_timeout_s)
        # Submissions that arrive together in this process share a round trip.
        self._grouped = GroupCommit(self._commit_group, shared_failures=(Unavailable,))
        self._submitter = client  # waiting for replicas (WAIT) needs a longer socket timeout
        if settings.redis_wait_replicas:
            from poolq.redis_io import connect

            self._submitter = connect(
                settings, read_timeout_s=settings.redis_timeout_s + settings.redis_wait_timeout_ms / 1000
            )
        # And so do polls, up to READ_GROUP jobs a read.lua call (a few ms of Redis's time);
        # a larger read goes alone.
        self._grouped_reads = GroupCommit(
            self._read_group, max_group=READ_GROUP, size=len, shared_failures=(Unavailable,)
        )

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
        errors, headers = check_headers(tenant, pool_label, timeout_text)
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
        return self._normalise(request, headers, submission_id)

    def _normalise(self, request: dict[str, Any], headers: JobHeaders, submission_id: str) -> NewJob:
        tenant = headers.tenant
        cpus = request.get("entrypoint_num_cpus", self.default_cpus)
        memory = request.get("entrypoint_memory", self.settings.default_memory)
        gpus = request.get("entrypoint_num_gpus", 0)
        resources = request.get("entrypoint_resources", {})
        selector = request.get("entrypoint_label_selector", {})
        timeout_ms = headers.timeout_ms
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
            "pool_label": headers.label,
        }
        retry = ""
        if "retry_policy" in request:  # defaults made explicit: the record shows what applies
            given = request["retry_policy"]
            attempts = int(given["max_attempts"])
            retry_on: list[str] = given.get("retry_on") or [error.value for error in RETRY_ON_DEFAULT]
            backoff = given.get("backoff_s", 1)
            spec["retry_policy"] = {
                "max_attempts": attempts,
                "retry_on": retry_on,
                "backoff_s": canonical_number(backoff),
            }
            retry = f"{attempts}|{','.join(retry_on)}|{to_milli(backoff)}"
        limit_ms = 0
        if "runtime_limit_s" in request:
            spec["runtime_limit_s"] = canonical_number(request["runtime_limit_s"])
            limit_ms = to_milli(request["runtime_limit_s"])
        dependencies = ""
        if "depends_on" in request:  # an id named in both is afterok: the stricter
            afterok = request["depends_on"].get("afterok", [])
            afterany = [i for i in request["depends_on"].get("afterany", []) if i not in afterok]
            spec["depends_on"] = {"afterok": afterok, "afterany": afterany}
            dependencies = ",".join([*(f"ok|{i}" for i in afterok), *(f"any|{i}" for i in afterany)])
        priority = request.get("priority")
        if priority is not None:  # in the spec only when given, so that older requests keep their fingerprint
            spec["priority"] = priority
        gang_id = request.get("gang_id", "")
        if gang_id:
            spec["gang_id"] = gang_id
        array_count, template = 0, ""
        if "array" in request:
            array_count = int(request["array"]["count"])
            template = _task_template(spec, submission_id)
            spec["array"] = {"count": array_count}
        # Each is serialised once: the same text is stored and hashed (sorted keys, so
        # that equal requests give equal text).
        spec_json = _canonical(spec)
        shape = build_shape(tenant, cpus, memory, gpus, resources, headers.terms, headers.anti, selector)
        shape_json = _canonical(shape)
        fingerprint = _digest(f"{spec_json}|{'default' if timeout_ms is None else timeout_ms}")
        working_dir = request["runtime_env"]["working_dir"]
        package = packages.name_of(working_dir) if working_dir.startswith("gcs://") else ""
        return NewJob(
            tenant,
            submission_id,
            spec,
            spec_json,
            fingerprint,
            _digest(shape_json)[:24],
            shape,
            shape_json,
            timeout_ms,
            package,
            retry,
            limit_ms,
            priority,
            dependencies,
            gang_id=gang_id,
            array_count=array_count,
            task_template=template,
        )

    def submit(self, job: NewJob) -> bool:
        """Store and queue the job. True if stored now, False if this exact request was
        already stored (an idempotent retry); Conflict if another request holds the id;
        Unavailable in the contract's words (``create app failed, submissionId:[…]``),
        saying when the outcome is unknown."""
        if job.gang_id:  # a gang of one: placed as a gang, alone
            (formed,) = form_gangs([job])
            if isinstance(formed, PoolqError):
                raise formed
            job = formed
        try:
            outcome = self._grouped(job)
        except Unavailable as exc:  # the round trip of its group failed (or the one it queued behind)
            raise create_failed(job.submission_id, exc) from exc
        if isinstance(outcome, PoolqError):
            raise outcome
        return outcome

    def _commit_group(self, jobs: list[NewJob]) -> list[bool | PoolqError]:
        """The submissions that came together (poolq/commit.py): one round trip for all,
        an outcome for each. A failed round trip raises Unavailable, for each of them and
        for those queued meanwhile (``submit``: each job's unknown outcome; read back, it
        could take the rest of the 2 s a 503 must come within, and sending the same
        request again is always safe)."""
        if len(jobs) > 1 or self.settings.redis_wait_replicas:
            answers, confirmed = self._submit_pipeline(jobs)
        else:
            answers, confirmed = [self._submit_script(jobs[0])], None
        return self._unconfirmed(jobs, self._outcomes(jobs, answers), confirmed)

    @redis_errors("the submission")
    def _submit_script(self, job: NewJob) -> list[Any]:
        return list(
            self.scripts.submit(keys=_submit_keys(job), args=_submit_args(job, self.settings.schedule_timeout_ms))
        )

    def submit_many(self, jobs: Iterable[NewJob]) -> list[bool | PoolqError]:
        """Store many jobs in one round trip; per job, like ``submit``.

        When the round trip fails, each job's outcome is read back: a job found stored
        under its fingerprint was accepted, one not found was not; while Redis does not
        answer that either, each is an Unavailable saying its outcome is unknown.
        """
        jobs = list(jobs)
        try:
            answers, confirmed = self._submit_pipeline(jobs)
        except Unavailable as exc:
            return self._read_back(jobs, exc)
        outcomes = self._outcomes(jobs, answers)
        self._unform_gangs(jobs, outcomes)
        return self._unconfirmed(jobs, outcomes, confirmed)

    def _outcomes(self, jobs: list[NewJob], answers: list[Any]) -> list[bool | PoolqError]:
        outcomes: list[bool | PoolqError] = []
        for job, answer in zip(jobs, answers):
            try:
                outcomes.append(self._outcome(job, *answer))
            except PoolqError as exc:  # this job's refusal, never its neighbours'
                outcomes.append(exc)
        return outcomes

    def _unform_gangs(self, jobs: list[NewJob], outcomes: list[bool | PoolqError]) -> None:
        """A gang whose last member (its lead) was refused is not formed: its members stored
        by this request (or an earlier one like it) wait in no line. They are ended and
        removed, so that their ids are free again, and each answers the lead's refusal."""
        refused = {
            job.gang_id: outcome
            for job, outcome in zip(jobs, outcomes)
            if job.gang_role == "lead" and isinstance(outcome, PoolqError) and not isinstance(outcome, Unavailable)
        }
        if not refused:
            return
        for position, job in enumerate(jobs):
            if job.gang_role != "member" or job.gang_id not in refused or isinstance(outcomes[position], PoolqError):
                continue
            cause = refused[job.gang_id]
            outcomes[position] = InvalidRequest(
                {"gang_id": [f"gang {job.gang_id} was not formed, so this member was not stored: {cause}"]}
            )
            try:
                fields = self.redis.hmget(keys.job(job.ref), [JobFields.SHAPE, JobFields.STATUS, JobFields.NODE])
                if fields[0] != job.shape_sig or self.redis.hexists(keys.shape(job.shape_sig), "spec"):
                    continue  # another request's, or a gang formed meanwhile: not this request's to undo
                self.finish(
                    job.ref,
                    JobStatus.FAILED,
                    error_type=ErrorType.INVALID_REQUEST,
                    message=f"gang {job.gang_id} was not formed: {cause}",
                    from_statuses=[JobStatus.PENDING],
                    expected_node="",
                )
                self.purge([job.ref])
            except (redis.RedisError, Unavailable):
                log.warning("could not remove %s, a member of gang %s that was not formed", job.ref, job.gang_id)

    @redis_errors("the submissions")
    def _submit_pipeline(self, jobs: list[NewJob]) -> tuple[list[Any], int | None]:
        """submit.lua for each job, in one round trip; and how many replicas confirmed the
        writes when POOLQ_REDIS_WAIT_REPLICAS asks for some (None when it does not)."""
        wanted = self.settings.redis_wait_replicas

        def build(pipe: Any) -> None:
            for job in jobs:
                self.scripts.queue(
                    pipe, "submit", _submit_keys(job), _submit_args(job, self.settings.schedule_timeout_ms)
                )
            if wanted:
                self._queue_wait(pipe)

        answers = self.scripts.pipelined(self._submitter, build)
        if not wanted:
            return answers, None
        *answers, _, confirmed = answers
        return answers, int(confirmed)

    @redis_errors("the wait for replicas")
    def replicated(self) -> bool:
        """Whether the replicas POOLQ_REDIS_WAIT_REPLICAS asks for have every write made so
        far, by any connection (True when it asks for none). A node agent asks before it
        runs a job and before it forgets how one ended: a failover that lost either write
        would run the job a second time (docs/faults.md)."""
        wanted = self.settings.redis_wait_replicas
        if not wanted:
            return True
        pipe = self._submitter.pipeline(transaction=False)
        self._queue_wait(pipe)
        return int(pipe.execute()[1]) >= wanted

    def _queue_wait(self, pipe: Any) -> None:
        """Queue a write and WAIT on it: WAIT counts the replicas that have this connection's
        last write, and this one comes after every earlier write, of any connection
        (replication is one ordered stream), so its confirmation covers them all."""
        pipe.incr(keys.WAIT_MARK)
        pipe.execute_command("WAIT", self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms)

    def _unconfirmed(
        self, jobs: list[NewJob], outcomes: list[bool | PoolqError], confirmed: int | None
    ) -> list[bool | PoolqError]:
        """Acceptances fewer replicas confirmed than POOLQ_REDIS_WAIT_REPLICAS asks for become
        503s: the job is on the master, but a failover now could lose it, so its outcome is
        unknown (docs/operations.md, "Durability across a failover")."""
        wanted = self.settings.redis_wait_replicas
        if confirmed is None or confirmed >= wanted:
            return outcomes
        why = (
            f"stored on the Redis master, but {confirmed} of the {wanted} replicas POOLQ_REDIS_WAIT_REPLICAS asks for "
            f"confirmed it within {self.settings.redis_wait_timeout_ms} ms"
        )
        return [
            create_failed(job.submission_id, Unavailable(why)) if isinstance(outcome, bool) else outcome
            for job, outcome in zip(jobs, outcomes)
        ]

    def _read_back(self, jobs: list[NewJob], cause: Unavailable) -> list[bool | PoolqError]:
        try:
            stored = self._fingerprints([job.ref for job in jobs])
        except Unavailable as exc:
            return [create_failed(job.submission_id, exc) for job in jobs]
        outcomes: list[bool | PoolqError] = []
        for job, fingerprint in zip(jobs, stored):
            if fingerprint == job.fingerprint and self.settings.redis_wait_replicas:
                # Stored, but whether replicas have it is unknown: the round trip's WAIT failed.
                outcomes.append(create_failed(job.submission_id, cause))
            elif fingerprint == job.fingerprint:
                outcomes.append(False)  # stored: by this request or an earlier identical one
            elif fingerprint is None:  # certainly not stored, and certainly safe to send again
                outcomes.append(
                    Unavailable(
                        f"create app failed, submissionId:[{job.submission_id}], err: {cause}", job.submission_id
                    )
                )
            else:
                outcomes.append(Conflict(f"submit job has already exist, submissionId: {job.submission_id}"))
        return outcomes

    @redis_errors("the read")
    def _fingerprints(self, job_refs: list[str]) -> list[str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_ref in job_refs:
            pipe.hget(keys.job(job_ref), JobFields.FINGERPRINT)
        return list(pipe.execute())

    def _outcome(self, job: NewJob, code: int, wake: int, *detail: Any) -> bool:
        outcome = Submitted(code)
        if outcome == Submitted.NO_PACKAGE:
            name = job.package
            raise InvalidRequest(
                {
                    "runtime_env.working_dir": [
                        f"package gcs://{name} was not uploaded: PUT it to /api/packages/gcs/{name} first"
                    ]
                }
            )
        if outcome == Submitted.CONFLICT:
            raise Conflict(f"submit job has already exist, submissionId: {job.submission_id}")
        if outcome == Submitted.TOO_MANY_PENDING:
            pending, limit = detail
            raise TooMany(f"tenant {job.tenant} has {pending} pending jobs, its limit")
        if outcome == Submitted.OVER_QUOTA:
            resource, amount, limit = detail
            field = REQUEST_FIELDS.get(resource, f"entrypoint_resources.{resource}")
            raise InvalidRequest(
                {
                    field: [
                        f"asks for more {resource} than the tenant's quota allows ({show_amount(resource, int(amount))} > {show_amount(resource, int(limit))})"
                    ]
                }
            )
        if outcome == Submitted.OVER_PRIORITY:
            priority, limit = detail
            raise InvalidRequest(
                {"priority": [f"must be at most {limit}, the tenant's maximum priority (got {priority})"]}
            )
        if outcome == Submitted.GANG_INCOMPLETE:
            (position,) = detail
            missing = keys.split_ref(job.gang_members[int(position) - 1])[1]
            raise InvalidRequest(
                {"gang_id": [f"gang {job.gang_id} is missing {missing}: every member must be accepted in one batch"]}
            )
        if outcome == Submitted.NO_DEPENDENCY:
            kind, submission_id = detail
            field = "depends_on.afterok" if kind == "ok" else "depends_on.afterany"
            raise InvalidRequest({field: [f"no job {submission_id} in tenant {job.tenant}: a dependency must exist"]})
        if outcome == Submitted.ARRAY_DEPENDENCY:
            kind, submission_id = detail
            field = "depends_on.afterok" if kind == "ok" else "depends_on.afterany"
            raise InvalidRequest({field: [f"{submission_id} is an array: a job cannot depend on an array"]})
        if outcome == Submitted.TASK_ID_TAKEN:
            (array_id,) = detail
            if array_id == job.submission_id:
                raise Conflict(f"jobs named {array_id}-<index> exist: an array's task ids must be free")
            raise Conflict(f"submission id {job.submission_id} is a task of array {array_id}")
        if wake:
            self.wake(queues.PLACEMENT)
        return outcome == Submitted.ACCEPTED

    def wake(self, queue: str) -> None:
        """Send a wake-up; a failure is logged, not raised: the sweep re-sends it."""
        if self.waker is None:
            return
        try:
            self.waker(queue)
        except Exception:  # the job is stored and queued either way
            log.warning("could not send a wake-up to %s; the sweep will", queue, exc_info=True)

    # -- ending ----------------------------------------------------------------

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
        mode: str = "",
        extra: dict[str, str] | None = None,
        attempt: int | None = None,
    ) -> Ending:
        """Move a job to a terminal status and release what it holds, exactly once (or,
        where its retry policy says so, end the attempt: the job goes back to PENDING).

        NOT_ALLOWED if the job is already terminal or not in ``from_statuses`` (or, with
        ``expected_node``, placed elsewhere; with ``attempt``, on another attempt: the
        caller's has ended). ``mode`` as in ``poolq/lua/finish.lua``.
        """
        return self._end(
            job_ref, status, error_type, message, exit_code, from_statuses, expected_node, mode, extra, "", attempt
        )

    @redis_errors("the status change")
    def _end(
        self,
        job_ref: str,
        status: JobStatus,
        error_type: ErrorType | None,
        message: str,
        exit_code: int | None,
        from_statuses: Iterable[JobStatus],
        expected_node: str | None,
        mode: str,
        extra: dict[str, str] | None,
        token: str,
        attempt: int | None = None,
    ) -> Ending:
        allowed = "," + ",".join(s.value for s in from_statuses) + ","
        extra_args = [item for pair in (extra or {}).items() for item in pair]
        for _ in range(5):
            node, sig = self.redis.hmget(keys.job(job_ref), [JobFields.NODE, JobFields.SHAPE])
            sig = sig or ""
            node = node or ""
            if expected_node is not None and node != expected_node:
                return Ending.NOT_ALLOWED
            code, wake = self.scripts.finish(
                keys=finish_keys(job_ref, node, sig),
                args=[
                    job_ref,
                    node,
                    status.value,
                    error_type.value if error_type else "",
                    message,
                    "" if exit_code is None else exit_code,
                    allowed,
                    WAKE_TTL_MS,
                    mode,
                    token,
                    "" if attempt is None else attempt,
                    RUN_BUCKETS,
                    int(self.settings.fair_share_half_life_s * 1000),
                    *extra_args,
                ],
            )
            if code != Ending.NODE_CHANGED:
                if wake:
                    self.wake(queues.PLACEMENT)
                return Ending(code)
        raise Unavailable(f"job {job_ref} kept changing while it was being ended")

    @redis_errors("the stop")
    def stop(self, tenant: str, submission_id: str) -> bool:
        """Stop a job: True if it was PENDING (now STOPPED) or RUNNING (its agent stops it).

        The request's token makes it safe to send twice: a retry after a lost reply
        answers what the first run did, not "already stopped".
        """
        job_ref = keys.ref(tenant, submission_id)
        running = (JobStatus.PENDING, JobStatus.RUNNING)
        outcome = self._end(
            job_ref,
            JobStatus.STOPPED,
            ErrorType.STOPPED_BY_USER,
            "stopped by user request",
            None,
            running,
            None,
            "stop",
            None,
            uuid.uuid4().hex[:16],
        )
        if outcome == Ending.NO_SUCH_JOB:
            if self.arrays.create_early(tenant, submission_id):  # a task placement had not reached
                return self.stop(tenant, submission_id)
            if self.arrays.read_task(tenant, submission_id):
                return False  # it ended with its array, never created
            raise NotFound(f"not found app, submissionId: {submission_id}")
        if outcome == Ending.NOT_ALLOWED and self.redis.hget(keys.job(job_ref), JobFields.STATUS) == ARRAY:
            return self.arrays.stop(tenant, submission_id)
        if outcome == Ending.STOP_FLAGGED:
            node = self.redis.hget(keys.job(job_ref), JobFields.NODE)
            if node:
                self.wake(queues.node_queue(node))
        return outcome in (Ending.MOVED, Ending.STOP_FLAGGED)

    @redis_errors("the removal")
    def purge(self, job_refs: list[str]) -> list[Purged]:
        """Remove terminal jobs (record, log, index entries); per ref, what became of it."""
        key_list, args = [keys.TERMINAL], []
        for job_ref in job_refs:
            tenant, submission_id = keys.split_ref(job_ref)
            key_list += [
                keys.job(job_ref),
                keys.log(job_ref),
                keys.tenant_jobs(tenant),
                keys.tenant_counts(tenant),
                keys.tenant_stems(tenant),
            ]
            args += [job_ref, submission_id]
        return [Purged(x) for x in self.scripts.purge(keys=key_list, args=args)]

    @redis_errors("the recount")
    def recount(self, tenant: str, most: int = RECOUNT_MOST) -> bool | None:
        """Make the tenant's PENDING and RUNNING counts match its records (recount.lua),
        for a tenant with at most ``most`` of them. True if a count was wrong, False if
        all were right, None if not checked (too many, or they changed meanwhile)."""
        active = keys.tenant_active(tenant)
        ids = self.redis.zrange(active, 0, most)
        if len(ids) > most:
            return None
        fixed, *_ = self.scripts.recount(
            keys=[active, keys.tenant_counts(tenant), *(keys.job(keys.ref(tenant, i)) for i in ids)], args=ids
        )
        return None if fixed < 0 else bool(fixed)

    # -- reading ---------------------------------------------------------------

    def read(self, tenant: str, submission_id: str) -> tuple[dict[str, str], dict[str, str] | None]:
        """The job hash and, while it waits for placement, its shape's hash (attempts, reasons)."""
        (found,) = self._read_jobs([(tenant, submission_id)])
        if found is None:
            raise NotFound(f"not found app, submissionId: {submission_id}")
        return found

    def read_many(
        self, tenant: str, submission_ids: Iterable[str]
    ) -> dict[str, tuple[dict[str, str], dict[str, str] | None]]:
        """``read`` for many jobs, those that exist, by id in the order asked; one round trip
        (two while some wait for placement)."""
        ids = list(dict.fromkeys(submission_ids))
        found = self._read_jobs([(tenant, submission_id) for submission_id in ids])
        return {i: job for i, job in zip(ids, found) if job is not None}

    @redis_errors("the read")
    def _read_jobs(self, wanted: list[tuple[str, str]]) -> list[tuple[dict[str, str], dict[str, str] | None] | None]:
        """Each (tenant, id)'s hash and shape, or None where there is no such job. Polls
        that arrive together in this process share one round trip (``_read_group``)."""
        found: list[tuple[dict[str, str], dict[str, str] | None] | None] = []
        for (tenant, submission_id), (job, shapes) in zip(wanted, self._grouped_reads(wanted)):
            if not job:  # perhaps an array's task that placement has not created yet
                job = self.arrays.read_task(tenant, submission_id) or {}
                shapes = self._shapes_of([job])
            waiting = _waiting(job)
            found.append(
                (job, shapes.get(job[JobFields.SHAPE], {}) if waiting else None) if JobFields.SPEC in job else None
            )
        return found

    @redis_errors("the read")
    def _read_group(
        self, groups: list[list[tuple[str, str]]]
    ) -> list[list[tuple[dict[str, str], dict[str, dict[str, str]]]]]:
        """The reads that came together (poolq/commit.py): read.lua over all their jobs;
        per job, its hash and the shapes read with it."""
        flat = [keys.job(keys.ref(tenant, submission_id)) for group in groups for tenant, submission_id in group]
        *jobs, shapes = self.scripts.read(keys=flat, args=[keys.shape("")]) if flat else [[]]
        by_sig = {sig: _fields(fields) for sig, fields in zip(shapes[::2], shapes[1::2])}
        hashes = [_fields(job) for job in jobs]
        out, start = [], 0
        for group in groups:
            out.append([(job, by_sig) for job in hashes[start : start + len(group)]])
            start += len(group)
        return out

    def get_many(self, tenant: str, submission_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Records of the ids that exist in the tenant, in the order asked (``read_many``)."""
        return [render_record(f, shape) for f, shape in self.read_many(tenant, submission_ids).values()]

    @redis_errors("the listing")
    def list_tasks(
        self, tenant: str, array_id: str, *, status: JobStatus | None = None, limit: int = 100, start: int = 0
    ) -> tuple[list[dict[str, Any]], int | None]:
        """An array's tasks in index order from ``start`` (records made from the array's
        for those placement has not reached); the page and the next start (None at the end)."""
        if self.redis.hget(keys.job(keys.ref(tenant, array_id)), JobFields.STATUS) != ARRAY:
            raise NotFound(f"not found array, submissionId: {array_id}")
        page, next_start = self.arrays.list_tasks(tenant, array_id, start, limit)
        return self._render([f for f in page if _matches(f, status, None)]), next_start

    @redis_errors("the listing")
    def list_jobs(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        pool_label: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The tenant's jobs, newest first, below cursor ``before`` (a seq); returns the page
        and the cursor of the next one (None at the end).

        PENDING and RUNNING jobs are listed from the tenant's active index; a filter
        that skips records reads on, up to LIST_SCAN records a page, so a page may
        hold fewer than ``limit`` records and still have a next one.
        """
        active = status in (JobStatus.PENDING, JobStatus.RUNNING)
        index = keys.tenant_active(tenant) if active else keys.tenant_jobs(tenant)
        filtered = status is not None or pool_label is not None
        upper = f"({before}" if before is not None else "+inf"
        page: list[dict[str, str]] = []
        scanned, last_seq = 0, None
        while True:
            want = limit - len(page) + 1 if not filtered else min(LIST_SCAN, max(limit * 2, 100))
            found = self.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=want, withscores=True)
            if not found:
                return self._render(page), None
            pipe = self.redis.pipeline(transaction=False)
            for submission_id, _ in found:
                pipe.hgetall(keys.job(keys.ref(tenant, submission_id)))
            for (_, seq), fields in zip(found, pipe.execute()):
                if len(page) == limit:
                    return self._render(page), last_seq  # more exist: `found` went past the page
                scanned += 1
                last_seq = int(seq)
                if fields and JobFields.SPEC in fields and _matches(fields, status, pool_label):
                    page.append(fields)
            upper = f"({last_seq}"
            if len(found) < want:
                return self._render(page), None
            if scanned >= LIST_SCAN:
                return self._render(page), last_seq

    def _render(self, hashes: list[dict[str, str]]) -> list[dict[str, Any]]:
        shapes = self._shapes_of(hashes)
        return [render_record(f, shapes.get(f.get(JobFields.SHAPE, ""))) for f in hashes]

    def _shapes_of(self, hashes: list[dict[str, str]]) -> dict[str, dict[str, str]]:
        """While a job waits for placement its attempts and reasons live on its shape."""
        sigs = sorted({f[JobFields.SHAPE] for f in hashes if _waiting(f)})
        if not sigs:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for sig in sigs:
            pipe.hgetall(keys.shape(sig))
        return dict(zip(sigs, pipe.execute()))

    @redis_errors("the removal")
    def delete(self, tenant: str, submission_id: str) -> None:
        """Remove a terminal job (an array: with all its tasks); NotFound, or Conflict if it
        is not terminal."""
        job_ref = keys.ref(tenant, submission_id)
        if self.redis.hget(keys.job(job_ref), JobFields.STATUS) == ARRAY:
            self.arrays.delete(tenant, submission_id, self.redis.hgetall(keys.job(job_ref)))
            return
        (outcome,) = self.purge([job_ref])
        if outcome == Purged.ABSENT:
            task = self.arrays.read_task(tenant, submission_id)
            if task and task[JobFields.STATUS] == JobStatus.PENDING:
                raise Conflict(f"job {submission_id} is not finished: stop it first, then delete it")
            if task:
                raise Conflict(f"job {submission_id} ended with its array before it was created: delete the array")
            raise NotFound(f"not found app, submissionId: {submission_id}")
        if outcome == Purged.NOT_TERMINAL:
            raise Conflict(f"job {submission_id} is not finished: stop it first, then delete it")

    @redis_errors("the log read")
    def logs(self, tenant: str, submission_id: str, offset: int | None = None) -> tuple[str, int]:
        """The output kept so far (from ``offset`` in the whole output, if given) and the
        offset just past it. Only whole UTF-8 characters are returned."""
        job_ref = keys.ref(tenant, submission_id)
        pipe = self.raw.pipeline(transaction=False)
        pipe.hget(keys.job(job_ref), JobFields.LOG_BASE)
        pipe.exists(keys.job(job_ref))
        pipe.lrange(keys.log(job_ref), 0, -1)
        base_raw, exists, chunks = pipe.execute()
        if not exists and self.arrays.read_task(tenant, submission_id):
            return "", 0  # a task placement has not reached: no output yet
        if not exists:
            raise NotFound(f"not found app, submissionId: {submission_id}")
        base, data = int(base_raw or 0), b"".join(chunks)
        begin, end = utf8_bounds(data, 0 if offset is None else offset - base)
        return data[begin:end].decode("utf-8", "replace"), base + end

    @redis_errors("the log read")
    def log_since(self, tenant: str, submission_id: str, offset: int) -> LogRead:
        """What a follower of the job's output has not seen yet: the output kept from
        ``offset`` on. A look that finds nothing new costs one HMGET; new output is read
        from the end of the tail, a few chunks at a time, so following a job costs what
        it writes, not what the tail holds. Once the job has ended, the last read ends on
        whatever bytes are left, whole characters or not, and ``ended`` says so."""
        job_key, log_key = keys.job(keys.ref(tenant, submission_id)), keys.log(keys.ref(tenant, submission_id))
        status, base_raw, length_raw = self.raw.hmget(
            job_key, [JobFields.STATUS, JobFields.LOG_BASE, JobFields.LOG_LEN]
        )
        if status is None:
            task = self.arrays.read_task(tenant, submission_id)
            if task:  # not created yet: nothing written, and nothing to come if it ended so
                return LogRead(b"", offset, task[JobFields.STATUS] in TERMINAL_STATUSES)
            raise NotFound(f"not found app, submissionId: {submission_id}")
        if status.decode() == ARRAY:  # an array has no output: it ends with its last task
            ended = array_status(self.redis.hgetall(job_key)) in TERMINAL_STATUSES
            return LogRead(b"", offset, ended)
        if int(base_raw or 0) + int(length_raw or 0) <= offset and status.decode() not in TERMINAL_STATUSES:
            return LogRead(b"", offset, False)
        count = 8
        while True:
            pipe = self.raw.pipeline(transaction=True)  # the chunks and the fields that place them, at one moment
            pipe.hmget(job_key, [JobFields.STATUS, JobFields.LOG_BASE, JobFields.LOG_LEN])
            pipe.llen(log_key)
            pipe.lrange(log_key, -count, -1)
            (status, base_raw, length_raw), chunks_kept, chunks = pipe.execute()
            if status is None:
                raise NotFound(f"not found app, submissionId: {submission_id}")
            end = int(base_raw or 0) + int(length_raw or 0)
            data = b"".join(chunks)
            if end - len(data) <= offset or len(chunks) >= chunks_kept:
                break
            count *= 4
        ended = status.decode() in TERMINAL_STATUSES
        begin, stop = utf8_bounds(data, offset - (end - len(data)), whole_end=not ended)
        return LogRead(data[begin:stop], end - len(data) + stop, ended)

    @redis_errors("the wait")
    def wait_placed(self, job_ref: str, timeout_s: float) -> str | None:
        """Wait until the job is placed (or ends, or the time is up); returns the failure
        message if it ended without being placed, else None."""
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            status, node, message = self.redis.hmget(
                keys.job(job_ref), [JobFields.STATUS, JobFields.NODE, JobFields.MESSAGE]
            )
            if node or status == JobStatus.RUNNING or status == JobStatus.SUCCEEDED:
                return None
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                return message or status
            remaining = deadline - time.monotonic()
            if remaining <= 0 or status is None:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    def count_invalid(self, tenant: str | None) -> None:
        """Count a refused submission for /metrics; never fails the request."""
        try:
            name = parse_tenant(tenant)
        except ValidationError:
            name = "-"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(keys.STATS, f"submissions:{name}:{Submitted.INVALID.value}", 1)
            if name != "-":  # a tenant known to poolq:tenants is forgotten, counters and all, once idle
                pipe.sadd(keys.TENANTS, name)
            pipe.execute()
        except redis.RedisError:
            pass

    @redis_errors("the health check")
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
        (CPU, to_milli(cpus), show_amount(CPU, to_milli(cpus))),
        (MEMORY, int(memory), show_amount(MEMORY, int(memory))),
        (GPU, to_milli(gpus), _plain(gpus)),
    ):
        if amount > 0:
            req[name] = amount
            show[name] = rendered
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


def form_gangs(jobs: list[NewJob], broken: frozenset[str] = frozenset()) -> list[NewJob | PoolqError]:
    """Give the members of each gang (the jobs of one batch with one ``gang_id``) their
    gang's shape: one line entry for the whole gang, its last member, the *lead*, whose
    submit.lua checks that every other member was stored and puts the gang in line.
    Gangs named in ``broken`` (one of their items was invalid), and gangs whose members
    disagree on their priority or repeat an id, are refused whole."""
    positions: dict[str, list[int]] = defaultdict(list)
    for position, job in enumerate(jobs):
        if job.gang_id:
            positions[job.gang_id].append(position)
    out: list[NewJob | PoolqError] = list(jobs)
    for gang, where in positions.items():
        members = [jobs[i] for i in where]
        error = None
        if gang in broken:
            error = InvalidRequest({"gang_id": [f"gang {gang} is not formed: another of its items is invalid"]})
        elif len({m.priority for m in members}) > 1:
            error = InvalidRequest({"priority": [f"every member of gang {gang} must have the same priority"]})
        elif len({m.submission_id for m in members}) < len(members):
            error = InvalidRequest({"gang_id": [f"gang {gang} names one submission_id twice"]})
        if error is not None:
            for i in where:
                out[i] = error
            continue
        total: dict[str, int] = {}
        for m in members:
            for resource, amount in m.shape["req"].items():
                total[resource] = total.get(resource, 0) + amount
        spec = {
            "tenant": members[0].tenant,
            "req": total,
            "show": {},
            "terms": [],
            "anti": False,
            "selector": {},
            "gang": gang,
            "members": [[m.ref, m.shape] for m in members],
        }
        spec_json = _canonical(spec)
        sig = _digest(spec_json)[:24]
        for i in where[:-1]:
            out[i] = dataclasses.replace(jobs[i], shape_sig=sig, shape_json="", gang_role="member")
        out[where[-1]] = dataclasses.replace(
            jobs[where[-1]],
            shape_sig=sig,
            shape_json=spec_json,
            gang_role="lead",
            gang_members=tuple(m.ref for m in members[:-1]),
        )
    return out


def _submission_id(
    request: dict[str, Any], default_id: Callable[[], str] | None
) -> tuple[str | None, dict[str, list[str]]]:
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


REQUEST_FIELDS = {CPU: "entrypoint_num_cpus", MEMORY: "entrypoint_memory", GPU: "entrypoint_num_gpus"}


def requests_text(req: dict[str, int]) -> str:
    """Integer amounts as the Lua scripts read them: ``CPU=3000,memory=134217728``."""
    return ",".join(f"{name}={amount}" for name, amount in req.items())


UNKNOWN_OUTCOME = "the job may or may not have been stored: send the same request with the same submission_id again"


def create_failed(submission_id: str, cause: Exception) -> Unavailable:
    """A submission whose outcome is not known, in openYuanrong's words (docs/api.md).

    Redis may have run the submission and lost only its reply, so the answer never says
    "not stored": it says to retry with the same id, which is always safe (docs/faults.md).
    """
    return Unavailable(
        f"create app failed, submissionId:[{submission_id}], err: {cause}; {UNKNOWN_OUTCOME}",
        submission_id=submission_id,
    )


def _fields(flat: list[str]) -> dict[str, str]:
    """A hash from a script's flat HGETALL answer."""
    return dict(zip(flat[::2], flat[1::2]))


def _waiting(fields: dict[str, str]) -> bool:
    return (
        fields.get(JobFields.STATUS) == JobStatus.PENDING
        and not fields.get(JobFields.NODE)
        and not fields.get(JobFields.ATTEMPTS)
        and bool(fields.get(JobFields.SHAPE))
    )


def _matches(fields: dict[str, str], status: JobStatus | None, pool_label: str | None) -> bool:
    shown = array_status(fields) if fields.get(JobFields.STATUS) == ARRAY else fields.get(JobFields.STATUS)
    if status is not None and shown != status:
        return False
    if pool_label is not None and json.loads(fields[JobFields.SPEC]).get("pool_label") != pool_label:
        return False
    return True


def finish_keys(job_ref: str, node: str, sig: str) -> list[str]:
    """finish.lua's keys for a job placed on ``node`` ("" unplaced) of shape ``sig``."""
    tenant = keys.split_ref(job_ref)[0]
    return [
        keys.job(job_ref),
        keys.node(node),
        keys.node_jobs(node),
        keys.node_inbox(node),
        keys.shape_queue(sig),
        keys.DEADLINES,
        keys.CLAIMED,
        keys.TERMINAL,
        keys.INVENTORY_LOG,
        keys.KICK,
        keys.wake(queues.PLACEMENT),
        keys.tenant_active(tenant),
        keys.tenant_counts(tenant),
        keys.tenant_usage(tenant),
        keys.SUSPECTS,
        keys.CLAIMS,
        keys.shape(sig),
        keys.tenant_package_use(tenant),
        keys.PACKAGES,
        keys.RETRIES,
        keys.STATS,
        keys.dependents(job_ref),
        keys.RESOLVE,
        keys.FAIR_SHARE,
        keys.GANGS_BROKEN,
    ]


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
        keys.tenant_active(job.tenant),
        keys.tenant_counts(job.tenant),
        keys.quota(job.tenant),
        keys.TENANTS,
        keys.STATS,
        keys.limits(job.tenant),
        keys.package(job.tenant, job.package),
        keys.tenant_package_use(job.tenant),
        keys.PACKAGES,
        keys.SHAPES_IDLE,
        keys.RESOLVE,
        keys.tenant_stems(job.tenant),
        *(keys.job(member) for member in job.gang_members),
    ]


def _submit_args(job: NewJob, default_timeout_ms: int) -> list[Any]:
    return [
        job.fingerprint,
        job.spec_json,
        job.shape_sig,
        job.shape_json,
        "" if job.timeout_ms is None else job.timeout_ms,
        job.submission_id,
        job.ref,
        WAKE_TTL_MS,
        requests_text(job.shape["req"]),
        job.tenant,
        job.package,
        keys.package_member(job.tenant, job.package),
        job.retry,
        job.runtime_limit_ms or "",
        default_timeout_ms,
        "" if job.priority is None else job.priority,
        job.dependencies,
        keys.JOB_PREFIX,
        job.gang_role,
        job.gang_id,
        job.array_count or "",
        job.task_template,
    ]


def _task_template(spec: dict[str, Any], array_id: str) -> str:
    """A task's spec text cut where its index goes, as a JSON list (claim.lua joins the
    parts with the index): the array's spec with its task's id, array id and index."""
    while True:
        mark = uuid.uuid4().hex
        text = _canonical({**spec, "submission_id": f"{array_id}-{mark}", "array_id": array_id, "array_index": mark})
        parts = text.replace(f'"{mark}"', mark).split(mark)
        if len(parts) == 3:  # the mark is in no field of the request
            return json.dumps(parts, ensure_ascii=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _plain(amount: Decimal | int) -> str:
    return str(canonical_number(amount))
