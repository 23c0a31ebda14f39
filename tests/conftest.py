"""Fixtures: a real redis-server started for the session, the WSGI app in-process."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from api_shim.app import App
from poolq.embedded import EmbeddedRedis
from poolq.redis_io import connect
from poolq.schemas import SEED_EXAMPLE
from poolq.settings import Settings
from poolq.store import JobStore
from tests.procs import Proc
from worker.celery_app import celery_waker
from worker.inventory import NodeAdmin

SEED_BODY = copy.deepcopy(SEED_EXAMPLE)  # the seed's example request


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    _delete_poolq_keys(client)
    yield client
    client.close()


def _delete_poolq_keys(client: redis.Redis) -> None:
    # Only poolq's keys: kombu's queue bindings must survive between tests.
    batch = list(client.scan_iter("poolq:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return Settings(redis_url=redis_server.url, data_dir=tmp_path / "data")


@pytest.fixture
def app(settings: Settings) -> App:
    return App(settings)


@pytest.fixture
def service_env(redis_server: EmbeddedRedis, tmp_path: Path) -> dict[str, str]:
    """Environment for poolq subprocesses: this test's Redis and data dir, fast duties."""
    return {
        "POOLQ_REDIS_URL": redis_server.url,
        "POOLQ_DATA_DIR": str(tmp_path / "data"),
        "POOLQ_DUTY_INTERVAL_S": "0.1",
    }


@pytest.fixture
def start_proc(tmp_path: Path, service_env: dict[str, str]) -> Iterator[Any]:
    """Start ``python -m poolq <args>``; everything started is stopped after the test."""
    started: list[Proc] = []

    def start(args: list[str], env: dict[str, str] | None = None, name: str | None = None) -> Proc:
        log_name = name or f"{args[0]}-{len(started)}"
        proc = Proc(args, {**service_env, **(env or {})}, tmp_path / f"{log_name}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def placement_worker(start_proc: Any) -> Any:
    return start_proc(["worker"], name="worker")


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore(connect(settings), settings, celery_waker(settings))


@pytest.fixture
def admin(store: JobStore) -> NodeAdmin:
    return NodeAdmin(store)
