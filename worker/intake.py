"""Jobs published straight onto the ``poolq.submit`` queue (docs/api.md, "Queue publishers").

Publishers send plain Celery messages (``send_task("poolq.submit", …)``), which kombu
puts on the Redis list ``poolq.submit``. poolq consumes that list itself rather than
through a Celery worker, because kombu's Redis consumer can lose a message under a
single fault: it pops a message and records it as unacknowledged in a later step, so
a reply lost in between loses it, and a retry that cannot be published drops it.
Here every message moves, in one atomic step, from the queue to the consumer's own
``taken`` list (intake_take.lua) and leaves it only once handled: after an error the
consumer handles its list again, and the sweep puts the list of a consumer that
stopped back on the queue (Duties.recover_intake). Handling is idempotent by message
id: without a submission_id in the body, the job's id is derived from the message id,
so a message handled twice finds its job instead of making a second one.

A valid message becomes a job exactly as an HTTP submission does. An invalid message
is never dropped silently: it is counted and logged, and when it names a usable
submission_id, that id polls as FAILED with ``INVALID_REQUEST``. A message whose
tenant has its maximum of pending jobs waits aside (intake_defer.lua) and comes back.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from decimal import Decimal
from typing import Any

import redis

from poolq import keys, queues
from poolq.errors import Conflict, InvalidRequest, PoolqError, TooMany, Unavailable
from poolq.redis_io import connect
from poolq.schemas import TENANT, normalise_submission_id, parse_json
from poolq.store import JobStore, NewJob

log = logging.getLogger("poolq.intake")

UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
INVALID_COUNTER = "invalid_messages"
KOMBU_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: a list per priority step, 0 taken first
QUEUE_LISTS = [queues.SUBMIT, *(f"{queues.SUBMIT}{KOMBU_PRIORITY_SEP}{p}" for p in (3, 6, 9))]
TAKE = 100  # messages taken at once; they are stored in one round trip
BLOCK_S = 1.0  # how long an idle consumer waits on the queue before it beats again
FULL_TENANT_WAIT_MS = 2000  # a message whose tenant is at its max pending comes back after this
KWARGS = ("body", "tenant_id", "pool_label", "schedule_timeout_ms")


def id_from_message(message_id: str | None) -> str:
    """``app-<uuid>`` from a Celery message id (a digest when it is not a UUID)."""
    text = str(message_id or "")
    if UUID.fullmatch(text):
        return "app-" + text.lower()
    return "app-" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclasses.dataclass
class Message:
    """A queue message, decoded: its Celery message id and the task's keyword arguments."""

    raw: str
    message_id: str | None
    kwargs: dict[str, Any]
    eta_ms: int | None = None  # a message sent with a countdown waits until then


class BadMessage(Exception):
    """A queue message that is not a poolq.submit task poolq can read."""


def decode(raw: str) -> Message:
    """A Celery message (protocol 2, or 1) with a JSON body; BadMessage otherwise."""
    try:
        envelope = json.loads(raw)
        properties = envelope.get("properties") or {}
        headers = envelope.get("headers") or {}
        body = envelope["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if envelope.get("content-type") != "application/json":
            raise BadMessage(f"content-type {envelope.get('content-type')!r}: poolq reads application/json only")
        payload = parse_json(body if isinstance(body, bytes) else str(body).encode())
    except BadMessage:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ArithmeticError) as exc:
        raise BadMessage(f"not a Celery message with a JSON body: {exc}") from None
    if "task" in headers:  # protocol 2: [args, kwargs, embed]
        task, message_id = headers.get("task"), headers.get("id")
        args, kwargs = (payload[0], payload[1]) if isinstance(payload, list) and len(payload) >= 2 else (None, None)
        eta = headers.get("eta")
    else:  # protocol 1
        payload = payload if isinstance(payload, dict) else {}
        task, message_id, args, kwargs = (
            payload.get("task"),
            payload.get("id"),
            payload.get("args"),
            payload.get("kwargs"),
        )
        eta = payload.get("eta")
    if task != queues.SUBMIT:
        raise BadMessage(f"a message for task {task!r} on the {queues.SUBMIT} queue")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise BadMessage("args must be a list and kwargs an object")
    if len(args) > len(KWARGS):
        raise BadMessage(f"at most {len(KWARGS)} arguments: {', '.join(KWARGS)}")
    merged = {**dict(zip(KWARGS, args)), **kwargs}
    unknown = sorted(set(merged) - set(KWARGS))
    if unknown:
        raise BadMessage(f"unknown arguments {', '.join(unknown)}; poolq.submit takes {', '.join(KWARGS)}")
    return Message(raw, None if message_id is None else str(message_id), merged, _eta_ms(eta))


def _eta_ms(eta: Any) -> int | None:
    if not isinstance(eta, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(eta)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def prepare(store: JobStore, message: Message) -> NewJob:
    """Validate a message's job like an HTTP submission; InvalidRequest names what is wrong."""
    kwargs = message.kwargs
    job = store.prepare(
        kwargs.get("body"),
        tenant=_text_or_none(kwargs.get("tenant_id"), "tenant_id"),
        pool_label=_text_or_none(kwargs.get("pool_label"), "pool_label"),
        schedule_timeout_ms=_text_or_none(kwargs.get("schedule_timeout_ms"), "schedule_timeout_ms", allow_int=True),
        default_id=lambda: id_from_message(message.message_id),
    )
    if job.gang_id:  # messages come one by one: a gang would be placed in parts, or never
        raise InvalidRequest({"gang_id": ["a gang is formed from one request: send it to POST /api/jobs/batch"]})
    return job


def _text_or_none(value: Any, name: str, allow_int: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise InvalidRequest({name: ["must be a string"]})


class Intake:
    """One consumer of the poolq.submit queue, run in a thread of a placement worker."""

    def __init__(self, store: JobStore):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.taken_key = keys.taken(self.consumer)
        # The blocking wait needs a socket timeout longer than the wait itself.
        self.blocking = connect(store.settings, timeout_s=store.settings.redis_timeout_s + BLOCK_S)
        self.last_beat = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Take and handle messages until ``stop``. After an error the messages already
        taken come back from the next take (the reply that moved them may be what was
        lost), so each is handled until it is done."""
        delay = 0.1
        while not stop.is_set():
            try:
                self.handle(self.take())
                delay = 0.1
            except (redis.RedisError, Unavailable) as exc:
                log.warning("the poolq.submit consumer lost Redis (%s); retrying in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                log.exception("the poolq.submit consumer failed; retrying")
                stop.wait(1.0)

    def take(self) -> list[str]:
        """The messages taken and not yet handled, else new ones (waiting up to BLOCK_S)."""
        messages = self.store.scripts.intake_take(
            keys=[keys.INTAKE_CONSUMERS, self.taken_key, keys.INTAKE_DELAYED, *QUEUE_LISTS],
            args=[self.consumer, TAKE],
        )
        self.last_beat = time.monotonic()
        if messages:
            return list(messages)
        one = self.blocking.blmove(queues.SUBMIT, self.taken_key, BLOCK_S, "RIGHT", "LEFT")
        return [one] if one else []

    def handle(self, raws: list[str]) -> None:
        """Turn taken messages into jobs, then let go of each one that is done."""
        done: list[str] = []
        waiting: list[tuple[str, int]] = []  # (message, ms to wait)
        jobs: list[tuple[Message, NewJob]] = []
        now_ms = int(time.time() * 1000)
        for raw in raws:
            try:
                message = decode(raw)
            except BadMessage as exc:
                self._count_invalid()
                log.warning("dropping a message on %s: %s", queues.SUBMIT, exc)
                done.append(raw)
                continue
            if message.eta_ms is not None and message.eta_ms > now_ms:
                waiting.append((raw, message.eta_ms - now_ms))
                continue
            try:
                jobs.append((message, prepare(self.store, message)))
            except InvalidRequest as exc:
                self.record_invalid(message, exc.fields)
                done.append(raw)
            except Exception as exc:  # a message poolq cannot handle must not come back forever
                log.exception("dropping a message on %s that could not be handled", queues.SUBMIT)
                self.record_invalid(message, {"body": [f"could not be handled: {exc!r}"]})
                done.append(raw)
        outcomes = self.store.submit_many(job for _, job in jobs) if jobs else []
        for (message, job), outcome in zip(jobs, outcomes):
            if isinstance(outcome, Unavailable):
                raise outcome  # its outcome is unknown: handled again from the taken list
            if isinstance(outcome, TooMany):
                waiting.append((message.raw, FULL_TENANT_WAIT_MS))
                continue
            if isinstance(outcome, InvalidRequest):  # the job alone exceeds its tenant's quota
                self.record_invalid(message, outcome.fields)
            elif isinstance(outcome, Conflict):
                self._count_invalid()
                log.warning("queued job refused: %s", outcome)
            elif isinstance(outcome, PoolqError):
                log.warning("queued job %s refused: %s", job.submission_id, outcome)
            done.append(message.raw)
        self._release(done, waiting)

    def _release(self, done: list[str], waiting: list[tuple[str, int]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for raw in done:
            pipe.lrem(self.taken_key, 1, raw)
        for raw, wait_ms in waiting:
            self.store.scripts.intake_defer(
                keys=[self.taken_key, keys.INTAKE_DELAYED], args=[raw, wait_ms], client=pipe
            )
        pipe.execute()

    def leave(self) -> None:
        """A clean stop: put back what is taken and not handled, and forget this consumer."""
        try:
            return_taken(self.store, self.consumer, cutoff_ms=2**62)
        except redis.RedisError as exc:
            log.warning("could not put taken queue messages back (%s); the sweep will", exc)

    def alive(self, lease_s: float) -> bool:
        return time.monotonic() - self.last_beat < lease_s

    def _count_invalid(self) -> None:
        self.redis.hincrby(keys.STATS, INVALID_COUNTER, 1)

    def record_invalid(self, message: Message, fields: dict[str, list[str]]) -> None:
        """Count and log an invalid message; record FAILED / INVALID_REQUEST under the id it names."""
        self._count_invalid()
        problems = "; ".join(f"{path}: {', '.join(messages)}" for path, messages in sorted(fields.items()))
        body, tenant_id = message.kwargs.get("body"), message.kwargs.get("tenant_id")
        submission_id = _named_id(body)
        tenant = tenant_id.strip() if isinstance(tenant_id, str) and tenant_id.strip() else "default"
        log.warning("invalid queued job %s (tenant %s): %s", submission_id or "(no submission_id)", tenant, problems)
        if submission_id is None or not TENANT.fullmatch(tenant):
            return
        assert isinstance(body, dict)
        entrypoint = body.get("entrypoint") if isinstance(body.get("entrypoint"), str) else ""
        spec: dict[str, Any] = {
            "submission_id": submission_id,
            "tenant_id": tenant,
            "entrypoint": entrypoint,
            "metadata": {},
            "runtime_env": {},
            "entrypoint_num_cpus": 0,
            "entrypoint_num_gpus": 0,
            "entrypoint_memory": 0,
            "entrypoint_resources": {},
            "entrypoint_label_selector": {},
            "pool_label": None,
        }
        job_ref = keys.ref(tenant, submission_id)
        self.store.scripts.record_invalid(
            keys=[
                keys.job(job_ref),
                keys.tenant_jobs(tenant),
                keys.TERMINAL,
                keys.SEQ,
                keys.tenant_counts(tenant),
                keys.TENANTS,
            ],
            args=[json.dumps(spec, default=_plain), f"invalid job request: {problems}", submission_id, job_ref, tenant],
        )


def return_taken(store: JobStore, consumer: str, cutoff_ms: int) -> int:
    """Put a stopped consumer's taken messages back on the queue (-1: it is alive)."""
    return int(
        store.scripts.intake_recover(
            keys=[keys.INTAKE_CONSUMERS, keys.taken(consumer), queues.SUBMIT], args=[consumer, cutoff_ms]
        )
    )


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else str(value)


def _named_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for name in ("submission_id", "job_id"):
        value = body.get(name)
        if isinstance(value, str):
            try:
                return normalise_submission_id(value)
            except Exception:
                return None
    return None
