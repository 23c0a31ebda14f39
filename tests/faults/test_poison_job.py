"""A poison job: placing it crashes the placement worker every time (docs/faults.md).

The fault is injected from the test side (tests/faults/poison.py) into a real
``poolq worker`` process, which a supervisor loop here restarts whenever it dies. The
sweep gives the job up after a bounded number of dead workers (worker/duties.py,
MAX_LOST_CLAIMS): it ends FAILED / INVALID_REQUEST saying placement stopped, holding no
capacity, and the other jobs are not affected.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from poolq.model import TERMINAL_STATUSES
from tests.faults.checker import check
from tests.faults.conftest import Jobs, PyProc, Stack, statuses, submit_batch
from tests.faults.poison import MARKER
from tests.kit import wait_ready
from worker.scheduler import MAX_LOST_CLAIMS

WORKER = "import sys, tests.faults.poison; from poolq.commands.cli import main; sys.exit(main(['worker']))"
MAX_CRASHES = MAX_LOST_CLAIMS + 2  # "a bounded number of attempts", with room for a spurious lease expiry
RECOVERY_S = 240.0  # every job terminal although workers keep crashing: minutes on a busy machine


class Supervisor:
    """Runs the poisoned placement worker and starts it again whenever it dies."""

    def __init__(self, run_py: Callable[..., PyProc], crash_log: Path):
        self.run_py, self.crash_log = run_py, crash_log
        crash_log.touch()
        self.env = {"FAULTS_POISON_LOG": str(crash_log)}
        self.worker = self._start()
        self.starts = 1

    def _start(self) -> PyProc:
        return self.run_py(WORKER, env=self.env, name="poisoned-worker")

    def crashes(self) -> list[str]:
        return self.crash_log.read_text().splitlines()

    def run_until(self, done: Callable[[], bool], timeout: float = RECOVERY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done():
            if not self.worker.alive():
                assert len(self.crashes()) <= MAX_CRASHES, f"the poison job crashed {len(self.crashes())} workers and is still tried"
                assert self.worker.process is not None and self.worker.process.returncode == 1, self.worker.output()[-3000:]
                self.worker = self._start()
                self.starts += 1
            time.sleep(0.2)
        print(f"worker starts: {self.starts}, crashes: {len(self.crashes())}\n" + "\n".join(self.crashes()))


def all_terminal(client: Any, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(s in TERMINAL_STATUSES for s, _ in statuses(client, ids))


def assert_given_up(outcome: Any, poison_id: str, supervisor: Supervisor) -> None:
    record = outcome.records[poison_id]
    assert (record["status"], record["error_type"]) == ("FAILED", "INVALID_REQUEST"), record
    assert "placement stopped" in str(record["message"]), record["message"]
    assert outcome.runs[poison_id] == 0
    assert 1 <= len(supervisor.crashes()) <= MAX_CRASHES, supervisor.crashes()


def test_poison_job_is_given_up_after_bounded_crashes(app: Any, stack: Stack, jobs: Jobs, run_py: Callable[..., PyProc],
                                                     redis_client: Any, admin: Any, tmp_path: Path) -> None:
    stack.agent("n1")
    poison = jobs.body(extra=f"echo {MARKER} > /dev/null")
    (poison_id,) = submit_batch(app, [poison])
    supervisor = Supervisor(run_py, tmp_path / "poison-crashes.txt")
    supervisor.run_until(all_terminal(redis_client, [poison_id]))

    # The worker that outlived the poison job places new work.
    wait_ready(supervisor.worker, "the last placement worker")
    later = submit_batch(app, [jobs.body() for _ in range(10)])
    outcome = check(redis_client, [poison_id, *later], jobs.runs_file, admin, timeout=120)
    print("outcome:", dict(outcome.by_error()))
    assert_given_up(outcome, poison_id, supervisor)
    assert all(outcome.records[i]["status"] == "SUCCEEDED" for i in later), outcome.by_error()
    assert supervisor.worker.alive(), supervisor.worker.output()[-3000:]


def test_jobs_waiting_alongside_a_poison_job_are_not_failed_with_it(app: Any, stack: Stack, jobs: Jobs,
                                                                   run_py: Callable[..., PyProc], redis_client: Any,
                                                                   admin: Any, tmp_path: Path) -> None:
    stack.agent("n1")
    # Innocent jobs waiting at the same time: of the poison job's shape (ahead of it and
    # behind it in line) and of another shape.
    same_before = [jobs.body() for _ in range(5)]
    poison = jobs.body(extra=f"echo {MARKER} > /dev/null")
    same_after = [jobs.body() for _ in range(5)]
    other_shape = [jobs.body(entrypoint_num_cpus=1) for _ in range(10)]
    accepted = submit_batch(app, same_before + [poison] + same_after + other_shape)
    poison_id = poison["submission_id"]
    supervisor = Supervisor(run_py, tmp_path / "poison-crashes.txt")
    supervisor.run_until(all_terminal(redis_client, accepted))

    outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=120)
    print("outcome:", dict(outcome.by_error()))
    assert_given_up(outcome, poison_id, supervisor)
    hurt = {i: (r["status"], r["error_type"], r["message"]) for i, r in outcome.records.items()
            if i != poison_id and r["status"] != "SUCCEEDED"}
    assert not hurt, (f"{len(hurt)} of {len(accepted) - 1} jobs that merely waited alongside the poison job did not "
                      f"succeed: {list(hurt.items())[:3]}")
