"""Where one Redis saturates (issue 15, docs/scaling.md): Redis's own CPU time for each
kind of work, measured over a phase that does only that work, and the rate one Redis
core could carry of it alone (1 s ÷ that time).

- an accepted job, through the batch route and through single POST /api/jobs;
- a placement (claim.lua and reserve.lua, by two placement workers, onto 100 nodes);
- a job run through a node agent (start, log, finish; heartbeats included).

What an idle node agent costs (its heartbeats) is the fleet scenario's.
"""

from __future__ import annotations

import json

from bench.figures import ScenarioResult
from bench.scenarios import SEED_BODY, Context, check_statuses, run_load, submit_batches
from bench.scenarios_workers import add_static_nodes, statuses, wait_terminal
from bench.stack import BenchError, Stack, wait_for
from poolq import keys
from poolq.model import JobStatus


def ceiling(ctx: Context) -> None:
    result = ctx.result("ceiling")
    jobs = 4_000 if ctx.quick else 20_000
    body = {k: v for k, v in SEED_BODY.items() if k != "submission_id"}
    for run in range(ctx.runs):
        with Stack("ceiling") as stack:
            stack.start_redis()
            api = stack.api()
            tenant = f"ceiling-{run}"
            before = stack.redis_cpu_s()
            ids = submit_batches(api, [body] * jobs, {"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"})
            add(result, "batch", "an accepted job, batch route", (stack.redis_cpu_s() - before) / jobs)

            add_static_nodes(stack, 100, max(64, 2 * 3 * jobs // 100))
            before = stack.redis_cpu_s()
            workers = [stack.worker(0), stack.worker(1)]
            stack.wait_ready(workers)
            wait_for(lambda: placed(stack, tenant, ids), 300, "every job placed", 0.2)  # noqa: B023 (called here)
            for child in workers:
                stack.stop(child)
            add(result, "place", "a placement (2 workers, 100 nodes)", (stack.redis_cpu_s() - before) / jobs)

            spec = {
                "port": api.port,
                "method": "POST",
                "path": "/api/jobs",
                "body": json.dumps(body),
                "headers": {"X-Tenant-Id": f"{tenant}-single", "X-Schedule-Timeout-Ms": "0"},
                "connections": 32,
                "count": '"submission_id"',
                **ctx.window(),
            }
            before = stack.redis_cpu_s()
            load = run_load(stack, spec)
            check_statuses(result, "single submissions", load)
            accepted = int(stack.redis.hget(keys.tenant_counts(f"{tenant}-single"), "PENDING") or 0)
            if not accepted:
                raise BenchError("no single submission was stored")
            add(result, "single", "an accepted job, single POST", (stack.redis_cpu_s() - before) / accepted)
        run_jobs(ctx, result, run)
    result.note(
        f"each a phase of its own, on a fresh Redis: {jobs:,} jobs of the seed's body through the batch route; "
        "their placement by 2 `poolq worker` processes onto 100 static nodes (their idle polling included); "
        "single POSTs, closed loop, 32 connections; `true` jobs through one node agent (its heartbeats and "
        "log shipping included). CPU: redis-server's used_cpu_sys + used_cpu_user (INFO cpu) over the phase"
    )
    result.note("a core's ceiling: 1 s ÷ the CPU of one, the rate one Redis core would carry of that work alone")


def run_jobs(ctx: Context, result: ScenarioResult, run: int) -> None:
    """`true` jobs through one node agent."""
    jobs = 500 if ctx.quick else 2_000
    with Stack("ceiling-agents") as stack:
        stack.start_redis()
        api = stack.api()
        worker = stack.worker()
        stack.wait_ready([worker])
        stack.node("ceiling-node", "--pool", "default", "--cpus", "64", "--memory", "1Ti")
        tenant = f"ceiling-run-{run}"
        before, commands = stack.redis_cpu_s(), command_usec(stack)
        body = {"entrypoint": "true", "entrypoint_num_cpus": 1, "runtime_env": {"working_dir": str(stack.root)}}
        ids = submit_batches(api, [body] * jobs, {"X-Tenant-Id": tenant})
        # One HGET a poll (the tenant's status counts), so that the harness costs Redis little.
        counts = keys.tenant_counts(tenant)
        wait_for(
            lambda: int(stack.redis.hget(counts, "SUCCEEDED") or 0) >= jobs, 30 + jobs / 20, "every job to succeed"
        )
        cpu, spent = stack.redis_cpu_s(), command_usec(stack)
        if any(row[0] != JobStatus.SUCCEEDED for row in wait_terminal(stack, tenant, ids, 10)):
            raise BenchError("not every job succeeded")
        add(result, "run", "a job submitted, placed, run and finished", (cpu - before) / jobs)
        shares = sorted(((spent[c] - commands.get(c, 0), c) for c in spent), reverse=True)
        total = sum(usec for usec, _ in shares) or 1
        top = ", ".join(f"{name} {100 * usec / total:.0f} %" for usec, name in shares[:6])
        result.note(f"a job's life, Redis's time by command (INFO commandstats, last run): {top}", key="commands")


def command_usec(stack: Stack) -> dict[str, int]:
    """Redis's time in each command so far (INFO commandstats), in microseconds."""
    return {name: usec for name, (_, usec) in stack.command_stats().items()}


def placed(stack: Stack, tenant: str, ids: list[str]) -> bool:
    return all(row[0] for row in statuses(stack, tenant, ids, "node"))


def add(result: ScenarioResult, key: str, what: str, seconds: float) -> None:
    result.add(f"{key}.cpu", seconds * 1e6, label=f"Redis CPU: {what}", unit="us")
    result.add(f"{key}.ceiling", 1 / seconds if seconds else None, label=f"one Redis core's ceiling: {what}", unit="/s")
