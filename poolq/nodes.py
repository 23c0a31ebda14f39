"""The node inventory in Redis: reading it, changing it (``NodeAdmin``), and the units
people write capacity in.

Shared by the API (``/api/nodes``, ``/api/pools``), the CLI (``poolq nodes …``), the
node agents and the placement workers' reaper. Each change is one Lua script that also
appends the node id to ``poolq:inventory:log``, which placement workers follow.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

import redis

from poolq import keys, queues
from poolq.errors import Conflict, InvalidRequest, NotFound
from poolq.model import CPU, GPU, MEMORY, ErrorType, Hold, JobFields, JobStatus, held_devices, to_milli
from poolq.redis_io import Scripts, redis_errors
from poolq.schemas import LABEL_PART, RESERVED_RESOURCE_NAMES, RESOURCE_NAME
from poolq.store import WAKE_TTL_MS, Ending, JobStore

MAX_CAPACITY = 1_000_000_000  # of CPUs, GPUs or a custom resource on one node, as a request's amounts
DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
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


def format_size(amount: int | float) -> str:
    """Bytes as people read them, in the units ``parse_size`` takes: ``8.0Gi``, ``512.0Mi``, ``100``."""
    value = float(amount)
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        scale = UNITS[unit]
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{int(value)}"


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
    """Integer capacity (milli-units, bytes) from human amounts; ValueError for an amount
    that is not a number from 0 to MAX_CAPACITY."""
    capacity = {CPU: _capacity_milli(CPU, cpus), MEMORY: int(memory), GPU: _capacity_milli(GPU, gpus)}
    for name, amount in (resources or {}).items():
        capacity[name] = _capacity_milli(name, amount)
    return capacity


def _capacity_milli(name: str, amount: Decimal | int | str) -> int:
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        value = Decimal("NaN")
    if not (value.is_finite() and 0 <= value <= MAX_CAPACITY):
        raise ValueError(f"a node's {name} must be a number from 0 to {MAX_CAPACITY:,}, not {amount}")
    return to_milli(value)


def node_devices(fields: dict[str, str]) -> dict[str, dict[str, int]]:
    """A node hash's devices: resource -> {device id: milli-units in use}, in id order."""
    devices: dict[str, dict[str, int]] = {}
    for field, ids in fields.items():
        if field.startswith("devices:"):
            name = field[len("devices:") :]
            devices[name] = {i: int(fields.get(f"dev:{name}:{i}") or 0) for i in ids.split(",") if i}
    return devices


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
                # Held for a waiting job that nothing has room for: lower priorities are kept off it.
                "held_for": _held_for(fields.get("hold")),
                "last_heartbeat": int(hb) if hb is not None else None,
                # How the node's agent limits its jobs: {"mode": "v1"|"v2"|"none", "reason": …}
                "enforcement": json.loads(fields.get("facts") or "{}").get("enforcement"),
                "capacity": show_amounts(capacity),
                "reserved": show_amounts(reserved),
                "free": show_amounts({r: capacity[r] - reserved.get(r, 0) for r in capacity}),
                # Per device, the share of it in use (a fractional GPU request shares one).
                "devices": {
                    name: {i: use / 1000 for i, use in uses.items()} for name, uses in node_devices(fields).items()
                },
            }
        )
    return out


def _held_for(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    hold = Hold.parse(text)
    if hold.until_ms <= time.time() * 1000:
        return None
    return {"priority": hold.priority, "until": hold.until_ms}


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


@dataclasses.dataclass(frozen=True)
class NodeAmounts:
    """A node's capacity and reserved amounts, as its hash holds them."""

    id: str
    capacity: dict[str, int]
    reserved: dict[str, int]
    devices: dict[str, dict[str, int]]  # resource -> device id -> milli-units in use


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
        token: str = "",
        facts: dict[str, Any] | None = None,
        devices: dict[str, list[str]] | None = None,
    ) -> int:
        """Add a static node (``create``: refuse an existing id) or register an agent's node.

        ``token`` makes an agent's registration safe to send twice; ``facts`` are what the
        agent says of its node (how it enforces resources); ``devices`` the ids of its
        devices, per resource (as many as its capacity has whole units). Returns the
        registration's incarnation number.
        """
        for name, ids in (devices or {}).items():
            if (
                len(ids) != capacity.get(name, 0) // 1000
                or len(set(ids)) != len(ids)
                or not all(DEVICE_ID.fullmatch(i) for i in ids)
            ):
                raise InvalidRequest(
                    {
                        "devices": [
                            f"{name}: give one distinct id per unit of its capacity, each [A-Za-z0-9._-]{{1,64}}"
                        ]
                    },
                    "invalid node",
                )
        if not LABEL_PART.fullmatch(node_id) or not LABEL_PART.fullmatch(pool):
            raise InvalidRequest(
                {"id" if not LABEL_PART.fullmatch(node_id) else "pool": ["must match [A-Za-z0-9._/-]{1,63}"]},
                "invalid node",
            )
        all_labels = {**labels, "pool": pool}
        pairs = [item for name, amount in sorted(capacity.items()) for item in (name, amount)]
        code, wake, incarnation = self.scripts.node_upsert(
            keys=[
                keys.node(node_id),
                keys.NODES,
                keys.INVENTORY_LOG,
                keys.KICK,
                keys.wake(queues.PLACEMENT),
                keys.HEARTBEATS,
            ],
            args=[
                node_id,
                pool,
                json.dumps(all_labels, sort_keys=True),
                kind,
                "create" if create else "register",
                WAKE_TTL_MS,
                queues.node_queue(node_id) if kind == "agent" else "",
                token,
                json.dumps(facts or {}, sort_keys=True),
                ";".join(f"{name}={','.join(ids)}" for name, ids in sorted((devices or {}).items())),
                *pairs,
            ],
        )
        if code == 0:
            raise Conflict(f"node {node_id} already exists")
        if wake:
            self.store.wake(queues.PLACEMENT)
        return int(incarnation)

    def drain(self, node_id: str, *, shutdown: bool = False, incarnation: int | None = None) -> None:
        """No new placements on the node: an operator's drain (kept if its agent registers
        again), or its agent's own ``shutdown`` (cleared when it does; only while the node
        is still that ``incarnation``'s)."""
        action = "shutdown" if shutdown else "drain"
        if not self._set_state(node_id, action, "" if incarnation is None else str(incarnation)) and not shutdown:
            raise NotFound(f"no node {node_id}")

    def remove(self, node_id: str, *, incarnation: int | None = None) -> list[str]:
        """Take the node out of service, fail its jobs as NODE_LOST, delete it. Returns the failed refs.

        An agent removes its own node as it shuts down, naming its ``incarnation``: a node
        that another agent registered since is left alone. Without one (an operator), the
        node of a live agent is refused: its next heartbeat would bring it back."""
        answer = self._set_state(node_id, "removed", "" if incarnation is None else str(incarnation), raw=True)
        if answer == ["-1"]:
            raise Conflict(
                f"node {node_id} is run by a live node agent: stop the agent (it removes its node as it shuts down), "
                f"or drain the node with `poolq nodes drain {node_id}`"
            )
        answer = answer if answer and answer[0] == "1" else []
        if not answer:
            if incarnation is not None:
                return []  # another agent has the node now
            raise NotFound(f"no node {node_id}")
        failed = self.fail_jobs(node_id, f"node {node_id} was removed", only=answer[2:])
        for _ in range(10):
            deleted = self.scripts.node_delete(
                keys=[
                    keys.node(node_id),
                    keys.node_jobs(node_id),
                    keys.node_inbox(node_id),
                    keys.NODES,
                    keys.HEARTBEATS,
                    keys.INVENTORY_LOG,
                ],
                args=[node_id],
            )
            if deleted:  # 1 deleted; 2 an agent registered the id again meanwhile
                break
            failed += self.fail_jobs(node_id, f"node {node_id} was removed")
        return failed

    def declare_lost(self, node_id: str) -> list[str]:
        """A node whose heartbeat expired: no placements, its jobs FAILED as NODE_LOST.

        The heartbeat entry goes last, once the jobs are failed, so that a reaper that
        dies halfway is followed by one that finishes the work.
        """
        answer = self._set_state(node_id, "dead")
        if not answer:
            return []
        failed = self.fail_jobs(
            node_id, f"node {node_id} was lost: no heartbeat for {self.settings.node_ttl_s:g} s", only=answer[2:]
        )
        self._set_state(node_id, "forget", incarnation=answer[1])
        return failed

    def fail_jobs(
        self,
        node_id: str,
        message: str,
        *,
        error_type: ErrorType = ErrorType.NODE_LOST,
        only: Iterable[str] | None = None,
        from_statuses: Iterable[JobStatus] = (JobStatus.PENDING, JobStatus.RUNNING),
    ) -> list[str]:
        """End the node's jobs (``only`` these) as ``error_type``; the refs ended (or, by their
        retry policy, sent back to PENDING)."""
        refs = list(only) if only is not None else sorted(self.redis.smembers(keys.node_jobs(node_id)))
        return [
            ref
            for ref in refs
            if self.store.finish(
                ref,
                JobStatus.FAILED,
                error_type=error_type,
                message=message,
                expected_node=node_id,
                from_statuses=from_statuses,
            )
            in (Ending.MOVED, Ending.RETRIED)
        ]

    def _set_state(self, node_id: str, action: str, incarnation: str = "", *, raw: bool = False) -> list[str]:
        """node_state.lua's answer: empty when nothing changed, else [1, incarnation, job refs...]
        (with ``raw``, the answer as it is)."""
        answer = self.scripts.node_state(
            keys=[keys.node(node_id), keys.HEARTBEATS, keys.INVENTORY_LOG, keys.node_jobs(node_id)],
            args=[node_id, action, int(self.settings.node_ttl_s * 1000), incarnation],
        )
        items = [str(item) for item in answer]
        if raw:
            return items
        return items if items and items[0] == "1" else []

    # -- reading ---------------------------------------------------------------

    def load(self, node_ids: Iterable[str] | None = None) -> list[dict[str, str]]:
        return load_nodes(self.redis, node_ids)

    def describe(self) -> list[dict[str, Any]]:
        return describe_nodes(self.redis)

    def check(self) -> list[str]:
        """The reservation invariant; returns the problems found (empty when it holds).

        For every node: reserved == the sum of what its non-terminal jobs hold, and
        0 <= reserved <= capacity; likewise each device's use, within 0..1 device.
        Every job in a node's set is placed there and live.
        """
        problems = []
        for node_id in sorted(self.redis.smembers(keys.NODES)):
            snapshot = self._node_snapshot(node_id)
            if snapshot is None:
                continue
            node, jobs = snapshot
            held: dict[str, int] = {}
            device_held: dict[tuple[str, str], int] = {}
            for ref, (status, placed_on, reserved, devices) in jobs:
                if status is None or JobStatus(status).terminal or placed_on != node.id:
                    problems.append(f"node {node.id}: job {ref} is in its set but is {status} on {placed_on}")
                for name, amount in re.findall(r"([^=,]+)=(\d+)", reserved or ""):
                    held[name] = held.get(name, 0) + int(amount)
                if reserved:  # devices are held as long as the amounts are
                    for name, device, milli in held_devices(devices or ""):
                        device_held[(name, device)] = device_held.get((name, device), 0) + milli
            for name, uses in node.devices.items():
                for device, use in uses.items():
                    if use != device_held.get((name, device), 0) or not 0 <= use <= 1000:
                        problems.append(
                            f"node {node.id}: {name} device {device} in use {use}m but its jobs hold "
                            f"{device_held.get((name, device), 0)}m (at most 1000m)"
                        )
            unknown = {key for key in device_held if key[1] not in node.devices.get(key[0], {})}
            for name, device in sorted(unknown):
                problems.append(f"node {node.id}: jobs hold {name} device {device}, which the node does not have")
            for name in set(node.reserved) | set(held):
                reserved_amount = node.reserved.get(name, 0)
                if reserved_amount != held.get(name, 0):
                    problems.append(
                        f"node {node.id}: {name} reserved {reserved_amount} but its jobs hold {held.get(name, 0)}"
                    )
                if not 0 <= reserved_amount <= node.capacity.get(name, 0):
                    problems.append(
                        f"node {node.id}: {name} reserved {reserved_amount} outside 0..{node.capacity.get(name, 0)}"
                    )
        return problems

    def _node_snapshot(self, node_id: str) -> tuple[NodeAmounts, list[tuple[str, list[str | None]]]] | None:
        """A node and its jobs' (status, node, reservation), read consistently on a live system:
        every reservation change writes the node hash, so WATCH on it (and on its job set)
        makes the read start over if one happened meanwhile."""
        watched = [keys.node(node_id), keys.node_jobs(node_id)]
        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watched)
                    fields = pipe.hgetall(keys.node(node_id))
                    if not fields:
                        return None
                    refs = sorted(pipe.smembers(keys.node_jobs(node_id)))
                    reads = self.redis.pipeline(transaction=False)
                    for ref in refs:
                        reads.hmget(
                            keys.job(ref), [JobFields.STATUS, JobFields.NODE, JobFields.RESERVED, JobFields.DEVICES]
                        )
                    jobs = list(zip(refs, reads.execute()))
                    pipe.multi()
                    pipe.execute()  # raises WatchError if the node changed while we read
                    capacity, reserved = node_amounts(fields)
                    return NodeAmounts(fields["id"], capacity, reserved, node_devices(fields)), jobs
                except redis.WatchError:
                    continue
