"""Reading a tenant's change feed (docs/api.md, "Following changes").

The feed is written by the Lua steps that change a job (``poolq/lua/lib/changes.lua``);
this reads it after a cursor, and waits for a change when asked to.
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

import redis

from poolq import keys
from poolq.redis_io import Scripts, redis_errors

# An entry's id, "<ms>-<n>" ("0-0" before any entry). At most 18 digits a part: far past
# any clock, and clear of the largest id Redis has, after which it has no range to read.
CURSOR = re.compile(r"\d{1,18}-\d{1,18}")

MAX_CHANGES = 1000  # most changes one answer holds


class Change(NamedTuple):
    cursor: str  # the entry's id: follow from it to read what came after
    submission_id: str
    status: str  # a job status, ARRAY (an array's record changed), or DELETED
    node: str | None
    time_ms: int  # when the change was made (Redis's clock)


class Page(NamedTuple):
    changes: list[Change]
    cursor: str  # where to follow from next
    gone: bool = False  # the cursor was older than what the feed keeps: cursor is the feed's position now


class ChangeFeed:
    """The tenants' change feeds, read through ``changes_read.lua``."""

    def __init__(self, client: redis.Redis, scripts: Scripts, timeout_s: float):
        self.redis, self.scripts = client, scripts
        # A wait blocks in slices well within the client's read timeout, so that it is
        # never taken for a Redis that stopped answering.
        self._slice_ms = max(10, int(timeout_s * 500))

    @redis_errors("the change feed")
    def read(self, tenant: str, since: str | None, limit: int = MAX_CHANGES, wait_s: float = 0.0) -> Page:
        """The tenant's changes after cursor ``since`` (None: none, only the feed's position
        now), at most ``limit``; while there is none, waits up to ``wait_s`` for one."""
        stream = keys.tenant_changes(tenant)
        deadline = time.monotonic() + wait_s
        while True:
            page = self._read(stream, since, limit)
            remaining = deadline - time.monotonic()
            if page.changes or page.gone or since is None or remaining <= 0:
                return page
            self.redis.xread({stream: since}, count=1, block=min(self._slice_ms, max(1, int(remaining * 1000))))

    def _read(self, stream: str, since: str | None, limit: int) -> Page:
        answer = self.scripts.changes_read(keys=[stream], args=[since or "", limit])
        if int(answer[0]) == 1:
            return Page([], str(answer[1]), gone=True)
        flat = answer[2:]
        changes = [
            Change(str(cursor), str(job_id), str(status), str(node) or None, int(str(cursor).partition("-")[0]))
            for cursor, job_id, status, node in zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4])
        ]
        return Page(changes, str(answer[1]))
