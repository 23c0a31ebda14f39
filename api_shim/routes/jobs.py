"""/api/jobs: submit (one or a batch), poll, list, follow changes, stop, delete, logs, the log tail's handshake."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from typing import Any, Iterator
from urllib.parse import quote, urlencode

from api_shim.follow import LogFollow
from api_shim.http import JSON, WEBSOCKET, HTTPError, Request, Response, Stream, is_digits
from poolq import tokens
from poolq.changes import CURSOR, MAX_CHANGES, Change, Page
from poolq.errors import InvalidRequest, PoolqError, Unavailable
from poolq.model import JobFields, JobStatus, render_record
from poolq.schemas import MAX_ARRAY_TASKS, check_headers, parse_json
from poolq.settings import Settings
from poolq.store import JobStore, NewJob, form_gangs

MAX_BATCH = 1000
MAX_IDS = 100
MAX_LIMIT = 1000
MAX_WAIT_S = 60.0
HEARTBEAT_S = 15.0  # an event stream with nothing to say sends a comment this often
FOLLOW_IDLE_S = 600.0  # a log follow ends after this long without output (a client that left goes unseen until then)
TOO_MANY_STREAMS = (
    "this server process holds as many waiting requests and streams as it may (POOLQ_MAX_WAITERS); retry, "
    "or poll: GET /api/jobs/changes?since=C, GET /api/jobs/{id}/logs?offset=N"
)
FEED_LEFT_BEHIND = (
    "this stream fell behind the oldest change the feed keeps: list the jobs again, then follow from cursor"
)
TAIL_OFF = (
    "this server does not serve log tails over WebSocket (POOLQ_API_WEBSOCKETS=0, or not run by `poolq api`): "
    "follow a job with GET /api/jobs/{id}/logs?offset=N"
)
log = logging.getLogger("poolq.api")
HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")  # a name, IPv4 or a bracketed IPv6


class Jobs:
    """The /api/jobs routes, built with the store they use."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store, self.settings = store, settings
        # Requests holding their answer (a submission's `Prefer: wait`, a wait for changes)
        # may take at most this many of a process's server threads; beyond it they answer
        # at once (docs/api.md).
        self.waiters = threading.BoundedSemaphore(settings.max_waiters)

    def submit(self, request: Request) -> Response:
        try:
            body = json_body(request, self.settings.max_body)
            job = self.store.prepare(
                body,
                tenant=request.tenant_as_given(),
                pool_label=request.header("X-Pool-Label"),
                schedule_timeout_ms=request.header("X-Schedule-Timeout-Ms"),
            )
        except InvalidRequest:
            self.store.count_invalid(request.tenant_as_given())
            raise
        self.store.submit(job)  # a failure to store says "create app failed, submissionId:[...]"
        answer = {"submission_id": job.submission_id, "job_id": job.submission_id}
        wait_s = prefer_wait(request.header("Prefer"))
        if wait_s is None or job.array_count or not self.waiters.acquire(blocking=False):
            return Response.json(answer)
        try:
            failure = self.store.wait_placed(job.ref, wait_s)
        finally:
            self.waiters.release()
        applied = [("Preference-Applied", f"wait={wait_s:g}")]
        if failure is not None:
            return Response.json({"error": failure}, 503, applied)
        return Response.json(answer, headers=applied)

    def submit_batch(self, request: Request) -> Response:
        """Many jobs in one request: each validated on its own, all valid ones stored in one pipeline."""
        body = json_body(request, self.settings.max_batch_body)
        if not isinstance(body, dict) or set(body) != {"jobs"} or not isinstance(body["jobs"], list):
            raise InvalidRequest({"body": ['must be an object with one key, "jobs": a list of job bodies']})
        if len(body["jobs"]) > MAX_BATCH:
            raise InvalidRequest({"jobs": [f"must hold at most {MAX_BATCH} jobs"]})
        header_errors, _ = check_headers(
            request.tenant_as_given(),
            request.header("X-Pool-Label"),
            request.header("X-Schedule-Timeout-Ms"),
        )
        if header_errors:  # they apply to every job: refuse the batch, not each item
            raise InvalidRequest(header_errors)
        results: list[dict[str, Any]] = []
        valid = []
        broken: set[str] = set()
        for item in body["jobs"]:
            try:
                job = self.store.prepare(
                    item,
                    tenant=request.tenant_as_given(),
                    pool_label=request.header("X-Pool-Label"),
                    schedule_timeout_ms=request.header("X-Schedule-Timeout-Ms"),
                )
            except InvalidRequest as exc:
                results.append({"error": str(exc), "fields": exc.fields})
                self.store.count_invalid(request.tenant_as_given())
                if isinstance(item, dict) and isinstance(item.get("gang_id"), str):
                    broken.add(item["gang_id"])  # its gang cannot be formed whole
                continue
            valid.append((len(results), job))
            results.append({})
        formed = form_gangs([job for _, job in valid], frozenset(broken))
        for (position, _), job_or_error in zip(valid, formed):
            if isinstance(job_or_error, PoolqError):
                results[position] = {"error": str(job_or_error), "fields": getattr(job_or_error, "fields", {})}
        valid = [(position, job) for (position, _), job in zip(valid, formed) if isinstance(job, NewJob)]
        outcomes = self.store.submit_many(job for _, job in valid)
        unknown = [outcome for outcome in outcomes if isinstance(outcome, Unavailable)]
        if unknown and len(unknown) == len(outcomes):
            raise Unavailable(
                f"create app failed for the batch, err: {unknown[0]}; send the same batch again (items without a "
                "submission_id get new ids: give every item one, so that sending it again cannot duplicate it)"
            )
        for (position, job), outcome in zip(valid, outcomes):
            if isinstance(outcome, InvalidRequest):
                results[position] = {"error": str(outcome), "fields": outcome.fields}
            elif isinstance(outcome, PoolqError):
                results[position] = {"error": str(outcome)}
            else:
                results[position] = {"submission_id": job.submission_id}
        return Response.json({"results": results})

    def get(self, request: Request) -> Response:
        fields, shape = self.store.read(request.tenant_or_400(), request.params["submission_id"])
        etag = '"' + _digest(fields, shape) + '"'
        if _etag_matches(request.header("If-None-Match"), etag):
            return Response(304, headers=[("ETag", etag)])
        return Response.json(render_record(fields, shape), headers=[("ETag", etag)])

    def list_jobs(self, request: Request) -> Response:
        store, tenant = self.store, request.tenant_or_400()
        errors: dict[str, list[str]] = {}
        status = _status_param(request.query("status"), errors)
        pool_label = request.query("pool_label")
        limit = _int_param(request.query("limit"), "limit", 1, MAX_LIMIT, errors, default=100) or 100
        cursor = _int_param(request.query("cursor"), "cursor", 1, 2**62, errors)
        ids_text = request.query("ids")
        ids = [i for i in (ids_text or "").split(",") if i] if ids_text is not None else None
        if ids is not None and len(ids) > MAX_IDS:
            errors["ids"] = [f"must list at most {MAX_IDS} ids"]
        array_id = request.query("array") or None
        start = _int_param(request.query("start"), "start", 0, MAX_ARRAY_TASKS, errors, default=0) or 0
        if errors:
            raise InvalidRequest(errors, "invalid query")
        if ids is not None:
            records = [r for r in store.get_many(tenant, ids) if status is None or r["status"] == status]
            if pool_label is not None:
                records = [r for r in records if r["pool_label"] == pool_label]
            if array_id is not None:
                records = [r for r in records if r["array_id"] == array_id]
            return Response.json(records)
        if array_id is not None:  # the array's tasks, paged by index (start), not by cursor
            return self._list_tasks(tenant, array_id, status, pool_label, limit, start)
        records, next_cursor = store.list_jobs(tenant, status=status, pool_label=pool_label, limit=limit, before=cursor)
        headers = []
        if next_cursor is not None:
            query = {
                k: v for k, v in (("status", status and status.value), ("pool_label", pool_label)) if v is not None
            }
            query.update(limit=str(limit), cursor=str(next_cursor))
            headers.append(("Link", f'</api/jobs?{urlencode(query)}>; rel="next"'))
        return Response.json(records, headers=headers)

    def changes(self, request: Request) -> Response:
        """The tenant's job changes after a cursor, oldest first (docs/api.md, "Following
        changes"); with ``wait``, held until there is one or the wait ends; with
        ``Accept: text/event-stream``, sent as Server-Sent Events as they come."""
        tenant = request.tenant_or_400()
        errors: dict[str, list[str]] = {}
        since = request.query("since")
        if since is not None and not CURSOR.fullmatch(since):
            errors["since"] = ['must be a cursor this route answered ("<ms>-<n>")']
        limit = _int_param(request.query("limit"), "limit", 1, MAX_CHANGES, errors, default=MAX_CHANGES) or 1
        wait_s = _seconds_param(request.query("wait"), "wait", MAX_WAIT_S, errors)
        events = "text/event-stream" in (request.header("Accept") or "")
        if events and since is None and request.header("Last-Event-ID") is not None:
            since = request.header("Last-Event-ID")  # an EventSource resuming
            if not CURSOR.fullmatch(since or ""):
                errors["Last-Event-ID"] = ['must be the id of an event this route sent ("<ms>-<n>")']
        if errors:
            raise InvalidRequest(errors, "invalid query")
        if events:
            return self._change_events(tenant, since, limit)
        headers: list[tuple[str, str]] = []
        holds = since is not None and wait_s > 0 and self.waiters.acquire(blocking=False)
        if since is not None and wait_s > 0 and not holds:
            headers.append(("Retry-After", "1"))  # this process holds all the waits it may: ask again then
        try:
            page = self._first_page(tenant, since, limit, wait_s if holds else 0.0)
        finally:
            if holds:
                self.waiters.release()
        return Response.json({"changes": self._render(tenant, page.changes), "cursor": page.cursor}, headers=headers)

    def _first_page(self, tenant: str, since: str | None, limit: int, wait_s: float) -> Page:
        page = self.store.changes.read(tenant, since, limit, wait_s)
        if page.gone:
            raise HTTPError(
                410,
                f"cursor {since} is older than the oldest change the feed keeps: list the jobs again, then follow "
                "from the cursor of this answer (the feed's position now)",
                cursor=page.cursor,
            )
        return page

    def _render(self, tenant: str, changes: list[Change]) -> list[dict[str, Any]]:
        """The changes as the API shows them, each with its record's ETag now."""
        records = self.store.read_many(tenant, {c.submission_id for c in changes})
        etags = {i: '"' + _digest(fields, shape) + '"' for i, (fields, shape) in records.items()}
        return [
            {
                "submission_id": c.submission_id,
                "status": c.status,
                "node": c.node,
                "time": c.time_ms,
                "cursor": c.cursor,
                "etag": etags.get(c.submission_id),
            }
            for c in changes
        ]

    def _change_events(self, tenant: str, since: str | None, limit: int) -> Response:
        """The change feed as Server-Sent Events: each change an event whose id is its cursor
        (an EventSource resumes with it as Last-Event-ID), a comment every HEARTBEAT_S while
        none comes (which is how a client that left is noticed), and a last event saying
        why the stream ended, if it ends: ``gone`` (as the 410) or ``error`` (as the 503)."""
        page = self._first_page(tenant, since, limit, 0.0)  # a 410 or 503 is an answer, before any event

        def events() -> Iterator[bytes]:
            nonlocal page
            start = since or page.cursor  # where a client that resumes from the first event starts
            chunk = b"retry: 1000\n" + _event("cursor", start, {"cursor": start})
            while True:
                try:
                    if page.changes:
                        rendered = self._render(tenant, page.changes)
                        chunk += b"".join(_event("change", c["cursor"], c) for c in rendered)
                    yield chunk or b": nothing new\n\n"
                    chunk = b""
                    page = self.store.changes.read(tenant, page.cursor, limit, HEARTBEAT_S)
                except Unavailable as exc:  # the client's EventSource reconnects from its last id
                    yield _event("error", None, {"error": str(exc)})
                    return
                if page.gone:
                    yield _event("gone", None, {"error": FEED_LEFT_BEHIND, "cursor": page.cursor})
                    return

        return self._stream(events(), [("Content-Type", "text/event-stream")])

    def _list_tasks(
        self, tenant: str, array_id: str, status: JobStatus | None, pool_label: str | None, limit: int, start: int
    ) -> Response:
        records, next_start = self.store.list_tasks(tenant, array_id, status=status, limit=limit, start=start)
        if pool_label is not None:  # every task has the array's
            records = [r for r in records if r["pool_label"] == pool_label]
        headers = []
        if next_start is not None:
            query = {"array": array_id, **({"status": status.value} if status else {})}
            if pool_label is not None:
                query["pool_label"] = pool_label
            query.update(limit=str(limit), start=str(next_start))
            headers.append(("Link", f'</api/jobs?{urlencode(query)}>; rel="next"'))
        return Response.json(records, headers=headers)

    def delete(self, request: Request) -> Response:
        self.store.delete(request.tenant_or_400(), request.params["submission_id"])
        return Response.json({"deleted": True})

    def stop(self, request: Request) -> Response:
        stopped = self.store.stop(request.tenant_or_400(), request.params["submission_id"])
        return Response.json({"stopped": stopped})

    def logs(self, request: Request) -> Response:
        offset_text = request.query("offset")
        offset = None
        if offset_text is not None:
            if not is_digits(offset_text) or len(offset_text) > 18:
                raise InvalidRequest({"offset": ["must be a non-negative integer"]}, "invalid query")
            offset = int(offset_text)
        follow = request.query("follow")
        if follow not in (None, "0", "1", "true", "false"):
            raise InvalidRequest({"follow": ["must be 1 or 0 (true or false)"]}, "invalid query")
        tenant, submission_id = request.tenant_or_400(), request.params["submission_id"]
        if follow in ("1", "true"):
            return self._follow_logs(tenant, submission_id, offset or 0)
        text, next_offset = self.store.logs(tenant, submission_id, offset)
        return Response.json({"logs": text}, headers=[("X-Log-Offset", str(next_offset))])

    def _follow_logs(self, tenant: str, submission_id: str, offset: int) -> Response:
        """The job's output as it is written (docs/api.md): plain text, chunked, ending when
        the job has ended and all was sent, or after FOLLOW_IDLE_S without output (resume
        with ``offset``: X-Log-Start plus the bytes received)."""
        first = self.store.log_since(tenant, submission_id, offset)  # a 404 or 503 is an answer, before any output
        follow = LogFollow(self.store, tenant, submission_id, first.offset, self.settings.log_tail_poll_s)
        start = first.offset - len(first.data)

        def output() -> Iterator[bytes]:
            read, quiet_since = first, time.monotonic()
            while True:
                if read.data:
                    yield read.data
                    quiet_since = time.monotonic()
                if read.ended or time.monotonic() - quiet_since > FOLLOW_IDLE_S:
                    return
                time.sleep(follow.wait)
                try:
                    read = follow.read(time.monotonic())
                except Unavailable:
                    log.warning("the log follow of %s ended: Redis has not answered for a while", submission_id)
                    return

        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Log-Start", str(start)),
        ]
        return self._stream(output(), headers)

    def _stream(self, chunks: Iterator[bytes], headers: list[tuple[str, str]]) -> Response:
        """An answer sent as it is made, holding one of the waiters' slots until it ends
        (none free: 503). Nothing of ``chunks`` has run yet: it starts with the first write."""
        if not self.waiters.acquire(blocking=False):
            raise HTTPError(503, TOO_MANY_STREAMS, [("Retry-After", "1")])
        headers = [*headers, ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")]
        return Response(200, headers=headers, stream=Stream(chunks, self.waiters.release))

    def tail(self, request: Request) -> Response:
        """The log tail's handshake, for a job the tenant can see (api_shim/tail.py): here a
        redirect, with a ticket, to the server of tails; there, where the ticket made the
        tenant, the go-ahead."""
        tenant, submission_id = request.tenant_or_400(), request.params["submission_id"]
        self.store.read(tenant, submission_id)
        if request.environ.get(WEBSOCKET):
            return Response(200)
        if not self.settings.serves_tails:
            raise HTTPError(501, TAIL_OFF)
        if (request.header("Upgrade") or "").lower() != "websocket":
            raise HTTPError(
                426, "this route is a WebSocket: connect with Upgrade: websocket", [("Upgrade", "websocket")]
            )
        ticket = tokens.tail_ticket(tokens.tail_key(self.store.redis), tenant, submission_id, time.time())
        location = f"{self.tail_server(request)}{quote(request.path)}?{urlencode(ticket)}"
        return Response(307, headers=[("Location", location), ("Content-Length", "0")])

    def tail_server(self, request: Request) -> str:
        """Where the client reaches the server of tails: POOLQ_API_TAIL_URL, else the host it
        reached this API by, at the tail server's port."""
        if self.settings.api_tail_url:
            return self.settings.api_tail_url.rstrip("/")
        given = request.header("Host") or ""
        host = given.partition("]")[0] + "]" if given.startswith("[") else given.partition(":")[0]  # no port
        if not HOST.fullmatch(host):
            host = request.environ.get("SERVER_NAME", "127.0.0.1")
        return f"{request.environ.get('wsgi.url_scheme', 'http')}://{host}:{self.settings.api_tail_port}"


def _event(kind: str, event_id: str | None, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event; its data is one line of JSON."""
    head = f"event: {kind}\n" + (f"id: {event_id}\n" if event_id else "")
    return (head + "data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n\n").encode()


def prefer_wait(header: str | None) -> float | None:
    """The ``wait=<seconds>`` preference of a Prefer header (RFC 7240), at most MAX_WAIT_S."""
    for preference in (header or "").replace(";", ",").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return min(seconds, MAX_WAIT_S) if seconds > 0 else None
    return None


def _digest(fields: dict[str, str], shape: dict[str, str] | None) -> str:
    """The record is a function of these values: hashing them spares a 304 the rendering.

    The spec never changes and its fingerprint (``fp``) stands for it, so the long spec
    text is left out of the hash.
    """
    parts = [f"{k}={v}" for k, v in sorted(fields.items()) if k != JobFields.SPEC]
    if shape:
        parts += [shape.get("attempts") or "", shape.get("reasons") or ""]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = {c.strip().removeprefix("W/") for c in header.split(",")}
    return "*" in candidates or etag in candidates


def _status_param(text: str | None, errors: dict[str, list[str]]) -> JobStatus | None:
    if text is None:
        return None
    try:
        return JobStatus(text)
    except ValueError:
        errors["status"] = ["must be one of " + ", ".join(s.value for s in JobStatus)]
        return None


def _seconds_param(text: str | None, name: str, high: float, errors: dict[str, list[str]]) -> float:
    if text is None:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= high:  # (NaN is neither)
        errors[name] = [f"must be a number of seconds between 0 and {high:g}"]
        return 0.0
    return seconds


def _int_param(
    text: str | None, name: str, low: int, high: int, errors: dict[str, list[str]], default: int | None = None
) -> int | None:
    if text is None:
        return default
    if not is_digits(text) or len(text) > 20 or not low <= int(text) <= high:
        errors[name] = [f"must be an integer between {low} and {high}"]
        return default
    return int(text)


def json_body(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 unless application/json, 413 over ``limit``, 400 if malformed."""
    content_type = (request.header("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type != JSON:
        raise HTTPError(415, "Content-Type must be application/json")
    raw = request.read_body(limit)
    try:
        return parse_json(raw)
    except UnicodeDecodeError:
        problem = "is not valid UTF-8"
    except RecursionError:
        problem = "is nested too deeply"
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        problem = f"is not valid JSON: {exc}"
    except ArithmeticError:  # decimal.InvalidOperation: an exponent beyond any bound
        problem = "has a number out of range"
    raise InvalidRequest({"body": [problem]})
