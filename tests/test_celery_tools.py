"""Celery's own tools against poolq's processes: ``celery -A poolq.celery_app inspect ping``
answers with the live workers, and ``celery -A poolq.celery_app events --dump`` sees task
events when POOLQ_TASK_EVENTS is on, and none when it is off (what Flower shows).

Everything is a real process: a ``poolq worker`` and a ``poolq node`` subprocess, the
``celery`` command as a user runs it, the test publishing wake-ups as the API does.
Flower itself is not a poolq dependency; what it does that broke (many inspect commands
at once) is done here from threads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from poolq import queues
from poolq.messaging import create_celery
from poolq.settings import Settings
from tests.kit import SETTLE_S
from tests.procs import Proc, Process, wait_for

CELERY = [sys.executable, "-m", "celery", "-A", "poolq.celery_app"]


def celery_env(service_env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its own POOLQ_* settings, plus the test's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}, **service_env}


def celery(service_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CELERY, *args], env=celery_env(service_env), capture_output=True, text=True,
                          timeout=SETTLE_S, stdin=subprocess.DEVNULL)


def ready(proc: Proc) -> None:
    """Wait for the process's Celery worker to consume (it logs ``<hostname> ready.``)."""
    def consuming() -> bool:
        assert proc.alive(), f"{proc.name} exited:\n{proc.tail(30)}"
        return " ready." in proc.output()

    wait_for(consuming, SETTLE_S, interval=0.1, what=f"{proc.name}'s Celery worker to be ready")


def test_inspect_ping_answers_with_every_live_worker(start_proc: Any, service_env: dict[str, str]) -> None:
    worker = start_proc(["worker"], name="worker")
    node = start_proc(["node", "--id", "celery-n1", "--cpus", "1", "--memory", "1Gi"], name="node")
    ready(worker)
    ready(node)
    expected = {f"placement-{worker.pid}@", f"node-celery-n1-{node.pid}@"}
    seen: list[str] = []

    def answered() -> bool:  # a broadcast sent before a consumer subscribed is not seen: ask again
        result = celery(service_env, "inspect", "ping", "--timeout", "5")
        seen.append(result.stdout + result.stderr)
        return result.returncode == 0 and all(name in result.stdout for name in expected)

    try:
        wait_for(answered, SETTLE_S, interval=0.5, what="both workers to answer the ping")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last answer:\n{seen[-1] if seen else ''}") from None
    pongs = re.findall(r"->\s+(\S+): OK\s+pong", seen[-1])
    assert {name for name in expected if any(p.startswith(name) for p in pongs)} == expected, seen[-1]


# Flower's shape: many inspect commands at once, each from a thread of its own.
CONCURRENT_INSPECTS = """
import json, threading, time
from poolq.celery_app import app
answers = []
threads = [threading.Thread(target=lambda: answers.append(app.control.inspect(timeout=3).stats() or {}), daemon=True)
           for _ in range(12)]
for thread in threads:
    thread.start()
deadline = time.monotonic() + 40
for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
print(json.dumps({"answered": len(answers), "workers": sorted(set().union(*answers))}))
"""


def test_inspect_commands_from_many_threads_at_once_all_answer(start_proc: Any, service_env: dict[str, str]) -> None:
    """What Flower does: with a bounded connection pool (poolq's processes keep 4) these
    threads deadlock, each holding a connection while waiting for a producer from the
    same pool, and Flower shows neither workers nor tasks."""
    worker = start_proc(["worker"], name="worker")
    ready(worker)
    result = subprocess.run([sys.executable, "-c", CONCURRENT_INSPECTS], env=celery_env(service_env),
                            capture_output=True, text=True, timeout=SETTLE_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["answered"] == 12, answer
    assert any(name.startswith(f"placement-{worker.pid}@") for name in answer["workers"]), answer


def test_the_app_without_a_redis_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}, "POOLQ_DATA_DIR": str(tmp_path)}
    result = subprocess.run([*CELERY, "inspect", "ping"], env=env, capture_output=True, text=True, timeout=SETTLE_S,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poolq: no Redis configured: "), lines
    assert str(tmp_path) in lines[0] and "POOLQ_REDIS_URL" in lines[0]


@pytest.mark.parametrize("events", [True, False], ids=["events-on", "events-off"])
def test_task_events_reach_celery_events_only_when_turned_on(start_proc: Any, service_env: dict[str, str],
                                                            tmp_path: Path, events: bool) -> None:
    env = {**service_env, "POOLQ_TASK_EVENTS": "1" if events else "0"}
    worker = start_proc(["worker"], env=env, name="worker")
    ready(worker)
    hostname = f"placement-{worker.pid}@"
    dump = Process([*CELERY, "events", "--dump"], celery_env(env), tmp_path / "events.log", name="celery events")
    app = create_celery(Settings.from_env(env))  # a publisher as the API is, with the same setting
    dump.start()
    try:
        def heartbeats() -> int:
            assert dump.alive(), f"celery events exited:\n{dump.tail()}"
            return sum(1 for line in dump.output().splitlines() if line.startswith(hostname) and " heartbeat:" in line)

        # Worker heartbeats are sent with task events off too: one seen means the dump listens.
        wait_for(heartbeats, SETTLE_S, interval=0.1, what="a heartbeat of the worker in the dump")
        task_id = app.send_task(queues.PLACE, queue=queues.PLACEMENT).id
        wait_for(lambda: f"poolq.place[{task_id}] succeeded" in worker.output(), SETTLE_S, interval=0.1,
                 what="the worker to run the wake-up")
        if events:
            wait_for(lambda: _task_events(dump.output(), task_id) >= {"sent", "received", "started", "succeeded"},
                     SETTLE_S, interval=0.1, what="the task's events in the dump")
            succeeded = [line for line in dump.output().splitlines()
                         if f"task succeeded: poolq.place({task_id})" in line]
            assert len(succeeded) == 1 and succeeded[0].startswith(hostname), succeeded
        else:
            # Two heartbeats after the task ran: any task event of it would have come by then.
            after = heartbeats()
            wait_for(lambda: heartbeats() >= after + 2, SETTLE_S, interval=0.1, what="two more heartbeats")
            assert _task_events(dump.output(), task_id) == set()
            assert " task " not in dump.output()
    finally:
        dump.stop()
        app.close()


def _task_events(output: str, task_id: str) -> set[str]:
    """The kinds of task event (sent, received, started, succeeded…) the dump printed for a task."""
    return set(re.findall(rf"task (\w+): poolq\.place\({re.escape(task_id)}\)", output))
