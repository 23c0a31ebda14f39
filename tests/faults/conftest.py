"""Fixtures of the fault-tolerance suite.

Each test gets its own redis-server (append-only, ``appendfsync everysec``, as
``poolq up`` runs it, unless the test module sets ``REDIS_APPENDFSYNC``), so that
messages left behind by processes a test killed never reach another test, and so that
the Redis-restart scenario can stop and replay it. Processes are started as real
subprocesses and stopped (or killed) after the test.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from poolq.client import ApiError, Client
from poolq.embedded import EmbeddedRedis, free_port
from tests.kit import START_S, wait_ready
from tests.procs import Proc, Process, wait_for
from tests.wsgi import call

ROOT = Path(__file__).resolve().parents[2]  # /work/main: `tests` imports from here
PLACEMENT_DEADLINE_MS = 600_000  # jobs are never failed for waiting: a busy machine places late

# Settings of every process of a scenario: fast duties, a short claim lease (the sweep
# recovers a dead worker's claims in seconds), short drain and stop grace.
FAULT_ENV = {
    "POOLQ_DUTY_INTERVAL_S": "0.1",
    "POOLQ_CLAIM_LEASE_S": "2",
    "POOLQ_NODE_TTL_S": "15",
    "POOLQ_HEARTBEAT_S": "0.5",
    "POOLQ_STOP_GRACE_S": "1",
    "POOLQ_DRAIN_S": "2",
}


class PyProc(Process):
    """``python -c <code>`` run from the project root (so ``tests.faults`` imports), for
    processes whose code a test changes before poolq starts (fault injection)."""

    def __init__(self, code: str, env: dict[str, str], log_path: Path):
        super().__init__([sys.executable, "-c", code], env, log_path, cwd=ROOT, name="python -c")
        self.code = code


def kill9(proc: Process) -> None:
    """kill -9 of that one process (not its group: a node agent's guardian must notice)."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.process is not None
    proc.process.wait(30)


class FsyncRedis(EmbeddedRedis):
    """An append-only redis-server whose ``appendfsync`` is ``everysec`` (as ``poolq up``
    runs it) or ``always`` (every acknowledged write on disk before its reply)."""

    def __init__(self, directory: Path, *, appendfsync: str = "everysec", **options: Any):
        super().__init__(directory, appendonly=True, **options)
        self.appendfsync = appendfsync

    def config(self) -> str:
        return super().config().replace("appendfsync everysec", f"appendfsync {self.appendfsync}")


class RestartableRedis(FsyncRedis):
    """The test's redis-server; ``restart()`` starts a new one on the same directory, port
    and password (it replays the append-only file), as an operator would."""

    def __init__(self, directory: Path, *, appendfsync: str = "everysec"):
        super().__init__(directory, appendfsync=appendfsync)
        self.successors: list[EmbeddedRedis] = []

    @property
    def live(self) -> EmbeddedRedis:
        """The server started last: the one running now, if any is."""
        return (self.successors or [self])[-1]

    def restart(self) -> EmbeddedRedis:
        server = FsyncRedis(self.directory, port=self.port, password=self.password, appendfsync=self.appendfsync)
        self.successors.append(server)
        server.start(timeout_s=60)
        return server

    def stop_all(self) -> None:
        for server in [self, *self.successors]:
            server.stop()


@pytest.fixture
def redis_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RestartableRedis]:
    """This test's own redis-server (overrides the session-wide one of tests/conftest.py).
    Every process the test starts depends on it, so it is stopped after all of them."""
    server = RestartableRedis(tmp_path / "redis", appendfsync=getattr(request.module, "REDIS_APPENDFSYNC", "everysec"))
    server.start()
    yield server
    server.stop_all()


@pytest.fixture
def restart_redis(redis_server: RestartableRedis) -> Callable[[], EmbeddedRedis]:
    """Start a new redis-server in place of the stopped one (same dir, port, password)."""
    return redis_server.restart


@pytest.fixture
def fault_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, **FAULT_ENV}


@pytest.fixture
def run_py(tmp_path: Path, fault_env: dict[str, str]) -> Iterator[Callable[..., PyProc]]:
    """Start ``python -c code`` with the scenario's environment; all stopped after the test."""
    started: list[PyProc] = []

    def start(code: str, env: dict[str, str] | None = None, name: str | None = None) -> PyProc:
        proc = PyProc(code, {**fault_env, **(env or {})}, tmp_path / f"{name or 'py'}-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def node_live(client: redis.Redis, node_id: str) -> bool:
    fields = client.hmget(f"poolq:node:{node_id}", ["state", "drained"])
    return fields[0] == "live" and fields[1] != "1"


@pytest.fixture
def stack(start_proc: Callable[..., Proc], fault_env: dict[str, str], redis_client: redis.Redis) -> "Stack":
    return Stack(start_proc, fault_env, redis_client)


class Stack:
    """Placement workers and node agents of one scenario, as ``poolq`` subprocesses."""

    def __init__(self, start_proc: Callable[..., Proc], env: dict[str, str], client: redis.Redis):
        self.start_proc, self.env, self.redis = start_proc, env, client
        self.count = 0

    def worker(self, *, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        self.count += 1
        proc = self.start_proc(["worker"], env={**self.env, **(env or {})}, name=f"worker-{self.count}")
        if wait:
            wait_ready(proc, f"placement worker {self.count}")
        return proc

    def agent(self, node_id: str, *, cpus: str = "32", memory: str = "64Gi", env: dict[str, str] | None = None,
              wait: bool = True) -> Proc:
        self.count += 1
        proc = self.start_proc(["node", "--id", node_id, "--cpus", cpus, "--memory", memory],
                               env={**self.env, **(env or {})}, name=f"node-{node_id}-{self.count}")
        if wait:
            self.wait_agent(proc, node_id)
        return proc

    def wait_agent(self, proc: Proc, node_id: str) -> None:
        wait_for(lambda: node_live(self.redis, node_id) or not proc.alive(), START_S, 0.1, what=f"node {node_id} to register")
        wait_ready(proc, f"node agent {node_id}")

    def api(self, *, env: dict[str, str] | None = None) -> tuple[Proc, str]:
        """``poolq api`` with one server process on a free loopback port; returns it and its
        URL once it answers."""
        self.count += 1
        port = free_port()
        proc = self.start_proc(["api", "--port", str(port), "--workers", "1"], env={**self.env, **(env or {})},
                               name=f"api-{self.count}")
        server = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(server) or not proc.alive(), START_S, 0.2, what=f"the API on port {port} to answer")
        assert proc.alive(), f"poolq api exited:\n{proc.output()[-3000:]}"
        return proc, server


def healthy(server: str) -> bool:
    try:
        return Client(server, timeout=5).request("GET", "/livez")[0] == 200
    except (OSError, ApiError):
        return False


class Jobs:
    """Job bodies whose entrypoint appends the job's POOLQ_SUBMISSION_ID to one shared
    file, so that a test can count how many times each job ran."""

    def __init__(self, tmp_path: Path):
        self.workdir = tmp_path / "work"
        self.workdir.mkdir(exist_ok=True)
        self.runs_file = tmp_path / "runs.txt"
        self.runs_file.touch()
        self.prefix = "app-f" + uuid.uuid4().hex[:8]
        self.n = 0

    def body(self, *, sleep_s: float = 0.0, extra: str = "", **fields: Any) -> dict[str, Any]:
        self.n += 1
        command = f'echo "$POOLQ_SUBMISSION_ID" >> {self.runs_file}'
        if sleep_s:
            command += f"; sleep {sleep_s}"
        if extra:
            command += f"; {extra}"
        return {
            "entrypoint": command,
            "runtime_env": {"working_dir": str(self.workdir)},
            "submission_id": f"{self.prefix}-{self.n}",
            "entrypoint_num_cpus": 0.5,
            "entrypoint_memory": 134217728,
            **fields,
        }


    def timed_body(self, *, sleep_s: float, exit_code: int = 0, **fields: Any) -> dict[str, Any]:
        """A body whose entrypoint appends ``start ID PPID NS`` and, when it ends (on SIGTERM
        too), ``end ID PPID NS`` to the runs file: when each run ran (date +%s%N), under which
        node agent ($PPID, the agent that started it). A SIGKILL leaves no end line."""
        self.n += 1
        start, end = self._log_line("start"), self._log_line("end")
        command = f"trap '{end}; exit 143' TERM; {start}; sleep {sleep_s:.3f}; {end}; exit {exit_code}"
        return {
            "entrypoint": command,
            "runtime_env": {"working_dir": str(self.workdir)},
            "submission_id": f"{self.prefix}-{self.n}",
            "entrypoint_num_cpus": 1,
            "entrypoint_memory": 134217728,
            **fields,
        }

    def _log_line(self, word: str) -> str:
        return f'echo "{word} $POOLQ_SUBMISSION_ID $PPID $(date +%s%N)" >> {self.runs_file}'


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    return Jobs(tmp_path)


def submit_batch(app: Any, bodies: list[dict[str, Any]], timeout_ms: int = PLACEMENT_DEADLINE_MS) -> list[str]:
    """POST /api/jobs/batch (the real WSGI app, in-process, on the real Redis); returns the
    ids the answer accepted."""
    result = call(app, "POST", "/api/jobs/batch", {"jobs": bodies}, headers={"X-Schedule-Timeout-Ms": str(timeout_ms)})
    assert result.status == 200, result.body
    accepted = []
    for body, item in zip(bodies, result.json["results"]):
        assert item.get("submission_id") == body["submission_id"], item
        accepted.append(item["submission_id"])
    return accepted


def statuses(client: redis.Redis, ids: list[str], tenant: str = "default") -> list[tuple[str | None, str | None]]:
    pipe = client.pipeline(transaction=False)
    for submission_id in ids:
        pipe.hmget(f"poolq:job:{tenant}:{submission_id}", ["status", "node"])
    return [tuple(x) for x in pipe.execute()]  # type: ignore[misc]


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def sleep_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Like wait_for, but returns False instead of failing (for "at most this long" waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Burst:
    """Submit many jobs from a background thread, in small batches, while the test does
    harm to the processes; records every id the answer accepted."""

    def __init__(self, app: Any, bodies: list[dict[str, Any]], *, batch: int = 20, pause_s: float = 0.02):
        self.app, self.bodies, self.batch, self.pause_s = app, bodies, batch, pause_s
        self.accepted: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="burst", daemon=True)

    def start(self) -> "Burst":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for start in range(0, len(self.bodies), self.batch):
                self.accepted += submit_batch(self.app, self.bodies[start:start + self.batch])
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def wait_accepted(self, count: int, timeout: float = 120.0) -> None:
        wait_for(lambda: len(self.accepted) >= count or not self.thread.is_alive(), timeout, 0.01,
                 what=f"{count} submissions to be accepted")
        assert self.error is None, f"the burst failed: {self.error!r}"

    def join(self, timeout: float = 180.0) -> list[str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the burst did not finish"
        assert self.error is None, f"the burst failed: {self.error!r}"
        return list(self.accepted)


def lingering_job_processes(marker: str) -> list[str]:
    """Live processes whose command line holds ``marker`` (a path only the test's jobs
    use): what would be left of jobs whose agent died without killing them."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and state not in ("Z", "X"):
            found.append(f"{entry}: {cmdline[:200]}")
    return found
