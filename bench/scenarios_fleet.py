"""The fleet scenario (issue 15): 100 and 1,000 node agents against one Redis.

The agents are real ``worker.agent.Agent`` objects, 100 to a process (``bench/fleet.py``:
what they share there, and why). For each fleet size, on a fresh Redis with one API and
two placement workers, in each run:

- idle: Redis CPU (INFO cpu, used_cpu_sys + used_cpu_user) and commands (INFO
  commandstats) a second over a window with the fleet idle, less the same before the
  fleet started, per agent, the placement workers paused in both windows; and the fleet
  processes' own CPU per agent;
- latency: single submissions at a modest paced rate, submit → SUCCEEDED from each
  record (p50, p99);
- placement: ``true`` jobs placed onto the fleet's nodes (``place_on_fleet``), then run
  by their agents: placements/s, and jobs finished/s;
- the idle placement workers' Redis CPU and commands with the fleet's nodes present
  (the fleet paused);

and once: GET /healthz and GET /metrics, which read every node. Beside the first fleet,
a few real ``poolq node`` processes, idle, for what an agent with a Celery worker of its
own costs Redis (the fleet's agents share one per process). At the end, in this process,
what a placement worker's view of the nodes (worker/placement.py) costs a job with 100 to
100,000 nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator

from bench.figures import ScenarioResult
from bench.fleet import POOL
from bench.loadgen import percentile
from bench.scenarios import Context, check_statuses, run_load, settle, submit_batches
from bench.scenarios_curves import used_memory
from bench.scenarios_workers import finished_rate, note_failures, placement_rate, statuses, wait_terminal
from bench.stack import PYTHON, Api, BenchError, Child, Stack, cpu_seconds, wait_for
from poolq import keys
from poolq.model import CPU, MEMORY, JobStatus
from worker.placement import Inventory, Node, Shape

SIZES = (100, 1000)
AGENTS_PER_PROCESS = 100
AGENT_CPUS = 32  # each agent's node: the placement jobs of a run fill the first nodes (binpack) of either fleet
PACED_RATE = 20.0
SCRIPTS_RUN = ("evalsha", "eval")  # commands whose script's own calls commandstats counts too


@dataclass
class Usage:
    """Redis's CPU and commands over a window, and the CPU of the given processes."""

    seconds: float
    redis_cpu: float  # CPU-seconds
    calls: dict[str, int]  # command -> calls, INFO's own left out
    processes_cpu: float = 0.0

    @property
    def commands(self) -> int:
        return sum(self.calls.values())

    def less(self, other: Usage) -> tuple[float, float]:
        """(Redis CPU-seconds a second, commands a second) beyond ``other``'s."""
        return (
            self.redis_cpu / self.seconds - other.redis_cpu / other.seconds,
            self.commands / self.seconds - other.commands / other.seconds,
        )


def redis_counters(stack: Stack) -> tuple[float, dict[str, int]]:
    return stack.redis_cpu_s(), {name: calls for name, (calls, _) in stack.command_stats().items()}


def measure(stack: Stack, seconds: float, pids: list[int] | None = None) -> Usage:
    """What Redis (and ``pids``) spent over the next ``seconds``."""
    pids = pids or []
    cpu0, calls0 = redis_counters(stack)
    proc0 = sum(cpu_seconds(pid) for pid in pids)
    began = time.monotonic()
    time.sleep(seconds)
    cpu1, calls1 = redis_counters(stack)
    elapsed = time.monotonic() - began
    proc1 = sum(cpu_seconds(pid) for pid in pids)
    calls = {name: n - calls0.get(name, 0) for name, n in calls1.items() if not name.startswith("info")}
    return Usage(elapsed, cpu1 - cpu0, {name: n for name, n in calls.items() if n}, proc1 - proc0)


def start_workers(stack: Stack) -> list[Child]:
    workers = [stack.worker(0), stack.worker(1)]
    stack.wait_ready(workers)
    return workers


def start_fleet(stack: Stack, size: int) -> list[Child]:
    """``size`` agents, AGENTS_PER_PROCESS to a ``python -m bench.fleet`` process, all live."""
    children = [
        stack.spawn(
            f"fleet-{first}",
            [PYTHON, "-m", "bench.fleet", "--first", str(first), "--count", str(min(AGENTS_PER_PROCESS, size - first))]
            + ["--cpus", str(AGENT_CPUS)],
        )
        for first in range(0, size, AGENTS_PER_PROCESS)
    ]

    def live() -> bool:
        for child in children:
            child.check_alive()
        return stack.redis.zcard(keys.HEARTBEATS) >= size and all(" ready." in c.output() for c in children)

    wait_for(live, 60 + size / 10, f"{size} fleet agents to register and consume their queues", interval_s=0.2)
    return children


def signal_all(children: list[Child], sig: signal.Signals) -> None:
    for child in children:
        os.kill(child.pid, sig)


@contextlib.contextmanager
def paused(children: list[Child]) -> Iterator[None]:
    """SIGSTOP the children for the block, SIGCONT after (also on an error)."""
    signal_all(children, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(children, signal.SIGCONT)


def place_on_fleet(
    stack: Stack, api: Api, workers: list[Child], fleet: list[Child], tenant: str, bodies: list[dict[str, Any]]
) -> list[str]:
    """Submit ``bodies`` while the placement workers are paused, then pause the fleet and let
    the workers go until every job is placed; then the fleet goes on and runs them. So the
    rate is that of placement onto the fleet's live nodes, not of the agents running what
    they are given on the same two cores (which it was, 1,000 to 3,300 placements/s from
    run to run with either fleet, while building this scenario)."""
    with paused(workers):
        ids = submit_batches(api, bodies, {"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})
        signal_all(fleet, signal.SIGSTOP)
    try:
        line = keys.shape_queue(str(stack.redis.hget(keys.job(keys.ref(tenant, ids[0])), "shape")))
        wait_for(
            lambda: stack.redis.zcard(line) + stack.redis.zcard(keys.CLAIMED) == 0,
            60,
            f"{len(ids)} jobs to be placed",
            interval_s=0.02,
        )
    finally:
        signal_all(fleet, signal.SIGCONT)
    return ids


def p50_ms(api: Api, path: str, count: int = 10) -> float:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        status, _, _ = api.request("GET", path)
        times.append((time.perf_counter() - began) * 1000)
        if status != 200:
            raise BenchError(f"GET {path} answered {status}")
    return statistics.median(times)


def fleet(ctx: Context) -> None:
    result = ctx.result("fleet")
    window_s = 2.0 if ctx.quick else 6.0  # a multiple of the 2 s heartbeat
    jobs = 600 if ctx.quick else 2000
    paced_s = 2.0 if ctx.quick else 5.0
    breakdown = ""
    for size in SIZES:
        label = f"{size:,} agents"
        with Stack(f"fleet{size}") as stack:
            stack.start_redis()
            api = stack.api()
            workers = start_workers(stack)
            time.sleep(1.0)
            with paused(workers):  # what is measured is the agents': the workers' duties vary more than that
                empty = measure(stack, window_s)
                if size == SIZES[0]:
                    real_agents(stack, result, empty, window_s)
            before = used_memory(stack)
            children = start_fleet(stack, size)
            pids = [child.pid for child in children]
            time.sleep(1.0)
            result.add(
                f"{size}.bytes_per_agent",
                (used_memory(stack) - before) / size,
                label=f"Redis bytes per agent, {label}",
                unit="bytes",
            )
            job = {"entrypoint": "true", "entrypoint_num_cpus": 1, "runtime_env": {"working_dir": str(stack.root)}}
            # Each placement worker's first round after the fleet came reads its 1,000 registrations.
            paced(stack, api, result, "fleet-warmup", job, 1.0, label)
            for run in range(ctx.runs):
                settle(stack)  # no append-only file rewrite in the windows
                with paused(workers):
                    idle = measure(stack, window_s, pids)
                cpu, commands = idle.less(empty)
                result.add(f"{size}.redis_cpu", 100 * cpu, label=f"Redis CPU, fleet idle, {label}", unit="% of a core")
                result.add(
                    f"{size}.cpu_per_agent", 1e6 * cpu / size, label=f"Redis CPU per idle agent, {label}", unit="µs/s"
                )
                result.add(
                    f"{size}.commands_per_agent",
                    commands / size,
                    label=f"Redis commands/s per idle agent, {label}",
                    unit="commands/s",
                )
                result.add(
                    f"{size}.fleet_cpu_per_agent",
                    1e6 * idle.processes_cpu / idle.seconds / size,
                    label=f"fleet processes' CPU per idle agent, {label}",
                    unit="µs/s",
                )
                if size == SIZES[-1]:
                    breakdown = per_agent_calls(idle, empty, size)
                latencies = paced(stack, api, result, f"fleet-paced-{run}", job, paced_s, label)
                what = f"submit → SUCCEEDED at {PACED_RATE:g} jobs/s, {label}"
                result.add(f"{size}.paced.p50", percentile(latencies, 50), label=f"{what}: p50", unit="ms")
                result.add(f"{size}.paced.p99", percentile(latencies, 99), label=f"{what}: p99", unit="ms")

                tenant = f"fleet-place-{run}"
                settle(stack)
                ids = place_on_fleet(stack, api, workers, children, tenant, [job] * jobs)
                rows = wait_terminal(stack, tenant, ids, 60 + jobs / 20)
                note_failures(result, f"placement, {label}", rows)
                result.add(
                    f"{size}.placed",
                    placement_rate(stack, tenant, ids),
                    label=f"placements/s onto the fleet's nodes, {label}",
                    unit="placements/s",
                )
                # From the first job's start (the fleet was paused while they were placed) to the last end.
                started = statuses(stack, tenant, ids, "status", "start_time", "end_time", "message")
                result.add(
                    f"{size}.finished",
                    finished_rate(started),
                    label=f"jobs finished/s by the fleet (first start → last end), {label}",
                    unit="jobs/s",
                )
                for child in children:
                    child.check_alive()
                time.sleep(0.5)  # the last jobs' threads end
                with paused(children):
                    busy = measure(stack, window_s)
                cpu, commands = busy.less(empty)
                result.add(
                    f"{size}.workers_cpu",
                    1e6 * cpu,
                    label=f"Redis CPU of the idle placement workers, {label}",
                    unit="µs/s",
                )
                result.add(
                    f"{size}.workers_commands",
                    commands,
                    label=f"Redis commands/s of the idle placement workers, {label}",
                    unit="commands/s",
                )
                time.sleep(0.5)
            result.add(f"{size}.healthz", p50_ms(api, "/healthz"), label=f"GET /healthz p50, {label}", unit="ms")
            result.add(f"{size}.metrics", p50_ms(api, "/metrics"), label=f"GET /metrics p50, {label}", unit="ms")
            signal_all(children, signal.SIGTERM)  # they stop together, not one after the other
    inventory_costs(result, (100, 1000, 10_000) if ctx.quick else (100, 1000, 10_000, 100_000))
    notes(result, window_s, jobs, paced_s, breakdown)


def inventory_costs(result: ScenarioResult, sizes: tuple[int, ...], jobs: int = 3000) -> None:
    """A placement worker's view of the nodes (worker/placement.py), in this process: what
    choosing a node and applying the reservation costs a job, and what taking in a changed
    node costs, with more nodes. Its indexes are sorted lists: both are a binary search
    and a list insertion, which moves the entries after it."""
    req = {CPU: 1000, MEMORY: 128 << 20}
    shape = Shape(sig="s", tenant="t", req=req, show={}, terms=(), anti=False, selector={})

    def node(i: int) -> Node:
        return Node(
            id=f"n{i:06d}", pool=POOL, labels={"pool": POOL}, capacity={CPU: 32_000, MEMORY: 1 << 40}, reserved={}
        )

    for size in sizes:
        inventory = Inventory()
        for i in range(size):
            inventory.upsert(node(i))
        began = time.perf_counter()
        for _ in range(jobs):
            chosen = inventory.choose(shape)
            if chosen is None:
                raise BenchError(f"no node of {size} fits a job")
            inventory.reserve(chosen, req)
        placed = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(jobs):
            inventory.upsert(node(i * 7919 % size))
        upserted = time.perf_counter() - began
        label = f"{size:,} nodes"
        result.add(
            f"view.{size}.choose",
            1e6 * placed / jobs,
            label=f"placement's view: choose + reserve a job, {label}",
            unit="µs",
        )
        result.add(
            f"view.{size}.upsert",
            1e6 * upserted / jobs,
            label=f"placement's view: take in a changed node, {label}",
            unit="µs",
        )


def paced(
    stack: Stack, api: Api, result: ScenarioResult, tenant: str, job: dict[str, Any], seconds: float, label: str
) -> list[float]:
    """Single submissions at PACED_RATE for ``seconds``; submit → SUCCEEDED of each, ms."""
    spec = {
        "port": api.port,
        "method": "POST",
        "path": "/api/jobs",
        "body": json.dumps(job),
        "rate": PACED_RATE,
        "connections": 4,
        "headers": {"X-Tenant-Id": tenant},
        "warmup": 0,
        "seconds": seconds,
    }
    check_statuses(result, f"paced, {label}", run_load(stack, spec))
    ids = [str(i) for i in stack.redis.zrange(keys.tenant_jobs(tenant), 0, -1)]
    rows = wait_terminal(stack, tenant, ids, 60)
    note_failures(result, f"paced, {label}", rows)
    return [float(int(row[2] or 0) - int(row[1] or 0)) for row in rows if row[0] == JobStatus.SUCCEEDED]


def per_agent_calls(idle: Usage, empty: Usage, size: int) -> str:
    """The commands a second an idle agent costs, by command, largest first."""
    rates = {
        name: (n / idle.seconds - empty.calls.get(name, 0) / empty.seconds) / size for name, n in idle.calls.items()
    }
    shown = sorted(((rate, name) for name, rate in rates.items() if rate >= 0.005), reverse=True)
    return ", ".join(f"{name} {rate:.2f}" for rate, name in shown)


REAL_AGENTS = 4  # `poolq node` processes measured together: one alone is within the noise


def real_agents(stack: Stack, result: ScenarioResult, empty: Usage, window_s: float) -> None:
    """REAL_AGENTS ``poolq node`` processes, idle: what an agent with a Celery worker of its own costs Redis."""
    children = [
        stack.spawn(
            f"node-real-{i}",
            [PYTHON, "-m", "poolq", "node", "--id", f"real-{i}", "--pool", "real", "--cpus", "4", "--memory", "16Gi"]
            + ["--no-enforce"],
        )
        for i in range(REAL_AGENTS)
    ]

    def live() -> bool:
        for child in children:
            child.check_alive()
        return all(
            stack.redis.hget(keys.node(f"real-{i}"), "state") == "live" and " ready." in child.output()
            for i, child in enumerate(children)
        )

    try:
        wait_for(live, 60, f"{REAL_AGENTS} `poolq node` processes to register", interval_s=0.1)
        time.sleep(1.0)
        usage = measure(stack, window_s)
    finally:
        for child in children:
            child.signal(signal.SIGTERM)
        for child in children:
            stack.stop(child)
    cpu, commands = usage.less(empty)
    result.add("real.cpu", 1e6 * cpu / REAL_AGENTS, label="Redis CPU per idle `poolq node` process", unit="µs/s")
    result.add(
        "real.commands",
        commands / REAL_AGENTS,
        label="Redis commands/s per idle `poolq node` process",
        unit="commands/s",
    )
    real = ", ".join(
        f"{name} {(n / usage.seconds - empty.calls.get(name, 0) / empty.seconds) / REAL_AGENTS:.2f}"
        for n, name in sorted(((n, name) for name, n in usage.calls.items()), reverse=True)
        if n / usage.seconds - empty.calls.get(name, 0) / empty.seconds >= 0.005 * REAL_AGENTS
    )
    result.note(f"an idle `poolq node` process's commands a second, by command: {real}")


def notes(result: ScenarioResult, window_s: float, jobs: int, paced_s: float, breakdown: str) -> None:
    result.note(
        f"fleet: real `worker.agent.Agent` objects, {AGENTS_PER_PROCESS} to a `python -m bench.fleet` process "
        "(one Redis client, one thread turning their loops, one Celery worker consuming their queues, one job "
        f"guardian; bench/fleet.py), each node {AGENT_CPUS} CPUs, jobs without cgroups; one API (2 processes) and "
        "two `poolq worker` processes on the same Redis; heartbeats every 2 s (POOLQ_HEARTBEAT_S), the inbox "
        "read every 0.5 s or when woken"
    )
    result.note(
        f"idle: INFO cpu (used_cpu_sys + used_cpu_user) and INFO commandstats over {window_s:g} s with the fleet "
        f"idle, less the same over {window_s:g} s before it started, divided by the agents, the placement workers "
        "paused (SIGSTOP) in both windows: their periodic duties vary by more from window to window than 100 "
        "agents cost. "
        "commandstats counts a script's own calls besides its EVALSHA (heartbeat.lua: 4 commands); fleet CPU: "
        "/proc of the fleet processes over the same window"
    )
    if breakdown:
        result.note(f"an idle fleet agent's commands a second, by command (1,000 agents): {breakdown}")
    result.note(
        f"placement: {jobs:,} `true` jobs (1 CPU) a run through the batch route with X-Schedule-Timeout-Ms: 0 "
        "while the placement workers are paused; then the fleet's processes are paused and the workers go on "
        "until every job is placed, and the fleet goes on and runs them (place_on_fleet says why); "
        "placements/s from the first placed_time to the last (Redis's clock); binpack fills the same first "
        f"{-(-jobs // AGENT_CPUS)} nodes of either fleet; finished/s from the first start_time to the last end_time"
    )
    result.note(
        f"latency: single POST /api/jobs paced at {PACED_RATE:g}/s for {paced_s:g} s, 4 connections, before each "
        "run's placement (after 1 s of them unmeasured: each placement worker's first round after the fleet "
        "came reads its registrations); each record's end_time − submit_time. The p99 is a node agent's, not "
        "the fleet's: in the slowest 1 %, start → end is about 105 ms of a `true` job (seen while building this "
        "scenario, with 100 agents as with 1,000): when the job's pipes reach end-of-file before its exit can be "
        "reaped, JobRun._capture sleeps 0.1 s before it looks again"
    )
    result.note(
        "idle placement workers: the same windows with the workers running and the fleet paused (its nodes "
        "present, their heartbeats fresh), less the window before the fleet started"
    )
    result.note(
        "GET /healthz and GET /metrics read every node (poolq/health.py, describe_nodes): they grow with the "
        "fleet; neither is on the path of a heartbeat or a placement"
    )
    result.note(
        "placement's view: worker.placement.Inventory in the benchmark's process, nodes of 32 CPUs, 3,000 jobs "
        "of 1 CPU chosen and reserved (binpack), then 3,000 nodes taken in again as a changed node is; its "
        "indexes are sorted Python lists, so each reservation's re-indexing moves the list's entries after it: "
        "that grows with the nodes"
    )
