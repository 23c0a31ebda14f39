"""Scenarios that need placement workers or node agents: place, e2e, memory, fair_share."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable

from bench.figures import ScenarioResult, Target
from bench.loadgen import percentile
from bench.records import RawRedis, make_template, write_clones
from bench.scenarios import SEED_BODY, Context, check_statuses, describe, run_load, settle, submit_batches
from bench.stack import PYTHON, Api, BenchError, Child, Stack, children_of, cpu_seconds, rss_bytes, wait_for
from poolq import keys
from poolq.model import JobStatus
from poolq.nodes import capacity_of
from poolq.settings import Settings
from worker.cgroups import CgroupPool, Cgroups, JobCgroup

MiB = 1024 * 1024
TERMINAL = {s.value for s in JobStatus if s.terminal}

# Pool-label mixes of the place scenario, one per batch in turn (None: no header). Node i
# is in pool p<i%4>, has label zone=z<i%3>, and label ssd when i%5 == 0.
LABEL_MIXES: tuple[str | None, ...] = ("pool=p0", "pool=p1,pool=p2", "zone=z1", "ssd,zone=z2", None)


def statuses(stack: Stack, tenant: str, ids: list[str], *fields: str) -> list[list[str | None]]:
    pipe = stack.redis.pipeline(transaction=False)
    for submission_id in ids:
        pipe.hmget(keys.job(keys.ref(tenant, submission_id)), list(fields))
    return pipe.execute()


def wait_terminal(stack: Stack, tenant: str, ids: list[str], timeout_s: float) -> list[list[str | None]]:
    """Wait until every job ended; returns (status, submit_time, end_time, message) per job."""

    def ended() -> list[list[str | None]] | None:
        rows = statuses(stack, tenant, ids, "status", "submit_time", "end_time", "message")
        return rows if all(row[0] in TERMINAL for row in rows) else None

    try:
        result: list[list[str | None]] = wait_for(
            ended, timeout_s, f"{len(ids)} jobs of {tenant} to finish", interval_s=0.1
        )
    except BenchError as exc:
        counts: dict[str | None, int] = {}
        for row in statuses(stack, tenant, ids, "status"):
            counts[row[0]] = counts.get(row[0], 0) + 1
        raise BenchError(f"{exc}; their statuses: {counts}") from None
    return result


def note_failures(result: ScenarioResult, what: str, rows: list[list[str | None]]) -> None:
    failed = [row for row in rows if row[0] != JobStatus.SUCCEEDED]
    if failed:
        result.note(f"{what}: {len(failed)} of {len(rows)} jobs did not succeed, e.g. {failed[0][0]}: {failed[0][3]}")


# -- place -----------------------------------------------------------------------


def place(ctx: Context) -> None:
    """Jobs already accepted, placed by 2 placement workers onto static nodes with pool labels."""
    result = ctx.result("place")
    jobs = 1000 if ctx.quick else 12_000
    for nodes in (100, 1000, 10_000):
        with Stack(f"place{nodes}") as stack:
            stack.start_redis()
            api = stack.api()
            cpus = max(64, math.ceil(2 * 3 * ctx.runs * jobs / nodes))  # room for every run's jobs, twice
            add_static_nodes(stack, nodes, cpus)
            for run in range(ctx.runs):
                rate = place_run(stack, api, f"place-{run}", jobs)
                result.add(
                    f"{nodes}.rate",
                    rate,
                    label=f"placements/s with {nodes:,} nodes",
                    unit="placements/s",
                    target={1000: Target(">=", 2000), 10_000: Target(">=", 1000)}.get(nodes),
                )
    result.note(
        f"{jobs:,} jobs of the seed's body (3 CPUs, 128 MiB) a run, submitted through the batch route with "
        "X-Schedule-Timeout-Ms: 0 and no placement worker running, in batches that take turns with the pool "
        f"labels {', '.join(repr(m) for m in LABEL_MIXES)} (None: no header); then 2 `poolq worker` "
        "processes start. Rate: jobs placed ÷ time from the first placement to the last, both read from the "
        "`placed_time` field reserve.lua writes (Redis's clock), so the workers' start-up is not counted"
    )
    result.note(
        "static nodes, added with NodeAdmin.upsert: node i in pool p<i%4>, labels zone=z<i%3> and, "
        "for one node in 5, ssd; each with room for twice the jobs of all runs"
    )


def add_static_nodes(stack: Stack, count: int, cpus: int) -> None:
    from poolq.messaging import celery_waker
    from poolq.nodes import NodeAdmin
    from poolq.store import JobStore

    settings = Settings(redis_url=stack.url)
    admin = NodeAdmin(JobStore(stack.redis, settings, celery_waker(settings)))
    capacity = capacity_of(str(cpus), 1 << 40, "0", {})
    for i in range(count):
        labels: dict[str, str | None] = {"zone": f"z{i % 3}"}
        if i % 5 == 0:
            labels["ssd"] = None
        admin.upsert(f"node-{i:05d}", pool=f"p{i % 4}", labels=labels, capacity=capacity, kind="static")


def place_run(stack: Stack, api: Api, tenant: str, jobs: int) -> float:
    """Submit ``jobs`` with no worker running, start two, wait until all are placed; returns placements/s."""
    batches = max(len(LABEL_MIXES), math.ceil(jobs / 1000))
    size = math.ceil(jobs / batches)
    ids: list[str] = []
    sigs: set[str] = set()
    for n in range(batches):
        headers = {"X-Tenant-Id": tenant, "X-Schedule-Timeout-Ms": "0"}
        mix = LABEL_MIXES[n % len(LABEL_MIXES)]
        if mix:
            headers["X-Pool-Label"] = mix
        batch_ids = submit_batches(api, [SEED_BODY] * min(size, jobs - len(ids)), headers)
        ids += batch_ids
        sigs.add(str(stack.redis.hget(keys.job(keys.ref(tenant, batch_ids[0])), "shape") or ""))
    queues = [keys.shape_queue(sig) for sig in sigs]

    def waiting() -> int:
        pipe = stack.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(queue)
        pipe.zcard(keys.CLAIMED)
        return sum(pipe.execute())

    if waiting() != jobs:
        raise BenchError(f"expected {jobs} jobs waiting before the workers start, found {waiting()}")
    workers = [stack.worker(0), stack.worker(1)]
    try:
        stack.wait_ready(workers)
        wait_for(lambda: waiting() == 0, max(120, jobs / 50), f"{jobs} jobs to be placed", interval_s=0.02)
        for child in workers:
            child.check_alive()
    finally:
        for child in workers:
            stack.stop(child)
    return placement_rate(stack, tenant, ids)


def placement_rate(stack: Stack, tenant: str, ids: list[str]) -> float:
    """Jobs placed ÷ time from the first placement to the last, read from the ``placed_time``
    reserve.lua writes (Redis's clock); raises BenchError unless every job is placed."""
    rows = statuses(stack, tenant, ids, "node", "placed_time")
    unplaced = [row for row in rows if not row[0]]
    if unplaced:
        raise BenchError(f"{len(unplaced)} of {len(ids)} jobs are not placed")
    if any(not row[1] for row in rows):
        raise BenchError("placed jobs carry no placed_time field: this harness needs reserve.lua to write it")
    times = sorted(int(str(row[1])) for row in rows)
    return (len(ids) - 1) * 1000 / max(times[-1] - times[0], 1)


def finished_rate(rows: list[list[str | None]]) -> float:
    """SUCCEEDED jobs ÷ time from the first submission to the last end, of ``wait_terminal``'s rows."""
    first = min(int(row[1] or 0) for row in rows)
    last = max(int(row[2] or 0) for row in rows)
    return sum(1 for row in rows if row[0] == JobStatus.SUCCEEDED) * 1000 / max(last - first, 1)


# -- e2e -------------------------------------------------------------------------


def e2e(ctx: Context) -> None:
    """`true` jobs submitted, placed, run and finished on one local node agent."""
    result = ctx.result("e2e")
    jobs = 100 if ctx.quick else 2000  # 1,000 (2 s) left the ratio of the two rates within ±7 %
    paced_seconds = 2.0 if ctx.quick else 5.0
    with Stack("e2e") as stack:
        stack.start_redis()
        api = stack.api()
        worker = stack.worker()
        stack.wait_ready([worker])
        # Each job in its cgroups (this machine allows it), then the same on a node told not to
        # enforce: the difference is what enforcement costs a job (docs/running.md).
        agents = {
            "pool=plain": stack.node(
                "bench-plain", "--pool", "plain", "--cpus", "64", "--memory", "1Ti", "--no-enforce"
            ),
            "pool=default": stack.node("bench-node", "--pool", "default", "--cpus", "64", "--memory", "1Ti"),
        }
        # 1 CPU a job: at most 64 run at once on the node, far more than `true` jobs need to reach
        # 100/s. (With 0.3 CPU, 213 at once, the agent's Redis pool runs out: see the note.)
        body = {"entrypoint": "true", "runtime_env": {"working_dir": str(stack.root)}, "entrypoint_num_cpus": 1}
        for run in range(ctx.runs):
            rates = {}
            modes = (
                ("rate", "jobs finished/s (SUCCEEDED), each in its cgroups", "pool=default"),
                ("rate.plain", "jobs finished/s (SUCCEEDED), without cgroups (--no-enforce)", "pool=plain"),
            )
            for key, label, pool in modes if run % 2 == 0 else modes[::-1]:  # neither always goes first
                tenant = f"e2e-{key}-{run}"
                agent_pid = agents[pool].pid
                cpu_before = cpu_seconds(agent_pid)
                ids = submit_batches(api, [body] * jobs, {"X-Tenant-Id": tenant, "X-Pool-Label": pool})
                rows = wait_terminal(stack, tenant, ids, 30 + jobs / 20)
                result.add(
                    key.replace("rate", "agent_cpu"),
                    (cpu_seconds(agent_pid) - cpu_before) * 1000 / jobs,
                    label="node agent's CPU a job, its jobs' processes included"
                    + (" (--no-enforce)" if key == "rate.plain" else ", each in its cgroups"),
                    unit="ms",
                )
                note_failures(result, "throughput", rows)
                rates[key] = finished_rate(rows)
                result.add(
                    key, rates[key], label=label, unit="jobs/s", target=Target(">=", 800) if key == "rate" else None
                )
            result.add(
                "rate.ratio",
                rates["rate"] / rates["rate.plain"],
                label="jobs finished/s each in its cgroups ÷ without (the same run)",
                unit="×",
                target=Target(">=", 0.9),
            )

            tenant = f"e2e-paced-{run}"
            spec = {
                "port": api.port,
                "method": "POST",
                "path": "/api/jobs",
                "body": json.dumps(body),
                "rate": 20.0,
                "connections": 4,
                "headers": {"X-Tenant-Id": tenant, "X-Pool-Label": "pool=default"},
                "warmup": 0,
                "seconds": paced_seconds,
            }
            load = run_load(stack, spec)
            check_statuses(result, "e2e, paced", load)
            paced_ids = [str(i) for i in stack.redis.zrange(keys.tenant_jobs(tenant), 0, -1)]
            rows = wait_terminal(stack, tenant, paced_ids, 60)
            note_failures(result, "paced", rows)
            latencies = [float(int(row[2] or 0) - int(row[1] or 0)) for row in rows if row[0] == JobStatus.SUCCEEDED]
            result.add(
                "paced.p50",
                percentile(latencies, 50),
                label="submit → SUCCEEDED p50 at 20 jobs/s",
                unit="ms",
                target=Target("<=", 10),
            )
            result.add("paced.p99", percentile(latencies, 99), label="submit → SUCCEEDED p99 at 20 jobs/s", unit="ms")
        result.note(
            f"throughput: {jobs:,} `true` jobs (1 CPU) a run in batches of 1,000; rate = jobs ÷ (last end_time "
            "− first submit_time); one API (2 processes), one placement worker and two node agents "
            "(--cpus 64 --memory 1Ti each), one that enforces and one that does not (--no-enforce), "
            "taking turns to go first"
        )
        result.note(
            "jobs ask for 1 CPU: with 0.3 CPU (up to 213 at once) the node agent ran out of redis-py's "
            "default pool of 100 connections ('Too many connections') while finishing jobs, and left some "
            "RUNNING (seen while building this benchmark)"
        )
        result.note(f"latency: single POST /api/jobs {describe(spec)}; each record's end_time − submit_time")
    cgroup_costs(result, 100 if ctx.quick else 500)


def cgroup_costs(result: ScenarioResult, rounds: int) -> None:
    """What a job's cgroup costs its node agent, measured here in this process (medians)."""
    found = Cgroups.detect(parent_name=f"poolq-bench-{os.getpid()}")
    if found.mode == "none":
        result.note(f"cgroup costs: not measured, {found.reason}")
        return
    limits = {"memory_bytes": 1 << 30, "cpu_milli": 1000, "pids_max": 4096}
    pool = CgroupPool(found)

    def median_ms(step: Callable[[int], object]) -> float:
        times = []
        for i in range(rounds):
            began = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - began) * 1000)
        return statistics.median(times)

    def spawn(command: str, where: JobCgroup) -> None:
        if where.shell(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).wait() != 0:
            raise BenchError(f"{command} failed")

    def take_and_give_back(i: int, *, other_limits: bool) -> None:
        pids_max = 64 + i % 2 if other_limits else 64
        pool.give_back(pool.take(**{**limits, "pids_max": pids_max}))

    kept = pool.take(**limits)
    try:
        figures = (
            ("cgroup.create", "job cgroup created + removed", lambda i: found.create(f"c-{i}", **limits).remove()),
            (
                "cgroup.same",
                "kept cgroup taken + given back, same limits",
                lambda i: take_and_give_back(i, other_limits=False),
            ),
            (
                "cgroup.other",
                "kept cgroup taken + given back, limits rewritten",
                lambda i: take_and_give_back(i, other_limits=True),
            ),
            ("cgroup.join", "`/bin/true` started in a cgroup, less started bare", lambda i: spawn("/bin/true", kept)),
        )
        bare = median_ms(lambda i: spawn("/bin/true", JobCgroup("bare", "none")))
        for key, label, step in figures:
            value = median_ms(step)
            result.add(key, value - bare if key == "cgroup.join" else value, label=label, unit="ms")
    finally:
        pool.give_back(kept)
        pool.close()
        for parent in set(found.dirs.values()):
            parent.rmdir()
    result.note(
        f"cgroup costs ({found.mode}): medians of {rounds}, measured in the benchmark's process with the "
        "node agent's code (worker/cgroups.py); a node agent keeps up to 64 emptied job cgroups for the next jobs"
    )


# -- memory ----------------------------------------------------------------------


def memory(ctx: Context) -> None:
    """Redis bytes per finished record; RSS of an API process and of a node agent."""
    result = ctx.result("memory")
    records = 2000 if ctx.quick else 10_000
    with Stack("memory") as stack:
        stack.start_redis()
        assert stack.redis_server is not None
        template = make_template(stack.redis, stack.url, SEED_BODY)
        raw = RawRedis("127.0.0.1", stack.redis_server.port, stack.redis_server.password)
        try:
            for run in range(ctx.runs):
                settle(stack)
                before = int(stack.redis.info("memory")["used_memory"])
                ids = write_clones(stack.redis, raw, template, f"bench-mem-{run}", records, first_number=run * records)
                time.sleep(0.2)
                settle(stack)
                after = int(stack.redis.info("memory")["used_memory"])
                result.add(
                    "redis.bytes",
                    (after - before) / records,
                    label="Redis bytes per finished job record",
                    unit="bytes",
                    target=Target("<=", 1000),
                )
            sample = keys.job(keys.ref(f"bench-mem-{ctx.runs - 1}", ids[0]))
            result.note(
                f"Redis: INFO used_memory before and after writing {records:,} finished records of the seed's "
                "body (hash, tenant-index and retention-index entries), cloned from one job made by poolq's own "
                f"scripts; one record's hash is {stack.redis.object('encoding', sample)}-encoded, "
                f"MEMORY USAGE {stack.redis.memory_usage(sample)} bytes"
            )
        finally:
            raw.close()
        for _ in range(ctx.runs):
            api_rss(ctx, stack, result)
        worker = stack.worker()
        stack.wait_ready([worker])
        api = stack.api()
        for run in range(ctx.runs):
            agent_rss(stack, api, result, run)


def api_rss(ctx: Context, stack: Stack, result: ScenarioResult) -> None:
    api = stack.api()
    time.sleep(1.0)
    processes = children_of(api.child.pid)
    idle = max((rss_bytes(pid) for pid in processes), default=0)
    result.add(
        "api.idle",
        idle / MiB,
        label="RSS of one API process, idle (largest of its worker processes)",
        unit="MiB",
        target=Target("<=", 80),
    )
    spec = {
        "port": api.port,
        "method": "POST",
        "path": "/api/jobs",
        "body": json.dumps(SEED_BODY),
        "connections": 32,
        **ctx.window(),
    }
    check_statuses(result, "memory, submit load", run_load(stack, spec))
    loaded = max((rss_bytes(pid) for pid in processes), default=0)
    result.add(
        "api.loaded",
        loaded / MiB,
        label="RSS of one API process after a submit load (largest)",
        unit="MiB",
        target=Target("<=", 80),
    )
    result.add(
        "api.main",
        rss_bytes(api.child.pid) / MiB,
        label="RSS of the API's supervising process (granian main)",
        unit="MiB",
    )
    result.note(f"API: `poolq api` with {len(processes)} worker processes; the load: {describe(spec)}")
    stack.stop(api.child)


def agent_rss(stack: Stack, api: Api, result: ScenarioResult, run: int) -> None:
    node_id = f"mem-node-{run}"
    agent: Child = stack.node(
        node_id, "--pool", "default", "--labels", f"run={run}", "--cpus", "128", "--memory", "1Ti"
    )
    time.sleep(1.0)
    result.add("node.idle", rss_bytes(agent.pid) / MiB, label="RSS of a node agent, idle", unit="MiB")
    tenant = f"mem-{run}"
    body = {"entrypoint": "sleep 30", "runtime_env": {"working_dir": str(stack.root)}, "entrypoint_num_cpus": 1}
    ids = submit_batches(api, [body] * 100, {"X-Tenant-Id": tenant, "X-Pool-Label": f"run={run}"})
    try:
        wait_for(
            lambda: all(row[0] == JobStatus.RUNNING for row in statuses(stack, tenant, ids, "status")),
            60,
            "100 `sleep 30` jobs to run",
            interval_s=0.1,
        )
        time.sleep(0.5)
        result.add("node.busy", rss_bytes(agent.pid) / MiB, label="RSS of a node agent running 100 jobs", unit="MiB")
        helpers = children_of(agent.pid)
        result.note(
            f"node agent: the `poolq node` process itself; its own helper processes (guardian) besides the "
            f"jobs: {sum(1 for pid in helpers if 'sleep' not in _cmdline(pid))}"
        )
    finally:
        for submission_id in ids:
            api.request("POST", f"/api/jobs/{submission_id}/stop", headers={"X-Tenant-Id": tenant})
        wait_terminal(stack, tenant, ids, 60)
        stack.stop(agent)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- fair share ------------------------------------------------------------------


def fair_share(ctx: Context) -> None:
    """Two tenants with weights 3 and 1 keep one node saturated: their shares of its CPU-seconds."""
    result = ctx.result("fair_share")
    window_s = 10.0 if ctx.quick else 30.0
    job_s, cpus = 0.2, 4
    backlog = int(window_s * cpus / job_s)  # each tenant alone could fill the window
    with Stack("fair_share") as stack:
        stack.start_redis()
        api = stack.api()
        worker = stack.worker()
        stack.wait_ready([worker])
        stack.node("fs-node", "--pool", "default", "--cpus", str(cpus), "--memory", "64Gi")
        weights = {"heavy": 3, "light": 1}
        for run in range(ctx.runs):
            tenants = {name: f"fs-{name}-{run}" for name in weights}
            for name, tenant in tenants.items():
                done = subprocess.run(
                    [PYTHON, "-m", "poolq", "quota", "set", tenant, "--weight", str(weights[name])],
                    env=stack.env(),
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise BenchError(f"poolq quota set {tenant}: {done.stderr.strip()}")
            body = {
                "entrypoint": f"sleep {job_s}",
                "runtime_env": {"working_dir": str(stack.root)},
                "entrypoint_num_cpus": 1,
            }
            ids = {
                name: submit_batches(api, [body] * backlog, {"X-Tenant-Id": tenant, "X-Pool-Label": "pool=default"})
                for name, tenant in tenants.items()
            }
            rows = {name: wait_terminal(stack, tenants[name], ids[name], 60 + 2 * window_s) for name in weights}
            for name in weights:
                note_failures(result, "fair share", rows[name])
            spans = {
                name: [
                    (int(start), int(end))
                    for start, end in statuses(stack, tenants[name], ids[name], "start_time", "end_time")
                    if start and end
                ]
                for name in weights
            }
            # The window: from the first start, as long as both tenants still had jobs waiting.
            first = min(start for runs in spans.values() for start, _ in runs)
            until = min(max(start for start, _ in runs) for runs in spans.values())
            used = {
                name: sum(max(0, min(end, until) - max(start, first)) for start, end in runs)
                for name, runs in spans.items()
            }
            total = sum(used.values()) or 1
            for name, weight in weights.items():
                result.add(
                    f"share.{name}",
                    100 * used[name] / total,
                    label=f"tenant of weight {weight}: share of the node's CPU-seconds",
                    unit="%",
                    target=Target(">=", 70) if name == "heavy" else None,
                )
            result.add("window", (until - first) / 1000, label="saturated window measured", unit="s")
    result.note(
        f"each tenant submits {backlog:,} `sleep {job_s}` jobs of 1 CPU at once to one {cpus}-CPU node; "
        "a tenant's share is its jobs' CPU-seconds (start_time to end_time, 1 CPU each) inside the window "
        "from the first start to the last start of the tenant that ran out first; weights 3 and 1 ask "
        "for 75 % and 25 % (docs/scheduling.md)"
    )
