"""``python -m bench SCENARIO [--runs N] [--quick] [--write PATH]``: run, print a table, write a report.

Scenarios (each in its own temporary directory with its own embedded Redis; every
process it starts is stopped when it ends, also on an error or Ctrl-C):

| scenario | what |
|---|---|
| submit | single-job POST /api/jobs, closed loop and paced, and the baseline service |
| batch | POST /api/jobs/batch with 1,000 jobs a request |
| place | accepted jobs placed by 2 placement workers onto 100 / 1,000 / 10,000 static nodes |
| poll | GET /api/jobs/{id} (200 and 304) and GET /api/jobs?ids= |
| e2e | `true` jobs through a node agent: throughput, and latency at 20 jobs/s |
| list | the first page of GET /api/jobs with 10,000 to 1,000,000 records |
| memory | Redis bytes per finished record; RSS of an API process and of a node agent |
| fair_share | two tenants of weights 3 and 1 sharing one node: each one's share of its CPU-seconds |
| arrays | tasks a second accepted in arrays of 1,000 and 100,000, against Slurm's sbatch --array when installed |
| feed | following 10,000 jobs with 100 changes/s: the change feed against polling; the long polls a process holds |
| curves | how submissions, reads, placement, memory and agents' rates change as the work grows |
| ceiling | Redis's CPU for an accepted job, a placement and a job run: where one Redis core saturates |
| failover | through Redis Sentinel: submissions with and without waiting for a replica; the master killed under load |
| fleet | 100 and 1,000 node agents on one Redis: what idle agents cost it, placement and latency among them |

Exit status: 0 when every scenario ran (whether or not it met its targets, which the
report says), 1 when a scenario could not run, 2 for an unknown scenario, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench import (
    scenarios,
    scenarios_arrays,
    scenarios_ceiling,
    scenarios_curves,
    scenarios_feed,
    scenarios_fleet,
    scenarios_sentinel,
    scenarios_workers,
)
from bench.figures import Figure, ScenarioResult, number
from bench.notes import not_met_section
from bench.scenarios import Context
from bench.stack import BenchError

SCENARIOS: dict[str, Callable[[Context], None]] = {
    "submit": scenarios.submit,
    "batch": scenarios.batch,
    "place": scenarios_workers.place,
    "poll": scenarios.poll,
    "e2e": scenarios_workers.e2e,
    "list": scenarios.list_jobs,
    "memory": scenarios_workers.memory,
    "fair_share": scenarios_workers.fair_share,
    "arrays": scenarios_arrays.arrays,
    "feed": scenarios_feed.feed,
    "curves": scenarios_curves.curves,
    "failover": scenarios_sentinel.failover,
    "ceiling": scenarios_ceiling.ceiling,
    "fleet": scenarios_fleet.fleet,
}
PACKAGES = ("poolq", "celery", "kombu", "marshmallow", "granian", "gunicorn", "redis")


def main(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if any(name not in SCENARIOS for name in names):
        print(f"bench: unknown scenario {args.scenario!r}; one of {', '.join(SCENARIOS)}, all", file=sys.stderr)
        return 2
    ctx = Context(runs=max(1, args.runs), quick=args.quick)
    command = command_line(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine_info, versions = machine(), package_versions()
    # SIGINT and SIGTERM unwind like Ctrl-C, so every Stack stops its children (also when
    # started in the background, where the shell would have SIGINT ignored).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        for name in names:
            print(
                f"== {name} ({ctx.runs} run{'s' if ctx.runs > 1 else ''}{', quick' if ctx.quick else ''})", flush=True
            )
            began = time.monotonic()
            baseline_runs = baseline_values(ctx)
            try:
                SCENARIOS[name](ctx)
            except Exception as exc:  # report it, go on with the next scenario
                failed = True
                ctx.result(name).error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, BenchError):
                    traceback.print_exc()
            ctx.result(name).seconds = time.monotonic() - began
            print_result(ctx, ctx.result(name))
            if baseline_values(ctx) != baseline_runs:  # this scenario measured the baseline
                print_result(ctx, ctx.results["baseline"])
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    machine_info["load average at end"] = load_average()
    if args.write:
        report = markdown(ctx, names, command, started, machine_info, versions)
        Path(args.write).write_text(report)
        print(f"report written to {args.write}")
    return 1 if failed else 0


def baseline_values(ctx: Context) -> int:
    baseline = ctx.results.get("baseline")
    return sum(len(f.values) for f in baseline.figures.values()) if baseline else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "bench", args.scenario]
    if args.runs != 3:
        parts += ["--runs", str(args.runs)]
    if args.quick:
        parts.append("--quick")
    if args.write:
        parts += ["--write", args.write]
    return " ".join(parts)


# -- the machine -----------------------------------------------------------------


def machine() -> dict[str, str]:
    info = {
        "cores": str(os.cpu_count()),
        "memory": f"{_meminfo_kib() / 1024 / 1024:.1f} GiB",
        "CPU model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "load average at start": load_average(),
    }
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "unknown"


def _meminfo_kib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name if name != "redis" else "redis-py"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["redis-server"] = redis_server_version()
    return versions


def redis_server_version() -> str:
    from poolq.embedded import EmbeddedRedisError, redis_server_binary

    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (EmbeddedRedisError, OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "unknown"


# -- tables ----------------------------------------------------------------------


def baseline_figure(ctx: Context, figure: Figure) -> Figure | None:
    """The baseline figure a submission figure is compared with: the faster server's."""
    if figure.baseline_key is None:
        return None
    denominator = scenarios.baseline_denominator(ctx)
    baseline = ctx.results.get("baseline")
    if denominator is None or baseline is None:
        return None
    found = baseline.figures.get(f"{denominator[0]}.{figure.baseline_key}") or baseline.figures.get(figure.baseline_key)
    return found if found is not None and found.values else None


def rows(ctx: Context, result: ScenarioResult) -> list[list[str]]:
    out = []
    for figure in result.figures.values():
        if not figure.values:
            continue
        base = baseline_figure(ctx, figure)
        versus = f"{figure.median / base.median:.2f}× ({number(base.median)})" if base and base.median else ""
        met = {True: "yes", False: "NO", None: ""}[figure.met]
        out.append(
            [
                figure.label,
                number(figure.median),
                number(min(figure.values)),
                number(max(figure.values)),
                figure.unit,
                str(figure.target or ""),
                met,
                versus,
            ]
        )
    return out


HEADER = ["figure", "median", "min", "max", "unit", "target", "met", "vs baseline"]


def print_result(ctx: Context, result: ScenarioResult) -> None:
    table = rows(ctx, result)
    if table:
        widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
        for row in [HEADER, *table]:
            print(
                "  "
                + "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
            )
    if result.error:
        print(f"  FAILED: {result.error}")
    if result.seconds:
        print(f"  ({result.seconds:.0f} s)")
    sys.stdout.flush()


def markdown(
    ctx: Context,
    names: list[str],
    command: str,
    started: datetime.datetime,
    machine_info: dict[str, str],
    versions: dict[str, str],
) -> str:
    lines = [
        "# poolq benchmarks",
        "",
        f"Measured by `{command}` on {started:%Y-%m-%d %H:%M} UTC. Every figure is the median of "
        f"{ctx.runs} run{'s' if ctx.runs > 1 else ''}, with the smallest and largest; a target is met when the median "
        "meets it. Everything, the load generator included, ran on this one machine, on loopback.",
        "",
    ]
    if ctx.quick:
        lines += ["**`--quick`: short runs to check the harness; these figures are not meaningful.**", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine_info.items()]
    lines += [
        "",
        "## Versions",
        "",
        "| " + " | ".join(versions) + " |",
        "|" + "---|" * len(versions),
        "| " + " | ".join(versions.values()) + " |",
        "",
    ]
    lines += summary(ctx, names)
    order = [n for n in names if n in ctx.results]
    if "baseline" in ctx.results:
        order.insert(order.index("submit") + 1 if "submit" in order else 0, "baseline")
    for name in order:
        lines += section(ctx, ctx.results[name])
    lines += method()
    return "\n".join(lines) + "\n"


def summary(ctx: Context, names: list[str]) -> list[str]:
    lines = ["## Targets", "", "| scenario | figure | target | median | met |", "|---|---|---|---|---|"]
    unmet: list[tuple[str, str, str, str]] = []
    for name in names:
        result = ctx.results.get(name)
        if result is None:
            continue
        if result.error:
            lines.append(f"| {name} | the scenario failed: {result.error} | | | NO |")
        for figure in result.figures.values():
            if figure.target is not None:
                met = {True: "yes", False: "**no**", None: "not measured"}[figure.met]
                lines.append(
                    f"| {name} | {figure.label} | {figure.target} {figure.unit} | {number(figure.median)} | {met} |"
                )
                if figure.met is False:
                    unmet.append((name, figure.key, figure.label, f"{number(figure.median)} {figure.unit}"))
    return [*lines, "", *not_met_section(unmet)]


def section(ctx: Context, result: ScenarioResult) -> list[str]:
    title = "baseline (the afternoon service: `bench/baseline.py`)" if result.name == "baseline" else result.name
    lines = [f"## {title}", ""]
    if result.seconds:
        lines += [f"`python -m bench {result.name}`: {result.seconds:.0f} s.", ""]
    if result.error:
        lines += [f"**The scenario failed:** `{result.error}`", ""]
    table = rows(ctx, result)
    if table:
        lines += ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * 3 + "---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        lines.append("")
    lines += [f"- {note}" for note in result.notes]
    return [*lines, ""]


def method() -> list[str]:
    return [
        "## How it is measured",
        "",
        "- Each scenario starts what it needs in a fresh temporary directory: an embedded redis-server "
        "(`poolq.embedded.EmbeddedRedis`, append-only file with `appendfsync everysec`, as in production), "
        "`python -m poolq api` (granian, 2 worker processes), `python -m poolq worker`, `python -m poolq node`, "
        "and stops all of it afterwards.",
        "- Load comes from `python -m bench.loadgen` in its own process: asyncio, HTTP/1.1 keep-alive. "
        "Closed loop: each connection sends the next request when the answer arrives. Paced: request i is due at "
        "i / rate; its latency counts from its due time, so queueing shows. Percentiles are nearest-rank.",
        "- `vs baseline` divides poolq's median by the median of the baseline service under the faster of "
        "gunicorn and granian in the same invocation (for latencies, below 1 is better).",
        "- Other work on the machine while measuring (see the load average) makes figures lower and noisier "
        "than on an idle machine.",
    ]
