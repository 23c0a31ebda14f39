"""Following a job's output: what Ray's WebSocket tail (api_shim/tail.py) and
``GET /api/jobs/{id}/logs?follow=1`` (api_shim/routes/jobs.py) share."""

from __future__ import annotations

from poolq.errors import NotFound, Unavailable
from poolq.store import JobStore, LogRead

FIRST_POLL_S = 0.05  # the wait after new output; it doubles while none comes, up to POOLQ_LOG_TAIL_POLL_S
REDIS_GRACE_S = 30.0  # Redis unavailable this long ends a follow; shorter outages only delay it


class LogFollow:
    """One follower's place in a job's output, and its pace: what the WebSocket tail and
    ``GET /api/jobs/{id}/logs?follow=1`` share. Each ``read`` is one look at Redis; then
    wait ``wait`` seconds: FIRST_POLL_S after new output, doubling while none comes, up
    to ``max_poll_s``."""

    def __init__(self, store: JobStore, tenant: str, submission_id: str, offset: int, max_poll_s: float):
        self.store, self.tenant, self.submission_id = store, tenant, submission_id
        self.offset, self.max_poll_s = offset, max_poll_s
        self.wait = FIRST_POLL_S
        self._unavailable_since: float | None = None

    def read(self, now: float) -> LogRead:
        """The output after the last read (``ended``: nothing more will come; a job deleted
        meanwhile has ended too). Redis unavailable is an empty read, until it has been
        so for REDIS_GRACE_S: then Unavailable."""
        try:
            read = self.store.log_since(self.tenant, self.submission_id, self.offset)
        except NotFound:
            return LogRead(b"", self.offset, True)
        except Unavailable:
            self._unavailable_since = self._unavailable_since or now
            if now - self._unavailable_since > REDIS_GRACE_S:
                raise
            read = LogRead(b"", self.offset, False)
        else:
            self._unavailable_since = None
        self.wait = FIRST_POLL_S if read.data else min(self.wait * 2, self.max_poll_s)
        self.offset = read.offset
        return read
