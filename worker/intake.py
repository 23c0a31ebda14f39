"""Jobs published straight onto the ``poolq.submit`` queue (DESIGN.md 5).

A valid message becomes a job exactly as an HTTP submission does. Without a
submission_id in the body the id is derived from the Celery message id, so a
redelivered message finds its job instead of making a second one. An invalid
message is never dropped silently: it is counted and logged, and when it names a
usable submission_id, that id polls as FAILED with ``INVALID_REQUEST``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from poolq import keys
from poolq.errors import Conflict, InvalidRequest
from poolq.schemas import TENANT, normalise_submission_id, parse_json
from poolq.store import JobStore

log = logging.getLogger("poolq.intake")

UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
INVALID_COUNTER = "invalid_messages"


def id_from_message(message_id: str | None) -> str:
    """``app-<uuid>`` from a Celery message id (a digest when it is not a UUID)."""
    text = str(message_id or "")
    if UUID.fullmatch(text):
        return "app-" + text.lower()
    return "app-" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def submit_message(
    store: JobStore, message_id: str | None, body: Any, tenant_id: Any, pool_label: Any, schedule_timeout_ms: Any
) -> str | None:
    """Validate and store one queued job; returns its submission id, or None if refused."""
    try:
        # Celery's JSON decoder gives floats; re-read them as exact decimals, as HTTP does.
        exact = parse_json(json.dumps(body).encode())
        job = store.prepare(
            exact,
            tenant=_text_or_none(tenant_id, "tenant_id"),
            pool_label=_text_or_none(pool_label, "pool_label"),
            schedule_timeout_ms=_text_or_none(schedule_timeout_ms, "schedule_timeout_ms", allow_int=True),
            default_id=lambda: id_from_message(message_id),
        )
    except InvalidRequest as exc:
        _record_invalid(store, body, tenant_id, exc.fields)
        return None
    except (TypeError, ValueError, RecursionError, ArithmeticError) as exc:
        _record_invalid(store, body, tenant_id, {"body": [f"is not JSON-serialisable: {exc}"]})
        return None
    try:
        store.submit(job)
    except InvalidRequest as exc:  # the job alone exceeds its tenant's quota
        _record_invalid(store, body, tenant_id, exc.fields)
        return None
    except Conflict as exc:
        store.redis.hincrby(keys.STATS, INVALID_COUNTER, 1)
        log.warning("queued job refused: %s", exc)
        return None
    return job.submission_id


def _text_or_none(value: Any, name: str, allow_int: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise InvalidRequest({name: ["must be a string"]})


def _record_invalid(store: JobStore, body: Any, tenant_id: Any, fields: dict[str, list[str]]) -> None:
    store.redis.hincrby(keys.STATS, INVALID_COUNTER, 1)
    problems = "; ".join(f"{path}: {', '.join(messages)}" for path, messages in sorted(fields.items()))
    submission_id = _named_id(body)
    tenant = tenant_id.strip() if isinstance(tenant_id, str) and tenant_id.strip() else "default"
    log.warning("invalid queued job %s (tenant %s): %s", submission_id or "(no submission_id)", tenant, problems)
    if submission_id is None or not TENANT.fullmatch(tenant):
        return
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
    store.scripts.record_invalid(
        keys=[
            keys.job(job_ref),
            keys.tenant_jobs(tenant),
            keys.TERMINAL,
            keys.SEQ,
            keys.tenant_counts(tenant),
            keys.TENANTS,
        ],
        args=[json.dumps(spec), f"invalid job request: {problems}", submission_id, job_ref, tenant],
    )


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
