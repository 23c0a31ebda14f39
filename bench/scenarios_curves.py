"""How the rates change as the work grows: the cost curves of issue 12 (BENCHMARKS.md).

- ``stored``: single submissions, ``?ids=`` reads and Redis memory with 0, 100,000 and
  1,000,000 finished records already in Redis (cloned, bench/records.py);
- ``backlog``: placements/s with 10,000 and 100,000 jobs pending of 1, 100 and 10,000
  distinct shapes, and Redis memory per pending job;
- ``agents``: `true` jobs finished/s with 1, 4 and 16 node agents on this one machine.
"""

from __future__ import annotations

import math

from bench.figures import ScenarioResult, Target
from bench.records import Clones
from bench.scenarios import SEED_BODY, Context, check_statuses, describe, run_load, settle, submit_batches, submit_spec
from bench.scenarios_workers import add_static_nodes, finished_rate, placement_rate, statuses, wait_terminal
from bench.stack import BenchError, Stack, wait_for
from poolq.model import JobStatus


def curves(ctx: Context) -> None:
    result = ctx.result("curves")
    stored(ctx, result)
    backlog(ctx, result)
    agents(ctx, result)


def used_memory(stack: Stack) -> int:
    return int(stack.redis.info("memory")["used_memory"])


def stored(ctx: Context, result: ScenarioResult) -> None:
    """Submissions and reads of one tenant while its finished records grow."""
    sizes = (0, 10_000, 100_000) if ctx.quick else (0, 100_000, 1_000_000)
    tenant = "bench-curves"
    with Stack("curves-stored") as stack:
        stack.start_redis()
        with Clones(stack, tenant, SEED_BODY) as records:
            api = stack.api()
            ids: list[str] = []
            for size in sizes:
                before, written = used_memory(stack), records.count
                ids += records.grow_to(size)
                if size > written:
                    settle(stack)
                    result.add(
                        f"stored.{size}.bytes",
                        (used_memory(stack) - before) / (size - written),
                        label=f"Redis bytes a finished job, records {written:,} → {size:,}",
                        unit="bytes",
                    )
                submit = submit_spec(ctx, api.port, headers={"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})
                reads = [
                    {"path": "/api/jobs?ids=" + ",".join(ids[i : i + 100])}
                    for i in range(0, min(len(ids), 10_000), 100)
                ]
                for _ in range(ctx.runs):
                    load = run_load(stack, submit)
                    check_statuses(result, f"submit with {size:,} stored", load)
                    label = f"with {size:,} finished jobs stored"
                    result.add(
                        f"stored.{size}.submit", load["counted_rate"], label=f"submissions/s {label}", unit="jobs/s"
                    )
                    result.add(f"stored.{size}.p99", load["p99_ms"], label=f"submission p99 {label}", unit="ms")
                    if reads:
                        many = run_load(
                            stack,
                            {
                                "port": api.port,
                                "requests": reads,
                                "connections": 8,
                                "count": '"submission_id"',
                                "headers": {"X-Tenant-Id": tenant},
                                **ctx.window(),
                            },
                        )
                        check_statuses(result, f"?ids= with {size:,} stored", many)
                        result.add(
                            f"stored.{size}.ids", many["p50_ms"], label=f"?ids= (100 ids) p50 {label}", unit="ms"
                        )
            result.note(
                f"stored: finished records of one tenant cloned from a real job (bench/records.py); submissions of "
                f"the seed's body to that tenant, {describe(submit)}, no placement worker; ?ids= of 100 stored "
                "ids, 8 connections; bytes: used_memory before and after the records were written (AOF rewrite settled)"
            )


def backlog(ctx: Context, result: ScenarioResult) -> None:
    """Placements/s with a backlog of pending jobs of more or fewer distinct shapes."""
    sizes = (10_000,) if ctx.quick else (10_000, 100_000)
    for jobs in sizes:
        for shapes in (1, 100, 10_000):
            with Stack(f"curves-backlog-{jobs}-{shapes}") as stack:
                stack.start_redis()
                api = stack.api()
                add_static_nodes(stack, 100, max(64, math.ceil(2 * 3 * jobs / 100)))
                tenant = "bench-backlog"
                # A shape is what a job asks for: here, 4 KiB more memory a shape (all fit the nodes).
                bodies = [{**SEED_BODY, "entrypoint_memory": (128 << 20) + (i % shapes << 12)} for i in range(jobs)]
                before = used_memory(stack)
                ids = submit_batches(api, bodies, {"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})
                settle(stack)
                label = f"{jobs:,} pending of {shapes:,} shape{'s' if shapes > 1 else ''}"
                result.add(
                    f"backlog.{jobs}.{shapes}.bytes",
                    (used_memory(stack) - before) / jobs,
                    label=f"Redis bytes a pending job, {label}",
                    unit="bytes",
                    target=Target("<=", 1500),
                )
                result.add(
                    f"backlog.{jobs}.{shapes}.rate",
                    place_all(stack, tenant, ids),
                    label=f"placements/s, {label}",
                    unit="placements/s",
                    target=Target(">=", 10_000) if (jobs, shapes) == (10_000, 10_000) else None,
                )
    result.note(
        "backlog: the seed's body with 4 KiB more memory a shape, submitted through the batch route with no "
        "placement worker running, then 2 `poolq worker` processes place them onto 100 static nodes; rate from "
        "the first placed_time to the last (Redis's clock); bytes: used_memory before and after the submissions. "
        "One run each, on a fresh Redis. Not measured: 1,000,000 pending (their submission alone takes about "
        "3 minutes a shape count here)"
    )


def place_all(stack: Stack, tenant: str, ids: list[str]) -> float:
    """Start two placement workers, wait until every job is placed; returns placements/s."""
    workers = [stack.worker(0), stack.worker(1)]

    def placed(some: list[str]) -> bool:
        return all(row[0] for row in statuses(stack, tenant, some, "node"))

    try:
        stack.wait_ready(workers)
        wait_for(lambda: placed(ids[-100:]), max(120, len(ids) / 200), f"{len(ids)} jobs to be placed", interval_s=0.05)
        wait_for(lambda: placed(ids), 60, "every job placed")
    finally:
        for child in workers:
            stack.stop(child)
    return placement_rate(stack, tenant, ids)


def agents(ctx: Context, result: ScenarioResult) -> None:
    """`true` jobs finished/s with more node agents on the one machine."""
    jobs = 200 if ctx.quick else 2000
    body = {"entrypoint": "true", "entrypoint_num_cpus": 1}
    for count in (1, 4, 16):
        with Stack(f"curves-agents-{count}") as stack:
            stack.start_redis()
            api = stack.api()
            worker = stack.worker()
            stack.wait_ready([worker])
            for i in range(count):
                stack.node(f"bench-node-{i}", "--pool", "default", "--cpus", str(64 // count), "--memory", "1Ti")
            for run in range(ctx.runs):
                tenant = f"bench-agents-{run}"
                ids = submit_batches(
                    api, [{**body, "runtime_env": {"working_dir": str(stack.root)}}] * jobs, {"X-Tenant-Id": tenant}
                )
                rows = wait_terminal(stack, tenant, ids, 30 + jobs / 20)
                if any(row[0] != JobStatus.SUCCEEDED for row in rows):
                    raise BenchError(f"agents {count}: not every job succeeded")
                result.add(
                    f"agents.{count}",
                    finished_rate(rows),
                    label=f"jobs finished/s (SUCCEEDED) with {count} node agent{'s' if count > 1 else ''}",
                    unit="jobs/s",
                )
    result.note(
        f"agents: {jobs:,} `true` jobs (1 CPU) a run through the batch route; one API (2 processes), one placement "
        "worker and 1, 4 or 16 node agents on this machine, each in its cgroups, 64 CPUs offered among them"
    )
