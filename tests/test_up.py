"""`poolq up` as a user runs it: the whole stack in one foreground process (docs/operations.md)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from poolq.embedded import free_port
from tests.kit import SETTLE_S, START_S
from tests.procs import wait_for

JOB = {"entrypoint": "echo hello from poolq", "runtime_env": {"working_dir": "/tmp"}, "entrypoint_num_cpus": 1}

pytestmark = pytest.mark.processes  # `poolq up` and `poolq nodes list` as subprocesses


def http(method: str, url: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Up:
    """One `poolq up` in its own data directory, on a free port."""

    def __init__(self, data_dir: Path, port: int, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
        env.update(POOLQ_DATA_DIR=str(data_dir), POOLQ_DRAIN_S="5", PYTHONUNBUFFERED="1")
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poolq", "up", "--port", str(port), "--cpus", "2", "--memory", "2Gi"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        try:
            return http("GET", self.url + "/healthz")[0] == 200 and bool(http("GET", self.url + "/api/nodes")[1])
        except OSError:
            return False

    def interrupt(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "poolq-data"


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_processes(pid: int) -> list[int]:
    """The live children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat_fields[0] != "Z" and int(stat_fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_up_serves_runs_stops_and_keeps_jobs_across_restarts(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    first = Up(data_dir, port, tmp_path / "up-1.log")
    try:
        wait_for(first.ready, timeout=START_S, what="poolq up to serve and register its node")
        url_file = data_dir / "redis.url"
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        redis_url = url_file.read_text().strip()
        assert redis_url.startswith("redis://:") and "@127.0.0.1:" in redis_url  # a password, loopback

        status, answer = http("POST", first.url + "/api/jobs", JOB)
        assert status == 200, answer
        submission_id = answer["submission_id"]
        record = wait_for(
            lambda: (r := http("GET", f"{first.url}/api/jobs/{submission_id}")[1])["status"] == "SUCCEEDED" and r,
            timeout=SETTLE_S, what="the job to succeed",
        )
        assert record["driver_exit_code"] == 0
        assert http("GET", f"{first.url}/api/jobs/{submission_id}/logs")[1] == {"logs": "hello from poolq\n"}
        children = session_processes(first.process.pid)
        assert len(children) >= 4  # redis-server, api, worker, node
        assert first.interrupt() == 0
    finally:
        first.kill()
    wait_for(lambda: not [pid for pid in children if alive(pid)], timeout=10, what="every child of poolq up to exit")
    output = (tmp_path / "up-1.log").read_text()
    assert "stopping" in output and "append-only file flushed" in output

    second = Up(data_dir, port, tmp_path / "up-2.log")
    try:
        wait_for(second.ready, timeout=START_S, what="poolq up to start again")
        status, record = http("GET", f"{second.url}/api/jobs/{submission_id}")
        assert status == 200 and record["status"] == "SUCCEEDED"
        assert [job["submission_id"] for job in http("GET", second.url + "/api/jobs")[1]] == [submission_id]
    finally:
        assert second.interrupt() == 0


def test_commands_without_redis_say_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
    env["POOLQ_DATA_DIR"] = str(tmp_path / "empty")
    done = subprocess.run([sys.executable, "-m", "poolq", "nodes", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "run `poolq up`" in done.stderr and "POOLQ_REDIS_URL" in done.stderr
