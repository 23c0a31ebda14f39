"""``poolq up``: the whole stack on one machine, in the foreground (docs/operations.md).

One stack per data directory: ``poolq up`` holds an exclusive lock on
``$data_dir/up.lock`` for its whole life and refuses to start beside another (naming
it), and refuses a busy API port before starting anything. Then it starts the embedded
Redis (unless POOLQ_REDIS_URL is set), the API, a placement worker and, unless
``--no-node``, a local node agent, each a child process whose output is relayed line
by line with a prefix (poolq/commands/relay.py: a child never blocks on it). It says
``poolq is up`` once ``/healthz`` answers. Ctrl-C (or SIGTERM) stops the children in
order, then Redis, which flushes its append-only file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Any

from poolq.commands.relay import Relay
from poolq.embedded import EmbeddedRedis, ReplicatedRedis, write_url_file
from poolq.procs import die_with_parent
from poolq.settings import ConfigError, Settings

STARTUP_S = 10.0  # a child that exits sooner failed to start: stop, rather than restart it forever
READY_S = 120.0  # how long to wait for /healthz before saying what is still missing
MASTER_CHECK_S = 2.0  # with --replicas: how often to ask the sentinels which member is master


class StackRunning(ConfigError):
    """Another ``poolq up`` holds this data directory."""


def take_lock(settings: Settings, api_url: str) -> IO[str]:
    """Hold the data directory's lock for the life of the process, or raise StackRunning
    naming the process that holds it. The lock is an flock: the kernel lets it go when
    its holder dies, however it dies, so a stale file never blocks a start."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(settings.lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = _holder(handle.read())
        handle.close()
        raise StackRunning(
            f"another poolq up (pid {holder.get('pid', '?')}) is running on the data directory {settings.data_dir}, "
            f"its API on {holder.get('api', '?')}; use that one (`poolq nodes list` finds it from any directory), "
            f"stop it (Ctrl-C in its terminal, or kill {holder.get('pid', 'its pid')}), "
            "or start a separate stack with --data-dir DIR --port PORT"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "api": api_url, "started": int(time.time())}) + "\n")
    handle.flush()
    return handle


def _holder(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on, before anything is started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the API's server will
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the API on {host}:{port}: {exc.strerror or exc} "
                f"(`ss -ltnp 'sport = :{port}'` shows who holds it); choose another with --port"
            ) from None


def stack_lock_holder(settings: Settings) -> dict[str, Any] | None:
    """What the running ``poolq up`` of this data directory wrote in its lock, if one runs."""
    try:
        handle = open(settings.lock_file)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(handle.read())
        return None  # nobody holds it


class Supervisor:
    def __init__(
        self, settings: Settings, commands: dict[str, list[str]], *, relay: Relay | None = None, replicas: int = 0
    ):
        self.settings = settings
        self.replicas = replicas  # >0: a master, this many replicas and three sentinels instead of one Redis
        self._master: str | None = None  # the member last seen master
        self._next_master_check = 0.0
        self.commands = commands
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.stop_requested = False  # set by the signal handler: a plain flag, no lock to deadlock on
        self.relay = relay or Relay(sys.stdout.fileno())
        self.redis: EmbeddedRedis | ReplicatedRedis | None = None
        self.api_url = f"http://{_url_host(settings.host)}:{settings.port}"

    def say(self, name: str, line: str) -> None:
        self.relay.say(name, line)

    def run(self) -> int:
        lock = take_lock(self.settings, self.api_url)  # first: a second start names the running stack
        try:
            check_port_free(self.settings.host, self.settings.port)
            return self._run(lock)
        finally:
            lock.close()

    def _run(self, lock: IO[str]) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        env = dict(os.environ)
        if not self.settings.redis_url:
            # redis-server holds the lock too: were `poolq up` killed, no second stack could
            # start a second redis-server on this append-only file until this one is gone.
            if self.replicas:
                self.redis = ReplicatedRedis(
                    self.settings.data_dir / "redis", replicas=self.replicas, pass_fds=(lock.fileno(),)
                )
            else:
                self.redis = EmbeddedRedis(self.settings.data_dir / "redis", pass_fds=(lock.fileno(),))
            url = self.redis.start()
            write_url_file(self.settings.redis_url_file, url)
            env["POOLQ_REDIS_URL"] = url
            self.say("redis", self._describe_redis())
        else:
            self.say("redis", "using POOLQ_REDIS_URL")
        env["POOLQ_DATA_DIR"] = str(self.settings.data_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if os.geteuid() == 0:
            self.say("up", "running as root: the node agent runs jobs as root (docs/running.md)")
        try:
            for name, command in self.commands.items():
                self._spawn(name, command, env)
            ready_by: float | None = time.monotonic() + READY_S
            while not self.stop_requested:
                time.sleep(0.2)
                if ready_by is not None:
                    ready_by = self._announce_when_ready(ready_by)
                self._watch_master()
                for name, child in list(self.children.items()):
                    if child.poll() is None:
                        continue
                    if time.monotonic() - self.started[name] < STARTUP_S:
                        self.say("up", f"{name} exited with status {child.returncode} at start; stopping everything")
                        self.stop_requested = True
                        break
                    self.say("up", f"{name} exited with status {child.returncode}; starting it again")
                    self._spawn(name, self.commands[name], env)
        finally:
            self.shutdown()
        return 0

    def _announce_when_ready(self, ready_by: float) -> float | None:
        """Say ``poolq is up`` once /healthz is 200 (with ``--no-node``: once the API and
        placement are); after READY_S, say what is still missing. None once said."""
        status, report = _get_json(self.api_url + "/healthz")
        parts = report.get("components", {}) if isinstance(report, dict) else {}
        no_node = "node" not in self.commands
        if status == 200 or (
            no_node and parts and all(part.get("status") == "ok" for name, part in parts.items() if name != "nodes")
        ):
            self.say(
                "up",
                f"poolq is up: API on {self.api_url}, dashboard on {self.api_url}/ui/ "
                f"(Ctrl-C stops it; data in {self.settings.data_dir})",
            )
            poolq = _poolq_command()
            hint = f"{poolq} node (on a machine that runs jobs)" if no_node else f"{poolq} submit --wait -- echo hello"
            self.say("up", f"try: {hint}")
            return None
        if time.monotonic() > ready_by:
            missing = [part.get("error") or name for name, part in parts.items() if part.get("status") != "ok"]
            self.say("up", f"still not ready after {READY_S:g}s: {'; '.join(missing) or 'the API does not answer'}")
            return None
        return ready_by

    def _describe_redis(self) -> str:
        if isinstance(self.redis, ReplicatedRedis):
            members = ", ".join(f"{name} on :{m.port}" for name, m in self.redis.members.items())
            sentinels = ", ".join(f":{s.port}" for s in self.redis.sentinels)
            return (
                f"embedded redis-servers: {members} (the first is master), sentinels on {sentinels}, "
                f"data in {self.redis.directory}"
            )
        assert self.redis is not None
        return f"embedded redis-server on 127.0.0.1:{self.redis.port}, data in {self.redis.directory}"

    def _watch_master(self) -> None:
        """Say when the sentinels move the master (and remember it for the next start)."""
        if not isinstance(self.redis, ReplicatedRedis) or time.monotonic() < self._next_master_check:
            return
        self._next_master_check = time.monotonic() + MASTER_CHECK_S
        master = self.redis.master()
        if master and master != self._master:
            if self._master is not None:
                self.say("redis", f"failover: {master} is the master now (was {self._master})")
            self._master = master

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            preexec_fn=die_with_parent,
        )
        self.children[name] = child
        self.started[name] = time.monotonic()
        assert child.stdout is not None
        self.relay.pump(name, child.stdout)

    def shutdown(self) -> None:
        self.say("up", "stopping")
        # The API first (no new work), then the node agent (it drains), then placement.
        for name in ("api", "node", "worker"):
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                budget = self.settings.drain_s + self.settings.stop_grace_s + 5 if name == "node" else 15
                try:
                    child.wait(budget)
                except subprocess.TimeoutExpired:
                    self.say("up", f"{name} did not stop in {budget:g}s; killing it")
                    child.kill()
                    child.wait()
        if self.redis is not None:
            self.redis.stop()
            self.say("redis", "stopped (append-only file flushed)")
        time.sleep(0.05)  # let the pumps queue the last lines
        self.relay.flush()  # bounded: an output nobody reads never holds the exit


def _poolq_command() -> str:
    """How the user runs poolq: ``poolq`` when that is on PATH, else the path they used
    (``.venv/bin/poolq`` under ``make run``)."""
    used = sys.argv[0]
    if os.path.basename(used) != "poolq":
        return "poolq"
    on_path = shutil.which("poolq")
    if on_path and os.path.realpath(on_path) == os.path.realpath(used):
        return "poolq"
    return os.path.relpath(used) if not os.path.relpath(used).startswith("..") else used


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def run_up(
    settings: Settings, *, with_node: bool, node_args: list[str], insecure: bool = False, replicas: int = 0
) -> int:
    python = [sys.executable, "-m", "poolq"]
    commands = {
        "api": [
            *python,
            "api",
            "--host",
            settings.host,
            "--port",
            str(settings.port),
            *(["--insecure-no-auth"] if insecure else []),
        ],
        "worker": [*python, "worker", "--quiet"],
    }
    if with_node:
        commands["node"] = [*python, "node", "--quiet", *node_args]
    return Supervisor(settings, commands, replicas=replicas).run()
