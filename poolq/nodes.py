"""Reading the node inventory, and the units people write capacity in.

Shared by the API (``/api/nodes``, ``/api/pools``), the CLI and the workers; the
changes to nodes live in ``worker.inventory.NodeAdmin``.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

import redis

from poolq import keys
from poolq.model import CPU, GPU, MEMORY, to_milli
from poolq.redis_io import redis_errors
from poolq.schemas import LABEL_PART, RESERVED_RESOURCE_NAMES, RESOURCE_NAME

SIZE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?i?B?\s*$")
UNITS = {
    None: 1,
    "K": 1024,
    "Ki": 1024,
    "M": 1024**2,
    "Mi": 1024**2,
    "G": 1024**3,
    "Gi": 1024**3,
    "T": 1024**4,
    "Ti": 1024**4,
}


def parse_size(text: str) -> int:
    """Bytes from ``536870912``, ``512Mi``, ``4Gi`` (binary units)."""
    found = SIZE.fullmatch(str(text))
    if not found:
        raise ValueError(f"{text!r} is not a size: use bytes or a Ki/Mi/Gi/Ti suffix")
    return int(found.group(1)) * UNITS[found.group(2)]


def parse_labels(text: str | None) -> dict[str, str | None]:
    """``"a,b=c"`` -> ``{"a": None, "b": "c"}``."""
    labels: dict[str, str | None] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not LABEL_PART.fullmatch(key) or (eq and not LABEL_PART.fullmatch(value)):
            raise ValueError(f"label {item!r} must be key or key=value with [A-Za-z0-9._/-]{{1,63}} parts")
        labels[key] = value if eq else None
    return labels


def parse_resources(text: str | None) -> dict[str, Decimal]:
    """``"NPU=8,FPGA=2"`` -> amounts by name."""
    resources: dict[str, Decimal] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, amount = item.partition("=")
        if not RESOURCE_NAME.fullmatch(name) or name.lower() in RESERVED_RESOURCE_NAMES:
            raise ValueError(f"resource name {name!r} must match [A-Za-z0-9._/-]{{1,63}} and not be CPU, memory or GPU")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise ValueError(f"resource {item!r} must be NAME=amount") from None
        if not value.is_finite() or value < 0:
            raise ValueError(f"resource {item!r} must have a non-negative amount")
        resources[name] = value
    return resources


def capacity_of(
    cpus: Decimal | int | str, memory: int, gpus: Decimal | int | str = 0, resources: dict[str, Decimal] | None = None
) -> dict[str, int]:
    """Integer capacity (milli-units, bytes) from human amounts."""
    capacity = {CPU: to_milli(Decimal(str(cpus))), MEMORY: int(memory), GPU: to_milli(Decimal(str(gpus)))}
    for name, amount in (resources or {}).items():
        capacity[name] = to_milli(amount)
    return capacity


def node_amounts(fields: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """A node hash's capacity and reserved amounts (fields ``cap:<R>``, ``res:<R>``)."""
    capacity = {f[4:]: int(v) for f, v in fields.items() if f.startswith("cap:")}
    reserved = {f[4:]: int(v) for f, v in fields.items() if f.startswith("res:")}
    return capacity, reserved


@redis_errors("the node read")
def load_nodes(client: redis.Redis, node_ids: Iterable[str] | None = None) -> list[dict[str, str]]:
    """Node hashes (all nodes when ``node_ids`` is None), in one pipelined round trip."""
    ids = sorted(client.smembers(keys.NODES)) if node_ids is None else list(node_ids)
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(keys.node(node_id))
    return [fields for fields in pipe.execute() if fields]


@redis_errors("the node read")
def describe_nodes(client: redis.Redis) -> list[dict[str, Any]]:
    """Nodes as the API and CLI show them: capacity, reserved, free, labels, liveness."""
    heartbeats = dict(client.zrange(keys.HEARTBEATS, 0, -1, withscores=True))
    out = []
    for fields in load_nodes(client):
        capacity, reserved = node_amounts(fields)
        hb = heartbeats.get(fields["id"])
        out.append(
            {
                "node_id": fields["id"],
                "pool": fields.get("pool", ""),
                "labels": json.loads(fields.get("labels") or "{}"),
                "kind": fields.get("kind"),
                "state": fields.get("state"),
                "alive": fields.get("state") == "live",
                "draining": fields.get("drained", "0") != "0",
                "last_heartbeat": int(hb) if hb is not None else None,
                # How the node's agent limits its jobs: {"mode": "v1"|"v2"|"none", "reason": …}
                "enforcement": json.loads(fields.get("facts") or "{}").get("enforcement"),
                "capacity": show_amounts(capacity),
                "reserved": show_amounts(reserved),
                "free": show_amounts({r: capacity[r] - reserved.get(r, 0) for r in capacity}),
            }
        )
    return out


def show_amounts(amounts: dict[str, int]) -> dict[str, int | float]:
    """Integer amounts in the units people use: CPUs, bytes, GPUs, resource units."""
    shown: dict[str, int | float] = {}
    for name, amount in sorted(amounts.items()):
        if name == MEMORY:
            shown[name] = amount
        else:
            value = Decimal(amount) / 1000
            shown[name] = int(value) if value == value.to_integral_value() else float(value)
    return shown
