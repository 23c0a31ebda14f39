"""The checks of the fault suite catch what they are meant to catch: constructed
over-commits, overlapping runs, unexplained outcomes, changed statuses and stranded jobs
are found, and their legitimate look-alikes are not (tests/faults/checker.py,
tests/faults/chaos_checks.py). No poolq process is involved."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.faults import chaos_checks as checks
from tests.faults.chaos_clients import Ledger, Plan, Seen
from tests.faults.checker import Interval, Run, overcommits, peak, read_runs, read_timed_runs
from tests.faults.conftest import Jobs

MS = 1_000_000  # ns


def cpu(job: str, start_ms: int, end_ms: int, amount: int = 1000) -> Interval:
    return Interval(job, start_ms * MS, end_ms * MS, amount)


def plan(job: str, *, sleep_s: float = 1.0, exit_code: int = 0, cpus: int = 1000) -> Plan:
    return Plan(job, "team-a", "http", cpus, sleep_s, exit_code, {})


def test_the_sweep_finds_a_node_running_more_than_it_has() -> None:
    five = [cpu(f"j{i}", 100 * i, 1000 + 100 * i) for i in range(5)]  # all five run at 400-1000 ms
    assert peak(five) == (5000, 400 * MS, ["j0", "j1", "j2", "j3", "j4"])
    found = overcommits({"n1": five}, {"n1": 4000})
    assert len(found) == 1 and "n1: 5000m CPU" in found[0] and "capacity 4000m" in found[0]
    assert overcommits({"n1": five[:4]}, {"n1": 4000}) == []
    assert overcommits({"n1": [cpu("big", 0, 100, 3000), cpu("small", 50, 150, 2000)]}, {"n1": 4000})


def test_the_sweep_allows_runs_that_only_touch() -> None:
    back_to_back = [cpu(f"j{i}", 100 * i, 100 * i + 100) for i in range(10)]
    assert overcommits({"n1": back_to_back * 4}, {"n1": 4000}) == []  # four at a time, ends before starts
    late_end = [cpu("a", 0, 103), cpu("b", 100, 200)]  # 3 ms of overlap: within the slack
    assert peak(late_end, checks.SLACK_NS)[0] == 1000
    assert peak(late_end, 0)[0] == 2000
    assert peak([cpu("a", 0, 110), cpu("b", 100, 200)], checks.SLACK_NS)[0] == 2000  # 10 ms is no slack


def test_runs_of_real_entrypoints_are_read_back(tmp_path: Path) -> None:
    """Five timed bodies run at once by sh (as an agent runs them): the sweep sees five
    CPUs in use on a four-CPU node; a SIGTERM still writes the end line, a SIGKILL none."""
    jobs = Jobs(tmp_path)
    bodies = [jobs.timed_body(sleep_s=0.6) for _ in range(5)] + [jobs.timed_body(sleep_s=5) for _ in range(2)]
    procs = [subprocess.Popen(["/bin/sh", "-c", b["entrypoint"]], cwd=jobs.workdir, start_new_session=True,
                              stderr=subprocess.DEVNULL, env={**os.environ, "POOLQ_SUBMISSION_ID": b["submission_id"]})
             for b in bodies]
    time.sleep(0.3)
    os.killpg(procs[5].pid, signal.SIGTERM)
    os.killpg(procs[6].pid, signal.SIGKILL)
    assert [p.wait(10) for p in procs] == [0, 0, 0, 0, 0, 143, -9]
    runs = read_timed_runs(jobs.runs_file)
    assert read_runs(jobs.runs_file) == {b["submission_id"]: 1 for b in bodies}
    ids = [b["submission_id"] for b in bodies]
    assert all(len(runs[i]) == 1 and runs[i][0].agent_pid == os.getpid() for i in ids)
    assert runs[ids[5]][0].end is not None and runs[ids[6]][0].end is None
    short = [Interval(i, runs[i][0].start, runs[i][0].end or 0, 1000) for i in ids[:5]]
    assert overcommits({"n1": short}, {"n1": 4000}, checks.SLACK_NS)
    assert not overcommits({"n1": short}, {"n1": 5000}, checks.SLACK_NS)


def test_two_runs_of_one_job_at_once_are_found() -> None:
    plans = {"a": plan("a"), "b": plan("b")}
    records = {j: {"status": "FAILED", "error_type": "NODE_LOST", "end_time": "10000"} for j in plans}
    runs = {"a": [Run("a", 1, 1000 * MS, 2000 * MS), Run("a", 2, 1500 * MS, 2500 * MS)],  # overlapping
            "b": [Run("b", 1, 1000 * MS, 2000 * MS), Run("b", 2, 3000 * MS, 4000 * MS)]}  # one after the other
    found = checks.run_problems(plans, records, runs, {})
    assert len(found) == 1 and "two runs at once" in found[0] and "a (" in found[0] and "b (" not in found[0]


def test_a_run_after_the_end_is_found() -> None:
    plans = {"s": plan("s"), "t": plan("t"), "ok": plan("ok")}
    records = {"s": {"status": "STOPPED", "end_time": "1000"}, "t": {"status": "FAILED", "end_time": "1000"},
               "ok": {"status": "STOPPED", "end_time": "1000"}}
    runs = {"s": [Run("s", 1, 500 * MS, 1200 * MS)],  # ran 200 ms past its STOPPED end_time
            "t": [Run("t", 1, 1500 * MS, 1600 * MS)],  # started after it ended
            "ok": [Run("ok", 1, 500 * MS, 999 * MS)]}
    found = "\n".join(checks.run_problems(plans, records, runs, {}))
    assert "started after" in found and "STOPPED jobs that ran after" in found
    assert "\n  ok (" not in found


def test_a_killed_run_ends_by_its_agents_death_or_its_sleep() -> None:
    run = Run("k", 7, 1000 * MS, None)
    assert checks.run_end(run, plan("k", sleep_s=5), {}, {7: 2.0}) == 2000 * MS + checks.KILL_NS
    assert checks.run_end(run, plan("k", sleep_s=0.5), {}, {}) == 1500 * MS + checks.EXEC_NS
    assert checks.run_end(run, plan("k", sleep_s=5), {"end_time": "1200"}, {}) == 1200 * MS


def test_outcomes_need_an_explanation() -> None:
    plans = {"ok": plan("ok"), "bad": plan("bad"), "exit3": plan("exit3", exit_code=3), "lost": plan("lost"),
             "stopped": plan("stopped"), "unasked": plan("unasked"), "invalid": plan("invalid")}
    records = {"ok": {"status": "SUCCEEDED"}, "bad": {"status": "FAILED", "error_type": "ENTRYPOINT_FAILED"},
               "exit3": {"status": "FAILED", "error_type": "ENTRYPOINT_FAILED", "exit_code": "3"},
               "lost": {"status": "FAILED", "error_type": "NODE_LOST"}, "stopped": {"status": "STOPPED"},
               "unasked": {"status": "STOPPED"}, "invalid": {"status": "FAILED", "error_type": "INVALID_REQUEST"}}
    found = checks.outcome_problems(plans, records, {}, {"stopped": 1.0})
    assert len(found) == 1 and "(3)" in found[0]
    assert all(f"\n  {j} (" in found[0] for j in ("bad", "unasked", "invalid"))


def test_a_changed_terminal_status_and_a_stranded_job_are_found() -> None:
    ledger = Ledger()
    ledger.seen["flip"] = [Seen(1.0, "RUNNING", None, 500, None), Seen(2.0, "SUCCEEDED", None, 500, 1500),
                           Seen(3.0, "FAILED", "NODE_LOST", 500, 2500)]
    ledger.seen["back"] = [Seen(1.0, "RUNNING", None, 500, None), Seen(2.0, "PENDING", None, None, None)]
    ledger.seen["fine"] = [Seen(1.0, "PENDING", None, None, None), Seen(2.0, "SUCCEEDED", None, 1, 2),
                           Seen(3.0, "SUCCEEDED", None, 1, 2)]
    found = checks.poll_problems(ledger)
    assert len(found) == 1 and "(2)" in found[0] and "fine" not in found[0]

    ledger = Ledger()
    ledger.seen["stuck"] = [Seen(t, "RUNNING", None, 1000, None) for t in (2.0, 10.0, 20.0)]
    ledger.seen["slow"] = [Seen(t, "RUNNING", None, 1000, None) for t in (2.0, 10.0)]
    plans = {"stuck": plan("stuck", sleep_s=0.5), "slow": plan("slow", sleep_s=0.5)}
    runs = {"stuck": [Run("stuck", 1, 1000 * MS, 1500 * MS)]}
    found = checks.stranded_problems(ledger, plans, {}, runs, {}, 14.0)
    assert len(found) == 1 and "(1)" in found[0] and "stuck (" in found[0]
