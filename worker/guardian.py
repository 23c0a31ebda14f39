"""The guardian of a node agent's jobs: when the agent dies or goes silent, its jobs die.

The agent starts this once, in its own session, and tells it through a pipe which
process groups it started (``+PGID``), which have ended (``-PGID``), and when each
heartbeat that Redis accepted was sent (``b<seconds>``, on CLOCK_BOOTTIME, which
counts time the machine was suspended). Where the node runs jobs in cgroups, the
guardian also kills every process in the agent's job cgroups, so that a job's
``setsid`` or double-forked children die too. Two things end the jobs:

- end-of-file on the pipe: the agent is gone however it died (kill -9 included), and
  every group still listed is killed: nothing it started keeps running unsupervised;
- fencing: no accepted heartbeat for ``fence_s`` seconds (the node TTL less a
  margin). The reaper will declare the node lost at the TTL and release its jobs'
  reservations, so they must not still run: the guardian kills them even when the
  agent itself is paused (SIGSTOP, a long GC) and cannot (docs/faults.md, "Fencing").
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from worker.cgroups import CgroupError, Cgroups


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def kill_jobs(groups: set[int], cgroups: Cgroups) -> None:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for job in cgroups.jobs():
        try:
            job.kill()
        except (CgroupError, OSError) as exc:
            print(f"poolq guardian: {exc}", file=sys.stderr)


def cgroups_of(text: str) -> Cgroups:
    """The agent's cgroups as ``describe_for_guardian`` wrote them."""
    given = json.loads(text)
    return Cgroups(given["mode"], None, {c: Path(d) for c, d in given["dirs"].items()})


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only end-of-file ends the guardian
    fence_s = float(argv[1]) if len(argv) > 1 else float("inf")
    cgroups = cgroups_of(argv[2]) if len(argv) > 2 else Cgroups("none")
    groups: set[int] = set()
    last_beat = float(argv[3]) if len(argv) > 3 else boottime()  # a guardian started again: the old deadline
    armed = True  # a fence is due unless a heartbeat comes; disarmed once it fired, until the next
    buffer = b""
    while True:
        wait = max(0.0, last_beat + fence_s - boottime()) if armed and fence_s != float("inf") else None
        ready, _, _ = select.select([0], [], [], wait)
        if not ready:  # fenced: the agent's lease ran out while its jobs may run
            print(f"poolq guardian: no heartbeat for {fence_s:g} s; killing the agent's jobs", file=sys.stderr)
            kill_jobs(groups, cgroups)
            groups.clear()
            armed = False
            continue
        data = os.read(0, 65536)
        if not data:
            kill_jobs(groups, cgroups)
            return 0
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("ascii", "replace").strip()
            if line.startswith("b"):
                try:
                    last_beat, armed = max(last_beat, float(line[1:])), True
                except ValueError:
                    pass
            elif len(line) > 1 and line[1:].isdigit():
                (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
