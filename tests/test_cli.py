"""The client commands (``poolq submit|status|wait|logs|list|stop|delete``) against a live stack.

One stack serves the whole module: a real ``poolq api`` (HTTP on a free port), a node
agent ``cli-n1`` (4 CPUs, 4 GiB), and placement in the test's process (a placement
worker's scheduler and duties, tests/kit.py). It uses its own Redis
database on the session's redis-server, so the per-test key cleanup of other modules
never pulls its node out from under it; each test works in a tenant of its own. The CLI
runs as ``python -m poolq`` subprocesses, as a user would run it. Every deadline is
functional, with a generous margin: other suites share the two cores.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from poolq.client import Client
from poolq.embedded import EmbeddedRedis, free_port
from poolq.settings import Settings
from tests.conftest import _delete_poolq_keys
from tests.kit import JOB, SETTLE_S, TERMINAL_STATUSES, Placement
from tests.procs import Proc, wait_for

# The CLI runs as `python -m poolq`, against a real `poolq api` and node agent; the module's
# stack is started once per xdist worker, so its tests share one (`--dist loadgroup`).
pytestmark = [pytest.mark.processes, pytest.mark.xdist_group("cli-stack")]

GENERATED_ID = re.compile(r"^app-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="next"')
NODE_ID = "cli-n1"
NODE_CPUS = 4
# Jobs that must never run: a pool label no node has, and no scheduling deadline.
NEVER_PLACED = ["--label", "nowhere", "--timeout-ms", "0"]


@dataclasses.dataclass
class Stack:
    port: int
    env: dict[str, str]  # POOLQ_* for the CLI processes
    procs: list[Proc]
    placement: Placement

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_alive(self) -> None:
        for proc in self.procs:
            assert proc.alive(), f"poolq {proc.args[0]} exited:\n{proc.output()[-3000:]}"
        assert not self.placement.errors, f"placement raised: {self.placement.errors!r}"


def http_request(port: int, method: str, path: str, tenant: str | None = None) -> tuple[int, dict[str, str], Any]:
    """One request to the live API (to check what the CLI did): status, headers, JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers={"X-Tenant-Id": tenant} if tenant else {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, (json.loads(raw) if raw else None)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("cli-stack")
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url, decode_responses=True)
    _delete_poolq_keys(client)
    client.close()
    env = {
        "POOLQ_REDIS_URL": url,
        "POOLQ_DATA_DIR": str(base / "data"),
        "POOLQ_DUTY_INTERVAL_S": "0.1",
        "POOLQ_STOP_GRACE_S": "2",
        "POOLQ_DRAIN_S": "1",
    }
    port = free_port()
    procs: list[Proc] = []
    placement = Placement(Settings.from_env(env)).start()
    try:
        for name, args in (
            ("api", ["api", "--port", str(port), "--workers", "1"]),
            ("node", ["node", "--id", NODE_ID, "--cpus", str(NODE_CPUS), "--memory", "4Gi"]),
        ):
            procs.append(Proc(args, env, base / f"{name}.log").start())
        stack = Stack(port, env, procs, placement)

        def node_live() -> bool:
            stack.check_alive()
            try:
                status, _, nodes = http_request(port, "GET", "/api/nodes")
            except OSError:
                return False
            return status == 200 and any(n["node_id"] == NODE_ID and n["alive"] for n in nodes)

        wait_for(node_live, SETTLE_S, interval=0.2, what="the API to answer and the node agent to register")
        yield stack
    finally:
        for proc in reversed(procs):
            proc.stop()
        placement.stop()
        client = redis.Redis.from_url(url, decode_responses=True)
        _delete_poolq_keys(client)  # the thousands of jobs the file tests left waiting
        client.close()


@pytest.fixture
def tenant(stack: Stack) -> str:
    """A tenant of the test's own, so that listings see only this test's jobs."""
    stack.check_alive()
    return f"cli-{uuid.uuid4().hex[:12]}"


def cli_argv(stack: Stack, command: str, *args: str, tenant: str | None = None, server: str | None = None) -> list[str]:
    """``python -m poolq <command> --server … [--tenant …] <args>``."""
    argv = [sys.executable, "-m", "poolq", command, "--server", server or stack.server]
    if tenant is not None:
        argv += ["--tenant", tenant]
    return [*argv, *args]


def cli_env(stack: Stack) -> dict[str, str]:
    """The caller's environment without its own POOLQ_* settings, plus the stack's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}, **stack.env}


def poolq(stack: Stack, command: str, *args: str, tenant: str | None = None, cwd: Path | None = None,
          server: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a CLI command to its end (with ``stdin`` as its standard input, else none)."""
    return subprocess.run(cli_argv(stack, command, *args, tenant=tenant, server=server), cwd=cwd, env=cli_env(stack),
                          capture_output=True, text=True, timeout=SETTLE_S * 2,
                          **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}))


def start_cli(stack: Stack, command: str, *args: str, tenant: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start a CLI command that runs on (``wait``, ``logs --follow``) without waiting for it."""
    return subprocess.Popen(cli_argv(stack, command, *args, tenant=tenant), cwd=cwd, env=cli_env(stack),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def submitted_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    submission_id = result.stdout.strip()
    assert re.fullmatch(r"app-[a-z0-9-]{1,60}", submission_id), result.stdout
    return submission_id


def job(stack: Stack, submission_id: str, tenant: str) -> dict[str, Any]:
    status, _, record = http_request(stack.port, "GET", f"/api/jobs/{submission_id}", tenant)
    assert status == 200, record
    return dict(record)


def wait_status(stack: Stack, submission_id: str, tenant: str, *statuses: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        stack.check_alive()
        seen.update(job(stack, submission_id, tenant))
        if seen["status"] in TERMINAL_STATUSES and seen["status"] not in statuses:
            raise AssertionError(f"job {submission_id} ended {seen['status']} ({seen['message']}), wanted {statuses}")
        return seen["status"] in statuses

    wait_for(reached, SETTLE_S, interval=0.1, what=f"job {submission_id} to be {'/'.join(statuses)}")
    return seen


def logs(stack: Stack, submission_id: str, tenant: str) -> str:
    status, _, answer = http_request(stack.port, "GET", f"/api/jobs/{submission_id}/logs", tenant)
    assert status == 200, answer
    return str(answer["logs"])


def all_jobs(stack: Stack, tenant: str) -> list[dict[str, Any]]:
    """Every job of the tenant, newest first, following the Link header."""
    records: list[dict[str, Any]] = []
    path: str | None = "/api/jobs?limit=1000"
    while path is not None:
        status, headers, page = http_request(stack.port, "GET", path, tenant)
        assert status == 200, page
        records += page
        link = NEXT_LINK.search(headers.get("link", ""))
        path = link.group(1) if link else None
    return records


def gated(command: str) -> str:
    """Shell: wait (at most a minute) for the file ``go`` in the working directory, then run ``command``."""
    return f"i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; {command}"


def never_placed(stack: Stack, tenant: str, cwd: Path) -> str:
    """A job that stays PENDING until stopped: it asks for more CPUs than the node has."""
    return submitted_id(poolq(stack, "submit", "--cpus", str(NODE_CPUS * 4), "--timeout-ms", "0", "--", "true",
                              tenant=tenant, cwd=cwd))


# -- submit ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_submit_prints_the_id_and_the_job_runs_in_the_current_directory(stack: Stack, tenant: str, tmp_path: Path,
                                                                        as_json: bool) -> None:
    result = poolq(stack, "submit", *(["--json"] if as_json else []), "--", "echo", "hi", tenant=tenant, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if as_json:
        answer = json.loads(result.stdout)
        assert set(answer) == {"submission_id"}
        submission_id = answer["submission_id"]
    else:
        submission_id = result.stdout.strip()
    assert GENERATED_ID.match(submission_id), result.stdout

    record = wait_status(stack, submission_id, tenant, "SUCCEEDED")
    assert record["entrypoint"] == "echo hi"
    assert record["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert record["tenant_id"] == tenant
    assert logs(stack, submission_id, tenant) == "hi\n"


def test_submit_options_become_the_job_request(stack: Stack, tenant: str, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    result = poolq(stack, "submit", "--id", "opts-1", "--working-dir", str(workdir), "--env", "GREETING=hello there",
                   "--cpus", "0.5", "--memory", "256Mi", "--wait", "--json", "--", "sh", "-c", 'echo "$GREETING"; pwd',
                   tenant=tenant, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    record = json.loads(result.stdout)
    assert record["submission_id"] == "app-opts-1" and record["status"] == "SUCCEEDED"
    assert record["entrypoint_num_cpus"] == 0.5 and record["entrypoint_memory"] == 256 * 1024 * 1024
    assert record["runtime_env"]["env_vars"] == {"GREETING": "hello there"}
    assert logs(stack, "app-opts-1", tenant) == f"hello there\n{workdir.resolve()}\n"


@pytest.mark.parametrize(
    ("script", "exit_code", "status", "driver_exit_code"),
    [("echo fine", 0, "SUCCEEDED", 0), ("echo bad; false", 1, "FAILED", 1), ("echo three; exit 3", 3, "FAILED", 3),
     ("echo killed; kill -9 $$", 128 + 9, "FAILED", -9)],
    ids=["succeeds", "false", "exit-3", "signal-9"],
)
def test_submit_wait_prints_the_output_and_exits_with_the_jobs_exit_status(
        stack: Stack, tenant: str, tmp_path: Path, script: str, exit_code: int, status: str,
        driver_exit_code: int) -> None:
    # One argument: the entrypoint itself, run by the node's /bin/sh -c (so $$ is the job's shell).
    text = poolq(stack, "submit", "--wait", "--", script, tenant=tenant, cwd=tmp_path)
    assert text.returncode == exit_code, (text.stdout, text.stderr)
    assert text.stdout == script.split(";")[0].removeprefix("echo ") + "\n"  # the job's output, and only it
    ended = re.search(r"^(app-[0-9a-f-]{36}): (\w+)", text.stderr, re.M)
    assert ended and ended.group(2) == status, text.stderr
    assert job(stack, ended.group(1), tenant)["driver_exit_code"] == driver_exit_code
    if driver_exit_code:
        assert f"(exit code {driver_exit_code})" in text.stderr

    as_json = poolq(stack, "submit", "--wait", "--json", "--", script, tenant=tenant, cwd=tmp_path)
    assert as_json.returncode == exit_code, as_json.stderr
    record = json.loads(as_json.stdout)  # the final record, and no output
    assert (record["status"], record["driver_exit_code"]) == (status, driver_exit_code)


def test_submit_wait_streams_the_output_as_it_is_written(stack: Stack, tenant: str, tmp_path: Path) -> None:
    script = "echo start; " + gated("for i in 1 2 3; do echo line $i; sleep 0.2; done")
    printed: list[str] = []
    with start_cli(stack, "submit", "--wait", "--id", "stream-1", "--", "sh", "-c", script, tenant=tenant,
                   cwd=tmp_path) as proc:
        reader = threading.Thread(target=lambda: printed.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        wait_for(lambda: printed or proc.poll() is not None, SETTLE_S, what="the job's first line")
        assert printed == ["start\n"], (printed, proc.poll())
        assert job(stack, "app-stream-1", tenant)["status"] == "RUNNING"  # printed while it runs
        (tmp_path / "go").touch()
        proc.wait(SETTLE_S)
        reader.join(10)
        stderr = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.returncode == 0, stderr
    assert "".join(printed) == "start\nline 1\nline 2\nline 3\n"
    assert "app-stream-1: SUCCEEDED" in stderr


def test_submit_wait_on_a_stopped_job_exits_125(stack: Stack, tenant: str, tmp_path: Path) -> None:
    with start_cli(stack, "submit", "--wait", "--id", "stopped-1", "--", "sleep", "60", tenant=tenant,
                   cwd=tmp_path) as proc:
        wait_for(lambda: http_request(stack.port, "GET", "/api/jobs/app-stopped-1", tenant)[0] == 200, SETTLE_S,
                 what="the CLI to submit the job")
        wait_status(stack, "app-stopped-1", tenant, "RUNNING")
        assert poolq(stack, "stop", "app-stopped-1", tenant=tenant).returncode == 0
        stdout, stderr = proc.communicate(timeout=SETTLE_S)
    assert proc.returncode == 125, (stdout, stderr)
    assert "app-stopped-1: STOPPED" in stderr


def test_submit_wait_on_a_schedule_timeout_exits_1_explaining_queueing(stack: Stack, tenant: str,
                                                                       tmp_path: Path) -> None:
    too_big = ["--cpus", str(NODE_CPUS * 4), "--schedule-timeout-ms", "300"]
    result = poolq(stack, "submit", "--wait", *too_big, "--", "true", tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "cannot be scheduled within 300 ms" in result.stderr  # the job's message
    assert "--schedule-timeout-ms 0" in result.stderr and "Traceback" not in result.stderr

    as_json = poolq(stack, "submit", "--wait", "--json", *too_big, "--", "true", tenant=tenant, cwd=tmp_path)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error_type"] == "SCHEDULE_TIMEOUT"


def test_submit_refused_by_the_api_exits_1_naming_the_field(stack: Stack, tenant: str, tmp_path: Path) -> None:
    result = poolq(stack, "submit", "--cpus", "99", "--", "true", tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # one line, each field named in it
    assert "; entrypoint_num_cpus: must be between" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert all_jobs(stack, tenant) == []


@pytest.mark.parametrize(("option", "says"), [
    (["--cpus", "nan"], "argument --cpus: must be a finite number, not nan"),
    (["--timeout", "1e999"], "argument --timeout/--runtime-limit: must be a finite number, not 1e999"),
    (["--retries", "-1"], "argument --retries: must be a whole number from 0 to 99, not -1"),
    (["--env", "NOEQ"], "argument --env: takes NAME=VALUE, not NOEQ"),
])
def test_a_bad_option_is_refused_naming_it_before_anything_is_sent(stack: Stack, tenant: str, tmp_path: Path,
                                                                   option: list[str], says: str) -> None:
    result = poolq(stack, "submit", *option, "--", "true", tenant=tenant, cwd=tmp_path)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert all_jobs(stack, tenant) == []


def test_submit_without_a_command_exits_1(stack: Stack, tenant: str, tmp_path: Path) -> None:
    result = poolq(stack, "submit", tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1 and "--" in result.stderr and "Traceback" not in result.stderr
    assert all_jobs(stack, tenant) == []


# -- status and wait ---------------------------------------------------------------------


def test_status_shows_the_status_and_message(stack: Stack, tenant: str, tmp_path: Path) -> None:
    submission_id = never_placed(stack, tenant, tmp_path)
    text = poolq(stack, "status", submission_id, tenant=tenant)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{submission_id}: PENDING"
    assert len(lines) >= 2 and lines[1]  # the record's message, a sentence

    as_json = poolq(stack, "status", "--json", submission_id, tenant=tenant)
    assert as_json.returncode == 0, as_json.stderr
    record = json.loads(as_json.stdout)
    assert (record["submission_id"], record["status"], record["tenant_id"]) == (submission_id, "PENDING", tenant)

    # Named without its app-, as `submit --id` takes it.
    short = poolq(stack, "status", submission_id.removeprefix("app-"), tenant=tenant)
    assert short.returncode == 0 and short.stdout.startswith(f"{submission_id}: PENDING"), short.stderr

    # Another tenant does not see it.
    foreign = poolq(stack, "status", submission_id, tenant=f"{tenant}-other")
    assert foreign.returncode == 1 and "not found" in foreign.stderr
    poolq(stack, "stop", submission_id, tenant=tenant)


@pytest.mark.parametrize("command", ["status", "wait", "logs", "stop", "delete"])
def test_an_unknown_id_exits_1_with_the_apis_error(stack: Stack, tenant: str, command: str) -> None:
    result = poolq(stack, command, "app-no-such-job", tenant=tenant)
    assert result.returncode == 1
    assert "not found app, submissionId: app-no-such-job" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("entrypoint", "exit_code", "status"),
                         [("true", 0, "SUCCEEDED"), ("false", 1, "FAILED"), ("exit 3", 3, "FAILED")])
def test_wait_exits_with_the_jobs_exit_status(stack: Stack, tenant: str, tmp_path: Path, entrypoint: str,
                                              exit_code: int, status: str) -> None:
    submission_id = submitted_id(poolq(stack, "submit", "--", "sh", "-c", gated(entrypoint), tenant=tenant, cwd=tmp_path))
    # Started before the job can end (it waits for `go`), so that `poolq wait` really waits.
    with start_cli(stack, "wait", submission_id, tenant=tenant) as proc:
        wait_status(stack, submission_id, tenant, "RUNNING")
        assert proc.poll() is None, "poolq wait returned while the job was still running"
        (tmp_path / "go").touch()
        stdout, stderr = proc.communicate(timeout=SETTLE_S)
    assert proc.returncode == exit_code, (stdout, stderr)
    assert stdout.splitlines()[0] == f"{submission_id}: {status}"

    as_json = poolq(stack, "wait", "--json", submission_id, tenant=tenant)
    assert as_json.returncode == exit_code
    assert json.loads(as_json.stdout)["status"] == status


def test_wait_timeout_exits_124_and_the_job_goes_on(stack: Stack, tenant: str, tmp_path: Path) -> None:
    submission_id = never_placed(stack, tenant, tmp_path)
    result = poolq(stack, "wait", "--timeout", "0.5", submission_id, tenant=tenant)
    assert result.returncode == 124, (result.stdout, result.stderr)
    assert result.stdout.splitlines()[0] == f"{submission_id}: PENDING"
    assert f"{submission_id} is still PENDING after 0.5 s" in result.stderr
    as_json = poolq(stack, "wait", "--timeout", "0", "--json", submission_id, tenant=tenant)
    assert as_json.returncode == 124 and json.loads(as_json.stdout)["status"] == "PENDING"
    assert job(stack, submission_id, tenant)["status"] == "PENDING"

    assert poolq(stack, "stop", submission_id, tenant=tenant).returncode == 0
    stopped = poolq(stack, "wait", "--timeout", "60", submission_id, tenant=tenant)
    assert stopped.returncode == 125, stopped.stderr
    assert stopped.stdout.splitlines()[0] == f"{submission_id}: STOPPED"


# -- logs -------------------------------------------------------------------------------


def test_logs_prints_the_jobs_output(stack: Stack, tenant: str, tmp_path: Path) -> None:
    submission_id = submitted_id(poolq(stack, "submit", "--", "sh", "-c", "echo out; echo err >&2; printf 'no newline'",
                                       tenant=tenant, cwd=tmp_path))
    wait_status(stack, submission_id, tenant, "SUCCEEDED")
    result = poolq(stack, "logs", submission_id, tenant=tenant)
    assert result.returncode == 0, result.stderr
    assert result.stdout == logs(stack, submission_id, tenant)  # printed as is, no newline added
    # stdout and stderr are two pipes: their relative order is not fixed, their content is.
    assert all(part in result.stdout for part in ("out\n", "err\n", "no newline"))
    assert len(result.stdout) == len("out\nerr\nno newline")


def test_logs_json_gives_the_output_and_the_offset_to_read_on(stack: Stack, tenant: str, tmp_path: Path) -> None:
    script = "echo one; " + gated("echo two")
    submission_id = submitted_id(poolq(stack, "submit", "--", "sh", "-c", script, tenant=tenant, cwd=tmp_path))
    wait_for(lambda: logs(stack, submission_id, tenant) == "one\n", SETTLE_S, what="the first line")
    first = poolq(stack, "logs", "--json", submission_id, tenant=tenant)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"logs": "one\n", "offset": 4}

    with start_cli(stack, "logs", "--follow", "--json", submission_id, tenant=tenant) as follower:
        (tmp_path / "go").touch()
        stdout, stderr = follower.communicate(timeout=SETTLE_S)
    assert follower.returncode == 0, stderr
    chunks = [json.loads(line) for line in stdout.splitlines()]  # one object per chunk
    assert "".join(c["logs"] for c in chunks) == "one\ntwo\n"
    assert chunks[-1]["offset"] == len("one\ntwo\n")


def test_logs_follow_prints_output_as_it_comes_and_exits_when_the_job_ends(stack: Stack, tenant: str,
                                                                          tmp_path: Path) -> None:
    script = "echo start; " + gated("for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done")
    submission_id = submitted_id(poolq(stack, "submit", "--", "sh", "-c", script, tenant=tenant, cwd=tmp_path))
    printed: list[str] = []
    with start_cli(stack, "logs", "--follow", submission_id, tenant=tenant) as follower:
        reader = threading.Thread(target=lambda: printed.extend(iter(follower.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        # The first line arrives while the job is still running (it waits for `go`).
        wait_for(lambda: printed[:1] == ["start\n"] or follower.poll() is not None, SETTLE_S, what="the first line")
        assert printed[:1] == ["start\n"], (printed, follower.poll())
        assert job(stack, submission_id, tenant)["status"] == "RUNNING"
        assert follower.poll() is None, "logs --follow ended while the job was running"
        (tmp_path / "go").touch()
        follower.wait(SETTLE_S)
        reader.join(10)
        stderr = follower.stderr.read()  # type: ignore[union-attr]
    assert follower.returncode == 0, stderr
    assert "".join(printed) == "start\n" + "".join(f"line {i}\n" for i in range(1, 6))
    assert job(stack, submission_id, tenant)["status"] == "SUCCEEDED"


def test_watch_prints_each_change_of_the_tenants_jobs_as_it_comes(stack: Stack, tenant: str, tmp_path: Path) -> None:
    printed: list[str] = []
    with start_cli(stack, "watch", "--json", "--since", "0-0", tenant=tenant) as watcher:
        reader = threading.Thread(target=lambda: printed.extend(iter(watcher.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        submission_id = submitted_id(poolq(stack, "submit", "--", "true", tenant=tenant, cwd=tmp_path))
        wait_for(lambda: any('"SUCCEEDED"' in line for line in printed) or watcher.poll() is not None, SETTLE_S,
                 what="watch to print the job's end")
        assert watcher.poll() is None, watcher.stderr.read()  # type: ignore[union-attr]
        watcher.terminate()
    changes = [json.loads(line) for line in printed]
    assert {c["submission_id"] for c in changes} == {submission_id}
    assert [c["status"] for c in changes] == ["PENDING", "PENDING", "RUNNING", "SUCCEEDED"]
    assert [c["node"] for c in changes] == [None, NODE_ID, NODE_ID, NODE_ID]


def test_the_client_iterates_over_the_change_feed(stack: Stack, tenant: str) -> None:
    client = Client(stack.server, tenant=tenant)
    changes, position = client.changes()
    assert changes == [] and position == "0-0"
    feed = client.watch(wait_s=5)
    first = client.submit(JOB, pool_label="nowhere", timeout_ms=0)
    next_change = next(feed)
    assert (next_change["submission_id"], next_change["status"]) == (first, "PENDING")
    resumed = client.watch(next_change["cursor"], wait_s=1)
    second = client.submit(JOB, pool_label="nowhere", timeout_ms=0)
    assert next(resumed)["submission_id"] == second, "a watch resumed from a change's cursor reads on from it"
    client.stop(first)
    client.stop(second)


# -- list, stop, delete ------------------------------------------------------------------


def test_list_filters_by_status(stack: Stack, tenant: str, tmp_path: Path) -> None:
    succeeded = poolq(stack, "submit", "--wait", "--json", "--", "true", tenant=tenant, cwd=tmp_path)
    failed = poolq(stack, "submit", "--wait", "--json", "--", "false", tenant=tenant, cwd=tmp_path)
    ids = {"SUCCEEDED": json.loads(succeeded.stdout)["submission_id"], "FAILED": json.loads(failed.stdout)["submission_id"]}
    ids["STOPPED"] = never_placed(stack, tenant, tmp_path)
    assert poolq(stack, "stop", ids["STOPPED"], tenant=tenant).returncode == 0
    ids["PENDING"] = never_placed(stack, tenant, tmp_path)

    for status, submission_id in ids.items():
        result = poolq(stack, "list", "--status", status, "--json", tenant=tenant)
        assert result.returncode == 0, result.stderr
        assert [r["submission_id"] for r in json.loads(result.stdout)] == [submission_id], status
    running = poolq(stack, "list", "--status", "RUNNING", "--json", tenant=tenant)
    assert json.loads(running.stdout) == []

    table = poolq(stack, "list", tenant=tenant)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]  # under a header line
    assert [row.split()[:2] for row in rows] == [[ids[s], s] for s in ("PENDING", "STOPPED", "FAILED", "SUCCEEDED")]
    poolq(stack, "stop", ids["PENDING"], tenant=tenant)


def test_list_says_when_there_are_more_pages_and_all_follows_them(stack: Stack, tenant: str, tmp_path: Path) -> None:
    ids = [never_placed(stack, tenant, tmp_path) for _ in range(5)][::-1]  # newest first
    page = poolq(stack, "list", "--limit", "2", tenant=tenant)
    assert page.returncode == 0, page.stderr
    assert [row.split()[0] for row in page.stdout.splitlines()[1:]] == ids[:2]
    assert "--all" in page.stderr and "Traceback" not in page.stderr

    every = poolq(stack, "list", "--all", "--limit", "2", tenant=tenant)  # three pages of at most 2
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert lines[0].startswith("SUBMISSION ID") and [row.split()[0] for row in lines[1:]] == ids
    assert every.stderr == ""
    as_json = poolq(stack, "list", "--all", "--limit", "2", "--json", tenant=tenant)
    assert [r["submission_id"] for r in json.loads(as_json.stdout)] == ids

    whole = poolq(stack, "list", "--limit", "5", tenant=tenant)  # exactly one page: nothing more to say
    assert len(whole.stdout.splitlines()) == 6 and whole.stderr == ""
    for submission_id in ids:
        poolq(stack, "stop", submission_id, tenant=tenant)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_stop_a_running_job(stack: Stack, tenant: str, tmp_path: Path, as_json: bool) -> None:
    flags = ["--json"] if as_json else []
    submission_id = submitted_id(poolq(stack, "submit", "--", "sleep", "60", tenant=tenant, cwd=tmp_path))
    wait_status(stack, submission_id, tenant, "RUNNING")

    first = poolq(stack, "stop", *flags, submission_id, tenant=tenant)
    assert first.returncode == 0, first.stderr
    assert (json.loads(first.stdout) == {"stopped": True}) if as_json else (first.stdout.strip() == "stopping")
    record = wait_status(stack, submission_id, tenant, "STOPPED")
    assert record["error_type"] == "STOPPED_BY_USER"

    again = poolq(stack, "stop", *flags, submission_id, tenant=tenant)
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout) == {"stopped": False}) if as_json else (again.stdout.strip() == "already finished")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_delete_refuses_an_unfinished_job_and_removes_a_finished_one(stack: Stack, tenant: str, tmp_path: Path,
                                                                     as_json: bool) -> None:
    flags = ["--json"] if as_json else []
    submission_id = never_placed(stack, tenant, tmp_path)
    refused = poolq(stack, "delete", *flags, submission_id, tenant=tenant)
    assert refused.returncode == 1 and "409" in refused.stderr and "Traceback" not in refused.stderr
    assert job(stack, submission_id, tenant)["status"] == "PENDING"

    assert poolq(stack, "stop", submission_id, tenant=tenant).returncode == 0
    wait_status(stack, submission_id, tenant, "STOPPED")
    deleted = poolq(stack, "delete", *flags, submission_id, tenant=tenant)
    assert deleted.returncode == 0, deleted.stderr
    assert (json.loads(deleted.stdout) == {"deleted": True}) if as_json else (deleted.stdout.strip() == "deleted")
    assert http_request(stack.port, "GET", f"/api/jobs/{submission_id}", tenant)[0] == 404
    gone = poolq(stack, "status", submission_id, tenant=tenant)
    assert gone.returncode == 1 and "not found" in gone.stderr


# -- submit --file -----------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_submit_file_reports_refused_lines_and_accepts_the_rest(stack: Stack, tenant: str, tmp_path: Path,
                                                                as_json: bool) -> None:
    good = {"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)}}
    lines = [
        json.dumps(good),                                 # 1
        '{"entrypoint": "true", "runtime_env": ',         # 2: not JSON
        json.dumps({**good, "entrypoint": "echo 3"}),     # 3
        json.dumps({"entrypoint": "true"}),               # 4: no runtime_env
        "",                                               # 5: blank, skipped
        json.dumps({**good, "submission_id": "file-6"}),  # 6
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = poolq(stack, "submit", "--file", str(path), *NEVER_PLACED, *(["--json"] if as_json else []),
                   tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    stored = all_jobs(stack, tenant)
    assert sorted(r["entrypoint"] for r in stored) == ["echo 3", "true", "true"]
    by_entry = {r["submission_id"]: r["entrypoint"] for r in stored}
    if as_json:
        answers = [json.loads(line) for line in result.stdout.splitlines()]  # one per non-blank line, in order
        assert [a["line"] for a in answers] == [1, 2, 3, 4, 6]
        accepted = [a["submission_id"] for a in answers if "submission_id" in a]
        assert "not a JSON job body" in answers[1]["error"] and "runtime_env" in answers[3]["fields"]
        assert set(answers[1]) == {"line", "error"}
    else:
        accepted = result.stdout.splitlines()  # the accepted ids, one a line, in order
        refused = {int(m.group(1)): line for line in result.stderr.splitlines()
                   if (m := re.match(r"poolq: line (\d+):", line))}
        assert sorted(refused) == [2, 4]
        assert "runtime_env" in refused[4]
        assert "poolq: accepted 3, refused 2" in result.stderr
    assert [by_entry[i] for i in accepted] == ["true", "echo 3", "true"]
    assert accepted[2] == "app-file-6"


def test_submit_file_numbers_refused_lines_across_batches(stack: Stack, tenant: str, tmp_path: Path) -> None:
    good = json.dumps({"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)}})
    bad = json.dumps({"entrypoint": "", "runtime_env": {"working_dir": str(tmp_path)}})
    lines = [good] * 1200
    for number in (1, 1000, 1001, 1200):  # first and last line of each batch of 1,000
        lines[number - 1] = bad
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = poolq(stack, "submit", "--file", str(path), "--json", *NEVER_PLACED, tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == list(range(1, 1201))
    assert [a["line"] for a in answers if "error" in a] == [1, 1000, 1001, 1200]
    assert sum(1 for a in answers if "submission_id" in a) == 1196
    assert len(all_jobs(stack, tenant)) == 1196


def test_submit_file_refuses_a_line_that_is_not_utf8_and_sends_the_others(stack: Stack, tenant: str,
                                                                          tmp_path: Path) -> None:
    good = json.dumps({"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)}}).encode()
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(good + b"\n" + b'{"entrypoint": "caf\xe9"}\n' + good + b"\n")  # line 2: Latin-1, not UTF-8

    result = poolq(stack, "submit", "--file", str(path), "--json", *NEVER_PLACED, tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [("submission_id" in a, a["line"]) for a in answers] == [(True, 1), (False, 2), (True, 3)]
    assert "UTF-8" in answers[1]["error"]
    assert len(all_jobs(stack, tenant)) == 2


def test_submit_file_of_2500_lines_is_accepted_whole(stack: Stack, tenant: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"entrypoint": f"echo {i}", "runtime_env": {"working_dir": str(tmp_path)}}) + "\n"
                            for i in range(2500)))

    result = poolq(stack, "submit", "--file", str(path), *NEVER_PLACED, tenant=tenant, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "poolq: accepted 2500, refused 0" in result.stderr
    assert "SCHEDULE_TIMEOUT" not in result.stderr  # sent with no deadline: nothing to warn of

    stored = all_jobs(stack, tenant)
    assert len(stored) == len({r["submission_id"] for r in stored}) == 2500
    assert result.stdout.splitlines() == [r["submission_id"] for r in stored][::-1]  # in the order of the lines
    assert sorted(r["entrypoint"] for r in stored) == sorted(f"echo {i}" for i in range(2500))
    assert {r["pool_label"] for r in stored} == {"nowhere"}


def test_submit_file_reads_standard_input(stack: Stack, tenant: str, tmp_path: Path) -> None:
    lines = "".join(json.dumps({"entrypoint": f"echo {i}", "runtime_env": {"working_dir": str(tmp_path)}}) + "\n"
                    for i in range(3))
    result = poolq(stack, "submit", "--file", "-", "--json", *NEVER_PLACED, tenant=tenant, cwd=tmp_path, stdin=lines)
    assert result.returncode == 0, (result.stdout, result.stderr)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3]
    stored = {r["submission_id"]: r["entrypoint"] for r in all_jobs(stack, tenant)}
    assert [stored[a["submission_id"]] for a in answers] == ["echo 0", "echo 1", "echo 2"]


@pytest.mark.parametrize("source", ["empty-file", "blank-file", "empty-stdin"])
def test_submit_file_refuses_an_empty_input(stack: Stack, tenant: str, tmp_path: Path, source: str) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n  \n" if source == "blank-file" else "")
    given = "-" if source == "empty-stdin" else str(path)
    result = poolq(stack, "submit", "--file", given, tenant=tenant, cwd=tmp_path, stdin="" if given == "-" else None)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("poolq: no jobs in") and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_submit_file_explains_queueing_when_the_jobs_would_time_out(stack: Stack, tenant: str, tmp_path: Path) -> None:
    """More CPUs asked for than the nodes have free, with the default deadline: one line
    pointing at --schedule-timeout-ms 0. Not with a deadline of 0, nor when they fit."""
    one_cpu = json.dumps({"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)}})
    many = tmp_path / "many.jsonl"
    many.write_text((one_cpu + "\n") * (NODE_CPUS * 3))
    unplaceable = ["--label", "nowhere"]  # they must not run; they end SCHEDULE_TIMEOUT after 18 s

    warned = poolq(stack, "submit", "--file", str(many), *unplaceable, tenant=tenant, cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr
    hint = [line for line in warned.stderr.splitlines() if "SCHEDULE_TIMEOUT" in line]
    assert len(hint) == 1 and "--schedule-timeout-ms 0" in hint[0], warned.stderr
    assert f"ask for {NODE_CPUS * 3} CPUs" in hint[0] and "within 18 s" in hint[0]

    queued = poolq(stack, "submit", "--file", str(many), *unplaceable, "--schedule-timeout-ms", "0", tenant=tenant,
                   cwd=tmp_path)
    assert queued.returncode == 0 and "SCHEDULE_TIMEOUT" not in queued.stderr, queued.stderr

    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)},
                               "entrypoint_num_cpus": 0.5}) + "\n")
    fits = poolq(stack, "submit", "--file", str(few), *unplaceable, tenant=tenant, cwd=tmp_path)
    assert fits.returncode == 0 and "SCHEDULE_TIMEOUT" not in fits.stderr, fits.stderr

    # The tenant's own default of no deadline counts too.
    quota = subprocess.run([sys.executable, "-m", "poolq", "quota", "set", tenant, "--schedule-timeout-ms", "0"],
                           env=cli_env(stack), capture_output=True, text=True, timeout=SETTLE_S)
    assert quota.returncode == 0, quota.stderr
    by_default = poolq(stack, "submit", "--file", str(many), *unplaceable, tenant=tenant, cwd=tmp_path)
    assert by_default.returncode == 0 and "SCHEDULE_TIMEOUT" not in by_default.stderr, by_default.stderr


# -- the server ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status", "app-x"], ["list"], ["submit", "--", "true"]])
def test_an_unreachable_server_is_a_one_line_error(stack: Stack, tmp_path: Path, command: list[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    result = poolq(stack, *command, server=server, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"poolq: the API at {server} did not answer: Connection refused\n", result.stderr


def test_submit_file_takes_no_command(stack: Stack, tenant: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"entrypoint": "true", "runtime_env": {"working_dir": str(tmp_path)}}) + "\n")
    for extra in (["--", "echo", "hi"], ["--wait"]):
        result = poolq(stack, "submit", "--file", str(path), *extra, tenant=tenant, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.startswith("poolq: --file"), result.stderr
    assert all_jobs(stack, tenant) == []


def test_a_missing_jobs_file_is_a_one_line_error(stack: Stack, tenant: str, tmp_path: Path) -> None:
    result = poolq(stack, "submit", "--file", str(tmp_path / "missing.jsonl"), tenant=tenant, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("poolq: ") and "Traceback" not in result.stderr
    assert "missing.jsonl" in result.stderr


def test_the_client_recovers_from_a_server_that_was_not_listening_yet() -> None:
    """A refused first request must not spoil the next (http.client's CannotSendRequest)."""
    port = free_port()
    client = Client(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(OSError) as refused:
        client.request("GET", "/livez")
    assert f"the API at http://127.0.0.1:{port} did not answer" in str(refused.value)
    assert str(pickle.loads(pickle.dumps(refused.value))) == str(refused.value)  # e.g. across processes

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert client.request("GET", "/livez")[::2] == (200, {"ok": True})
    finally:
        server.shutdown()
        server.server_close()
