"""Ray's own Job Submission SDK and ``ray job`` CLI against a live poolq (docs/api.md).

No mocks: ``ray.job_submission.JobSubmissionClient`` and the ``ray`` executable of the
test venv talk HTTP to a real ``poolq api`` (granian), with a real ``poolq node``
running the entrypoints and placement in the test's process (a placement worker's
scheduler and duties, tests/kit.py). The stack is started once for the module,
on a Redis of its own, so that other modules' key wipes never touch it.

Ray's client reads RAY_ADDRESS / RAY_API_SERVER_ADDRESS from the environment and lets
them override the address it is given: every test runs with both unset, and every
address is given with ``http://`` (without a scheme Ray looks for a Ray cluster).
"""

from __future__ import annotations

import asyncio
import io
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests

from poolq.embedded import EmbeddedRedis, free_port
from poolq.settings import Settings
from tests.kit import SETTLE_S, START_S, TERMINAL_STATUSES, Placement
from tests.procs import Proc, wait_for

pytest.importorskip("pydantic")
aiohttp = pytest.importorskip("aiohttp")
job_submission = pytest.importorskip("ray.job_submission")
JobSubmissionClient = job_submission.JobSubmissionClient
JobStatus = job_submission.JobStatus
JobDetails = job_submission.JobDetails

RAY_ENV_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_HEADERS", "RAY_JOB_SUBMIT_HOOK", "RAY_RUNTIME_ENV_LOCAL_DEV_MODE")
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")
CLI_TIMEOUT_S = 90.0
NODE_ID = "ray-n1"

# One stack for the module: its tests share one xdist worker (`--dist loadgroup`).
pytestmark = [pytest.mark.ray, pytest.mark.processes, pytest.mark.xdist_group("ray-stack"), pytest.mark.timeout(180)]


# -- the live stack ------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    redis: redis.Redis
    base: Path
    procs: list[Proc]
    placement: Placement
    env: dict[str, str]

    def logs(self) -> str:
        return "\n".join(f"--- {p.args[0]} ---\n{p.output()[-4000:]}" for p in self.procs)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/livez", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _node_alive(url: str) -> bool:
    try:
        nodes = requests.get(f"{url}/api/nodes", timeout=2).json()
    except (requests.RequestException, ValueError):
        return False
    return any(n.get("node_id") == NODE_ID and n.get("alive") for n in nodes)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("ray_sdk")
    server = EmbeddedRedis(base / "redis", appendonly=False)
    server.start()
    env = {
        "POOLQ_REDIS_URL": server.url,
        "POOLQ_DATA_DIR": str(base / "data"),
        "POOLQ_DUTY_INTERVAL_S": "0.1",
        "POOLQ_STOP_GRACE_S": "2",
        "POOLQ_DRAIN_S": "1",
        "POOLQ_HEARTBEAT_S": "0.5",
        # Entrypoints say `python main.py`: the test venv's python comes first.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    placement = Placement(Settings.from_env(env)).start()
    try:
        procs.append(Proc(["api", "--port", str(port), "--workers", "2"], env, base / "api.log").start())
        procs.append(Proc(["node", "--id", NODE_ID, "--cpus", "4", "--memory", "4Gi", "--resources", "NPU=4"], env, base / "node.log").start())
        wait_for(lambda: _healthy(url), START_S, 0.1, what="poolq api to answer /livez")
        wait_for(lambda: _node_alive(url), START_S, 0.1, what=f"node {NODE_ID} to register")
        yield Stack(url, redis.Redis.from_url(server.url), base, procs, placement, env)
    finally:
        for proc in reversed(procs):
            proc.stop()
        placement.stop()
        server.stop()


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the given address."""
    for name in RAY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class RecordingClient(JobSubmissionClient):  # type: ignore[misc, valid-type]
    """The real client; it only notes each request it sends (method, endpoint)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.requests_sent: list[tuple[str, str]] = []
        super().__init__(*args, **kwargs)

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        self.requests_sent.append((method.upper(), endpoint))
        return super()._do_request(method, endpoint, **kwargs)


@pytest.fixture
def client(stack: Stack) -> RecordingClient:
    return RecordingClient(stack.url)


def project(directory: Path, payload: str) -> Path:
    """A working directory holding a data file and a script that prints it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "payload.txt").write_text(payload + "\n")
    (directory / "main.py").write_text(
        "import os, sys\n"
        "with open(os.path.join('data', 'payload.txt')) as handle:\n"
        "    print('payload:', handle.read().strip())\n"
        "print('argv:', ' '.join(sys.argv[1:]))\n"
        "print('greeting:', os.environ.get('GREETING', '-'))\n"
        "sys.stdout.flush()\n"
    )
    return directory


def wait_job(client: Any, submission_id: str, *statuses: Any, timeout: float = SETTLE_S, stack: Stack | None = None) -> Any:
    """Poll get_job_status until it is one of ``statuses``; fail at once on another terminal status."""
    seen: list[Any] = []

    def reached() -> bool:
        status = client.get_job_status(submission_id)
        seen.append(status)
        if status in TERMINAL_STATUSES and status not in statuses:
            info = client.get_job_info(submission_id)
            raise AssertionError(f"job {submission_id} ended {status} ({info.message}); wanted {statuses}"
                                 + (f"\n{stack.logs()}" if stack else ""))
        return status in statuses

    wait_for(reached, timeout, 0.2, what=f"job {submission_id} to be {'/'.join(map(str, statuses))}")
    return seen[-1]


def package_keys(stack: Stack) -> list[bytes]:
    return sorted(stack.redis.scan_iter("poolq:pkg:*"))


# -- SDK -----------------------------------------------------------------------------


def test_version_handshake(stack: Stack, client: RecordingClient) -> None:
    # The constructor's two GET /api/version passed (ray_version >= 2.0); the CLI's level
    # is 4, so `ray job submit` and `ray job logs --follow` tail over the WebSocket.
    assert client.requests_sent[:2] == [("GET", "/api/version"), ("GET", "/api/version")]
    assert client.get_version() == "4"


def test_submit_uploads_working_dir_and_runs(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    payload = f"sdk-payload-{uuid.uuid4().hex}"
    workdir = project(tmp_path / "proj", payload)
    before = time.time() * 1000
    sid = client.submit_job(entrypoint="python main.py --flag 'a b'", runtime_env={"working_dir": str(workdir)},
                            metadata={"owner": "ray-sdk-test", "purpose": "upload"})
    assert sid.startswith("app-")

    # The SDK asked whether the package exists (404), uploaded it, then submitted.
    sent = client.requests_sent[2:]
    package_requests = [r for r in sent if r[1].startswith("/api/packages/")]
    assert [m for m, _ in package_requests] == ["GET", "PUT"], sent
    _, package_path = package_requests[0]
    assert package_path.startswith("/api/packages/gcs/_ray_pkg_") and package_path.endswith(".zip")
    assert package_requests[1][1] == package_path
    assert sent[-1] == ("POST", "/api/jobs/")
    package_name = package_path.rsplit("/", 1)[1]
    assert stack.redis.exists(f"poolq:pkg:default:{package_name}")
    stored = stack.redis.get(f"poolq:pkg:default:{package_name}")
    assert isinstance(stored, bytes)
    assert {"main.py", "data/payload.txt"} <= set(zipfile.ZipFile(io.BytesIO(stored)).namelist())

    assert wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack) == JobStatus.SUCCEEDED
    info = client.get_job_info(sid)
    assert isinstance(info, JobDetails)
    assert info.type.value == "SUBMISSION"
    assert info.status == JobStatus.SUCCEEDED
    assert info.submission_id == sid
    assert info.entrypoint == "python main.py --flag 'a b'"
    assert info.metadata == {"owner": "ray-sdk-test", "purpose": "upload"}
    assert info.runtime_env is not None and info.runtime_env["working_dir"] == f"gcs://{package_name}"
    assert info.driver_exit_code == 0
    assert info.driver_node_id == NODE_ID
    assert info.error_type is None
    assert isinstance(info.message, str) and info.message
    assert isinstance(info.start_time, int) and isinstance(info.end_time, int)
    assert before - 5000 <= info.start_time <= info.end_time <= time.time() * 1000 + 5000

    logs = client.get_job_logs(sid)
    assert f"payload: {payload}" in logs  # the file was read from the job's working directory
    assert "argv: --flag a b" in logs

    listed = client.list_jobs()
    assert all(isinstance(job, JobDetails) for job in listed)
    mine = [job for job in listed if job.submission_id == sid]
    assert len(mine) == 1 and mine[0].status == JobStatus.SUCCEEDED

    # The same directory again: the package exists, so there is no second upload.
    client.requests_sent.clear()
    sid2 = client.submit_job(entrypoint="python main.py", runtime_env={"working_dir": str(workdir)})
    assert sid2 != sid
    package_requests = [r for r in client.requests_sent if r[1].startswith("/api/packages/")]
    assert package_requests == [("GET", package_path)], client.requests_sent
    assert [k for k in package_keys(stack) if package_name.encode() in k] == [f"poolq:pkg:default:{package_name}".encode()]
    wait_job(client, sid2, JobStatus.SUCCEEDED, stack=stack)
    assert f"payload: {payload}" in client.get_job_logs(sid2)


def test_submit_excludes_are_honoured(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    # Ray's SDK applies `excludes` while zipping and still sends them: poolq accepts and stores them.
    workdir = project(tmp_path / "excl", "kept")
    (workdir / "secret.txt").write_text("do not ship\n")
    sid = client.submit_job(entrypoint="python main.py; test -e secret.txt && echo SHIPPED || echo NOT-SHIPPED",
                            runtime_env={"working_dir": str(workdir), "excludes": ["secret.txt"]})
    wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack)
    logs = client.get_job_logs(sid)
    assert "payload: kept" in logs and "NOT-SHIPPED" in logs
    assert client.get_job_info(sid).runtime_env["excludes"] == ["secret.txt"]


def test_submit_local_zip_working_dir(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    # A local archive is uploaded as is, named after the sha1 of its bytes (40 hex digits).
    # Ray unpacks a gcs:// package as it is (remove_top_level_directory=False in Ray's
    # packaging.download_and_unpack_package), so the files sit at the archive's root.
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("main.py", "print('from the zip', open('data.txt').read().strip())\n")
        handle.writestr("data.txt", "zipped-data\n")
    sid = client.submit_job(entrypoint="python main.py", runtime_env={"working_dir": str(archive)})
    working_dir = client.get_job_info(sid).runtime_env["working_dir"]
    assert working_dir.startswith("gcs://_ray_pkg_") and len(working_dir) == len("gcs://_ray_pkg_") + 40 + len(".zip")
    wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack)
    assert "from the zip zipped-data" in client.get_job_logs(sid)


def test_submit_without_working_dir_is_refused(client: RecordingClient) -> None:
    # docs/api.md: working_dir is required; the SDK sends runtime_env {} and shows the 400 body.
    with pytest.raises(RuntimeError) as caught:
        client.submit_job(entrypoint="echo no working dir")
    text = str(caught.value)
    assert "400" in text
    assert "working_dir" in text


def test_submit_with_every_option(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    payload = f"opts-{uuid.uuid4().hex[:8]}"
    workdir = project(tmp_path / "opts", payload)
    wanted_id = f"raysdk-{uuid.uuid4().hex[:12]}"
    sid = client.submit_job(
        entrypoint='python main.py && echo "res=$POOLQ_RESOURCES cpus=$POOLQ_NUM_CPUS mem=$POOLQ_MEMORY"',
        submission_id=wanted_id,
        runtime_env={"working_dir": str(workdir), "env_vars": {"GREETING": "hello-from-env"}},
        entrypoint_num_cpus=0.5,
        entrypoint_memory=256 * 1024 * 1024,
        entrypoint_resources={"NPU": 2},
        entrypoint_label_selector={"pool": "default"},  # every node carries pool=<its pool>
        metadata={"team": "sdk"},
    )
    # poolq prefixes app- (docs/api.md); the SDK returns the id the server answers.
    assert sid == f"app-{wanted_id}"
    wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack)
    logs = client.get_job_logs(sid)
    assert f"payload: {payload}" in logs
    assert "greeting: hello-from-env" in logs
    assert f"res=NPU=2 cpus=0.5 mem={256 * 1024 * 1024}" in logs
    info = client.get_job_info(sid)
    assert info.metadata == {"team": "sdk"}
    assert info.runtime_env["env_vars"] == {"GREETING": "hello-from-env"}
    # The full record (a superset of JobDetails) carries the effective resources.
    record = requests.get(f"{stack.url}/api/jobs/{sid}", timeout=10).json()
    assert record["entrypoint_num_cpus"] == 0.5
    assert record["entrypoint_memory"] == 256 * 1024 * 1024
    assert record["entrypoint_resources"] == {"NPU": 2}
    assert record["entrypoint_label_selector"] == {"pool": "default"}
    assert record["driver_node_id"] == NODE_ID

    # The same id with a different request is refused (409), and the SDK says so.
    with pytest.raises(RuntimeError, match="409"):
        client.submit_job(entrypoint="echo other", submission_id=wanted_id, runtime_env={"working_dir": str(workdir)})


def _tiny_wheel(directory: Path, marker: str) -> Path:
    """A pure-Python wheel built by hand: module ``poolq_tiny_pkg`` with MARKER."""
    name, version = "poolq_tiny_pkg", "0.1"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"MARKER = {marker!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_submit_with_pip_list(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    # The SDK rewrites pip: [..] into {"packages": [..], "pip_check": false} and adds
    # "_ray_commit" to runtime_env: poolq accepts both and installs into a fresh venv.
    marker = f"tiny-{uuid.uuid4().hex[:8]}"
    wheel = _tiny_wheel(tmp_path / "wheels", marker)
    workdir = tmp_path / "pipproj"
    workdir.mkdir()
    (workdir / "main.py").write_text("import poolq_tiny_pkg\nprint('imported', poolq_tiny_pkg.MARKER)\n")
    sid = client.submit_job(entrypoint="python main.py", runtime_env={"working_dir": str(workdir), "pip": [str(wheel)]})
    record = requests.get(f"{stack.url}/api/jobs/{sid}", timeout=10).json()
    assert record["runtime_env"]["pip"] == {"packages": [str(wheel)], "pip_check": False}
    assert not any(key.startswith("_ray") for key in record["runtime_env"])
    wait_job(client, sid, JobStatus.SUCCEEDED, timeout=120, stack=stack)
    assert f"imported {marker}" in client.get_job_logs(sid)


def test_stop_running_job(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "sleepy", "zzz")
    sid = client.submit_job(entrypoint="sleep 60", runtime_env={"working_dir": str(workdir)})
    wait_job(client, sid, JobStatus.RUNNING, stack=stack)
    assert client.stop_job(sid) is True
    wait_job(client, sid, JobStatus.STOPPED, timeout=20, stack=stack)
    info = client.get_job_info(sid)
    assert info.status == JobStatus.STOPPED
    assert info.end_time is not None and info.start_time is not None and info.end_time >= info.start_time
    assert client.stop_job(sid) is False  # already terminal
    assert client.delete_job(sid) is True


def test_stop_pending_job(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    # 16 CPUs: more than the node has, so the job waits for placement until it is stopped.
    workdir = project(tmp_path / "pending", "never")
    sid = client.submit_job(entrypoint="echo never", runtime_env={"working_dir": str(workdir)}, entrypoint_num_cpus=16)
    assert client.get_job_status(sid) == JobStatus.PENDING
    assert client.stop_job(sid) is True
    wait_job(client, sid, JobStatus.STOPPED, timeout=20, stack=stack)
    info = client.get_job_info(sid)
    assert info.start_time is None and info.end_time is not None
    assert client.get_job_logs(sid) == ""


def test_failed_job_details(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "failing", "boom")
    sid = client.submit_job(entrypoint="echo going down >&2; exit 3", runtime_env={"working_dir": str(workdir)})
    wait_job(client, sid, JobStatus.FAILED, stack=stack)
    info = client.get_job_info(sid)
    assert info.status == JobStatus.FAILED
    assert info.driver_exit_code == 3
    assert info.error_type == "ENTRYPOINT_FAILED"
    assert "going down" in (info.message or "")
    assert "going down" in client.get_job_logs(sid)
    status = ray_job(stack, "status", sid)
    assert status.returncode == 0, _describe(status)
    assert f"Job '{sid}' failed" in status.stdout + status.stderr, _describe(status)


def test_delete_finished_job(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "del", "gone")
    sid = client.submit_job(entrypoint="echo bye", runtime_env={"working_dir": str(workdir)})
    wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack)
    assert client.delete_job(sid) is True
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_info(sid)
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_logs(sid)
    assert sid not in {job.submission_id for job in client.list_jobs()}


def test_delete_running_job_is_refused(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "busy", "busy")
    sid = client.submit_job(entrypoint="sleep 60", runtime_env={"working_dir": str(workdir)})
    try:
        with pytest.raises(RuntimeError, match="409"):
            client.delete_job(sid)
        assert client.get_job_status(sid) in (JobStatus.PENDING, JobStatus.RUNNING)
    finally:
        client.stop_job(sid)
    wait_job(client, sid, JobStatus.STOPPED, timeout=20, stack=stack)


def test_unknown_job_errors(client: RecordingClient) -> None:
    unknown = f"app-missing-{uuid.uuid4().hex[:8]}"
    for call in (client.get_job_info, client.get_job_status, client.get_job_logs, client.stop_job, client.delete_job):
        with pytest.raises(RuntimeError) as caught:
            call(unknown)
        assert "404" in str(caught.value), (call.__name__, caught.value)
        assert unknown in str(caught.value)


# -- the `ray job` CLI ---------------------------------------------------------------


def ray_job(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([RAY_CLI, "job", args[0], "--address", stack.url, *args[1:]], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def _describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def test_cli_submit_status_logs_list_delete(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    payload = f"cli-payload-{uuid.uuid4().hex[:8]}"
    workdir = project(tmp_path / "cliproj", payload)
    wanted = f"cli-{uuid.uuid4().hex[:10]}"
    sid = f"app-{wanted}"
    submitted = ray_job(stack, "submit", "--working-dir", str(workdir), "--submission-id", sid,
                        "--runtime-env-json", '{"env_vars": {"GREETING": "from-cli"}}', "--metadata-json", '{"via": "cli"}',
                        "--entrypoint-num-cpus", "1", "--entrypoint-memory", str(128 * 1024 * 1024),
                        "--", "python", "main.py", "x y")
    assert submitted.returncode == 0, _describe(submitted)
    out = submitted.stdout + submitted.stderr
    assert f"Job '{sid}' submitted successfully" in out, _describe(submitted)
    # The CLI followed the job's output to its end, then reported its status.
    assert f"payload: {payload}" in submitted.stdout, _describe(submitted)
    assert f"Job '{sid}' succeeded" in out, _describe(submitted)
    assert "Tailing logs is not enabled" not in out, _describe(submitted)

    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    info = client.get_job_info(sid)
    assert info.entrypoint == "python main.py 'x y'"
    assert info.metadata == {"via": "cli"}
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")

    status = ray_job(stack, "status", sid)
    assert status.returncode == 0, _describe(status)
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, _describe(status)

    logs = ray_job(stack, "logs", sid)
    assert logs.returncode == 0, _describe(logs)
    assert f"payload: {payload}" in logs.stdout, _describe(logs)
    assert "argv: x y" in logs.stdout, _describe(logs)
    assert "greeting: from-cli" in logs.stdout, _describe(logs)

    # --follow of a finished job: everything it wrote, then the server closes the tail.
    followed = ray_job(stack, "logs", "--follow", sid)
    assert followed.returncode == 0, _describe(followed)
    assert f"payload: {payload}" in followed.stdout and "greeting: from-cli" in followed.stdout, _describe(followed)

    listed = ray_job(stack, "list")
    assert listed.returncode == 0, _describe(listed)
    assert sid in listed.stdout, _describe(listed)

    deleted = ray_job(stack, "delete", sid)
    assert deleted.returncode == 0, _describe(deleted)
    assert "deleted" in (deleted.stdout + deleted.stderr).lower(), _describe(deleted)
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_info(sid)


def test_cli_submit_no_wait_then_stop(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "clistop", "stop me")
    sid = f"app-clistop-{uuid.uuid4().hex[:10]}"
    submitted = ray_job(stack, "submit", "--no-wait", "--working-dir", str(workdir), "--submission-id", sid, "--", "sleep", "60")
    assert submitted.returncode == 0, _describe(submitted)
    wait_job(client, sid, JobStatus.RUNNING, stack=stack)
    stopped = ray_job(stack, "stop", sid)  # waits until the job is terminal
    assert stopped.returncode == 0, _describe(stopped)
    out = stopped.stdout + stopped.stderr
    assert "STOPPED" in out or "stopped" in out, _describe(stopped)
    assert client.get_job_status(sid) == JobStatus.STOPPED


def test_cli_status_of_unknown_job_fails(stack: Stack) -> None:
    result = ray_job(stack, "status", "app-no-such-job")
    assert result.returncode != 0
    assert "404" in result.stdout + result.stderr, _describe(result)


def test_cli_submit_without_working_dir_is_refused(stack: Stack) -> None:
    result = ray_job(stack, "submit", "--", "echo", "hi")
    assert result.returncode != 0, _describe(result)
    out = result.stdout + result.stderr
    assert "400" in out and "working_dir" in out, _describe(result)


# -- following logs: the WebSocket tail (docs/api.md, "Following a job's output") ----


def gated_project(directory: Path) -> tuple[Path, Path]:
    """A job that prints a line, waits until the test opens its gate, then prints another:
    what a follower receives before the gate opens was sent while the job ran. Without
    the gate within 60 s it exits 1."""
    directory.mkdir(parents=True, exist_ok=True)
    gate = directory.parent / f"{directory.name}.gate"
    (directory / "main.py").write_text(
        "import os, sys, time\n"
        "print('first line', flush=True)\n"
        "deadline = time.time() + 60\n"
        "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print('second line', flush=True)\n"
        "sys.exit(0 if os.path.exists(sys.argv[1]) else 1)\n"
    )
    return directory, gate


def test_cli_submit_prints_the_output_and_exits_0(stack: Stack, tmp_path: Path) -> None:
    payload = f"follow-{uuid.uuid4().hex[:8]}"
    workdir = project(tmp_path / "follow", payload)
    submitted = ray_job(stack, "submit", "--working-dir", str(workdir), "--", "python", "main.py", "a", "b")
    assert submitted.returncode == 0, _describe(submitted)
    assert f"payload: {payload}\nargv: a b\n" in submitted.stdout, _describe(submitted)
    assert "Tailing logs until the job exits" in submitted.stdout + submitted.stderr, _describe(submitted)
    assert "succeeded" in submitted.stdout + submitted.stderr, _describe(submitted)
    assert "close code 1006" not in submitted.stderr, _describe(submitted)  # a normal close, not an abnormal one


def test_cli_submit_of_a_failing_job_exits_non_zero(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = tmp_path / "fails"
    workdir.mkdir()
    (workdir / "fail.py").write_text("import sys\nprint('about to fail', flush=True)\nsys.exit(3)\n")
    sid = f"app-clifail-{uuid.uuid4().hex[:10]}"
    submitted = ray_job(stack, "submit", "--working-dir", str(workdir), "--submission-id", sid, "--", "python", "fail.py")
    assert submitted.returncode != 0, _describe(submitted)
    assert "about to fail" in submitted.stdout, _describe(submitted)
    assert f"Job '{sid}' failed" in submitted.stdout + submitted.stderr, _describe(submitted)
    info = client.get_job_info(sid)
    assert info.status == JobStatus.FAILED and info.driver_exit_code == 3


def test_tail_job_logs_yields_output_as_it_is_written(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir, gate = gated_project(tmp_path / "gated")
    sid = client.submit_job(entrypoint=f"python main.py {gate}", runtime_env={"working_dir": str(workdir)})
    status_when_first_line_arrived: list[Any] = []

    async def follow() -> list[str]:
        chunks: list[str] = []
        async for chunk in client.tail_job_logs(sid):
            chunks.append(chunk)
            if "first line" in "".join(chunks) and not gate.exists():
                status_when_first_line_arrived.append(client.get_job_status(sid))
                gate.touch()  # only now can the job write its second line and end
        return chunks

    chunks = asyncio.run(asyncio.wait_for(follow(), CLI_TIMEOUT_S))
    assert status_when_first_line_arrived == [JobStatus.RUNNING], chunks
    text = "".join(chunks)
    assert text == "first line\nsecond line\n", chunks
    # The iterator ended because the server closed the tail at the job's end.
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED


def test_cli_logs_follow_follows_a_running_job(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir, gate = gated_project(tmp_path / "followcli")
    sid = client.submit_job(entrypoint=f"python main.py {gate}", runtime_env={"working_dir": str(workdir)})
    wait_job(client, sid, JobStatus.RUNNING, stack=stack)
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    follower = subprocess.Popen([RAY_CLI, "job", "logs", "--address", stack.url, "--follow", sid], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or []], daemon=True)
    reader.start()
    try:
        seen: list[str] = []
        while "first line\n" not in seen:
            seen.append(lines.get(timeout=CLI_TIMEOUT_S))
        assert client.get_job_status(sid) == JobStatus.RUNNING  # printed while the job runs
        gate.touch()
        assert follower.wait(timeout=CLI_TIMEOUT_S) == 0, follower.stderr.read() if follower.stderr else ""
        reader.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get())
        assert "second line\n" in seen, seen
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def _upgrade_headers(tenant: str | None = None) -> dict[str, str]:
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    if tenant:
        headers["X-Tenant-Id"] = tenant
    return headers


def test_tail_of_another_tenants_job_is_refused(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    workdir = project(tmp_path / "teamb", "team b's")
    team_b = JobSubmissionClient(stack.url, headers={"X-Tenant-Id": "team-b"})
    sid = team_b.submit_job(entrypoint="python main.py", runtime_env={"working_dir": str(workdir)})

    async def tail(follower: Any) -> str:
        return "".join([chunk async for chunk in follower.tail_job_logs(sid)])

    # Its own tenant follows it to the end...
    assert "payload: team b's" in asyncio.run(asyncio.wait_for(tail(team_b), CLI_TIMEOUT_S))
    # ...the default tenant is refused at the handshake, as GET .../logs would be (404),
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        asyncio.run(asyncio.wait_for(tail(client), CLI_TIMEOUT_S))
    assert refused.value.status == 404
    # with the same JSON answer.
    answer = requests.get(f"{stack.url}/api/jobs/{sid}/logs/tail", headers=_upgrade_headers(), timeout=10)
    assert answer.status_code == 404
    assert answer.json() == requests.get(f"{stack.url}/api/jobs/{sid}/logs", timeout=10).json()
    assert "not found" in answer.json()["error"]
    # An unknown job is refused alike, and a GET without an upgrade is told what the route is.
    unknown = requests.get(f"{stack.url}/api/jobs/app-nope-{uuid.uuid4().hex[:6]}/logs/tail",
                           headers=_upgrade_headers("team-b"), timeout=10)
    assert unknown.status_code == 404
    plain = requests.get(f"{stack.url}/api/jobs/{sid}/logs/tail", headers={"X-Tenant-Id": "team-b"}, timeout=10)
    assert plain.status_code == 426 and "WebSocket" in plain.json()["error"]


def test_tails_per_process_are_capped(stack: Stack, client: RecordingClient, tmp_path: Path) -> None:
    # An API process of its own on the module's Redis, allowed one tail at a time.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**stack.env, "POOLQ_MAX_LOG_TAILS": "1"}
    api = Proc(["api", "--port", str(port), "--workers", "1"], env, stack.base / "api-capped.log").start()
    workdir, gate = gated_project(tmp_path / "capped")
    sid = client.submit_job(entrypoint=f"python main.py {gate}", runtime_env={"working_dir": str(workdir)})
    try:
        wait_for(lambda: _healthy(url), START_S, 0.1, what="the capped API to answer")

        async def first_line(tail: aiohttp.ClientWebSocketResponse) -> None:
            text = ""
            while text != "first line\n":  # however the output was cut into frames
                text += (await tail.receive()).data
                assert "first line\n".startswith(text), text

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                first = await session.ws_connect(f"{url}/api/jobs/{sid}/logs/tail")
                await first_line(first)
                # The one tail is open: the next handshake is a 503 that says why.
                second = await session.get(f"{url}/api/jobs/{sid}/logs/tail", headers=_upgrade_headers())
                assert second.status == 503 and second.headers["Retry-After"] == "1"
                assert "too many log tails" in (await second.json())["error"]
                await first.close()

                # Once the client has left, its slot is free again.
                async def reopened() -> aiohttp.ClientWebSocketResponse:
                    while True:
                        try:
                            return await session.ws_connect(f"{url}/api/jobs/{sid}/logs/tail")
                        except aiohttp.WSServerHandshakeError as exc:
                            assert exc.status == 503
                            await asyncio.sleep(0.1)

                third = await asyncio.wait_for(reopened(), SETTLE_S)
                await first_line(third)
                gate.touch()
                rest = [message async for message in third]
                assert all(m.type == aiohttp.WSMsgType.TEXT for m in rest), rest
                assert "".join(m.data for m in rest) == "second line\n"
                assert third.close_code == 1000

        asyncio.run(asyncio.wait_for(scenario(), CLI_TIMEOUT_S))
    finally:
        gate.touch()
        api.stop()
    wait_job(client, sid, JobStatus.SUCCEEDED, stack=stack)
