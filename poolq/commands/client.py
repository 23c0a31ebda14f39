"""``poolq submit|status|wait|logs|list|stop|delete``: the API from a shell.

Every command takes ``--server`` (POOLQ_SERVER, default http://127.0.0.1:8000),
``--token`` (POOLQ_TOKEN), ``--tenant`` and ``--json``. What a user reads goes to
stdout (ids, records, a job's output); progress, refusals and advice go to stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from poolq.client import ApiError, Client, WaitTimeout
from poolq.model import MAX_ATTEMPTS, with_prefix

BATCH = 1000
MAX_RETRIES = MAX_ATTEMPTS - 1  # --retries N: N + 1 attempts
LIST_PAGE = 1000  # jobs per request of `poolq list --all`

# Exit codes of `poolq submit --wait` and `poolq wait` (beyond 0, the job's own code, and
# 1): two that jobs rarely use, after timeout(1), which exits 124 when its time is up.
EXIT_WAIT_TIMEOUT = 124
EXIT_STOPPED = 125
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def exit_codes(heading: str, *, with_timeout: bool) -> str:
    """The exit statuses of a command that waits for a job, for its --help."""
    rows = [
        ("0", "the job SUCCEEDED"),
        ("N", "it FAILED with exit code N (killed by signal S: 128+S, as a shell reports it)"),
        (
            "1",
            "it FAILED without an exit code (e.g. SCHEDULE_TIMEOUT: not placed within its\n"
            "         deadline; the message is on stderr), or the command failed",
        ),
        (str(EXIT_WAIT_TIMEOUT), "--timeout S passed before it ended (the job goes on)") if with_timeout else None,
        (str(EXIT_STOPPED), "it was STOPPED"),
        (str(EXIT_INTERRUPTED), "interrupted (Ctrl-C) while waiting (the job goes on)"),
    ]
    return heading + "\n" + "\n".join(f"  {code:<6} {text}" for code, text in filter(None, rows))


def add_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("POOLQ_SERVER", "http://127.0.0.1:8000"))
    common.add_argument("--token", default=os.environ.get("POOLQ_TOKEN"))
    common.add_argument("--tenant", default=None, help="X-Tenant-Id (default: the token's tenant, or `default`)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="submit a job: poolq submit [options] -- command args…",
        epilog=exit_codes("exit status with --wait:", with_timeout=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--label", help="X-Pool-Label: ordered pool-label terms")
    submit.add_argument("--working-dir", help="working directory on the node (default: the current directory)")
    submit.add_argument("--env", action="append", default=[], metavar="K=V", type=_env_pair)
    submit.add_argument("--pip", action="append", default=[], metavar="REQ")
    submit.add_argument("--cpus", type=_finite)
    submit.add_argument("--memory", help="bytes, or with Ki/Mi/Gi/Ti")
    submit.add_argument("--gpus", type=_finite)
    submit.add_argument("--resources", help="NAME=amount,…")
    submit.add_argument("--id", help="submission id (app- is prefixed when missing)")
    submit.add_argument(
        "--timeout-ms",
        "--schedule-timeout-ms",
        type=int,
        metavar="MS",
        help="X-Schedule-Timeout-Ms: how long it may wait to be placed before it ends SCHEDULE_TIMEOUT "
        "(default: the tenant's, else 18000; 0: wait in line as long as it takes)",
    )
    submit.add_argument(
        "--timeout",
        "--runtime-limit",
        type=_finite,
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
        "--array",
        type=int,
        metavar="N",
        help="N copies of the job (up to 100,000), tasks ID-0 … ID-(N-1), each with POOLQ_ARRAY_INDEX; "
        "stop, delete, list --array and wait act on them all by the array's id",
    )
    submit.add_argument(
        "--retries",
        type=_retries,
        metavar="N",
        help=f"run it up to N (0..{MAX_RETRIES}) more times if it fails or its node is lost",
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="print the job's output as it is written and exit with its exit status (below); "
        "with --json, print its final record instead",
    )
    submit.add_argument(
        "--file",
        metavar="PATH",
        help="JSON lines, one job body per line (- for standard input), sent in batches of 1,000; "
        "prints the accepted ids, one a line (--json: one object per line)",
    )
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER)
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "show a job's status and message"),
        ("stop", cmd_stop, "stop a job"),
        ("delete", cmd_delete, "delete a finished job"),
    ):
        action = commands.add_parser(name, parents=[common], help=text)
        action.add_argument("submission_id", type=with_prefix)
        action.set_defaults(func=func)
    wait = commands.add_parser(
        "wait",
        parents=[common],
        help="wait for a job to end; exit with its exit status",
        epilog=exit_codes("exit status:", with_timeout=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wait.add_argument("submission_id", type=with_prefix)
    wait.add_argument(
        "--timeout",
        type=_finite,
        metavar="S",
        help=f"give up after S seconds (exit {EXIT_WAIT_TIMEOUT}; the job goes on)",
    )
    wait.set_defaults(func=cmd_wait)
    logs = commands.add_parser("logs", parents=[common], help="print a job's output")
    logs.add_argument("submission_id", type=with_prefix)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=cmd_logs)
    watch = commands.add_parser("watch", parents=[common], help="print each change of the tenant's jobs as it comes")
    watch.add_argument("--since", metavar="CURSOR", help="start after this cursor (a change's), not from now")
    watch.set_defaults(func=cmd_watch)
    listing = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--status", choices=["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"])
    listing.add_argument("--limit", type=int, help="jobs to show (default 50, at most 1000); with --all, per request")
    listing.add_argument("--all", action="store_true", help="every job, following the pages")
    listing.add_argument("--array", metavar="ID", type=with_prefix, help="the tasks of array ID, in index order")
    listing.set_defaults(func=cmd_list)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _retries(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_RETRIES):
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_RETRIES}, not {text}")
    return int(text)


def _env_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE, not {text}")
    return name, value


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, token=args.token, tenant=args.tenant)


def _fail(exc: Exception) -> int:
    """One line on stderr: the error, and each field a 400 names with what is wrong with it."""
    fields = exc.body.get("fields") if isinstance(exc, ApiError) and isinstance(exc.body, dict) else None
    named = "".join(f"; {path}: {', '.join(messages)}" for path, messages in (fields or {}).items())
    print(f"poolq: {exc}{named}", file=sys.stderr)
    return 1


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    from poolq.nodes import parse_resources, parse_size

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not command:
        raise ValueError("give the command after --, e.g. poolq submit -- python train.py")
    runtime_env: dict[str, Any] = {"working_dir": str(Path(args.working_dir or os.getcwd()).resolve())}
    if args.env:
        runtime_env["env_vars"] = dict(args.env)
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
    if args.array is not None:
        body["array"] = {"count": args.array}
    if args.after or args.after_any:
        body["depends_on"] = {"afterok": args.after or [], "afterany": args.after_any or []}
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    if args.file:
        if args.wait or [a for a in args.entrypoint if a != "--"]:
            return _fail(ValueError("--file takes its jobs from the file: give no command and no --wait with it"))
        return submit_file(args)
    client = _client(args)
    try:
        submission_id = client.submit(job_body(args), pool_label=args.label, timeout_ms=args.timeout_ms)
    except (ApiError, ValueError, OSError) as exc:
        return _fail(exc)
    if not args.wait:
        print(json.dumps({"submission_id": submission_id}) if args.json else submission_id)
        return 0
    try:
        if args.json:
            record = client.wait(submission_id)
        elif args.array is not None:  # an array has no output of its own: its tasks do
            print(f"poolq: submitted array {submission_id}; waiting for its {args.array} tasks", file=sys.stderr)
            record = client.wait(submission_id)
        else:
            print(f"poolq: submitted {submission_id}; its output follows", file=sys.stderr)
            record = client.follow(submission_id, _write, offset=0)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return _interrupted(submission_id)
    return _ended(record, args.json)


def _write(text: str, offset: int = 0) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def exit_status(record: dict[str, Any]) -> int:
    """The exit status of `submit --wait` and `wait` for a finished job (see exit_codes)."""
    if record["status"] == "SUCCEEDED":
        return 0
    if record["status"] == "STOPPED":
        return EXIT_STOPPED
    code = record.get("driver_exit_code")
    if not code:
        return 1
    return 128 - code if code < 0 else (code & 0xFF or 1)


def _ended(record: dict[str, Any], as_json: bool) -> int:
    """Show how a waited-for job ended (the record on stdout with --json, else a status
    line on stderr) and return its exit status."""
    if as_json:
        print(json.dumps(record))
    else:
        code = record.get("driver_exit_code")
        print(
            f"{record['submission_id']}: {record['status']}" + (f" (exit code {code})" if code else ""), file=sys.stderr
        )
        if record["status"] != "SUCCEEDED" and record.get("message"):
            print(record["message"].rstrip("\n"), file=sys.stderr)
    if record.get("error_type") == "SCHEDULE_TIMEOUT":
        print(QUEUE_HINT, file=sys.stderr)
    return exit_status(record)


QUEUE_HINT = (
    "poolq: to let a job wait in line for as long as it takes, submit it with --schedule-timeout-ms 0 "
    "(or have the operator set the tenant's default: poolq quota set TENANT --schedule-timeout-ms 0)"
)


def _interrupted(submission_id: str) -> int:
    print(f"\npoolq: stopped waiting; {submission_id} goes on (poolq stop {submission_id} stops it)", file=sys.stderr)
    return EXIT_INTERRUPTED


def _lines(handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    """(line number, job body or the error that line has) for each non-blank line."""
    for number, raw in enumerate(handle, 1):
        if raw.strip():
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield number, ValueError("not UTF-8")
            except json.JSONDecodeError as exc:
                yield number, exc


def submit_file(args: argparse.Namespace) -> int:
    """Send JSON lines in batches: accepted ids (or one object per line) on stdout, in the
    order of the lines; a progress bar, the refusals and a summary on stderr."""
    from tqdm import tqdm

    client = _client(args)
    name = "standard input" if args.file == "-" else args.file
    try:
        if args.file == "-":
            handle, total = sys.stdin.buffer, None
        else:
            with open(args.file, "rb") as counted:
                total = sum(1 for line in counted if line.strip())
            if not total:
                return _fail(ValueError(f"no jobs in {name}: it is empty (one JSON job body per line)"))
            handle = open(args.file, "rb")
    except OSError as exc:
        return _fail(exc)
    report = _FileReport(args.json)
    pending: list[tuple[int, Any]] = []  # lines in order, bodies and unreadable lines alike
    bodies = 0  # of them, bodies to send
    with handle, tqdm(total=total, unit="job", disable=args.json or None, file=sys.stderr) as progress:

        def send() -> None:
            nonlocal bodies
            valid = [(number, body) for number, body in pending if not isinstance(body, Exception)]
            try:
                results = client.submit_batch([b for _, b in valid], pool_label=args.label, timeout_ms=args.timeout_ms)
            except ApiError as exc:  # the whole batch refused (e.g. 429, 413): say so on each line
                results = [{"error": str(exc)}] * len(valid)
            answers = dict(zip((n for n, _ in valid), zip((b for _, b in valid), results)))
            for number, body in pending:
                if isinstance(body, Exception):
                    report.refused(number, {"error": f"not a JSON job body: {body}"})
                else:
                    report.answered(number, *answers[number])
            progress.update(len(pending))
            pending.clear()
            bodies = 0

        try:
            for number, body in _lines(handle):
                pending.append((number, body))
                bodies += not isinstance(body, Exception)
                if bodies == BATCH:
                    # A gang is placed from one batch: the consecutive lines of the gang
                    # the batch ends with go with the next one (unless they fill it).
                    carried = _trailing_gang(pending)
                    rest = pending[len(pending) - carried :] if carried < len(pending) else []
                    del pending[len(pending) - len(rest) :]
                    send()
                    pending.extend(rest)
                    bodies = sum(not isinstance(b, Exception) for _, b in rest)
            if pending:
                send()
        except (OSError, http.client.HTTPException) as exc:
            line = f" (lines {pending[0][0]} on: not sent, or not confirmed)" if pending else ""
            return _fail(OSError(f"{exc}{line}"))
    if not report.lines:
        return _fail(ValueError(f"no jobs in {name}: it is empty (one JSON job body per line)"))
    if not args.json:
        print(f"poolq: accepted {report.accepted}, refused {len(report.refusals)}", file=sys.stderr)
    if report.accepted and args.timeout_ms is None:
        hint = _queueing_hint(client, report)
        if hint:
            print(hint, file=sys.stderr)
    return 0 if not report.refusals else 1


def _trailing_gang(lines: list[tuple[int, Any]]) -> int:
    """How many lines at the end of a batch are members of the gang its last line is of."""

    def gang(body: Any) -> Any:
        return body.get("gang_id") if isinstance(body, dict) else None

    last = gang(lines[-1][1])
    if not last:
        return 0
    count = run = 0
    for _, body in reversed(lines):
        if isinstance(body, Exception):  # not a body: it goes where the gang's lines around it go
            count += 1
            continue
        if gang(body) != last:
            break
        count += 1
        run = count
    return run


class _FileReport:
    """What `submit --file` prints for each line, and what it learns for the queueing hint."""

    def __init__(self, as_json: bool):
        from tqdm import tqdm

        self.say = tqdm.write  # a line to stdout or stderr, clear of a progress bar on a terminal
        self.as_json = as_json
        self.lines = self.accepted = 0
        self.refusals: list[int] = []
        self.cpus = 0.0  # asked for by the accepted jobs that say
        self.default_cpus_id: str | None = None  # an accepted job that does not say
        self.defaulted = 0
        self.first_id: str | None = None

    def answered(self, number: int, body: Any, result: dict[str, Any]) -> None:
        if "submission_id" not in result:
            self.refused(number, result)
            return
        self.lines += 1
        self.accepted += 1
        submission_id = result["submission_id"]
        self.first_id = self.first_id or submission_id
        cpus = body.get("entrypoint_num_cpus") if isinstance(body, dict) else None
        if isinstance(cpus, (int, float)) and not isinstance(cpus, bool):
            self.cpus += cpus
        else:
            self.defaulted += 1
            self.default_cpus_id = self.default_cpus_id or submission_id
        self.say(json.dumps({"line": number, "submission_id": submission_id}) if self.as_json else submission_id)

    def refused(self, number: int, result: dict[str, Any]) -> None:
        self.lines += 1
        self.refusals.append(number)
        if self.as_json:
            self.say(json.dumps({"line": number, "error": result.get("error"), **_fields(result)}))
            return
        detail = "; ".join(f"{p}: {', '.join(m)}" for p, m in (result.get("fields") or {}).items())
        self.say(f"poolq: line {number}: {result.get('error')}" + (f" ({detail})" if detail else ""), file=sys.stderr)


def _fields(result: dict[str, Any]) -> dict[str, Any]:
    return {"fields": result["fields"]} if result.get("fields") else {}


def _queueing_hint(client: Client, report: _FileReport) -> str | None:
    """One line when the accepted jobs ask for more CPUs than the live nodes have free and
    have a scheduling deadline: those not placed in time will end SCHEDULE_TIMEOUT.

    Costs two requests: a job's record (its deadline, and the server's default CPUs)
    and the nodes. Free CPUs are counted over every live node, whatever the jobs' pool
    label, so the hint errs towards silence. Any error here only drops the hint.
    """
    try:
        record = client.job(report.default_cpus_id or report.first_id or "")
        nodes = client.nodes()
    except (ApiError, OSError, http.client.HTTPException):
        return None
    deadline = (record.get("scheduling") or {}).get("deadline")
    if deadline is None:  # no deadline: they wait in line already
        return None
    cpus = report.cpus + report.defaulted * float(record["entrypoint_num_cpus"] if report.default_cpus_id else 0)
    free = sum(float(n["free"].get("CPU", 0)) for n in nodes if n.get("alive") and not n.get("draining"))
    if cpus <= free:
        return None
    seconds = max(0, deadline - record["submit_time"]) / 1000
    return (
        f"poolq: these {report.accepted} jobs ask for {cpus:g} CPUs and the live nodes have {free:g} free; "
        f"a job not placed within {seconds:g} s ends SCHEDULE_TIMEOUT. To queue them instead, send them "
        "with --schedule-timeout-ms 0 (or have the operator set the tenant's default: "
        "poolq quota set TENANT --schedule-timeout-ms 0)"
    )


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
        record = _client(args).wait(args.submission_id, timeout_s=args.timeout)
    except WaitTimeout as exc:
        _show(exc.record, args.json)
        print(f"poolq: {exc}; it goes on", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    except (ApiError, OSError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return _interrupted(args.submission_id)
    _show(record, args.json)
    if record.get("error_type") == "SCHEDULE_TIMEOUT":
        print(QUEUE_HINT, file=sys.stderr)
    return exit_status(record)


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
    """The job's output as is; with --json an object ``{"logs", "offset"}`` (one per chunk
    with --follow), where ``offset`` is what ``?offset=`` takes to read on."""
    client = _client(args)

    def write(text: str, offset: int) -> None:
        _write(json.dumps({"logs": text, "offset": offset}) + "\n" if args.json else text)

    try:
        if args.follow:
            client.follow(args.submission_id, write)
        else:
            write(*client.logs(args.submission_id))
    except (ApiError, OSError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """A line per change (time, id, status, node, cursor), or with --json the change as an
    object, until interrupted; exits 1 with what to do once behind what the feed keeps."""
    try:
        for change in _client(args).watch(args.since):
            if args.json:
                _write(json.dumps(change) + "\n")
            else:
                when = time.strftime("%H:%M:%S", time.localtime(change["time"] / 1000))
                node = change["node"] or "-"
                _write(f"{when}  {change['submission_id']}  {change['status']}  {node}  {change['cursor']}\n")
    except (ApiError, OSError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """A page of jobs (saying on stderr when there are more), or with --all every page."""
    client = _client(args)
    limit = args.limit or (LIST_PAGE if args.all else 50)
    shown: list[dict[str, Any]] = []
    more = False
    try:
        if args.all:
            for page in client.all_jobs(status=args.status, page=limit, array=args.array):
                shown += page
                if not args.json:
                    _rows(page, header=len(shown) == len(page))
        else:
            shown, cursor = client.jobs(status=args.status, limit=limit, array=args.array)
            more = cursor is not None
            if not args.json:
                _rows(shown, header=True)
    except (ApiError, OSError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(shown))
    if more:
        print(f"poolq: more jobs than these {len(shown)}: --all lists them all", file=sys.stderr)
    return 0


def _rows(records: list[dict[str, Any]], *, header: bool) -> None:
    if header:
        print(f"{'SUBMISSION ID':<44} {'STATUS':<10} {'PRIO':>5} {'GANG':<16} {'ARRAY':<24} {'NODE':<16} ENTRYPOINT")
    for record in records:
        print(
            f"{record['submission_id']:<44} {record['status']:<10} {record.get('priority', 0):>5} "
            f"{record.get('gang_id') or '-':<16} {_array_column(record):<24} {record['driver_node_id'] or '-':<16} "
            f"{record['entrypoint'][:60]}"
        )


def _array_column(record: dict[str, Any]) -> str:
    """A task's array and index, an array's count of tasks, or ``-``."""
    if record.get("array_id"):
        return f"{record['array_id']}[{record['array_index']}]"
    if record.get("array"):
        return f"{record['array']['count']} tasks"
    return "-"
