"""docker-compose.yml cannot run here (no Docker engine): check what can be checked.

Every poolq service runs a real `poolq` command that the CLI's parser accepts, the
API is reachable only as docs/operations.md allows, and Redis keeps what it accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from poolq.commands.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
POOLQ_SERVICES = {name: s for name, s in SERVICES.items() if isinstance(s.get("command"), list) and s["command"][0] == "poolq"}


def test_every_component_is_a_service():
    assert {"redis", "api", "worker", "node", "flower"} <= set(SERVICES)
    assert {"api", "worker", "node"} <= set(POOLQ_SERVICES)


@pytest.mark.parametrize("name", sorted(POOLQ_SERVICES))
def test_poolq_commands_parse(name):
    command = POOLQ_SERVICES[name]["command"]
    args = build_parser().parse_args(command[1:])  # SystemExit (a test error) if refused
    assert callable(args.func)


@pytest.mark.parametrize("name", sorted(POOLQ_SERVICES))
def test_poolq_services_share_the_redis_url(name):
    env = POOLQ_SERVICES[name]["environment"]
    assert env["POOLQ_REDIS_URL"].startswith("redis://:") and "@redis:6379" in env["POOLQ_REDIS_URL"]
    assert "redis" in POOLQ_SERVICES[name]["depends_on"]


def test_api_is_safe_as_published():
    api = SERVICES["api"]
    command = api["command"]
    host = command[command.index("--host") + 1]
    if host not in ("127.0.0.1", "localhost", "::1") and "--insecure-no-auth" in command:
        # Without authentication, the port may only be published on the host's loopback.
        assert api["ports"] and all(str(p).startswith("127.0.0.1:") for p in api["ports"])
    else:
        assert api["environment"].get("POOLQ_AUTH") == "tokens"


def test_flower_runs_on_poolqs_celery_app_and_sees_task_events():
    """Flower runs `celery -A poolq.celery_app flower` (tests/test_celery_tools.py checks that
    app against live workers) in the poolq image with flower added, on the poolq services'
    Redis; the services send task events, and its port (no authentication) is loopback only."""
    flower = SERVICES["flower"]
    assert flower["command"][:4] == ["celery", "-A", "poolq.celery_app", "flower"]
    assert flower["build"]["context"] == "." and flower["build"]["args"]["EXTRA_PACKAGES"].startswith("flower")
    assert "ARG EXTRA_PACKAGES" in (ROOT / "Dockerfile").read_text()
    assert flower["image"] != COMPOSE["x-poolq"]["image"]  # the services' image stays without flower
    assert flower["environment"]["POOLQ_REDIS_URL"] == POOLQ_SERVICES["worker"]["environment"]["POOLQ_REDIS_URL"]
    assert flower["ports"] and all(str(p).startswith("127.0.0.1:") for p in flower["ports"])
    for name in ("api", "worker", "node"):
        assert POOLQ_SERVICES[name]["environment"].get("POOLQ_TASK_EVENTS") == "1", name


def test_redis_persists_and_never_evicts():
    command = SERVICES["redis"]["command"]
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_image_builds_from_this_tree():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for part in ("poolq", "api_shim", "worker", "pyproject.toml"):
        assert f"COPY {part}" in dockerfile
    assert "USER poolq" in dockerfile


# -- the Sentinel variant: docker compose -f docker-compose.yml -f docker-compose.sentinel.yml ------

OVERRIDE = yaml.safe_load((ROOT / "docker-compose.sentinel.yml").read_text())


def merged() -> dict[str, dict]:
    """Compose's merge of the two files, for what these tests read: a service's keys from
    the override replace the base's, its environment is merged name by name."""
    services = {name: dict(s) for name, s in SERVICES.items()}
    for name, override in OVERRIDE["services"].items():
        service = services.setdefault(name, {})
        environment = {**service.get("environment", {}), **override.get("environment", {})}
        service.update(override)
        if environment:
            service["environment"] = environment
    return services


def test_the_sentinel_variant_points_every_poolq_service_at_three_sentinels_that_watch_the_master():
    from poolq.sentinel import parse

    services = merged()
    sentinels = {name: s for name, s in services.items() if name.startswith("sentinel-")}
    assert len(sentinels) == 3
    for name in ("api", "worker", "node", "flower"):
        env = services[name]["environment"]
        target = parse(env["POOLQ_REDIS_URL"].replace("${POOLQ_REDIS_PASSWORD:-change-me}", "change-me"))
        assert {host for host, _ in target.sentinels} == set(sentinels) and {p for _, p in target.sentinels} == {26379}
        assert target.master == "poolq" and target.password == "change-me"
        assert env["POOLQ_REDIS_WAIT_REPLICAS"] == "1", name  # acknowledged jobs survive a failover
        assert set(sentinels) <= set(services[name]["depends_on"])
    script = " ".join(sentinels["sentinel-1"]["command"])
    assert "sentinel monitor poolq redis 6379 2" in script and "auth-pass poolq" in script
    assert script.index("resolve-hostnames yes") < script.index("sentinel monitor")  # names need it first
    replicas = [s["command"] for name, s in services.items() if name.startswith("redis-replica")]
    assert len(replicas) == 2  # after a failover, the new master still has one to wait for
    for replica in replicas:
        assert "--replicaof redis 6379" in replica and "--masterauth" in replica and "--appendonly yes" in replica
    assert "--masterauth" in services["redis"]["command"]  # a demoted master must reach the new one


def test_the_sentinel_variant_keeps_the_api_on_loopback():
    ports = merged()["api"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
