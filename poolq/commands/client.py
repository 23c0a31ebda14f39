"""``poolq submit|status|wait|logs|list|stop|delete``: the API from a shell.

Every command takes ``--server`` (POOLQ_SERVER, default http://127.0.0.1:8000),
``--token`` (POOLQ_TOKEN), ``--tenant`` and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from poolq.client import ApiError, Client

BATCH = 1000
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("POOLQ_SERVER", "http://127.0.0.1:8000"))
    common.add_argument("--token", default=os.environ.get("POOLQ_TOKEN"))
    common.add_argument("--tenant", default=None, help="X-Tenant-Id (default: the token's tenant, or `default`)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    submit = commands.add_parser(
        "submit", parents=[common], help="submit a job: poolq submit [options] -- command args…"
    )
    submit.add_argument("--label", help="X-Pool-Label: ordered pool-label terms")
    submit.add_argument("--working-dir", help="working directory on the node (default: the current directory)")
    submit.add_argument("--env", action="append", default=[], metavar="K=V")
    submit.add_argument("--pip", action="append", default=[], metavar="REQ")
    submit.add_argument("--cpus", type=float)
    submit.add_argument("--memory", help="bytes, or with Ki/Mi/Gi/Ti")
    submit.add_argument("--gpus", type=float)
    submit.add_argument("--resources", help="NAME=amount,…")
    submit.add_argument("--id", help="submission id (app- is prefixed when missing)")
    submit.add_argument(
        "--timeout-ms",
        "--schedule-timeout-ms",
        type=int,
        help="X-Schedule-Timeout-Ms: how long it may wait to be placed",
    )
    submit.add_argument(
        "--timeout",
        "--runtime-limit",
        type=float,
        metavar="S",
        help="runtime_limit_s: stop it once it has run S seconds",
    )
    submit.add_argument(
        "--after", action="append", metavar="ID", help="run only once job ID SUCCEEDED (afterok; repeatable)"
    )
    submit.add_argument(
        "--after-any", action="append", metavar="ID", help="run once job ID ended, however (afterany; repeatable)"
    )
    submit.add_argument(
        "--priority", type=int, metavar="P", help="-1000..1000: higher places first among the tenant's jobs"
    )
    submit.add_argument(
        "--retries", type=int, metavar="N", help="run it up to N more times if it fails or its node is lost"
    )
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it SUCCEEDED")
    submit.add_argument("--file", type=Path, help="JSON lines, one job body per line, sent in batches of 1,000")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER)
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "show a job's status and message"),
        ("wait", cmd_wait, "wait for a job to end; exit 0 if it SUCCEEDED, 1 otherwise"),
        ("stop", cmd_stop, "stop a job"),
        ("delete", cmd_delete, "delete a finished job"),
    ):
        action = commands.add_parser(name, parents=[common], help=text)
        action.add_argument("submission_id")
        action.set_defaults(func=func)
    logs = commands.add_parser("logs", parents=[common], help="print a job's output")
    logs.add_argument("submission_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=cmd_logs)
    listing = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--status", choices=["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_list)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, token=args.token, tenant=args.tenant)


def _fail(exc: Exception) -> int:
    print(f"poolq: {exc}", file=sys.stderr)
    if isinstance(exc, ApiError) and isinstance(exc.body, dict) and exc.body.get("fields"):
        for path, messages in exc.body["fields"].items():
            print(f"  {path}: {'; '.join(messages)}", file=sys.stderr)
    return 1


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    from poolq.nodes import parse_resources, parse_size

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not command:
        raise ValueError("give the command after --, e.g. poolq submit -- python train.py")
    runtime_env: dict[str, Any] = {"working_dir": str(Path(args.working_dir or os.getcwd()).resolve())}
    if args.env:
        runtime_env["env_vars"] = dict(item.split("=", 1) for item in args.env)
    if args.pip:
        runtime_env["pip"] = args.pip
    body: dict[str, Any] = {
        "entrypoint": shlex.join(command) if len(command) > 1 else command[0],
        "runtime_env": runtime_env,
    }
    if args.cpus is not None:
        body["entrypoint_num_cpus"] = args.cpus
    if args.memory is not None:
        body["entrypoint_memory"] = parse_size(args.memory)
    if args.gpus is not None:
        body["entrypoint_num_gpus"] = args.gpus
    if args.resources:
        body["entrypoint_resources"] = {k: float(v) for k, v in parse_resources(args.resources).items()}
    if args.id:
        body["submission_id"] = args.id
    if args.timeout is not None:
        body["runtime_limit_s"] = args.timeout
    if args.retries:
        body["retry_policy"] = {"max_attempts": args.retries + 1}
    if args.priority is not None:
        body["priority"] = args.priority
    if args.after or args.after_any:
        body["depends_on"] = {"afterok": args.after or [], "afterany": args.after_any or []}
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    if args.file:
        return submit_file(args)
    client = _client(args)
    try:
        submission_id = client.submit(job_body(args), pool_label=args.label, timeout_ms=args.timeout_ms)
    except (ApiError, ValueError, OSError) as exc:
        return _fail(exc)
    if not args.wait:
        print(json.dumps({"submission_id": submission_id}) if args.json else submission_id)
        return 0
    record = client.wait(submission_id)
    _show(record, args.json)
    return 0 if record["status"] == "SUCCEEDED" else 1


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, job body or the error that line has) for each non-blank line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                try:
                    yield number, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield number, ValueError("not UTF-8")
                except json.JSONDecodeError as exc:
                    yield number, exc


def submit_file(args: argparse.Namespace) -> int:
    """Send a JSON-lines file in batches, with a progress bar and a summary of refusals."""
    from tqdm import tqdm

    client = _client(args)
    try:
        with open(args.file, "rb") as handle:
            total = sum(1 for line in handle if line.strip())
    except OSError as exc:
        return _fail(exc)
    accepted, refused = 0, []
    batch: list[tuple[int, Any]] = []
    with tqdm(total=total, unit="job", disable=args.json or None, file=sys.stderr) as progress:

        def send() -> None:
            nonlocal accepted
            bodies = [body for _, body in batch]
            try:
                results = client.submit_batch(bodies, pool_label=args.label, timeout_ms=args.timeout_ms)
            except ApiError as exc:
                results = [{"error": str(exc)}] * len(batch)
            for (number, _), result in zip(batch, results):
                if "submission_id" in result:
                    accepted += 1
                else:
                    refused.append((number, result))
            progress.update(len(batch))
            batch.clear()

        for number, body in _lines(args.file):
            if isinstance(body, Exception):
                refused.append((number, {"error": f"not a JSON job body: {body}"}))
                progress.update(1)
                continue
            batch.append((number, body))
            if len(batch) == BATCH:
                send()
        if batch:
            send()
    if args.json:
        print(json.dumps({"accepted": accepted, "refused": [{"line": n, **r} for n, r in refused]}))
    else:
        print(f"accepted {accepted}, refused {len(refused)}")
        for number, result in refused:
            detail = "; ".join(f"{p}: {', '.join(m)}" for p, m in (result.get("fields") or {}).items())
            print(f"  line {number}: {result.get('error')}" + (f" ({detail})" if detail else ""))
    return 0 if not refused else 1


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record))
        return
    print(f"{record['submission_id']}: {record['status']}")
    if record.get("message"):
        print(record["message"])


def cmd_status(args: argparse.Namespace) -> int:
    try:
        _show(_client(args).job(args.submission_id), args.json)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    try:
        record = _client(args).wait(args.submission_id)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    _show(record, args.json)
    return 0 if record["status"] == "SUCCEEDED" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        stopped = _client(args).stop(args.submission_id)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    print(json.dumps({"stopped": stopped}) if args.json else ("stopping" if stopped else "already finished"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    try:
        _client(args).delete(args.submission_id)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    print(json.dumps({"deleted": True}) if args.json else "deleted")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        text, offset = client.logs(args.submission_id)
        _write_logs(args, text, offset)
        while args.follow:
            status = client.job(args.submission_id)["status"]
            text, offset = client.logs(args.submission_id, offset)
            if text:
                _write_logs(args, text, offset)
            if status in TERMINAL and not text:
                break
            if not text:
                time.sleep(0.5)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    return 0


def _write_logs(args: argparse.Namespace, text: str, offset: int) -> None:
    """The text as it is, or with --json one object per read: ``{"logs": …, "offset": N}``,
    N the offset to read on from (as ``GET …/logs`` answers it)."""
    sys.stdout.write(json.dumps({"logs": text, "offset": offset}) + "\n" if args.json else text)
    sys.stdout.flush()


def cmd_list(args: argparse.Namespace) -> int:
    try:
        records, _ = _client(args).jobs(status=args.status, limit=args.limit)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(records))
        return 0
    print(f"{'SUBMISSION ID':<44} {'STATUS':<10} {'NODE':<16} ENTRYPOINT")
    for record in records:
        print(
            f"{record['submission_id']:<44} {record['status']:<10} {record['driver_node_id'] or '-':<16} {record['entrypoint'][:60]}"
        )
    return 0
