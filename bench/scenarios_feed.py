"""The feed scenario: a dashboard following 10,000 jobs of which 1 % change a second.

Against one stack (embedded Redis, ``poolq api`` with its 2 processes, no placement
worker), each run submits 10,000 jobs of the seed's body to a pool label no node has, so
that they stay PENDING; then, window after window, a changer (its own process) stops
100 of them a second with ``POST /api/jobs/{id}/stop``, a real change each (PENDING →
STOPPED, written to the feed by the same Lua step), while one follower (its own
process) learns of the stops in one of three ways:

- ``feed``: long polls of ``GET /api/jobs/changes?since=<cursor>&wait=30``, back to back;
- ``ids``: every 2 s, ``GET /api/jobs?ids=`` of 100 ids, 100 requests a sweep;
- ``etag``: every 2 s, ``GET /api/jobs/{id}`` with ``If-None-Match`` for each job.

A fourth window runs the changer alone, to show what the changes cost by themselves. The
windows take turns (a different first one each run), so that a machine that slows down
affects them alike. In each: requests a second the follower made, CPU seconds a second of
the API's processes (its granian main, workers and helpers) and of redis-server (from
/proc), the stops the follower saw in the window of those answered in it, and how late:
from the stop's answer (the changer's clock) to the follower's receipt, and for the feed
also from the change's own ``time`` (Redis's clock). The machine's one clock serves all.

Then how many long polls one API process holds: more than ``POOLQ_MAX_WAITERS`` opened
at once against an API of one process, each told to wait; held ones answer after the
wait, the others at once with ``Retry-After``.
"""

from __future__ import annotations

import json
import random
import select
import subprocess
import threading
import time
import uuid
from typing import Any

from bench.figures import ScenarioResult
from bench.loadgen import percentile
from bench.scenarios import SEED_BODY, Context, settle, submit_batches
from bench.stack import PYTHON, Api, BenchError, Stack, cpu_seconds, process_tree
from poolq.procs import die_with_parent
from poolq.settings import Settings

POOL_LABEL = "pool=feed-nobody"  # no node has it: the jobs stay PENDING
INTERVAL_S = 2.0  # the pollers' sweep interval
FEED_WAIT_S = 30  # the feed follower's wait=
CONNECTIONS = 8  # a poller's concurrent connections (the feed follower has one)
CHANGER_CONNECTIONS = 4
GRACE_S = INTERVAL_S + 1.0  # a follower goes on this long after the window: a sweep more
MODES = ("none", "feed", "ids", "etag")
WHAT = {
    "none": "changes only (no follower)",
    "feed": "change feed (long poll)",
    "ids": f"GET /api/jobs?ids= every {INTERVAL_S:g} s",
    "etag": f"GET /api/jobs/{{id}} + If-None-Match every {INTERVAL_S:g} s",
}


def feed(ctx: Context) -> None:
    """Following 10,000 jobs with 100 changes a second: the change feed against polling."""
    result = ctx.result("feed")
    jobs = 2000 if ctx.quick else 10_000
    rate = jobs / 100  # 1 % of the jobs a second
    seconds = 4.0 if ctx.quick else 10.0
    alone_s = seconds / 2  # the changer alone: its cost a second needs a shorter window
    made_rates: list[float] = []
    late: list[float] = []
    sweeps: dict[str, list[float]] = {"ids": [], "etag": []}
    with Stack("feed") as stack:
        stack.start_redis()
        assert stack.redis_server is not None and stack.redis_server.process is not None
        redis_pid = stack.redis_server.process.pid
        api = stack.api()
        time.sleep(0.5)  # its helpers started
        api_pids = process_tree(api.child.pid)
        for run in range(ctx.runs):
            tenant = f"feed-{run}"
            ids = submit_batches(
                api,
                [SEED_BODY] * jobs,
                {"X-Tenant-Id": tenant, "X-Pool-Label": POOL_LABEL, "X-Schedule-Timeout-Ms": "0"},
            )
            to_stop = ids[:]
            random.Random(run).shuffle(to_stop)
            order = MODES[run % len(MODES) :] + MODES[: run % len(MODES)]
            cpu: dict[str, float] = {}
            for mode in order:
                window_s = alone_s if mode == "none" else seconds
                count = int(rate * window_s)
                batch, to_stop = to_stop[:count], to_stop[count:]
                settle(stack)
                measured = measure_window(stack, api, api_pids, redis_pid, mode, tenant, ids, batch, rate, window_s)
                record_window(result, mode, measured)
                cpu[mode] = measured["api_cpu"] + measured["redis_cpu"]
                made_rates.append(len(measured["changer"]["answered"]) / window_s)
                if measured["changer"]["late_p99_ms"] is not None:
                    late.append(measured["changer"]["late_p99_ms"])
                if mode in sweeps:
                    sweeps[mode] += measured["follower"]["sweep_seconds"]
            for mode in MODES[1:]:  # windows of one run, next to each other: their difference
                result.add(f"{mode}.cpu_added", cpu[mode] - cpu["none"], label=added_label(mode), unit="s/s")
        note_setup(result, jobs, rate, seconds, alone_s, made_rates, late, len(api_pids))
        for mode, times in sweeps.items():
            if times:
                result.note(
                    f"{mode}: one sweep of the {jobs:,} jobs took {percentile(times, 50):.2f} s (median, "
                    f"{min(times):.2f}–{max(times):.2f})",
                    key=f"sweep.{mode}",
                )
        held_waits(stack, result, ctx.runs)


def added_label(mode: str) -> str:
    return f"{WHAT[mode]}: API + redis-server CPU, less the changes' own (same run)"


def note_setup(
    result: ScenarioResult,
    jobs: int,
    rate: float,
    seconds: float,
    alone_s: float,
    made_rates: list[float],
    late: list[float],
    api_processes: int,
) -> None:
    result.note(
        f"each run: {jobs:,} jobs of the seed's body submitted through the batch route to {POOL_LABEL} "
        "(no node has it, and no placement worker runs), so they stay PENDING; one tenant a run"
    )
    result.note(
        f"the changer: POST /api/jobs/{{id}}/stop of {rate:g} jobs a second (1 %), paced, over "
        f"{CHANGER_CONNECTIONS} keep-alive connections, each stop a PENDING → STOPPED change; it answered "
        f"{min(made_rates):.1f}–{max(made_rates):.1f} stops/s across the windows, at most "
        f"{max(late, default=0):.0f} ms behind its schedule (p99 of a window)"
    )
    result.note(
        f"windows of {seconds:g} s with a follower and {alone_s:g} s for the changer alone, in turns, a "
        "different first each run; CPU is /proc utime + stime over the window of the API's process tree "
        f"({api_processes} processes: granian main, 2 workers, helpers) and of redis-server, in seconds a second"
    )
    result.note(
        f"followers: the feed on one connection (wait={FEED_WAIT_S}, limit 1000), a poller over {CONNECTIONS} "
        f"keep-alive connections, a sweep every {INTERVAL_S:g} s (at once after one that took longer); the "
        "ETag poller reads every job once before the window to learn its ETag"
    )
    result.note(
        f"seen: of the stops answered inside the window, those the follower saw by its end, and by {GRACE_S:g} s "
        "later (a follower goes on that long, a sweep more; its requests and CPU count inside the window only); "
        "latency: the follower's receipt less the changer's receipt of the stop's answer, or less the change's "
        "`time` in the feed (Redis's clock, ms)"
    )


def measure_window(
    stack: Stack,
    api: Api,
    api_pids: list[int],
    redis_pid: int,
    mode: str,
    tenant: str,
    ids: list[str],
    batch: list[str],
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """One window: the changer, and the follower of ``mode`` unless "none"; their results and the CPU."""
    common = {"port": api.port, "tenant": tenant, "seconds": seconds}
    clients: dict[str, subprocess.Popen[str]] = {}
    try:
        if mode != "none":
            spec = {**common, "role": mode, "ids": ids, "interval": INTERVAL_S, "wait": FEED_WAIT_S, "grace": GRACE_S}
            clients["follower"] = start_client(stack, {**spec, "connections": 1 if mode == "feed" else CONNECTIONS})
        clients["changer"] = start_client(
            stack, {**common, "role": "changer", "ids": batch, "rate": rate, "connections": CHANGER_CONNECTIONS}
        )
        start = time.time() + 0.5
        for process in clients.values():
            assert process.stdin is not None
            process.stdin.write(f"{start!r}\n")
            process.stdin.flush()
        time.sleep(max(0.0, start - time.time()))
        before = cpu_sample(api_pids, redis_pid)
        time.sleep(max(0.0, start + seconds - time.time()))
        after = cpu_sample(api_pids, redis_pid)
        measured: dict[str, Any] = {
            name: finish_client(process, seconds + GRACE_S) for name, process in clients.items()
        }
    finally:
        for process in clients.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    measured["seconds"], measured["end_ms"] = seconds, (start + seconds) * 1000
    measured["api_cpu"] = (after[0] - before[0]) / seconds
    measured["redis_cpu"] = (after[1] - before[1]) / seconds
    return measured


def cpu_sample(api_pids: list[int], redis_pid: int) -> tuple[float, float]:
    return sum(cpu_seconds(pid) for pid in api_pids), cpu_seconds(redis_pid)


def start_client(stack: Stack, spec: dict[str, Any]) -> subprocess.Popen[str]:
    """``python -m bench.feedload`` with ``spec``, once it said ``ready``."""
    path = stack.root / f"feed-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(spec))
    process = subprocess.Popen(
        [PYTHON, "-m", "bench.feedload", f"@{path}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stack.env(),
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if line.strip() != "ready":
        process.kill()
        _, err = process.communicate()
        raise BenchError(f"the {spec['role']} client did not get ready:\n{err[-2000:]}")
    return process


def finish_client(process: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"a feed client did not finish in {seconds + 60:g} s") from None
    if process.returncode != 0:
        raise BenchError(f"a feed client failed:\n{err[-2000:]}")
    answer: dict[str, Any] = json.loads(out)
    return answer


def record_window(result: ScenarioResult, mode: str, measured: dict[str, Any]) -> None:
    what, seconds = WHAT[mode], measured["seconds"]
    result.add(f"{mode}.api_cpu", measured["api_cpu"], label=f"{what}: API CPU", unit="s/s")
    result.add(f"{mode}.redis_cpu", measured["redis_cpu"], label=f"{what}: redis-server CPU", unit="s/s")
    if mode == "none":
        return
    result.add(f"{mode}.cpu_added", None, label=added_label(mode), unit="s/s")  # its row here; values per run
    follower, answered = measured["follower"], measured["changer"]["answered"]
    bad = {s: n for s, n in follower["statuses"].items() if s not in ("200", "304")}
    if bad or follower["errors"]:
        result.note(f"{what}: answers other than 200/304: {bad}, broken connections: {follower['errors']}")
    result.add(f"{mode}.rate", follower["requests"] / seconds, label=f"{what}: requests/s by the client", unit="req/s")
    result.add(f"{mode}.client_cpu", follower["cpu_seconds"] / seconds, label=f"{what}: the client's CPU", unit="s/s")
    seen = {i: t for i, t in follower["seen"].items() if i in answered}
    by_end = sum(1 for t in seen.values() if t <= measured["end_ms"])
    result.add(
        f"{mode}.seen",
        100 * by_end / len(answered) if answered else None,
        label=f"{what}: stops seen by the window's end, of those made in it",
        unit="%",
    )
    result.add(
        f"{mode}.seen_later",
        100 * len(seen) / len(answered) if answered else None,
        label=f"{what}: stops seen by {GRACE_S:g} s after it",
        unit="%",
    )
    late = [t - answered[i] for i, t in seen.items()]
    result.add(f"{mode}.p50", percentile(late, 50), label=f"{what}: stop answered → seen, p50", unit="ms")
    result.add(f"{mode}.p99", percentile(late, 99), label=f"{what}: stop answered → seen, p99", unit="ms")
    if mode == "feed":
        since_change = [t - follower["made"][i] for i, t in seen.items()]
        result.add("feed.change_p50", percentile(since_change, 50), label=f"{what}: change → seen, p50", unit="ms")
        result.add("feed.change_p99", percentile(since_change, 99), label=f"{what}: change → seen, p99", unit="ms")
        answers = follower["statuses"].get("200", 0)
        result.add(
            "feed.per_answer",
            follower["changes"] / answers if answers else None,
            label=f"{what}: changes an answer carried (mean)",
            unit="changes",
        )


def held_waits(stack: Stack, result: ScenarioResult, runs: int) -> None:
    """Open more long polls at once than one API process may hold; count the held ones."""
    settings = Settings.from_env(stack.env())
    opened, wait_s = 2 * settings.max_waiters + 4, 3
    api = stack.api(workers=1)
    tenant = {"X-Tenant-Id": "feed-0"}
    position = api.request("GET", "/api/jobs/changes", headers=tenant)[2]["cursor"]
    path = f"/api/jobs/changes?since={position}&wait={wait_s}"
    for _ in range(runs):
        answers = at_once_requests(api, path, tenant, opened, timeout_s=wait_s + 30)
        if len(answers) != opened or any(status != 200 for status, _, _ in answers):
            raise BenchError(f"of {opened} long polls, {len(answers)} answered: {[a[0] for a in answers]}")
        held = sum(1 for _, took, retry in answers if not retry and took >= wait_s * 0.9)
        at_once = sum(1 for _, took, retry in answers if retry and took < 1.0)
        result.add("waiters.held", held, label=f"long polls one API process held, of {opened} at once", unit="waits")
        result.add(
            "waiters.at_once", at_once, label=f"long polls answered at once with Retry-After, of {opened}", unit="waits"
        )
        if held + at_once != opened:
            result.note(
                f"waiters: {opened - held - at_once} of {opened} long polls were neither held nor answered at once"
            )
    result.note(
        f"waiters: {opened} threads of the harness send GET /api/jobs/changes?since=<now>&wait={wait_s} at once "
        f"to `poolq api` with 1 worker process (POOLQ_MAX_WAITERS={settings.max_waiters}, "
        f"POOLQ_API_THREADS={settings.api_threads}); held: answered after the wait without Retry-After; at once: "
        "within 1 s, with Retry-After: 1"
    )
    stack.stop(api.child)


def at_once_requests(
    api: Api, path: str, headers: dict[str, str], count: int, timeout_s: float
) -> list[tuple[int, float, bool]]:
    """``count`` GETs of ``path`` sent together, one a thread: (status, seconds, Retry-After given) each."""
    answers: list[tuple[int, float, bool]] = []
    lock = threading.Lock()
    go = threading.Event()

    def one() -> None:
        go.wait()
        began = time.monotonic()
        status, answer_headers, _ = api.request("GET", path, headers=headers, timeout_s=timeout_s)
        with lock:
            answers.append((status, time.monotonic() - began, "retry-after" in answer_headers))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(timeout_s)
    return answers
