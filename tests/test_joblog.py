"""worker/joblog.py on its own: a job's log file on its node keeps its head and its latest
output within a bound, says where it was cut, reports a full disk, and ``prune`` keeps the
node's logs within a total.

Real files; the full-disk tests mount a tiny tmpfs (root only, skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.kit import KiB
from worker.joblog import TAIL_SUFFIX, DiskFull, JobLog, prune

MARKER = re.compile(
    rb"\n?\[poolq: ([\d,]+) bytes of output cut here; this log keeps the first ([\d,]+) and the last ([\d,]+) bytes\]\n"
)


@contextlib.contextmanager
def tiny_tmpfs(directory: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``directory`` for the block; skips, saying why, where it cannot be."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
        )
    except FileNotFoundError as exc:
        done = subprocess.CompletedProcess([], 1, "", str(exc))
    if done.returncode != 0:
        print(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def numbered_lines(total: int) -> bytes:
    """``total`` bytes of distinct ASCII lines, so that any piece of them can be told apart."""
    data = b"".join(b"line %09d\n" % i for i in range(total // 15 + 1))
    return data[:total]


def parse_marker(text: bytes) -> tuple[bytes, int, int, int]:
    found = MARKER.search(text)
    assert found, text[:200]
    cut, head, tail = (int(group.replace(b",", b"")) for group in found.groups())
    return found.group(0), cut, head, tail


def disk_use(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def feed(log: JobLog, data: bytes, sizes: list[int]) -> Iterator[None]:
    """Write ``data`` in pieces of the given sizes (cycled), yielding after each write."""
    written, turn = 0, 0
    while written < len(data):
        piece = data[written : written + sizes[turn % len(sizes)]]
        log.write(piece)
        written, turn = written + len(piece), turn + 1
        yield


# -- bounded logs -------------------------------------------------------------------------------


def test_a_log_fed_ten_times_its_bound_keeps_its_head_and_its_latest_output(tmp_path: Path) -> None:
    bound = 64 * KiB
    path = tmp_path / "logs" / "app-x.log"
    path.parent.mkdir()
    data = numbered_lines(10 * bound + 12345)
    rng = random.Random(7)
    sizes = [rng.choice([1, 13, 999, 4096, 65536, 3 * bound, bound // 2 - 1]) for _ in range(200)]

    log = JobLog(path, bound)
    for _ in feed(log, data, sizes):
        assert disk_use(path.parent) <= bound, "the log took more than its bound while the job wrote"
    log.close()

    final = path.read_bytes()
    marker, cut, head, tail = parse_marker(final)
    assert (head, tail) == (bound // 2, bound - bound // 2)
    assert cut == len(data) - head - tail
    assert final == data[:head] + marker + data[-tail:]
    assert len(final) <= bound + len(marker)
    assert list(path.parent.iterdir()) == [path], "the tail file was left behind"


@pytest.mark.parametrize("total", [0, 1, 500, 501, 999, 1000])
def test_a_log_within_its_bound_is_written_unchanged(tmp_path: Path, total: int) -> None:
    path = tmp_path / "app-x.log"
    data = numbered_lines(total)

    with JobLog(path, 1000) as log:
        for _ in feed(log, data, [1, 77, 300]):
            pass

    assert path.read_bytes() == data
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("bound", [1000, 1001, 1002, 1003])
def test_no_character_is_split_at_the_cut(tmp_path: Path, bound: int) -> None:
    path = tmp_path / "app-x.log"
    data = ("é€😀a\n" * 2000).encode()  # characters of 2, 3, 4 and 1 bytes

    with JobLog(path, bound) as log:
        for _ in feed(log, data, [333, 1, 2, 4096]):
            pass

    final = path.read_bytes()
    final.decode("utf-8")  # strict: the head ends and the tail starts on whole characters
    marker, cut, head, tail = parse_marker(final)
    assert head + cut + tail == len(data)
    assert bound // 2 - 3 <= head <= bound // 2 and bound - bound // 2 - 3 <= tail <= bound - bound // 2
    assert final == data[:head] + marker + data[-tail:]


def test_the_marker_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "app-x.log"
    with JobLog(path, 10) as log:
        log.write(b"abcdefghijklmnopqrstuvwxyz")
    assert path.read_bytes() == (
        b"abcde\n[poolq: 16 bytes of output cut here; this log keeps the first 5 and the last 5 bytes]\nvwxyz"
    )


# -- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_raises_disk_full_and_keeps_what_was_written(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk", 64 * KiB) as disk:
        path = disk / "app-x.log"
        data = numbered_lines(1024 * KiB)
        log = JobLog(path, 10 * 1024 * KiB)
        with pytest.raises(DiskFull) as full:
            for _ in feed(log, data, [4096]):
                pass
        assert str(path) in str(full.value) and "disk is full" in str(full.value), full.value
        kept = path.read_bytes()
        assert 0 < len(kept) <= 64 * KiB and kept == data[: len(kept)]
        log.close()
        assert path.read_bytes() == kept


def test_a_disk_that_fills_while_the_log_is_assembled_keeps_head_and_tail(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk", 64 * KiB) as disk:
        path = disk / "app-x.log"
        log = JobLog(path, 48 * KiB)  # fits while written; assembling needs the tail's size again
        for _ in feed(log, numbered_lines(200 * KiB), [4096]):
            pass
        with pytest.raises(DiskFull, match="disk is full"):
            log.close()
        assert path.stat().st_size == 24 * KiB, "a half-assembled log was left"
        assert path.with_name(path.name + TAIL_SUFFIX).stat().st_size == 24 * KiB


# -- the node's total ---------------------------------------------------------------------------


def make_log(path: Path, size: int, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_prune_deletes_the_oldest_logs_first_and_spares_the_running(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    running = make_log(logs / "t-a" / "app-0.log", 100, 500)
    running_tail = make_log(logs / "t-a" / ("app-0.log" + TAIL_SUFFIX), 100, 400)
    old = [
        make_log(logs / tenant / f"app-{i}.log", 100, 1000 * i) for i, tenant in [(1, "t-a"), (2, "t-b"), (3, "t-a")]
    ]
    newest = make_log(logs / "t-b" / "app-4.log", 100, 4000)

    assert prune(logs, 350, keep={running}) == old  # 600 bytes down to 300, the oldest first
    assert sorted(p for p in logs.rglob("*") if p.is_file()) == sorted([running, running_tail, newest])

    assert prune(logs, 0, keep={running}) == [newest]  # a running job's files stay, whatever the total
    assert running.exists() and running_tail.exists()
    assert prune(logs, 1000, keep=set()) == []
    assert prune(tmp_path / "no-logs-yet", 0, keep=set()) == []
