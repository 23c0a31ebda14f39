"""A small HTTP client of poolq's API, for the CLI and for scripts (stdlib only).

One persistent connection per client: a batch producer sending a file of jobs
reuses it for every request.

Every job the client submits carries a submission_id chosen before the first send
(``app-<uuid4>`` unless the body names one), so that a submission whose answer was
lost (a reset connection, a 503 whose outcome is unknown) is sent again safely: the
server answers a resent identical request as the same job (docs/faults.md).
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlencode, urlsplit

FOLLOW_MIN_S, FOLLOW_MAX_S = 0.05, 0.5  # how often follow() polls a job's output
SUBMIT_TRIES = 4  # a 503 or a lost connection is retried, with the same ids, this many times in all
RETRY_DELAY_S = 0.5  # doubling between tries


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ApiError(Exception):
    """The API answered with an error status (``status``, ``body``)."""

    def __init__(self, status: int, body: Any):
        message = body.get("error") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body = status, body


class Unreachable(OSError):
    """A request to the API failed before it answered: refused, timed out, TLS, or the
    connection broke (``cause``)."""

    def __init__(self, server: str, cause: OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"the API at {server} did not answer: {reason}")
        self.server, self.cause = server, cause

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[Unreachable], tuple[str, OSError]]:
        return type(self), (self.server, self.cause)


class WaitTimeout(Exception):
    """The job was not finished within the wait (``record`` is what it was then)."""

    def __init__(self, record: dict[str, Any], timeout_s: float):
        super().__init__(f"{record['submission_id']} is still {record['status']} after {timeout_s:g} s")
        self.record = record


class Client:
    def __init__(
        self,
        server: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        tenant: str | None = None,
        timeout: float = 70.0,
    ):
        self.server = server
        url = urlsplit(server if "://" in server else "http://" + server)
        connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._connect = lambda: connection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
        self._conn = self._connect()
        self.base = url.path.rstrip("/")
        self.headers = {"Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        if tenant:
            self.headers["X-Tenant-Id"] = tenant

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {**self.headers, **(headers or {})}
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a kept-alive connection the server closed is re-dialled once
            try:
                self._conn.request(method, self.base + path, body=payload, headers=all_headers)
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._conn.close()
                self._conn = self._connect()
                if attempt == 2:
                    raise Unreachable(self.server, exc) from exc
            except BaseException as exc:
                # Refused, timed out, interrupted: http.client keeps the half-made request's
                # state and would refuse the next one (CannotSendRequest); start clean.
                self._conn.close()
                self._conn = self._connect()
                if isinstance(exc, OSError):
                    raise Unreachable(self.server, exc) from exc
                raise
        answer = json.loads(raw) if raw else None
        if response.status >= 400:
            raise ApiError(response.status, answer)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer

    def submit(
        self,
        body: dict[str, Any],
        *,
        pool_label: str | None = None,
        timeout_ms: int | None = None,
        wait_s: float | None = None,
    ) -> str:
        headers = {}
        if pool_label:
            headers["X-Pool-Label"] = pool_label
        if timeout_ms is not None:
            headers["X-Schedule-Timeout-Ms"] = str(timeout_ms)
        if wait_s:
            headers["Prefer"] = f"wait={wait_s:g}"
        answer = self._resending("POST", "/api/jobs", with_id(body), headers)
        return str(answer["submission_id"])

    def submit_batch(
        self, bodies: list[Any], *, pool_label: str | None = None, timeout_ms: int | None = None
    ) -> list[dict[str, Any]]:
        headers = {}
        if pool_label:
            headers["X-Pool-Label"] = pool_label
        if timeout_ms is not None:
            headers["X-Schedule-Timeout-Ms"] = str(timeout_ms)
        answer = self._resending("POST", "/api/jobs/batch", {"jobs": [with_id(b) for b in bodies]}, headers)
        return list(answer["results"])

    def _resending(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        """A request whose every job has its id: safe to send again on a 503 or a lost
        connection, which may have been stored all the same."""
        delay = RETRY_DELAY_S
        for attempt in range(1, SUBMIT_TRIES + 1):
            try:
                return self.request(method, path, body, headers)[2]
            except ApiError as exc:
                if not _not_stored(exc) or attempt == SUBMIT_TRIES:
                    raise
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = self._connect()
                if attempt == SUBMIT_TRIES:
                    raise
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def job(self, submission_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/jobs/{quote(submission_id, safe='')}")[2])

    def jobs(
        self, *, status: str | None = None, limit: int = 100, cursor: str | None = None, array: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the tenant's jobs (with ``array``, of that array's tasks, in index
        order) and the cursor of the next page (None at the end)."""
        page = "start" if array else "cursor"
        query = {k: v for k, v in (("array", array), ("status", status), ("limit", str(limit)), (page, cursor)) if v}
        _, headers, records = self.request("GET", "/api/jobs?" + urlencode(query))
        link = headers.get("link", "")
        next_cursor = None
        if 'rel="next"' in link and f"{page}=" in link:
            next_cursor = link.split(f"{page}=", 1)[1].split("&", 1)[0].split(">", 1)[0]
        return list(records), next_cursor

    def all_jobs(
        self, *, status: str | None = None, page: int = 1000, array: str | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Every job of the tenant, newest first (or every task of ``array``), a page at a
        time (following the Link header)."""
        cursor: str | None = None
        while True:
            records, cursor = self.jobs(status=status, limit=page, cursor=cursor, array=array)
            yield records
            if cursor is None:
                return

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/nodes")[2])

    def stop(self, submission_id: str) -> bool:
        return bool(self.request("POST", f"/api/jobs/{quote(submission_id, safe='')}/stop")[2]["stopped"])

    def delete(self, submission_id: str) -> bool:
        return bool(self.request("DELETE", f"/api/jobs/{quote(submission_id, safe='')}")[2]["deleted"])

    def logs(self, submission_id: str, offset: int | None = None) -> tuple[str, int]:
        path = f"/api/jobs/{quote(submission_id, safe='')}/logs" + (f"?offset={offset}" if offset is not None else "")
        _, headers, body = self.request("GET", path)
        return str(body["logs"]), int(headers.get("x-log-offset", 0))

    def wait(self, submission_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job is terminal; returns its record. With ``timeout_s``, raises
        WaitTimeout (carrying the last record) if it is not terminal by then."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.job(submission_id)
            if record["status"] in TERMINAL:
                return record
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(record, timeout_s or 0.0)
                time.sleep(min(poll_s, remaining))
            else:
                time.sleep(poll_s)

    def changes(
        self, since: str | None = None, *, wait_s: float = 30.0, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], str]:
        """One answer of the change feed: the tenant's job changes after cursor ``since``
        (None: none, just the feed's position now) and the cursor to follow from. Waits up
        to ``wait_s`` for a change. ApiError 410: the cursor is older than the feed keeps
        (list the jobs again, then follow from ``error.body["cursor"]``)."""
        query = {"limit": str(limit)}
        if since is not None:
            query.update(since=since, wait=f"{wait_s:g}")
        _, headers, body = self.request("GET", "/api/jobs/changes?" + urlencode(query))
        if since is not None and not body["changes"] and "retry-after" in headers:
            time.sleep(float(headers["retry-after"]))  # the server holds all the waits it may
        return list(body["changes"]), str(body["cursor"])

    def watch(self, since: str | None = None, *, wait_s: float = 30.0) -> Iterator[dict[str, Any]]:
        """Every change of the tenant's jobs after cursor ``since`` (None: after this call),
        as they come, oldest first; each carries its ``cursor`` to resume from. Ends only
        with an error (ApiError 410 when it fell behind what the feed keeps)."""
        start = since if since is not None else self.changes()[1]  # now, not at the first next()

        def follow(cursor: str) -> Iterator[dict[str, Any]]:
            while True:
                changes, cursor = self.changes(cursor, wait_s=wait_s)
                yield from changes

        return follow(start)

    def follow(
        self, submission_id: str, write: Callable[[str, int], object], *, offset: int | None = None
    ) -> dict[str, Any]:
        """Pass the job's output to ``write(text, next_offset)`` as it is written, until the
        job ends; returns its final record. From ``offset`` (a byte of the whole output),
        else from the last kept MiB. Polls at 50 ms, slowing to 0.5 s while nothing comes."""
        text, offset = self.logs(submission_id, offset)
        if text:
            write(text, offset)
        delay = FOLLOW_MIN_S
        while True:
            record = self.job(submission_id)  # read before the log: once terminal, the log below is all there is
            text, offset = self.logs(submission_id, offset)
            if text:
                write(text, offset)
                delay = FOLLOW_MIN_S
            elif record["status"] in TERMINAL:
                return record
            else:
                time.sleep(delay)
                delay = min(delay * 2, FOLLOW_MAX_S)


def with_id(body: Any) -> Any:
    """The body with a submission_id chosen now, unless it names one (or is not an object)."""
    if not isinstance(body, dict) or body.get("submission_id") is not None or body.get("job_id") is not None:
        return body
    return {**body, "submission_id": f"app-{uuid.uuid4()}"}


def _not_stored(exc: ApiError) -> bool:
    """A 503 saying the jobs may not be stored (not one saying a job failed to place)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return exc.status == 503 and ("submission_id" in body or str(body.get("error", "")).startswith(BATCH_FAILED))


BATCH_FAILED = "create app failed for the batch"
