"""Node agents end to end (docs/placement.md, docs/running.md): real Redis, placement in the
test's process (a placement worker's scheduler and duties, ``start_placement``) and real
``poolq node`` subprocesses running real entrypoints.

Every deadline here is functional (the thing must happen at all), with a generous margin:
the suite shares two cores with other suites.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests import kit
from tests.kit import SETTLE_S, TERMINAL_STATUSES, Placement, record, wait_ready, wait_status
from tests.procs import Proc, wait_for
from tests.test_runtime_env import Entry, build_wheel, file, symlink, write_archive
from tests.wsgi import call

pytestmark = pytest.mark.processes  # every test runs real node agents

NODE_TTL_S = 3.0
STOP_GRACE_S = 2.0
AGENT_ENV = {
    "POOLQ_NODE_TTL_S": str(NODE_TTL_S),
    "POOLQ_HEARTBEAT_S": "0.5",  # well inside the TTL, so a busy machine does not lose a live node
    "POOLQ_STOP_GRACE_S": str(STOP_GRACE_S),
    "POOLQ_DRAIN_S": "1",  # teardown of an agent with a job still running stays short
}
PLACEMENT_DEADLINE_MS = 120_000  # X-Schedule-Timeout-Ms of the tests' jobs: placed late on a busy machine, not failed


# -- talking to the API ------------------------------------------------------------


def submit(
    app: Any,
    entrypoint: str,
    working_dir: str | Path,
    *,
    tenant: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    timeout_ms: int = PLACEMENT_DEADLINE_MS,
    **fields: Any,
) -> str:
    body = {"entrypoint": entrypoint, "runtime_env": {"working_dir": str(working_dir), **(runtime_env or {})}, **fields}
    return kit.submit(app, body, tenant=tenant or None, timeout_ms=timeout_ms)


def logs(app: Any, submission_id: str, offset: int | None = None, tenant: str | None = None) -> tuple[str, int]:
    """The job's logs and the X-Log-Offset header."""
    path = f"/api/jobs/{submission_id}/logs" + ("" if offset is None else f"?offset={offset}")
    result = call(app, "GET", path, headers={"X-Tenant-Id": tenant} if tenant else {})
    assert result.status == 200, result.body
    return str(result.json["logs"]), int(result.headers["X-Log-Offset"])


def stop(app: Any, submission_id: str) -> dict[str, Any]:
    result = kit.stop(app, submission_id)
    assert result.status == 200, result.body
    return dict(result.json)


def first_log_line(app: Any, submission_id: str) -> str:
    """The first complete line the job printed (the tests' jobs print their pid first)."""
    text = wait_for(
        lambda: "\n" in logs(app, submission_id)[0] and logs(app, submission_id)[0],
        SETTLE_S,
        what=f"job {submission_id} to print a line",
    )
    return str(text).split("\n", 1)[0]


# -- nodes and processes -----------------------------------------------------------


def node_info(admin: Any, node_id: str) -> dict[str, Any] | None:
    return next((node for node in admin.describe() if node["node_id"] == node_id), None)


def node_alive(admin: Any, node_id: str) -> bool:
    node = node_info(admin, node_id)
    return bool(node and node["alive"] and not node["draining"])


def reserved(admin: Any, node_id: str) -> dict[str, Any]:
    node = node_info(admin, node_id)
    assert node is not None, f"node {node_id} is not registered"
    return dict(node["reserved"])


def nothing_reserved(admin: Any, node_id: str) -> bool:
    return all(amount == 0 for amount in reserved(admin, node_id).values())


def live_pids_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still alive (zombies do not count: PID 1 of
    a container may never reap the orphans it inherits)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def start_node(start_proc: Callable[..., Proc], start_placement: Callable[..., Placement],
               admin: Any) -> Callable[..., Proc]:
    """Start ``poolq node`` and wait until it is registered.

    The first call also starts placement (in the test's process) with the same settings:
    the node TTL is a deployment-wide setting, and it is the placement worker's reaper
    duty that applies it.
    """
    started: list[Proc] = []
    placements: list[Placement] = []

    def start(
        node_id: str = "n1",
        *,
        cpus: str = "8",
        memory: str = "8Gi",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Proc:
        settings = {**AGENT_ENV, **(env or {})}
        if not placements:
            placements.append(start_placement(settings))
        proc = start_proc(
            ["node", "--id", node_id, "--cpus", cpus, "--memory", memory, *extra],
            env=settings,
            name=f"node-{node_id}-{len(started)}",
        )
        started.append(proc)
        wait_for(lambda: node_alive(admin, node_id) or not proc.alive(), SETTLE_S, what=f"node {node_id} to register")
        wait_ready(proc, f"node agent {node_id}")  # its Celery consumer: a loaded machine can take seconds to start it
        return proc

    return start


@pytest.fixture
def node(start_node: Callable[..., Proc]) -> Proc:
    return start_node()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "wd"
    path.mkdir()
    return path


def gated(command: str) -> str:
    """A shell snippet that waits (at most a minute) until the file ``go`` exists in the
    working directory, then runs ``command``: the test decides when a job moves on."""
    return f"i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; {command}"


# -- running a job -------------------------------------------------------------------


def test_job_runs_in_its_working_dir_with_its_environment(
    app: Any, start_node: Callable[..., Proc], workdir: Path, redis_server: Any
) -> None:
    start_node(extra=("--gpus", "1", "--resources", "NPU=4"))
    entrypoint = gated(
        'echo written > out.txt; echo "cwd=$(pwd)"; echo "pid=$$ pgid=$(cut -d" " -f5 /proc/$$/stat)"; env'
    )
    submission_id = submit(
        app,
        entrypoint,
        workdir,
        tenant="team-a",
        runtime_env={"env_vars": {"GREETING": "hello world", "EMPTY": ""}},
        entrypoint_num_cpus=0.5,
        entrypoint_memory=268435456,
        entrypoint_num_gpus=1,
        entrypoint_resources={"NPU": 2},
    )

    running = wait_status(app, submission_id, "RUNNING", tenant="team-a")
    assert running["start_time"] is not None and running["end_time"] is None
    assert running["driver_node_id"] == "n1" and running["error_type"] is None
    (workdir / "go").touch()
    done = wait_status(app, submission_id, "SUCCEEDED", tenant="team-a")

    assert (workdir / "out.txt").read_text() == "written\n"
    assert done["driver_exit_code"] == 0 and done["error_type"] is None
    assert done["submit_time"] <= done["start_time"] <= done["end_time"]
    assert done["start_time"] == running["start_time"]

    text, _ = logs(app, submission_id, tenant="team-a")
    lines = text.splitlines()
    assert f"cwd={workdir}" in lines
    ids = dict(item.split("=") for item in next(line for line in lines if line.startswith("pid=")).split())
    assert ids["pid"] == ids["pgid"], "the entrypoint must lead a process group of its own"
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("cwd=", "pid=")))
    assert env["GREETING"] == "hello world" and env["EMPTY"] == ""
    assert env["POOLQ_SUBMISSION_ID"] == submission_id
    assert env["POOLQ_TENANT_ID"] == "team-a"
    assert env["POOLQ_NUM_CPUS"] == "0.5"
    assert env["POOLQ_MEMORY"] == "268435456"
    assert env["POOLQ_NUM_GPUS"] == "1"
    assert env["POOLQ_RESOURCES"] == "NPU=2"
    assert "POOLQ_REDIS_URL" not in env
    assert redis_server.password not in text, "the agent's Redis credentials reached the job"


@pytest.mark.parametrize(
    ("entrypoint", "exit_code", "in_message", "not_in_message"),
    [
        ("echo to-stdout; echo 'it broke: bad input' >&2; exit 3", 3, "it broke: bad input", "to-stdout"),
        ('for i in $(seq 1 3000); do echo "err-$i" >&2; done; exit 1', 1, "err-3000", None),
        ("kill -9 $$", -9, None, None),
        ("kill -TERM $$", -15, None, None),
        # "€" (e2 82 ac) written in two pieces: the message must not split it.
        (
            "printf 'bad \\342' >&2; sleep 0.5; printf '\\202\\254 input\\n' >&2; exit 2",
            2,
            "bad \u20ac input",
            "\ufffd",
        ),
    ],
    ids=["exit-3", "long-stderr-tail", "sigkill", "sigterm", "utf8-stderr-in-two-writes"],
)
def test_failing_entrypoint(
    app: Any,
    node: Proc,
    workdir: Path,
    entrypoint: str,
    exit_code: int,
    in_message: str | None,
    not_in_message: str | None,
) -> None:
    done = wait_status(app, submit(app, entrypoint, workdir), "FAILED")

    assert done["error_type"] == "ENTRYPOINT_FAILED"
    assert done["driver_exit_code"] == exit_code
    assert done["start_time"] is not None and done["end_time"] is not None
    if in_message:
        assert in_message in done["message"]
    if not_in_message:
        assert not_in_message not in done["message"]


# -- working directories -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_working_dir_is_unpacked_once_and_reused(
    app: Any, node: Proc, tmp_path: Path, service_env: dict[str, str], suffix: str
) -> None:
    # One top directory, as Ray's SDK packs it: its contents are the working directory.
    archive = write_archive(
        tmp_path / f"project{suffix}",
        [file("project/data.txt", "from the archive\n"), file("project/sub/more.txt", "nested\n")],
    )
    uri = f"file://{archive}"

    first = submit(app, "cat data.txt sub/more.txt; pwd; echo first-job > marker.txt", uri)
    done = wait_status(app, first, "SUCCEEDED")
    second = submit(app, "cat data.txt; pwd; cat marker.txt", uri)
    wait_status(app, second, "SUCCEEDED")

    first_lines = logs(app, first)[0].splitlines()
    second_lines = logs(app, second)[0].splitlines()
    assert first_lines[:2] == ["from the archive", "nested"]
    unpacked = Path(first_lines[2])
    cache = Path(service_env["POOLQ_DATA_DIR"]) / "nodes" / "n1" / "cache"
    assert unpacked.is_relative_to(cache), f"{unpacked} is not in the node's cache {cache}"
    assert second_lines == ["from the archive", str(unpacked), "first-job"], (
        "the second job did not reuse the unpacked directory"
    )
    assert done["driver_exit_code"] == 0


def archive_of(suffix: str, *entries: Entry) -> Callable[[Path], Path]:
    return lambda directory: write_archive(directory / f"bad{suffix}", list(entries))


def missing_dir(directory: Path) -> Path:
    return directory / "no-such-directory"


@pytest.mark.parametrize(
    ("build", "in_message"),
    [
        (archive_of(".zip", file("ok.txt"), file("../escaped.txt")), "../escaped.txt"),
        (archive_of(".zip", file("/tmp/poolq-test-absolute-escaped.txt")), "/tmp/poolq-test-absolute-escaped.txt"),
        (archive_of(".zip", symlink("outward-link", "../../../escaped-link")), "outward-link"),
        (archive_of(".tar.gz", file("ok.txt"), file("../escaped.txt")), "../escaped.txt"),
        (missing_dir, "no-such-directory"),
    ],
    ids=["zip-dotdot", "zip-absolute", "zip-symlink-out", "tar-dotdot", "missing-dir"],
)
def test_unusable_working_dir_fails_the_job_before_it_runs(
    app: Any,
    node: Proc,
    tmp_path: Path,
    admin: Any,
    service_env: dict[str, str],
    build: Callable[[Path], Path],
    in_message: str,
) -> None:
    source = tmp_path / "archives"
    source.mkdir()
    working_dir = build(source)
    ran = tmp_path / "ran"

    done = wait_status(app, submit(app, f"touch {ran}", f"file://{working_dir}"), "FAILED")

    assert done["error_type"] == "RUNTIME_ENV_SETUP_FAILED"
    assert in_message in done["message"]
    assert done["start_time"] is None and done["driver_exit_code"] is None
    assert not ran.exists(), "the entrypoint ran although its working_dir was refused"
    data_dir = Path(service_env["POOLQ_DATA_DIR"])
    assert not list(data_dir.rglob("*escaped*")), "an archive entry was written outside the working directory"
    assert not Path("/tmp/poolq-test-absolute-escaped.txt").exists()
    wait_for(lambda: nothing_reserved(admin, "n1"), SETTLE_S, what="the reservation to be released")
    assert admin.check() == []


# -- pip ----------------------------------------------------------------------------


def test_pip_requirements_are_installed_once_per_list(
    app: Any, node: Proc, tmp_path: Path, workdir: Path, service_env: dict[str, str]
) -> None:
    wheel = build_wheel(tmp_path)
    probe = "python -c 'import poolq_probe, sys; print(poolq_probe.VALUE); print(sys.prefix)'"
    runtime_env = {"pip": [str(wheel)]}

    # Submitted together: the second must wait for, then share, the first one's environment.
    jobs = [submit(app, probe, workdir, runtime_env=runtime_env) for _ in range(2)]
    outputs = [(wait_status(app, job, "SUCCEEDED", timeout=120), logs(app, job)[0].splitlines()) for job in jobs]

    pip_cache = Path(service_env["POOLQ_DATA_DIR"]) / "nodes" / "n1" / "cache" / "pip"
    (_, first), (_, second) = outputs
    assert first[0] == second[0] == "probe-42"
    assert first[1] == second[1], "two jobs with the same pip list got different environments"
    assert Path(first[1]).parent == pip_cache
    assert [p for p in pip_cache.iterdir() if p.is_dir()] == [Path(first[1])]


def test_pip_install_failure_fails_the_job(app: Any, node: Proc, tmp_path: Path, workdir: Path) -> None:
    missing = tmp_path / "nowhere" / "missing_pkg-0.1-py3-none-any.whl"
    ran = tmp_path / "ran"

    done = wait_status(
        app, submit(app, f"touch {ran}", workdir, runtime_env={"pip": [str(missing)]}), "FAILED", timeout=120
    )

    assert done["error_type"] == "RUNTIME_ENV_SETUP_FAILED"
    assert "missing_pkg-0.1-py3-none-any.whl" in done["message"], "pip's error is not in the message"
    assert done["start_time"] is None
    assert not ran.exists()


# -- logs ---------------------------------------------------------------------------


def test_logs_from_an_offset(app: Any, node: Proc, workdir: Path) -> None:
    submission_id = submit(app, "echo first; " + gated("printf 'line-%03d\\n' $(seq 1 50)"), workdir)
    wait_for(lambda: logs(app, submission_id)[0] == "first\n", SETTLE_S, what="the first line")
    assert logs(app, submission_id)[1] == len("first\n")
    (workdir / "go").touch()
    wait_status(app, submission_id, "SUCCEEDED")

    full, end = logs(app, submission_id)
    expected = "first\n" + "".join(f"line-{i:03d}\n" for i in range(1, 51))
    assert full == expected and end == len(expected.encode())
    for offset in (0, 1, 6, 100, len(expected) - 1, len(expected)):
        assert logs(app, submission_id, offset) == (expected[offset:], end), f"offset {offset}"


def test_log_tail_is_capped_and_the_file_keeps_everything(
    app: Any, start_node: Callable[..., Proc], workdir: Path, service_env: dict[str, str]
) -> None:
    start_node(env={"POOLQ_MAX_LOG_BYTES": "1000"})
    expected = "".join(f"line-{i:05d}\n" for i in range(1, 2001))  # 22,000 bytes

    submission_id = submit(app, "printf 'line-%05d\\n' $(seq 1 2000)", workdir, tenant="team-b")
    wait_status(app, submission_id, "SUCCEEDED", tenant="team-b")

    tail, end = logs(app, submission_id, tenant="team-b")
    assert 500 < len(tail.encode()) <= 1000
    assert expected.endswith(tail)
    assert end == len(expected)
    assert logs(app, submission_id, 0, tenant="team-b") == (tail, end)  # what was dropped is gone
    assert logs(app, submission_id, end - 11, tenant="team-b") == ("line-02000\n", end)
    log_file = Path(service_env["POOLQ_DATA_DIR"]) / "nodes" / "n1" / "logs" / "t-team-b" / f"{submission_id}.log"
    assert log_file.read_text() == expected


def test_log_tail_never_splits_a_utf8_character(app: Any, start_node: Callable[..., Proc], workdir: Path) -> None:
    start_node(env={"POOLQ_MAX_LOG_BYTES": "1000"})
    # 6,000 bytes of a 3-byte character: the last 1,000 bytes begin inside one.
    writer = f"{shlex.quote(sys.executable)} -c 'import sys; sys.stdout.buffer.write(\"\\u20ac\".encode() * 2000)'"

    submission_id = submit(app, writer, workdir)
    wait_status(app, submission_id, "SUCCEEDED")

    for offset in (None, 0, 5500, 5999):
        text, end = logs(app, submission_id, offset)
        replaced = text.count("\ufffd")
        assert replaced == 0, f"offset {offset}: a character was split, the text begins {text[:3]!r}"
        assert set(text) <= {"\u20ac"}, f"offset {offset}: unexpected characters {set(text) - {chr(0x20AC)}}"
        assert end == 6000
    assert len(logs(app, submission_id)[0]) >= 300


def test_incomplete_utf8_character_is_held_back_until_complete(app: Any, node: Proc, workdir: Path) -> None:
    # "a", then the first two bytes of "€" (e2 82 ac); the last byte only once `go` exists.
    submission_id = submit(app, "printf 'a\\342\\202'; " + gated("printf '\\254\\n'"), workdir)
    wait_for(lambda: logs(app, submission_id)[0].startswith("a"), SETTLE_S, what="the job's first output")
    time.sleep(0.5)  # the agent ships output every 0.2 s: the partial character is in Redis by now
    assert logs(app, submission_id) == ("a", 1)

    (workdir / "go").touch()
    wait_status(app, submission_id, "SUCCEEDED")
    assert logs(app, submission_id) == ("a\u20ac\n", 5)
    assert logs(app, submission_id, 1) == ("\u20ac\n", 5)


# -- stopping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "exit_code", "in_logs", "killed_after_grace"),
    [
        ("echo $$; sleep 60", -15, None, False),
        ("trap '' TERM; echo $$; while :; do sleep 0.1; done", -9, None, True),
        ("trap 'echo got TERM; exit 0' TERM; echo $$; while :; do sleep 0.1; done", 0, "got TERM", False),
    ],
    ids=["sleep", "ignores-sigterm", "exits-0-on-sigterm"],
)
def test_stop_a_running_job(
    app: Any,
    node: Proc,
    admin: Any,
    workdir: Path,
    entrypoint: str,
    exit_code: int,
    in_logs: str | None,
    killed_after_grace: bool,
) -> None:
    submission_id = submit(app, entrypoint, workdir)
    wait_status(app, submission_id, "RUNNING")
    pgid = int(first_log_line(app, submission_id))
    assert live_pids_in_group(pgid), "the job's process group is not running"

    requested_ms = time.time() * 1000
    assert stop(app, submission_id) == {"stopped": True}
    done = wait_status(app, submission_id, "STOPPED", timeout=STOP_GRACE_S + 15)

    assert done["error_type"] == "STOPPED_BY_USER"
    assert done["driver_exit_code"] == exit_code
    if killed_after_grace:  # it ignored SIGTERM: the SIGKILL came only after the grace period
        assert done["end_time"] - requested_ms >= STOP_GRACE_S * 1000 - 250
    if in_logs:
        assert in_logs in logs(app, submission_id)[0]
    wait_for(lambda: not live_pids_in_group(pgid), 10, what=f"process group {pgid} to be gone")
    assert stop(app, submission_id) == {"stopped": False}, "a stopped job is terminal"
    wait_for(lambda: nothing_reserved(admin, "n1"), SETTLE_S, what="the reservation to be released")
    assert admin.check() == []


def test_stop_a_job_waiting_for_placement(app: Any, node: Proc, admin: Any, workdir: Path, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    submission_id = submit(app, f"touch {ran}", workdir, entrypoint_num_cpus=16, timeout_ms=0)
    wait_for(lambda: record(app, submission_id)["scheduling"]["attempts"] >= 1, SETTLE_S, what="a placement attempt")

    assert stop(app, submission_id) == {"stopped": True}
    done = record(app, submission_id)
    assert done["status"] == "STOPPED" and done["error_type"] == "STOPPED_BY_USER"
    assert done["start_time"] is None and done["end_time"] is not None and done["driver_node_id"] is None
    assert nothing_reserved(admin, "n1") and admin.check() == []
    assert not ran.exists()


def test_stop_a_job_placed_on_a_node_whose_agent_has_not_started_it(
    app: Any, start_node: Callable[..., Proc], admin: Any, workdir: Path, tmp_path: Path
) -> None:
    agent = start_node(env={"POOLQ_NODE_TTL_S": "120"})  # frozen below: it must not be declared lost meanwhile
    ran = tmp_path / "ran"
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        submission_id = submit(app, f"touch {ran}", workdir)
        placed = wait_for(
            lambda: record(app, submission_id)["driver_node_id"] == "n1" and record(app, submission_id),
            SETTLE_S,
            what="the job to be placed on n1",
        )
        assert placed["status"] == "PENDING"  # type: ignore[index]
        assert reserved(admin, "n1")["CPU"] == 1

        assert stop(app, submission_id) == {"stopped": True}
        done = record(app, submission_id)
        assert done["status"] == "STOPPED" and done["error_type"] == "STOPPED_BY_USER"
        assert nothing_reserved(admin, "n1") and admin.check() == []
    finally:
        os.kill(agent.pid, signal.SIGCONT)

    # The agent, running again, must not start the stopped job: a later job runs, that one does not.
    later = submit(app, "true", workdir)
    wait_status(app, later, "SUCCEEDED")
    time.sleep(1)
    assert not ran.exists(), "the agent ran a job that was stopped before it started"
    assert record(app, submission_id)["status"] == "STOPPED"


@pytest.mark.parametrize(("entrypoint", "status"), [("true", "SUCCEEDED"), ("exit 1", "FAILED")])
def test_stop_a_finished_job_changes_nothing(app: Any, node: Proc, workdir: Path, entrypoint: str, status: str) -> None:
    submission_id = submit(app, entrypoint, workdir)
    before = wait_status(app, submission_id, status)

    assert stop(app, submission_id) == {"stopped": False}
    after = record(app, submission_id)
    assert (after["status"], after["error_type"], after["end_time"]) == (
        before["status"],
        before["error_type"],
        before["end_time"],
    )


# -- losing and stopping agents -------------------------------------------------------


@pytest.mark.parametrize(
    "entrypoint",
    ["echo $$; echo run >> runs.txt; sleep 300", "echo $$; echo run >> runs.txt; sh -c 'sleep 300 & echo $!; wait'"],
    ids=["child", "grandchild"],
)
def test_killed_agent_takes_its_jobs_with_it(
    app: Any, start_node: Callable[..., Proc], admin: Any, workdir: Path, entrypoint: str
) -> None:
    agent = start_node()
    submission_id = submit(app, entrypoint, workdir)
    wait_status(app, submission_id, "RUNNING")
    expected_lines = 2 if "&" in entrypoint else 1
    printed = wait_for(
        lambda: logs(app, submission_id)[0].count("\n") >= expected_lines and logs(app, submission_id)[0],
        SETTLE_S,
        what="the job's pids",
    )
    pids = [int(line) for line in str(printed).split()]
    pgid = pids[0]
    assert all(pid_alive(pid) for pid in pids)

    os.kill(agent.pid, signal.SIGKILL)  # the agent alone, not its process group
    wait_for(
        lambda: not live_pids_in_group(pgid) and not any(pid_alive(pid) for pid in pids),
        10,
        what="the dead agent's job processes to be gone",
    )
    lost = wait_status(app, submission_id, "FAILED", timeout=NODE_TTL_S + 20)

    assert lost["error_type"] == "NODE_LOST"
    assert "n1" in lost["message"]
    assert nothing_reserved(admin, "n1") and admin.check() == []

    start_node()  # the same node id again
    later = submit(app, "true", workdir)
    wait_status(app, later, "SUCCEEDED")
    time.sleep(1)
    assert (workdir / "runs.txt").read_text() == "run\n", "the restarted agent ran the lost job again"
    assert record(app, submission_id)["status"] == "FAILED"
    assert admin.check() == []


def test_an_agent_restarted_at_once_does_not_rerun_what_was_running(
    app: Any, start_node: Callable[..., Proc], admin: Any, workdir: Path
) -> None:
    agent = start_node()
    submission_id = submit(app, "echo $$; echo run >> runs.txt; sleep 300", workdir)
    wait_status(app, submission_id, "RUNNING")
    pgid = int(first_log_line(app, submission_id))

    os.kill(agent.pid, signal.SIGKILL)
    start_node()  # before the reaper can declare the node lost

    lost = wait_status(app, submission_id, "FAILED")
    assert lost["error_type"] == "NODE_LOST" and "n1" in lost["message"]
    wait_for(lambda: not live_pids_in_group(pgid), 10, what=f"process group {pgid} to be gone")
    later = submit(app, "true", workdir)
    wait_status(app, later, "SUCCEEDED")
    time.sleep(1)
    assert (workdir / "runs.txt").read_text() == "run\n", "the restarted agent ran the job again"
    assert nothing_reserved(admin, "n1") and admin.check() == []


def test_sigterm_drains_the_agent(app: Any, start_node: Callable[..., Proc], admin: Any, workdir: Path) -> None:
    drain_s = 3.0
    agent = start_node(env={"POOLQ_DRAIN_S": str(drain_s)})
    short = submit(app, gated("echo short-done"), workdir)
    long = submit(app, "echo $$; sleep 300", workdir)
    for job in (short, long):
        wait_status(app, job, "RUNNING")
    pgid = int(first_log_line(app, long))

    agent.signal(signal.SIGTERM)
    time.sleep(0.5)
    (workdir / "go").touch()  # the short job finishes within the drain time

    assert wait_status(app, short, "SUCCEEDED")["driver_exit_code"] == 0
    ended = wait_status(app, long, "FAILED", timeout=drain_s + STOP_GRACE_S + 20)
    assert ended["error_type"] == "NODE_SHUTDOWN"
    assert "short-done" in logs(app, short)[0]
    wait_for(lambda: not agent.alive(), drain_s + STOP_GRACE_S + 20, what="the agent to exit")
    assert not live_pids_in_group(pgid)
    assert admin.check() == []


def test_a_draining_agent_starts_no_new_jobs(
    app: Any, start_node: Callable[..., Proc], workdir: Path, tmp_path: Path
) -> None:
    agent = start_node(env={"POOLQ_DRAIN_S": "3"})
    running = submit(app, "sleep 300", workdir)  # keeps the agent draining for its drain time
    wait_status(app, running, "RUNNING")
    ran = tmp_path / "late-job-ran"

    agent.signal(signal.SIGTERM)
    time.sleep(0.2)  # the signal has been delivered: from now on the node takes no new jobs
    late = submit(app, f"touch {ran}", workdir)
    wait_for(lambda: not agent.alive(), 3 + STOP_GRACE_S + 20, what="the agent to exit")

    assert not ran.exists(), "a job submitted after SIGTERM ran on the draining node"
    assert record(app, late)["status"] in ("PENDING", "FAILED")


def test_a_node_never_runs_more_than_its_capacity(
    app: Any, start_node: Callable[..., Proc], admin: Any, workdir: Path
) -> None:
    start_node(cpus="8", memory="8Gi")  # memory for 16 default jobs: the CPUs are what binds
    jobs = [submit(app, "sleep 0.05", workdir, entrypoint_num_cpus=1) for _ in range(200)]

    def all_done() -> list[dict[str, Any]] | None:
        records = [record(app, job) for job in jobs]
        return records if all(r["status"] in TERMINAL_STATUSES for r in records) else None

    records = wait_for(all_done, 180, interval=0.5, what="200 jobs to finish")
    assert isinstance(records, list)
    assert sorted(r["status"] for r in records) == ["SUCCEEDED"] * 200

    # Sweep over start/end instants; an end at the same millisecond as a start counts first,
    # since a job's capacity is released when it ends, before another can be placed there.
    events = sorted([(r["start_time"], 1) for r in records] + [(r["end_time"], -1) for r in records])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 8, f"{peak} jobs ran at once on a node with 8 CPUs"
    assert peak >= 2, "the node ran its jobs one at a time"
    wait_for(lambda: nothing_reserved(admin, "n1"), SETTLE_S, what="every reservation to be released")
    assert admin.check() == []
