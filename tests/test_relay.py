"""``poolq up`` relays its children's output without ever blocking a child
(poolq/commands/relay.py; issue 11, item 3): real child processes, and a parent output
that cannot be written — a pipe nobody reads, ``/dev/full``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from poolq.commands.relay import Relay
from tests.procs import wait_for

CHATTY = "import sys\nfor i in range({n}): print('line', i, 'of the chatty child')\n"


def chatty(lines: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHATTY.format(n=lines)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_child_never_waits_on_an_output_nobody_reads() -> None:
    read_end, write_end = os.pipe()
    try:
        relay = Relay(write_end, colour=False, capacity=1000)
        child = chatty(200_000)  # megabytes: far more than the pipes and the queue hold
        assert child.stdout is not None
        relay.pump("child", child.stdout)
        # Were the relay to wait for its output, the child would block on its own pipe.
        assert child.wait(timeout=60) == 0
        wait_for(lambda: relay.dropped_total > 0, timeout=10, what="lines to be dropped")

        received = bytearray()

        def read() -> None:
            while chunk := os.read(read_end, 65536):
                received.extend(chunk)

        threading.Thread(target=read, daemon=True).start()  # someone reads at last
        wait_for(lambda: relay.flush(0.1), timeout=30, what="the queued lines to be written")
        relay.say("up", "written again")
        wait_for(lambda: b"written again" in received, timeout=30, what="the relay to write again")
        text = received.decode()
        assert "child | line 0 of the chatty child" in text
        reported = re.search(r"up \| (\d+) lines of output were dropped \(output could not keep up\)", text)
        assert reported, text[-2000:]
        assert int(reported.group(1)) <= relay.dropped_total
    finally:
        os.close(write_end)
        os.close(read_end)


def test_on_a_full_disk_lines_are_counted_and_reported_once_writing_works(tmp_path: Path) -> None:
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        relay = Relay(full, colour=False)
        child = chatty(1000)
        assert child.stdout is not None
        relay.pump("child", child.stdout)
        assert child.wait(timeout=60) == 0
        wait_for(lambda: relay.dropped_total == 1000, timeout=30, what="every line to be counted as dropped")

        # The disk has room again: the same descriptor now leads to a file.
        log = tmp_path / "up.log"
        with open(log, "wb") as handle:
            os.dup2(handle.fileno(), full)
        relay.say("up", "written again")
        wait_for(lambda: "written again" in log.read_text(), timeout=30, what="the relay to write again")
        lines = log.read_text().splitlines()
        assert lines == [
            "    up | 1000 lines of output were dropped (could not write: No space left on device)",
            "    up | written again",
        ]
    finally:
        os.close(full)


def test_a_long_line_is_cut_and_colours_only_on_a_terminal(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    with open(log, "wb") as handle:
        relay = Relay(handle.fileno())
        relay.say("api", "x" * 100_000)
        relay.say("api", "short\n")
        assert relay.flush(10)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith(" …[cut]") and len(lines[0]) < 20_000
    assert lines[1] == "   api | short"  # a file is not a terminal: no colour codes
