"""The node agent (``poolq node``): run the jobs placed on this node.

A Celery worker on the node's own queue receives wake-ups; the agent loop starts
every job in the node's inbox, heartbeats, and watches running jobs for stop
requests. Each job runs in a thread of its own: prepare the runtime_env (the job
is still PENDING), mark it RUNNING, run the entrypoint with ``/bin/sh -c`` in a
new process group, capture its output, and end it through ``finish.lua``, which
releases its reservation exactly once.

The agent holds its node as a lease (docs/faults.md, "Fencing"): when no heartbeat
has reached Redis for the node TTL less a margin, it kills its jobs (its guardian
does so too, even while the agent itself is paused), because the reaper is about to
declare the node lost and release their reservations; it registers again only once
they have exited. So a node never runs jobs whose capacity placement already gave
to others, and a job declared lost is not still running when it is resubmitted.

How many jobs run at once is bounded by the node's capacity, which placement
reserves; the agent runs whatever placement put on it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, TypeVar

import redis

from poolq import keys, queues
from poolq.errors import Unavailable
from poolq.model import (
    CPU,
    DEVICE_VARIABLES,
    ErrorType,
    JobFields,
    JobStatus,
    canonical_number,
    devices_of,
    mebibytes,
    to_milli,
    utf8_bounds,
)
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from poolq.store import JobStore
from worker.cgroups import CgroupError, CgroupPool, Cgroups, JobCgroup
from worker.guardian import boottime
from worker.joblog import TAIL_SUFFIX, DiskFull, JobLog, prune
from worker.runtime_env import HIDDEN_ENV_PREFIX, RuntimeEnvs, SetupFailed, safe_dir

log = logging.getLogger("poolq.agent")

LOG_FLUSH_S = 0.2
LOG_FLUSH_BYTES = 64 * 1024
STDERR_TAIL = 2000  # characters of stderr quoted in a failed job's message
STRAGGLER_WAIT_S = 0.5  # after the entrypoint exits, how long to read output its children still write
LOOP_S = 0.5  # how often the loop turns when nothing wakes it: the inbox is read at least this often
RECONCILE_S = 5.0  # how often the agent compares the jobs Redis says it runs with those it runs
ATTEMPT_LOG = ".attempt-"  # <id>.attempt-2.log: the log file of a job's second attempt on a node
T = TypeVar("T")


# Whose runtime limit stopped a job (start.lua's answer), as its message says.
LIMIT_OWNERS = {"job": "runtime_limit_s", "tenant": "its tenant's", "node": "its node's"}


def _how(code: int) -> str:
    """How a job's process ended, from its Popen return code."""
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class Started(enum.IntEnum):
    """start.lua's answer."""

    SKIP = 0  # placed elsewhere, stopped or ended meanwhile
    STARTED = 1
    STOP_FIRST = 2  # a stop was requested before it started: end it STOPPED


class Abandoned(Exception):
    """The agent was fenced or is stopping while a job's step waited for Redis."""


class Guardian:
    """The side process that kills this agent's job process groups if the agent dies or
    its lease runs out (worker/guardian.py). A guardian that died is started again and
    told everything it must know."""

    def __init__(self, fence_s: float, cgroups: Cgroups) -> None:
        self.fence_s = fence_s
        self.cgroups = json.dumps({"mode": cgroups.mode, "dirs": {c: str(d) for c, d in cgroups.dirs.items()}})
        self.groups: set[int] = set()
        self.last_beat = boottime()  # set before _start: the guardian fences from it
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.guardian", str(self.fence_s), self.cgroups, f"{self.last_beat:.3f}"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def _say(self, line: str) -> None:
        with self._lock:
            for attempt in (1, 2):
                try:
                    assert self.process.stdin is not None
                    self.process.stdin.write(line.encode() + b"\n")
                    self.process.stdin.flush()
                    return
                except (BrokenPipeError, OSError, ValueError):
                    if attempt == 2:
                        log.error("the job guardian cannot be reached; jobs may outlive this agent")
                        return
                    log.warning("the job guardian died; starting it again")
                    self._start()  # told the last beat: its fencing deadline is the old one's
                    assert self.process.stdin is not None
                    self.process.stdin.write("".join(f"+{group}\n" for group in self.groups).encode())

    def watch(self, pgid: int) -> None:
        self.groups.add(pgid)
        self._say(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self.groups.discard(pgid)
        self._say(f"-{pgid}")

    def beat(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (boottime) was accepted."""
        self.last_beat = sent_at
        self._say(f"b{sent_at:.3f}")

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
        self.fenced: str | None = None  # the agent's lease ran out: why; the job is killed
        self._spawning = threading.Lock()  # a fence and the start of the process: one, then the other
        self.process: subprocess.Popen[bytes] | None = None
        self.cgroup: JobCgroup | None = None  # None again once given back: it may be another job's then
        self._cgroup_lock = threading.Lock()  # a kill through the cgroup, and giving it back: one, then the other
        self.disk_full: str | None = None  # the job's log could not be written: why
        self.limit_at: float | None = None  # monotonic time its runtime limit ends
        self.limit_text = "its runtime limit"  # for the message that ends it: "its runtime limit of 2 s (…)"
        self.timed_out = False
        self.attempt = 1
        self.log_sent = 0  # the offset in the job's whole output up to which Redis has it
        self.unsent = bytearray()

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Abandoned:
            log.warning("job %s: left to the next registration of this node (%s)", self.job_ref, self.fenced)
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
        fields = agent.until_answered(lambda: store.redis.hgetall(keys.job(self.job_ref)))
        if fields.get(JobFields.STATUS) != JobStatus.PENDING or fields.get(JobFields.NODE) != agent.node_id:
            agent.until_answered(lambda: store.redis.zrem(keys.node_inbox(agent.node_id), self.job_ref))
            return
        spec = json.loads(fields[JobFields.SPEC])
        self.attempt = int(fields.get(JobFields.ATTEMPT) or 1)  # what this run may end, and nothing later
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
            agent.until_answered(lambda: store.redis.zrem(keys.node_inbox(agent.node_id), self.job_ref))
            return
        if self.fenced:
            self._finish(JobStatus.FAILED, ErrorType.NODE_LOST, self.fenced)
            return
        # start.lua is safe to run again: a lost reply is answered by the next try. With
        # POOLQ_REDIS_WAIT_REPLICAS, so is a start no replica confirmed: a failover that lost
        # it would have the job started again, here or elsewhere, while it runs here.
        tenant = keys.split_ref(self.job_ref)[0]

        def start() -> list[Any]:
            answer = store.scripts.start(
                keys=[
                    keys.job(self.job_ref),
                    keys.node_inbox(agent.node_id),
                    keys.tenant_counts(tenant),
                    keys.limits(tenant),
                ],
                args=[
                    self.job_ref,
                    agent.node_id,
                    f"running on node {agent.node_id}",
                    agent.incarnation,
                    int(agent.settings.runtime_limit_s * 1000) or "",
                ],
            )
            if Started(answer[0]) == Started.STARTED and not store.replicated():
                raise Unavailable("no replica confirmed the job's start (POOLQ_REDIS_WAIT_REPLICAS)")
            return list(answer)

        code, left_ms, _, limit_ms, whose = agent.until_answered(start)
        started = Started(code)
        if started == Started.STOP_FIRST:
            self._finish(JobStatus.STOPPED, ErrorType.STOPPED_BY_USER, "stopped by user request")
            return
        if started == Started.SKIP:
            return
        if self.fenced:
            self._finish(JobStatus.FAILED, ErrorType.NODE_LOST, self.fenced)
            return
        # The runtime limit runs on this machine's clock from here: Redis said how much is left.
        self.limit_at = time.monotonic() + int(left_ms) / 1000 if int(left_ms) > 0 else None
        if self.limit_at is not None:
            limit_s = canonical_number(Decimal(int(limit_ms)) / 1000)
            owner = f" ({LIMIT_OWNERS[whose]})" if whose in LIMIT_OWNERS else ""
            self.limit_text = f"its runtime limit of {limit_s} s{owner}"
        self.log_sent = int(fields.get(JobFields.LOG_BASE) or 0) + int(fields.get(JobFields.LOG_LEN) or 0)
        if self.attempt > 1:  # one log for all attempts: say where this one begins
            self.unsent += f"[poolq] attempt {self.attempt} starts on node {agent.node_id}\n".encode()
        self._execute(spec, fields, workdir, venv)

    def _execute(self, spec: dict[str, Any], fields: dict[str, str], workdir: Path, venv: Path | None) -> None:
        agent = self.agent
        log_path = agent.log_path(self.job_ref, self.attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cgroup = self.cgroup = agent.job_cgroup(spec)
        except CgroupError as exc:
            self._finish(JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, f"the node could not limit the job: {exc}")
            return
        with self._spawning:
            # The lease, by the clock, not only by the flag the agent's loop sets: a pause
            # (SIGSTOP) between start.lua and here can outlive the lease, and on waking this
            # thread may get here before the loop notices. A job whose node may have been
            # declared lost meanwhile must not start at all.
            lost = self.fenced or agent.lease_lost()
            not_started = ""
            if not lost:
                try:
                    self.process = cgroup.shell(
                        spec["entrypoint"],
                        cwd=workdir,
                        env=job_environment(
                            spec, venv, agent.node_id, agent.job_devices(fields.get(JobFields.DEVICES) or "")
                        ),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,  # its own process group, signalled as one
                    )
                except OSError as exc:
                    not_started = f"the entrypoint could not be started: {exc}"
        # Ended outside the lock: ending may wait for Redis, and a fence must not wait on it.
        if lost or self.process is None:
            self._give_back_cgroup()
            if lost:
                self._finish(JobStatus.FAILED, ErrorType.NODE_LOST, lost)
            else:
                self._finish(JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, not_started)
            return
        try:
            agent.guardian.watch(self.process.pid)
            stderr_tail = self._capture(log_path)
        finally:
            # Its group, then (once the job's process is reaped, so that the cgroup no longer
            # lists it exiting) whatever it left behind in its cgroup: setsid children included.
            _kill_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self._kill_cgroup()
            agent.guardian.forget(self.process.pid)
        code = self.process.returncode
        if code == -signal.SIGKILL and not self.fenced:
            # The guardian fences by the same clock as the agent's loop and may kill first:
            # a job killed once the lease ran out was fenced, whoever noticed first.
            self.fenced = agent.lease_lost()
        out_of_memory = cgroup.oom_killed(code)
        self._give_back_cgroup(reusable=not out_of_memory)
        # A job that exits 0 succeeded, whatever the kernel killed on the way (a child it
        # could do without); one that fails after a kill for memory failed for memory.
        ended_by_oom = out_of_memory and code != 0
        if ended_by_oom and not (self.fenced or self.shutdown or self.timed_out or self.stop_requested.is_set()):
            limit = spec["entrypoint_memory"]
            over = f"more memory than its limit of {mebibytes(limit)} MiB ({limit} bytes, entrypoint_memory)"
            self._finish(
                JobStatus.FAILED,
                ErrorType.OUT_OF_MEMORY,
                f"the job used {over} and was killed by the kernel"
                if code in (-signal.SIGKILL, 128 + signal.SIGKILL)
                else f"the job used {over}: the kernel killed a process of it, and it then ended ({_how(code)})",
                exit_code=code,
            )
        elif self.fenced:
            self._finish(JobStatus.FAILED, ErrorType.NODE_LOST, self.fenced, exit_code=code)
        elif self.timed_out:
            self._finish(
                JobStatus.FAILED,
                ErrorType.RUNTIME_LIMIT,
                f"the job ran longer than {self.limit_text} and was stopped",
                exit_code=code,
            )
        elif self.disk_full:
            self._finish(
                JobStatus.FAILED, ErrorType.NODE_DISK_FULL, f"{self.disk_full}; the job was stopped", exit_code=code
            )
        elif self.shutdown:
            self._finish(
                JobStatus.FAILED,
                ErrorType.NODE_SHUTDOWN,
                f"node {agent.node_id} shut down while the job ran",
                exit_code=code,
            )
        elif code == 0:
            self._finish(JobStatus.SUCCEEDED, None, "finished: exit code 0", exit_code=0)
        else:
            how = _how(code)
            tail = stderr_tail.strip()
            message = f"entrypoint failed: {how}" + (f"; stderr: {tail}" if tail else "")
            self._finish(JobStatus.FAILED, ErrorType.ENTRYPOINT_FAILED, message, exit_code=code)

    def fence(self, reason: str) -> None:
        """The agent's lease ran out: kill the job now (its capacity is being given away)."""
        with self._spawning:  # not between the lease check and the start: before, or after
            self.fenced = reason
        self._kill(signal.SIGKILL)

    def _kill(self, sig: int) -> None:
        """Signal the job's process group and everything in its cgroup (SIGKILL: and wait until
        nothing is left there)."""
        if self.process is None:
            return
        _kill_group(self.process.pid, sig)
        if sig == signal.SIGKILL:
            self._kill_cgroup()
        else:
            with self._cgroup_lock:
                if self.cgroup is not None:
                    try:
                        self.cgroup.signal(sig)
                    except OSError as exc:  # the group has it; SIGKILL follows after the grace
                        log.warning("job %s: could not signal its cgroup: %s", self.job_ref, exc)

    def _kill_cgroup(self) -> None:
        with self._cgroup_lock:
            if self.cgroup is not None:
                try:
                    self.cgroup.kill()
                except CgroupError as exc:
                    log.error("job %s: %s", self.job_ref, exc)

    def _give_back_cgroup(self, *, reusable: bool = True) -> None:
        with self._cgroup_lock:
            cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            self.agent.give_back(cgroup, reusable=reusable)

    def _capture(self, log_path: Path) -> str:
        """Copy stdout and stderr, interleaved, to the log file and the Redis tail; stop on request."""
        assert self.process is not None and self.process.stdout and self.process.stderr
        agent = self.agent
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        selector.register(self.process.stderr, selectors.EVENT_READ)
        stderr_tail = bytearray()
        last_flush = time.monotonic()
        term_sent_at: float | None = None
        exited_at: float | None = None
        log_file = JobLog(log_path, agent.settings.max_log_file_bytes)

        def in_grace() -> bool:
            # A stop's SIGTERM went to the job's group, and something of the job lives on: the
            # entrypoint's shell dies of it at once, while the command it waits for may be
            # saving its work. The job has its whole grace, not the shell's last moment.
            return (
                term_sent_at is not None
                and time.monotonic() - term_sent_at <= agent.settings.stop_grace_s
                and self._lingering()
            )

        try:
            # Until the entrypoint has exited and its output is read: a job that closed its
            # stdout and stderr (exec >/dev/null) must still be stoppable and time-limited.
            while selector.get_map() or self.process.poll() is None or in_grace():
                if not selector.get_map() and self.process.poll() is None:
                    try:  # the pipes closed first: the exit comes any moment, take it then
                        self.process.wait(0.1)
                    except subprocess.TimeoutExpired:
                        pass
                elif not selector.get_map():
                    time.sleep(0.1)  # in its grace: the job's other processes may still run
                for key, _ in selector.select(timeout=0.1) if selector.get_map() else ():
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    self._keep(log_file, data)
                    self.unsent += data
                    if key.fileobj is self.process.stderr:
                        stderr_tail += data
                        del stderr_tail[: -STDERR_TAIL * 4]  # bytes enough for STDERR_TAIL characters
                now = time.monotonic()
                if self.unsent and (now - last_flush > LOG_FLUSH_S or len(self.unsent) > LOG_FLUSH_BYTES):
                    self.ship_log()
                    last_flush = now
                if self.fenced or self.disk_full:
                    self._kill(signal.SIGKILL)
                if self.limit_at is not None and now >= self.limit_at and exited_at is None:
                    self.timed_out = True
                if (self.stop_requested.is_set() or self.shutdown or self.timed_out) and term_sent_at is None:
                    term_sent_at = now
                    self._kill(signal.SIGTERM)
                if term_sent_at is not None and now - term_sent_at > agent.settings.stop_grace_s:
                    self._kill(signal.SIGKILL)
                if exited_at is None and self.process.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > STRAGGLER_WAIT_S and not in_grace():
                    break  # a background child holds the pipes open; it is killed next
            self.process.wait()
            self.ship_log(final=True)
        finally:
            try:
                log_file.close()
            except DiskFull as exc:
                log.warning("job %s: %s", self.job_ref, exc)
        for fileobj in (self.process.stdout, self.process.stderr):
            fileobj.close()
        begin, _ = utf8_bounds(bytes(stderr_tail), whole_end=False)
        return bytes(stderr_tail[begin:]).decode("utf-8", "replace")[-STDERR_TAIL:]

    def _lingering(self) -> bool:
        """Whether a process of the job is alive: one in its cgroup, where it has one (which
        lists no zombie), else one of its process group."""
        assert self.process is not None
        cgroup = self.cgroup
        if cgroup is not None and cgroup.mode != "none":
            return not cgroup.empty()
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of the group that is not ours any more (setuid)
            return True

    def _keep(self, log_file: JobLog, data: bytes) -> None:
        """Write output to the node's log file; a full disk stops the job (and only it)."""
        if self.disk_full:
            return
        try:
            log_file.write(data)
        except DiskFull as exc:
            log.error("job %s: %s", self.job_ref, exc)
            self.disk_full = str(exc)

    def ship_log(self, *, final: bool = False) -> None:
        """Send the output Redis does not have yet, saying where it begins in the whole
        output, so that a retry after a lost reply appends nothing twice (log_append.lua).
        Output that cannot be sent waits for the next flush, at most a tail's worth; the
        last of it (``final``: the job ended) is sent as its ending is, until Redis answers."""
        if not self.unsent:
            return
        limit = self.agent.settings.max_log_bytes
        if len(self.unsent) > limit:  # Redis keeps no more than this anyway
            self.log_sent += len(self.unsent) - limit
            del self.unsent[:-limit]

        def append() -> Any:
            return self.agent.store.scripts.log_append(
                keys=[keys.log(self.job_ref), keys.job(self.job_ref)],
                args=[bytes(self.unsent), limit, self.log_sent],
            )

        try:
            end = self.agent.until_answered(append) if final else append()
        except Abandoned:
            return
        except redis.RedisError as exc:
            log.warning("job %s: %d bytes of output wait for Redis (%s)", self.job_ref, len(self.unsent), exc)
            return
        self.log_sent += len(self.unsent)
        self.unsent.clear()
        if int(end) >= 0:
            self.log_sent = int(end)

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
        (and the release of the job's reservation) must not be lost with this thread.
        finish.lua is safe to run again, so a lost reply costs only a retry."""
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
                    attempt=self.attempt,
                )
                # With POOLQ_REDIS_WAIT_REPLICAS, the end is kept until a replica has it: a
                # failover that lost it would leave the job RUNNING here, to be failed or run
                # again. finish.lua, sent again, ends it on whichever master there is then.
                if self.agent.stopping.is_set() or self.agent.store.replicated():
                    return
                raise Unavailable("no replica confirmed how the job ended (POOLQ_REDIS_WAIT_REPLICAS)")
            except Unavailable as exc:
                if self.agent.stopping.is_set():
                    raise
                log.warning(
                    "job %s ended (%s) but Redis is unavailable (%s); retrying", self.job_ref, status.value, exc
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def job_environment(
    spec: dict[str, Any], venv: Path | None, node_id: str, devices: dict[str, str] | None = None
) -> dict[str, str]:
    """The agent's environment without its POOLQ_* settings, plus the job's own variables
    and its devices (``CUDA_VISIBLE_DEVICES`` and the like: ``devices`` maps each
    variable to the ids, empty for a device kind the node has and the job did not ask for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_ENV_PREFIX)}
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(spec["runtime_env"].get("env_vars", {}))
    env.update(devices or {})  # after env_vars: a job cannot name devices it was not given
    env.update(
        {
            "POOLQ_SUBMISSION_ID": spec["submission_id"],
            "POOLQ_TENANT_ID": spec["tenant_id"],
            "POOLQ_NODE_ID": node_id,
            "POOLQ_NUM_CPUS": str(spec["entrypoint_num_cpus"]),
            "POOLQ_MEMORY": str(spec["entrypoint_memory"]),
            "POOLQ_NUM_GPUS": str(spec["entrypoint_num_gpus"]),
            "POOLQ_RESOURCES": ",".join(
                f"{k}={canonical_number(v)}" for k, v in sorted(spec["entrypoint_resources"].items())
            ),
        }
    )
    if "array_index" in spec:  # a task of an array (docs/scheduling.md, "Arrays")
        env["POOLQ_ARRAY_ID"] = spec["array_id"]
        env["POOLQ_ARRAY_INDEX"] = str(spec["array_index"])
    return env


def cgroup_name(text: str) -> str:
    """A cgroup directory name for ``text`` (cgroup names allow fewer characters)."""
    return "j-" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Agent:
    def __init__(
        self,
        store: JobStore,
        *,
        node_id: str,
        pool: str,
        labels: dict[str, str | None],
        capacity: dict[str, int],
        devices: dict[str, list[str]] | None = None,
        guardian: Guardian | None = None,
    ):
        """``guardian``: one shared with other agents of this process that run their jobs
        without cgroups (the fleet benchmark, bench/fleet.py: a guardian process per agent
        would be a thousand processes); by default the agent starts its own."""
        self.store = store
        self.settings: Settings = store.settings
        self.admin = NodeAdmin(store)
        self.node_id, self.pool, self.labels, self.capacity = node_id, pool, labels, capacity
        self.devices = devices or {}  # resource -> the ids of its devices here
        self.dir = self.settings.data_dir / "nodes" / node_id
        self.envs = RuntimeEnvs(
            self.dir / "cache",
            self._fetch_package,
            max_unpacked_bytes=self.settings.max_unpacked_bytes,
            max_archive_entries=self.settings.max_archive_entries,
        )
        self.running: dict[str, JobRun] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.accepting = True
        self.incarnation = 0
        self.fenced: str | None = None  # why the agent gave up its lease, until it registers again
        self.last_beat = boottime()  # when the last heartbeat Redis accepted was sent
        # Before any child process: on cgroup v2 the agent may move itself into a leaf.
        self.cgroups = Cgroups.detect(
            self.settings.cgroup_root,
            enabled=self.settings.enforce_resources,
            parent_name=f"poolq-{cgroup_name(f'{self.dir}:{node_id}')}",
        )
        if self.cgroups.mode == "none":
            log.warning("node %s runs jobs without resource limits: %s", node_id, self.cgroups.reason)
        else:
            log.info("node %s limits each job's memory, CPU and processes with cgroup %s", node_id, self.cgroups.mode)
            stale = self.cgroups.remove_stale()
            if stale:
                log.warning("killed what was left in %d job cgroups of an earlier agent", len(stale))
            try:
                offered = capacity.get(CPU, 0)
                if (weighed := self.cgroups.weigh(offered)) < offered:
                    log.info(
                        "node %s weighs its jobs' CPU as %g cores, the cores it may run on", node_id, weighed / 1000
                    )
            except OSError as exc:
                log.warning("node %s could not weigh its jobs' CPU share: %s", node_id, exc)
        self.cgroup_pool = CgroupPool(self.cgroups)
        self._own_guardian = guardian is None
        self.guardian = guardian or Guardian(self.settings.fence_s, self.cgroups)
        self._next_heartbeat = 0.0
        self._next_reconcile = 0.0

    # -- registration, heartbeat and fencing -----------------------------------------

    def register(self) -> None:
        sent = boottime()
        # The token makes the registration safe to send twice (node_upsert.lua).
        self.incarnation = self.admin.upsert(
            self.node_id,
            pool=self.pool,
            labels=self.labels,
            capacity=self.capacity,
            kind="agent",
            create=False,
            token=secrets.token_hex(8),
            facts={"enforcement": self.cgroups.describe()},
            devices=self.devices,
        )
        self.last_beat = sent
        self.guardian.beat(sent)
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
        sent = boottime()
        accepted = self.store.scripts.heartbeat(
            keys=[keys.node(self.node_id), keys.HEARTBEATS], args=[self.node_id, self.incarnation]
        )
        if accepted:
            self.last_beat = sent
            self.guardian.beat(sent)
        else:
            self.fence(f"node {self.node_id} was declared lost (or another agent registered it)")

    def lease_lost(self) -> str | None:
        """Why the lease is gone, by the clock (the last heartbeat Redis accepted is older
        than the fence), naming the node as a job's record says it; None while it holds."""
        if boottime() - self.last_beat > self.settings.fence_s:
            return f"node {self.node_id} lost its lease: no heartbeat reached Redis for {self.settings.fence_s:g} s"
        return None

    def fence(self, reason: str) -> None:
        """Give up the lease: kill every job now; register again once they have exited."""
        if self.fenced:
            return
        self.fenced = reason
        message = f"{reason}; its jobs were killed so that none runs on capacity given to others"
        log.warning("fenced: %s", message)
        with self._lock:
            runs = list(self.running.values())
        for run in runs:
            run.fence(message)

    def recover_from_fence(self) -> None:
        """Register again (a new incarnation) once every fenced job has ended."""
        with self._lock:
            if self.running:
                return
        if not self.accepting:
            return  # shutting down: nothing to come back for
        self.register()
        log.info("node %s is back after fencing (%s)", self.node_id, self.fenced)
        self.fenced = None

    def until_answered(self, call: Callable[[], T], *, give_up_s: float | None = None) -> T:
        """Call Redis until it answers; the steps given are safe to repeat. Gives up
        (Abandoned) once the agent is fenced or stopping: the next registration settles
        what the step left (register, reconcile); with ``give_up_s``, raises the last
        error once that long has passed."""
        deadline = None if give_up_s is None else time.monotonic() + give_up_s
        delay = 0.1
        while True:
            try:
                return call()
            except (Unavailable, redis.RedisError) as exc:
                if self.fenced or self.stopping.is_set():
                    raise Abandoned(str(exc)) from exc
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                log.warning("Redis unavailable (%s); trying again in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- the loop --------------------------------------------------------------------

    def loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(LOOP_S)
            self.wake.clear()
            if not self.tick():
                time.sleep(0.5)

    def tick(self) -> bool:
        """One turn of the loop, when woken or LOOP_S after the last: fence or recover, heartbeat
        when due, start the inbox, watch for stops, reconcile when due. False after an
        unexpected error (logged); Redis being away is only a warning."""
        try:
            lost = None if self.fenced else self.lease_lost()
            if lost:
                self.fence(lost)
            if self.fenced:
                self.recover_from_fence()
                return True
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self.heartbeat()
                self._next_heartbeat = now + self.settings.heartbeat_s
            if self.accepting and not self.fenced:
                self.start_inbox()
            self.watch_stops()
            if now >= self._next_reconcile:
                self.reconcile()
                self._next_reconcile = now + RECONCILE_S
        except (Unavailable, redis.RedisError) as exc:
            log.warning("node agent loop: Redis unavailable (%s)", exc)
        except Exception:
            log.exception("node agent loop")
            return False
        return True

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
            if flag:
                run.stop_requested.set()

    def reconcile(self) -> None:
        """What Redis says this node runs, against what it runs: a job RUNNING under this
        incarnation without a thread here (a step of its thread that failed) is failed;
        a job placed here that is neither started nor in the inbox goes back in it."""
        refs = self.store.redis.smembers(keys.node_jobs(self.node_id))
        with self._lock:
            unknown = sorted(r for r in refs if r not in self.running)
        if not unknown:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        for job_ref in unknown:
            pipe.hmget(keys.job(job_ref), [JobFields.STATUS, JobFields.NODE, JobFields.RUNNER, JobFields.SEQ])
            pipe.zscore(keys.node_inbox(self.node_id), job_ref)
        answers = pipe.execute()
        for i, job_ref in enumerate(unknown):
            (status, node, runner, seq), queued = answers[2 * i], answers[2 * i + 1]
            with self._lock:
                if job_ref in self.running or node != self.node_id:
                    continue
            if status == JobStatus.RUNNING and runner == str(self.incarnation):
                log.error("job %s is RUNNING here but no process runs it; failing it", job_ref)
                self.admin.fail_jobs(
                    self.node_id, f"node {self.node_id}'s agent lost track of the job while it ran", only=[job_ref]
                )
            elif status == JobStatus.PENDING and queued is None and seq:
                self.store.redis.zadd(keys.node_inbox(self.node_id), {job_ref: int(seq)})

    def job_done(self, run: JobRun) -> None:
        with self._lock:
            if self.running.get(run.job_ref) is run:
                del self.running[run.job_ref]
        self.wake.set()

    def job_cgroup(self, spec: dict[str, Any]) -> JobCgroup:
        """An empty cgroup with the job's limits: its memory, its CPUs as a CPU quota, a
        process limit (one without directories when the node does not enforce)."""
        pids = self.settings.job_pids_max
        return self.cgroup_pool.take(
            memory_bytes=int(spec["entrypoint_memory"]),
            cpu_milli=to_milli(Decimal(str(spec["entrypoint_num_cpus"]))),
            pids_max=pids if pids > 0 else None,
        )

    def give_back(self, cgroup: JobCgroup, *, reusable: bool = True) -> None:
        """A job ended: kill what is left of it; its cgroup is kept for a later job or removed."""
        try:
            self.cgroup_pool.give_back(cgroup, reusable=reusable)
        except CgroupError as exc:
            log.error("%s", exc)

    # -- logs and packages -------------------------------------------------------------

    def log_path(self, job_ref: str, attempt: int = 1) -> Path:
        """A job's log file on this node; a later attempt here has its own."""
        tenant, submission_id = keys.split_ref(job_ref)
        name = submission_id if attempt == 1 else f"{submission_id}{ATTEMPT_LOG}{attempt}"
        return self.dir / "logs" / safe_dir(tenant) / f"{name}.log"

    def job_devices(self, held: str) -> dict[str, str]:
        """The device variables of a job holding ``held`` (reserve.lua's "GPU:0:1000,…")."""
        ids: dict[str, list[str]] = {name: [] for name in self.devices} | devices_of(held)
        return {DEVICE_VARIABLES[name]: ",".join(found) for name, found in ids.items() if name in DEVICE_VARIABLES}

    def _fetch_package(self, tenant: str, uri: str) -> bytes | None:
        from poolq.packages import fetch

        return fetch(self.store.raw, tenant, uri)

    def janitor(self) -> None:
        """Once a minute, tidy the node's log files."""
        while not self.stopping.wait(60):
            try:
                self.tidy_logs()
            except Exception:
                log.warning("could not clean up old log files", exc_info=True)

    def tidy_logs(self) -> None:
        """Delete log files whose job record is gone (deleted or past retention), then the
        oldest finished ones while the node's logs hold more than POOLQ_MAX_NODE_LOG_BYTES."""
        logs = self.dir / "logs"
        with self._lock:
            running = {self.log_path(run.job_ref, run.attempt) for run in self.running.values()}
        prune(logs, self.settings.max_node_log_bytes, keep=running)
        files = [*logs.glob("t-*/*.log"), *logs.glob(f"t-*/*.log{TAIL_SUFFIX}")]
        files = [path for path in files if path.with_name(path.name.removesuffix(TAIL_SUFFIX)) not in running]
        if not files:
            return
        names = [path.name.removesuffix(TAIL_SUFFIX).removesuffix(".log").split(ATTEMPT_LOG)[0] for path in files]
        refs = [keys.ref(path.parent.name.removeprefix("t-"), name) for path, name in zip(files, names)]
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
            self.admin.drain(self.node_id, shutdown=True, incarnation=self.incarnation)

    def shut_down(self) -> None:
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
            from_statuses=[JobStatus.PENDING],  # one that started meanwhile is stopped below with the others
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
        # Only this incarnation's node: a new agent may have registered the id meanwhile.
        self.admin.remove(self.node_id, incarnation=self.incarnation)
        try:
            self.cgroup_pool.close()
            self.cgroups.remove_parent()
        except CgroupError as exc:
            log.error("%s", exc)
        if self._own_guardian:  # a shared one watches other agents' jobs too
            self.guardian.close()
