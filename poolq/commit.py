"""Group commit: callers that arrive while a round trip to Redis is in flight share the next.

A lone caller goes at once, as it would without this: it finds no round trip in flight
and leads its own. Callers that arrive meanwhile queue; when the round trip ends, its
leader hands the lead to the first of them, who takes everyone queued by then (up to
``max_group``) into one round trip. So the group grows only with the load, and no caller
waits for more than the round trip in flight and its own.

Each caller gets its own result back (an outcome the commit function returns per item,
exceptions included): what is grouped is the round trip, never the outcome.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("item", "result", "error", "ready", "leads")

    def __init__(self, item: T):
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.leads = False


class GroupCommit(Generic[T, R]):
    """``commit(items) -> results`` (one per item, in order), shared by concurrent callers.

    A group holds items of ``size`` (1 each, by default) up to ``max_group`` in all; an
    item larger than that goes alone. When the commit raises one of ``shared_failures``
    (Redis does not answer), the callers that queued meanwhile get it too, at once: each
    waiting for a round trip of its own would take them past their deadline."""

    def __init__(
        self,
        commit: Callable[[list[T]], list[R]],
        max_group: int = 256,
        size: Callable[[T], int] = lambda _: 1,
        shared_failures: tuple[type[BaseException], ...] = (),
    ):
        self._commit, self._max_group, self._size = commit, max_group, size
        self._shared_failures = shared_failures
        self._lock = threading.Lock()
        self._queue: deque[_Slot[T, R]] = deque()
        self._in_flight = False
        self.largest = 0  # the most items one round trip carried so far (for tests and debugging)

    def __call__(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            slot.leads = not self._in_flight
            self._in_flight = True
        if not slot.leads:
            slot.ready.wait()  # for its result, or for the lead
        if slot.leads:
            self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self) -> None:
        with self._lock:
            group = [self._queue.popleft()]
            total = self._size(group[0].item)
            while self._queue and total + self._size(self._queue[0].item) <= self._max_group:
                total += self._size(self._queue[0].item)
                group.append(self._queue.popleft())
            self.largest = max(self.largest, len(group))
        try:
            results = self._commit([slot.item for slot in group])
            if len(results) != len(group):
                raise RuntimeError(f"a group commit answered {len(results)} results for {len(group)} items")
        except BaseException as exc:  # a bug, or an interrupt: every caller of the group sees it
            if isinstance(exc, self._shared_failures):
                with self._lock:
                    group += self._queue
                    self._queue.clear()
            for slot in group:
                slot.error = exc
        else:
            for slot, result in zip(group, results):
                slot.result = result
        with self._lock:
            if self._queue:  # hand the lead to the first caller that came meanwhile
                self._queue[0].leads = True
                self._queue[0].ready.set()
            else:
                self._in_flight = False
        for slot in group:
            slot.leads = False
            slot.ready.set()
