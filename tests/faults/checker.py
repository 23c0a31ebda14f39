"""The fault-tolerance checker: what must hold in Redis after any fault (docs/faults.md).

Given every submission the client saw accepted (a 200), ``check`` waits until each has
ended and asserts, reading Redis directly:

- every accepted id exists (an accepted job is never lost);
- each reaches exactly one terminal state (SUCCEEDED, FAILED or STOPPED) that never
  changes afterwards: every poll compares with the first terminal state seen, and a
  final poll after a gap compares again;
- no job ran twice: each job's entrypoint appends its POOLQ_SUBMISSION_ID to one file
  (or, for ``Jobs.timed_body``, a ``start`` line with it); every id appears there at most
  once, and exactly once for a SUCCEEDED job;
- reservations add up: ``NodeAdmin.check()`` finds no problem (every node's reserved
  amount equals what its live jobs hold), and once everything has ended every node's
  ``res:*`` fields, every tenant's usage and the claimed set are back to empty.

For timed bodies, ``read_timed_runs`` gives each run's start and end, and ``peak`` /
``overcommits`` sweep them: no node ran more at once than it has.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

from poolq.model import TERMINAL_STATUSES

FIELDS = ["status", "error_type", "message", "start_time", "end_time", "node", "res", "exit_code", "lost_claims"]
SHOWN = 12  # problems listed in a failure message, per kind


@dataclasses.dataclass
class Outcome:
    """What the checker found: the final fields of every accepted job, and runs per id."""

    records: dict[str, dict[str, str | None]]
    runs: collections.Counter[str]

    def by_status(self) -> collections.Counter[str]:
        return collections.Counter(str(r["status"]) for r in self.records.values())

    def by_error(self) -> collections.Counter[str]:
        return collections.Counter(f"{r['status']}/{r['error_type'] or '-'}" for r in self.records.values())

    def with_status(self, status: str) -> dict[str, dict[str, str | None]]:
        return {i: r for i, r in self.records.items() if r["status"] == status}


def _lines(runs_file: Path) -> list[list[str]]:
    text = runs_file.read_text() if runs_file.exists() else ""
    return [line.split() for line in text.split("\n") if line.strip()]


def read_runs(runs_file: Path) -> collections.Counter[str]:
    """Runs per id: lines holding just the id (``Jobs.body``), or ``start`` lines (``Jobs.timed_body``)."""
    runs: collections.Counter[str] = collections.Counter()
    for words in _lines(runs_file):
        if words[0] == "start" and len(words) == 4:
            runs[words[1]] += 1
        elif words[0] != "end":
            runs[" ".join(words)] += 1
    return runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a timed job's entrypoint: the agent that started it, and when (ns since the epoch)."""

    job: str
    agent_pid: int
    start: int
    end: int | None  # None: it wrote no end line (killed by SIGKILL)


def read_timed_runs(runs_file: Path) -> dict[str, list[Run]]:
    """Every run per id, oldest first: each start line with the next end line of the same
    job and agent (lines are appended in the order they happen)."""
    started: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    runs: dict[str, list[Run]] = collections.defaultdict(list)
    for words in _lines(runs_file):
        if len(words) != 4 or words[0] not in ("start", "end"):
            continue
        word, job, pid, ns = words[0], words[1], int(words[2]), int(words[3])
        if word == "start":
            started[job, pid].append(ns)
        elif started[job, pid]:  # an end line without a start: a second end (the TERM trap), or a torn run
            runs[job].append(Run(job, pid, started[job, pid].pop(0), ns))
    for (job, pid), starts in started.items():
        runs[job] += [Run(job, pid, start, None) for start in starts]
    return {job: sorted(found, key=lambda r: r.start) for job, found in runs.items()}


@dataclasses.dataclass(frozen=True)
class Interval:
    """A stretch of time (ns) during which a job used ``amount`` of a node (milli-CPU)."""

    job: str
    start: int
    end: int
    amount: int


def peak(intervals: Iterable[Interval], slack_ns: int = 0) -> tuple[int, int, list[str]]:
    """The most used at one time, when (ns), and by which jobs. Each interval ends
    ``slack_ns`` early, so that runs that merely touch do not count as overlapping."""
    events = []
    for i, interval in enumerate(intervals):
        end = interval.end - slack_ns
        if end > interval.start:  # shorter than the slack: it overlaps nothing by more
            events += [(interval.start, 1, i, interval), (end, 0, i, interval)]
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant, ends before starts
    load, best, when, active, holders = 0, 0, 0, {}, []
    for at, is_start, i, interval in events:
        if is_start:
            active[i] = interval
            load += interval.amount
            if load > best:
                best, when, holders = load, at, sorted(a.job for a in active.values())
        else:
            del active[i]
            load -= interval.amount
    return best, when, holders


def overcommits(by_node: Mapping[str, Iterable[Interval]], capacity: Mapping[str, int], slack_ns: int = 0) -> list[str]:
    """Nodes whose jobs used more than the node has at some moment, with that moment."""
    found = []
    for node, intervals in sorted(by_node.items()):
        used, when, jobs = peak(intervals, slack_ns)
        if used > capacity.get(node, 0):
            moment = time.strftime("%H:%M:%S", time.localtime(when / 1e9)) + f".{when // 1_000_000 % 1000:03d}"
            found.append(f"node {node}: {used}m CPU in use at {moment} (capacity {capacity.get(node, 0)}m), by {jobs}")
    return found


def read_records(client: Any, tenant_of: Mapping[str, str]) -> dict[str, dict[str, str | None]]:
    """The FIELDS of each id's record (tenant_of: id -> tenant); {} for an id with none."""
    ids = list(tenant_of)
    pipe = client.pipeline(transaction=False)
    for submission_id in ids:
        pipe.exists(f"poolq:job:{tenant_of[submission_id]}:{submission_id}")
        pipe.hmget(f"poolq:job:{tenant_of[submission_id]}:{submission_id}", FIELDS)
    answers = pipe.execute()
    out: dict[str, dict[str, str | None]] = {}
    for i, submission_id in enumerate(ids):
        exists, values = answers[2 * i], answers[2 * i + 1]
        out[submission_id] = dict(zip(FIELDS, values)) if exists else {}
    return out


def listing(title: str, items: Iterable[Any]) -> str:
    """A problem: its title, how many, and the first SHOWN items."""
    items = list(items)
    shown = "\n  ".join(str(x) for x in items[:SHOWN])
    more = f"\n  … and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def node_reservations(client: Any) -> dict[str, dict[str, int]]:
    """Every node's ``res:*`` fields, read straight from its hash."""
    out = {}
    for node_id in sorted(client.smembers("poolq:nodes")):
        fields = client.hgetall(f"poolq:node:{node_id}")
        out[node_id] = {k[4:]: int(v) for k, v in fields.items() if k.startswith("res:")}
    return out


def check(client: Any, accepted: list[str], runs_file: Path, admin: Any, **options: Any) -> Outcome:
    """Wait until every accepted job ended, then assert the invariants above (``verify``).

    Raises AssertionError listing every kind of violation found.
    """
    outcome, problems = verify(client, accepted, runs_file, admin, **options)
    assert not problems, "fault-tolerance contract broken:\n" + "\n".join(problems)
    return outcome


def verify(
    client: Any,
    accepted: list[str],
    runs_file: Path,
    admin: Any,
    *,
    tenant: str = "default",
    tenants: Mapping[str, str] | None = None,
    late: Collection[str] = (),
    reruns_if_lost: bool = False,
    timeout: float = 180.0,
    gap: float = 2.0,
) -> tuple[Outcome, list[str]]:
    """Wait until every accepted job ended (or ``timeout``), then check the invariants above;
    returns what was found and the violations, one string per kind.

    ``tenants`` gives the tenant of each id (``tenant`` for the others); ids in ``late``
    may be stored after they were accepted (queued jobs), so they count as lost only if
    still absent at the timeout. With ``reruns_if_lost``, a job whose record says its node
    was lost (NODE_LOST) may have run more than once (the caller checks the runs apart).
    """
    ids = list(dict.fromkeys(accepted))
    assert len(ids) == len(accepted), "the client saw an id accepted twice as a new job"
    tenant_of = {i: (tenants or {}).get(i, tenant) for i in ids}
    first_terminal: dict[str, tuple[str | None, ...]] = {}
    changed: list[str] = []
    missing_seen: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    records: dict[str, dict[str, str | None]] = {}
    while True:
        records = read_records(client, tenant_of)
        for submission_id, fields in records.items():
            if not fields:
                missing_seen[submission_id] += 1
                continue
            state = (fields["status"], fields["error_type"], fields["end_time"])
            if fields["status"] in TERMINAL_STATUSES:
                before = first_terminal.setdefault(submission_id, state)
                if before != state:
                    changed.append(f"{submission_id}: {before} then {state}")
                    first_terminal[submission_id] = state
            elif submission_id in first_terminal:
                changed.append(f"{submission_id}: {first_terminal[submission_id]} then {state}")
        missing = [i for i, n in missing_seen.items() if n >= 2 and i not in late]
        unstored = [i for i in late if not records.get(i)]
        waiting = [i for i, f in records.items() if f and f["status"] not in TERMINAL_STATUSES]
        if missing or not (waiting or unstored) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if missing:
        problems.append(listing("accepted jobs missing from Redis (lost)", missing))
    if unstored:
        problems.append(listing(f"accepted (queued) jobs never stored in {timeout:g}s (lost)", unstored))
    if waiting:
        problems.append(listing(f"accepted jobs not terminal after {timeout:g}s",
                              (f"{i}: {records[i]['status']} on {records[i]['node'] or '-'}: {records[i]['message'] or ''}"
                               for i in waiting)))

    # A terminal status never changes: read everything again after a gap.
    time.sleep(gap)
    again = read_records(client, tenant_of)
    for submission_id, fields in again.items():
        seen = records.get(submission_id) or {}
        if seen.get("status") in TERMINAL_STATUSES and (
            (fields.get("status"), fields.get("error_type"), fields.get("end_time"))
            != (seen["status"], seen["error_type"], seen["end_time"])
        ):
            changed.append(f"{submission_id}: {seen.get('status')} then {fields.get('status')}")
    if changed:
        problems.append(listing("terminal jobs that changed status", changed))
    records = again

    # Nothing ran twice; every SUCCEEDED job ran once.
    runs = read_runs(runs_file)
    excused = {i for i, f in records.items() if reruns_if_lost and f.get("error_type") == "NODE_LOST"}
    twice = [f"{i}: ran {n} times, now {records.get(i, {}).get('status')}" for i, n in runs.items()
             if n > 1 and i not in excused]
    if twice:
        problems.append(listing("jobs that ran more than once", twice))
    unrun = [i for i, f in records.items() if f.get("status") == "SUCCEEDED" and runs[i] != 1]
    if unrun:
        problems.append(listing("SUCCEEDED jobs whose entrypoint did not run exactly once", (f"{i}: {runs[i]}" for i in unrun)))

    # Reservations: the invariant, then everything released, and nothing left claimed.
    claimed = client.zrange("poolq:claimed", 0, -1)
    if claimed:
        problems.append(listing("jobs still claimed by a placement worker at the end", claimed))
    invariant = admin.check()
    if invariant:
        problems.append(listing("reservation invariant (NodeAdmin.check)", invariant))
    if not waiting:
        held = {n: {r: a for r, a in res.items() if a} for n, res in node_reservations(client).items()}
        held = {n: res for n, res in held.items() if res}
        if held:
            problems.append(listing("nodes still holding reservations after every job ended", held.items()))
        for name in sorted(set(tenant_of.values())):
            usage = {r: int(a) for r, a in client.hgetall(f"poolq:tenant:{name}:usage").items() if int(a)}
            if usage:
                problems.append(f"tenant {name} usage not back to 0 after every job ended: {usage}")
        leftover = [f"{n}: {sorted(client.smembers(f'poolq:node:{n}:jobs'))[:5]}" for n in sorted(client.smembers("poolq:nodes"))
                    if client.scard(f"poolq:node:{n}:jobs")]
        if leftover:
            problems.append(listing("node job sets not empty after every job ended", leftover))
        held_by_terminal = [i for i, f in records.items() if f.get("status") in TERMINAL_STATUSES and f.get("res")]
        if held_by_terminal:
            problems.append(listing("terminal jobs still holding a reservation", held_by_terminal))
    return Outcome(records, runs), problems
