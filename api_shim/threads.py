"""Threads that run the WSGI app and other blocking calls for the ASGI event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class AppThreads:
    """Threads that run blocking calls for the event loop.

    Lighter than ``loop.run_in_executor``, which chains a concurrent future to an
    asyncio one per call: under concurrent requests that hand-off measured about 4x the
    CPU of this one. Results come back through one queue, and the loop is woken only
    when it is not already due to empty it, so that a busy process wakes its loop once
    for many answers.
    """

    def __init__(self, count: int):
        self._calls: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._results: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        self._wake_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"poolq-api-{n}", daemon=True) for n in range(max(1, count))
        ]
        for thread in self._threads:
            thread.start()

    def call(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``function(*args)`` on a thread; await the returned future on the loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((future, function, args))
        return future

    def _run(self) -> None:
        while True:
            future, function, args = self._calls.get()
            try:
                self._results.append((future, function(*args), None))
            except BaseException as exc:  # handed to the awaiting coroutine, which raises it
                self._results.append((future, None, exc))
            # Appended first, then looked: a wake-up already due empties the queue after this.
            if not self._wake_due:
                self._wake_due = True
                with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
                    future.get_loop().call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        self._wake_due = False
        results = self._results
        while results:
            future, result, exc = results.popleft()
            if future.cancelled():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
