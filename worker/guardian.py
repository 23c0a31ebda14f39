"""The guardian of a node agent's jobs: when the agent dies, its jobs die with it.

The agent starts this once, in its own session, and tells it through a pipe which
process groups it started (``+PGID``) and which have ended (``-PGID``). When the
pipe reaches end-of-file, the agent is gone however it died (kill -9 included),
and every group still listed is killed: nothing the agent started keeps running
unsupervised (DESIGN.md 6).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only end-of-file ends the guardian
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if len(line) > 1 and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
