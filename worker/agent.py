"""The node agent (``poolq node``): run the jobs placed on this node.

A Celery worker on the node's own queue receives wake-ups; the agent loop starts
every job in the node's inbox, heartbeats, and watches running jobs for stop
requests. Each job runs in a thread of its own: prepare the runtime_env (the job
is still PENDING), mark it RUNNING, run the entrypoint with ``/bin/sh -c`` in a
new process group, capture its output, and end it through ``finish.lua``, which
releases its reservation exactly once.

How many jobs run at once is bounded by the node's capacity, which placement
reserves; the agent runs whatever placement put on it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery.signals import worker_shutting_down

from poolq import keys, queues
from poolq.errors import Unavailable
from poolq.model import ErrorType, JobFields, JobStatus, canonical_number, utf8_bounds
from poolq.nodes import parse_labels
from poolq.settings import Settings
from poolq.store import JobStore
from worker.inventory import NodeAdmin
from worker.runtime_env import RuntimeEnvs, SetupFailed, safe_dir

log = logging.getLogger("poolq.agent")

LOG_FLUSH_S = 0.2
LOG_FLUSH_BYTES = 64 * 1024
STDERR_TAIL = 2000  # characters of stderr quoted in a failed job's message
STRAGGLER_WAIT_S = 0.5  # after the entrypoint exits, how long to read output its children still write
# The agent's own POOLQ_* variables (the Redis URL, with its password) never reach jobs.
HIDDEN_ENV_PREFIX = "POOLQ_"


class Guardian:
    """The side process that kills this agent's job process groups if the agent dies."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.guardian"], stdin=subprocess.PIPE, start_new_session=True, text=True
        )
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        with self._lock:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._say(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._say(f"-{pgid}")

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(10)


class JobRun(threading.Thread):
    """One job on this node, from runtime_env preparation to its terminal status."""

    def __init__(self, agent: Agent, job_ref: str):
        super().__init__(name=f"job-{job_ref}", daemon=True)
        self.agent = agent
        self.job_ref = job_ref
        self.stop_requested = threading.Event()
        self.shutdown = False  # the agent is shutting down: end as NODE_SHUTDOWN
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except (Unavailable, redis.RedisError) as exc:
            if self.process is None:  # not started: it stays in the inbox and is tried again
                log.warning("job %s: Redis unavailable before it started (%s); will try again", self.job_ref, exc)
                return
            log.exception("job %s: Redis failed while the agent handled it", self.job_ref)
            self._finish(
                JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, "the node agent lost Redis while running the job"
            )
        except Exception:
            log.exception("job %s: unexpected error in the agent", self.job_ref)
            self._finish(
                JobStatus.FAILED,
                ErrorType.ENTRYPOINT_FAILED,
                "the node agent failed while running the job; see its log",
            )
        finally:
            self.agent.job_done(self)

    def _run(self) -> None:
        agent, store = self.agent, self.agent.store
        fields = store.redis.hgetall(keys.job(self.job_ref))
        if fields.get(JobFields.STATUS) != JobStatus.PENDING or fields.get(JobFields.NODE) != agent.node_id:
            store.redis.zrem(keys.node_inbox(agent.node_id), self.job_ref)
            return
        spec = json.loads(fields[JobFields.SPEC])
        try:
            workdir = agent.envs.working_dir(spec["runtime_env"]["working_dir"], spec["tenant_id"])
            venv = agent.envs.pip_env(spec["runtime_env"].get("pip"))
        except SetupFailed as exc:
            self._finish(
                JobStatus.FAILED,
                ErrorType.RUNTIME_ENV_SETUP_FAILED,
                f"runtime_env setup failed: {exc}",
                from_statuses=[JobStatus.PENDING],
            )
            store.redis.zrem(keys.node_inbox(agent.node_id), self.job_ref)
            return
        started = store.scripts.start(
            keys=[
                keys.job(self.job_ref),
                keys.node_inbox(agent.node_id),
                keys.tenant_counts(keys.split_ref(self.job_ref)[0]),
            ],
            args=[self.job_ref, agent.node_id, f"running on node {agent.node_id}"],
        )
        if started == 2:  # a stop came first
            self._finish(JobStatus.STOPPED, ErrorType.STOPPED_BY_USER, "stopped by user request")
            return
        if started == 0:  # placed elsewhere, stopped or ended meanwhile
            return
        self._execute(spec, workdir, venv)

    def _execute(self, spec: dict[str, Any], workdir: Path, venv: Path | None) -> None:
        agent = self.agent
        log_path = agent.log_path(self.job_ref)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", spec["entrypoint"]],
                cwd=workdir,
                env=job_environment(spec, venv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, signalled as one
            )
        except OSError as exc:
            self._finish(JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, f"the entrypoint could not be started: {exc}")
            return
        agent.guardian.watch(self.process.pid)
        try:
            stderr_tail = self._capture(log_path)
        finally:
            _kill_group(self.process.pid, signal.SIGKILL)  # whatever it left behind
            agent.guardian.forget(self.process.pid)
        code = self.process.returncode
        if self.shutdown:
            self._finish(
                JobStatus.FAILED,
                ErrorType.NODE_SHUTDOWN,
                f"node {agent.node_id} shut down while the job ran",
                exit_code=code,
            )
        elif code == 0:
            self._finish(JobStatus.SUCCEEDED, None, "finished: exit code 0", exit_code=0)
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            tail = stderr_tail.strip()
            message = f"entrypoint failed: {how}" + (f"; stderr: {tail}" if tail else "")
            self._finish(JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, message, exit_code=code)

    def _capture(self, log_path: Path) -> str:
        """Copy stdout and stderr, interleaved, to the log file and the Redis tail; stop on request."""
        assert self.process is not None and self.process.stdout and self.process.stderr
        agent = self.agent
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        selector.register(self.process.stderr, selectors.EVENT_READ)
        pending, stderr_tail = bytearray(), bytearray()
        last_flush = time.monotonic()
        term_sent_at: float | None = None
        exited_at: float | None = None
        with open(log_path, "ab") as log_file:
            while selector.get_map():
                for key, _ in selector.select(timeout=0.1):
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    log_file.write(data)
                    pending += data
                    if key.fileobj is self.process.stderr:
                        stderr_tail += data
                        del stderr_tail[: -STDERR_TAIL * 4]  # bytes enough for STDERR_TAIL characters
                now = time.monotonic()
                if pending and (now - last_flush > LOG_FLUSH_S or len(pending) > LOG_FLUSH_BYTES):
                    log_file.flush()
                    agent.ship_log(self.job_ref, bytes(pending))
                    pending.clear()
                    last_flush = now
                if (self.stop_requested.is_set() or self.shutdown) and term_sent_at is None:
                    term_sent_at = now
                    _kill_group(self.process.pid, signal.SIGTERM)
                if term_sent_at is not None and now - term_sent_at > agent.settings.stop_grace_s:
                    _kill_group(self.process.pid, signal.SIGKILL)
                if exited_at is None and self.process.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > STRAGGLER_WAIT_S:
                    break  # a background child holds the pipes open; it is killed next
            self.process.wait()
            if pending:
                agent.ship_log(self.job_ref, bytes(pending))
        for fileobj in (self.process.stdout, self.process.stderr):
            fileobj.close()
        begin, _ = utf8_bounds(bytes(stderr_tail), whole_end=False)
        return bytes(stderr_tail[begin:]).decode("utf-8", "replace")[-STDERR_TAIL:]

    def _finish(
        self,
        status: JobStatus,
        error_type: ErrorType | None,
        message: str,
        *,
        exit_code: int | None = None,
        from_statuses: list[JobStatus] | None = None,
    ) -> None:
        """Record how the job ended. While Redis is unreachable, keep trying: the outcome
        (and the release of the job's reservation) must not be lost with this thread."""
        delay = 0.1
        while True:
            try:
                self.agent.store.finish(
                    self.job_ref,
                    status,
                    error_type=error_type,
                    message=message,
                    exit_code=exit_code,
                    from_statuses=from_statuses or [JobStatus.PENDING, JobStatus.RUNNING],
                    expected_node=self.agent.node_id,
                )
                return
            except Unavailable as exc:
                if self.agent.stopping.is_set():
                    raise
                log.warning(
                    "job %s ended (%s) but Redis is unavailable (%s); retrying", self.job_ref, status.value, exc
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def job_environment(spec: dict[str, Any], venv: Path | None) -> dict[str, str]:
    """The agent's environment without its POOLQ_* settings, plus the job's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_ENV_PREFIX)}
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(spec["runtime_env"].get("env_vars", {}))
    env.update(
        {
            "POOLQ_SUBMISSION_ID": spec["submission_id"],
            "POOLQ_TENANT_ID": spec["tenant_id"],
            "POOLQ_NUM_CPUS": str(spec["entrypoint_num_cpus"]),
            "POOLQ_MEMORY": str(spec["entrypoint_memory"]),
            "POOLQ_NUM_GPUS": str(spec["entrypoint_num_gpus"]),
            "POOLQ_RESOURCES": ",".join(
                f"{k}={canonical_number(v)}" for k, v in sorted(spec["entrypoint_resources"].items())
            ),
        }
    )
    return env


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Agent:
    def __init__(
        self, store: JobStore, *, node_id: str, pool: str, labels: dict[str, str | None], capacity: dict[str, int]
    ):
        self.store = store
        self.settings: Settings = store.settings
        self.admin = NodeAdmin(store)
        self.node_id, self.pool, self.labels, self.capacity = node_id, pool, labels, capacity
        self.dir = self.settings.data_dir / "nodes" / node_id
        self.envs = RuntimeEnvs(self.dir / "cache", self._fetch_package)
        self.running: dict[str, JobRun] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.accepting = True
        self.incarnation = 0
        self.guardian = Guardian()

    # -- registration and heartbeat ------------------------------------------------

    def register(self) -> None:
        self.incarnation = self.admin.upsert(
            self.node_id, pool=self.pool, labels=self.labels, capacity=self.capacity, kind="agent", create=False
        )
        # Jobs that were RUNNING under an earlier agent with this id died with it.
        with self._lock:
            mine = set(self.running)
        refs = [r for r in self.store.redis.smembers(keys.node_jobs(self.node_id)) if r not in mine]
        running_before = [r for r in refs if self.store.redis.hget(keys.job(r), JobFields.STATUS) == JobStatus.RUNNING]
        if running_before:
            self.admin.fail_jobs(
                self.node_id, f"node {self.node_id}'s agent restarted while the job ran", only=running_before
            )
        log.info("node %s registered in pool %s (incarnation %d)", self.node_id, self.pool, self.incarnation)
        self.wake.set()

    def heartbeat(self) -> None:
        accepted = self.store.scripts.heartbeat(
            keys=[keys.node(self.node_id), keys.HEARTBEATS], args=[self.node_id, self.incarnation]
        )
        if not accepted and self.accepting:
            # Declared lost (or replaced): our jobs were failed; end them and start over.
            log.warning("node %s was declared lost; stopping its jobs and registering again", self.node_id)
            with self._lock:
                runs = list(self.running.values())
            for run in runs:
                run.stop_requested.set()
            self.register()

    # -- the loop --------------------------------------------------------------------

    def loop(self) -> None:
        next_heartbeat = 0.0
        while not self.stopping.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
            try:
                now = time.monotonic()
                if now >= next_heartbeat:
                    self.heartbeat()
                    next_heartbeat = now + self.settings.heartbeat_s
                if self.accepting:
                    self.start_inbox()
                self.watch_stops()
            except Exception:
                log.exception("node agent loop")
                time.sleep(0.5)

    def start_inbox(self) -> None:
        # Clear the wake-up flag before reading the inbox, as placement does: a job
        # placed from now on sends a new wake-up instead of waiting for the next poll.
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.delete(keys.wake(queues.node_queue(self.node_id)))
        pipe.zrange(keys.node_inbox(self.node_id), 0, 199)
        for job_ref in pipe.execute()[1]:
            with self._lock:
                if job_ref in self.running:
                    continue
                run = self.running[job_ref] = JobRun(self, job_ref)
            run.start()

    def watch_stops(self) -> None:
        with self._lock:
            runs = list(self.running.values())
        if not runs:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        for run in runs:
            pipe.hget(keys.job(run.job_ref), JobFields.STOP)
        for run, flag in zip(runs, pipe.execute()):
            if flag == "1":
                run.stop_requested.set()

    def job_done(self, run: JobRun) -> None:
        with self._lock:
            if self.running.get(run.job_ref) is run:
                del self.running[run.job_ref]
        self.wake.set()

    # -- logs and packages -------------------------------------------------------------

    def log_path(self, job_ref: str) -> Path:
        tenant, submission_id = keys.split_ref(job_ref)
        return self.dir / "logs" / safe_dir(tenant) / f"{submission_id}.log"

    def ship_log(self, job_ref: str, data: bytes) -> None:
        try:
            self.store.scripts.log_append(
                keys=[keys.log(job_ref), keys.job(job_ref)], args=[data, self.settings.max_log_bytes]
            )
        except Exception:
            log.warning("job %s: could not ship %d bytes of output to Redis", job_ref, len(data), exc_info=True)

    def _fetch_package(self, tenant: str, uri: str) -> bytes | None:
        from poolq.packages import fetch

        return fetch(self.store.raw, tenant, uri, self.settings.retention_s)

    def remove_orphan_logs(self) -> None:
        """Delete log files whose job record is gone (deleted or past retention)."""
        files = list((self.dir / "logs").glob("t-*/*.log"))
        if not files:
            return
        refs = [keys.ref(path.parent.name.removeprefix("t-"), path.stem) for path in files]
        pipe = self.store.redis.pipeline(transaction=False)
        for job_ref in refs:
            pipe.exists(keys.job(job_ref))
        for path, exists in zip(files, pipe.execute()):
            if not exists:
                path.unlink(missing_ok=True)

    # -- shutting down -----------------------------------------------------------------

    def stop_accepting(self) -> None:
        """The first step of a shutdown: no new placements here, no new starts."""
        if self.accepting:
            self.accepting = False
            self.admin.drain(self.node_id, shutdown=True)

    def drain(self) -> None:
        """SIGTERM: no new jobs; running ones get drain_s, then are stopped as NODE_SHUTDOWN."""
        self.stop_accepting()
        inbox = self.store.redis.zrange(keys.node_inbox(self.node_id), 0, -1)
        with self._lock:
            unstarted = [r for r in inbox if r not in self.running]
        self.admin.fail_jobs(
            self.node_id,
            f"node {self.node_id} shut down before the job started",
            error_type=ErrorType.NODE_SHUTDOWN,
            only=unstarted,
        )
        deadline = time.monotonic() + self.settings.drain_s
        while time.monotonic() < deadline and self.running:
            time.sleep(0.1)
        with self._lock:
            runs = list(self.running.values())
        for run in runs:
            run.shutdown = True
        for run in runs:
            run.join(self.settings.stop_grace_s + 5)
        self.stopping.set()
        self.admin.remove(self.node_id)
        self.guardian.close()


def run_agent(
    settings: Settings, *, node_id: str, pool: str, labels: str, capacity: dict[str, int], loglevel: str = "INFO"
) -> int:
    from worker import runtime
    from worker.celery_app import create_celery, run_worker

    runtime.configure(settings)
    agent = Agent(runtime.store(), node_id=node_id, pool=pool, labels=parse_labels(labels), capacity=capacity)
    runtime.set_agent(agent)
    agent.register()
    loop = threading.Thread(target=agent.loop, name="poolq-agent", daemon=True)
    loop.start()
    janitor = threading.Thread(target=_janitor, args=(agent,), name="poolq-agent-janitor", daemon=True)
    janitor.start()
    app = create_celery(settings, with_tasks=True)
    # Celery handles SIGTERM with a warm shutdown that ends worker_main later; stop taking
    # jobs the moment it begins, so that none starts during the shutdown.
    worker_shutting_down.connect(lambda **_: agent.stop_accepting(), weak=False)
    try:
        run_worker(
            app,
            [
                "worker",
                "--pool=solo",
                f"--queues={queues.node_queue(node_id)}",
                "--without-mingle",
                "--without-gossip",
                f"--loglevel={loglevel}",
                f"--hostname=node-{node_id}-{os.getpid()}@{socket.gethostname()}",
            ],
        )
    finally:
        log.info("node %s draining (up to %gs)", node_id, settings.drain_s)
        agent.drain()
    return 0


def _janitor(agent: Agent) -> None:
    while not agent.stopping.wait(60):
        try:
            agent.remove_orphan_logs()
        except Exception:
            log.warning("could not clean up old log files", exc_info=True)
