"""The Redis master killed (kill -9) under submission load, with Sentinel (docs/faults.md).

Every process reaches Redis through three sentinels (a ``redis+sentinel://`` URL). The
master dies for good; the sentinels promote a replica, and the same API, placement worker
and node agent go on with it without a restart. With POOLQ_REDIS_WAIT_REPLICAS=1 an
acceptance means a replica had the job, so no acknowledged job is lost by the switch:
the checker of the fault suite finds every one of them SUCCEEDED, once, and no
reservation left over. During the failover answers are 503s, never 500s.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from poolq.embedded import ReplicatedRedis
from poolq.redis_io import connect
from poolq.settings import Settings
from tests.faults.checker import check
from tests.faults.conftest import Jobs, Stack
from tests.faults.test_redis_restart import Load
from tests.procs import Proc, wait_for

RECOVERY_S = 30.0  # the bound this test holds the failover to (sentinels: 1 s down-after; measured: a few s)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    """A master, two replicas and three sentinels (overrides the fault suite's one Redis):
    one replica to promote, one left to confirm acceptances after the switch."""
    servers = ReplicatedRedis(tmp_path / "redis", replicas=2)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
def redis_client(redis_server: ReplicatedRedis) -> Iterator[redis.Redis]:
    client = connect(Settings(redis_url=redis_server.url), timeout_s=2, retries=3)
    yield client
    client.close()


def test_the_master_killed_under_load_fails_over_and_loses_no_acknowledged_job(
    start_proc: Callable[..., Proc], stack: Stack, jobs: Jobs, redis_client: redis.Redis,
    redis_server: ReplicatedRedis, fault_env: dict[str, str], admin: Any,
) -> None:
    env = {**fault_env, "POOLQ_REDIS_WAIT_REPLICAS": "1"}
    stack.env = env
    wait_for(lambda: int(redis_client.info("replication")["connected_slaves"]) == 2, 30, what="both replicas")
    _, server = stack.api()
    worker = stack.worker()
    agent = stack.agent("n1")

    load = Load(server, jobs).start()
    wait_for(lambda: len(load.accepted()) >= 60, 90, 0.05, what="submissions accepted before the kill")
    master = redis_server.members["redis"]
    assert master.process is not None
    os.kill(master.process.pid, signal.SIGKILL)
    master.process.wait(10)
    killed_at = time.monotonic()
    wait_for(lambda: load.count(lambda a: a.kind == "submit" and a.sent > killed_at and a.status == 200) >= 1,
             RECOVERY_S, 0.05, what=f"a submission accepted again within {RECOVERY_S:g} s of the master's death")
    recovered_after = min(a.received for a in load.answers if a.kind == "submit" and a.sent > killed_at
                          and a.status == 200) - killed_at
    wait_for(lambda: load.count(lambda a: a.kind == "submit" and a.sent > killed_at and a.status == 200) >= 60, 120,
             0.1, what="submissions accepted after the failover")
    answers = load.finish()
    print(f"failover: first acceptance {recovered_after:.2f} s after the master was killed")

    problems: list[str] = []
    unexpected = [(a.kind, a.status, a.body) for a in answers if a.status not in (200, 503)]
    if unexpected:
        problems.append(f"answers other than 200 or 503 (a 500 is a bug): {len(unexpected)}, e.g. {unexpected[:5]}")
    new_master = redis_server.master()
    if new_master in (None, "redis"):
        problems.append(f"the sentinels name {new_master!r} master after the kill")
    for name, proc in (("worker", worker), ("agent", agent)):
        if not proc.alive():
            problems.append(f"poolq {name} exited across the failover:\n{proc.output()[-2000:]}")
    accepted = [a.submission_id for a in answers if a.kind == "submit" and a.status == 200]
    try:
        outcome = check(redis_client, accepted, jobs.runs_file, admin, timeout=90)  # type: ignore[arg-type]
    except AssertionError as exc:
        problems.append(str(exc))
    else:
        if outcome.by_status() != {"SUCCEEDED": len(accepted)}:
            problems.append(f"acknowledged jobs not SUCCEEDED after the failover: {dict(outcome.by_error())}")
    assert not problems, "\n".join(problems)


def test_with_wait_replicas_a_job_starts_and_its_end_is_kept_only_once_a_replica_has_it(
    stack: Stack, jobs: Jobs, redis_client: redis.Redis, redis_server: ReplicatedRedis, fault_env: dict[str, str],
) -> None:
    """A start or an end no replica has would be lost by a failover, and the job would run
    a second time (the kill test above saw it): the agent runs a job only once a replica
    confirms its start, and sends its end again until one confirms it."""
    from api_shim.app import App
    from tests.faults.conftest import submit_batch

    stack.env = {**fault_env, "POOLQ_REDIS_WAIT_REPLICAS": "1"}
    wait_for(lambda: int(redis_client.info("replication")["connected_slaves"]) == 2, 30, what="both replicas")
    app = App(Settings(redis_url=redis_server.url, redis_wait_replicas=1))
    replicas = [m.process for name, m in redis_server.members.items() if name != "redis"]
    ran = lambda: jobs.runs_file.read_text().split()  # noqa: E731

    def pause(sig: int) -> None:
        for process in replicas:
            assert process is not None
            os.kill(process.pid, sig)

    (first,) = submit_batch(app, [jobs.body()])  # confirmed, and nowhere to run yet
    stack.worker()
    pause(signal.SIGSTOP)
    try:
        agent = stack.agent("n1")
        wait_for(lambda: "no replica confirmed the job's start" in agent.output(), 30, what="the unconfirmed start")
        time.sleep(1)
        assert ran() == [], "a job ran whose start no replica had"
    finally:
        pause(signal.SIGCONT)
    wait_for(lambda: ran() == [first], 30, what="the job to run once a replica confirms its start")

    (second,) = submit_batch(app, [jobs.body(sleep_s=2)])
    wait_for(lambda: second in ran(), 30, what="the second job to run")
    pause(signal.SIGSTOP)
    try:
        wait_for(lambda: "no replica confirmed how the job ended" in agent.output(), 30, what="the unconfirmed end")
    finally:
        pause(signal.SIGCONT)
    wait_for(lambda: redis_client.hget(f"poolq:job:default:{second}", "status") == "SUCCEEDED", 30,
             what="the second job to be SUCCEEDED")
    assert sorted(ran()) == sorted([first, second]) and agent.alive()
