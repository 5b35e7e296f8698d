"""``validate_topology`` is vectorised (review 15, finding 3): it must refuse exactly
what the per-layer, per-edge loop it replaced refused, naming the same field, index,
message and reason, and read the edges from the wire exactly as from the messages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import Limits
from tamiyo.v1 import graph_pb2
from tamiyo.wire import varint
from tamiyo_server import graph_validation as gv
from tamiyo_server.graph_validation import (
    _LAYER_TYPES,
    MAX_PARAMETER_COUNT,
    TopologyInfo,
    ValidationError,
    check_id,
    validate_topology,
)

LIMITS = Limits(max_nodes_per_graph=8, max_edges_per_graph=300, max_id_chars=4)


def loop_validate_topology(topo: graph_pb2.Topology, limits: Limits, path: str) -> TopologyInfo:
    """The loop ``validate_topology`` was before it was vectorised (the reference)."""
    n = len(topo.layers)
    if n == 0:
        raise ValidationError(f"{path}.layers", "at least one layer is required", "missing")
    if n > limits.max_nodes_per_graph:
        raise ValidationError(
            f"{path}.layers", f"{n} layers > limit {limits.max_nodes_per_graph}", "too_large"
        )
    index: dict[str, int] = {}
    seeds: list[int] = []
    for i, layer in enumerate(topo.layers):
        p = f"{path}.layers[{i}]"
        check_id(layer.layer_id, f"{p}.layer_id", limits.max_id_chars)
        if layer.layer_id in index:
            raise ValidationError(
                f"{p}.layer_id",
                f"duplicate id {layer.layer_id!r} (also layers[{index[layer.layer_id]}])",
                "duplicate_id",
            )
        index[layer.layer_id] = i
        if layer.layer_type not in _LAYER_TYPES:
            raise ValidationError(
                f"{p}.layer_type", f"unknown value {layer.layer_type}", "out_of_range"
            )
        for name in ("input_size", "output_size"):
            if getattr(layer, name) < 1:
                raise ValidationError(f"{p}.{name}", "must be >= 1", "out_of_range")
        if layer.parameter_count > MAX_PARAMETER_COUNT:
            raise ValidationError(
                f"{p}.parameter_count",
                f"{layer.parameter_count} > {MAX_PARAMETER_COUNT}",
                "out_of_range",
            )
        if layer.seed_count > limits.max_seeds_per_layer:
            raise ValidationError(
                f"{p}.seed_count",
                f"{layer.seed_count} > limit {limits.max_seeds_per_layer}",
                "too_large",
            )
        seeds.append(layer.seed_count)
    m = len(topo.edges)
    if m > limits.max_edges_per_graph:
        raise ValidationError(
            f"{path}.edges", f"{m} edges > limit {limits.max_edges_per_graph}", "too_large"
        )
    seen: dict[tuple[int, int], int] = {}
    for j, edge in enumerate(topo.edges):
        p = f"{path}.edges[{j}]"
        for name in ("source", "target"):
            v = getattr(edge, name)
            if v >= n:
                raise ValidationError(f"{p}.{name}", f"{v} out of range for {n} layers", "bad_edge")
        if edge.source == edge.target:
            raise ValidationError(p, f"self loop on layer {edge.source}", "bad_edge")
        key = (edge.source, edge.target)
        if key in seen:
            raise ValidationError(p, f"duplicate of edges[{seen[key]}]", "bad_edge")
        seen[key] = j
    return TopologyInfo.build(index, seeds, m)


def outcome(
    fn: Callable[[graph_pb2.Topology, Limits, str], TopologyInfo], topo: graph_pb2.Topology
) -> tuple[object, ...]:
    try:
        info = fn(topo, LIMITS, "t")
    except ValidationError as err:
        return ("refused", err.field, str(err), err.reason)
    return ("ok", dict(info.layer_index), info.seed_counts, info.num_edges)


LAYER_FAULTS: dict[str, list[object]] = {
    "layer_id": ["", "abcde", "a\n", "l0", "l1"],  # empty, too long, control, repeats
    "layer_type": [0, -1, 8, 99],
    "input_size": [0],
    "output_size": [0],
    "parameter_count": [MAX_PARAMETER_COUNT + 1, 2**64 - 1],
    "seed_count": [65, 2**32 - 1],
}


@st.composite
def topologies(draw: st.DrawFn, many_edges: bool = False) -> graph_pb2.Topology:
    """Valid topologies (0-9 layers, so also none and too many) with 0-2 faults of
    any kind in the layers and 0-3 in the edges, anywhere."""
    topo = graph_pb2.Topology()
    n = draw(st.integers(0, 9))
    for i in range(n):
        topo.layers.add(
            layer_id=f"l{i}",
            layer_type=draw(st.integers(1, 7)),
            input_size=draw(st.sampled_from([1, 64])),
            output_size=draw(st.sampled_from([1, 64])),
            parameter_count=draw(st.sampled_from([0, 10, MAX_PARAMETER_COUNT])),
            seed_count=draw(st.sampled_from([0, 2, 64])),
        )
    for _ in range(draw(st.integers(0, 2)) if n else 0):
        name = draw(st.sampled_from(sorted(LAYER_FAULTS)))
        setattr(
            topo.layers[draw(st.integers(0, n - 1))],
            name,
            draw(st.sampled_from(LAYER_FAULTS[name])),
        )
    cap = 320 if many_edges else 14
    valid = [(s, t) for s in range(max(n, 1)) for t in range(max(n, 1)) if s != t]
    pairs = draw(st.lists(st.sampled_from(valid), max_size=cap, unique=True)) if valid else []
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(pairs)))
        kind = draw(st.sampled_from(["range", "loop", "repeat"]))
        if kind == "range":
            far = draw(st.sampled_from([n, n + 1, 2**31, 2**32 - 1]))
            fault = (far, 0) if draw(st.booleans()) else (0, far)
            fault = fault if draw(st.booleans()) else (far, far)
        elif kind == "loop":
            v = draw(st.integers(0, n + 1))
            fault = (v, v)
        elif pairs:
            fault = pairs[draw(st.integers(0, len(pairs) - 1))]
        else:
            continue
        pairs.insert(at, fault)
    for s, t in pairs:
        topo.edges.add(source=s, target=t)
    return topo


@settings(max_examples=400, deadline=None)
@given(topologies())
def test_same_outcome_as_the_loop(topo: graph_pb2.Topology) -> None:
    assert outcome(validate_topology, topo) == outcome(loop_validate_topology, topo)


@settings(max_examples=150, deadline=None)
@given(topologies(many_edges=True), st.sampled_from([0, gv.WIRE_EDGES_FROM]))
def test_same_outcome_as_the_loop_with_edges_from_the_wire(
    topo: graph_pb2.Topology, wire_from: int
) -> None:
    old = gv.WIRE_EDGES_FROM
    gv.WIRE_EDGES_FROM = wire_from
    try:
        assert outcome(validate_topology, topo) == outcome(loop_validate_topology, topo)
    finally:
        gv.WIRE_EDGES_FROM = old


def message_arrays(topo: graph_pb2.Topology) -> tuple[list[int], list[int]]:
    return [e.source for e in topo.edges], [e.target for e in topo.edges]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=40
    ),
    st.lists(st.text(max_size=200), max_size=4),
)
def test_edges_from_the_wire_are_the_messages_edges(
    pairs: list[tuple[int, int]], layer_ids: list[str]
) -> None:
    topo = graph_pb2.Topology()
    for lid in layer_ids:
        topo.layers.add(layer_id=lid, input_size=300, parameter_count=2**40)
    for s, t in pairs:
        topo.edges.add(source=s, target=t)
    got = gv._edges_from_wire(topo.SerializeToString(), len(pairs))
    assert got is not None
    assert (got[0].tolist(), got[1].tolist()) == message_arrays(topo)
    assert got[0].dtype == got[1].dtype == np.uint64


def _with_unknown_edge_field(extra: bytes) -> graph_pb2.Topology:
    """A topology whose second edge carries a field the schema does not know."""
    edge = graph_pb2.Edge(source=1, target=2).SerializeToString() + extra
    raw = (
        graph_pb2.Topology(layers=[graph_pb2.LayerSpec(layer_id="a")]).SerializeToString()
        + b"\x12\x04\x08\x03\x10\x04"
        + b"\x12"
        + varint(len(edge))
        + edge
    )
    return graph_pb2.Topology.FromString(raw)


@pytest.mark.parametrize(
    "extra",
    [
        b"\x18\x05",  # field 3, varint
        b"\x1a\x02\x08\x09",  # field 3, length-delimited (bytes that look like an Edge)
        b"\x25\x00\x00\x00\x00",  # field 4, fixed32
    ],
)
def test_an_unknown_field_sends_the_edges_to_the_message_path(extra: bytes) -> None:
    topo = _with_unknown_edge_field(extra)
    assert gv._edges_from_wire(topo.SerializeToString(), len(topo.edges)) is None
    old = gv.WIRE_EDGES_FROM
    gv.WIRE_EDGES_FROM = 0
    try:
        s, t = gv.edge_arrays(topo)
    finally:
        gv.WIRE_EDGES_FROM = old
    assert (s.tolist(), t.tolist()) == message_arrays(topo) == ([3, 1], [4, 2])


def test_a_maximal_topology_is_read_from_the_wire_and_accepted() -> None:
    limits = Limits()
    n = limits.max_nodes_per_graph
    topo = graph_pb2.Topology()
    for i in range(n):
        topo.layers.add(layer_id=f"layer-{i:04d}", layer_type=1, input_size=8, output_size=8)
    rng = np.random.default_rng(0)
    keys = rng.choice(n * n, size=limits.max_edges_per_graph * 2, replace=False)
    pairs = [(int(k // n), int(k % n)) for k in keys if k // n != k % n]
    for s, t in pairs[: limits.max_edges_per_graph]:
        topo.edges.add(source=s, target=t)
    got = gv._edges_from_wire(topo.SerializeToString(), len(topo.edges))
    assert got is not None
    info = validate_topology(topo, limits, "t")
    assert info.num_edges == limits.max_edges_per_graph
    topo.edges.add(source=pairs[7][0], target=pairs[7][1])  # one more: over the limit
    with pytest.raises(ValidationError, match="edges > limit"):
        validate_topology(topo, limits, "t")
    del topo.edges[-1]
    topo.edges[-1].source, topo.edges[-1].target = pairs[7]  # the last repeats edges[7]
    with pytest.raises(ValidationError) as err:
        validate_topology(topo, limits, "t")
    assert err.value.field == f"t.edges[{limits.max_edges_per_graph - 1}]"
    assert str(err.value).endswith("duplicate of edges[7]")
