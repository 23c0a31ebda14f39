"""What a job gets on its node (docs/running.md): enforced limits, its own devices, a
runtime limit and retries — with real node agents, real cgroups (this machine has v1),
real processes, and placement in the test's process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from tests import kit
from tests.procs import Proc, wait_for
from tests.wsgi import call

pytestmark = pytest.mark.processes

AGENT_ENV = {"POOLQ_HEARTBEAT_S": "0.5", "POOLQ_STOP_GRACE_S": "1", "POOLQ_DRAIN_S": "1"}


@pytest.fixture
def node(start_proc: Callable[..., Proc], admin: Any) -> Callable[..., Proc]:
    """Start ``poolq node --id ID <flags>`` and wait until it is registered and consuming."""

    def start(node_id: str, *flags: str, env: dict[str, str] | None = None) -> Proc:
        proc = start_proc(["node", "--id", node_id, *flags], env={**AGENT_ENV, **(env or {})}, name=f"node-{node_id}")
        wait_for(lambda: any(n["node_id"] == node_id and n["alive"] for n in admin.describe()) or not proc.alive(),
                 kit.START_S, 0.1, what=f"node {node_id} to register")
        kit.wait_ready(proc, f"node agent {node_id}")
        return proc

    return start


def job(tmp_path: Path, command: str, **fields: Any) -> dict[str, Any]:
    return {"entrypoint": command, "runtime_env": {"working_dir": str(tmp_path)}, "entrypoint_num_cpus": 1,
            "entrypoint_memory": 128 * kit.MiB, **fields}


def node_record(app: Any, node_id: str) -> dict[str, Any]:
    return next(n for n in call(app, "GET", "/api/nodes").json if n["node_id"] == node_id)


# -- enforcement -----------------------------------------------------------------------


def test_a_job_over_its_memory_is_killed_and_its_neighbour_goes_on(app: Any, placement: Any, node: Any,
                                                                   tmp_path: Path) -> None:
    node("n1", "--cpus", "4", "--memory", "4Gi")
    assert node_record(app, "n1")["enforcement"]["mode"] in ("v1", "v2")
    neighbour = kit.submit(app, job(tmp_path, "sleep 3; echo neighbour done"), timeout_ms=0)
    hog = kit.submit(app, job(tmp_path, "python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'"), timeout_ms=0)
    ended = kit.wait_status(app, hog, "FAILED")
    assert ended["error_type"] == "OUT_OF_MEMORY", ended
    assert "128 MiB" in ended["message"] and "entrypoint_memory" in ended["message"]
    assert kit.wait_status(app, neighbour, "SUCCEEDED")["driver_exit_code"] == 0


def test_a_job_whose_child_is_killed_for_memory_ends_by_its_own_exit(app: Any, placement: Any, node: Any,
                                                                     tmp_path: Path) -> None:
    """The kernel kills the process over the limit, which may be a child the job can do
    without: a job that then exits 0 succeeded; one that fails failed for memory."""
    node("n1", "--cpus", "4", "--memory", "4Gi")
    assert node_record(app, "n1")["enforcement"]["mode"] in ("v1", "v2")
    hog = "python3 -c 'b = bytearray(400 * 1024 * 1024)'"
    survives = kit.submit(app, job(tmp_path, f"{hog} || echo the child was killed: $?; echo survived"), timeout_ms=0)
    gives_up = kit.submit(app, job(tmp_path, f"{hog} || exit 3"), timeout_ms=0)
    assert kit.wait_status(app, survives, "SUCCEEDED")["driver_exit_code"] == 0
    text = call(app, "GET", f"/api/jobs/{survives}/logs").json["logs"]
    assert "the child was killed: 137" in text and "survived" in text, text
    ended = kit.wait_status(app, gives_up, "FAILED")
    assert ended["error_type"] == "OUT_OF_MEMORY" and ended["driver_exit_code"] == 3, ended
    assert "128 MiB" in ended["message"] and "then ended (exit code 3)" in ended["message"], ended


@pytest.mark.serial
def test_half_a_cpu_is_about_half_a_core(app: Any, placement: Any, node: Any, tmp_path: Path) -> None:
    node("n1", "--cpus", "2", "--memory", "4Gi")
    burn = ("python3 -c \"import os, time\nstart = time.monotonic()\nwhile time.monotonic() - start < 3: pass\n"
            "t = os.times(); print((t.user + t.system) / (time.monotonic() - start))\"")
    submission_id = kit.submit(app, job(tmp_path, burn, entrypoint_num_cpus=0.5), timeout_ms=0)
    kit.wait_status(app, submission_id, "SUCCEEDED")
    share = float(call(app, "GET", f"/api/jobs/{submission_id}/logs").json["logs"].split()[-1])
    assert 0.3 <= share <= 0.7, f"a job limited to 0.5 CPU used {share:.2f} of a core"


def test_a_fork_bomb_stops_at_the_process_limit(app: Any, placement: Any, node: Any, tmp_path: Path) -> None:
    node("n1", "--cpus", "2", "--memory", "4Gi", env={"POOLQ_JOB_PIDS_MAX": "20"})
    count = tmp_path / "forked"
    bomb = f"for i in $(seq 60); do sleep 30 & echo $i > {count}; done"
    submission_id = kit.submit(app, job(tmp_path, bomb), timeout_ms=0)
    ended = kit.wait_status(app, submission_id, "FAILED")
    assert "fork" in ended["message"].lower(), ended["message"]
    forked = int(count.read_text())
    assert forked < 20, f"{forked} background processes in a job limited to 20"


# A job's look at its own memory cgroup: its path, and the limit in it (v1 or v2).
OWN_MEMORY_CGROUP = (
    "python3 -c \"import re; t = open('/proc/self/cgroup').read(); "
    "v1 = re.search(r'^\\d+:[^:]*\\bmemory\\b[^:]*:(.*)$', t, re.M); "
    "path, name = (('/sys/fs/cgroup/memory' + v1[1], 'memory.limit_in_bytes') if v1 "
    "else ('/sys/fs/cgroup' + re.search(r'^0::(.*)$', t, re.M)[1], 'memory.max')); "
    "print(path, open(path + '/' + name).read().strip())\""
)


def test_the_next_job_runs_in_the_cgroup_the_last_left_with_its_own_limits(
    app: Any, placement: Any, node: Any, tmp_path: Path
) -> None:
    agent = node("n1", "--cpus", "2", "--memory", "4Gi")
    seen = []
    for memory in (128 * kit.MiB, 256 * kit.MiB, 128 * kit.MiB):  # one at a time: each gets the kept cgroup
        submission_id = kit.submit(app, job(tmp_path, OWN_MEMORY_CGROUP, entrypoint_memory=memory), timeout_ms=0)
        kit.wait_status(app, submission_id, "SUCCEEDED")
        path, limit = call(app, "GET", f"/api/jobs/{submission_id}/logs").json["logs"].split()
        seen.append((path, int(limit)))
    assert [limit for _, limit in seen] == [128 * kit.MiB, 256 * kit.MiB, 128 * kit.MiB]
    assert seen[0][0] == seen[1][0] == seen[2][0], seen  # one kept cgroup, its limits written over
    # An agent that shuts down leaves no cgroup behind: neither its kept ones nor their parent.
    parent = Path(seen[0][0]).parent
    assert parent.is_dir()
    assert agent.stop() == 0
    assert not parent.exists()


def test_without_usable_cgroups_the_job_runs_unenforced_and_the_node_says_why(
    app: Any, placement: Any, node: Any, tmp_path: Path
) -> None:
    agent = node("n1", "--cpus", "2", "--memory", "4Gi", env={"POOLQ_CGROUP_ROOT": str(tmp_path / "no-cgroups")})
    enforcement = node_record(app, "n1")["enforcement"]
    assert enforcement["mode"] == "none" and enforcement["reason"], enforcement
    submission_id = kit.submit(app, job(tmp_path, "echo unenforced"), timeout_ms=0)
    kit.wait_status(app, submission_id, "SUCCEEDED")
    assert "without resource limits" in agent.output()


# -- devices -----------------------------------------------------------------------------


def test_two_one_gpu_jobs_get_different_gpus_and_give_them_back(app: Any, placement: Any, node: Any,
                                                                tmp_path: Path, admin: Any) -> None:
    node("g1", "--cpus", "8", "--memory", "8Gi", "--gpus", "2", "--resources", "NPU=4")
    assert node_record(app, "g1")["devices"] == {"GPU": {"0": 0, "1": 0}, "NPU": {"0": 0, "1": 0, "2": 0, "3": 0}}
    show = 'echo "gpu=$CUDA_VISIBLE_DEVICES npu=$ASCEND_RT_VISIBLE_DEVICES"; sleep 2'
    first = kit.submit(app, job(tmp_path, show, entrypoint_num_gpus=1, entrypoint_resources={"NPU": 2}), timeout_ms=0)
    second = kit.submit(app, job(tmp_path, show, entrypoint_num_gpus=1, entrypoint_resources={"NPU": 2}), timeout_ms=0)
    none = kit.submit(app, job(tmp_path, show), timeout_ms=0)
    for submission_id in (first, second, none):
        kit.wait_status(app, submission_id, "RUNNING", "SUCCEEDED")
    assert admin.check() == []
    records = [kit.wait_status(app, i, "SUCCEEDED") for i in (first, second, none)]
    outputs = [call(app, "GET", f"/api/jobs/{i}/logs").json["logs"].strip() for i in (first, second, none)]
    gpus = {r["devices"]["GPU"][0] for r in records[:2]}
    assert gpus == {"0", "1"}, records[:2]
    assert {outputs[0].split()[0], outputs[1].split()[0]} == {"gpu=0", "gpu=1"}, outputs
    npus = [set(r["devices"]["NPU"]) for r in records[:2]]
    assert not npus[0] & npus[1] and npus[0] | npus[1] == {"0", "1", "2", "3"}, npus
    assert outputs[2] == "gpu= npu=", "a job that asked for no GPU must see none"
    wait_for(lambda: node_record(app, "g1")["devices"]["GPU"] == {"0": 0, "1": 0}, kit.SETTLE_S,
             what="the GPUs to be given back")
    assert admin.check() == []


def test_fractional_gpus_share_a_device_and_a_stop_or_failure_frees_it(app: Any, placement: Any, node: Any,
                                                                       tmp_path: Path, admin: Any) -> None:
    node("g1", "--cpus", "8", "--memory", "8Gi", "--gpus", "2")
    halves = [kit.submit(app, job(tmp_path, "sleep 60", entrypoint_num_gpus=0.5), timeout_ms=0) for _ in range(2)]
    whole = kit.submit(app, job(tmp_path, "exit 3", entrypoint_num_gpus=1), timeout_ms=0)
    for submission_id in halves:
        kit.wait_status(app, submission_id, "RUNNING")
    devices = [kit.record(app, i)["devices"]["GPU"] for i in halves]
    assert devices[0] == devices[1], f"two halves should share one GPU, leaving the other whole: {devices}"
    assert kit.wait_status(app, whole, "FAILED")["devices"]["GPU"] != devices[0]
    for submission_id in halves:
        kit.stop(app, submission_id)
        kit.wait_status(app, submission_id, "STOPPED")
    wait_for(lambda: node_record(app, "g1")["devices"]["GPU"] == {"0": 0, "1": 0}, kit.SETTLE_S,
             what="every GPU to be given back")
    assert admin.check() == []


# -- runtime limit -------------------------------------------------------------------------


def test_a_job_over_its_runtime_limit_is_stopped(app: Any, placement: Any, node: Any, tmp_path: Path) -> None:
    node("n1", "--cpus", "2", "--memory", "4Gi")
    submission_id = kit.submit(app, job(tmp_path, "sleep 30", runtime_limit_s=2), timeout_ms=0)
    ended = kit.wait_status(app, submission_id, "FAILED")
    assert ended["error_type"] == "RUNTIME_LIMIT" and "limit of 2 s (runtime_limit_s)" in ended["message"], ended
    ran_s = (ended["end_time"] - ended["start_time"]) / 1000
    assert 1.5 <= ran_s <= 2 + 1 + 5, f"a 2 s limit (1 s grace) stopped the job after {ran_s:.1f} s"
    assert ended["run_deadline"] - ended["start_time"] == 2000


def test_a_tenant_runtime_limit_applies_to_its_jobs(app: Any, placement: Any, node: Any, tmp_path: Path,
                                                   service_env: dict[str, str]) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "poolq", "quota", "set", "team-t", "--runtime-limit-s", "1"],
                   env={**os.environ, **service_env}, check=True, capture_output=True)
    node("n1", "--cpus", "2", "--memory", "4Gi")
    submission_id = kit.submit(app, job(tmp_path, "sleep 30"), tenant="team-t", timeout_ms=0)
    ended = kit.wait_status(app, submission_id, "FAILED", tenant="team-t")
    assert ended["error_type"] == "RUNTIME_LIMIT", ended
    assert "its runtime limit of 1 s (its tenant's)" in ended["message"], ended


# -- retries ---------------------------------------------------------------------------------


def test_a_job_that_fails_twice_then_succeeds_on_its_third_attempt(app: Any, placement: Any, node: Any,
                                                                   tmp_path: Path) -> None:
    node("n1", "--cpus", "2", "--memory", "4Gi")
    counter = tmp_path / "attempts"
    flaky = f'echo x >> {counter}; n=$(wc -l < {counter}); echo "try $n"; [ "$n" -ge 3 ]'
    submission_id = kit.submit(app, job(tmp_path, flaky, retry_policy={"max_attempts": 3, "backoff_s": 0.2}),
                               timeout_ms=0)
    ended = kit.wait_status(app, submission_id, "SUCCEEDED")
    assert ended["attempt_number"] == 3
    assert [a["error_type"] for a in ended["previous_attempts"]] == ["ENTRYPOINT_FAILED", "ENTRYPOINT_FAILED"]
    assert [a["attempt_number"] for a in ended["previous_attempts"]] == [1, 2]
    assert ended["retry_policy"] == {"max_attempts": 3, "retry_on": ["ENTRYPOINT_FAILED", "NODE_LOST"], "backoff_s": 0.2}
    text = call(app, "GET", f"/api/jobs/{submission_id}/logs").json["logs"]
    assert "try 1" in text and "[poolq] attempt 2 starts" in text and "[poolq] attempt 3 starts" in text
    assert text.index("try 2") > text.index("[poolq] attempt 2 starts"), text


GRACEFUL = (
    "python3 -c \"import pathlib, signal, sys, time\n"
    "def done(*_):\n"
    "    time.sleep(1.5); pathlib.Path('saved').write_text('saved'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, done); print('ready', flush=True); time.sleep(60)\""
)


def test_a_stopped_job_has_its_grace_though_its_shell_dies_of_the_sigterm(
    app: Any, placement: Any, node: Any, tmp_path: Path
) -> None:
    # The entrypoint's shell waits for the python child and dies of the group's SIGTERM at
    # once; the child, saving its work, must still get the grace (here 5 s), not be cut off.
    node("n1", "--cpus", "2", "--memory", "4Gi", env={"POOLQ_STOP_GRACE_S": "5"})
    submission_id = kit.submit(app, job(tmp_path, GRACEFUL), timeout_ms=0)
    kit.wait_status(app, submission_id, "RUNNING")
    wait_for(lambda: "ready" in call(app, "GET", f"/api/jobs/{submission_id}/logs").json["logs"], 30, 0.1,
             what="the job to install its handler")
    kit.stop(app, submission_id)
    ended = kit.wait_status(app, submission_id, "STOPPED")
    assert (tmp_path / "saved").read_text() == "saved", "the job was killed before the end of its grace"
    assert ended["end_time"] - ended["start_time"] < 30_000


def test_a_stop_reaches_a_child_that_left_the_jobs_process_group_and_gives_it_the_grace(
    app: Any, placement: Any, node: Any, tmp_path: Path
) -> None:
    # A setsid child is out of the group the SIGTERM goes to, but in the job's cgroup: it gets
    # the SIGTERM too, and the grace to save, before the SIGKILL that ends the job.
    node("n1", "--cpus", "2", "--memory", "4Gi", env={"POOLQ_STOP_GRACE_S": "5"})
    submission_id = kit.submit(app, job(tmp_path, f"setsid {GRACEFUL} & sleep 60"), timeout_ms=0)
    kit.wait_status(app, submission_id, "RUNNING")
    wait_for(lambda: "ready" in call(app, "GET", f"/api/jobs/{submission_id}/logs").json["logs"], 30, 0.1,
             what="the job to install its handler")
    kit.stop(app, submission_id)
    kit.wait_status(app, submission_id, "STOPPED")
    assert (tmp_path / "saved").read_text() == "saved", "the setsid child did not get the SIGTERM and its grace"


def test_retries_end_at_max_attempts_and_on_a_stop(app: Any, placement: Any, node: Any, tmp_path: Path) -> None:
    node("n1", "--cpus", "2", "--memory", "4Gi")
    always = kit.submit(app, job(tmp_path, "exit 7", retry_policy={"max_attempts": 2, "backoff_s": 0}), timeout_ms=0)
    ended = kit.wait_status(app, always, "FAILED")
    assert ended["attempt_number"] == 2 and ended["driver_exit_code"] == 7 and len(ended["previous_attempts"]) == 1
    stopped = kit.submit(app, job(tmp_path, "sleep 30", retry_policy={"max_attempts": 5}), timeout_ms=0)
    kit.wait_status(app, stopped, "RUNNING")
    kit.stop(app, stopped)
    ended = kit.wait_status(app, stopped, "STOPPED")
    assert ended["attempt_number"] == 1 and ended["previous_attempts"] == []


def test_a_retried_job_whose_node_is_lost_runs_again_elsewhere_never_twice_at_once(
    app: Any, start_placement: Any, node: Any, tmp_path: Path, admin: Any
) -> None:
    start_placement({"POOLQ_NODE_TTL_S": "3"})
    env = {"POOLQ_NODE_TTL_S": "3", "POOLQ_HEARTBEAT_S": "0.3"}
    first = node("n1", "--cpus", "2", "--memory", "4Gi", env=env)
    runs = tmp_path / "runs"
    command = f'echo "start $POOLQ_NODE_ID $(date +%s%N)" >> {runs}; sleep 4; echo "end $POOLQ_NODE_ID $(date +%s%N)" >> {runs}'
    submission_id = kit.submit(app, job(tmp_path, command, retry_policy={"max_attempts": 2, "backoff_s": 0}),
                               timeout_ms=0)
    kit.wait_status(app, submission_id, "RUNNING")
    node("n2", "--cpus", "2", "--memory", "4Gi", env=env)
    import signal

    os.kill(first.pid, signal.SIGKILL)  # its guardian kills the job; the node is lost after the TTL
    ended = kit.wait_status(app, submission_id, "SUCCEEDED", timeout=kit.SETTLE_S * 2)
    assert ended["attempt_number"] == 2 and ended["driver_node_id"] == "n2"
    assert ended["previous_attempts"][0]["error_type"] == "NODE_LOST"
    lines = [line.split() for line in runs.read_text().splitlines()]
    starts = [(int(t), n) for kind, n, t in lines if kind == "start"]
    ends = [(int(t), n) for kind, n, t in lines if kind == "end"]
    assert [n for _, n in starts] == ["n1", "n2"] and [n for _, n in ends] == ["n2"], lines
    assert starts[1][0] >= int(ended["previous_attempts"][0]["end_time"]) * 1_000_000 - 50_000_000, (
        "the second attempt started before the first was declared lost"
    )
    assert admin.check() == []


# -- the CLI ----------------------------------------------------------------------------------


def test_the_cli_submits_memory_runtime_limit_and_retries(app: Any, service_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """``poolq submit --memory 256Mi --timeout 60 --retries 2`` against a live API."""
    import subprocess
    import sys

    from poolq.embedded import free_port

    port = free_port()
    api = Proc(["api", "--port", str(port), "--workers", "1"], service_env, tmp_path / "api.log").start()
    try:
        wait_for(lambda: _answers(port), kit.START_S, 0.2, what="the API to answer")
        done = subprocess.run(
            [sys.executable, "-m", "poolq", "submit", "--server", f"http://127.0.0.1:{port}", "--json",
             "--memory", "256Mi", "--timeout", "60", "--retries", "2", "--working-dir", str(tmp_path), "--", "true"],
            capture_output=True, text=True, env={**os.environ, **service_env}, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        submission_id = json.loads(done.stdout)["submission_id"]
        record = kit.record(app, submission_id)
        assert record["entrypoint_memory"] == 256 * kit.MiB and record["runtime_limit_s"] == 60
        assert record["retry_policy"]["max_attempts"] == 3
    finally:
        api.stop()


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_the_seed_request_still_behaves_as_before(app: Any) -> None:
    """None of the new fields: the record says so, nothing else changes."""
    from poolq.schemas import SEED_EXAMPLE

    assert kit.post(app, SEED_EXAMPLE, timeout_ms=0).status == 200
    record = kit.record(app, "app-1234")
    assert record["runtime_limit_s"] is None and record["retry_policy"] is None
    assert record["attempt_number"] == 1 and record["previous_attempts"] == [] and record["devices"] == {}


@pytest.mark.parametrize(("fields", "named"), [
    ({"retry_policy": {"retry_on": ["NODE_LOST"]}}, "retry_policy.max_attempts"),
    ({"retry_policy": {"max_attempts": 101}}, "retry_policy.max_attempts"),
    ({"retry_policy": {"max_attempts": 2, "retry_on": ["STOPPED_BY_USER"]}}, "retry_policy.retry_on"),
    ({"retry_policy": {"max_attempts": 2, "retry_on": []}}, "retry_policy.retry_on"),
    ({"retry_policy": {"max_attempts": 2, "backoff_s": -1}}, "retry_policy.backoff_s"),
    ({"retry_policy": {"max_attempts": 2, "tries": 3}}, "retry_policy.tries"),
    ({"retry_policy": 3}, "retry_policy"),
    ({"runtime_limit_s": 0}, "runtime_limit_s"),
    ({"runtime_limit_s": "60"}, "runtime_limit_s"),
])
def test_the_new_fields_are_checked_and_a_400_names_the_field(app: Any, fields: dict[str, Any], named: str) -> None:
    result = kit.post(app, {**kit.JOB, **fields}, timeout_ms=0)
    assert result.status == 400 and named in result.json["fields"], result.json


def test_retry_on_is_a_set_so_its_order_and_repeats_do_not_make_another_request(app: Any) -> None:
    policy = {"max_attempts": 2, "retry_on": ["NODE_LOST", "RUNTIME_LIMIT", "NODE_LOST", "ENTRYPOINT_FAILED"]}
    first = kit.post(app, {**kit.JOB, "submission_id": "app-set1", "retry_policy": policy}, timeout_ms=0)
    assert first.status == 200, first.json
    assert kit.record(app, "app-set1")["retry_policy"]["retry_on"] == ["ENTRYPOINT_FAILED", "NODE_LOST", "RUNTIME_LIMIT"]
    reordered = {**policy, "retry_on": ["RUNTIME_LIMIT", "ENTRYPOINT_FAILED", "NODE_LOST"]}
    again = kit.post(app, {**kit.JOB, "submission_id": "app-set1", "retry_policy": reordered}, timeout_ms=0)
    assert again.status == 200, again.json  # the same request again, not a conflicting one
