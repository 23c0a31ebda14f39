"""The operator's commands: ``poolq nodes|quota|token …`` (docs/operations.md).

Each talks to Redis (POOLQ_REDIS_URL, else the URL file of the data directory:
``--data-dir``, else POOLQ_DATA_DIR, else the per-user default), takes ``--json``
(machine-readable output on stdout), and answers a Redis that does not answer with
one line on stderr and a non-zero exit (``redis_down``), never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from decimal import Decimal
from typing import Any, Callable

from poolq.settings import ConfigError, Settings

LIMITS = (  # poolq:limits:<tenant>
    "max_pending",
    "rate",
    "burst",
    "runtime_limit_ms",
    "schedule_timeout_ms",
    "default_priority",
    "max_priority",
    "weight",
    "preempt",
)


def add_commands(commands: Any, capacity: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_data_dir(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")

    nodes = commands.add_parser("nodes", help="manage the node inventory")
    sub = nodes.add_subparsers(dest="nodes_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", parents=[common], help="add a static node (no agent; live until removed)")
    add.add_argument("--id", required=True)
    add.add_argument("--pool", default="default")
    add.add_argument("--labels", default="")
    capacity(add, True)
    add.set_defaults(func=cmd_nodes_add)
    for name, func, text in (
        ("remove", cmd_nodes_remove, "remove a node; its jobs fail as NODE_LOST"),
        ("drain", cmd_nodes_drain, "stop placing jobs on a node; its running jobs finish"),
    ):
        action = sub.add_parser(name, parents=[common], help=text)
        action.add_argument("node_id")
        action.set_defaults(func=func)
    sub.add_parser("list", parents=[common], help="list nodes with capacity, reserved and free amounts").set_defaults(
        func=cmd_nodes_list
    )
    sub.add_parser(
        "check", parents=[common], help="verify the reservation invariant; exit 1 if it does not hold"
    ).set_defaults(func=cmd_nodes_check)

    token = commands.add_parser("token", help="API tokens (POOLQ_AUTH=tokens)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", parents=[common], help="create a token for a tenant; prints it, once")
    create.add_argument("tenant")
    create.set_defaults(func=cmd_token_create)
    revoke = token_sub.add_parser("revoke", parents=[common], help="revoke a token (give the token or its id)")
    revoke.add_argument("token")
    revoke.set_defaults(func=cmd_token_revoke)
    token_sub.add_parser("list", parents=[common], help="tenants and token ids (never the tokens)").set_defaults(
        func=cmd_token_list
    )

    quota = commands.add_parser("quota", help="per-tenant limits (effective at once)")
    quota_sub = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    quota_set = quota_sub.add_parser("set", parents=[common], help="set limits; those not given are left as they are")
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
    quota_set.add_argument(
        "--preempt",
        choices=["on", "off"],
        help="on: its waiting jobs may stop running jobs of lower priority to make room (default off)",
    )
    quota_set.set_defaults(func=cmd_quota_set)
    for name, func, text in (
        ("show", cmd_quota_show, "show a tenant's limits"),
        ("clear", cmd_quota_clear, "remove a tenant's limits"),
    ):
        action = quota_sub.add_parser(name, parents=[common], help=text)
        action.add_argument("tenant")
        action.set_defaults(func=func)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the stack's data directory (default POOLQ_DATA_DIR, else $XDG_STATE_HOME/poolq or ~/.local/state/poolq)",
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """The command's settings, read once and kept on ``args`` (``redis_down`` names their Redis)."""
    if getattr(args, "settings", None) is None:
        args.settings = Settings.from_env(
            data_dir=getattr(args, "data_dir", None), host=getattr(args, "host", None), port=getattr(args, "port", None)
        )
    settings: Settings = args.settings
    return settings


def is_redis_down(exc: BaseException) -> bool:
    import redis

    from poolq.errors import Unavailable

    return isinstance(exc, (redis.RedisError, Unavailable))


def redis_down(command: str, exc: BaseException, settings: Settings) -> str:
    """One line: what failed, at which Redis (no password), and what to do."""
    import redis

    from poolq.commands.up import stack_lock_holder

    reason = " ".join(str(exc).split()) or type(exc).__name__
    refused = isinstance(exc, redis.ResponseError) or reason.startswith("redis refused")
    reason = reason.removeprefix("redis unavailable: ")
    where = settings.redis_address()
    if settings.redis_url:
        hint = "check that this Redis runs and POOLQ_REDIS_URL names it"
    elif holder := stack_lock_holder(settings):
        hint = f"the poolq up of {settings.data_dir} (pid {holder.get('pid', '?')}) runs but its Redis does not answer"
    else:
        hint = (
            f"no poolq up is running on the data directory {settings.data_dir}: start it with `poolq up`, "
            "or name the running stack's with --data-dir or POOLQ_DATA_DIR"
        )
    return f"{command}: Redis at {where} {'refused it' if refused else 'does not answer'} ({reason}); {hint}"


def _redis(args: argparse.Namespace) -> Any:
    from poolq.redis_io import connect

    return connect(settings_of(args))


def _admin(args: argparse.Namespace) -> Any:
    from poolq.messaging import celery_waker
    from poolq.nodes import NodeAdmin
    from poolq.redis_io import connect
    from poolq.store import JobStore

    settings = settings_of(args)
    return NodeAdmin(JobStore(connect(settings), settings, celery_waker(settings)))


def _out(args: argparse.Namespace, text: str, data: object) -> int:
    print(json.dumps(data, sort_keys=True) if args.json else text)
    return 0


def _fail(command: str, exc: BaseException | str) -> int:
    print(f"poolq {command}: {exc}", file=sys.stderr)
    return 1


# -- nodes -------------------------------------------------------------------------


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


def cmd_nodes_add(args: argparse.Namespace) -> int:
    from poolq.errors import PoolqError, Unavailable
    from poolq.nodes import parse_labels

    try:
        labels = parse_labels(args.labels)
        capacity = node_capacity(args)
        _admin(args).upsert(args.id, pool=args.pool, labels=labels, capacity=capacity, kind="static")
    except (ValueError, PoolqError) as exc:
        if isinstance(exc, Unavailable):
            raise
        return _fail("nodes add", exc)
    return _out(
        args, f"added node {args.id} to pool {args.pool}", {"node_id": args.id, "pool": args.pool, "added": True}
    )


def cmd_nodes_remove(args: argparse.Namespace) -> int:
    from poolq.errors import PoolqError, Unavailable

    try:
        failed = _admin(args).remove(args.node_id)
    except PoolqError as exc:
        if isinstance(exc, Unavailable):
            raise
        return _fail("nodes remove", exc)
    text = f"removed node {args.node_id}" + (f"; failed {len(failed)} jobs as NODE_LOST" if failed else "")
    return _out(args, text, {"node_id": args.node_id, "removed": True, "failed_jobs": sorted(failed)})


def cmd_nodes_drain(args: argparse.Namespace) -> int:
    from poolq.errors import PoolqError, Unavailable

    try:
        _admin(args).drain(args.node_id)
    except PoolqError as exc:
        if isinstance(exc, Unavailable):
            raise
        return _fail("nodes drain", exc)
    return _out(args, f"draining node {args.node_id}", {"node_id": args.node_id, "draining": True})


def cmd_nodes_list(args: argparse.Namespace) -> int:
    nodes = _admin(args).describe()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    print(
        f"{'NODE':<20} {'POOL':<12} {'STATE':<8} {'CPU free/cap':>14} {'MEMORY free/cap':>18} {'GPU free/cap':>13} LABELS"
    )
    for node in nodes:
        state = "draining" if node["draining"] else node["state"]
        free, cap = node["free"], node["capacity"]
        cpu = f"{free.get('CPU', 0)}/{cap.get('CPU', 0)}"
        mem = f"{format_size(free.get('memory', 0))}/{format_size(cap.get('memory', 0))}"
        gpu = f"{free.get('GPU', 0)}/{cap.get('GPU', 0)}"
        labels = ",".join(k if v is None else f"{k}={v}" for k, v in node["labels"].items())
        print(f"{node['node_id']:<20} {node['pool']:<12} {state:<8} {cpu:>14} {mem:>18} {gpu:>13} {labels}")
    return 0


def cmd_nodes_check(args: argparse.Namespace) -> int:
    problems = _admin(args).check()
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        for problem in problems:
            print(problem)
        print("invariant holds" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


def format_size(amount: int | float) -> str:
    from poolq.nodes import format_size as size

    return size(amount)


# -- quotas ------------------------------------------------------------------------


def cmd_quota_set(args: argparse.Namespace) -> int:
    from decimal import InvalidOperation

    from poolq.nodes import parse_resources, parse_size
    from poolq.quotas import set_quota

    try:
        quota = set_quota(
            _redis(args),
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
            preempt=None if args.preempt is None else args.preempt == "on",
        )
    except (ValueError, InvalidOperation) as exc:
        return _fail("quota set", exc)
    return _show_quota(args, quota)


def cmd_quota_show(args: argparse.Namespace) -> int:
    from poolq.quotas import get_quota

    return _show_quota(args, get_quota(_redis(args), args.tenant))


def cmd_quota_clear(args: argparse.Namespace) -> int:
    from poolq.quotas import clear_quota

    clear_quota(_redis(args), args.tenant)
    return _out(args, f"cleared the limits of {args.tenant}", {"tenant": args.tenant, "cleared": True})


def quota_view(tenant: str, stored: dict[str, str]) -> dict[str, Any]:
    """A tenant's stored quota in the units of ``quota set``'s flags: CPUs, bytes, seconds."""
    from poolq.nodes import show_amounts

    resources = show_amounts({name: int(value) for name, value in stored.items() if name not in LIMITS})
    limits: dict[str, int | float] = {}
    for name in LIMITS:
        if name in stored:
            value = float(stored[name])
            if name == "runtime_limit_ms":
                name, value = "runtime_limit_s", value / 1000
            limits[name] = int(value) if value == int(value) and name not in ("rate", "weight") else value
    return {"tenant": tenant, "resources": resources, "limits": limits}


def _show_quota(args: argparse.Namespace, stored: dict[str, str]) -> int:
    view = quota_view(args.tenant, stored)
    rows = [(name, format_size(v) if name == "memory" else str(v)) for name, v in view["resources"].items()]
    rows += [(name, str(v)) for name, v in view["limits"].items()]
    lines = [f"{args.tenant}: no limits"] if not rows else [args.tenant] + [f"  {n:<22} {v}" for n, v in rows]
    return _out(args, "\n".join(lines), view)


# -- tokens ------------------------------------------------------------------------


def cmd_token_create(args: argparse.Namespace) -> int:
    from poolq import tokens

    try:
        token = tokens.create(_redis(args), args.tenant)
    except ValueError as exc:
        return _fail("token create", exc)
    return _out(args, token, {"token": token, "token_id": token.split("_")[1], "tenant": args.tenant})


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from poolq import tokens

    if not tokens.revoke(_redis(args), args.token):
        return _fail("token revoke", "no such token")
    return _out(args, "revoked", {"revoked": True})


def cmd_token_list(args: argparse.Namespace) -> int:
    from poolq import tokens

    items = tokens.listing(_redis(args))
    if args.json:
        print(json.dumps(items))
        return 0
    for item in items:
        created = datetime.datetime.fromtimestamp(int(item["created"] or 0), datetime.timezone.utc)
        print(f"{item['token_id']}  {item['tenant']}  created {created:%Y-%m-%d %H:%M}Z")
    return 0
