"""A SessionOpen's topology is read once (review 15, finding 3): validation keeps the
arrays it decoded (``TopologyInfo.arrays``) and the session's ``GraphTopology`` is built
from them. It must equal ``GraphTopology.from_proto`` of the message exactly: the same
arrays (dtype, shape, order, read-only) and the same ``key``, which keys the
featurizer's caches. ``validate_kernels`` checks the kernels together and must refuse
exactly what its one-by-one loop refuses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import Limits
from tamiyo.policy.feature_schema import FEATURE_SCHEMA
from tamiyo.policy.rules import DecisionRules
from tamiyo.policy.snapshot import GraphTopology, snapshot_from_state
from tamiyo.v1 import graph_pb2
from tamiyo_server import graph_validation as gv
from tamiyo_server.graph_validation import (
    _LAYER_TYPES,
    MAX_PARAMETER_COUNT,
    TopologyInfo,
    ValidationError,
    all_printable,
    validate_kernels,
    validate_topology,
)
from tamiyo_server.session import Session
from tamiyo_server.validation import validate_session_open
from tests.server import hosts

LIMITS = Limits()
ARRAYS = (
    "layer_types",
    "input_sizes",
    "output_sizes",
    "parameter_counts",
    "seed_counts",
    "edge_index",
)


def assert_same_topology(got: GraphTopology, want: GraphTopology) -> None:
    assert got.layer_ids == want.layer_ids
    assert got.key == want.key
    for name in ARRAYS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a.dtype, a.shape, a.strides) == (b.dtype, b.shape, b.strides), name
        assert np.array_equal(a, b), name
        assert not a.flags.writeable, name
        assert a.flags.c_contiguous, name


_IDS = st.text(min_size=1, max_size=12).filter(str.isprintable)


@st.composite
def valid_topologies(draw: st.DrawFn) -> graph_pb2.Topology:
    """Valid topologies: 1-24 layers with any valid field values (non-ASCII ids too),
    0..all possible edges in any order (so also enough for the wire path)."""
    n = draw(st.integers(1, 24))
    ids = draw(st.lists(_IDS, min_size=n, max_size=n, unique=True))
    topo = graph_pb2.Topology()
    for lid in ids:
        topo.layers.add(
            layer_id=lid,
            layer_type=draw(st.sampled_from(sorted(_LAYER_TYPES))),
            input_size=draw(st.sampled_from([1, 127, 128, 2**32 - 1])),
            output_size=draw(st.integers(1, 2**32 - 1)),
            parameter_count=draw(st.sampled_from([0, 1, 2**40, MAX_PARAMETER_COUNT])),
            seed_count=draw(st.integers(0, LIMITS.max_seeds_per_layer)),
        )
    pairs = [(s, t) for s in range(n) for t in range(n) if s != t]
    if pairs:
        many = draw(st.booleans())
        k = draw(st.integers(0, len(pairs))) if many else draw(st.integers(0, 6))
        chosen = draw(st.permutations(pairs))[:k]
        for s, t in chosen:
            topo.edges.add(source=s, target=t)
    return topo


@settings(max_examples=300, deadline=None)
@given(valid_topologies(), st.sampled_from([0, gv.WIRE_EDGES_FROM, 10**9]))
def test_the_topology_from_the_validated_arrays_is_the_messages(
    topo: graph_pb2.Topology, wire_from: int
) -> None:
    old = gv.WIRE_EDGES_FROM
    gv.WIRE_EDGES_FROM = wire_from
    try:
        info = validate_topology(topo, LIMITS, "t")
    finally:
        gv.WIRE_EDGES_FROM = old
    assert info.arrays is not None
    want = GraphTopology.from_proto(topo)
    assert_same_topology(info.graph_topology(topo), want)
    # also through a serialization round trip (what the server decodes)
    again = graph_pb2.Topology.FromString(topo.SerializeToString())
    assert_same_topology(validate_topology(again, LIMITS, "t").graph_topology(again), want)
    assert info.seed_array is info.arrays.seed_counts  # (shared, not copied)
    assert info.seed_counts == tuple(want.seed_counts.tolist())


def test_without_arrays_the_message_is_read() -> None:
    topo = hosts.topology(5)
    info = TopologyInfo.build({f"l{i}": i for i in range(5)}, [2] * 5, len(topo.edges))
    assert info.arrays is None
    assert_same_topology(info.graph_topology(topo), GraphTopology.from_proto(topo))


@pytest.mark.parametrize("n", [1, 6, 300])
def test_a_session_gets_the_topology_of_its_message(n: int) -> None:
    msg = hosts.session_open(n).session_open
    info = validate_session_open(msg, LIMITS)
    s = Session.open(msg, info, DecisionRules(), 0.01, LIMITS)
    assert_same_topology(s.window.topology, GraphTopology.from_proto(msg.topology))
    state = hosts.topology(n)
    snap = snapshot_from_state(
        graph_pb2.ModelGraphState(topology=state, kernels=hosts.KERNELS),
        FEATURE_SCHEMA.window,
        topology=info.graph_topology(msg.topology),
    )
    want = snapshot_from_state(
        graph_pb2.ModelGraphState(topology=state, kernels=hosts.KERNELS), FEATURE_SCHEMA.window
    )
    assert snap.equals(want)


KERNEL_FAULTS: dict[str, list[object]] = {
    "kernel_id": ["", "abcde", "a\n", "\x7f", "k0", "k1", "é\u2028"],  # empty, long, ...
    "parameter_count": [MAX_PARAMETER_COUNT + 1, 2**64 - 1],
}


@st.composite
def kernel_lists(draw: st.DrawFn) -> list[graph_pb2.KernelSpec]:
    """0-6 valid kernels with 0-2 faults of any kind anywhere."""
    ks = [
        graph_pb2.KernelSpec(
            kernel_id=draw(st.sampled_from([f"k{i}", f"é{i}"])),
            parameter_count=draw(st.sampled_from([0, 7, MAX_PARAMETER_COUNT])),
        )
        for i in range(draw(st.integers(0, 6)))
    ]
    for _ in range(draw(st.integers(0, 2)) if ks else 0):
        name = draw(st.sampled_from(sorted(KERNEL_FAULTS)))
        setattr(
            ks[draw(st.integers(0, len(ks) - 1))], name, draw(st.sampled_from(KERNEL_FAULTS[name]))
        )
    return ks


def _kernel_outcome(
    fn: Callable[[list[graph_pb2.KernelSpec], Limits, str], None],
    ks: list[graph_pb2.KernelSpec],
    limits: Limits,
) -> tuple[object, ...]:
    try:
        fn(ks, limits, "k")
    except ValidationError as err:
        return ("refused", err.field, str(err), err.reason)
    return ("ok",)


@settings(max_examples=400, deadline=None)
@given(kernel_lists(), st.sampled_from([4, 128]), st.sampled_from([3, 64]))
def test_kernels_are_refused_as_by_the_loop(
    ks: list[graph_pb2.KernelSpec], max_id_chars: int, max_kernels: int
) -> None:
    limits = Limits(max_id_chars=max_id_chars, max_kernels=max_kernels)
    got = _kernel_outcome(validate_kernels, ks, limits)
    if len(ks) <= max_kernels:
        assert got == _kernel_outcome(gv._check_kernels, ks, limits)
    else:
        assert got[0] == "refused"
        assert got[3] == "too_large"


def test_all_printable_is_isprintable() -> None:
    for c in map(chr, [*range(0x300), 0x2028, 0x2029, 0xAD, 0xFEFF, 0x1F600]):
        text = f"ab{c}cd"
        assert all_printable(text) == text.isprintable(), hex(ord(c))
    assert all_printable("")
