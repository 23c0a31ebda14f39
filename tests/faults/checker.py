"""The fault-tolerance checker: what must hold in Redis after any fault (DESIGN.md 1, 3.3, 4).

Given every submission the client saw accepted (a 200), ``check`` waits until each has
ended and asserts, reading Redis directly:

- every accepted id exists (an accepted job is never lost);
- each reaches exactly one terminal state (SUCCEEDED, FAILED or STOPPED) that never
  changes afterwards: every poll compares with the first terminal state seen, and a
  final poll after a gap compares again;
- no job ran twice: each job's entrypoint appends its POOLQ_SUBMISSION_ID to one file;
  every id appears there at most once, and exactly once for a SUCCEEDED job;
- reservations add up: ``NodeAdmin.check()`` finds no problem (every node's reserved
  amount equals what its live jobs hold), and once everything has ended every node's
  ``res:*`` fields, every tenant's usage and the claimed set are back to empty.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
FIELDS = ["status", "error_type", "message", "end_time", "node", "res", "exit_code", "lost_claims"]
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


def read_runs(runs_file: Path) -> collections.Counter[str]:
    lines = runs_file.read_text().split("\n") if runs_file.exists() else []
    return collections.Counter(line.strip() for line in lines if line.strip())


def _read(client: Any, tenant: str, ids: list[str]) -> dict[str, dict[str, str | None]]:
    pipe = client.pipeline(transaction=False)
    for submission_id in ids:
        pipe.exists(f"poolq:job:{tenant}:{submission_id}")
        pipe.hmget(f"poolq:job:{tenant}:{submission_id}", FIELDS)
    answers = pipe.execute()
    out: dict[str, dict[str, str | None]] = {}
    for i, submission_id in enumerate(ids):
        exists, values = answers[2 * i], answers[2 * i + 1]
        out[submission_id] = dict(zip(FIELDS, values)) if exists else {}
    return out


def _fail(title: str, items: Iterable[Any]) -> str:
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


def check(
    client: Any,
    accepted: list[str],
    runs_file: Path,
    admin: Any,
    *,
    tenant: str = "default",
    timeout: float = 180.0,
    gap: float = 2.0,
) -> Outcome:
    """Wait until every accepted job ended, then assert the invariants above.

    Raises AssertionError listing every kind of violation found.
    """
    ids = list(dict.fromkeys(accepted))
    assert len(ids) == len(accepted), "the client saw an id accepted twice as a new job"
    first_terminal: dict[str, tuple[str | None, ...]] = {}
    changed: list[str] = []
    missing_seen: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    records: dict[str, dict[str, str | None]] = {}
    while True:
        records = _read(client, tenant, ids)
        for submission_id, fields in records.items():
            if not fields:
                missing_seen[submission_id] += 1
                continue
            state = (fields["status"], fields["error_type"], fields["end_time"])
            if fields["status"] in TERMINAL:
                before = first_terminal.setdefault(submission_id, state)
                if before != state:
                    changed.append(f"{submission_id}: {before} then {state}")
                    first_terminal[submission_id] = state
            elif submission_id in first_terminal:
                changed.append(f"{submission_id}: {first_terminal[submission_id]} then {state}")
        missing = [i for i, n in missing_seen.items() if n >= 2]
        waiting = [i for i, f in records.items() if f and f["status"] not in TERMINAL]
        if missing or not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if missing:
        problems.append(_fail("accepted jobs missing from Redis (lost)", missing))
    if waiting:
        problems.append(_fail(f"accepted jobs not terminal after {timeout:g}s",
                              (f"{i}: {records[i]['status']} on {records[i]['node'] or '-'}" for i in waiting)))

    # A terminal status never changes: read everything again after a gap.
    time.sleep(gap)
    again = _read(client, tenant, ids)
    for submission_id, fields in again.items():
        seen = records.get(submission_id) or {}
        if seen.get("status") in TERMINAL and (
            (fields.get("status"), fields.get("error_type"), fields.get("end_time"))
            != (seen["status"], seen["error_type"], seen["end_time"])
        ):
            changed.append(f"{submission_id}: {seen.get('status')} then {fields.get('status')}")
    if changed:
        problems.append(_fail("terminal jobs that changed status", changed))
    records = again

    # Nothing ran twice; every SUCCEEDED job ran once.
    runs = read_runs(runs_file)
    twice = [f"{i}: ran {n} times, now {records.get(i, {}).get('status')}" for i, n in runs.items() if n > 1]
    if twice:
        problems.append(_fail("jobs that ran more than once", twice))
    unrun = [i for i, f in records.items() if f.get("status") == "SUCCEEDED" and runs[i] != 1]
    if unrun:
        problems.append(_fail("SUCCEEDED jobs whose entrypoint did not run exactly once", (f"{i}: {runs[i]}" for i in unrun)))

    # Reservations: the invariant, then everything released.
    invariant = admin.check()
    if invariant:
        problems.append(_fail("reservation invariant (NodeAdmin.check)", invariant))
    if not waiting:
        held = {n: {r: a for r, a in res.items() if a} for n, res in node_reservations(client).items()}
        held = {n: res for n, res in held.items() if res}
        if held:
            problems.append(_fail("nodes still holding reservations after every job ended", held.items()))
        usage = {r: int(a) for r, a in client.hgetall(f"poolq:tenant:{tenant}:usage").items() if int(a)}
        if usage:
            problems.append(f"tenant {tenant} usage not back to 0 after every job ended: {usage}")
        leftover = [f"{n}: {sorted(client.smembers(f'poolq:node:{n}:jobs'))[:5]}" for n in sorted(client.smembers("poolq:nodes"))
                    if client.scard(f"poolq:node:{n}:jobs")]
        if leftover:
            problems.append(_fail("node job sets not empty after every job ended", leftover))
        claimed = client.zrange("poolq:claimed", 0, -1)
        if claimed:
            problems.append(_fail("jobs still claimed after every job ended", claimed))
        held_by_terminal = [i for i, f in records.items() if f.get("status") in TERMINAL and f.get("res")]
        if held_by_terminal:
            problems.append(_fail("terminal jobs still holding a reservation", held_by_terminal))
    assert not problems, "fault-tolerance contract broken:\n" + "\n".join(problems)
    return Outcome(records, runs)
