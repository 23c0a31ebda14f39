"""The chaos test's nemesis: seeded faults against the processes of a scenario.

One fault at a time, a few seconds apart, each logged with a timestamp so that a
failure can be read against the timeline: kill -9 of a placement worker or a node agent
(started again at once, the agent with the same node id), SIGSTOP of one for longer than
the claim lease or the node TTL, SIGSTOP of redis-server, kill -9 of redis-server (started
again on its append-only file), and a tenant's rate quota set through the CLI. The first
faults are every kind once, in a seeded order; then seeded choices until the time is up.
A stopped process is always continued (``finally``), and ``resume_all`` continues anything
left stopped by an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import time
from typing import Callable, Iterator

from tests.faults.conftest import RestartableRedis, kill9
from tests.procs import Proc

Cli = Callable[[list[str]], "subprocess.CompletedProcess[str]"]  # runs `python -m poolq <args>`


class Timeline:
    """Timestamped lines, printed as they happen: the scenario's log."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def log(self, what: str) -> None:
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        print(f"[{time.monotonic() - self.began:7.2f}s {clock}] {what}", flush=True)


@dataclasses.dataclass
class Member:
    """One restartable process of the scenario: how to start it and wait until it is ready,
    the one running now, and every pid it has had (an agent's pids tell which node ran a
    job: the job's $PPID)."""

    name: str
    launch: Callable[[], Proc]
    ready: Callable[[Proc], None]  # AssertionError if it exits or does not come up in time
    node_id: str | None = None
    proc: Proc | None = None
    pids: list[int] = dataclasses.field(default_factory=list)
    killed: dict[int, float] = dataclasses.field(default_factory=dict)  # pid -> when kill -9 was sent (time.time())

    def start(self, wait: bool = True) -> Proc:
        self.proc = self.launch()
        self.pids.append(self.proc.pid)
        if wait:
            self.ready(self.proc)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


@dataclasses.dataclass(frozen=True)
class Limits:
    """The settings the faults are sized against."""

    claim_lease_s: float
    node_ttl_s: float


class Nemesis:
    """The faults, chosen by ``rng`` and logged on ``timeline``; what could not be recovered
    (a process that would not start again) is kept in ``problems``."""

    def __init__(self, rng: random.Random, timeline: Timeline, *, workers: list[Member], agents: list[Member],
                 redis_server: RestartableRedis, limits: Limits, cli: Cli, quota_args: list[str]):
        self.rng, self.timeline = rng, timeline
        self.workers, self.agents, self.redis_server = workers, agents, redis_server
        self.limits, self.cli, self.quota_args = limits, cli, quota_args
        self.problems: list[str] = []  # faults the scenario could not recover from by itself
        self.done: list[str] = []  # the kinds of fault done, in order
        self.stopped: set[int] = set()

    def run(self, duration_s: float) -> None:
        """Every kind of fault once, then random ones until ``duration_s`` has passed."""
        kinds = [self.kill_worker, self.kill_agent, self.pause_worker, self.pause_agent, self.pause_redis,
                 self.crash_redis, self.set_quota]
        plan = self.rng.sample(kinds, len(kinds))
        end = time.monotonic() + duration_s
        while plan or time.monotonic() < end:
            fault = plan.pop(0) if plan else self.rng.choice(kinds)
            self.done.append(fault.__name__)
            fault()
            time.sleep(self.rng.uniform(1.5, 3.5))

    def log(self, what: str) -> None:
        self.timeline.log(f"nemesis: {what}")

    # -- the faults ----------------------------------------------------------------

    def kill_worker(self) -> None:
        self._kill_and_restart(self.rng.choice(self.workers))

    def kill_agent(self) -> None:
        self._kill_and_restart(self.rng.choice(self.agents))

    def pause_worker(self) -> None:
        self._pause_member(self.rng.choice(self.workers), self.limits.claim_lease_s + self.rng.uniform(1.0, 2.5))

    def pause_agent(self) -> None:
        self._pause_member(self.rng.choice(self.agents), self.limits.node_ttl_s + self.rng.uniform(1.0, 3.0))

    def pause_redis(self) -> None:
        self._pause(self._redis_pid(), self.rng.uniform(0.7, 2.0), "redis-server")

    def crash_redis(self) -> None:
        server = self.redis_server.live
        assert server.process is not None
        self.log(f"kill -9 redis-server (pid {server.process.pid})")
        server.process.kill()
        server.process.wait(30)
        try:
            self.redis_server.restart()
        except Exception as exc:  # EmbeddedRedisError: nothing works without it
            self._problem(f"redis-server did not start again on its append-only file: {exc!r}")
            return
        self.log(f"redis-server restarted on its append-only file (pid {self._redis_pid()})")

    def set_quota(self) -> None:
        self.log(f"poolq {' '.join(self.quota_args)}")
        try:
            done = self.cli(self.quota_args)
        except subprocess.TimeoutExpired:
            self.log("the quota command did not finish")
            return
        self.log(f"quota command exited {done.returncode}: {(done.stdout + done.stderr).strip()[-300:]}")

    # -- healing ---------------------------------------------------------------------

    def heal(self) -> None:
        """Everything running again: continue what is stopped, start what has exited."""
        self.resume_all()
        for member in self.workers + self.agents:
            if not member.alive():
                code = member.proc.process.returncode if member.proc and member.proc.process else None
                self._problem(f"{member.name} had exited by itself (status {code}); starting it again")
                self._start(member)

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            self._signal(pid, signal.SIGCONT)
            self.stopped.discard(pid)

    # -- helpers ---------------------------------------------------------------------

    def _kill_and_restart(self, member: Member) -> None:
        assert member.proc is not None
        self.log(f"kill -9 {member.name} (pid {member.proc.pid})")
        if member.proc.alive():
            member.killed[member.proc.pid] = time.time()
            kill9(member.proc)
        self._start(member)

    def _start(self, member: Member, attempts: int = 3) -> None:
        """Start it again, as a supervisor would: a start that fails is a problem; one that
        exited is tried again, one that did not come up in time is not."""
        for _ in range(attempts):
            try:
                proc = member.start()
            except AssertionError as exc:  # it exited while starting, or did not come up in time
                assert member.proc is not None
                if member.proc.alive():
                    self._problem(f"{member.name} did not come up: {str(exc).splitlines()[0]}")
                    return
                said = [line for line in member.proc.output().splitlines() if line.strip()][-1:] or ["(no output)"]
                self._problem(f"{member.name} exited while starting; its last words: {said[0].strip()[:300]} "
                              f"(log {member.proc.log_path})")
                continue
            self.log(f"{member.name} started again (pid {proc.pid})")
            return

    def _pause_member(self, member: Member, seconds: float) -> None:
        if member.proc is None or not member.alive():
            self.log(f"{member.name} is not running: not paused")
            return
        self._pause(member.proc.pid, seconds, member.name)

    def _pause(self, pid: int, seconds: float, what: str) -> None:
        self.log(f"SIGSTOP {what} (pid {pid}) for {seconds:.1f}s")
        with self._stopped(pid):
            time.sleep(seconds)
        self.log(f"SIGCONT {what} (pid {pid})")

    @contextlib.contextmanager
    def _stopped(self, pid: int) -> Iterator[None]:
        self.stopped.add(pid)
        self._signal(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            self._signal(pid, signal.SIGCONT)
            self.stopped.discard(pid)

    def _redis_pid(self) -> int:
        process = self.redis_server.live.process
        assert process is not None
        return process.pid

    def _problem(self, what: str) -> None:
        self.problems.append(what)
        self.log(f"PROBLEM: {what}")

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
