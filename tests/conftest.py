"""Fixtures: a real redis-server started for the session (one per xdist worker: each is a
session of its own), the WSGI app in-process, placement in-process (``placement``,
``start_placement``) and ``poolq`` subprocesses (``start_proc``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from api_shim.app import App
from poolq.embedded import EmbeddedRedis
from poolq.messaging import celery_waker
from poolq.nodes import NodeAdmin
from poolq.redis_io import connect
from poolq.schemas import SEED_EXAMPLE
from poolq.settings import Settings
from poolq.store import JobStore
from tests.kit import Placement
from tests.procs import Proc

SEED_BODY = copy.deepcopy(SEED_EXAMPLE)  # the seed's example request
FAULTS = Path(__file__).resolve().parent / "faults"
PROCESS_FIXTURES = {"start_proc", "placement_worker", "run_py"}  # each starts poolq subprocesses


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The markers no module has to remember (pyproject.toml lists them all): ``faults``
    on everything in tests/faults/, ``processes`` on every test that takes a fixture
    starting poolq subprocesses. Modules mark the rest themselves."""
    for item in items:
        if FAULTS in item.path.parents:
            item.add_marker(pytest.mark.faults)
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name every test that did not run, and why (``make test`` must say so)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "nodeid", "")]
    if skipped:
        terminalreporter.section(f"{len(skipped)} tests did not run")
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.line(f"{report.nodeid}: {reason}")


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
def service_env(redis_server: EmbeddedRedis, tmp_path: Path, redis_client: redis.Redis) -> dict[str, str]:
    """Environment for poolq subprocesses: this test's Redis (emptied of poolq's keys,
    as ``redis_client`` leaves it) and data dir, fast duties."""
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
    """A ``poolq worker`` subprocess, for the tests about that process (kill -9, restarts,
    its logs, its Celery consumer); the others take ``placement``."""
    return start_proc(["worker"], name="worker")


@pytest.fixture
def start_placement(service_env: dict[str, str]) -> Iterator[Callable[..., Placement]]:
    """Start placement in the test's process (tests/kit.py, ``Placement``) with the settings
    ``poolq worker`` would read from ``service_env`` and ``env``; stopped and joined after
    the test, which fails if placement raised."""
    started: list[Placement] = []

    def start(env: dict[str, str] | None = None, *, intake: bool = False) -> Placement:
        placement = Placement(Settings.from_env({**service_env, **(env or {})}), intake=intake).start()
        started.append(placement)
        return placement

    yield start
    for placement in reversed(started):
        placement.stop()


@pytest.fixture
def placement(start_placement: Callable[..., Placement]) -> Placement:
    """Placement in the test's process with the default test settings (fast duties)."""
    return start_placement()


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore(connect(settings), settings, celery_waker(settings))


@pytest.fixture
def admin(store: JobStore) -> NodeAdmin:
    return NodeAdmin(store)
