"""The placement loop of a placement worker: claim waiting jobs, choose nodes, reserve.

Jobs wait in line by *shape* (what they ask for, and where): jobs of one shape
place alike, so when the oldest job of a shape does not fit, its other jobs are
not tried again until capacity is freed or added, or a backoff passes. A round:

1. claim up to ``placement_batch`` of the oldest waiting jobs across ready shapes
   (``claim.lua``), under a lease;
2. bring the in-memory ``Inventory`` up to date from ``poolq:inventory:log``;
3. choose a node for each job (``placement.Inventory.choose``), applying each choice
   to the local view so the batch does not over-fill a node;
4. reserve them all in one atomic step (``reserve.lua``), which re-checks each;
   a decision refused because another worker got there first is chosen again;
5. put back what did not fit (``requeue.lua``), with the reasons, and block its shape.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any

import redis

from poolq import keys, queues
from poolq.redis_io import Scripts
from poolq.settings import Settings
from poolq.store import WAKE_TTL_MS, JobStore, requests_text
from worker.inventory import NodeAdmin, node_from_hash
from worker.placement import Inventory, Node, Shape, quota_reason

log = logging.getLogger("poolq.placement")

SHAPES_PER_ROUND = 32
SHAPES_PER_TENANT = 4
MAX_CACHED_SHAPES = 10_000
MAX_TERM_INDEXES = 1_000
READY_SCAN = 512
RESERVE_RETRIES = 3


class Scheduler:
    def __init__(self, store: JobStore):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.scripts: Scripts = store.scripts
        self.settings: Settings = store.settings
        self.admin = NodeAdmin(store)
        self.inventory = Inventory(self.settings.placement_strategy)
        self._log_id: str | None = None  # position in poolq:inventory:log
        self._shapes: dict[str, Shape] = {}
        self._quotas: dict[str, tuple[dict[str, int], dict[str, int]]] = {}  # tenant -> (limits, usage)

    # -- the inventory view ----------------------------------------------------

    def refresh(self) -> None:
        """Apply node changes logged since the last refresh; reload all when unsure."""
        if self._log_id is None:
            self._reload()
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(keys.INVENTORY_LOG, count=1)
        pipe.xread({keys.INVENTORY_LOG: self._log_id}, count=100_000)
        first, read = pipe.execute()
        if first and _stream_id(first[0][0]) > _stream_id(self._log_id):
            self._reload()  # entries past our position may have been trimmed away
            return
        entries = read[0][1] if read else []
        if entries:
            self._log_id = entries[-1][0]
            self._reload_nodes({fields["n"] for _, fields in entries})

    def _reload_nodes(self, node_ids: set[str]) -> None:
        ids = sorted(node_ids)
        for node_id, fields in zip(ids, self._load(ids)):
            if fields:
                self.inventory.upsert(node_from_hash(fields))
            else:
                self.inventory.remove(node_id)

    def _load(self, node_ids: list[str]) -> list[dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hgetall(keys.node(node_id))
        return pipe.execute()

    def _reload(self) -> None:
        last = self.redis.xrevrange(keys.INVENTORY_LOG, count=1)
        self._log_id = last[0][0] if last else "0-0"
        self.inventory = Inventory(self.settings.placement_strategy)
        for fields in self.admin.load():
            self.inventory.upsert(node_from_hash(fields))

    # -- rounds ----------------------------------------------------------------

    def drain(self, budget_s: float = 5.0) -> int:
        """Place until no ready job is left or the budget is spent; returns jobs handled."""
        self.redis.delete(keys.wake(queues.PLACEMENT))  # wake-ups sent from now on are new work
        deadline = time.monotonic() + budget_s
        handled = 0
        while time.monotonic() < deadline:
            self.unblock_on_kick()
            done = self.round()
            handled += done
            if done == 0:
                return handled
        self.store.wake(queues.PLACEMENT)  # more work: let the queue interleave other messages
        return handled

    def unblock_on_kick(self) -> int:
        """Capacity was freed or added since the last round: blocked shapes may fit now."""
        if not self.redis.getdel(keys.KICK):
            return 0
        return self.unblock(self.redis.zrange(keys.SHAPES_BLOCKED, 0, 999))

    def unblock(self, sigs: list[str]) -> int:
        if not sigs:
            return 0
        return int(
            self.scripts.unblock(
                keys=[keys.SHAPES_BLOCKED, keys.SHAPES_READY, keys.SHAPES_IDLE, *(keys.shape_queue(s) for s in sigs)],
                args=sigs,
            )
        )

    def round(self) -> int:
        """One claim-choose-reserve round; returns how many jobs it claimed."""
        sigs = self._ready_shapes()
        if not sigs:
            return 0
        flat = self.scripts.claim(
            keys=[
                keys.SHAPES_READY,
                keys.CLAIMED,
                keys.SHAPES_IDLE,
                keys.SUSPECTS,
                keys.TENANTS_SERVED,
                *(keys.shape_queue(s) for s in sigs),
            ],
            args=[
                self.settings.placement_batch,
                int(self.settings.claim_lease_s * 1000),
                *sigs,
                *(self._shapes[s].tenant for s in sigs),
            ],
        )
        claimed = [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]
        if not claimed:
            return 0
        try:
            self._place(claimed)
        except redis.RedisError:
            # Put the claim back rather than leave it to the lease: an expired lease counts
            # as a dead worker against its job (Duties.recover_claims). Redis may refuse
            # this too; then the lease it is.
            try:
                self._requeue(claimed, {})
            except redis.RedisError:
                pass
            raise
        return len(claimed)

    def _place(self, claimed: list[tuple[str, str, int]]) -> None:
        self._load_quotas({self._shapes[sig].tenant for _, sig, _ in claimed})
        self.refresh()
        pending, unplaced = claimed, []
        failed_shapes: dict[str, list[dict[str, Any]]] = {}
        for _ in range(RESERVE_RETRIES):
            decisions, not_chosen = self._choose(pending, failed_shapes)
            unplaced += not_chosen
            pending = self._reserve(decisions) if decisions else []
            if not pending:
                break
            self.refresh()
        self._requeue(unplaced + pending, failed_shapes)

    def _ready_shapes(self) -> list[str]:
        """The oldest ready shapes, at most SHAPES_PER_TENANT of one tenant, so that the
        tenants behind a tenant with many shapes still get their turn this round."""
        candidates = self.redis.zrange(keys.SHAPES_READY, 0, READY_SCAN - 1)
        if len(self._shapes) > MAX_CACHED_SHAPES:  # shapes come and go: keep the cache bounded
            self._shapes.clear()
        self.inventory.trim_indexes(MAX_TERM_INDEXES)
        self._load_shapes(set(candidates))
        chosen: list[str] = []
        per_tenant: dict[str, int] = defaultdict(int)
        for sig in candidates:
            shape = self._shapes.get(sig)
            if shape is None or per_tenant[shape.tenant] >= SHAPES_PER_TENANT:
                continue
            per_tenant[shape.tenant] += 1
            chosen.append(sig)
            if len(chosen) == SHAPES_PER_ROUND:
                break
        return chosen

    def _load_quotas(self, tenants: set[str]) -> None:
        """The round's view of each tenant's limits and usage (reserve.lua re-checks)."""
        pipe = self.redis.pipeline(transaction=False)
        names = sorted(tenants)
        for tenant in names:
            pipe.hgetall(keys.quota(tenant))
            pipe.hgetall(keys.tenant_usage(tenant))
        answers = pipe.execute()
        self._quotas = {
            tenant: ({k: int(v) for k, v in answers[2 * i].items()}, {k: int(v) for k, v in answers[2 * i + 1].items()})
            for i, tenant in enumerate(names)
        }

    def _load_shapes(self, sigs: set[str]) -> None:
        missing = [s for s in sigs if s not in self._shapes]
        if not missing:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sig in missing:
            pipe.hget(keys.shape(sig), "spec")
        for sig, spec in zip(missing, pipe.execute()):
            if spec:
                self._shapes[sig] = Shape.from_spec(sig, json.loads(spec))

    def _choose(
        self, jobs: list[tuple[str, str, int]], failed_shapes: dict[str, list[dict[str, Any]]]
    ) -> tuple[list[tuple[str, str, int, Node, Shape]], list[tuple[str, str, int]]]:
        decisions, unplaced = [], []
        for job_ref, sig, seq in jobs:
            shape = self._shapes.get(sig)
            if shape is None or sig in failed_shapes:
                unplaced.append((job_ref, sig, seq))
                continue
            limits, usage = self._quotas.get(shape.tenant, ({}, {}))
            over_quota = quota_reason(shape.req, limits, usage)
            node = None if over_quota else self.inventory.choose(shape)
            if node is None:
                failed_shapes[sig] = [over_quota] if over_quota else self.inventory.reasons(shape)
                unplaced.append((job_ref, sig, seq))
                continue
            self.inventory.reserve(node, shape.req)
            for resource, amount in shape.req.items():
                usage[resource] = usage.get(resource, 0) + amount
            decisions.append((job_ref, sig, seq, node, shape))
        return decisions, unplaced

    def _reserve(self, decisions: list[tuple[str, str, int, Node, Shape]]) -> list[tuple[str, str, int]]:
        """Reserve in Redis; returns the jobs to choose again (their node was taken)."""
        key_list = [keys.CLAIMED, keys.INVENTORY_LOG, keys.HEARTBEATS, keys.DEADLINES, keys.STATS, keys.TENANTS_SERVED]
        args: list[Any] = [int(self.settings.node_ttl_s * 1000), WAKE_TTL_MS]
        for job_ref, sig, seq, node, shape in decisions:
            key_list += [
                keys.job(job_ref),
                keys.node(node.id),
                keys.node_jobs(node.id),
                keys.node_inbox(node.id),
                keys.shape(sig),
                keys.wake(queues.node_queue(node.id)),
                keys.tenant_usage(shape.tenant),
                keys.quota(shape.tenant),
            ]
            args += [job_ref, node.id, seq, requests_text(shape.req)]
        results, wake = self.scripts.reserve(keys=key_list, args=args)
        for node_id in wake:
            self.store.wake(queues.node_queue(node_id))
        refused = [(d, code) for d, code in zip(decisions, results) if code != 0]
        if refused:
            # The local view reserved these too: read the true state of their nodes and tenants.
            self._reload_nodes({d[3].id for d, _ in refused})
            self._load_quotas(set(self._quotas))
            log.debug("%d reservations refused; choosing again where the job still waits", len(refused))
        return [(d[0], d[1], d[2]) for d, code in refused if code in (2, 3, 4)]

    def _requeue(self, jobs: list[tuple[str, str, int]], failed_shapes: dict[str, list[dict[str, Any]]]) -> None:
        by_shape: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for job_ref, sig, seq in jobs:
            by_shape[sig].append((job_ref, seq))
        for sig in failed_shapes:
            by_shape.setdefault(sig, [])
        if not by_shape:
            return
        backoff_ms = int(self.settings.max_backoff_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for sig, members in by_shape.items():
            requeue(self.scripts, sig, members, max_backoff_ms=backoff_ms, reasons=failed_shapes.get(sig), client=pipe)
        pipe.execute()


def requeue(
    scripts: Scripts,
    sig: str,
    members: list[tuple[str, int]],
    *,
    max_backoff_ms: int = 0,
    reasons: list[dict[str, Any]] | None = None,
    client: Any = None,
) -> None:
    """Put claimed jobs (ref, seq) of one shape back in line; with ``reasons``, count the
    failed attempt and block the shape for a backoff up to ``max_backoff_ms`` (requeue.lua)."""
    scripts.requeue(
        keys=[
            keys.CLAIMED,
            keys.SHAPES_READY,
            keys.SHAPES_BLOCKED,
            keys.shape(sig),
            keys.shape_queue(sig),
            keys.SHAPES_IDLE,
            *(keys.job(ref) for ref, _ in members),
        ],
        args=[
            sig,
            max_backoff_ms,
            json.dumps(reasons) if reasons is not None else "",
            *(item for ref, seq in members for item in (ref, seq)),
        ],
        client=client,
    )


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
