"""poolq across hosts: every process on a host of its own, nothing shared but a network.

The hosts are Linux network namespaces on one private switch (tests/netns.py): Redis on
``redis`` (bound to its address, with a password), the API (bound to its address, with
tokens) and a placement worker on ``api``, a package index on ``index`` (the only place
the nodes' pip can install from), node agents on ``n1`` and ``n2``, each with its own
data directory and HOME, and the test's clients on ``client``. The client uploads a
working_dir with Ray's own SDK; each node fetches it from Redis, installs the job's pip
requirement from the index over the network, runs the job and ships its output back.
Then ``n2``'s cable is pulled at the switch: its running job's process dies on ``n2``
(its agent fences itself) before the job ends NODE_LOST, within the node TTL, while
``n1`` goes on; plugged back, ``n2`` registers again and runs a new job.

Needs root and ``ip`` (iproute2); elsewhere every test here is skipped, saying why.
Alone: ``.venv/bin/python -m pytest tests/test_multihost.py`` (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests import netns
from tests.faults.conftest import healthy
from tests.kit import START_S, TERMINAL_STATUSES, wait_ready
from tests.netns import HostProcess, HostRedis, Network
from tests.procs import wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.serial, pytest.mark.processes,
              pytest.mark.xdist_group("multihost"), pytest.mark.timeout(180)]

NODES = ("n1", "n2")
TENANT = "team-a"
API_PORT = 8000
INDEX_PORT = 8080
NODE_TTL_S = 4.0  # POOLQ_NODE_TTL_S: a node silent this long is lost
HEARTBEAT_S = 0.5
FENCE_S = NODE_TTL_S - max(1.0, 0.2 * NODE_TTL_S)  # Settings.fence_s: the agent kills its jobs then
SETTLE_S = 60.0
PYTHON = sys.executable
VENV_BIN = str(Path(sys.executable).parent)
RAY_ENV_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_HEADERS", "RAY_JOB_SUBMIT_HOOK")
PROBE = "poolq_netns_probe"  # the module of the pip requirement, which only the index serves
PROJECT = PROBE.replace("_", "-")  # its name on the index (PEP 503)
REQUIREMENT = [f"{PROJECT}==0.1"]
PROBE_VALUE = "installed from the index"

REPORT = f"""\
import os, sys
import {PROBE}
print("payload:", open(os.path.join("data", "payload.txt")).read().strip())
print("probe:", {PROBE}.VALUE)
print("node:", os.environ["POOLQ_NODE_ID"])
print("netns:", os.stat("/proc/self/ns/net").st_ino)
"""
HOLD = """\
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


# -- the hosts and the stack -----------------------------------------------------------


@dataclass
class Cluster:
    net: Network
    redis: HostRedis
    url: str
    token: str
    index: HostProcess
    agents: dict[str, HostProcess]
    project: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str) -> Any:
        """GET ``path`` of the API from the client host; the JSON answer (200 only)."""
        def fetch() -> Any:
            answer = requests.get(f"{self.url}{path}", headers=self.headers, timeout=5)
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
            return answer.json()

        return self.net.call("client", fetch)

    def record(self, submission_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/jobs/{submission_id}"))

    def node(self, node_id: str) -> dict[str, Any]:
        return next(n for n in self.get("/api/nodes") if n["node_id"] == node_id)

    def wait_status(self, submission_id: str, *statuses: str, timeout: float = SETTLE_S) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.record(submission_id))
            if seen["status"] in TERMINAL_STATUSES and seen["status"] not in statuses:
                raise AssertionError(f"job {submission_id} ended {seen['status']} ({seen['message']}), "
                                     f"wanted {statuses}\n{self.logs()}")
            return seen["status"] in statuses

        wait_for(reached, timeout, 0.1, what=f"job {submission_id} to be {'/'.join(statuses)}")
        return seen

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(30)}" for p in self.net.procs)


def _wheel(directory: Path) -> Path:
    """A pure-Python wheel built by hand (no build backend, no network)."""
    name, version = PROBE, "0.1"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VALUE = {PROBE_VALUE!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def _alive(cluster: Cluster, host: str) -> bool:
    return bool(cluster.node(host)["alive"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"the multi-host test needs network namespaces: {reason}")
    base = tmp_path_factory.mktemp("multihost")
    with Network(base / "hosts") as net:
        for host in ("redis", "api", "index", *NODES, "client"):
            net.add(host)
        server = netns.start_redis(net, "redis")
        common = {
            "POOLQ_REDIS_URL": server.url,
            "POOLQ_NODE_TTL_S": str(NODE_TTL_S),
            "POOLQ_HEARTBEAT_S": str(HEARTBEAT_S),
            "POOLQ_DUTY_INTERVAL_S": "0.1",
            "POOLQ_STOP_GRACE_S": "2",
            "POOLQ_DRAIN_S": "1",
        }
        service = {**common, "POOLQ_DATA_DIR": str(net.dir("api") / "data"), "POOLQ_AUTH": "tokens"}
        token = net.check("api", [PYTHON, "-m", "poolq", "token", "create", TENANT], service).strip()
        api_host = net.address("api")
        net.run("api", [PYTHON, "-m", "poolq", "api", "--host", api_host, "--port", str(API_PORT), "--workers", "1"],
                service, name="api")
        worker = net.run("api", [PYTHON, "-m", "poolq", "worker"], service, name="worker")
        # A PEP 503 index: http.server's listing of simple/<name>/ is the page pip reads.
        wheels = base / "index" / "simple" / PROJECT
        _wheel(wheels)
        serve = [PYTHON, "-m", "http.server", str(INDEX_PORT), "--bind", net.address("index"), "--directory"]
        index = net.run("index", [*serve, str(base / "index")], name="index")
        agents = {}
        for host in NODES:
            node = ["node", "--id", host, "--labels", f"host={host}", "--cpus", "2", "--memory", "2Gi"]
            agents[host] = net.run(host, [PYTHON, "-m", "poolq", *node], {
                **common,
                "POOLQ_DATA_DIR": str(net.dir(host) / "data"),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the jobs' `python`
                "PIP_INDEX_URL": f"http://{net.address('index')}:{INDEX_PORT}/simple",
                "PIP_TRUSTED_HOST": net.address("index"),  # plain HTTP
                "PIP_NO_CACHE_DIR": "1",
            }, name="node")
        url = f"http://{api_host}:{API_PORT}"
        cluster = Cluster(net, server, url, token, index, agents, _project(base / "project"))
        try:
            wait_for(lambda: net.call("client", healthy, url), START_S, 0.1, what="the API to answer from the client host")
            wait_ready(worker, "the placement worker")
            for host, agent in agents.items():
                wait_ready(agent, f"the agent of {host}")
                wait_for(partial(_alive, cluster, host), START_S, 0.1, what=f"{host} to register")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()}") from None
        yield cluster


def _project(directory: Path) -> Path:
    """The working directory the client uploads: a data file and the jobs' scripts."""
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "payload.txt").write_text(f"payload-{uuid.uuid4().hex}\n")
    (directory / "report.py").write_text(REPORT)
    (directory / "hold.py").write_text(HOLD)
    return directory


@pytest.fixture
def sdk(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> netns.On:
    """Ray's JobSubmissionClient on the client host, with the tenant's token."""
    job_submission = pytest.importorskip("ray.job_submission")
    for name in RAY_ENV_VARS:  # Ray lets these override the address it is given
        monkeypatch.delenv(name, raising=False)
    client = cluster.net.call("client", job_submission.JobSubmissionClient, cluster.url, headers=cluster.headers)
    return cluster.net.on("client", client)


def submit(cluster: Cluster, sdk: netns.On, entrypoint: str, host: str, **runtime_env: Any) -> str:
    """Submit with Ray's SDK (which zips and uploads the project), pinned to ``host``."""
    return str(sdk.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": str(cluster.project), **runtime_env},
        entrypoint_num_cpus=1, entrypoint_label_selector={"host": host},
    ))


def assert_ran_on(cluster: Cluster, sdk: netns.On, submission_id: str, host: str) -> str:
    """The job ran on ``host``, in its namespace, and its output came back through the API."""
    record = cluster.record(submission_id)
    assert record["driver_node_id"] == host, record
    logs = str(sdk.get_job_logs(submission_id))
    payload = (cluster.project / "data" / "payload.txt").read_text().strip()
    assert f"payload: {payload}" in logs, logs  # from the uploaded working_dir
    assert f"probe: {PROBE_VALUE}" in logs, logs  # from the pip requirement
    assert f"node: {host}" in logs, logs
    assert f"netns: {cluster.net.inode(host)}" in logs, logs  # on that host, not just named after it
    return logs


# -- the tests -------------------------------------------------------------------------------


def test_uploaded_working_dir_and_pip_requirements_run_on_remote_nodes(cluster: Cluster, sdk: netns.On) -> None:
    jobs = {host: submit(cluster, sdk, "python report.py", host, pip=REQUIREMENT) for host in NODES}
    for host, sid in jobs.items():
        cluster.wait_status(sid, "SUCCEEDED", timeout=120)
        assert_ran_on(cluster, sdk, sid, host)

    # Each node fetched the package from Redis onto its own disk...
    package = cluster.record(jobs["n1"])["runtime_env"]["working_dir"].removeprefix("gcs://")
    assert package.startswith("_ray_pkg_")
    for host in NODES:
        unpacked = cluster.net.dir(host) / "data" / "nodes" / host / "cache" / "pkg" / f"t-{TENANT}" / package
        assert (unpacked / "report.py").exists(), f"{host} has no copy of {package}"
    # ...and installed the requirement itself, from the index, over the network.
    served = cluster.index.output()
    for host in NODES:
        fetched = f"{cluster.net.address(host)} - - "
        assert any(fetched in line and f"GET /simple/{PROJECT}/{PROBE}-0.1" in line
                   for line in served.splitlines()), f"{host} did not download the wheel:\n{served}"

    # Ray's log tail: a WebSocket redirected to the API host's server of tails.
    async def follow() -> str:
        return "".join([chunk async for chunk in sdk.target.tail_job_logs(jobs["n2"])])

    tailed = cluster.net.call("client", lambda: asyncio.run(asyncio.wait_for(follow(), 30)))
    assert tailed == sdk.get_job_logs(jobs["n2"])


def test_a_node_cut_off_is_lost_fences_its_job_and_comes_back(cluster: Cluster, sdk: netns.On) -> None:
    net = cluster.net
    pid_file = net.dir("n2") / "hold.pid"
    held = submit(cluster, sdk, f"python hold.py {pid_file}", "n2")
    cluster.wait_status(held, "RUNNING")
    wait_for(pid_file.exists, SETTLE_S, 0.05, what="the held job to write its pid")
    pid = int(pid_file.read_text())
    assert netns.process_alive(pid) and net.runs_in(pid, "n2") and pid in net.pids("n2")
    wait_for(lambda: "holding" in sdk.get_job_logs(held), SETTLE_S, 0.1, what="the held job's output to reach the API")

    cut = time.monotonic()
    net.cut("n2")
    died: float | None = None  # seconds after the cut
    while True:
        elapsed = time.monotonic() - cut
        if died is None and not netns.process_alive(pid):
            died = elapsed
        record = cluster.record(held)
        if record["status"] != "RUNNING":
            lost = elapsed
            if died is None and not netns.process_alive(pid):
                died = lost  # between the two looks
            break
        assert elapsed < NODE_TTL_S + 10, f"still RUNNING {elapsed:.1f}s after the cut\n{cluster.logs()}"
        time.sleep(0.05)
    # Fencing's promise: by the time a node is declared lost, its jobs no longer run.
    assert died is not None, f"{record['status']} after {lost:.2f}s while pid {pid} still ran on n2"
    assert record["status"] == "FAILED" and record["error_type"] == "NODE_LOST", record
    assert "n2" in record["message"], record
    # Killed by its own agent (or that agent's guardian) on n2, which nothing else could reach,
    # at its fencing time: not at once, and before the reaper could declare the node lost.
    assert 1.0 <= died <= FENCE_S + 1.5, f"the job died {died:.2f}s after the cut (fence {FENCE_S:g}s)"
    assert lost <= NODE_TTL_S + 2.5, f"NODE_LOST {lost:.2f}s after the cut (TTL {NODE_TTL_S:g}s)"
    assert pid not in net.pids("n2")
    assert cluster.node("n2")["state"] == "dead"
    # Its agent says so too, once its loop looks (a heartbeat that times out can delay it past the guardian).
    wait_for(lambda: "fenced:" in cluster.agents["n2"].output(), SETTLE_S, 0.05, what="n2's agent to fence itself")
    assert sdk.get_job_logs(held) == "holding\n"  # what it wrote before the cut is kept

    # The rest of the cluster goes on meanwhile.
    meanwhile = submit(cluster, sdk, "python report.py", "n1", pip=REQUIREMENT)
    cluster.wait_status(meanwhile, "SUCCEEDED")
    assert_ran_on(cluster, sdk, meanwhile, "n1")

    # Plugged back, n2 registers again (a new incarnation) and takes placements.
    net.restore("n2")
    wait_for(partial(_alive, cluster, "n2"), SETTLE_S, 0.1, what="n2 to register again")
    # (the agent logs it just after registering, so it may come a moment after the API shows n2)
    wait_for(lambda: "is back after fencing" in cluster.agents["n2"].output(), SETTLE_S, 0.05, what="n2's agent to say so")
    again = submit(cluster, sdk, "python report.py", "n2", pip=REQUIREMENT)
    cluster.wait_status(again, "SUCCEEDED")
    assert_ran_on(cluster, sdk, again, "n2")
