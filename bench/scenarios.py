"""The HTTP-edge scenarios (submit, batch, poll, list) and what every scenario shares.

Each scenario starts what it needs in its own ``Stack``, drives load from a separate
load-generator process, and records one value per run of each figure in its
``ScenarioResult``. Submission figures are compared with the baseline service
(``bench.baseline``) measured in the same invocation, once, by whichever
submission scenario runs first.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.figures import ScenarioResult, Target, number
from bench.records import Clones
from bench.stack import PYTHON, Api, BenchError, Stack, wait_for
from poolq.procs import die_with_parent
from poolq.schemas import SEED_EXAMPLE

# The seed's example without its submission_id: every request creates a job.
SEED_BODY: dict[str, Any] = {k: v for k, v in SEED_EXAMPLE.items() if k != "submission_id"}
SUBMIT_CONNECTIONS = 32
PACED_RATE = 1000.0
BATCH_SIZE = 1000


@dataclass
class Context:
    runs: int
    quick: bool
    results: dict[str, ScenarioResult] = field(default_factory=dict)

    def window(self) -> dict[str, float]:
        """Warm-up and measured seconds of one load."""
        return {"warmup": 0.3, "seconds": 1.0} if self.quick else {"warmup": 0.5, "seconds": 2.5}

    def result(self, name: str) -> ScenarioResult:
        if name not in self.results:
            self.results[name] = ScenarioResult(name)
        return self.results[name]


# -- the load generator ----------------------------------------------------------


def run_load(stack: Stack, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m bench.loadgen @spec`` and return its JSON result."""
    path = stack.root / f"load-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(spec))
    budget = float(spec.get("seconds", 0)) + float(spec.get("warmup", 0)) + (300 if spec.get("once") else 60)
    try:
        done = subprocess.run(
            [PYTHON, "-m", "bench.loadgen", f"@{path}"],
            capture_output=True,
            text=True,
            timeout=budget,
            preexec_fn=die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"the load generator did not finish in {budget:g}s") from None
    finally:
        path.unlink(missing_ok=True)
    if done.returncode != 0:
        raise BenchError(f"the load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    if result["requests"] == 0:
        raise BenchError(f"no request completed ({result['errors']} errors) against port {spec['port']}")
    return result


def describe(spec: dict[str, Any]) -> str:
    how = f"paced at {number(spec['rate'])} requests/s offered" if spec.get("rate") else "closed loop"
    window = f"{spec['warmup']:g} s warm-up + {spec['seconds']:g} s measured"
    return f"{how}, {spec['connections']} keep-alive connections, {window}"


def check_statuses(result: ScenarioResult, what: str, load: dict[str, Any], ok: tuple[int, ...] = (200,)) -> None:
    """Note answers other than ``ok`` (a figure counts only what was accepted)."""
    other = {code: n for code, n in load["statuses"].items() if int(code) not in ok}
    if other or load["errors"]:
        result.note(f"{what}: besides {ok}, the load saw statuses {other} and {load['errors']} connection errors")


def post_json(api: Api, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    status, _, answer = api.request("POST", path, body, headers)
    if status != 200:
        raise BenchError(f"POST {path} answered {status}: {str(answer)[:300]}")
    return answer


def submit_batches(api: Api, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None) -> list[str]:
    """Submit through ``POST /api/jobs/batch`` (1,000 a request); returns the ids, all accepted."""
    ids: list[str] = []
    for start in range(0, len(bodies), BATCH_SIZE):
        answer = post_json(api, "/api/jobs/batch", {"jobs": bodies[start : start + BATCH_SIZE]}, headers)
        refused = [r for r in answer["results"] if "submission_id" not in r]
        if refused:
            raise BenchError(f"the batch refused {len(refused)} jobs, e.g. {refused[0]}")
        ids += [r["submission_id"] for r in answer["results"]]
    return ids


# -- the baseline ----------------------------------------------------------------

FLOORS = {  # bench/floor.py's endpoints: what one request costs with no work, and with one durable write
    "/floor/body": "body read and answered",
    "/floor/evalsha": "JSON parsed and one EVALSHA",
}
BASELINE_SERVERS: dict[str, tuple[str, Callable[[Stack], Api]]] = {
    "gunicorn": ("gunicorn, sync worker class, 2 workers", Stack.gunicorn_baseline),
    "granian": ("granian WSGI, 2 workers", Stack.granian_baseline),
}


def start_baselines(stack: Stack, result: ScenarioResult) -> dict[str, Api]:
    servers = {}
    for name, (what, start) in BASELINE_SERVERS.items():
        try:
            servers[name] = start(stack)
        except BenchError as exc:
            result.note(f"baseline under {what} could not be measured: {exc}")
    if not servers:
        raise BenchError("no baseline server started")
    return servers


def measure_baseline_run(ctx: Context, stack: Stack, servers: dict[str, Api]) -> str:
    """One closed-loop run of the baseline under each server; returns the faster server's name."""
    baseline = ctx.result("baseline")
    rates = {}
    for name, api in servers.items():
        spec = submit_spec(ctx, api.port)
        load = run_load(stack, spec)
        check_statuses(baseline, f"baseline ({name})", load)
        what = BASELINE_SERVERS[name][0]
        baseline.add(f"{name}.rate", load["counted_rate"], label=f"baseline, {what}: accepted jobs/s", unit="jobs/s")
        baseline.add_latencies(name, load, f"baseline, {what}")
        baseline.note(f"{name}: {describe(spec)}")
        if load["connects"] > spec["connections"]:
            baseline.note(
                f"{name} closed the connection after answers: the load generator dialled "
                f"{load['connects']:,} times for {load['requests']:,} requests (last run)",
                key=f"{name}.connects",
            )
        rates[name] = load["counted_rate"]
    return max(rates, key=lambda n: rates[n])


def baseline_denominator(ctx: Context) -> tuple[str, float] | None:
    """The faster baseline server (by median accepted jobs/s) and its median."""
    baseline = ctx.results.get("baseline")
    if baseline is None:
        return None
    medians = {
        name: baseline.figures[f"{name}.rate"].median for name in BASELINE_SERVERS if f"{name}.rate" in baseline.figures
    }
    if not medians:
        return None
    best = max(medians, key=lambda n: medians[n])
    return best, medians[best]


def submit_spec(ctx: Context, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "port": port,
        "method": "POST",
        "path": "/api/jobs",
        "body": json.dumps(SEED_BODY),
        "connections": SUBMIT_CONNECTIONS,
        "count": '"submission_id"',
        **ctx.window(),
        **extra,
    }


# -- scenarios -------------------------------------------------------------------


def submit(ctx: Context) -> None:
    """Single-job POST /api/jobs, closed loop and paced at 1,000/s, against the baseline."""
    result = ctx.result("submit")
    baseline_result = ctx.result("baseline")
    with Stack("submit") as stack:
        stack.start_redis()
        api = stack.api()
        servers = start_baselines(stack, baseline_result)
        floor = stack.granian_floor()
        paced_on: list[str] = []
        for _ in range(ctx.runs):
            spec = submit_spec(ctx, api.port)
            load = run_load(stack, spec)
            check_statuses(result, "submit", load)
            for path, what in FLOORS.items():
                ends = run_load(stack, submit_spec(ctx, floor.port, path=path))
                check_statuses(result, f"floor {path}", ends)
                result.add(path, ends["counted_rate"], label=f"floor, {what}: requests/s", unit="req/s")
            result.add(
                "rate",
                load["counted_rate"],
                label="accepted jobs/s",
                unit="jobs/s",
                target=Target(">=", 2000),
                baseline_key="rate",
            )
            result.add("p50", load["p50_ms"], label="p50 latency (closed loop)", unit="ms", baseline_key="p50")
            result.add("p99", load["p99_ms"], label="p99 latency (closed loop)", unit="ms", baseline_key="p99")
            result.note(f"{describe(spec)}; the seed's body without submission_id")
            faster = measure_baseline_run(ctx, stack, servers)

            paced = submit_spec(ctx, api.port, rate=PACED_RATE)
            load = run_load(stack, paced)
            check_statuses(result, "submit, paced", load)
            result.add(
                "paced.rate", load["counted_rate"], label="accepted jobs/s at 1,000 jobs/s offered", unit="jobs/s"
            )
            result.add(
                "paced.p50",
                load["p50_ms"],
                label="p50 latency at 1,000 jobs/s offered",
                unit="ms",
                baseline_key="paced.p50",
            )
            result.add(
                "paced.p99",
                load["p99_ms"],
                label="p99 latency at 1,000 jobs/s offered",
                unit="ms",
                target=Target("<=", 5),
                baseline_key="paced.p99",
            )
            result.note(f"{describe(paced)}; latency counted from each request's due time")
            base_paced = run_load(stack, submit_spec(ctx, servers[faster].port, rate=PACED_RATE))
            paced_on.append(faster)
            baseline_result.note(f"paced runs on the faster server of each run: {', '.join(paced_on)}", key="paced")
            baseline_result.add(
                "paced.p50",
                base_paced["p50_ms"],
                label="baseline, faster server of the run: p50 at 1,000 jobs/s offered",
                unit="ms",
            )
            baseline_result.add(
                "paced.p99",
                base_paced["p99_ms"],
                label="baseline, faster server of the run: p99 at 1,000 jobs/s offered",
                unit="ms",
            )
        servers_used = ", ".join(servers)
        baseline_result.note(f"servers measured: {servers_used}; the faster one (median jobs/s) is the denominator")
    result.note(
        "floor: bench/floor.py under the baseline's server and settings (granian WSGI, 2 workers), "
        "the same load as the closed-loop runs",
        key="floor",
    )
    cheapest = result.figures["/floor/evalsha"].median
    result.add(
        "floor.ratio",
        result.figures["rate"].median / cheapest if cheapest else None,
        label="accepted jobs/s ÷ the JSON + one EVALSHA floor (medians)",
        unit="×",
        target=Target(">=", 1),
    )
    denominator = baseline_denominator(ctx)
    if denominator is not None:
        name, rate = denominator
        result.add(
            "ratio",
            result.figures["rate"].median / rate if rate else None,
            label=f"accepted jobs/s ÷ baseline ({name}, medians)",
            unit="×",
            target=Target(">=", 3),
        )


def ensure_baseline(ctx: Context, stack: Stack) -> None:
    """Measure the baseline on this stack unless an earlier scenario of this invocation did."""
    if baseline_denominator(ctx) is not None:
        return
    servers = start_baselines(stack, ctx.result("baseline"))
    for _ in range(ctx.runs):
        measure_baseline_run(ctx, stack, servers)
    for api in servers.values():
        stack.stop(api.child)


def batch(ctx: Context) -> None:
    """POST /api/jobs/batch with 1,000 jobs a request."""
    result = ctx.result("batch")
    with Stack("batch") as stack:
        stack.start_redis()
        ensure_baseline(ctx, stack)
        api = stack.api()
        body = json.dumps({"jobs": [SEED_BODY] * BATCH_SIZE})
        window = {"warmup": 0.5, "seconds": 1.5} if ctx.quick else {"warmup": 1.0, "seconds": 5.0}
        spec = {
            "port": api.port,
            "method": "POST",
            "path": "/api/jobs/batch",
            "body": body,
            "connections": 4,
            "count": '"submission_id"',
            **window,
        }
        for _ in range(ctx.runs):
            load = run_load(stack, spec)
            check_statuses(result, "batch", load)
            result.add(
                "rate",
                load["counted_rate"],
                label="accepted jobs/s (1,000 jobs a request)",
                unit="jobs/s",
                target=Target(">=", 25_000),
                baseline_key="rate",
            )
            result.add_latencies("request", load, "a 1,000-job request")
        result.note(f"{describe(spec)}; the seed's body 1,000 times a request")
        result.note("a batch's jobs are counted when the answer arrives, so the measured window holds few requests")


def poll(ctx: Context) -> None:
    """GET /api/jobs/{id} (200 and 304) over many jobs, and GET /api/jobs?ids= of 100 ids."""
    result = ctx.result("poll")
    jobs = 2000 if ctx.quick else 10_000
    with Stack("poll") as stack:
        stack.start_redis()
        api = stack.api()
        ids = submit_batches(api, [SEED_BODY] * jobs, {"X-Schedule-Timeout-Ms": "0"})
        result.note(
            f"{jobs:,} jobs submitted through the batch route with no placement worker: PENDING, "
            "waiting for placement (their record also reads their shape)"
        )
        gets = [{"path": f"/api/jobs/{i}"} for i in ids]
        captured = run_load(
            stack, {"port": api.port, "requests": gets, "connections": 16, "once": True, "capture": "ETag"}
        )["captured"]
        if len(captured) != len(ids):
            raise BenchError(f"only {len(captured)} of {len(ids)} jobs answered with an ETag")
        conditional = [{"path": g["path"], "headers": {"If-None-Match": captured[str(n)]}} for n, g in enumerate(gets)]
        chunks = [ids[i : i + 100] for i in range(0, len(ids), 100)]
        batched = [{"path": "/api/jobs?ids=" + ",".join(chunk)} for chunk in chunks]
        window = ctx.window()
        for run in range(ctx.runs):
            offset = run * 997 % len(ids)
            full = run_load(stack, {"port": api.port, "requests": gets, "connections": 16, "offset": offset, **window})
            check_statuses(result, "GET 200", full)
            result.add(
                "get.rate",
                full["rate"],
                label="GET /api/jobs/{id}: requests/s (200)",
                unit="req/s",
                target=Target(">=", 10_000),
            )
            result.add_latencies("get", full, "GET /api/jobs/{id} (200)")
            cached = run_load(
                stack, {"port": api.port, "requests": conditional, "connections": 16, "offset": offset, **window}
            )
            check_statuses(result, "GET with If-None-Match", cached, ok=(304,))
            result.add(
                "etag.rate",
                cached["rate"],
                label="GET /api/jobs/{id} with If-None-Match: requests/s (304)",
                unit="req/s",
                target=Target(">=", 10_000),
            )
            result.add_latencies("etag", cached, "GET with If-None-Match (304)")
            result.add(
                "etag.gain",
                cached["rate"] / full["rate"],
                label="304 requests/s ÷ 200 requests/s",
                unit="×",
                target=Target(">", 1),
            )
            many = run_load(
                stack,
                {
                    "port": api.port,
                    "requests": batched,
                    "connections": 8,
                    "offset": run,
                    "count": '"submission_id"',
                    **window,
                },
            )
            check_statuses(result, "GET ?ids=", many)
            result.add(
                "ids.states",
                many["counted_rate"],
                label="GET /api/jobs?ids= (100 ids): job states/s",
                unit="states/s",
                target=Target(">=", 100_000),
            )
            result.add("ids.rate", many["rate"], label="GET /api/jobs?ids= (100 ids): requests/s", unit="req/s")
            result.add_latencies("ids", many, "GET /api/jobs?ids= (100 ids)")
        result.note(
            f"GET by id: closed loop, 16 connections, round robin over the {jobs:,} ids; ?ids=: 8 connections; "
            f"{window['warmup']:g} s warm-up + {window['seconds']:g} s measured each"
        )


def list_jobs(ctx: Context) -> None:
    """The first page of GET /api/jobs with more and more finished records in Redis."""
    result = ctx.result("list")
    sizes = (10_000, 100_000) if ctx.quick else (10_000, 100_000, 1_000_000)
    tenant = "bench-list"
    with Stack("list") as stack:
        stack.start_redis()
        with Clones(stack, tenant, SEED_BODY) as records:
            api = stack.api()
            for size in sizes:
                records.grow_to(size)
                settle(stack)
                spec = {
                    "port": api.port,
                    "path": "/api/jobs",
                    "headers": {"X-Tenant-Id": tenant},
                    "connections": 2,
                    "count": '"submission_id"',
                    **ctx.window(),
                }
                for _ in range(ctx.runs):
                    load = run_load(stack, spec)
                    check_statuses(result, f"list at {size:,}", load)
                    if load["requests"] and load["counted"] != 100 * load["requests"]:
                        result.note(
                            f"list at {size:,}: pages held {load['counted'] / load['requests']:.1f} records, not 100"
                        )
                    label = f"first page (100 records) with {size:,} records"
                    result.add(
                        f"{size}.p50", load["p50_ms"], label=f"{label}: p50 latency", unit="ms", target=Target("<=", 10)
                    )
                    result.add(f"{size}.p99", load["p99_ms"], label=f"{label}: p99 latency", unit="ms")
                    result.add(f"{size}.rate", load["rate"], label=f"{label}: requests/s", unit="req/s")
                result.note(f"{describe(spec)} per size")
        result.note(
            "records: finished SUCCEEDED jobs of the seed's body, cloned from one job made by poolq's own "
            "scripts (bench/records.py), with their tenant-index and retention-index entries"
        )


def settle(stack: Stack, timeout_s: float = 300) -> None:
    """Wait until Redis is not rewriting its append-only file (a rewrite forks and competes for CPU)."""
    wait_for(
        lambda: not int(stack.redis.info("persistence").get("aof_rewrite_in_progress", 0)),
        timeout_s,
        "Redis to finish rewriting its append-only file",
        interval_s=0.2,
    )
