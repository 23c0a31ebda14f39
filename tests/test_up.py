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
    """One `poolq up` on a port; its data directory by POOLQ_DATA_DIR, or ``env`` and ``cwd``."""

    def __init__(self, data_dir: Path | None, port: int, log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, stdout: str | None = None, args: tuple[str, ...] = ()):
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
        child_env.update(POOLQ_DRAIN_S="5", PYTHONUNBUFFERED="1", **(env or {}))
        if data_dir is not None:
            child_env["POOLQ_DATA_DIR"] = str(data_dir)
        self.log_path = log_path
        self.log = open(stdout or log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poolq", "up", "--port", str(port), "--cpus", "2", "--memory", "2Gi", *args],
            env=child_env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=cwd,
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


def open_files(pid: int) -> set[Path]:
    try:
        return {Path(os.readlink(fd)) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return set()


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
        logged = poolq_cli("logs", submission_id, "--json", "--server", first.url, env={})
        assert logged.returncode == 0, logged.stderr
        assert json.loads(logged.stdout) == {"logs": "hello from poolq\n", "offset": len("hello from poolq\n")}
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
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert "`poolq up`" in done.stderr and "POOLQ_REDIS_URL" in done.stderr and "--data-dir" in done.stderr
    assert str(tmp_path / "empty") in done.stderr


def poolq_cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
    return subprocess.run([sys.executable, "-m", "poolq", *args], env={**clean, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_one_stack_per_data_directory_and_a_busy_port_refused_before_anything_starts(data_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """The first stack writes its output to /dev/full (a full disk): it must still serve and
    run jobs (its children never block on their logging). A second `poolq up` on its data
    directory is refused, naming it; a third on another data directory but its port is
    refused before it starts anything."""
    port = free_port()
    first = Up(data_dir, port, tmp_path / "unused.log", stdout="/dev/full")
    try:
        wait_for(first.ready, timeout=START_S, what="poolq up, writing to /dev/full, to serve and register its node")
        url_before = (data_dir / "redis.url").read_text()
        # redis-server holds the lock with it: were poolq up killed, its Redis would still
        # keep a second stack off this append-only file until it is gone.
        holders = [pid for pid in session_processes(first.process.pid) if open_files(pid) & {data_dir / "up.lock"}]
        assert [Path(f"/proc/{pid}/exe").resolve().name for pid in holders] == ["redis-server"]

        second = poolq_cli("up", "--port", str(free_port()), env={"POOLQ_DATA_DIR": str(data_dir)})
        assert second.returncode != 0
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"pid {first.process.pid}" in second.stderr and first.url in second.stderr, second.stderr
        assert str(data_dir) in second.stderr
        assert (data_dir / "redis.url").read_text() == url_before  # nothing of the first was touched

        other = tmp_path / "other-data"
        third = poolq_cli("up", "--port", str(port), env={"POOLQ_DATA_DIR": str(other)})
        assert third.returncode != 0
        assert third.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in third.stderr and "--port" in third.stderr
        assert not (other / "redis.url").exists() and not (other / "redis").exists()  # nothing started

        # Its children kept working while none of their output could be written.
        status, answer = http("POST", first.url + "/api/jobs", JOB)
        assert status == 200, answer
        wait_for(lambda: http("GET", f"{first.url}/api/jobs/{answer['submission_id']}")[1]["status"] == "SUCCEEDED",
                 timeout=SETTLE_S, what="the job to succeed under a stack whose output is a full disk")
        assert http("GET", first.url + "/healthz")[0] == 200
        assert first.interrupt() == 0
    finally:
        first.kill()
    # Once the first has stopped, its data directory can be used again.
    again = Up(data_dir, port, tmp_path / "again.log")
    try:
        wait_for(again.ready, timeout=START_S, what="poolq up to start once the first stopped")
    finally:
        assert again.interrupt() == 0


def test_up_says_it_is_up_once_it_serves_and_the_admin_commands_find_it_from_anywhere(tmp_path: Path) -> None:
    """No POOLQ_DATA_DIR: `poolq up` in a checkout uses the per-user data directory, and
    the admin commands run elsewhere find its Redis there."""
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    checkout.mkdir()
    elsewhere.mkdir()
    port = free_port()
    up = Up(None, port, tmp_path / "up.log", env=state, cwd=checkout)
    try:
        wait_for(lambda: "poolq is up" in (tmp_path / "up.log").read_text(), timeout=START_S, what="poolq is up")
        # It says so once /healthz answers 200, so right after, the API serves and can place.
        assert http("GET", up.url + "/healthz")[0] == 200
        output = (tmp_path / "up.log").read_text()
        assert f"API on {up.url}" in output and "try: " in output and "submit --wait" in output
        assert not (checkout / ".poolq").exists()
        assert (tmp_path / "state" / "poolq" / "redis.url").exists()

        listed = poolq_cli("nodes", "list", "--json", env=state, cwd=elsewhere)
        assert listed.returncode == 0, listed.stderr
        assert [node["state"] for node in json.loads(listed.stdout)] == ["live"]
        text = poolq_cli("nodes", "list", env=state, cwd=elsewhere)
        assert " 2.0Gi/2.0Gi " in text.stdout, text.stdout  # memory shown human-readably
    finally:
        assert up.interrupt() == 0
    down = poolq_cli("nodes", "list", env=state, cwd=elsewhere)
    assert down.returncode == 1 and down.stderr.count("\n") == 1, down.stderr
    assert "does not answer" in down.stderr and "no poolq up is running" in down.stderr, down.stderr
