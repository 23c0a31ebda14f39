"""The chaos test's verdict beyond tests/faults/checker.py: what the clients saw, how each
job ended against what its entrypoint does, and what the runs file says about each run.

Every function returns problems, one string per kind, each listing the offending ids
with their records and runs; none raises, so that one broken promise does not hide another.
Times: runs in ns (date +%s%N), records in ms (Redis TIME), polls in s (time.time()),
all from the same host clock.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path
from typing import Any, Mapping

from tests.faults.chaos_clients import TERMINAL, Ledger, Plan
from tests.faults.checker import Interval, Run, listing, overcommits, peak

SLACK_NS = 5_000_000  # clock slack between two processes of one host, for "after" and "at once"
KILL_NS = 500_000_000  # a guardian kills the jobs of its dead agent within this
EXEC_NS = 200_000_000  # between a job's start line and its sleep beginning, at most (a loaded machine)
Records = Mapping[str, Mapping[str, Any]]
Runs = Mapping[str, list[Run]]


def clock(ns: float) -> str:
    """A time of day with milliseconds, as the timeline prints it."""
    return time.strftime("%H:%M:%S", time.localtime(ns / 1e9)) + f".{int(ns // 1_000_000) % 1000:03d}"


def describe(job: str, plans: Mapping[str, Plan], records: Records, runs: Runs) -> str:
    """One job in a failure message: what it was asked to do, its record, its runs."""
    plan, record = plans.get(job), records.get(job) or {}
    asked = f"{plan.via} {plan.tenant} {plan.cpus}m sleep {plan.sleep_s}s exit {plan.exit_code}" if plan else "?"
    ran = ", ".join(f"[pid {r.agent_pid} {clock(r.start)}-{clock(r.end) if r.end else '?'}]" for r in runs.get(job, []))
    times = "-".join(clock(int(record[k]) * 1e6) if record.get(k) else "?" for k in ("start_time", "end_time"))
    return (f"{job} ({asked}): {record.get('status')}/{record.get('error_type') or '-'} on {record.get('node') or '-'} "
            f"{times} exit {record.get('exit_code')} {str(record.get('message') or '')[:120]!r}; runs: {ran or 'none'}")


def answer_problems(ledger: Ledger) -> list[str]:
    """No 500; no refusal of a valid request; every request answered at last; no
    acknowledged job ever not found."""
    found = []
    for kind, title in (("errors", "HTTP 500 answers"), ("odd", "refusals of valid requests (4xx)"),
                        ("unresolved", "requests never answered definitely"),
                        ("vanished", "acknowledged jobs not found by a later poll or stop")):
        if getattr(ledger, kind):
            found.append(listing(title, getattr(ledger, kind)))
    return found


def outcome_problems(plans: Mapping[str, Plan], records: Records, runs: Runs, stops: Mapping[str, float]) -> list[str]:
    """Every terminal job ended as its entrypoint says (SUCCEEDED for exit 0, FAILED /
    ENTRYPOINT_FAILED with its exit code otherwise), or STOPPED because the client stopped
    it, or FAILED because its node was lost or shut down: no other failure is explained."""
    wrong = [describe(job, plans, records, runs) for job, record in records.items()
             if record.get("status") in TERMINAL and not _explained(plans[job], record, job in stops)]
    return [listing("jobs that ended otherwise than their entrypoint or a stop explains", wrong)] if wrong else []


def _explained(plan: Plan, record: Mapping[str, Any], stopped: bool) -> bool:
    status, error = record["status"], record.get("error_type")
    if status == "STOPPED":
        return stopped
    if status == "SUCCEEDED":
        return plan.exit_code == 0
    if error in ("NODE_LOST", "NODE_SHUTDOWN"):
        return True
    return error == "ENTRYPOINT_FAILED" and plan.exit_code != 0 and record.get("exit_code") == str(plan.exit_code)


def run_end(run: Run, plan: Plan, record: Mapping[str, Any], killed: Mapping[int, float]) -> int:
    """When a run stopped using its node (ns): its end line; without one (SIGKILL), no later
    than its sleep allows, its record's end if it was the run that ended it, and the kill of
    its agent (whose guardian kills its jobs)."""
    if run.end is not None:
        return run.end
    bounds = [run.start + int(plan.sleep_s * 1e9) + EXEC_NS]
    if record.get("end_time") and int(record["end_time"]) * 1_000_000 >= run.start:
        bounds.append(int(record["end_time"]) * 1_000_000)
    if run.agent_pid in killed:
        bounds.append(int(killed[run.agent_pid] * 1e9) + KILL_NS)
    return max(run.start, min(bounds))


def run_problems(plans: Mapping[str, Plan], records: Records, runs: Runs, killed: Mapping[int, float]) -> list[str]:
    """No two runs of one job at once; no run started after its job's record ended; a
    STOPPED job ran no longer than its end_time."""
    overlapping, late_start, past_stop = [], [], []
    for job, job_runs in runs.items():
        record = records.get(job) or {}
        intervals = [Interval(job, r.start, run_end(r, plans[job], record, killed), 1) for r in job_runs]
        if peak(intervals, SLACK_NS)[0] > 1:
            overlapping.append(describe(job, plans, records, runs))
        if not record.get("end_time") or record.get("status") not in TERMINAL:
            continue
        ended = int(record["end_time"]) * 1_000_000 + SLACK_NS
        if any(r.start > ended for r in job_runs):
            late_start.append(describe(job, plans, records, runs))
        if record["status"] == "STOPPED" and any(i.end > ended for i in intervals):
            past_stop.append(describe(job, plans, records, runs))
    found = []
    for items, title in ((overlapping, "jobs with two runs at once"),
                         (late_start, "jobs that started after their record says they ended"),
                         (past_stop, "STOPPED jobs that ran after their end_time")):
        if items:
            found.append(listing(title, items))
    return found


def node_intervals(plans: Mapping[str, Plan], records: Records, runs: Runs, node_of_pid: Mapping[int, str],
                   killed: Mapping[int, float]) -> dict[str, list[Interval]]:
    """Every run (acknowledged or not) as the CPU it used, on the node of the agent that
    started it ($PPID), else of its record."""
    by_node: dict[str, list[Interval]] = collections.defaultdict(list)
    for job, job_runs in runs.items():
        record = records.get(job) or {}
        for run in job_runs:
            node = node_of_pid.get(run.agent_pid) or record.get("node") or "?"
            by_node[node].append(Interval(job, run.start, run_end(run, plans[job], record, killed), plans[job].cpus))
    return by_node


def overcommit_problems(by_node: Mapping[str, list[Interval]], capacity: Mapping[str, int]) -> list[str]:
    """No node ran more CPU at once than it has (a sweep over its runs)."""
    found = overcommits(by_node, capacity, SLACK_NS)
    return [listing("nodes that ran more than their capacity at once", found)] if found else []


def log_digest(directory: Path, top: int = 10) -> list[str]:
    """The commonest ERROR lines of the processes' logs, counted, with times and ids left out:
    what the processes said about the problems found."""
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(directory.glob("*.log")):
        process = path.stem.rsplit("-", 1)[0]  # worker-10 -> worker, node-n1-7 -> node-n1
        for line in path.read_text(errors="replace").splitlines():
            if " ERROR " in line:
                text = re.sub(r"\[[0-9a-f-]{36}\]|:\d{4,5}\b", "", line.split(" ERROR ", 1)[1])
                counts[f"{process}: {text[:200]}"] += 1
    return [f"{n:5d} x {text}" for text, n in counts.most_common(top)]


def poll_problems(ledger: Ledger) -> list[str]:
    """Across the polls (sent one at a time, so in order), a terminal status never changed
    and no job went back from RUNNING to PENDING."""
    changed = []
    for job, history in ledger.seen.items():
        final = next((s for s in history if s.status in TERMINAL), None)
        states = [s.status for s in history]
        if final and any((s.status, s.error_type, s.end_time) != (final.status, final.error_type, final.end_time)
                         for s in history[history.index(final):]):
            changed.append(f"{job}: {' -> '.join(dict.fromkeys(states))} ({len(history)} polls)")
        elif "RUNNING" in states and "PENDING" in states[states.index("RUNNING"):]:
            changed.append(f"{job}: RUNNING then PENDING ({' -> '.join(states)})")
    return [listing("jobs whose polled status changed after it was final", changed)] if changed else []


def stranded_problems(ledger: Ledger, plans: Mapping[str, Plan], records: Records, runs: Runs,
                      killed: Mapping[int, float], limit_s: float) -> list[str]:
    """No job was polled RUNNING more than ``limit_s`` after its last process ended (or,
    with no process at all, after it was marked RUNNING): longer than a lost agent explains."""
    stranded = []
    for job, history in ledger.seen.items():
        running = [s for s in history if s.status == "RUNNING"]
        if not running:
            continue
        ends = [run_end(r, plans[job], records.get(job) or {}, killed) / 1e9 for r in runs.get(job, [])]
        began = [s.start_time / 1000 for s in running if s.start_time]
        since = max(ends) if ends else (min(began) if began else None)
        if since is not None and running[-1].sent - since > limit_s:
            stranded.append(f"polled RUNNING {running[-1].sent - since:.1f}s after its last process: "
                            + describe(job, plans, records, runs))
    return [listing(f"jobs RUNNING without a process for more than {limit_s:g}s", stranded)] if stranded else []
