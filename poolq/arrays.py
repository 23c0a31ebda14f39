"""Job arrays: one record for N tasks, whose tasks become records as placement reaches them.

The Redis side is in ``poolq/lua/lib/array.lua`` (the record's fields), ``submit.lua``
(accepting one), ``claim.lua`` (creating its tasks), ``array_end.lua`` (ending the tasks
never created) and ``array_task.lua`` (creating one task early, to stop it alone). This
module holds what the store does with an array as a whole: read a task not created yet,
list the tasks, stop and delete them all. docs/scheduling.md, "Arrays", has the rules.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any, Iterator, Protocol

import redis

from poolq import keys
from poolq.errors import Conflict
from poolq.model import ARRAY, ErrorType, JobFields, JobStatus, task_fields
from poolq.redis_io import Scripts


class Store(Protocol):
    """What of poolq.store.JobStore an array's operations use."""

    redis: redis.Redis
    scripts: Scripts

    def stop(self, tenant: str, submission_id: str) -> bool: ...

    def purge(self, job_refs: list[str]) -> Any: ...


TASK_ID = re.compile(r"^(.+)-(0|[1-9]\d{0,5})$")  # an index as claim.lua writes it: no leading zeros
CHUNK = 1000  # tasks read (or removed: PURGE_CHUNK) per round trip when acting on a whole array
PURGE_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class TaskOf:
    array_id: str
    index: int


def task_of(submission_id: str) -> TaskOf | None:
    """The array and index a task id names, if it has the form ``<array id>-<index>``."""
    found = TASK_ID.match(submission_id)
    return TaskOf(found[1], int(found[2])) if found else None


def uncreated(array: dict[str, str], index: int) -> dict[str, str] | None:
    """The record of task ``index`` made from its array's, if placement has not created it
    (None when it is not the array's, or was created: its own record answers, or is gone)."""
    if array.get(JobFields.STATUS) != ARRAY or not 0 <= index < int(array[JobFields.ARRAY_COUNT]):
        return None
    if index < int(array[JobFields.ARRAY_NEXT]) or f"early:{index}" in array:
        return None
    return task_fields(array, index)


def _done(array: dict[str, str]) -> bool:
    return not int(array.get("n:PENDING") or 0) and not int(array.get("n:RUNNING") or 0)


class Arrays:
    """Acting on an array as a whole, for a JobStore (which calls these inside its own
    Redis error translation)."""

    def __init__(self, store: Store):
        self.store = store
        self.redis = store.redis

    def read_task(self, tenant: str, submission_id: str) -> dict[str, str] | None:
        """The record of a task that has no record of its own yet (None if not such a task).

        The array is read after the task was found missing: a task created in between
        is behind the cursor by then, and is read again."""
        task = task_of(submission_id)
        if task is None:
            return None
        array = self.redis.hgetall(keys.job(keys.ref(tenant, task.array_id)))
        if not array or array.get(JobFields.STATUS) != ARRAY:
            return None
        fields = uncreated(array, task.index)
        if fields is None and task.index < int(array[JobFields.ARRAY_COUNT]):
            fields = self.redis.hgetall(keys.job(keys.ref(tenant, submission_id))) or None
        return fields

    def list_tasks(self, tenant: str, array_id: str, start: int, limit: int) -> tuple[list[dict[str, str]], int | None]:
        """The array's tasks from index ``start``, in index order: their records, or for
        those not created yet the record made from the array's; and the next start."""
        array = self.redis.hgetall(keys.job(keys.ref(tenant, array_id)))
        if array.get(JobFields.STATUS) != ARRAY:
            return [], None
        count = int(array[JobFields.ARRAY_COUNT])
        stop = min(count, start + limit)
        pipe = self.redis.pipeline(transaction=False)
        for index in range(start, stop):
            pipe.hgetall(keys.job(keys.ref(tenant, keys.task_id(array_id, index))))
        pipe.hgetall(keys.job(keys.ref(tenant, array_id)))  # the cursor after those reads
        *tasks, array = pipe.execute()
        page = []
        for index, fields in zip(range(start, stop), tasks):
            if not fields and array.get(JobFields.STATUS) == ARRAY:
                fields = uncreated(array, index) or {}
            if fields and JobFields.SPEC in fields:
                page.append(fields)
        return page, (stop if stop < count else None)

    def stop(self, tenant: str, array_id: str) -> bool:
        """Stop every task: the uncreated ones in one step (array_end.lua), then those
        created and still PENDING or RUNNING. True if any was."""
        array_ref = keys.ref(tenant, array_id)
        code, ended = self._end(
            array_ref, "stop", JobStatus.STOPPED, ErrorType.STOPPED_BY_USER, "stopped by user request"
        )
        stopped = code == 2 or ended > 0
        for submission_id in self._live_tasks(tenant, array_id):
            stopped = self.store.stop(tenant, submission_id) or stopped
        return stopped

    def expire(self, array_ref: str, message: str) -> int:
        """Fail the uncreated tasks of an array past its scheduling deadline; how many."""
        _, ended = self._end(array_ref, "deadline", JobStatus.FAILED, ErrorType.SCHEDULE_TIMEOUT, message)
        return ended

    def delete(self, tenant: str, array_id: str, array: dict[str, str]) -> None:
        """Remove an array whose tasks have all ended: its tasks' records, then its own
        (so that a delete cut short can be sent again)."""
        if not _done(array):
            raise Conflict(f"array {array_id} has tasks not finished: stop it first, then delete it")
        for chunk in _chunks(self._created_range(array), PURGE_CHUNK):
            self.store.purge([keys.ref(tenant, keys.task_id(array_id, index)) for index in chunk])
        self.store.purge([keys.ref(tenant, array_id)])

    def _end(self, array_ref: str, mode: str, status: JobStatus, error: ErrorType, message: str) -> tuple[int, int]:
        tenant, array_id = keys.split_ref(array_ref)
        sig = self.redis.hget(keys.job(array_ref), JobFields.SHAPE) or ""
        code, ended = self.store.scripts.array_end(
            keys=[
                keys.job(array_ref),
                keys.shape_queue(sig),
                keys.DEADLINES,
                keys.tenant_active(tenant),
                keys.tenant_counts(tenant),
                keys.TERMINAL,
                keys.shape(sig),
                keys.tenant_package_use(tenant),
                keys.STATS,
            ],
            args=[array_ref, array_id, mode, status.value, error.value, message, uuid.uuid4().hex[:16]],
        )
        return int(code), int(ended)

    def create_early(self, tenant: str, submission_id: str) -> bool:
        """Create a task placement has not reached, PENDING in its shape's queue, so that
        it can be stopped alone (array_task.lua). False if it is no such task."""
        task = task_of(submission_id)
        if task is None:
            return False
        array_ref = keys.ref(tenant, task.array_id)
        sig = self.redis.hget(keys.job(array_ref), JobFields.SHAPE) or ""
        created = self.store.scripts.array_task(
            keys=[
                keys.job(array_ref),
                keys.job(keys.ref(tenant, submission_id)),
                keys.tenant_jobs(tenant),
                keys.tenant_active(tenant),
                keys.SEQ,
                keys.DEADLINES,
                keys.shape(sig),
                keys.tenant_package_use(tenant),
                keys.shape_queue(sig),
                keys.SHAPES_READY,
                keys.SHAPES_BLOCKED,
            ],
            args=[array_ref, task.array_id, tenant, task.index],
        )
        return int(created) == 1

    def _created_range(self, array: dict[str, str]) -> range:
        """The indices that may have records: behind the cursor, or all when some were
        created early (ahead of it)."""
        if int(array.get(JobFields.ARRAY_SKIP) or 0) > 0:
            return range(int(array[JobFields.ARRAY_COUNT]))
        return range(int(array[JobFields.ARRAY_NEXT]))

    def _live_tasks(self, tenant: str, array_id: str) -> Iterator[str]:
        array = self.redis.hgetall(keys.job(keys.ref(tenant, array_id)))
        for chunk in _chunks(self._created_range(array), CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            ids = [keys.task_id(array_id, index) for index in chunk]
            for submission_id in ids:
                pipe.hget(keys.job(keys.ref(tenant, submission_id)), JobFields.STATUS)
            for submission_id, status in zip(ids, pipe.execute()):
                if status in (JobStatus.PENDING, JobStatus.RUNNING):
                    yield submission_id


def _chunks(indices: range, size: int) -> Iterator[range]:
    for begin in range(indices.start, indices.stop, size):
        yield range(begin, min(begin + size, indices.stop))
