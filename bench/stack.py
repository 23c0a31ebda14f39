"""Starting and stopping what a benchmark scenario needs, and nothing left behind.

A ``Stack`` owns a fresh temporary directory, an embedded Redis in it (append-only,
as in production) and every child process a scenario starts: API servers, placement
workers, node agents, the baseline servers. Children run in their own sessions (so
Ctrl-C reaches only the harness, which stops them in order) and receive SIGKILL if
the harness dies. ``close()`` (the context manager's exit) stops them all, then
Redis, then removes the directory, also after an error or Ctrl-C. Each child's
output goes to a log file whose tail is shown when the child fails to start.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import redis

from poolq import keys
from poolq.embedded import EmbeddedRedis, ReplicatedRedis, free_port
from poolq.redis_io import connect
from poolq.settings import Settings
from tests import procs

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]  # bench/ is not installed: children import it from here


class BenchError(Exception):
    """A scenario could not be set up or measured (a child did not start, a wait timed out)."""


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; BenchError naming ``what`` after ``timeout_s``."""
    try:
        return procs.wait_for(predicate, timeout_s, interval_s, what)
    except AssertionError as exc:
        raise BenchError(str(exc)) from None


class Child(procs.Process):
    """One child of a benchmark stack (it dies with the benchmark)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path):
        super().__init__(argv, env, log_path, cwd=cwd, name=name, tied=True)
        self.start()

    def check_alive(self) -> None:
        if not self.alive():
            assert self.process is not None
            raise BenchError(f"{self.name} exited with status {self.process.returncode}:\n{self.tail()}")


class Api:
    """An HTTP server a scenario talks to (poolq's API or a baseline), with a tiny client."""

    def __init__(self, child: Child, port: int):
        self.child, self.port = child, port

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            all_headers = (
                {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
            )
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            raw = response.read()
            answer = (
                json.loads(raw)
                if raw and response.getheader("Content-Type", "").startswith("application/json")
                else raw
            )
            return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
        finally:
            connection.close()

    def ready(self) -> bool:
        self.child.check_alive()
        try:
            return self.request("GET", "/livez", timeout_s=2)[0] == 200
        except OSError:
            return False


class Stack:
    """A temporary directory, an embedded Redis, and the children started on it."""

    def __init__(self, name: str):
        self.root = Path(tempfile.mkdtemp(prefix=f"poolq-bench-{name}-"))
        self.redis_server: EmbeddedRedis | None = None
        self.replicated: ReplicatedRedis | None = None  # instead of redis_server: a master, replicas, sentinels
        self.children: list[Child] = []
        self._client: redis.Redis | None = None
        self._counter = 0

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.show_logs()
        self.close()

    def show_logs(self, lines: int = 12) -> None:
        """The tail of every child's output, to understand a failure (the directory is about to go)."""
        for child in self.children:
            state = "running" if child.alive() or child.process is None else f"exited {child.process.returncode}"
            print(f"--- {child.name} ({state}), last lines of its log:\n{child.tail(lines)}", file=sys.stderr)

    # -- Redis -------------------------------------------------------------------

    def start_redis(self) -> str:
        self.redis_server = EmbeddedRedis(self.root / "redis", appendonly=True)
        return self.redis_server.start()

    def start_replicated(self, replicas: int) -> str:
        """A master, ``replicas`` replicas and three sentinels (``poolq up --replicas``)."""
        self.replicated = ReplicatedRedis(self.root / "redis", replicas=replicas)
        return self.replicated.start()

    @property
    def url(self) -> str:
        if self.replicated is not None:
            return self.replicated.url
        assert self.redis_server is not None, "start_redis() first"
        return self.redis_server.url

    @property
    def redis(self) -> redis.Redis:
        """A decoding client with generous timeouts (big pipelines, INFO on a big dataset);
        through the sentinels, when there are some."""
        if self._client is None:
            if self.replicated is not None:
                self._client = connect(Settings(redis_url=self.url), timeout_s=120, retries=3)
            else:
                self._client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=120)
        return self._client

    def redis_cpu_s(self) -> float:
        """redis-server's CPU time so far (INFO cpu: system + user), in seconds."""
        info = self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def command_stats(self) -> dict[str, tuple[int, int]]:
        """Per command so far (INFO commandstats): its calls and Redis's microseconds in it."""
        stats = self.redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): (int(s["calls"]), int(s["usec"])) for name, s in stats.items()}

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of poolq children: this stack's Redis and data dir, quick shutdowns."""
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "POOLQ_REDIS_URL": self.url,
            "POOLQ_DATA_DIR": str(self.root / "data"),
            "POOLQ_AUTH": "none",
            "POOLQ_DRAIN_S": "1",  # an agent stopped at the end of a scenario drains briefly
            "POOLQ_STOP_GRACE_S": "1",
            **extra,
        }

    # -- children ----------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        self._counter += 1
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        child = Child(name, argv, env or self.env(), logs / f"{self._counter:02d}-{name}.log", self.root)
        self.children.append(child)
        return child

    def api(self, workers: int | None = None, **env: str) -> Api:
        """``python -m poolq api --port P`` (granian; POOLQ_API_WORKERS processes), ready;
        ``env``: more POOLQ_* settings for it."""
        port = free_port()
        extra = {"POOLQ_API_WORKERS": str(workers)} if workers else {}
        child = self.spawn("api", [PYTHON, "-m", "poolq", "api", "--port", str(port)], self.env(**extra, **env))
        api = Api(child, port)
        wait_for(api.ready, 60, "the API to answer /livez")
        return api

    def worker(self, index: int = 0) -> Child:
        """``python -m poolq worker`` (not waited for: see ``wait_ready``)."""
        return self.spawn(f"worker{index}", [PYTHON, "-m", "poolq", "worker", "--loglevel", "INFO"])

    def wait_ready(self, workers: list[Child], timeout_s: float = 60) -> None:
        """Celery logs ``celery@host ready.`` once it consumes its queues."""

        def all_ready() -> bool:
            for child in workers:
                child.check_alive()
            return all(" ready." in child.output() for child in workers)

        wait_for(all_ready, timeout_s, "placement workers to log 'ready'", interval_s=0.1)

    def node(self, node_id: str, *args: str) -> Child:
        """``python -m poolq node --id ID ...``, ready once its node is live in Redis."""
        child = self.spawn(f"node-{node_id}", [PYTHON, "-m", "poolq", "node", "--id", node_id, *args])

        def registered() -> bool:
            child.check_alive()
            return self.redis.hget(keys.node(node_id), "state") == "live" and " ready." in child.output()

        wait_for(registered, 60, f"node agent {node_id} to register", interval_s=0.1)
        return child

    def gunicorn_baseline(self) -> Api:
        port = free_port()
        child = self.spawn(
            "baseline-gunicorn",
            [
                PYTHON,
                "-m",
                "gunicorn",
                "-w",
                "2",
                "-k",
                "sync",
                "-b",
                f"127.0.0.1:{port}",
                "bench.baseline:application",
            ],
            self.env(BASELINE_REDIS_URL=self.url),
        )
        return self._ready_baseline(Api(child, port))

    def granian_baseline(self) -> Api:
        return self.granian_app("baseline-granian", "bench.baseline:application")

    def granian_floor(self) -> Api:
        """The floor endpoints (bench/floor.py), under the baseline's server and settings."""
        return self.granian_app("floor-granian", "bench.floor:application")

    def granian_app(self, name: str, app: str) -> Api:
        port = free_port()
        child = self.spawn(
            name,
            [
                PYTHON,
                "-m",
                "granian",
                "--interface",
                "wsgi",
                "--workers",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                app,
            ],
            self.env(BASELINE_REDIS_URL=self.url, FLOOR_REDIS_URL=self.url),
        )
        return self._ready_baseline(Api(child, port))

    def _ready_baseline(self, api: Api) -> Api:
        def answers() -> bool:
            api.child.check_alive()
            try:
                return api.request("GET", "/", timeout_s=2)[0] == 404
            except OSError:
                return False

        wait_for(answers, 60, f"{api.child.name} to answer")
        return api

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        """Stop every child (newest first), then Redis; remove the directory. Never raises.

        A second Ctrl-C while stopping is ignored, so that it cannot leave children behind.
        """
        masked = _mask_signals()
        try:
            self._close()
        finally:
            for sig, handler in masked.items():
                signal.signal(sig, handler)

    def _close(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {child.name}: {exc}", file=sys.stderr)
        self.children.clear()
        if self._client is not None:
            self._client.close()
        if self.redis_server is not None:
            try:
                self.redis_server.stop()
            except Exception as exc:
                print(f"bench: could not stop redis-server: {exc}", file=sys.stderr)
                if self.redis_server.process is not None and self.redis_server.process.poll() is None:
                    self.redis_server.process.kill()
        if self.replicated is not None:
            try:
                self.replicated.stop()
            except Exception as exc:
                print(f"bench: could not stop the replicated Redis: {exc}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


def _mask_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process used, with that of the children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(tick) for tick in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name is in parentheses and may hold spaces: the ppid follows the last ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    found = [pid]
    for child in children_of(pid):
        found += process_tree(child)
    return found
