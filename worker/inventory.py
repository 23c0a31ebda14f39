"""Nodes and reservations in Redis: add, register, drain, remove, declare lost, list, check.

Used by the CLI (``poolq nodes …``), the node agent, the reaper duty and the API's
``/api/nodes`` and ``/api/pools``. Each change is one Lua script that also appends
the node id to ``poolq:inventory:log``, which placement workers follow.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

import redis

from poolq import keys, queues
from poolq.errors import Conflict, InvalidRequest, NotFound
from poolq.model import CPU, GPU, MEMORY, ErrorType, JobFields, JobStatus, to_milli
from poolq.redis_io import Scripts
from poolq.schemas import LABEL_PART, RESERVED_RESOURCE_NAMES, RESOURCE_NAME
from poolq.store import WAKE_TTL_MS, JobStore
from worker.placement import Node

SIZE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?i?B?\s*$")
UNITS = {None: 1, "K": 1024, "Ki": 1024, "M": 1024**2, "Mi": 1024**2, "G": 1024**3, "Gi": 1024**3, "T": 1024**4, "Ti": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``536870912``, ``512Mi``, ``4Gi`` (binary units)."""
    found = SIZE.match(str(text))
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
        if not LABEL_PART.match(key) or (eq and not LABEL_PART.match(value)):
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
        if not RESOURCE_NAME.match(name) or name.lower() in RESERVED_RESOURCE_NAMES:
            raise ValueError(f"resource name {name!r} must match [A-Za-z0-9._/-]{{1,63}} and not be CPU, memory or GPU")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise ValueError(f"resource {item!r} must be NAME=amount") from None
        if not value.is_finite() or value < 0:
            raise ValueError(f"resource {item!r} must have a non-negative amount")
        resources[name] = value
    return resources


def capacity_of(cpus: Decimal | int | str, memory: int, gpus: Decimal | int | str = 0, resources: dict[str, Decimal] | None = None) -> dict[str, int]:
    """Integer capacity (milli-units, bytes) from human amounts."""
    capacity = {CPU: to_milli(Decimal(str(cpus))), MEMORY: int(memory), GPU: to_milli(Decimal(str(gpus)))}
    for name, amount in (resources or {}).items():
        capacity[name] = to_milli(amount)
    return capacity


def node_from_hash(fields: dict[str, str]) -> Node:
    capacity = {f[4:]: int(v) for f, v in fields.items() if f.startswith("cap:")}
    reserved = {f[4:]: int(v) for f, v in fields.items() if f.startswith("res:")}
    labels = json.loads(fields.get("labels") or "{}")
    return Node(
        id=fields["id"],
        pool=fields.get("pool", ""),
        labels=labels,
        capacity=capacity,
        reserved=reserved,
        schedulable=fields.get("state") == "live" and fields.get("drained") != "1",
    )


class NodeAdmin:
    def __init__(self, store: JobStore):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.scripts: Scripts = store.scripts
        self.settings = store.settings

    def upsert(
        self,
        node_id: str,
        *,
        pool: str,
        labels: dict[str, str | None],
        capacity: dict[str, int],
        kind: str = "static",
        create: bool = True,
    ) -> int:
        """Add a static node (``create``: refuse an existing id) or register an agent's node.

        Returns the registration's incarnation number.
        """
        if not LABEL_PART.match(node_id) or not LABEL_PART.match(pool):
            raise InvalidRequest({"id" if not LABEL_PART.match(node_id) else "pool": ["must match [A-Za-z0-9._/-]{1,63}"]}, "invalid node")
        all_labels = {**labels, "pool": pool}
        pairs = [item for name, amount in sorted(capacity.items()) for item in (name, amount)]
        code, wake, incarnation = self.scripts.node_upsert(
            keys=[keys.node(node_id), keys.NODES, keys.INVENTORY_LOG, keys.KICK, keys.wake(queues.PLACEMENT), keys.HEARTBEATS],
            args=[node_id, pool, json.dumps(all_labels, sort_keys=True), kind, "create" if create else "register",
                  WAKE_TTL_MS, queues.node_queue(node_id) if kind == "agent" else "", *pairs],
        )
        if code == 0:
            raise Conflict(f"node {node_id} already exists")
        if wake:
            self.store.wake(queues.PLACEMENT)
        return int(incarnation)

    def drain(self, node_id: str) -> None:
        if not self._set_state(node_id, "drain"):
            raise NotFound(f"no node {node_id}")

    def remove(self, node_id: str) -> list[str]:
        """Take the node out of service, fail its jobs as NODE_LOST, delete it. Returns the failed refs."""
        if not self._set_state(node_id, "removed"):
            raise NotFound(f"no node {node_id}")
        failed = self.fail_jobs(node_id, f"node {node_id} was removed")
        for _ in range(10):
            deleted = self.scripts.node_delete(
                keys=[keys.node(node_id), keys.node_jobs(node_id), keys.node_inbox(node_id), keys.NODES, keys.HEARTBEATS, keys.INVENTORY_LOG],
                args=[node_id],
            )
            if deleted:
                break
            failed += self.fail_jobs(node_id, f"node {node_id} was removed")
        return failed

    def declare_lost(self, node_id: str) -> list[str]:
        """A node whose heartbeat expired: no placements, its jobs FAILED as NODE_LOST."""
        if not self._set_state(node_id, "dead"):
            return []
        failed = self.fail_jobs(node_id, f"node {node_id} was lost: no heartbeat for {self.settings.node_ttl_s:g} s")
        self.redis.zrem(keys.HEARTBEATS, node_id)
        return failed

    def fail_jobs(self, node_id: str, message: str, *, error_type: ErrorType = ErrorType.NODE_LOST, only: Iterable[str] | None = None) -> list[str]:
        refs = list(only) if only is not None else sorted(self.redis.smembers(keys.node_jobs(node_id)))
        return [
            ref
            for ref in refs
            if self.store.finish(ref, JobStatus.FAILED, error_type=error_type, message=message, expected_node=node_id)
        ]

    def _set_state(self, node_id: str, state: str) -> bool:
        return bool(
            self.scripts.node_state(
                keys=[keys.node(node_id), keys.HEARTBEATS, keys.INVENTORY_LOG],
                args=[node_id, state, int(self.settings.node_ttl_s * 1000)],
            )
        )

    # -- reading ---------------------------------------------------------------

    def load(self, node_ids: Iterable[str] | None = None) -> list[dict[str, str]]:
        """Node hashes (all nodes when ``node_ids`` is None), in one pipelined round trip."""
        ids = sorted(self.redis.smembers(keys.NODES)) if node_ids is None else list(node_ids)
        pipe = self.redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        return [fields for fields in pipe.execute() if fields]

    def describe(self) -> list[dict[str, Any]]:
        """Nodes as the API and CLI show them: capacity, reserved, free, labels, liveness."""
        heartbeats = dict(self.redis.zrange(keys.HEARTBEATS, 0, -1, withscores=True))
        out = []
        for fields in self.load():
            node = node_from_hash(fields)
            hb = heartbeats.get(node.id)
            out.append(
                {
                    "node_id": node.id,
                    "pool": node.pool,
                    "labels": node.labels,
                    "kind": fields.get("kind"),
                    "state": fields.get("state"),
                    "alive": fields.get("state") == "live",
                    "draining": fields.get("drained") == "1",
                    "last_heartbeat": int(hb) if hb is not None else None,
                    "capacity": show_amounts(node.capacity),
                    "reserved": show_amounts(node.reserved),
                    "free": show_amounts({r: node.free(r) for r in node.capacity}),
                }
            )
        return out

    def check(self) -> list[str]:
        """The reservation invariant; returns the problems found (empty when it holds).

        For every node: reserved == the sum of what its non-terminal jobs hold, and
        0 <= reserved <= capacity. Every job in a node's set is placed there and live.
        """
        problems = []
        for fields in self.load():
            node = node_from_hash(fields)
            refs = sorted(self.redis.smembers(keys.node_jobs(node.id)))
            pipe = self.redis.pipeline(transaction=False)
            for ref in refs:
                pipe.hmget(keys.job(ref), [JobFields.STATUS, JobFields.NODE, JobFields.RESERVED])
            held: dict[str, int] = {}
            for ref, (status, placed_on, reserved) in zip(refs, pipe.execute()):
                if status is None or JobStatus(status).terminal or placed_on != node.id:
                    problems.append(f"node {node.id}: job {ref} is in its set but is {status} on {placed_on}")
                for name, amount in re.findall(r"([^=,]+)=(\d+)", reserved or ""):
                    held[name] = held.get(name, 0) + int(amount)
            for name in set(node.reserved) | set(held):
                reserved_amount = node.reserved.get(name, 0)
                if reserved_amount != held.get(name, 0):
                    problems.append(f"node {node.id}: {name} reserved {reserved_amount} but its jobs hold {held.get(name, 0)}")
                if not 0 <= reserved_amount <= node.capacity.get(name, 0):
                    problems.append(f"node {node.id}: {name} reserved {reserved_amount} outside 0..{node.capacity.get(name, 0)}")
        return problems


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
