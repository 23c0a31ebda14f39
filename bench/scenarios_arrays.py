"""The arrays scenario: how fast one request of N tasks is accepted, poolq against sbatch.

poolq: ``POST /api/jobs`` with ``"array": {"count": N}`` (the seed's body), one
keep-alive connection, each request waiting for the previous answer, as a script
submitting arrays one after another would; tasks accepted a second are requests a
second times N. Nothing places them (no worker, no node), as nothing runs Slurm's.

Slurm, the peer (bench/slurm.py): ``sbatch --hold --array=0-<N-1> --wrap true`` against
a single-host slurmctld on the same machine, run one after another; tasks a second are
N over the median time of one call. ``--hold`` keeps the tasks from running, so that
the machine measures acceptance only. An sbatch call includes starting the sbatch
process, as ``poolq submit --array`` would include starting Python (about 0.3 s, not
measured: the figure is the service's, over HTTP).
"""

from __future__ import annotations

import json

from bench.figures import Target, number
from bench.scenarios import SEED_BODY, Context, check_statuses, describe, run_load
from bench.slurm import Slurm, SlurmUnavailable
from bench.stack import Stack

SIZES = (1_000, 100_000)
SBATCH_RUNS = 10  # sbatch calls per size and run


def arrays(ctx: Context) -> None:
    result = ctx.result("arrays")
    window = {"warmup": 0.3, "seconds": 1.0} if ctx.quick else {"warmup": 0.5, "seconds": 2.5}
    with Stack("arrays") as stack:
        stack.start_redis()
        api = stack.api()
        for _ in range(ctx.runs):
            for size in SIZES:
                spec = {
                    "port": api.port,
                    "method": "POST",
                    "path": "/api/jobs",
                    "body": json.dumps({**SEED_BODY, "array": {"count": size}}),
                    "connections": 1,
                    "count": '"submission_id"',
                    **window,
                }
                load = run_load(stack, spec)
                check_statuses(result, f"arrays of {size:,}", load)
                result.add(
                    f"poolq.{size}",
                    load["counted_rate"] * size,
                    label=f"poolq: tasks accepted/s, arrays of {size:,} (POST /api/jobs)",
                    unit="tasks/s",
                )
                result.add_latencies(f"poolq.{size}.request", load, f"poolq: one array of {size:,}")
        records = stack.redis.dbsize()
        result.note(f"poolq: {describe(spec)}; the seed's body with an array, a fresh id each")
        result.note(f"poolq: Redis held {records:,} keys after the runs: one record per array, whatever its size")
    _slurm_peer(ctx)


def _slurm_peer(ctx: Context) -> None:
    result = ctx.result("arrays")
    try:
        with Slurm() as slurm:
            for _ in range(ctx.runs):
                for size in SIZES:
                    seconds = slurm.median_sbatch(size, 5 if ctx.quick else SBATCH_RUNS)
                    result.add(
                        f"slurm.{size}",
                        size / seconds,
                        label=f"Slurm: tasks accepted/s, arrays of {size:,} (sbatch --hold --array)",
                        unit="tasks/s",
                    )
                    result.add(f"slurm.{size}.call", seconds * 1000, label=f"Slurm: one sbatch of {size:,}", unit="ms")
            version = slurm.version
    except SlurmUnavailable as exc:
        text = f"Slurm is not available on this machine, so there is no (complete) peer figure: {exc}"
        print(f"  {text}", flush=True)  # the table below has poolq's figures alone
        result.note(text)
        return
    for size in SIZES:
        poolq, peer = result.figures[f"poolq.{size}"], result.figures[f"slurm.{size}"]
        result.add(
            f"ratio.{size}",
            poolq.median / peer.median,
            label=f"poolq over Slurm, arrays of {size:,}",
            unit="x",
            target=Target(">=", 1) if size == max(SIZES) else None,
        )
    result.note(
        f"Slurm: {version}, single-host slurmctld + slurmd + munged under a temporary directory, "
        f"sched/builtin, no accounting; {SBATCH_RUNS} sbatch calls one after another per size and run, "
        "the median; the arrays are cancelled after each size"
    )
    result.note(f"target: poolq accepts an array of {max(SIZES):,} at least as fast as sbatch --array ({number(1)}x)")
