"""The chaos test: an accepted job is never lost, stranded, run twice or over-committed,
under the faults real deployments meet (docs/faults.md).

A real redis-server (``appendfsync always``: an acknowledged job is on disk), two API
processes, two placement workers and two node agents (4 CPUs each), one of each kind
reaching Redis through a lost-reply relay (tests/faults/relay.py). Client threads submit
jobs of two tenants over POST /api/jobs, POST /api/jobs/batch and the poolq.submit queue,
stop some and poll all (tests/faults/chaos_clients.py), while a seeded nemesis kills,
pauses and restarts processes and Redis (tests/faults/nemesis.py). Then everything is
healed, every acknowledged job must end, and the checks of tests/faults/checker.py and
tests/faults/chaos_checks.py run on Redis, the runs file and what the clients saw.

    .venv/bin/python -m pytest tests/faults/test_chaos.py -x -s

The seed is printed first; POOLQ_CHAOS_SEED=<seed> replays its choices (the processes'
timing still varies). POOLQ_CHAOS_S sets how long the nemesis runs (default 60 s; it
always does every kind of fault at least once).
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults import chaos_checks as checks
from tests.faults.chaos_clients import Clients, Ledger
from tests.faults.checker import listing, peak, read_records, read_timed_runs, verify
from tests.faults.conftest import Jobs, RestartableRedis, Stack, wait_ready
from tests.faults.nemesis import Cli, Limits, Member, Nemesis, Timeline
from tests.faults.relay import Relay
from tests.procs import Proc

REDIS_APPENDFSYNC = "always"  # read by the redis_server fixture
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(480)]  # every wait is bounded; this bounds them all

LIMITS = Limits(claim_lease_s=3, node_ttl_s=4)
CHAOS_ENV = {
    "POOLQ_NODE_TTL_S": str(LIMITS.node_ttl_s),
    "POOLQ_HEARTBEAT_S": "0.5",
    "POOLQ_CLAIM_LEASE_S": str(LIMITS.claim_lease_s),
    "POOLQ_STOP_GRACE_S": "2",
    "POOLQ_DRAIN_S": "2",
    "POOLQ_SCHEDULE_TIMEOUT_MS": "0",  # no job fails for waiting, however long the faults last
}
NODES = {"n1": 4, "n2": 4}  # CPUs
TENANTS = ["team-a", "team-b"]
QUOTA = ["quota", "set", "team-b", "--rate", "200"]
RELAY_PROBABILITY = 0.1  # of holding back the reply to a script
SETTLE_S = 90.0  # after the heal, how long every acknowledged job has to end (a healthy run needs ~15 s)
STRANDED_S = LIMITS.node_ttl_s + 10  # RUNNING without a process for longer: not a lost agent


def chaos_seed() -> int:
    return int(os.environ.get("POOLQ_CHAOS_SEED") or random.SystemRandom().randrange(2**32))


def poolq_cli(env: dict[str, str]) -> Cli:
    """``python -m poolq <args>`` against the real Redis (not through a relay)."""

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "poolq", *args], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)

    return run


class Scenario:
    """The processes of the chaos test, each restartable, and the relays of three of them."""

    def __init__(self, stack: Stack, redis_server: RestartableRedis, seed: int):
        stack.env.update(CHAOS_ENV)
        self.stack, self.redis_server = stack, redis_server
        self.relays = {name: Relay(redis_server.port, seed=f"{seed}-{name}", probability=RELAY_PROBABILITY,
                                   delaying=False).start() for name in ("api", "worker", "agent")}
        self.apis: list[Proc] = []
        self.workers = [self._worker(f"worker-{i + 1}", relayed=i == 0) for i in range(2)]
        self.agents = [self._agent(node, relayed=i == 0) for i, node in enumerate(NODES)]

    def relayed(self, name: str) -> dict[str, str]:
        return {"POOLQ_REDIS_URL": self.relays[name].url(self.redis_server.password)}

    def _worker(self, name: str, *, relayed: bool) -> Member:
        env = self.relayed("worker") if relayed else None
        return Member(name + (" (relayed)" if relayed else ""), lambda: self.stack.worker(env=env, wait=False),
                      lambda proc: wait_ready(proc, name))

    def _agent(self, node: str, *, relayed: bool) -> Member:
        env = self.relayed("agent") if relayed else None
        return Member(f"agent {node}" + (" (relayed)" if relayed else ""),
                      lambda: self.stack.agent(node, cpus=str(NODES[node]), memory="8Gi", env=env, wait=False),
                      lambda proc: self.stack.wait_agent(proc, node), node_id=node)

    def start(self) -> list[str]:
        """Start everything (the workers and agents side by side), then let the relays lose
        replies; returns the two APIs' URLs."""
        members = self.workers + self.agents
        for member in members:
            member.start(wait=False)
        servers = []
        for env in (self.relayed("api"), None):
            proc, server = self.stack.api(env=env)
            self.apis.append(proc)
            servers.append(server)
        for member in members:
            assert member.proc is not None
            member.ready(member.proc)
        self.delay_replies(True)
        return servers

    def delay_replies(self, delaying: bool) -> None:
        for relay in self.relays.values():
            relay.delaying = delaying

    def stop(self) -> None:
        """Stop every process while its relay still runs (a relayed process shuts down
        through it), then the relays."""
        for member in self.workers + self.agents:
            if member.proc is not None:
                member.proc.stop()
        for proc in self.apis:
            proc.stop()
        for relay in self.relays.values():
            relay.stop()

    def node_of_pid(self) -> dict[int, str]:
        return {pid: str(member.node_id) for member in self.agents for pid in member.pids}

    def killed(self) -> dict[int, float]:
        return {pid: at for member in self.agents for pid, at in member.killed.items()}


def test_chaos(stack: Stack, jobs: Jobs, redis_server: RestartableRedis, redis_client: redis.Redis, admin: Any,
               tmp_path: Path) -> None:
    seed = chaos_seed()
    timeline = Timeline()
    timeline.log(f"chaos seed {seed} (POOLQ_CHAOS_SEED={seed} replays its choices); logs in {tmp_path}")
    cli = poolq_cli({"POOLQ_REDIS_URL": redis_server.url, "POOLQ_DATA_DIR": str(tmp_path / "data")})
    scenario = Scenario(stack, redis_server, seed)
    ledger = Ledger()
    nemesis = Nemesis(random.Random(f"{seed}-nemesis"), timeline, workers=scenario.workers, agents=scenario.agents,
                      redis_server=redis_server, limits=LIMITS, cli=cli, quota_args=QUOTA)
    clients: Clients | None = None
    try:
        servers = scenario.start()
        timeline.log(f"started: APIs {servers}, 2 placement workers, agents {list(NODES)}")
        clients = Clients(ledger, jobs, servers=servers, broker_url=redis_server.url, tenants=TENANTS, seed=seed).start()
        try:
            nemesis.run(float(os.environ.get("POOLQ_CHAOS_S") or 60))
        finally:
            scenario.delay_replies(False)
            nemesis.heal()
        timeline.log(f"healed; {len(ledger.acks)} jobs acknowledged so far; the clients finish what they sent")
        clients.stop_submitting()
        timeline.log(f"{len(ledger.acks)} jobs acknowledged; waiting up to {SETTLE_S:g}s for every one to end")
        outcome, problems = verify(
            redis_client, list(ledger.acks), jobs.runs_file, admin,
            tenants={i: p.tenant for i, p in ledger.plans.items()},
            late=[p.submission_id for p in ledger.acked("queue")], reruns_if_lost=True, timeout=SETTLE_S)
        clients.stop_polling()
        timeline.log("every check runs now")
        problems += verdict(timeline, ledger, jobs, redis_client, scenario, cli, outcome.records) + nemesis.problems
        problems += [f"a client thread failed: {failure}" for failure in clients.failures]
        summarize(timeline, ledger, outcome.records, nemesis, scenario, tmp_path)
    finally:
        if clients is not None:
            clients.halt()
        nemesis.resume_all()
        scenario.stop()
    assert not problems, f"chaos seed {seed}: the promise was broken:\n" + "\n".join(problems)


def verdict(timeline: Timeline, ledger: Ledger, jobs: Jobs, client: redis.Redis, scenario: Scenario, cli: Cli,
            records: dict[str, Any]) -> list[str]:
    """Every check of chaos_checks on what the clients saw, the records and the runs file."""
    plans, killed = ledger.plans, scenario.killed()
    every_run = read_timed_runs(jobs.runs_file)
    runs = {i: r for i, r in every_run.items() if i in plans}
    unacked = {i: plans[i].tenant for i in runs if i not in records}
    ran = {**read_records(client, unacked), **records}  # the records of every job that ran, acknowledged or not
    problems = checks.answer_problems(ledger)
    problems += checks.outcome_problems(plans, records, runs, ledger.stops)
    problems += checks.run_problems(plans, ran, runs, killed)
    by_node = checks.node_intervals(plans, ran, runs, scenario.node_of_pid(), killed)
    timeline.log(f"runs: {sum(map(len, runs.values()))}; most CPU in use at once (m): "
                 f"{ {n: peak(i, checks.SLACK_NS)[0] for n, i in sorted(by_node.items())} }")
    problems += checks.overcommit_problems(by_node, {n: c * 1000 for n, c in NODES.items()})
    problems += checks.poll_problems(ledger)
    problems += checks.stranded_problems(ledger, plans, ran, runs, killed, STRANDED_S)
    if set(every_run) - set(plans):
        problems.append(listing("runs of jobs no client made", sorted(set(every_run) - set(plans))))
    nodes_check = cli(["nodes", "check"])
    if nodes_check.returncode != 0:
        problems.append(f"poolq nodes check exited {nodes_check.returncode}:\n  {nodes_check.stdout.strip()[-2000:]}")
    return problems


def summarize(timeline: Timeline, ledger: Ledger, records: dict[str, Any], nemesis: Nemesis, scenario: Scenario,
              logs: Path) -> None:
    """What happened, in a few lines: the faults, the answers, the outcomes, the errors logged."""
    by_via = collections.Counter(ledger.plans[i].via for i in ledger.acks)
    outcomes = collections.Counter(f"{r.get('status')}/{r.get('error_type') or '-'}" for r in records.values())
    answers = {f"{what}:{status}": n for (what, status), n in sorted(ledger.counts.items(), key=str)}
    timeline.log(f"faults: {dict(collections.Counter(nemesis.done))}")
    timeline.log(f"replies held back by the relays: { {n: r.delayed for n, r in scenario.relays.items()} }")
    timeline.log(f"acknowledged: {dict(by_via)}; stop requests: {len(ledger.stops)}; outcomes: {dict(outcomes)}")
    timeline.log(f"answers (kind:HTTP status, None: no answer): {answers}")
    timeline.log("the processes' commonest ERROR lines:\n" + "\n".join(checks.log_digest(logs)))
