"""``GET /healthz`` says whether the service can place jobs, naming each component it
depends on; ``GET /livez`` only whether the API and Redis answer (docs/operations.md,
"Health"). The WSGI app runs in-process on the session's real redis-server; the
placement worker is a real one in the test's process (its queue consumer beats, as in
``poolq worker``), the node a real static node.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from api_shim.app import App
from poolq.nodes import NodeAdmin
from poolq.settings import Settings
from tests.kit import GiB, add_node
from tests.procs import wait_for
from tests.wsgi import call


def health(app: App) -> tuple[int, dict[str, Any]]:
    result = call(app, "GET", "/healthz")
    assert result.headers["Content-Type"].startswith("application/json"), result.headers
    return result.status, result.json


def test_without_worker_or_node_healthz_is_503_naming_both_and_livez_is_200(app: App) -> None:
    status, answer = health(app)
    assert status == 503, answer
    assert answer["status"] == "unavailable"
    parts = answer["components"]
    assert parts["redis"] == {"status": "ok"}
    assert parts["placement_workers"]["status"] == "unavailable" and parts["placement_workers"]["live"] == 0
    assert parts["nodes"]["status"] == "unavailable" and parts["nodes"]["live"] == 0
    assert "placement worker" in answer["error"] and "node" in answer["error"]
    assert call(app, "GET", "/livez").json == {"status": "ok"}


def test_a_placement_worker_and_a_node_make_it_200_and_a_drain_or_a_stop_make_it_503(
    app: App, admin: NodeAdmin, start_placement: Callable[..., Any]
) -> None:
    add_node(admin, "health-n1", cpus=2, memory=4 * GiB)
    placement = start_placement(intake=True)
    wait_for(lambda: health(app)[0] == 200, timeout=30, what="/healthz to see the placement worker")
    status, answer = health(app)
    assert answer["status"] == "ok" and "error" not in answer
    assert answer["components"]["placement_workers"] == {"status": "ok", "live": 1}
    assert answer["components"]["nodes"] == {"status": "ok", "live": 1, "schedulable": 1}

    admin.drain("health-n1")
    status, answer = health(app)
    assert status == 503 and answer["components"]["nodes"]["schedulable"] == 0, answer
    assert answer["error"] == "every live node is drained"

    admin.remove("health-n1")
    add_node(admin, "health-n2", cpus=2, memory=4 * GiB)
    assert health(app)[0] == 200
    placement.stop()  # a clean stop: its consumer leaves at once
    status, answer = health(app)
    assert status == 503 and answer["components"]["placement_workers"]["live"] == 0, answer


def test_an_agent_node_whose_heartbeat_expired_does_not_count(admin: NodeAdmin, settings: Settings) -> None:
    """A node whose agent died stays ``live`` until a worker's reaper declares it lost;
    /healthz must not count it meanwhile (the issue's case: a dead node, /healthz ok)."""
    app = App(dataclasses.replace(settings, node_ttl_s=1.0), waker=lambda queue: None)
    admin.upsert("health-agent", pool="p", labels={}, capacity={"CPU": 1000, "memory": GiB}, kind="agent")
    assert health(app)[1]["components"]["nodes"]["live"] == 1  # its registration is a heartbeat
    wait_for(lambda: health(app)[1]["components"]["nodes"]["live"] == 0, timeout=10,
             what="/healthz to stop counting a node whose agent is silent")
    assert admin.describe()[0]["state"] == "live"  # no reaper ran: the record still says live


def test_a_redis_that_does_not_answer_is_503_with_the_redis_component(tmp_path: Path) -> None:
    app = App(Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path / "data"), waker=lambda queue: None)
    status, answer = health(app)
    assert status == 503
    assert answer["components"]["redis"]["status"] == "unavailable"
    assert answer["components"]["placement_workers"] == {"status": "unknown"}
    assert "redis" in answer["error"]
    assert call(app, "GET", "/livez").status == 503
