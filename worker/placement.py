"""Pure placement: which node fits a job, and why none does. No I/O.

``Inventory`` is a placement worker's in-memory view of the nodes, kept current by
the scheduler from Redis. It indexes schedulable nodes (live, not drained) by
label term, each index sorted by free CPU, so that choosing a node is a binary
search plus a short walk rather than a scan of every node: bin-packing walks up
from the tightest CPU fit, spreading walks down from the most free CPU.

The Redis reservation (``poolq/lua/reserve.lua``) re-checks everything decided
here, so a stale view can cost a retry but never an over-commit.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Any, Iterable, Iterator

from poolq.model import CPU, GPU, MEMORY, Hold, Taken, show_amount

ALL = "*"  # the index of every schedulable node

# Reason names in the order a node is checked (docs/placement.md).
DISPLAY_NAMES = {CPU: "CPU", MEMORY: "Memory", GPU: "GPU"}
AFFINITY = "Affinity can't be Satisfied"
QUOTA = "Tenant Quota Exceeded"
NO_NODE = "No Available Node"
HELD = "Held For Higher Priority"
GANG = "Gang Not Placeable Whole"  # first of a gang's reasons; units: the members that fitted


def allocate(uses: dict[str, int], amount: int) -> list[tuple[str, int]] | None:
    """Which devices a request of ``amount`` milli-units takes, given each device's use:
    whole units take free devices (the first ones), a fraction shares the fullest device
    it fits on, so free devices stay whole. None if it does not fit. reserve.lua does the
    same, atomically; this is the placement worker's forecast of it."""
    whole, fraction = divmod(amount, 1000)
    taken = [device for device, use in uses.items() if use == 0][:whole]
    if len(taken) < whole:
        return None
    out = [(device, 1000) for device in taken]
    if fraction:
        best: tuple[str, int] | None = None
        for device, use in uses.items():
            if device not in taken and use + fraction <= 1000 and (best is None or use > best[1]):
                best = (device, use)
        if best is None:
            return None
        out.append((best[0], fraction))
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass
class Node:
    id: str
    pool: str
    labels: dict[str, str | None]
    capacity: dict[str, int]
    reserved: dict[str, int]
    schedulable: bool = True  # live and not drained
    devices: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # resource -> id -> use
    hold: Hold | None = None  # held for a waiting job of some priority (hold.lua)
    taken: Taken | None = None  # capacity kept for a preempting job (preempt.lua)

    def free(self, resource: str) -> int:
        return self.capacity.get(resource, 0) - self.reserved.get(resource, 0)

    def fits(self, req: dict[str, int]) -> bool:
        capacity, reserved = self.capacity, self.reserved
        for resource, amount in req.items():
            if capacity.get(resource, 0) - reserved.get(resource, 0) < amount:
                return False
        if self.devices:
            return all(allocate(self.devices[r], req[r]) is not None for r in self.devices if r in req)
        return True

    def kept_from(self, job_ref: str) -> dict[str, int] | None:
        """What the node keeps for another job that is preempting here, if any."""
        taken = self.taken
        if taken is None or taken.ref == job_ref or taken.until_ms <= now_ms():
            return None
        return taken.req

    def kept_for(self, job_ref: str) -> bool:
        """Whether the node keeps capacity for this job (it preempted there): no hold keeps it off."""
        taken = self.taken
        return taken is not None and bool(job_ref) and taken.ref == job_ref and taken.until_ms > now_ms()

    def held_against(self, sig: str, priority: int) -> bool:
        """Whether the node's hold keeps a job of this shape and priority off it now."""
        hold = self.hold
        return hold is not None and hold.sig != sig and priority < hold.priority and hold.until_ms > now_ms()

    def matches(self, term: tuple[str, str | None]) -> bool:
        key, value = term
        if key not in self.labels:
            return False
        return value is None or self.labels[key] == value

    def term_keys(self) -> Iterator[str]:
        yield ALL
        for key, value in self.labels.items():
            yield key
            if value is not None:
                yield f"{key}={value}"


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a group of identical jobs asks for (built by ``poolq.store.build_shape``)."""

    sig: str
    tenant: str
    req: dict[str, int]
    show: dict[str, str]
    terms: tuple[tuple[str, str | None], ...]
    anti: bool
    selector: dict[str, str]
    gang: str = ""  # a gang's shape: its id; req is its members' requests together
    members: tuple[tuple[str, Shape], ...] = ()  # a gang's: each member's ref and shape, in batch order

    @classmethod
    def from_spec(cls, sig: str, spec: dict[str, Any]) -> Shape:
        members = tuple((ref, cls.from_spec(sig, member)) for ref, member in spec.get("members") or ())
        return cls(
            sig=sig,
            tenant=spec["tenant"],
            req={k: int(v) for k, v in spec["req"].items()},
            show=spec["show"],
            terms=tuple((k, v) for k, v in spec["terms"]),
            anti=bool(spec["anti"]),
            selector=spec["selector"],
            gang=spec.get("gang", ""),
            members=members,
        )

    def selector_ok(self, node: Node) -> bool:
        return all(node.labels.get(k) == v for k, v in self.selector.items())

    def affinity_ok(self, node: Node) -> bool:
        if not self.selector_ok(node):
            return False
        return not self.terms or self.anti or any(node.matches(t) for t in self.terms)


def term_key(term: tuple[str, str | None]) -> str:
    key, value = term
    return key if value is None else f"{key}={value}"


class _Index:
    """Schedulable nodes carrying one label term, sorted by (free CPU, id)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[int, str]] = []

    def add(self, free_cpu: int, node_id: str) -> None:
        bisect.insort(self.entries, (free_cpu, node_id))

    def remove(self, free_cpu: int, node_id: str) -> None:
        at = bisect.bisect_left(self.entries, (free_cpu, node_id))
        if at < len(self.entries) and self.entries[at] == (free_cpu, node_id):
            del self.entries[at]


class Inventory:
    def __init__(self, strategy: str = "binpack"):
        self.strategy = strategy
        self.nodes: dict[str, Node] = {}
        self._indexes: dict[str, _Index] = {ALL: _Index()}
        self._indexed_cpu: dict[str, int] = {}  # node id -> free CPU it is indexed under
        self.free_cpu = 0  # of the schedulable nodes, together: what a round can place at most

    # -- keeping the view current ----------------------------------------------

    def upsert(self, node: Node) -> None:
        self.remove(node.id)
        self.nodes[node.id] = node
        self._index(node)

    def remove(self, node_id: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._unindex(node)

    def reserve(self, node: Node, req: dict[str, int]) -> list[tuple[str, str, int]]:
        """Apply a reservation locally, as the Redis step will; returns the devices it took
        (resource, device, milli-units), for ``unreserve``."""
        self._unindex(node)
        taken = []
        for resource, amount in req.items():
            node.reserved[resource] = node.reserved.get(resource, 0) + amount
            uses = node.devices.get(resource)
            if uses is not None:
                for device, milli in allocate(uses, amount) or []:
                    uses[device] += milli
                    taken.append((resource, device, milli))
        self._index(node)
        return taken

    def unreserve(self, node: Node, req: dict[str, int], devices: list[tuple[str, str, int]]) -> None:
        """Undo a local ``reserve`` (a gang that did not fit whole)."""
        self._unindex(node)
        for resource, amount in req.items():
            node.reserved[resource] = node.reserved.get(resource, 0) - amount
        for resource, device, milli in devices:
            node.devices[resource][device] -= milli
        self._index(node)

    def choose_gang(self, gang: Shape, priority: int = 0) -> tuple[list[tuple[str, Node]], list[dict[str, Any]]]:
        """Nodes for every member of a gang, applied to the view, or none: ([(ref, node)], [])
        or ([], the reasons).

        Members are chosen one by one as single jobs are, largest request first (a greedy
        packing), each seeing the reservations of those before it. When one does not fit,
        the reasons are a line for the gang (its units: how many members fitted) and the
        reasons of the member that did not, with those before it in place; then they are
        undone."""
        order = sorted(
            gang.members, key=lambda m: (-m[1].req.get(CPU, 0), -m[1].req.get(MEMORY, 0), -sum(m[1].req.values()))
        )
        chosen: list[tuple[str, Node, dict[str, int], list[tuple[str, str, int]]]] = []
        for ref, member in order:
            node = self.choose(member, priority)
            if node is None:
                line = {"reason": GANG, "units": len(chosen), "requirement": f"gang {gang.gang}: {len(order)} members"}
                reasons = [line, *self.reasons(member, priority)]
                for _, taken_node, req, devices in reversed(chosen):
                    self.unreserve(taken_node, req, devices)
                return [], reasons
            chosen.append((ref, node, member.req, self.reserve(node, member.req)))
        return [(ref, node) for ref, node, _, _ in chosen], []

    def _index(self, node: Node) -> None:
        if not node.schedulable:
            return
        free_cpu = node.free(CPU)
        self._indexed_cpu[node.id] = free_cpu
        self.free_cpu += free_cpu
        for key in node.term_keys():
            index = self._indexes.get(key)
            if index is not None:
                index.add(free_cpu, node.id)

    def _unindex(self, node: Node) -> None:
        free_cpu = self._indexed_cpu.pop(node.id, None)
        if free_cpu is None:
            return
        self.free_cpu -= free_cpu
        for key in node.term_keys():
            index = self._indexes.get(key)
            if index is not None:
                index.remove(free_cpu, node.id)

    def trim_indexes(self, limit: int) -> None:
        """Label-term indexes are built on demand; past ``limit`` drop them (but ALL)."""
        if len(self._indexes) > limit:
            self._indexes = {ALL: self._indexes[ALL]}

    def _index_for(self, key: str) -> _Index:
        index = self._indexes.get(key)
        if index is None:  # first job asking for this term: index it from now on
            index = self._indexes[key] = _Index()
            for node in self.nodes.values():
                if node.id in self._indexed_cpu and key in set(node.term_keys()):
                    index.add(self._indexed_cpu[node.id], node.id)
        return index

    # -- choosing --------------------------------------------------------------

    def choose(self, shape: Shape, priority: int = 0, job_ref: str = "") -> Node | None:
        """The node to place a job of this shape and priority on, or None if none fits now.

        Pool-label terms are tried in order; a later term only when no node of an
        earlier one fits; nodes matching no term only with ``unUseAntiOtherLabels``.
        A node held for a job of higher priority is passed over, and capacity a node keeps
        for another job that is preempting there is not free.
        """
        keys = [term_key(t) for t in shape.terms] if shape.terms else [ALL]
        if shape.terms and shape.anti:
            keys.append(ALL)
        for key in keys:
            node = self._pick(self._index_for(key), shape, priority, job_ref)
            if node is not None:
                return node
        return None

    def _pick(self, index: _Index, shape: Shape, priority: int, job_ref: str = "") -> Node | None:
        entries, req, nodes = index.entries, shape.req, self.nodes
        need_cpu = req.get(CPU, 0)
        start = bisect.bisect_left(entries, (need_cpu, ""))
        order: Iterable[int] = range(start, len(entries))
        if self.strategy == "spread":
            order = range(len(entries) - 1, start - 1, -1)
        for at in order:
            node = nodes[entries[at][1]]
            if (
                node.fits(req)
                and (not shape.selector or shape.selector_ok(node))
                and (node.hold is None or not node.held_against(shape.sig, priority) or node.kept_for(job_ref))
            ):
                kept = node.kept_from(job_ref) if node.taken is not None else None
                if kept and not node.fits({r: req.get(r, 0) + kept.get(r, 0) for r in {*req, *kept}}):
                    continue
                return node
        return None

    def to_hold(self, shape: Shape, priority: int) -> Node | None:
        """The node to hold for a job of this shape and priority that no node has room for
        now: one whose capacity could hold it (affinity allowing), not held by a job of the
        same or higher priority, the one it holds already if any, else the one with the
        largest share of the request free. None when no node could ever hold it."""
        best, best_score = None, -1.0
        now = now_ms()
        for node in self.nodes.values():
            if not node.schedulable or not shape.affinity_ok(node):
                continue
            if any(node.capacity.get(r, 0) < amount for r, amount in shape.req.items()):
                continue
            hold = node.hold
            if hold is not None and hold.until_ms > now:
                if hold.sig == shape.sig and hold.priority == priority:
                    return node
                if hold.priority >= priority:
                    continue
            score = sum(min(max(node.free(r), 0), a) / a for r, a in shape.req.items() if a > 0)
            if score > best_score or (score == best_score and best is not None and node.id < best.id):
                best, best_score = node, score
        return best

    # -- explaining ------------------------------------------------------------

    def reasons(self, shape: Shape, priority: int = 0) -> list[dict[str, Any]]:
        """Why no schedulable node fits: one entry per distinct reason, with node counts.

        Each node counts once, for the first check it fails: affinity, then CPU,
        Memory, GPU, then custom resources by name, then a hold for a job of higher
        priority (docs/placement.md).
        """
        schedulable = [n for n in self.nodes.values() if n.schedulable]
        if not schedulable:
            return [{"reason": NO_NODE, "units": 0, "requirement": None}]
        order = [r for r in (CPU, MEMORY, GPU) if r in shape.req] + sorted(
            r for r in shape.req if r not in DISPLAY_NAMES
        )
        counts: dict[tuple[int, int], int] = {}
        for node in schedulable:
            failed = _first_failure(node, shape, order)
            if failed is None and node.hold is not None and node.held_against(shape.sig, priority):
                failed = (len(order), 0)
            if failed is not None:
                counts[failed] = counts.get(failed, 0) + 1
        result = []
        for (position, kind), units in sorted(counts.items()):
            if position == -1:
                result.append({"reason": AFFINITY, "units": units, "requirement": affinity_requirement(shape)})
                continue
            if position == len(order):
                result.append({"reason": HELD, "units": units, "requirement": f"priority: {priority}"})
                continue
            resource = order[position]
            name = DISPLAY_NAMES.get(resource, resource)
            result.append(
                {"reason": f"{name}: {_KINDS[kind]}", "units": units, "requirement": f"{name}: {shape.show[resource]}"}
            )
        return result


_KINDS = ("Not Found", "Out Of Capacity", "Not Enough")


def _first_failure(node: Node, shape: Shape, order: list[str]) -> tuple[int, int] | None:
    if not shape.affinity_ok(node):
        return (-1, 0)
    for position, resource in enumerate(order):
        amount = shape.req[resource]
        capacity = node.capacity.get(resource, 0)
        if capacity <= 0:
            return (position, 0)
        if amount > capacity:
            return (position, 1)
        if amount > capacity - node.reserved.get(resource, 0):
            return (position, 2)
        uses = node.devices.get(resource)
        if uses is not None and allocate(uses, amount) is None:  # enough in all, but not on its devices
            return (position, 2)
    return None


def quota_reason(req: dict[str, int], limits: dict[str, int], usage: dict[str, int]) -> dict[str, Any] | None:
    """The reason a job waits on its tenant's quota, or None if the quota allows it.

    Rendered as openYuanrong renders a resource: ``CPU: 3000m/4000m`` (used/limit).
    """
    for resource, amount in req.items():
        limit = limits.get(resource)
        if limit is not None and usage.get(resource, 0) + amount > limit:
            name = DISPLAY_NAMES.get(resource, resource)
            used = usage.get(resource, 0)
            return {
                "reason": QUOTA,
                "units": 0,
                "requirement": f"{name}: {show_amount(resource, used)}/{show_amount(resource, limit)}",
            }
    return None


# -- the scheduling-failure message ----------------------------------------------


def _msg(name: str, *inner: str) -> str:
    return f"{name} {{ " + "".join(inner) + "} "


def _field(name: str, value: str) -> str:
    return f"{name}: {value} "


def _expression(key: str, value: str | None) -> str:
    op = _msg("exits") if value is None else _msg("in", _field("values", f'"{value}"'))
    return _msg("expressions", _field("key", f'"{key}"'), _msg("op", op))


def affinity_requirement(shape: Shape) -> str:
    """openYuanrong's rendering of the affinity a job asked for (protobuf text format).

    One ``subConditions`` per pool-label term, weights 100, 90, 80 ... (at least 10);
    label-selector pairs join every alternative as further expressions.
    """
    selector = [_expression(k, v) for k, v in shape.selector.items()]
    alternatives = [[_expression(k, v), *selector] for k, v in shape.terms] or [selector]
    subs = [
        _msg("subConditions", *exprs, _field("weight", str(max(100 - 10 * i, 10))))
        for i, exprs in enumerate(alternatives)
    ]
    condition = _msg("condition", *subs, _field("orderPriority", "true"))
    return _msg("resource", _msg("aff", condition), _msg("antiAff"))


def reason_lines(reasons: list[dict[str, Any]]) -> str:
    lines = []
    for reason in reasons:
        line = f"\t{reason['units']} unit with [{reason['reason']}]"
        if reason.get("requirement"):
            line += f" requirements: [{reason['requirement']}]"
        lines.append(line + ".\n")
    return "".join(lines)


def timeout_message(submission_id: str, timeout_ms: int, attempts: int, reasons: list[dict[str, Any]]) -> str:
    """The SCHEDULE_TIMEOUT message, in the form openYuanrong produces it (docs/placement.md)."""
    head = f"create app failed, submissionId:[{submission_id}], err: \nthe instance cannot be scheduled within {timeout_ms} ms. "
    if attempts == 0:
        return (
            head
            + "the possible cause is that the scheduling queue is busy or the scheduling timeout configuration is not proper."
        )
    return (
        head
        + f"which has been scheduled for {attempts} times. The latest failure: no available resource that meets "
        + "the request requirements, The reasons are as follows:\n"
        + reason_lines(reasons)
    )
