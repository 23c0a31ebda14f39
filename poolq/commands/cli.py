"""``poolq …``: thin commands that call into the packages.

Service commands (up, api, worker, node, nodes) talk to Redis: POOLQ_REDIS_URL,
else the URL file ``poolq up`` wrote in POOLQ_DATA_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from typing import Any, Callable, Sequence

from poolq.logconfig import configure_logging
from poolq.settings import ConfigError, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolq", description="poolq: a message-queue driven job submission service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole stack on this machine (embedded Redis unless POOLQ_REDIS_URL)")
    _add_bind(up)
    up.add_argument("--no-node", action="store_true", help="start no local node agent")
    up.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without authentication")
    _add_capacity(up)
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", help="serve the HTTP API")
    _add_bind(api)
    api.add_argument("--workers", type=int, help="server processes (default POOLQ_API_WORKERS, 2)")
    api.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without authentication")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="run a placement worker (also runs the periodic duties)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    node = commands.add_parser("node", help="run a node agent: register this machine and run the jobs placed on it")
    node.add_argument("--id", default=None, help="node id (default: this host's name)")
    node.add_argument("--pool", default="default")
    node.add_argument("--labels", default="", help="comma-separated key or key=value labels")
    _add_capacity(node)
    node.add_argument(
        "--no-enforce", action="store_true", help="run jobs without cgroup limits (POOLQ_ENFORCE_RESOURCES=0)"
    )
    node.add_argument(
        "--devices",
        action="append",
        default=[],
        metavar="R=ID,…",
        help="device ids, e.g. GPU=0,1 or NPU=0,1,2,3 (default: nvidia-smi's GPUs, else 0..N-1)",
    )
    node.add_argument(
        "--runtime-limit-s", type=float, help="stop jobs that run longer, unless they or their tenant say otherwise"
    )
    node.add_argument("--loglevel", default="INFO")
    node.set_defaults(func=cmd_node)

    nodes = commands.add_parser("nodes", help="manage the node inventory")
    sub = nodes.add_subparsers(dest="nodes_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add a static node (no agent; live until removed)")
    add.add_argument("--id", required=True)
    add.add_argument("--pool", default="default")
    add.add_argument("--labels", default="")
    _add_capacity(add, required=True)
    add.set_defaults(func=cmd_nodes_add)
    for name, func, text in (
        ("remove", cmd_nodes_remove, "remove a node; its jobs fail as NODE_LOST"),
        ("drain", cmd_nodes_drain, "stop placing jobs on a node; its running jobs finish"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("node_id")
        action.set_defaults(func=func)
    listing = sub.add_parser("list", help="list nodes with capacity, reserved and free amounts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_nodes_list)
    check = sub.add_parser("check", help="verify the reservation invariant; exit 1 if it does not hold")
    check.set_defaults(func=cmd_nodes_check)

    token = commands.add_parser("token", help="API tokens (POOLQ_AUTH=tokens)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token for a tenant; prints it, alone, once")
    create.add_argument("tenant")
    create.set_defaults(func=cmd_token_create)
    revoke = token_sub.add_parser("revoke", help="revoke a token (give the token or its id)")
    revoke.add_argument("token")
    revoke.set_defaults(func=cmd_token_revoke)
    token_sub.add_parser("list", help="tenants and token ids (never the tokens)").set_defaults(func=cmd_token_list)

    quota = commands.add_parser("quota", help="per-tenant limits (effective at once)")
    quota_sub = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    quota_set = quota_sub.add_parser("set", help="set limits; those not given are left as they are")
    quota_set.add_argument("tenant")
    quota_set.add_argument("--cpus", help="CPUs the tenant's running jobs may hold")
    quota_set.add_argument("--memory", help="memory they may hold (bytes, or Ki/Mi/Gi/Ti)")
    quota_set.add_argument("--gpus")
    quota_set.add_argument("--resources", help="custom resources, NAME=amount,...")
    quota_set.add_argument("--max-pending", type=int, help="PENDING jobs; submissions beyond are refused with 429")
    quota_set.add_argument("--rate", type=float, help="API requests per second (429 with Retry-After above)")
    quota_set.add_argument("--burst", type=int, help="requests allowed at once above the rate (default: the rate)")
    quota_set.add_argument(
        "--runtime-limit-s", type=float, help="stop the tenant's jobs that run longer, unless they name their own limit"
    )
    quota_set.add_argument(
        "--schedule-timeout-ms",
        type=int,
        help="how long the tenant's jobs may wait for placement when sent without X-Schedule-Timeout-Ms (0: forever)",
    )
    quota_set.add_argument("--priority", type=int, help="the priority of the tenant's jobs that name none (default 0)")
    quota_set.add_argument("--max-priority", type=int, help="the highest priority its jobs may ask for (above: 400)")
    quota_set.add_argument("--weight", type=float, help="its share of the pool against other tenants' (default 1)")
    quota_set.set_defaults(func=cmd_quota_set)
    for name, func, text in (
        ("show", cmd_quota_show, "show a tenant's limits"),
        ("clear", cmd_quota_clear, "remove a tenant's limits"),
    ):
        action = quota_sub.add_parser(name, help=text)
        action.add_argument("tenant")
        action.set_defaults(func=func)

    from poolq.commands.client import add_commands

    add_commands(commands)
    return parser


def _add_bind(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")


def _add_capacity(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--cpus", required=required, help="CPUs (default: this machine's count)")
    parser.add_argument(
        "--memory", required=required, help="bytes, or with Ki/Mi/Gi/Ti (default: this machine's memory)"
    )
    parser.add_argument("--gpus", default=None, help="GPUs (default: as many as nvidia-smi lists, else 0)")
    parser.add_argument("--resources", default="", help="custom resources, NAME=amount,...")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except ConfigError as exc:
        print(f"poolq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(host=getattr(args, "host", None), port=getattr(args, "port", None))


def cmd_up(args: argparse.Namespace) -> int:
    from poolq.commands.up import run_up

    settings = settings_from(args)
    _refuse_open_bind(settings, args)
    node_args = ["--pool", "default"]
    for flag in ("cpus", "memory", "gpus", "resources"):
        if getattr(args, flag):
            node_args += [f"--{flag}", getattr(args, flag)]
    return run_up(settings, with_node=not args.no_node, node_args=node_args, insecure=args.insecure_no_auth)


def cmd_api(args: argparse.Namespace) -> int:
    from api_shim.server import serve

    settings = settings_from(args)
    _refuse_open_bind(settings, args)
    if args.insecure_no_auth and settings.auth_mode == "tokens" and not settings.auth:
        settings = dataclasses.replace(settings, auth="none")  # the flag means: serve without tokens
    settings.resolved_redis_url()  # fail now, clearly, rather than in every request
    serve(settings, workers=args.workers)
    return 0


def _refuse_open_bind(settings: Settings, args: argparse.Namespace) -> None:
    """Jobs run shell commands: no open bind without tokens unless explicitly insecure (docs/operations.md)."""
    if not settings.loopback and settings.auth_mode == "none" and not args.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve jobs (which run shell commands) on {settings.host} without authentication; "
            "use POOLQ_AUTH=tokens (and poolq token create TENANT), bind 127.0.0.1, "
            "or pass --insecure-no-auth behind a trusted network"
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_placement_worker

    settings = Settings.from_env()
    settings.resolved_redis_url()
    run_placement_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from worker import devices
    from worker.main import run_node_agent

    settings = Settings.from_env(
        enforce_resources=False if args.no_enforce else None, runtime_limit_s=args.runtime_limit_s
    )
    settings.validate_node()
    settings.resolved_redis_url()
    gpus = devices.discover_gpus()
    if args.gpus is None and gpus:
        args.gpus = str(len(gpus))
    capacity = node_capacity(args)
    try:
        ids = devices.resolve(capacity, devices.parse_devices(args.devices), gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return run_node_agent(
        settings,
        node_id=args.id or default_node_id(),
        pool=args.pool,
        labels=args.labels,
        capacity=capacity,
        devices=ids,
        loglevel=args.loglevel,
    )


def default_node_id() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (name or "node")[:63]


def node_capacity(args: argparse.Namespace) -> dict[str, int]:
    from poolq.nodes import capacity_of, parse_resources, parse_size

    cpus = args.cpus if args.cpus is not None else str(os.cpu_count() or 1)
    memory = parse_size(args.memory) if args.memory is not None else _machine_memory()
    try:
        return capacity_of(cpus, memory, args.gpus or "0", parse_resources(args.resources))
    except (ValueError, ArithmeticError) as exc:
        raise ConfigError(str(exc)) from None


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _admin() -> Any:
    from poolq.messaging import celery_waker
    from poolq.nodes import NodeAdmin
    from poolq.redis_io import connect
    from poolq.store import JobStore

    settings = Settings.from_env()
    return NodeAdmin(JobStore(connect(settings), settings, celery_waker(settings)))


def cmd_nodes_add(args: argparse.Namespace) -> int:
    from poolq.errors import PoolqError
    from poolq.nodes import parse_labels

    try:
        labels = parse_labels(args.labels)
        capacity = node_capacity(args)
        _admin().upsert(args.id, pool=args.pool, labels=labels, capacity=capacity, kind="static")
    except (ValueError, PoolqError) as exc:
        print(f"poolq nodes add: {exc}", file=sys.stderr)
        return 1
    print(f"added node {args.id} to pool {args.pool}")
    return 0


def cmd_nodes_remove(args: argparse.Namespace) -> int:
    return _node_action(lambda admin: admin.remove(args.node_id), f"removed node {args.node_id}")


def cmd_nodes_drain(args: argparse.Namespace) -> int:
    return _node_action(lambda admin: admin.drain(args.node_id), f"draining node {args.node_id}")


def _node_action(action: Callable[[Any], Any], done: str) -> int:
    from poolq.errors import PoolqError

    try:
        result = action(_admin())
    except PoolqError as exc:
        print(f"poolq nodes: {exc}", file=sys.stderr)
        return 1
    print(done + (f"; failed {len(result)} jobs as NODE_LOST" if result else ""))
    return 0


def cmd_nodes_list(args: argparse.Namespace) -> int:
    nodes = _admin().describe()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    print(f"{'NODE':<20} {'POOL':<12} {'STATE':<8} {'CPU free/cap':>14} {'MEMORY free/cap':>24} LABELS")
    for node in nodes:
        state = "draining" if node["draining"] else node["state"]
        cpu = f"{node['free'].get('CPU', 0)}/{node['capacity'].get('CPU', 0)}"
        mem = f"{node['free'].get('memory', 0)}/{node['capacity'].get('memory', 0)}"
        labels = ",".join(k if v is None else f"{k}={v}" for k, v in node["labels"].items())
        print(f"{node['node_id']:<20} {node['pool']:<12} {state:<8} {cpu:>14} {mem:>24} {labels}")
    return 0


def cmd_nodes_check(args: argparse.Namespace) -> int:
    problems = _admin().check()
    for problem in problems:
        print(problem)
    print("invariant holds" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


def cmd_quota_set(args: argparse.Namespace) -> int:
    from decimal import Decimal, InvalidOperation

    from poolq.nodes import parse_resources, parse_size
    from poolq.quotas import set_quota

    try:
        quota = set_quota(
            _redis(),
            args.tenant,
            cpus=Decimal(args.cpus) if args.cpus else None,
            memory=parse_size(args.memory) if args.memory else None,
            gpus=Decimal(args.gpus) if args.gpus else None,
            resources=parse_resources(args.resources) if args.resources else None,
            max_pending=args.max_pending,
            rate=args.rate,
            burst=args.burst,
            runtime_limit_s=args.runtime_limit_s,
            schedule_timeout_ms=args.schedule_timeout_ms,
            default_priority=args.priority,
            max_priority=args.max_priority,
            weight=args.weight,
        )
    except (ValueError, InvalidOperation) as exc:
        print(f"poolq quota set: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(quota, sort_keys=True))
    return 0


def cmd_quota_show(args: argparse.Namespace) -> int:
    from poolq.quotas import get_quota

    print(json.dumps(get_quota(_redis(), args.tenant), sort_keys=True))
    return 0


def cmd_quota_clear(args: argparse.Namespace) -> int:
    from poolq.quotas import clear_quota

    clear_quota(_redis(), args.tenant)
    print("cleared")
    return 0


def _redis() -> Any:
    from poolq.redis_io import connect

    return connect(Settings.from_env())


def cmd_token_create(args: argparse.Namespace) -> int:
    from poolq import tokens

    try:
        print(tokens.create(_redis(), args.tenant))
    except ValueError as exc:
        print(f"poolq token create: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from poolq import tokens

    if not tokens.revoke(_redis(), args.token):
        print("poolq token revoke: no such token", file=sys.stderr)
        return 1
    print("revoked")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from poolq import tokens

    for item in tokens.listing(_redis()):
        print(f"{item['token_id']}  {item['tenant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
