"""Ray's log-tail WebSocket, ``GET /api/jobs/{id}/logs/tail`` (docs/api.md).

Ray's CLI (``ray job submit``, ``ray job logs --follow``) and SDK (``tail_job_logs``)
open it and print each text frame until the server closes. The handshake is judged by
the WSGI app exactly as ``GET /api/jobs/{id}/logs`` is (token, tenant, rate limit, a job
the tenant can see); a refusal is that answer, status and JSON body. Then the job's
output is sent from the start, and followed by looking at Redis: at once after new
output, then less often while there is none, up to ``POOLQ_LOG_TAIL_POLL_S``. When the
job has ended and everything was sent, the server closes normally.

Bounds: at most ``POOLQ_MAX_LOG_TAILS`` tails per API process (the next handshake is a
503); a frame is at most FRAME_CHARS characters, and the next is sent only once the client has
taken the last, so a slow reader holds at most one read of the log (no more than
``POOLQ_MAX_LOG_BYTES``) in the server; a client that takes no frame for
SEND_TIMEOUT_S is dropped. Each Redis look runs on an app thread with Redis's own
timeouts, so no thread waits on a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from api_shim.follow import FIRST_POLL_S, LogFollow
from poolq.errors import Unavailable

if TYPE_CHECKING:
    from api_shim.app import App
    from api_shim.threads import AppThreads

log = logging.getLogger("poolq.api")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FRAME_CHARS = 64 * 1024  # the most output one text frame carries, in characters
SEND_TIMEOUT_S = 30.0  # a client that takes no frame for this long is dropped
NORMAL_CLOSE = 1000
SERVER_ERROR = 1011
TOO_MANY = "too many log tails are open on this server process; retry, or follow with GET /api/jobs/{id}/logs?offset=N"


class LogTails:
    """The log tails of one API process."""

    def __init__(self, app: App, threads: AppThreads):
        self.app = app
        self.store = app.store
        self.threads = threads
        self.limit = app.settings.max_log_tails
        self.max_poll_s = max(FIRST_POLL_S, app.settings.log_tail_poll_s)
        self.send_timeout_s = SEND_TIMEOUT_S
        self.open = 0

    async def serve(self, environ: dict[str, Any], receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        refusal, target = await self.threads.call(self.app.tail_handshake, environ)
        if target is None:
            await _refuse(send, refusal)
            return
        tenant, submission_id = target
        if self.open >= self.limit:
            log.warning("refused a log tail of %s: %d are open (POOLQ_MAX_LOG_TAILS)", submission_id, self.open)
            body = json.dumps({"error": TOO_MANY}).encode()
            await _refuse(send, (503, [("Content-Type", "application/json"), ("Retry-After", "1")], body))
            return
        self.open += 1
        try:
            await send({"type": "websocket.accept"})
            code = await self.follow(receive, send, tenant, submission_id)
        except TimeoutError:
            log.info("log tail of %s ended: the client took no output for %g s", submission_id, self.send_timeout_s)
            code = NORMAL_CLOSE
        except Exception:  # a bug: log it whole, close as a server error
            log.exception("log tail of %s failed", submission_id)
            code = SERVER_ERROR
        finally:
            self.open -= 1
        with contextlib.suppress(Exception):  # the client may be gone already
            await send({"type": "websocket.close", "code": code})

    async def follow(self, receive: Receive, send: Send, tenant: str, submission_id: str) -> int:
        """Send the job's output until it has ended and all was sent; the close code."""
        gone = asyncio.ensure_future(_client_gone(receive))
        follow = LogFollow(self.store, tenant, submission_id, 0, self.max_poll_s)
        loop = asyncio.get_running_loop()
        try:
            while not gone.done():
                try:
                    read = await self.threads.call(follow.read, loop.time())
                except Unavailable as exc:
                    log.warning("log tail of %s ended: %s", submission_id, exc)
                    return SERVER_ERROR
                text = read.data.decode("utf-8", "replace")
                for start in range(0, len(text), FRAME_CHARS):
                    async with asyncio.timeout(self.send_timeout_s):
                        await send({"type": "websocket.send", "text": text[start : start + FRAME_CHARS]})
                if read.ended:
                    return NORMAL_CLOSE
                await asyncio.wait([gone], timeout=follow.wait)
            return NORMAL_CLOSE
        finally:
            gone.cancel()  # also lets go of the socket's reading side, which the close needs


async def _client_gone(receive: Receive) -> None:
    """Returns when the client closes or goes away; what it sends before is ignored."""
    with contextlib.suppress(Exception):  # the server's transport failed: gone as well
        while (await receive())["type"] != "websocket.disconnect":
            pass


async def _refuse(send: Send, answer: tuple[int, list[tuple[str, str]], bytes]) -> None:
    """Answer the handshake with an HTTP response, as the same request to /logs would get."""
    status, headers, body = answer
    encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    await send({"type": "websocket.http.response.start", "status": status, "headers": encoded})
    await send({"type": "websocket.http.response.body", "body": body})
