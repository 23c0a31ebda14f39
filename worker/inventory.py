"""Nodes and reservations in Redis: add, register, drain, remove, declare lost, list, check.

Used by the CLI (``poolq nodes …``), the node agent, the reaper duty and the API's
``/api/nodes`` and ``/api/pools``. Each change is one Lua script that also appends
the node id to ``poolq:inventory:log``, which placement workers follow.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

import redis

from poolq import keys, queues
from poolq.errors import Conflict, InvalidRequest, NotFound
from poolq.model import ErrorType, JobFields, JobStatus
from poolq.nodes import describe_nodes, load_nodes, node_amounts
from poolq.redis_io import Scripts
from poolq.schemas import LABEL_PART
from poolq.store import WAKE_TTL_MS, JobStore
from worker.placement import Node


def node_from_hash(fields: dict[str, str]) -> Node:
    capacity, reserved = node_amounts(fields)
    labels = json.loads(fields.get("labels") or "{}")
    return Node(
        id=fields["id"],
        pool=fields.get("pool", ""),
        labels=labels,
        capacity=capacity,
        reserved=reserved,
        schedulable=fields.get("state") == "live" and fields.get("drained", "0") == "0",
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
        token: str = "",
        facts: dict[str, Any] | None = None,
    ) -> int:
        """Add a static node (``create``: refuse an existing id) or register an agent's node.

        ``token`` makes an agent's registration safe to send twice; ``facts`` are what the
        agent says of its node (how it enforces resources). Returns the registration's
        incarnation number.
        """
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
    ) -> list[str]:
        refs = list(only) if only is not None else sorted(self.redis.smembers(keys.node_jobs(node_id)))
        return [
            ref
            for ref in refs
            if self.store.finish(ref, JobStatus.FAILED, error_type=error_type, message=message, expected_node=node_id)
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
        0 <= reserved <= capacity. Every job in a node's set is placed there and live.
        """
        problems = []
        for node_id in sorted(self.redis.smembers(keys.NODES)):
            snapshot = self._node_snapshot(node_id)
            if snapshot is None:
                continue
            node, jobs = snapshot
            held: dict[str, int] = {}
            for ref, (status, placed_on, reserved) in jobs:
                if status is None or JobStatus(status).terminal or placed_on != node.id:
                    problems.append(f"node {node.id}: job {ref} is in its set but is {status} on {placed_on}")
                for name, amount in re.findall(r"([^=,]+)=(\d+)", reserved or ""):
                    held[name] = held.get(name, 0) + int(amount)
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

    def _node_snapshot(self, node_id: str) -> tuple[Node, list[tuple[str, list[str | None]]]] | None:
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
                        reads.hmget(keys.job(ref), [JobFields.STATUS, JobFields.NODE, JobFields.RESERVED])
                    jobs = list(zip(refs, reads.execute()))
                    pipe.multi()
                    pipe.execute()  # raises WatchError if the node changed while we read
                    return node_from_hash(fields), jobs
                except redis.WatchError:
                    continue
