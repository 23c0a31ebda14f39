"""``poolq …``: thin commands that call into the packages.

Service commands (up, api, worker, node) and the admin commands (nodes, quota, token:
poolq/commands/admin.py) talk to Redis: POOLQ_REDIS_URL, else the URL file ``poolq up``
wrote in the data directory (``--data-dir``, else POOLQ_DATA_DIR, else the per-user
default). The client commands (poolq/commands/client.py) talk HTTP.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from typing import Callable, Sequence

from poolq.commands.admin import add_data_dir, is_redis_down, node_capacity, redis_down, settings_of
from poolq.logconfig import configure_logging
from poolq.settings import ConfigError, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolq", description="poolq: a message-queue driven job submission service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole stack on this machine (embedded Redis unless POOLQ_REDIS_URL)")
    _add_bind(up)
    add_data_dir(up)
    up.add_argument("--no-node", action="store_true", help="start no local node agent")
    up.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without authentication")
    up.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="N",
        help="embedded Redis as a master, N replicas and three sentinels, for trying failover (default 0: one Redis)",
    )
    _add_capacity(up)
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", help="serve the HTTP API")
    _add_bind(api)
    add_data_dir(api)
    api.add_argument("--workers", type=int, help="server processes (default POOLQ_API_WORKERS, 2)")
    api.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without authentication")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="run a placement worker (also runs the periodic duties)")
    add_data_dir(worker)
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--quiet", action="store_true", help="no Celery banner, no line per task")
    worker.set_defaults(func=cmd_worker)

    node = commands.add_parser("node", help="run a node agent: register this machine and run the jobs placed on it")
    node.add_argument("--id", default=None, help="node id (default: this host's name)")
    node.add_argument("--pool", default="default")
    node.add_argument("--labels", default="", help="comma-separated key or key=value labels")
    add_data_dir(node)
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
    node.add_argument("--quiet", action="store_true", help="no Celery banner, no line per task")
    node.set_defaults(func=cmd_node)

    from poolq.commands import admin
    from poolq.commands.client import add_commands

    admin.add_commands(commands, _add_capacity)

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
    command = " ".join(["poolq", args.command, *filter(None, [getattr(args, f"{args.command}_command", None)])])
    try:
        return func(args) or 0
    except ConfigError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not is_redis_down(exc):
            raise
        try:
            settings = settings_from(args)
        except ConfigError:
            settings = Settings()
        print(redis_down(command, exc, settings), file=sys.stderr)
        return 1


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of a command: the environment, and its --data-dir, --host and --port."""
    return settings_of(args)


def cmd_up(args: argparse.Namespace) -> int:
    from poolq.commands.up import run_up

    settings = settings_from(args)
    _refuse_open_bind(settings, args)
    node_args = ["--pool", "default"]
    for flag in ("cpus", "memory", "gpus", "resources"):
        if getattr(args, flag):
            node_args += [f"--{flag}", getattr(args, flag)]
    if args.replicas < 0:
        raise ConfigError("--replicas must be 0 or more")
    if args.replicas and settings.redis_url:
        raise ConfigError("--replicas starts an embedded Redis set: it cannot be used with POOLQ_REDIS_URL")
    return run_up(
        settings,
        with_node=not args.no_node,
        node_args=node_args,
        insecure=args.insecure_no_auth,
        replicas=args.replicas,
    )


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

    settings = settings_from(args)
    settings.resolved_redis_url()
    run_placement_worker(settings, loglevel=args.loglevel, quiet=args.quiet)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from worker import devices
    from worker.main import run_node_agent

    settings = args.settings = Settings.from_env(
        data_dir=args.data_dir,
        enforce_resources=False if args.no_enforce else None,
        runtime_limit_s=args.runtime_limit_s,
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
        quiet=args.quiet,
    )


def default_node_id() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (name or "node")[:63]


if __name__ == "__main__":
    sys.exit(main())
