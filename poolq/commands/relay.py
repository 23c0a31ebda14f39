"""Children's output, relayed line by line with a prefix, without ever blocking a child.

Each child's pipe is read by a thread of its own that puts lines on one bounded queue
and never waits: when the queue is full, the line is dropped and counted. One writer
thread empties the queue onto the parent's output; when a write fails (a full disk, a
closed pipe) or cannot keep up (a pipe nobody reads), lines are dropped and counted, and
the count is reported once writing works again. A child therefore never stalls on its
own logging, whatever happens to ``poolq up``'s output (issue 11, item 3).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import IO

COLOURS = {"api": 36, "worker": 35, "node": 32, "redis": 33, "up": 1}
QUEUE_LINES = 10_000  # lines waiting to be written; beyond, new ones are dropped
MAX_LINE = 16 * 1024  # a longer line is cut: one line never holds the writer for long


class Relay:
    """Prefixed lines from many sources onto one file descriptor."""

    def __init__(self, fd: int = 1, *, colour: bool | None = None, capacity: int = QUEUE_LINES):
        self.fd = fd
        self.colour = os.isatty(fd) if colour is None else colour
        self.lines: queue.Queue[bytes] = queue.Queue(capacity)
        self._count_lock = threading.Lock()
        self.dropped = 0  # lines lost since the last report (queue full or write failed)
        self.dropped_total = 0
        self.last_error = ""
        self._writer = threading.Thread(target=self._write_loop, name="poolq-up-relay", daemon=True)
        self._writer.start()

    def say(self, name: str, line: str) -> None:
        """Queue one line under ``name``'s prefix; never waits."""
        prefix = f"{name:>6} |"
        if self.colour:
            prefix = f"\x1b[{COLOURS.get(name, 0)}m{prefix}\x1b[0m"
        text = line.rstrip("\r\n")
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + " …[cut]"
        try:
            self.lines.put_nowait(f"{prefix} {text}\n".encode("utf-8", "replace"))
        except queue.Full:
            self._drop("output could not keep up")

    def pump(self, name: str, stream: IO[bytes]) -> threading.Thread:
        """Relay a child's pipe until it closes, in a thread of its own."""

        def run() -> None:
            try:
                for raw in iter(stream.readline, b""):
                    self.say(name, raw.decode("utf-8", "replace"))
            except (OSError, ValueError):
                pass  # the pipe went away with the child
            finally:
                stream.close()

        thread = threading.Thread(target=run, name=f"poolq-up-pump-{name}", daemon=True)
        thread.start()
        return thread

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait (at most ``timeout_s``) for the queued lines to be written or dropped."""
        deadline = time.monotonic() + timeout_s
        while self.lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.lines.unfinished_tasks

    def _drop(self, why: str) -> None:
        with self._count_lock:
            self.dropped += 1
            self.dropped_total += 1
            self.last_error = why

    def _write_loop(self) -> None:
        while True:
            line = self.lines.get()
            try:
                with self._count_lock:
                    dropped, why = self.dropped, self.last_error
                if dropped:
                    note = f"{'up':>6} | {dropped} lines of output were dropped ({why})\n"
                    self._write(note.encode())
                    with self._count_lock:
                        self.dropped -= dropped
                self._write(line)
            except OSError as exc:
                self._drop(f"could not write: {exc.strerror or exc}")
            except Exception as exc:  # never die: a dead writer would stop the relay for good
                self._drop(f"could not write: {exc!r}")
            finally:
                self.lines.task_done()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
