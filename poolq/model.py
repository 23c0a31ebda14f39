"""Values both sides share: job status, error types, resource units, the job record.

Resources are integers inside poolq: CPU, GPU and custom resources in milli-units,
memory in bytes. ``to_milli`` converts a submitted decimal exactly (4.03 -> 4030),
so that reserve and release add and subtract the same integers forever.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from decimal import Context, Decimal
from typing import Any, Mapping

CPU = "CPU"
MEMORY = "memory"
GPU = "GPU"

# How long from submission to reservation, for /metrics: reserve.lua counts each
# placement in the buckets it falls in (ms). A job sent with X-Schedule-Timeout-Ms: 0
# may wait in line for hours, so the buckets go on past a minute.
PLACEMENT_LATENCY_BUCKETS_MS = (10, 50, 100, 500, 1000, 5000, 10000, 60000, 300000, 600000, 3600000)
# How long a job's attempt ran (RUNNING to its end), for /metrics: finish.lua counts
# each run in the one bucket it falls in (ms), the scrape adds them up.
RUN_DURATION_BUCKETS_MS = (100, 1000, 10000, 60000, 300000, 600000, 1800000, 3600000, 21600000, 86400000)


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})


class ErrorType(str, enum.Enum):
    SCHEDULE_TIMEOUT = "SCHEDULE_TIMEOUT"
    RUNTIME_ENV_SETUP_FAILED = "RUNTIME_ENV_SETUP_FAILED"
    ENTRYPOINT_FAILED = "ENTRYPOINT_FAILED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_LOST = "NODE_LOST"
    NODE_SHUTDOWN = "NODE_SHUTDOWN"
    NODE_DISK_FULL = "NODE_DISK_FULL"
    INVALID_REQUEST = "INVALID_REQUEST"
    STOPPED_BY_USER = "STOPPED_BY_USER"
    RUNTIME_LIMIT = "RUNTIME_LIMIT"
    DEPENDENCY_FAILED = "DEPENDENCY_FAILED"
    PREEMPTED = "PREEMPTED"


ID_PREFIX = "app-"  # every job's id begins with it (openYuanrong's)


def with_prefix(submission_id: str) -> str:
    """The id as stored: ``1234`` is submitted as ``app-1234``."""
    return submission_id if submission_id.startswith(ID_PREFIX) else ID_PREFIX + submission_id


MAX_ATTEMPTS = 100  # of a retry policy
# What a retry policy may retry on: outcomes of an attempt that running it again can change.
RETRYABLE = (
    ErrorType.ENTRYPOINT_FAILED,
    ErrorType.NODE_LOST,
    ErrorType.RUNTIME_LIMIT,
    ErrorType.OUT_OF_MEMORY,
    ErrorType.NODE_SHUTDOWN,
    ErrorType.NODE_DISK_FULL,
    ErrorType.PREEMPTED,
)
RETRY_ON_DEFAULT = (ErrorType.ENTRYPOINT_FAILED, ErrorType.NODE_LOST)

# Resources whose units are devices with ids, and the variable that tells a job its own.
DEVICE_VARIABLES = {"GPU": "CUDA_VISIBLE_DEVICES", "NPU": "ASCEND_RT_VISIBLE_DEVICES"}


def to_milli(amount: Decimal | int) -> int:
    """Milli-units of a decimal amount, rounded up: 0.0001 CPU still asks for 1m.

    Exact for any number of digits (the default context would round at 28).
    """
    value = Decimal(amount)
    exact = Context(prec=len(value.as_tuple().digits) + 8)
    return math.ceil(exact.multiply(value, 1000))


def canonical_number(amount: Decimal | int) -> int | float:
    """A JSON number for a submitted amount: 3.0 -> 3, 0.5 -> 0.5."""
    value = Decimal(amount)
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def mebibytes(num_bytes: int) -> int:
    return -(-num_bytes // (1024 * 1024))


def show_amount(resource: str, amount: int) -> str:
    """An integer amount as the scheduling messages write it: 3000m, 128MB, 2."""
    if resource == CPU:
        return f"{amount}m"
    if resource == MEMORY:
        return f"{mebibytes(amount)}MB"
    return str(canonical_number(Decimal(amount) / 1000))


def utf8_bounds(data: bytes, start: int = 0, *, whole_end: bool = True) -> tuple[int, int]:
    """Where ``data[start:]`` begins and ends on whole UTF-8 characters.

    A start inside a character moves on to the next one (a log trimmed at its front,
    an offset from a client); with ``whole_end``, a last character not yet complete is
    left for later (output still coming).
    """
    begin = min(max(start, 0), len(data))
    while begin < len(data) and data[begin] & 0xC0 == 0x80:
        begin += 1
    end = len(data)
    if whole_end:
        for back in range(1, min(4, len(data) - begin) + 1):
            byte = data[-back]
            if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence complete?
                need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
                end = len(data) - back if need > back else end
                break
    return begin, end


class JobFields:
    """Field names of the job hash (``poolq:job:<ref>``); every value is a string.

    ``spec`` holds the immutable part of the record as a JSON object; the other
    fields change as the job moves through its life, each written by a Lua script.
    """

    SPEC = "spec"  # JSON: entrypoint, metadata, runtime_env, resources, labels, ids
    FINGERPRINT = "fp"  # digest of the normalised request, for idempotent resubmission
    STATUS = "status"
    MESSAGE = "message"
    ERROR_TYPE = "error_type"
    SUBMIT_TIME = "submit_time"
    START_TIME = "start_time"
    END_TIME = "end_time"
    DEADLINE = "deadline"  # ms, or "" for no scheduling deadline
    TIMEOUT_MS = "timeout_ms"
    SEQ = "seq"  # place in line: its sequence number less priority * PRIORITY_STEP (submit.lua)
    PRIORITY = "prio"  # its priority (absent: 0)
    DEPENDENCIES_LEFT = "deps_left"  # how many of its dependencies have not ended yet (absent: none)
    SHAPE = "shape"  # placement shape signature
    ATTEMPTS_BASE = "att_base"  # the shape's attempt count when the job joined it
    ATTEMPTS = "attempts"  # set when placed or failed
    REASONS = "reasons"  # JSON list, set when placed or failed
    NODE = "node"
    POOL = "pool"
    RESERVED = "res"  # what the job holds, "R=amount,..."; emptied when released
    EXIT_CODE = "exit_code"
    STOP = "stop"  # the token of the stop request, once one was made
    LOG_BASE = "log_base"  # bytes of output dropped from the front of the log tail
    LOG_LEN = "log_len"  # bytes the log tail holds
    LOST_CLAIMS = "lost_claims"  # placement workers that died while holding the job
    PLACED_TIME = "placed_time"  # ms, when its reservation was made
    CLAIM = "claim"  # the placement claim that reserved it
    RUNNER = "runner"  # the incarnation of the node agent that started it
    PACKAGE = "pkg"  # the uploaded package its working_dir names
    DEVICES = "devs"  # the devices it was given: "GPU:0:1000,GPU:1:500" (resource:id:milli-units)
    ATTEMPT = "attempt"  # which attempt this is (absent: the first)
    PREVIOUS = "prev"  # JSON list: the outcomes of its earlier attempts
    RETRY = "retry"  # its retry policy, "max attempts|OUTCOME,…|backoff ms"
    RUN_DEADLINE = "run_deadline"  # ms, when its runtime limit ends (set when it starts)
    RUN_LIMIT_BY = "run_limit_by"  # whose runtime limit that is: job, tenant or node
    GANG = "gang"  # the id of the gang it is a member of (absent: none)
    PREEMPTED_BY = "preempted_by"  # set with its stop flag when a job of higher priority preempts it: the message
    PREEMPT_UNTIL = "preempt_until"  # a waiting job's: ms until which the capacity it preempted is kept for it
    # A task of an array (poolq/lua/lib/array.lua):
    ARRAY_ID = "arr"  # the array's submission id
    ARRAY_INDEX = "aidx"  # its index in the array
    # An array's record (status ARRAY):
    ARRAY_COUNT = "acount"  # how many tasks it has
    ARRAY_NEXT = "anext"  # the next index placement creates a task for
    ARRAY_SKIP = "askip"  # tasks at or past the cursor created early (to be stopped alone)
    ARRAY_ENDED = "ended"  # the status its tasks not yet created took ("" while they wait)
    ARRAY_ERROR = "eerr"  # their error_type
    ARRAY_MESSAGE = "emsg"  # their message
    ARRAY_END_TIME = "eend"  # when they ended
    ARRAY_TEMPLATE = "tpl"  # JSON list: a task's spec text, cut where its index goes


ARRAY = "ARRAY"  # the status field of an array's record; its rendered status sums up its tasks'
TASK_COUNT_PREFIX = "n:"  # an array's record: "n:<status>" -> how many of its tasks are in it


def is_array(fields: Mapping[str, str]) -> bool:
    return fields.get(JobFields.STATUS) == ARRAY


def array_counts(fields: Mapping[str, str]) -> dict[str, int]:
    """How many of an array's tasks are in each status (those not yet created are PENDING)."""
    return {s.value: max(int(fields.get(TASK_COUNT_PREFIX + s.value) or 0), 0) for s in JobStatus}


def array_status(fields: Mapping[str, str]) -> str:
    """An array's status from its tasks': RUNNING while one runs, else PENDING while one
    waits, else FAILED if one failed, else STOPPED if one was stopped, else SUCCEEDED."""
    counts = array_counts(fields)
    for status in (JobStatus.RUNNING, JobStatus.PENDING, JobStatus.FAILED, JobStatus.STOPPED):
        if counts[status.value]:
            return status.value
    return JobStatus.SUCCEEDED.value


def task_fields(array: Mapping[str, str], index: int) -> dict[str, str]:
    """The record of an array's task that placement has not reached yet, made from the
    array's: PENDING, or how the array's uncreated tasks ended (no write on read)."""
    spec = str(index).join(json.loads(array[JobFields.ARRAY_TEMPLATE]))
    fields = {
        name: array[name]
        for name in (
            JobFields.SUBMIT_TIME,
            JobFields.DEADLINE,
            JobFields.TIMEOUT_MS,
            JobFields.SEQ,
            JobFields.SHAPE,
            JobFields.ATTEMPTS_BASE,
            JobFields.PRIORITY,
            JobFields.FINGERPRINT,
        )
        if name in array
    }
    fields.update({JobFields.SPEC: spec, JobFields.ARRAY_ID: json.loads(spec)["array_id"]})
    fields[JobFields.ARRAY_INDEX] = str(index)
    ended = array.get(JobFields.ARRAY_ENDED)
    if ended:
        array_id, task_id = fields[JobFields.ARRAY_ID], json.loads(spec)["submission_id"]
        message = array.get(JobFields.ARRAY_MESSAGE, "").replace(f"[{array_id}]", f"[{task_id}]", 1)
        fields.update(
            {
                JobFields.STATUS: ended,
                JobFields.ERROR_TYPE: array.get(JobFields.ARRAY_ERROR, ""),
                JobFields.MESSAGE: message,
                JobFields.END_TIME: array.get(JobFields.ARRAY_END_TIME, ""),
            }
        )
    else:
        fields[JobFields.STATUS] = JobStatus.PENDING.value
    return fields


@dataclasses.dataclass(frozen=True)
class Hold:
    """A node held for the jobs of one shape at one priority until a time (ms): its
    "hold" field, "priority|sig|until" (poolq/lua/hold.lua)."""

    priority: int
    sig: str
    until_ms: int

    @classmethod
    def parse(cls, text: str) -> Hold:
        priority, sig, until = text.split("|")
        return cls(int(priority), sig, int(until))


@dataclasses.dataclass(frozen=True)
class Taken:
    """Capacity of a node kept for one waiting job, whose preemption is freeing it, until a
    time (ms): the node's "taken" field, "ref|until|R=amount,…" (poolq/lua/preempt.lua).
    Other jobs may use only what the node has beyond it."""

    ref: str
    until_ms: int
    req: dict[str, int]

    @classmethod
    def parse(cls, text: str) -> Taken:
        ref, until, requests = text.split("|", 2)
        req = {}
        for item in filter(None, requests.split(",")):
            name, _, amount = item.partition("=")
            req[name] = int(amount)
        return cls(ref, int(until), req)


WAITING_FOR_DEPENDENCIES = "Waiting For Dependencies"  # its reason while dependencies have not ended
PRIORITY_STEP = 2**40  # one priority step in a place in line: above any sequence number


def priority_of(place: int) -> int:
    """The priority a job's place in line was made from (submit.lua: seq - priority * 2^40,
    1 <= seq < 2^40)."""
    return -(place // PRIORITY_STEP)


def render_record(fields: Mapping[str, str], shape: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job record of docs/jobs.md from a job hash (and its shape, while unplaced)."""
    spec = json.loads(fields[JobFields.SPEC])
    status = fields[JobFields.STATUS]
    array: dict[str, Any] | None = None
    if status == ARRAY:
        status = array_status(fields)
        fields = {**fields, JobFields.STATUS: status}
        tasks = array_counts(fields)
        array = {
            "count": int(fields[JobFields.ARRAY_COUNT]),
            "created": int(fields[JobFields.ARRAY_NEXT]) + int(fields.get(JobFields.ARRAY_SKIP) or 0),
            "tasks": tasks,
        }
    attempts, reasons = scheduling_progress(fields, shape)
    deadline = fields.get(JobFields.DEADLINE) or None
    message = fields.get(JobFields.MESSAGE) or describe(fields, attempts, reasons)
    if array is not None:
        tally = ", ".join(f"{n} {s}" for s, n in tasks.items() if n)
        message = f"array of {array['count']} tasks, {array['created']} created: {tally}"
    return {
        "type": "SUBMISSION",
        "job_id": None,
        "submission_id": spec["submission_id"],
        "tenant_id": spec["tenant_id"],
        "entrypoint": spec["entrypoint"],
        "status": status,
        "message": message,
        "error_type": fields.get(JobFields.ERROR_TYPE) or None,
        "metadata": spec["metadata"],
        "runtime_env": spec["runtime_env"],
        "entrypoint_num_cpus": spec["entrypoint_num_cpus"],
        "entrypoint_num_gpus": spec["entrypoint_num_gpus"],
        "entrypoint_memory": spec["entrypoint_memory"],
        "entrypoint_resources": spec["entrypoint_resources"],
        "entrypoint_label_selector": spec["entrypoint_label_selector"],
        "pool_label": spec["pool_label"],
        "submit_time": int(fields[JobFields.SUBMIT_TIME]),
        "start_time": _int_or_none(fields.get(JobFields.START_TIME)),
        "end_time": _int_or_none(fields.get(JobFields.END_TIME)),
        "driver_node_id": fields.get(JobFields.NODE) or None,
        "pool": fields.get(JobFields.POOL) or None,
        "driver_exit_code": _int_or_none(fields.get(JobFields.EXIT_CODE)),
        "driver_info": None,
        "driver_agent_http_address": None,
        # poolq's own: what the job was given and how often it ran (docs/running.md)
        "devices": devices_of(fields.get(JobFields.DEVICES) or ""),
        "runtime_limit_s": spec.get("runtime_limit_s"),
        "run_deadline": _int_or_none(fields.get(JobFields.RUN_DEADLINE)),
        "retry_policy": spec.get("retry_policy"),
        "priority": int(fields.get(JobFields.PRIORITY) or 0),
        "depends_on": spec.get("depends_on"),
        "gang_id": spec.get("gang_id"),
        "array": array,
        "array_id": spec.get("array_id"),
        "array_index": spec.get("array_index"),
        "attempt_number": int(fields.get(JobFields.ATTEMPT) or 1),
        "previous_attempts": [_attempt(a) for a in json.loads(fields.get(JobFields.PREVIOUS) or "[]")],
        "scheduling": {
            "attempts": attempts,
            "deadline": int(deadline) if deadline else None,
            "reasons": reasons,
        },
    }


def scheduling_progress(fields: Mapping[str, str], shape: Mapping[str, str] | None) -> tuple[int, list[dict[str, Any]]]:
    """Attempts and latest reasons: frozen on the job once placed or failed, else its shape's."""
    if fields.get(JobFields.ATTEMPTS):
        return int(fields[JobFields.ATTEMPTS]), json.loads(fields.get(JobFields.REASONS) or "[]")
    if fields.get(JobFields.DEPENDENCIES_LEFT) and fields.get(JobFields.STATUS) == JobStatus.PENDING:
        return 0, [
            {"reason": WAITING_FOR_DEPENDENCIES, "units": int(fields[JobFields.DEPENDENCIES_LEFT]), "requirement": None}
        ]
    if not shape:
        return 0, []
    attempts = int(shape.get("attempts") or 0) - int(fields.get(JobFields.ATTEMPTS_BASE) or 0)
    return max(attempts, 0), json.loads(shape.get("reasons") or "[]") if attempts > 0 else []


def describe(fields: Mapping[str, str], attempts: int, reasons: list[dict[str, Any]]) -> str:
    """A sentence for a job whose scripts left no message: where it is in its life."""
    status = fields[JobFields.STATUS]
    node = fields.get(JobFields.NODE)
    if status == JobStatus.PENDING:
        if fields.get(JobFields.STOP):
            return "stop requested"
        if node:
            return f"placed on node {node} in pool {fields.get(JobFields.POOL)}; waiting for its agent to start it"
        if fields.get(JobFields.DEPENDENCIES_LEFT):
            return f"waiting for {fields[JobFields.DEPENDENCIES_LEFT]} of its dependencies to end"
        if attempts == 0:
            return "waiting for placement"
        summary = "; ".join(f"{r['units']} unit with [{r['reason']}]" for r in reasons)
        return f"waiting for placement: no node fits yet ({attempts} attempts; {summary})"
    if status == JobStatus.RUNNING:
        return f"running on node {node}"
    return status.lower()


def held_devices(held: str) -> list[tuple[str, str, int]]:
    """A job's devices as reserve.lua records them ("GPU:0:1000,GPU:1:500"): (resource, id, milli)."""
    out = []
    for item in filter(None, held.split(",")):
        name, device, milli = item.split(":")
        out.append((name, device, int(milli)))
    return out


def devices_of(held: str) -> dict[str, list[str]]:
    """A job's devices by resource: {"GPU": ["0", "1"]}."""
    out: dict[str, list[str]] = {}
    for name, device, _ in held_devices(held):
        out.setdefault(name, []).append(device)
    return out


def _attempt(entry: dict[str, Any]) -> dict[str, Any]:
    """An earlier attempt as the record shows it (finish.lua keeps it as it ended)."""
    return {
        "attempt_number": entry.get("attempt"),
        "status": entry.get("status"),
        "error_type": entry.get("error_type"),
        "message": entry.get("message"),
        "node": entry.get("node") or None,
        "devices": devices_of(entry.get("devices") or ""),
        "start_time": entry.get("start_time"),
        "end_time": entry.get("end_time"),
        "driver_exit_code": entry.get("exit_code"),
    }


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None
