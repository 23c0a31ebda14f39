"""Fault injection for placement workers and node agents: imported by a process started
as ``python -c "import tests.faults.inject; ..."`` before its Celery app is created.
Each injection is off unless its environment variable is set.

- FAULTS_VISIBILITY_TIMEOUT_S: kombu's Redis transport gives an unacknowledged message
  to another consumer once it is older than the visibility timeout; poolq sets it in
  poolq/messaging.py (VISIBILITY_TIMEOUT_S, 60 s, not read from the environment).
  Here it becomes this many seconds.
- FAULTS_SLOW_FIRST_PLACE_S: the first placement task of the process sleeps this long
  before it places anything (a stalled worker), holding its message unacknowledged.
"""

from __future__ import annotations

import os
import time

from poolq import messaging
from worker import scheduler

if os.environ.get("FAULTS_VISIBILITY_TIMEOUT_S"):
    messaging.VISIBILITY_TIMEOUT_S = float(os.environ["FAULTS_VISIBILITY_TIMEOUT_S"])  # type: ignore[assignment]

_stall_s = float(os.environ.get("FAULTS_SLOW_FIRST_PLACE_S") or 0)
_place = scheduler.Scheduler.place_waiting


def _stalled_first_round(self, budget_s: float = 5.0) -> int:  # type: ignore[no-untyped-def]
    global _stall_s
    if _stall_s:
        stall, _stall_s = _stall_s, 0.0
        print(f"faults: stalling the first placement task for {stall:g}s", flush=True)
        time.sleep(stall)
        print("faults: the stall is over", flush=True)
    return _place(self, budget_s)


scheduler.Scheduler.place_waiting = _stalled_first_round  # type: ignore[method-assign]


def worker_code() -> str:
    """``python -c`` code of a placement worker with these injections."""
    return "import sys, tests.faults.inject; from poolq.commands.cli import main; sys.exit(main(['worker']))"


def agent_code(*args: str) -> str:
    """``python -c`` code of a node agent (``poolq node <args>``) with these injections."""
    return f"import sys, tests.faults.inject; from poolq.commands.cli import main; sys.exit(main(['node', *{list(args)!r}]))"
