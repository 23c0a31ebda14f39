"""``poolq up``: the whole stack on one machine, in the foreground (docs/operations.md).

Starts the embedded Redis (unless POOLQ_REDIS_URL is set), then the API, a
placement worker and, unless ``--no-node``, a local node agent, each a child
process whose output is printed line by line with a prefix. Ctrl-C (or SIGTERM)
stops the children in order, then Redis, which flushes its append-only file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from poolq.embedded import EmbeddedRedis, write_url_file
from poolq.procs import die_with_parent
from poolq.settings import Settings

COLOURS = {"api": 36, "worker": 35, "node": 32, "redis": 33, "up": 1}
STARTUP_S = 10.0  # a child that exits sooner failed to start: stop, rather than restart it forever


class Supervisor:
    def __init__(self, settings: Settings, commands: dict[str, list[str]]):
        self.settings = settings
        self.commands = commands
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.stop_requested = False  # set by the signal handler: a plain flag, no lock to deadlock on
        self._print_lock = threading.Lock()
        self.redis: EmbeddedRedis | None = None

    def say(self, name: str, line: str) -> None:
        prefix = f"{name:>6} |"
        if sys.stdout.isatty():
            prefix = f"\x1b[{COLOURS.get(name, 0)}m{prefix}\x1b[0m"
        with self._print_lock:
            sys.stdout.write(f"{prefix} {line.rstrip()}\n")
            sys.stdout.flush()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        env = dict(os.environ)
        if not self.settings.redis_url:
            self.redis = EmbeddedRedis(self.settings.data_dir / "redis")
            url = self.redis.start()
            write_url_file(self.settings.redis_url_file, url)
            env["POOLQ_REDIS_URL"] = url
            self.say("redis", f"embedded redis-server on 127.0.0.1:{self.redis.port}, data in {self.redis.directory}")
            self.say("redis", f"its URL (with password) is in {self.settings.redis_url_file}")
        else:
            self.say("redis", "using POOLQ_REDIS_URL")
        env["POOLQ_DATA_DIR"] = str(self.settings.data_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            for name, command in self.commands.items():
                self._spawn(name, command, env)
            self.say("up", f"poolq is up: API on http://{self.settings.host}:{self.settings.port}  (Ctrl-C stops it)")
            while not self.stop_requested:
                time.sleep(0.2)
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
        threading.Thread(target=self._pump, args=(name, child.stdout), daemon=True).start()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.say(name, raw.decode("utf-8", "replace"))

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
        time.sleep(0.05)  # let the pumps print the last lines


def run_up(settings: Settings, *, with_node: bool, node_args: list[str], insecure: bool = False) -> int:
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
        "worker": [*python, "worker"],
    }
    if with_node:
        commands["node"] = [*python, "node", *node_args]
    return Supervisor(settings, commands).run()
