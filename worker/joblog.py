"""A job's output on its node, bounded: the first half of the bound and the latest half.

The head is written to the log file itself; once it is full, the output goes round a
ring file beside it (``<log>.tail``) of the tail's size, so that a job printing without
end never takes more than its bound while it runs. ``close`` appends a line saying how
much was cut, then the tail in order. ``prune`` keeps all of a node's logs within a total.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Collection

from poolq.model import utf8_bounds

TAIL_SUFFIX = ".tail"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
COPY_CHUNK = 1 << 20


class DiskFull(Exception):
    """The node's disk (or the agent's quota) is full: a job's log cannot be written."""


class JobLog:
    """Writes one job's log to ``path``, keeping at most ``max_bytes`` of it on disk.

    ``write`` and ``close`` raise DiskFull when the disk is full; what was written stays.
    """

    def __init__(self, path: Path, max_bytes: int):
        if max_bytes < 2:
            raise ValueError("a job log needs at least 2 bytes: one for its head, one for its tail")
        self.path = path
        self.tail_path = path.with_name(path.name + TAIL_SUFFIX)
        self.head_limit = max_bytes // 2
        self.tail_limit = max_bytes - self.head_limit
        self.head_bytes = 0  # in the log file
        self.tail_bytes = 0  # all output after the head; the ring holds the last tail_limit of it
        self._head: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._tail: int | None = None  # the ring, once the head is full

    def __enter__(self) -> JobLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def total(self) -> int:
        """Bytes of output written so far, kept or not."""
        return self.head_bytes + self.tail_bytes

    def write(self, data: bytes) -> None:
        """Append output; raise DiskFull when the disk is full."""
        view = memoryview(data)
        try:
            if view and self._tail is None:
                view = view[self._write_head(view) :]
            while view:
                view = view[self._write_tail(view) :]
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise DiskFull(f"the node's disk is full: the job log {self.path} could not be written") from exc

    def _write_head(self, data: memoryview) -> int:
        """Write what fits of ``data`` into the head, opening the ring once it is full; returns how much."""
        assert self._head is not None
        room = self.head_limit - self.head_bytes
        piece = data[:room]
        if len(data) >= room:  # the head ends here: after a whole character
            piece = piece[: utf8_bounds(bytes(piece))[1]]
        done = 0
        while done < len(piece):
            written = os.write(self._head, piece[done:])
            self.head_bytes += written
            done += written
        if len(data) >= room:
            self._tail = os.open(self.tail_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        return done

    def _write_tail(self, data: memoryview) -> int:
        """Write the start of ``data`` into the ring, up to its end; returns how much."""
        assert self._tail is not None
        at = self.tail_bytes % self.tail_limit
        written = os.pwrite(self._tail, data[: self.tail_limit - at], at)
        self.tail_bytes += written
        return written

    def close(self) -> None:
        """Assemble the log: the head, a line saying what was cut (if anything was), the tail in order.

        On a full disk this raises DiskFull and leaves the head in the log and the tail beside it.
        """
        head, tail = self._head, self._tail
        if head is None:
            return
        self._head = self._tail = None
        try:
            if tail is not None:
                self._assemble(head, tail)
                os.unlink(self.tail_path)
        except OSError as exc:
            os.ftruncate(head, self.head_bytes)  # back to what was there: no half-assembled log
            if exc.errno not in DISK_FULL:
                raise
            raise DiskFull(f"the node's disk is full: the job log {self.path} could not be assembled") from exc
        finally:
            os.close(head)
            if tail is not None:
                os.close(tail)

    def _assemble(self, head: int, tail: int) -> None:
        kept = min(self.tail_bytes, self.tail_limit)
        start = self.tail_bytes % self.tail_limit if self.tail_bytes > self.tail_limit else 0
        if self.tail_bytes > self.tail_limit:  # output was cut: the tail starts at a whole character
            first = (os.pread(tail, 4, start) + os.pread(tail, 4, 0))[: min(4, kept)]
            skip = utf8_bounds(first)[0]
            start, kept = (start + skip) % self.tail_limit, kept - skip
            ends_line = self.head_bytes == 0 or os.pread(head, 1, self.head_bytes - 1) == b"\n"
            marker = (
                f"[poolq: {self.tail_bytes - kept:,} bytes of output cut here; "
                f"this log keeps the first {self.head_bytes:,} and the last {kept:,} bytes]\n"
            )
            _write_all(head, (b"" if ends_line else b"\n") + marker.encode())
        while kept:
            chunk = os.pread(tail, min(kept, self.tail_limit - start, COPY_CHUNK), start)
            if not chunk:
                break  # the ring was shortened behind our back: stop rather than loop
            _write_all(head, chunk)
            start, kept = (start + len(chunk)) % self.tail_limit, kept - len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def prune(logs_dir: Path, max_total_bytes: int, keep: Collection[Path]) -> list[Path]:
    """Delete the oldest files under ``logs_dir`` (by mtime) until they hold at most ``max_total_bytes``.

    Never a file in ``keep`` (the running jobs' logs, named under ``logs_dir``) nor its tail.
    Returns the files deleted, oldest first.
    """
    found: list[tuple[int, Path, int]] = []
    for path in logs_dir.rglob("*"):
        try:
            info = path.lstat()
        except FileNotFoundError:  # deleted meanwhile
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((info.st_mtime_ns, path, info.st_size))
    total = sum(size for _, _, size in found)
    deleted = []
    for _, path, size in sorted(found):
        if total <= max_total_bytes:
            break
        if path in keep or path.with_name(path.name.removesuffix(TAIL_SUFFIX)) in keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted
