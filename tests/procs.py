"""Real child processes for the tests and the benchmark (``bench/``): started in a session
of their own with their output in a file, stopped (or killed, session and all) after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from poolq.procs import die_with_parent


class Process:
    """One child process and its session; ``stop()`` ends whatever of the session is left.

    With ``tied``, the child dies with its parent (PR_SET_PDEATHSIG: the *thread* that
    started it, so only for children started from a thread that outlives them).
    """

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, *, cwd: Path | None = None,
                 name: str | None = None, tied: bool = False):
        self.argv, self.env, self.log_path, self.cwd = argv, env, log_path, cwd
        self.name = name or Path(argv[0]).name
        self.tied = tied
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, cwd=self.cwd,
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=self.preexec(),
            )
        return self

    def preexec(self) -> Callable[[], None] | None:
        """What the child runs between fork and exec (a subclass may enter a namespace there)."""
        return die_with_parent if self.tied else None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, sig) if sig == signal.SIGKILL else self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to its whole session (a server's worker processes too)."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its session is left
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.wait()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Proc(Process):
    """``python -m poolq <args>`` with POOLQ_* settings in its environment."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        super().__init__([sys.executable, "-m", "poolq", *args], env, log_path, name=f"poolq {args[0]}")
        self.args = args

    def start(self) -> "Proc":
        super().start()
        return self


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> object:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
