"""Redis through Sentinel (poolq/sentinel.py, docs/operations.md): the URL, a real master
with replicas and three sentinels (poolq.embedded.ReplicatedRedis), the durability
setting (WAIT) and `poolq up --replicas`. The failover under load is in
tests/faults/test_failover.py."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from api_shim.app import App
from poolq import keys
from poolq.embedded import MASTER_NAME, EmbeddedRedis, ReplicatedRedis, free_port
from poolq.messaging import create_celery
from poolq.redis_io import connect
from poolq.sentinel import SentinelUrl, celery_broker, format_url, is_sentinel_url, parse
from poolq.settings import ConfigError, Settings, redact
from tests import kit
from tests.procs import wait_for
from tests.test_up import Up, http
from tests.wsgi import call

# -- the URL ---------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_passwords() -> None:
    url = "redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380,s3:5000/jobs/2?sentinel_password=sp"
    target = parse(url)
    assert target == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("::1", 26380), ("s3", 5000)),
        master="jobs",
        db=2,
        password="p@ss",
        sentinel_password="sp",
    )
    assert is_sentinel_url(url) and not is_sentinel_url("redis://:p@h:6379/0")
    assert parse(format_url(target)) == target
    assert parse("rediss+sentinel://h:1/m?ssl_ca_certs=/ca.pem").tls_options == (("ssl_ca_certs", "/ca.pem"),)
    assert parse("redis+sentinel://h:1/m").db == 0
    shown = redact(url)
    assert "p%40ss" not in shown and "sp" not in shown.split("?")[1] and "sentinel_password=***" in shown


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:1", "names the master"),
        ("redis+sentinel://h:1/m/x", "database must be a number"),
        ("redis+sentinel://h/m", "HOST:PORT"),
        ("redis+sentinel://h:1,:2/m", "HOST:PORT"),
        ("redis+sentinel://h:1/m?password=x", "unknown Sentinel URL option password"),
    ],
)
def test_a_bad_sentinel_url_is_refused_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse(url)


def test_celery_gets_kombus_form_of_the_same_url() -> None:
    target = parse("redis+sentinel://:pw@h1:1,h2:2/m/3?sentinel_password=sp")
    broker, options, use_ssl = celery_broker(target, 0.5)
    assert broker == "sentinel://:pw@h1:1/3;sentinel://:pw@h2:2/3"
    assert options["master_name"] == "m" and options["sentinel_kwargs"]["password"] == "sp"
    assert use_ssl is None
    app = create_celery(Settings(redis_url=format_url(target)))
    assert app.conf.broker_url.startswith("sentinel://")
    assert app.conf.broker_transport_options["master_name"] == "m"


def test_tls_ipv6_and_bad_ports_in_the_url() -> None:
    from kombu.utils.url import url_to_parts

    target = parse("rediss+sentinel://:pw@[fd00::5]:26379,h2:26380/m/0")
    broker, _, use_ssl = celery_broker(target, 0.5)
    assert use_ssl  # kombu speaks TLS to the master only for a non-empty dict
    first = broker.split(";")[0]
    assert first == "sentinel://:pw@[fd00::5]:26379/0" and url_to_parts(first).hostname == "fd00::5"
    assert parse(format_url(target)) == target and "[fd00::5]:26379" in format_url(target)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse("redis+sentinel://h:99999/m")
    with pytest.raises(ConfigError, match="rediss"):
        parse("redis+sentinel://h:1/m?ssl_ca_certs=/ca.pem")


def test_sentinels_that_do_not_answer_are_a_503_within_2_s_and_leak_no_connections(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]  # nothing listens there
    url = "redis+sentinel://:pw@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/poolq/0"
    app = App(Settings(redis_url=url, data_dir=tmp_path / "data"), waker=lambda queue: None)
    for method, path, body in (("POST", "/api/jobs", kit.JOB), ("GET", "/api/jobs/app-x", None)):
        began = time.monotonic()
        answer = call(app, method, path, body, headers=kit.job_headers(timeout_ms=0))
        took = time.monotonic() - began
        assert answer.status == 503, answer.body
        assert took < 2.0, f"{method} {path}: a 503 must come within 2 s, came after {took:.1f} s"
    pool = app.store.redis.connection_pool
    for _ in range(20):
        call(app, "GET", "/api/jobs/app-x")
    assert len(pool._connections) <= 2, "every failed connection stayed in the pool's list"


# -- a real replicated set ---------------------------------------------------------------------


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    servers = ReplicatedRedis(tmp_path / "redis", replicas=1)
    servers.start()
    yield servers
    for process in [m.process for m in servers.members.values()]:
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # whatever the test did
    servers.stop()


def replicas_in_sync(servers: ReplicatedRedis) -> bool:
    client = redis.Redis(port=servers.members["redis"].port, password=servers.password)
    return int(client.info("replication")["connected_slaves"]) == len(servers.members) - 1


def test_every_process_reaches_the_master_through_the_sentinels(replicated: ReplicatedRedis, tmp_path: Path) -> None:
    settings = Settings(redis_url=replicated.url, data_dir=tmp_path / "data")
    client = connect(settings)
    assert client.info("replication")["role"] == "master"
    app = App(settings)
    submission_id = kit.submit(app, timeout_ms=0)
    assert kit.record(app, submission_id)["status"] == "PENDING"
    # What the API stored is on the master the sentinels name, and on its replica.
    master_port = replicated.members["redis"].port
    direct = redis.Redis(port=master_port, password=replicated.password, decode_responses=True)
    assert direct.exists(keys.job(keys.ref("default", submission_id)))
    replica = next(m for name, m in replicated.members.items() if name != "redis")
    copy = redis.Redis(port=replica.port, password=replicated.password, decode_responses=True)
    wait_for(lambda: copy.exists(keys.job(keys.ref("default", submission_id))), 10, what="the replica to have the job")
    # A master without poolq's scripts (a new one, or one restarted without them) gets them
    # loaded again on the first NOSCRIPT.
    direct.script_flush()
    assert kit.record(app, kit.submit(app, timeout_ms=0))["status"] == "PENDING"
    # Celery's broker goes through the sentinels too: a wake-up lands on the master.
    create_celery(settings).send_task("poolq.place", queue="poolq-placement-probe")
    assert direct.llen("poolq-placement-probe") == 1
    assert replicated.master() == "redis"


def test_a_queue_publisher_reaches_the_master_through_the_sentinels_as_docs_api_says(
    replicated: ReplicatedRedis,
) -> None:
    from celery import Celery

    target = parse(replicated.url)
    broker = ";".join(f"sentinel://:{replicated.password}@127.0.0.1:{port}/0" for _, port in target.sentinels)
    app = Celery(broker=broker, broker_transport_options={
        "master_name": MASTER_NAME, "sentinel_kwargs": {"password": replicated.sentinel_password}})
    app.send_task("poolq.submit", queue="poolq.submit", kwargs={"body": {**kit.JOB, "submission_id": "app-pub"}})
    direct = redis.Redis(port=replicated.members["redis"].port, password=replicated.password)
    assert direct.llen("poolq.submit") == 1  # on the master, where poolq's queue consumer takes it


def test_a_sentinel_that_does_not_answer_is_asked_once_then_skipped(replicated: ReplicatedRedis) -> None:
    """A sentinel cut off by a partition (here: a socket that accepts and never answers)
    first in the URL costs one timeout per new connection, not redis-py's ten retries
    with a backoff (~7 s), which held every request to a cut master past its 2 s."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = parse(replicated.url)
        url = format_url(dataclasses.replace(target, sentinels=(silent.getsockname(), *target.sentinels)))
        settings = Settings(redis_url=url)
        started = time.monotonic()
        assert connect(settings).ping()
        create_celery(settings).send_task("poolq.place", queue="poolq-placement-probe")
        took = time.monotonic() - started
        assert took < 2.0, f"a connection and a wake-up took {took:.1f} s past a silent sentinel"


def test_durable_acceptance_waits_for_a_replica_and_says_unknown_when_none_confirms(
    replicated: ReplicatedRedis, tmp_path: Path
) -> None:
    settings = Settings(redis_url=replicated.url, data_dir=tmp_path / "data", redis_wait_replicas=1)
    app = App(settings, waker=lambda queue: None)
    wait_for(lambda: replicas_in_sync(replicated), 20, what="the replica to connect")
    body = {**kit.JOB, "submission_id": "app-durable-1"}
    assert kit.post(app, body, timeout_ms=0).status == 200
    results = kit.submit_batch(app, [{**kit.JOB, "submission_id": f"app-durable-b{i}"} for i in range(3)], timeout_ms=0)
    assert all("submission_id" in r for r in results), results

    (replica,) = [m for name, m in replicated.members.items() if name != "redis"]
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)  # a replica that does not confirm
    try:
        began = time.monotonic()
        answer = kit.post(app, {**kit.JOB, "submission_id": "app-durable-2"}, timeout_ms=0)
        took = time.monotonic() - began
        assert answer.status == 503, answer.body
        assert "0 of the 1 replicas" in answer.json["error"] and "send the same request" in answer.json["error"]
        assert took < 2.0, f"a 503 must come within 2 s, came after {took:.1f} s"
        batch = call(app, "POST", "/api/jobs/batch", {"jobs": [{**kit.JOB, "submission_id": "app-durable-b9"}]},
                     headers=kit.job_headers(timeout_ms=0))
        assert batch.status == 503 and "0 of the 1 replicas" in batch.json["error"], batch.body
        # An idempotent retry of an acknowledged job is not confirmed either: its answer
        # would promise what a failover now could still take back.
        assert kit.post(app, body, timeout_ms=0).status == 503
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    wait_for(lambda: kit.post(app, {**kit.JOB, "submission_id": "app-durable-2"}, timeout_ms=0).status == 200, 20,
             what="the same request to be accepted once the replica confirms again")
    assert kit.record(app, "app-durable-2")["status"] == "PENDING"


def test_a_batch_whose_reply_is_lost_is_no_200_for_a_job_no_replica_confirmed(
    replicated: ReplicatedRedis, tmp_path: Path
) -> None:
    from poolq.errors import Unavailable

    settings = Settings(redis_url=replicated.url, data_dir=tmp_path / "data", redis_wait_replicas=1)
    app = App(settings, waker=lambda queue: None)
    job = app.store.prepare({**kit.JOB, "submission_id": "app-lost-reply"}, schedule_timeout_ms=0)
    assert app.store.submit_many([job]) == [True]
    # What submit_many does when the round trip's reply is lost (a timeout, a broken
    # connection): it reads the job back. Found stored, it is still not confirmed.
    (outcome,) = app.store._read_back([job], Unavailable("the reply was lost"))
    assert isinstance(outcome, Unavailable) and "send the same request" in str(outcome)
    plain = App(Settings(redis_url=replicated.url, data_dir=tmp_path / "data"), waker=lambda queue: None)
    assert plain.store._read_back([job], Unavailable("the reply was lost")) == [False]  # without WAIT: stored is a 200


def test_the_durability_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="POOLQ_REDIS_WAIT_TIMEOUT_MS"):
        Settings.from_env({"POOLQ_REDIS_WAIT_REPLICAS": "1", "POOLQ_REDIS_WAIT_TIMEOUT_MS": "1000"})
    with pytest.raises(ConfigError, match="POOLQ_REDIS_WAIT_REPLICAS"):
        Settings.from_env({"POOLQ_REDIS_WAIT_REPLICAS": "-1"})


# -- poolq up --replicas -----------------------------------------------------------------------


@pytest.mark.processes
def test_up_with_replicas_runs_the_stack_on_a_sentinel_watched_set(tmp_path: Path) -> None:
    data_dir = tmp_path / "poolq-data"
    up = Up(data_dir, free_port(), tmp_path / "up.log", args=("--replicas", "2"))
    try:
        wait_for(up.ready, timeout=kit.START_S, what="poolq up --replicas 2 to serve and register its node")
        url = (data_dir / "redis.url").read_text().strip()
        assert url.startswith("redis+sentinel://:") and f"/{MASTER_NAME}/0?sentinel_password=" in url
        target = parse(url)
        assert len(target.sentinels) == 3 and all(host == "127.0.0.1" for host, _ in target.sentinels)
        status, answer = http("POST", up.url + "/api/jobs", {**kit.JOB, "entrypoint": "echo replicated"})
        assert status == 200, answer
        record = wait_for(
            lambda: (r := http("GET", f"{up.url}/api/jobs/{answer['submission_id']}")[1])["status"] == "SUCCEEDED"
            and r,
            timeout=kit.SETTLE_S,
            what="the job to succeed",
        )
        assert record["driver_exit_code"] == 0
        sentinel = redis.Redis(port=target.sentinels[0][1], password=target.sentinel_password, decode_responses=True)
        assert len(sentinel.sentinel_slaves(MASTER_NAME)) == 2
        assert up.interrupt() == 0
    finally:
        up.kill()
    log = (tmp_path / "up.log").read_text()
    assert "sentinels on" in log and "replica-2" in log, log[-2000:]
    assert (data_dir / "redis" / "master.json").read_text() == '{"master": "redis"}'


def test_up_refuses_replicas_with_a_redis_url_of_its_own(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "POOLQ_REDIS_URL": "redis://127.0.0.1:1/0", "POOLQ_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "poolq", "up", "--replicas", "1", "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--replicas" in done.stderr and "POOLQ_REDIS_URL" in done.stderr, done.stderr


def test_a_restart_after_a_failover_starts_the_last_master_as_master(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "master.json").write_text('{"master": "replica-1"}')  # as stop() left it
    again = ReplicatedRedis(tmp_path / "redis", replicas=1)
    assert list(again.members) == ["replica-1", "redis"]
    assert again.members["redis"].replica_of == again.members["replica-1"].port


def test_a_port_taken_between_choosing_and_binding_is_chosen_again(tmp_path: Path) -> None:
    """free_port() lets the port go before redis-server binds it; another process (a
    parallel test, say) can take it in between. The server, its replicas and its
    sentinels then start on a new port instead of failing."""
    servers = ReplicatedRedis(tmp_path / "redis", replicas=1)
    master, sentinel = servers.members["redis"], servers.sentinels[0]
    planned = master.port, sentinel.port
    with socket.create_server(("127.0.0.1", master.port)), socket.create_server(("127.0.0.1", sentinel.port)):
        servers.start()
    try:
        assert master.port != planned[0] and sentinel.port != planned[1]
        assert "Address already in use" in (master.directory / "redis.log").read_text()
        assert servers.members["replica-1"].replica_of == master.port
        wait_for(lambda: replicas_in_sync(servers), 10, what="the replica to follow the master on its new port")
        assert servers.master() == "redis"  # the sentinels watch it there too
    finally:
        servers.stop()


def test_a_server_whose_port_another_of_its_set_answers_on_starts_on_its_own(tmp_path: Path) -> None:
    """A replica planned on the port the master got answers PING with the set's password:
    only its own process answering counts as started."""
    first = EmbeddedRedis(tmp_path / "a", appendonly=False)
    first.start()
    try:
        second = EmbeddedRedis(tmp_path / "b", password=first.password, appendonly=False)
        second.port = first.port  # planned on a port that is no longer free
        second.start()
        try:
            assert second.port != first.port
            assert second.process is not None and second.process.poll() is None
            answered = redis.Redis(port=second.port, password=first.password).info("server")["process_id"]
            assert answered == second.process.pid
        finally:
            second.stop()
    finally:
        first.stop()
