"""worker/placement.py on its own: choosing a node, and explaining why none fits (docs/placement.md).

No Redis: jobs are normalised by ``JobStore.prepare`` (the exact path of an HTTP
submission, which validates and builds the placement shape without touching Redis)
and nodes are built in memory. Messages are compared whole, byte for byte, against
the form of docs/placement.md and the seed's example.
"""

from __future__ import annotations

import collections
import json
from decimal import Decimal
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from poolq.nodes import capacity_of
from poolq.settings import Settings
from poolq.store import JobStore
from tests.kit import GiB, MiB
from worker.placement import Inventory, Node, Shape, timeout_message

# prepare() validates and normalises a request; it never talks to Redis, so the client
# below is never connected.
_STORE = JobStore(redis.Redis(host="unused.invalid"), Settings())

BODY = {"entrypoint": "python job.py", "runtime_env": {"working_dir": "/srv/job"}}

HEAD = (
    "create app failed, submissionId:[app-t1], err: \n"
    "the instance cannot be scheduled within 1500 ms. which has been scheduled for 3 times. "
    "The latest failure: no available resource that meets the request requirements, "
    "The reasons are as follows:\n"
)

AFFINITY_ABC = (
    'resource { aff { condition { subConditions { expressions { key: "abc" op { exits { } } } weight: 100 } '
    "orderPriority: true } } antiAff { } } "
)


def job_shape(label: str | None = None, **fields: Any) -> Shape:
    """The placement shape of a job submitted with this body and X-Pool-Label.

    Fractional amounts are given as Decimal, as the API's JSON parser produces them.
    """
    job = _STORE.prepare({**BODY, **fields}, pool_label=label)
    return Shape.from_spec(job.shape_sig, json.loads(json.dumps(job.shape)))  # as stored in Redis


def node(
    node_id: str,
    cpus: Any = 8,
    memory: int = 16 * GiB,
    gpus: Any = 0,
    resources: dict[str, Any] | None = None,
    labels: dict[str, str | None] | None = None,
    used: dict[str, Any] | None = None,
    schedulable: bool = True,
) -> Node:
    """A node of pool ``p``; ``used`` is what is reserved, in human units (cpus, memory, gpus, NAME)."""
    used = dict(used or {})
    reserved = capacity_of(
        used.pop("cpus", 0), used.pop("memory", 0), used.pop("gpus", 0), {k: Decimal(str(v)) for k, v in used.items()}
    )
    return Node(
        id=node_id,
        pool="p",
        labels={**(labels or {}), "pool": "p"},
        capacity=capacity_of(cpus, memory, gpus, {k: Decimal(str(v)) for k, v in (resources or {}).items()}),
        reserved={k: v for k, v in reserved.items() if v},
        schedulable=schedulable,
    )


def inventory(*nodes: Node, strategy: str = "binpack") -> Inventory:
    inv = Inventory(strategy)
    for item in nodes:
        inv.upsert(item)
    return inv


def chosen(inv: Inventory, shape: Shape) -> str | None:
    found = inv.choose(shape)
    return None if found is None else found.id


def message(inv: Inventory, shape: Shape, attempts: int = 3) -> str:
    return timeout_message("app-t1", 1500, attempts, inv.reasons(shape))


# -- affinity (X-Pool-Label, label selector) ---------------------------------------


LABELLED = [
    node("plain", cpus=2),
    node("has-abc", cpus=4, labels={"abc": None}),
    node("abc-x", cpus=6, labels={"abc": "x"}),
    node("abc-y", cpus=8, labels={"abc": "y", "zone": "a"}),
    node("zone-a", cpus=3, labels={"zone": "a"}),
]


@pytest.mark.parametrize(
    ("label", "selector", "allowed"),
    [
        pytest.param("abc", None, {"has-abc", "abc-x", "abc-y"}, id="key-exists-with-or-without-value"),
        pytest.param("abc=x", None, {"abc-x"}, id="key-equals-value"),
        pytest.param("abc=z", None, set(), id="no-node-has-that-value"),
        pytest.param("nolabel", None, set(), id="nodes-matching-no-term-never-used"),
        pytest.param(None, None, {n.id for n in LABELLED}, id="no-header-any-node"),
        pytest.param("pool=p", None, {n.id for n in LABELLED}, id="pool-name-is-a-label"),
        pytest.param("pool=q", None, set(), id="other-pool"),
        pytest.param("zone=b,unUseAntiOtherLabels", None, {n.id for n in LABELLED}, id="anti-falls-back-to-any-node"),
        pytest.param("abc", {"zone": "a"}, {"abc-y"}, id="selector-and-pool-label"),
        pytest.param(None, {"zone": "a"}, {"abc-y", "zone-a"}, id="selector-alone"),
        pytest.param(
            "nolabel,unUseAntiOtherLabels", {"zone": "a"}, {"abc-y", "zone-a"}, id="selector-binds-last-resort"
        ),
        pytest.param("abc", {"zone": "b"}, set(), id="selector-matches-nothing"),
    ],
)
def test_affinity_decides_which_nodes_may_be_used(
    label: str | None, selector: dict[str, str] | None, allowed: set[str]
) -> None:
    shape = job_shape(label, entrypoint_num_cpus=1, **({"entrypoint_label_selector": selector} if selector else {}))
    usable = set()
    for candidate in LABELLED:  # try each node alone: is it usable?
        if chosen(inventory(candidate), shape) is not None:
            usable.add(candidate.id)
    assert usable == allowed
    picked = chosen(inventory(*LABELLED), shape)
    assert (picked in allowed) if allowed else picked is None


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param({"cpus": 8}, {"cpus": 2}, "first", id="first-term-fits-though-second-is-tighter"),
        pytest.param({"cpus": 8, "used": {"cpus": 8}}, {"cpus": 2}, "second", id="first-term-node-full"),
        pytest.param({"cpus": 8, "memory": 64 * MiB}, {"cpus": 2}, "second", id="first-term-node-lacks-memory"),
        pytest.param({"cpus": 8, "schedulable": False}, {"cpus": 2}, "second", id="first-term-node-dead"),
        pytest.param({"cpus": 1}, {"cpus": 1}, None, id="neither-fits"),
    ],
)
def test_ordered_terms_fall_to_the_next_only_when_no_node_of_the_earlier_fits(
    first: dict[str, Any], second: dict[str, Any], expected: str | None
) -> None:
    inv = inventory(
        node("first", labels={"gpu-pool": None}, **first),
        node("second", labels={"cpu-pool": "big"}, **second),
        node("other", cpus=2),
    )
    assert chosen(inv, job_shape("gpu-pool, cpu-pool=big", entrypoint_num_cpus=2)) == expected


@pytest.mark.parametrize(
    ("labelled_used", "expected"),
    [
        pytest.param(0, "labelled", id="matching-node-preferred-over-tighter-other"),
        pytest.param(8, "other", id="other-node-is-the-last-resort"),
    ],
)
def test_unuse_anti_other_labels_makes_non_matching_nodes_the_last_resort(labelled_used: int, expected: str) -> None:
    inv = inventory(node("labelled", cpus=8, labels={"abc": None}, used={"cpus": labelled_used}), node("other", cpus=2))
    assert chosen(inv, job_shape("abc,unUseAntiOtherLabels", entrypoint_num_cpus=2)) == expected
    assert chosen(inv, job_shape("abc", entrypoint_num_cpus=2)) == ("labelled" if labelled_used == 0 else None)


def test_zero_requests_ask_for_nothing() -> None:
    """The seed asks for {"NPU": 0}: a node without NPUs (and without GPUs) still fits."""
    inv = inventory(node("n1", cpus=4, memory=1 * GiB))
    assert (
        chosen(
            inv,
            job_shape(
                entrypoint_num_cpus=3,
                entrypoint_memory=134217728,
                entrypoint_num_gpus=0,
                entrypoint_resources={"NPU": 0},
            ),
        )
        == "n1"
    )


# -- scoring ----------------------------------------------------------------------


SCORING_NODES = [
    node("free-8", cpus=8),
    node("free-2-of-16", cpus=16, used={"cpus": 14}),
    node("free-4", cpus=4),
    node("free-1", cpus=1),
    node("free-3-no-memory", cpus=3, memory=256 * MiB),
    node("free-12-drained", cpus=12, schedulable=False),
]


@pytest.mark.parametrize(
    ("strategy", "cpus", "expected"),
    [
        pytest.param("binpack", 2, "free-2-of-16", id="binpack-tightest-fit"),
        pytest.param("binpack", 3, "free-4", id="binpack-skips-tight-node-without-memory"),
        pytest.param("binpack", "0.5", "free-1", id="binpack-smallest-node"),
        pytest.param("spread", 2, "free-8", id="spread-most-free"),
        pytest.param("spread", 9, None, id="spread-nothing-big-enough"),
    ],
)
def test_scorer(strategy: str, cpus: Any, expected: str | None) -> None:
    inv = inventory(*SCORING_NODES, strategy=strategy)
    assert chosen(inv, job_shape(entrypoint_num_cpus=Decimal(cpus), entrypoint_memory=512 * MiB)) == expected


@pytest.mark.parametrize("strategy", ["binpack", "spread"])
def test_local_reservations_steer_the_next_choice(strategy: str) -> None:
    """Each choice sees the reservations of the choices before it (one placement round)."""
    a, b = node("a", cpus=4), node("b", cpus=6, used={"cpus": 1})
    inv = inventory(a, b, strategy=strategy)
    shape = job_shape(entrypoint_num_cpus=1)
    picks = 0
    while (found := inv.choose(shape)) is not None:
        frees = {n.id: n.capacity["CPU"] - n.reserved.get("CPU", 0) for n in (a, b)}
        fitting = [free for free in frees.values() if free >= 1000]
        assert frees[found.id] == (min(fitting) if strategy == "binpack" else max(fitting))
        inv.reserve(found, shape.req)
        picks += 1
    assert picks == 9  # 4 + 5 free CPUs, never more
    assert a.reserved["CPU"] == 4000 and b.reserved["CPU"] == 6000


def test_the_view_knows_the_free_cpu_of_its_schedulable_nodes() -> None:
    """What bounds a round's claim (scheduler.claim_size): reservations, undoing them,
    replacing and removing nodes move it; a drained node's CPU is not in it."""
    a, b = node("a", cpus=4), node("b", cpus=6, used={"cpus": 1})
    inv = inventory(a, b, node("drained", cpus=16, schedulable=False))
    assert inv.free_cpu == 9000
    shape = job_shape(entrypoint_num_cpus=1)
    devices = inv.reserve(a, shape.req)
    assert inv.free_cpu == 8000
    inv.unreserve(a, shape.req, devices)
    assert inv.free_cpu == 9000
    inv.upsert(node("b", cpus=2))
    assert inv.free_cpu == 6000
    inv.remove("a")
    inv.remove("gone")
    assert inv.free_cpu == 2000


# -- the scheduling-failure message -------------------------------------------------


SEED_ABC_FAILURE = json.loads(
    # The seed's example response (seeds/000_*.txt), as the JSON string it shows.
    r'"create app failed, submissionId:[app-xxxxx], err: \nthe instance cannot be scheduled within 18000 ms. '
    r"which has been scheduled for 2 times. The latest failure: no available resource that meets the request "
    r"requirements, The reasons are as follows:\n\t1 unit with [Affinity can't be Satisfied] requirements: "
    r"[resource { aff { condition { subConditions { expressions { key: \"abc\" op { exits { } } } weight: 100 } "
    r'orderPriority: true } } antiAff { } } ].\n"'
)


def test_seed_affinity_failure_byte_for_byte() -> None:
    seed_body = {
        "entrypoint_num_cpus": 3,
        "entrypoint_memory": 134217728,
        "entrypoint_resources": {"NPU": 0},
        "metadata": {"ttl": "1250"},
        "submission_id": "app-1234",
    }
    shape = job_shape("abc", **seed_body)
    inv = inventory(node("unlabelled", cpus=8, memory=4 * GiB))
    assert inv.choose(shape) is None
    assert timeout_message("app-xxxxx", 18000, 2, inv.reasons(shape)) == SEED_ABC_FAILURE


# A job asking for every kind of resource; each case is one node failing one check.
FULL_REQUEST = {
    "entrypoint_num_cpus": 3,
    "entrypoint_memory": 134217728,
    "entrypoint_num_gpus": 2,
    "entrypoint_resources": {"NPU": 9},
}
ROOMY = {"cpus": 8, "memory": 4 * GiB, "gpus": 4, "resources": {"NPU": 16}}


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        pytest.param({"cpus": 0}, "[CPU: Not Found] requirements: [CPU: 3000m]", id="cpu-not-found"),
        pytest.param({"cpus": 2}, "[CPU: Out Of Capacity] requirements: [CPU: 3000m]", id="cpu-out-of-capacity"),
        pytest.param(
            {"cpus": 4, "used": {"cpus": "1.5"}}, "[CPU: Not Enough] requirements: [CPU: 3000m]", id="cpu-not-enough"
        ),
        pytest.param({"memory": 0}, "[Memory: Not Found] requirements: [Memory: 128MB]", id="memory-not-found"),
        pytest.param(
            {"memory": 64 * MiB}, "[Memory: Out Of Capacity] requirements: [Memory: 128MB]", id="memory-out-of-capacity"
        ),
        pytest.param(
            {"memory": 256 * MiB, "used": {"memory": 200 * MiB}},
            "[Memory: Not Enough] requirements: [Memory: 128MB]",
            id="memory-not-enough",
        ),
        pytest.param({"gpus": 0}, "[GPU: Not Found] requirements: [GPU: 2]", id="gpu-not-found"),
        pytest.param({"gpus": 1}, "[GPU: Out Of Capacity] requirements: [GPU: 2]", id="gpu-out-of-capacity"),
        pytest.param({"gpus": 4, "used": {"gpus": 3}}, "[GPU: Not Enough] requirements: [GPU: 2]", id="gpu-not-enough"),
        pytest.param({"resources": {}}, "[NPU: Not Found] requirements: [NPU: 9]", id="npu-not-found"),
        pytest.param({"resources": {"NPU": 0}}, "[NPU: Not Found] requirements: [NPU: 9]", id="npu-zero-is-not-found"),
        pytest.param(
            {"resources": {"NPU": 8}}, "[NPU: Out Of Capacity] requirements: [NPU: 9]", id="npu-out-of-capacity"
        ),
        pytest.param(
            {"resources": {"NPU": 16}, "used": {"NPU": 8}},
            "[NPU: Not Enough] requirements: [NPU: 9]",
            id="npu-not-enough",
        ),
    ],
)
def test_each_resource_short_on_its_own(overrides: dict[str, Any], line: str) -> None:
    shape = job_shape(**FULL_REQUEST)
    inv = inventory(node("n1", **{**ROOMY, **overrides}))
    assert inv.choose(shape) is None
    assert message(inv, shape) == HEAD + f"\t1 unit with {line}.\n"


def test_mixed_reasons_count_each_live_node_once_in_order() -> None:
    shape = job_shape(
        "abc",
        entrypoint_num_cpus=3,
        entrypoint_memory=134217728,
        entrypoint_num_gpus=2,
        entrypoint_resources={"NPU": 9, "FPGA": 1},
    )
    good = {"cpus": 8, "memory": 4 * GiB, "gpus": 4, "resources": {"NPU": 16, "FPGA": 2}, "labels": {"abc": None}}
    inv = inventory(
        node("gpu-missing", **{**good, "gpus": 0}),
        node("unlabelled", **{**good, "labels": {"zone": "a"}}),
        node("npu-small", **{**good, "resources": {"NPU": 8, "FPGA": 2}}),
        node("cpu-small", **{**good, "cpus": 2}),
        node("cpu-and-memory-small", **{**good, "cpus": 2, "memory": 64 * MiB}),  # counts once, for CPU
        node("memory-busy", **{**good, "used": {"memory": 4 * GiB - 100 * MiB}}),
        node("fpga-missing", **{**good, "resources": {"NPU": 16}}),
        node("dead-but-roomy", **good, schedulable=False),  # dead and drained nodes are not counted
        node("drained-unlabelled", cpus=1, schedulable=False),
    )
    assert inv.choose(shape) is None
    assert message(inv, shape) == HEAD + (
        f"\t1 unit with [Affinity can't be Satisfied] requirements: [{AFFINITY_ABC}].\n"
        "\t2 unit with [CPU: Out Of Capacity] requirements: [CPU: 3000m].\n"
        "\t1 unit with [Memory: Not Enough] requirements: [Memory: 128MB].\n"
        "\t1 unit with [GPU: Not Found] requirements: [GPU: 2].\n"
        "\t1 unit with [FPGA: Not Found] requirements: [FPGA: 1].\n"
        "\t1 unit with [NPU: Out Of Capacity] requirements: [NPU: 9].\n"
    )


@pytest.mark.parametrize(
    ("request_fields", "missing", "line"),
    [
        pytest.param(
            {"entrypoint_num_cpus": Decimal("0.3")},
            {"cpus": 0},
            "[CPU: Not Found] requirements: [CPU: 300m]",
            id="cpu-fraction",
        ),
        pytest.param(
            {"entrypoint_num_cpus": Decimal("4.03")},
            {"cpus": 0},
            "[CPU: Not Found] requirements: [CPU: 4030m]",
            id="cpu-exact-decimal",
        ),
        pytest.param(
            {"entrypoint_memory": 134217729},
            {"memory": 0},
            "[Memory: Not Found] requirements: [Memory: 129MB]",
            id="memory-rounded-up",
        ),
        pytest.param(
            {"entrypoint_memory": 3 * GiB // 2},
            {"memory": 0},
            "[Memory: Not Found] requirements: [Memory: 1536MB]",
            id="memory-in-mib",
        ),
        pytest.param(
            {"entrypoint_num_gpus": Decimal("0.5")},
            {"gpus": 0},
            "[GPU: Not Found] requirements: [GPU: 0.5]",
            id="gpu-fraction",
        ),
        pytest.param(
            {"entrypoint_resources": {"NPU": Decimal("2.5")}},
            {},
            "[NPU: Not Found] requirements: [NPU: 2.5]",
            id="custom-fraction",
        ),
        pytest.param(
            {"entrypoint_resources": {"npu_v2": 1}},
            {},
            "[npu_v2: Not Found] requirements: [npu_v2: 1]",
            id="custom-name-as-submitted",
        ),
    ],
)
def test_request_rendering(request_fields: dict[str, Any], missing: dict[str, Any], line: str) -> None:
    shape = job_shape(**request_fields)
    inv = inventory(node("n1", **{"cpus": 8, "memory": 4 * GiB, "gpus": 4, **missing}))
    assert message(inv, shape) == HEAD + f"\t1 unit with {line}.\n"


def _sub(term: str, weight: int) -> str:
    key, _, value = term.partition("=")
    op = "exits { } " if not value else f'in {{ values: "{value}" }} '
    return f'subConditions {{ expressions {{ key: "{key}" op {{ {op}}} }} weight: {weight} }} '


def _affinity_line(units: int, terms: list[str], weights: list[int]) -> str:
    subs = "".join(_sub(t, w) for t, w in zip(terms, weights, strict=True))
    return f"\t{units} unit with [Affinity can't be Satisfied] requirements: [resource {{ aff {{ condition {{ {subs}orderPriority: true }} }} antiAff {{ }} }} ].\n"


@pytest.mark.parametrize(
    ("terms", "weights"),
    [
        pytest.param(["abc"], [100], id="one-term"),
        pytest.param(["abc=v"], [100], id="key-value"),
        pytest.param(["gpu", "zone=b", "x.y/z"], [100, 90, 80], id="three-terms"),
        pytest.param(
            [f"t{i}" for i in range(12)],
            [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 10, 10],
            id="twelve-terms-weight-floor",
        ),
    ],
)
def test_affinity_requirement_rendering(terms: list[str], weights: list[int]) -> None:
    shape = job_shape(" , ".join(terms), entrypoint_num_cpus=1)
    inv = inventory(node("n1", labels={"other": None}), node("n2"))
    assert message(inv, shape) == HEAD + _affinity_line(2, terms, weights)


def test_key_value_term_rendering_exact() -> None:
    shape = job_shape("abc=v", entrypoint_num_cpus=1)
    assert message(inventory(node("n1")), shape) == HEAD + (
        "\t1 unit with [Affinity can't be Satisfied] requirements: [resource { aff { condition { subConditions { "
        'expressions { key: "abc" op { in { values: "v" } } } weight: 100 } orderPriority: true } } antiAff { } } ].\n'
    )


@pytest.mark.parametrize(
    "nodes",
    [
        pytest.param([], id="no-nodes"),
        pytest.param(
            [node("dead", schedulable=False), node("drained", cpus=64, schedulable=False)], id="only-dead-or-drained"
        ),
    ],
)
def test_no_available_node(nodes: list[Node]) -> None:
    shape = job_shape("abc", entrypoint_num_cpus=1)
    inv = inventory(*nodes)
    assert inv.choose(shape) is None
    assert message(inv, shape) == HEAD + "\t0 unit with [No Available Node].\n"


def test_no_attempt_variant() -> None:
    assert timeout_message("app-t1", 1500, 0, []) == (
        "create app failed, submissionId:[app-t1], err: \nthe instance cannot be scheduled within 1500 ms. "
        "the possible cause is that the scheduling queue is busy or the scheduling timeout configuration is not proper."
    )


# -- properties: choose and reasons against a brute-force reading of docs/placement.md -------

LABEL_KEYS = ["a", "b", "zone"]
LABEL_VALUES = [None, "x", "y"]
CUSTOM = ["NPU", "FPGA"]


def _amounts() -> st.SearchStrategy[dict[str, int]]:
    """Some of CPU (0-4), memory (0-4 x 128 MiB), GPU (0-4), NPU and FPGA (0-4), as stored."""
    units = st.integers(0, 4)
    return st.fixed_dictionaries(
        {},
        optional={
            "CPU": units.map(lambda v: v * 1000),
            "memory": units.map(lambda v: v * 128 * MiB),
            "GPU": units.map(lambda v: v * 1000),
            **{name: units.map(lambda v: v * 1000) for name in CUSTOM},
        },
    )


def _node_strategy(index: int) -> st.SearchStrategy[Node]:
    def build(labels: dict[str, str | None], cap: dict[str, int], used: dict[str, int], schedulable: bool) -> Node:
        return Node(
            id=f"n{index}",
            pool="p",
            labels={**labels, "pool": "p"},
            capacity=cap,
            reserved={k: min(v, cap.get(k, 0)) for k, v in used.items()},
            schedulable=schedulable,
        )

    labels = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)
    return st.builds(build, labels, _amounts(), _amounts(), st.sampled_from([True, True, True, False]))


def _label_strategy() -> st.SearchStrategy[str | None]:
    term = st.tuples(st.sampled_from(LABEL_KEYS + ["c"]), st.sampled_from(LABEL_VALUES)).map(
        lambda kv: kv[0] if kv[1] is None else f"{kv[0]}={kv[1]}"
    )
    return st.none() | st.builds(
        lambda terms, anti: ",".join(terms + (["unUseAntiOtherLabels"] if anti else [])),
        st.lists(term, min_size=1, max_size=3),
        st.booleans(),
    )


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[list[Node], Shape, str]:
    nodes = [draw(_node_strategy(i)) for i in range(draw(st.integers(0, 6)))]
    fields: dict[str, Any] = {
        "entrypoint_num_cpus": draw(st.integers(1, 4)),
        "entrypoint_memory": draw(st.integers(1, 3)) * 128 * MiB,
        "entrypoint_num_gpus": draw(st.integers(0, 3)),
        "entrypoint_resources": draw(st.dictionaries(st.sampled_from(CUSTOM), st.integers(0, 3), max_size=2)),
    }
    if draw(st.booleans()):
        fields["entrypoint_label_selector"] = {"zone": draw(st.sampled_from(["x", "y"]))}
    shape = job_shape(draw(_label_strategy()), **fields)
    return nodes, shape, draw(st.sampled_from(["binpack", "spread"]))


def _oracle_affinity(item: Node, shape: Shape, term: tuple[str, str | None] | None) -> bool:
    if any(k not in item.labels or item.labels[k] != v for k, v in shape.selector.items()):
        return False
    if term is None:
        return True
    key, value = term
    return key in item.labels and (value is None or item.labels[key] == value)


def _oracle_free(item: Node, resource: str) -> int:
    return item.capacity.get(resource, 0) - item.reserved.get(resource, 0)


def _oracle_tier(nodes: list[Node], shape: Shape) -> list[Node]:
    """The nodes the job may go to now: those of the first term with a fitting node."""
    fitting = [n for n in nodes if n.schedulable and all(_oracle_free(n, r) >= a for r, a in shape.req.items())]
    terms: list[tuple[str, str | None] | None] = list(shape.terms) if shape.terms else [None]
    if shape.terms and shape.anti:
        terms.append(None)
    for term in terms:
        tier = [n for n in fitting if _oracle_affinity(n, shape, term)]
        if tier:
            return tier
    return []


def _oracle_reasons(nodes: list[Node], shape: Shape) -> collections.Counter[str]:
    order = [r for r in ("CPU", "memory", "GPU") if r in shape.req] + sorted(
        r for r in shape.req if r not in ("CPU", "memory", "GPU")
    )
    names = {"CPU": "CPU", "memory": "Memory", "GPU": "GPU"}
    counts: collections.Counter[str] = collections.Counter()
    for item in nodes:
        if not item.schedulable:
            continue
        selector_ok = _oracle_affinity(item, shape, None)
        term_ok = not shape.terms or shape.anti or any(_oracle_affinity(item, shape, t) for t in shape.terms)
        if not (selector_ok and term_ok):
            counts["Affinity can't be Satisfied"] += 1
            continue
        for resource in order:
            cap, need = item.capacity.get(resource, 0), shape.req[resource]
            kind = (
                "Not Found"
                if cap <= 0
                else "Out Of Capacity"
                if need > cap
                else "Not Enough"
                if need > _oracle_free(item, resource)
                else None
            )
            if kind:
                counts[f"{names.get(resource, resource)}: {kind}"] += 1
                break
    return counts


def _rank(reason: str) -> tuple[int, str]:
    if reason == "Affinity can't be Satisfied":
        return (0, "")
    name = reason.split(":")[0]
    return ({"CPU": 1, "Memory": 2, "GPU": 3}.get(name, 4), name if name not in ("CPU", "Memory", "GPU") else "")


@pytest.mark.slow
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios())
def test_choose_and_reasons_agree_with_the_contract(scenario: tuple[list[Node], Shape, str]) -> None:
    nodes, shape, strategy = scenario
    inv = inventory(*nodes, strategy=strategy)
    picked = inv.choose(shape)
    tier = _oracle_tier(nodes, shape)
    if tier:
        assert picked is not None and picked.id in {n.id for n in tier}
        frees = [_oracle_free(n, "CPU") for n in tier]
        assert _oracle_free(picked, "CPU") == (min(frees) if strategy == "binpack" else max(frees))
        return
    assert picked is None
    reasons = inv.reasons(shape)
    live = sum(n.schedulable for n in nodes)
    if live == 0:
        assert reasons == [{"reason": "No Available Node", "units": 0, "requirement": None}]
        return
    assert sum(r["units"] for r in reasons) == live
    assert len({r["reason"] for r in reasons}) == len(reasons)  # one line per distinct reason
    assert collections.Counter({r["reason"]: r["units"] for r in reasons}) == _oracle_reasons(nodes, shape)
    ranks = [_rank(r["reason"]) for r in reasons]
    assert ranks == sorted(ranks)


@pytest.mark.slow
@hypothesis_settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios(), st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=6))
def test_the_view_stays_consistent_as_nodes_fill_and_change(
    scenario: tuple[list[Node], Shape, str], changes: list[tuple[int, bool]]
) -> None:
    """Choose-and-reserve until full, with nodes drained, revived or removed in between."""
    nodes, shape, strategy = scenario
    inv = inventory(*nodes, strategy=strategy)
    current = {n.id: n for n in nodes}
    for step in range(40):
        if changes and step % 3 == 0:
            index, schedulable = changes.pop()
            node_id = f"n{index}"
            if node_id in current and index % 2 == 0 and not schedulable:
                inv.remove(node_id)
                del current[node_id]
            elif node_id in current:
                old = current[node_id]
                current[node_id] = Node(
                    old.id, old.pool, dict(old.labels), dict(old.capacity), dict(old.reserved), schedulable
                )
                inv.upsert(current[node_id])
        tier = _oracle_tier(list(current.values()), shape)
        picked = inv.choose(shape)
        if not tier:
            assert picked is None
            if not changes:
                break
            continue
        assert picked is not None and picked.id in {n.id for n in tier}
        inv.reserve(picked, shape.req)
        assert all(_oracle_free(picked, r) >= 0 for r in shape.req)
