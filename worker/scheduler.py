"""The placement loop of a placement worker: claim waiting jobs, choose nodes, reserve.

Jobs wait in line by *shape* (what they ask for, and where): jobs of one shape
place alike, so when the oldest job of a shape does not fit, its other jobs are
not tried again until capacity is freed or added, or a backoff passes. A round:

1. bring the in-memory ``Inventory`` up to date from ``poolq:inventory:log``;
2. claim up to ``placement_batch`` of the oldest waiting jobs across ready shapes
   (``claim.lua``), under a lease, but no more than the view's free CPU could take
   (``claim_size``): a full pool is not claimed and given back a round's worth at a time;
3. choose a node for each job (``placement.Inventory.choose``), applying each choice
   to the local view so the batch does not over-fill a node;
4. reserve them all in one atomic step (``reserve.lua``), which re-checks each;
   a decision refused because another worker got there first is chosen again;
5. put back what did not fit (``requeue.lua``), with the reasons, and block its shape.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import secrets
import threading
import time
from collections import defaultdict
from typing import Any, Callable, TypeVar

import redis

from poolq import keys, queues
from poolq.model import CPU, PLACEMENT_LATENCY_BUCKETS_MS, ErrorType, Hold, JobStatus, Taken, priority_of
from poolq.nodes import NodeAdmin, node_amounts, node_devices
from poolq.redis_io import Scripts
from poolq.settings import Settings
from poolq.store import WAKE_TTL_MS, JobStore, requests_text
from worker.placement import Inventory, Node, Shape, now_ms, quota_reason

log = logging.getLogger("poolq.placement")
T = TypeVar("T")

TENANTS_PER_ROUND = 32  # tenants whose shapes a round reads (claim.lua: fair share among them)
MAX_CACHED_SHAPES = 10_000
MAX_TERM_INDEXES = 1_000
READY_SCAN = 512
RESERVE_RETRIES = 3
CLAIM_FLOOR = 8  # jobs a round claims though the view has no room: holds, preemption and reasons act on them
CLAIM_TRIES_S = 5.0  # how long a round keeps asking for its claim while Redis does not answer
MAX_LOST_CLAIMS = 3  # claims holding a job alone that were lost before it is given up
PREEMPT_NODES = 16  # nodes a preempting job looks at, those nearest to fitting it first
PREEMPT_JOBS = 4096  # jobs on them it reads at most
PREEMPTING = "Preempting Lower Priority"  # its reason line while the jobs it preempted stop


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
        self._claim_prefix = secrets.token_hex(8)  # claim ids: unique per round, across workers and restarts
        self._claims = 0
        self._placing = threading.Lock()
        self._last_round = time.monotonic()
        self._holds: dict[str, tuple[str, int]] = {}  # sig -> (node id, priority): holds to make this round
        # A hold outlives the longest backoff of its shape thrice: the shape fails again
        # and extends it while it still waits.
        self._hold_ms = int(3000 * self.settings.max_backoff_s) + 1000
        # Capacity a preemption frees is kept for its job while the victims stop (SIGTERM,
        # the grace, SIGKILL) and a round places it, with room to spare.
        self._taken_ms = int(2000 * self.settings.stop_grace_s) + self._hold_ms
        self._preempting: set[str] = set()  # tenants whose jobs may preempt (poolq quota set --preempt on)
        self._claim_id = ""

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
            self._reload_nodes({fields["n"] for _, fields in entries})
            self._log_id = entries[-1][0]

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
        # The position is taken first (changes from then on are read next time) and kept
        # only once the whole view is built: a failed reload leaves none to trust.
        self._log_id = None
        last = self.redis.xrevrange(keys.INVENTORY_LOG, count=1)
        inventory = Inventory(self.settings.placement_strategy)
        for fields in self.admin.load():
            inventory.upsert(node_from_hash(fields))
        self.inventory, self._log_id = inventory, (last[0][0] if last else "0-0")

    # -- rounds ----------------------------------------------------------------

    def place_waiting(self, budget_s: float = 5.0) -> int:
        """Place until no ready job is left or the budget is spent; returns jobs handled.

        One at a time per process (the Celery task, or the duties thread standing
        in for a consumer that stopped): the inventory view is not shared between threads.
        """
        with self._placing:
            try:
                return self._place_waiting(budget_s)
            finally:
                self._last_round = time.monotonic()

    def _place_waiting(self, budget_s: float) -> int:
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

    def idle_s(self) -> float:
        """Seconds since this process last placed."""
        return time.monotonic() - self._last_round

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
        claim_id = self._new_claim_id()
        # claim.lua keeps its answer under the claim's id: a retry after a lost reply gets
        # the same jobs back instead of claiming others, so trying again (a while) is right:
        # giving up would leave the jobs to the lease, which outlasts default deadlines.
        tenants = [self._shapes[s].tenant for s in sigs]
        lease_ms = int(self.settings.claim_lease_s * 1000)
        half_life_ms = int(self.settings.fair_share_half_life_s * 1000)
        try:
            self.refresh()
            fresh, batch = True, self.claim_size(sigs)
        except Exception:
            # A view that cannot be built (Redis, or a node hash it cannot read) is built
            # again with the claim in hand, where what fails counts against the jobs.
            fresh, batch = False, self.settings.placement_batch
        flat = self._until_answered(lambda: claim(self.scripts, claim_id, sigs, tenants, batch, lease_ms, half_life_ms))
        claimed = [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]
        if not claimed:
            return 0
        try:
            self._place(claim_id, claimed, fresh)
            self.redis.delete(keys.claim(claim_id))  # it served the claim's retry, if there was one
        except Exception as exc:
            # Put the claim back rather than leave it to the lease, which may outlast the
            # jobs' deadlines. Whatever failed may fail again for these jobs: each comes
            # back as a suspect, claimed alone, and one that keeps failing is given up as
            # a poison job would be (Duties.recover_claims). Redis may refuse this too;
            # then the lease it is. The error ends this call: the next wake-up tries again.
            try:
                self._return_suspects(claim_id, claimed, exc)
            except redis.RedisError:
                pass
            raise
        return len(claimed)

    def _until_answered(self, call: Callable[[], T]) -> T:
        """A step that is safe to repeat, repeated while Redis does not answer, for up to
        CLAIM_TRIES_S (then the error: Redis is away, and the lease recovers the step)."""
        deadline, delay = time.monotonic() + CLAIM_TRIES_S, 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def claim_size(self, sigs: list[str]) -> int:
        """How many jobs a round claims: ``placement_batch``, but no more than the free CPU of
        the schedulable nodes could take of the ready shapes (an upper bound: it ignores where
        each may go), and at least CLAIM_FLOOR. Jobs that ask for no CPU, gangs and tenants that
        preempt are not bounded by free capacity: they get the whole batch."""
        batch, room = self.settings.placement_batch, 0
        for sig in sigs:
            shape = self._shapes[sig]
            cpu = shape.req.get(CPU, 0)
            if cpu <= 0 or shape.gang or shape.tenant in self._preempting:
                return batch
            room += self.inventory.free_cpu // cpu
            if room >= batch:
                return batch
        return max(room, min(CLAIM_FLOOR, batch))

    def _return_suspects(self, claim_id: str, claimed: list[tuple[str, str, int]], exc: BaseException) -> None:
        # A Redis error is not the jobs' fault: they come back, but no claim counts against them.
        lone = len(claimed) == 1 and not isinstance(exc, redis.RedisError)
        by_shape: dict[str, list[Held]] = defaultdict(list)
        for job_ref, sig, _ in claimed:
            by_shape[sig].append(Held(job_ref, claim_id, lost=lone))
        for sig, members in by_shape.items():
            give_up_poison(self.store, requeue(self.scripts, sig, members, suspect=True))

    def _new_claim_id(self) -> str:
        self._claims += 1
        return f"{self._claim_prefix}.{self._claims:x}"

    def _place(self, claim_id: str, claimed: list[tuple[str, str, int]], fresh: bool = True) -> None:
        self._holds.clear()
        self._claim_id = claim_id
        self._load_quotas({self._shapes[sig].tenant for _, sig, _ in claimed if sig in self._shapes})
        if not fresh:
            self.refresh()
        pending, unplaced = claimed, []
        failed_shapes: dict[str, list[dict[str, Any]]] = {}
        for _ in range(RESERVE_RETRIES):
            decisions, not_chosen = self._choose(pending, failed_shapes)
            unplaced += not_chosen
            pending = self._reserve(claim_id, decisions) if decisions else []
            if not pending:
                break
            self.refresh()
        self._requeue(claim_id, unplaced + pending, failed_shapes)

    def _ready_shapes(self) -> list[str]:
        """The oldest ready shapes of up to TENANTS_PER_ROUND tenants, the tenants taking turns
        (each tenant's oldest, then each one's next, and so on). claim.lua reads them in this
        order, each tenant's until it has a round's jobs that no shape of its yet unread goes
        before: many shapes of a few jobs each fill a round (10,000 distinct shapes place at
        about 70 % of one shape's rate), a tenant with many shapes cannot crowd out the others,
        and priorities hold across a tenant's shapes."""
        candidates = self.redis.zrange(keys.SHAPES_READY, 0, READY_SCAN - 1)
        if len(self._shapes) > MAX_CACHED_SHAPES:  # shapes come and go: keep the cache bounded
            self._shapes.clear()
        self.inventory.trim_indexes(MAX_TERM_INDEXES)
        self._load_shapes(set(candidates))
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for sig in candidates:
            if (shape := self._shapes.get(sig)) is not None:
                by_tenant[shape.tenant].append(sig)
        chosen = list(by_tenant.values())[:TENANTS_PER_ROUND]
        return [sig for turn in itertools.zip_longest(*chosen) for sig in turn if sig is not None]

    def _load_quotas(self, tenants: set[str]) -> None:
        """The round's view of each tenant's limits and usage (reserve.lua re-checks)."""
        pipe = self.redis.pipeline(transaction=False)
        names = sorted(tenants)
        for tenant in names:
            pipe.hgetall(keys.quota(tenant))
            pipe.hgetall(keys.tenant_usage(tenant))
            pipe.hget(keys.limits(tenant), "preempt")
        answers = pipe.execute()
        self._quotas = {
            tenant: (_integers(answers[3 * i]), _integers(answers[3 * i + 1])) for i, tenant in enumerate(names)
        }
        self._preempting = {tenant for i, tenant in enumerate(names) if answers[3 * i + 2] == "1"}

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
    ) -> tuple[list[Choice], list[tuple[str, str, int]]]:
        decisions: list[Choice] = []
        unplaced = []
        for job_ref, sig, seq in jobs:
            shape = self._shapes.get(sig)
            if shape is None or sig in failed_shapes:
                unplaced.append((job_ref, sig, seq))
                continue
            limits, usage = self._quotas.get(shape.tenant, ({}, {}))
            over_quota = quota_reason(shape.req, limits, usage)
            priority = priority_of(seq)
            if shape.members:  # a gang: every member chosen in the view, or none
                placed, reasons = self.inventory.choose_gang(shape, priority) if not over_quota else ([], [over_quota])
                if not placed:
                    failed_shapes[sig] = reasons
                    unplaced.append((job_ref, sig, seq))
                    continue
                member_shapes = dict(shape.members)
                decisions += [Choice(ref, sig, seq, node, member_shapes[ref], job_ref) for ref, node in placed]
                for resource, amount in shape.req.items():
                    usage[resource] = usage.get(resource, 0) + amount
                continue
            node = None if over_quota else self.inventory.choose(shape, priority, job_ref)
            if node is None:
                failed_shapes[sig] = [over_quota] if over_quota else self.inventory.reasons(shape, priority)
                unplaced.append((job_ref, sig, seq))
                if not over_quota:
                    self._hold_for(shape, priority)
                    if shape.tenant in self._preempting:
                        line = self._preempt(job_ref, shape, priority)
                        if line is not None:
                            failed_shapes[sig].append(line)
                continue
            self.inventory.reserve(node, shape.req)
            for resource, amount in shape.req.items():
                usage[resource] = usage.get(resource, 0) + amount
            decisions.append(Choice(job_ref, sig, seq, node, shape))
        return decisions, unplaced

    def _preempt(self, job_ref: str, shape: Shape, priority: int) -> dict[str, Any] | None:
        """Stop the fewest running jobs of strictly lower priority on one node that would
        make room for this job, keeping the room for it (preempt.lua); the reason line that
        says so, or None when no node would do. A job already preempting waits for that."""
        now = now_ms()
        for node in self.inventory.nodes.values():
            if node.taken is not None and node.taken.ref == job_ref and node.taken.until_ms > now:
                return {"reason": PREEMPTING, "units": 0, "requirement": f"node {node.id}"}
        req = shape.req
        candidates = [
            n
            for n in self.inventory.nodes.values()
            if n.schedulable
            and shape.affinity_ok(n)
            and all(n.capacity.get(r, 0) >= a for r, a in req.items())
            and not n.kept_from(job_ref)
            and not (n.hold is not None and n.held_against(shape.sig, priority))
        ]
        candidates.sort(key=lambda n: (-sum(min(max(n.free(r), 0), a) / a for r, a in req.items() if a > 0), n.id))
        candidates = candidates[:PREEMPT_NODES]
        if not candidates:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for node in candidates:
            pipe.smembers(keys.node_jobs(node.id))
        refs = [sorted(members)[:PREEMPT_JOBS] for members in pipe.execute()]
        for node_refs in refs:
            for ref in node_refs:
                pipe.hmget(keys.job(ref), ["status", "node", "prio", "stop", "gang", "res"])
        states = iter(pipe.execute())
        best: tuple[tuple[int, int, int], Node, list[str]] | None = None
        for node, node_refs in zip(candidates, refs):
            jobs = []
            for ref in node_refs:
                status, on, prio, stop, gang, res = next(states)
                if status == JobStatus.RUNNING and on == node.id and int(prio or 0) < priority and not stop:
                    if not gang and res:
                        jobs.append((ref, int(prio or 0), _amounts(res)))
            victims = fewest_victims(node, req, jobs)
            if victims is None:
                continue
            rank = (len(victims), max(p for _, p, _ in victims), sum(p for _, p, _ in victims))
            if best is None or rank < best[0]:
                best = (rank, node, [ref for ref, _, _ in victims])
        if best is None:
            return None
        _, node, victims = best
        _, submission_id = keys.split_ref(job_ref)
        message = f"preempted by {submission_id} (priority {priority}), which needed room on node {node.id}"
        answer = self.scripts.preempt(
            keys=[
                keys.job(job_ref),
                keys.node(node.id),
                keys.node_jobs(node.id),
                keys.CLAIMS,
                keys.INVENTORY_LOG,
                keys.HEARTBEATS,
                *(keys.job(ref) for ref in victims),
            ],
            args=[
                job_ref,
                self._claim_id,
                node.id,
                requests_text(req),
                self._taken_ms,
                int(self.settings.node_ttl_s * 1000),
                message,
                *victims,
            ],
        )
        if int(answer) not in (Preempted.PREEMPTED, Preempted.ALREADY):
            log.debug("preemption for %s on %s refused (%s)", job_ref, node.id, Preempted(int(answer)).name)
            return None
        node.taken = Taken(job_ref, now + self._taken_ms, dict(req))  # this round keeps off it too
        self.store.wake(queues.node_queue(node.id))  # its agent stops the victims (again, after a lost reply)
        if int(answer) == Preempted.PREEMPTED:
            log.info("%s preempts %s on node %s", job_ref, ", ".join(victims), node.id)
        return {"reason": PREEMPTING, "units": len(victims), "requirement": f"node {node.id}"}

    def _hold_for(self, shape: Shape, priority: int) -> None:
        """Hold a node for a job that fits nowhere now, so that lower-priority jobs do not
        take the capacity it waits for (hold.lua); sent with the round's requeue."""
        node = self.inventory.to_hold(shape, priority)
        if node is None:
            return
        node.hold = Hold(priority, shape.sig, now_ms() + self._hold_ms)  # this round respects it too
        self._holds[shape.sig] = (node.id, priority)

    def _reserve(self, claim_id: str, decisions: list[Choice]) -> list[tuple[str, str, int]]:
        """Reserve in Redis; returns the jobs to choose again (their node was taken): for a
        gang, its lead, once."""
        items = [
            Decision(c.job_ref, c.sig, c.node.id, c.shape.tenant, c.seq, requests_text(c.shape.req), c.gang_lead)
            for c in decisions
        ]
        results, wake = reserve(self.scripts, claim_id, items, self.settings)
        for node_id in wake:
            self.store.wake(queues.node_queue(node_id))
        outcomes = [Reservation(code) for code in results]
        refused = [(d, code) for d, code in zip(decisions, outcomes) if code != Reservation.RESERVED]
        if refused:
            # The local view reserved these too: read the true state of their nodes and tenants.
            self._reload_nodes({c.node.id for c, _ in refused})
            self._load_quotas(set(self._quotas))
            log.debug("%d reservations refused; choosing again where the job still waits", len(refused))
        return [
            (c.job_ref, c.sig, c.seq) for c, code in refused if code in CHOOSE_AGAIN and c.gang_lead in ("", c.job_ref)
        ]

    def _requeue(
        self,
        claim_id: str,
        jobs: list[tuple[str, str, int]],
        failed_shapes: dict[str, list[dict[str, Any]]],
    ) -> None:
        by_shape: dict[str, list[Held]] = defaultdict(list)
        for job_ref, sig, _ in jobs:
            by_shape[sig].append(Held(job_ref, claim_id))
        for sig in failed_shapes:
            by_shape.setdefault(sig, [])
        if not by_shape:
            return
        backoff_ms = int(self.settings.max_backoff_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for sig, (node_id, priority) in self._holds.items():
            self.scripts.hold(
                keys=[keys.node(node_id), keys.INVENTORY_LOG], args=[priority, sig, self._hold_ms], client=pipe
            )
        self._holds.clear()
        for sig, members in by_shape.items():
            requeue(
                self.scripts,
                sig,
                members,
                round_id=claim_id,
                max_backoff_ms=backoff_ms,
                reasons=failed_shapes.get(sig),
                client=pipe,
            )
        pipe.execute()


class Preempted(enum.IntEnum):
    """preempt.lua's answer."""

    PREEMPTED = 1
    ALREADY = 2  # the job is preempting already: its victims are stopping
    NOT_WAITING = 3  # no longer held by this claim, placed, ended or being stopped
    NODE_UNAVAILABLE = 4  # dead, drained, old heartbeat, or keeping capacity for another job
    VICTIM_CHANGED = 5  # a victim ended, moved, or is being stopped already
    NOT_ENOUGH = 6  # the victims would not free enough (the node changed)


def fewest_victims(node: Node, req: dict[str, int], jobs: list[tuple[str, int, dict[str, int]]]) -> list[Any] | None:
    """The fewest of ``jobs`` (ref, priority, amounts) on ``node`` whose ends would free
    enough for ``req``, lowest priorities first among equals; None if all would not.

    Greedy: each pick covers the largest share of what is still missing; then any pick
    the others make unnecessary is dropped, so that no more is stopped than needed."""
    missing = {r: a - node.free(r) for r, a in req.items() if a > node.free(r)}
    if not missing:
        return None
    freed = {r: sum(job[2].get(r, 0) for job in jobs) for r in missing}
    if any(freed[r] < m for r, m in missing.items()):
        return None

    def short(chosen: list[Any]) -> dict[str, int]:
        return {r: m - sum(job[2].get(r, 0) for job in chosen) for r, m in missing.items()}

    chosen: list[Any] = []
    left = list(jobs)
    need = short(chosen)
    while any(v > 0 for v in need.values()):
        pick = max(left, key=lambda job: _cover(job, need))
        chosen.append(pick)
        left.remove(pick)
        need = short(chosen)
    for job in sorted(chosen, key=lambda job: -job[1]):  # drop the highest priorities first
        rest = [other for other in chosen if other is not job]
        if all(v <= 0 for v in short(rest).values()):
            chosen = rest
    return chosen


def _cover(job: tuple[str, int, dict[str, int]], need: dict[str, int]) -> tuple[float, int, int]:
    """How good a victim is for what is still missing: the share of it that it frees,
    then the lower its priority, then the less it frees beyond what is missing."""
    amounts = job[2]
    share = sum(min(amounts.get(r, 0), n) / n for r, n in need.items() if n > 0)
    beyond = sum(max(amounts.get(r, 0) - max(n, 0), 0) for r, n in need.items())
    return share, -job[1], -beyond


def _amounts(requests: str) -> dict[str, int]:
    out = {}
    for item in filter(None, requests.split(",")):
        name, _, amount = item.partition("=")
        out[name] = int(amount)
    return out


class Reservation(enum.IntEnum):
    """reserve.lua's answer for one decision."""

    RESERVED = 0
    JOB_GONE = 1  # placed, stopped or ended meanwhile
    NODE_UNAVAILABLE = 2  # dead, drained, or its heartbeat is old
    NO_CAPACITY = 3  # another worker took it first
    OVER_QUOTA = 4  # the tenant's usage grew meanwhile
    NOT_HELD = 5  # the claim no longer holds the job: the sweep gave it to another
    NODE_HELD = 6  # the node is held for a job of higher priority (hold.lua)


CHOOSE_AGAIN = frozenset(
    {Reservation.NODE_UNAVAILABLE, Reservation.NO_CAPACITY, Reservation.OVER_QUOTA, Reservation.NODE_HELD}
)


@dataclasses.dataclass(frozen=True)
class Held:
    """A claimed job as requeue.lua takes it: its ref, the claim that holds it, and
    whether to count that claim's loss against it."""

    ref: str
    claim_id: str
    lost: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """A node chosen in the view for a claimed job, or for a member of a claimed gang."""

    job_ref: str
    sig: str
    seq: int
    node: Node
    shape: Shape  # the job's; a gang member's own
    gang_lead: str = ""  # a gang member's: the ref of its gang's lead, the claimed one


@dataclasses.dataclass(frozen=True)
class Decision:
    """One job to reserve on one node, as reserve.lua takes it."""

    job_ref: str
    sig: str
    node_id: str
    tenant: str
    seq: int
    requests: str  # "CPU=1000,memory=134217728"
    gang_lead: str = ""  # a gang's members are reserved together, all or none, under their lead's claim


def reserve(scripts: Scripts, claim_id: str, decisions: list[Decision], settings: Settings) -> Any:
    """reserve.lua for a round's decisions: per decision its code (Reservation), then the nodes to wake."""
    key_list = [
        keys.CLAIMED,
        keys.INVENTORY_LOG,
        keys.HEARTBEATS,
        keys.DEADLINES,
        keys.STATS,
        keys.TENANTS_SERVED,
        keys.CLAIMS,
        keys.FAIR_SHARE,
    ]
    buckets = ",".join(str(le) for le in PLACEMENT_LATENCY_BUCKETS_MS)
    half_life_ms = int(settings.fair_share_half_life_s * 1000)
    args: list[Any] = [int(settings.node_ttl_s * 1000), WAKE_TTL_MS, claim_id, buckets, half_life_ms]
    for d in decisions:
        key_list += [
            keys.job(d.job_ref),
            keys.node(d.node_id),
            keys.node_jobs(d.node_id),
            keys.node_inbox(d.node_id),
            keys.shape(d.sig),
            keys.wake(queues.node_queue(d.node_id)),
            keys.tenant_usage(d.tenant),
            keys.quota(d.tenant),
        ]
        args += [d.job_ref, d.node_id, d.seq, d.requests, d.gang_lead]
    return scripts.reserve(keys=key_list, args=args)


def claim(
    scripts: Scripts,
    claim_id: str,
    sigs: list[str],
    tenants: list[str],
    batch: int,
    lease_ms: int,
    half_life_ms: int,
) -> Any:
    """claim.lua: up to `batch` jobs from the shapes `sigs` (of `tenants`), leased to claim_id;
    it reads at most `batch` waiting jobs for each of TENANTS_PER_ROUND tenants."""
    return scripts.claim(
        keys=[
            keys.SHAPES_READY,
            keys.CLAIMED,
            keys.SHAPES_IDLE,
            keys.SUSPECTS,
            keys.TENANTS_SERVED,
            keys.CLAIMS,
            keys.claim(claim_id),
            keys.FAIR_SHARE,
            keys.SEQ,
            keys.DEADLINES,
            *(keys.shape_queue(s) for s in sigs),
        ],
        args=[
            batch,
            lease_ms,
            claim_id,
            keys.limits(""),
            keys.tenant_usage("").removesuffix(":usage"),
            half_life_ms,
            keys.JOB_PREFIX,
            keys.shape(""),
            batch * TENANTS_PER_ROUND,
            *sigs,
            *tenants,
        ],
    )


def requeue(
    scripts: Scripts,
    sig: str,
    members: list[Held],
    *,
    round_id: str = "",
    max_backoff_ms: int = 0,
    reasons: list[dict[str, Any]] | None = None,
    suspect: bool = False,
    client: Any = None,
) -> dict[str, int]:
    """Put claimed jobs of one shape back in line, each only while its claim still holds
    it; with ``reasons``, count the round's failed attempt once and block the shape for a
    backoff up to ``max_backoff_ms`` (requeue.lua). Returns, for members with ``lost``,
    how many claims holding them were lost (unless ``client`` is a pipeline)."""
    answer = scripts.requeue(
        keys=[
            keys.CLAIMED,
            keys.SHAPES_READY,
            keys.SHAPES_BLOCKED,
            keys.shape(sig),
            keys.shape_queue(sig),
            keys.SHAPES_IDLE,
            keys.CLAIMS,
            keys.SUSPECTS,
            *(keys.job(m.ref) for m in members),
        ],
        args=[
            sig,
            max_backoff_ms,
            json.dumps(reasons) if reasons is not None else "",
            round_id,
            "suspect" if suspect else "",
            *(item for m in members for item in (m.ref, m.claim_id, "1" if m.lost else "")),
        ],
        client=client,
    )
    if client is not None:
        return {}
    return {answer[i]: int(answer[i + 1]) for i in range(0, len(answer), 2)}


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
        devices=node_devices(fields),
        hold=Hold.parse(fields["hold"]) if fields.get("hold") else None,
        taken=Taken.parse(fields["taken"]) if fields.get("taken") else None,
    )


def give_up_poison(store: JobStore, lost_claims: dict[str, int]) -> None:
    """Fail the jobs that placement has lost MAX_LOST_CLAIMS times (a worker died, or a
    round failed, holding only that job): such a job is not tried again."""
    for job_ref, lost in lost_claims.items():
        if lost >= MAX_LOST_CLAIMS:
            store.finish(
                job_ref,
                JobStatus.FAILED,
                error_type=ErrorType.INVALID_REQUEST,
                from_statuses=[JobStatus.PENDING],
                message=f"placement stopped {lost} times while handling this job; it is not tried again",
            )


def _integers(fields: dict[str, str]) -> dict[str, int]:
    """Integer amounts of a Redis hash; a value that is not one is skipped with a warning,
    so that one bad field cannot fail every placement round."""
    out = {}
    for name, value in fields.items():
        try:
            out[name] = int(value)
        except ValueError:
            log.warning("ignoring %s=%r: not an integer amount", name, value)
    return out


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
