"""Validation of a model graph and its parts: topology, kernels, one health signal.

Why a module of its own: these are the building blocks every message check uses (a
SessionOpen declares a topology and kernels, a frame and a Decide state carry signals),
and ``TopologyInfo`` is what a validated topology leaves behind for the checks of the
session's later frames. The message-level checks are in ``tamiyo_server.validation``,
which re-exports these names. Every check raises :class:`ValidationError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tamiyo.config import Limits
from tamiyo.policy.snapshot import INT_FIELDS, GraphTopology
from tamiyo.signal_columns import FrameLayout, full_frame_layout
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.wire import varint_tail
from tamiyo_server.signal_checks import ACTIVE, SEED_STATES, SIGNAL_RANGES, TOTAL, UNBOUNDED

_LAYER_TYPES = frozenset(graph_pb2.LayerType.values())
_LAYER_TYPE_VALUES = np.array(sorted(_LAYER_TYPES), np.int64)
_TYPE_LO, _TYPE_HI = int(_LAYER_TYPE_VALUES[0]), int(_LAYER_TYPE_VALUES[-1])
# the known values are one range (0..7): two comparisons instead of np.isin (~25 µs)
_TYPES_CONTIGUOUS = len(_LAYER_TYPE_VALUES) == _TYPE_HI - _TYPE_LO + 1
# uint64 counts must fit the featurizer's int64 arrays; 2**53 (exact in float64) is far
# beyond any real layer (the largest models have ~2**41 parameters in all).
MAX_PARAMETER_COUNT = 2**53


VALIDATION_REASONS = (
    "bad_edge",
    "bad_id",
    "bad_length",
    "conflicting_fields",
    "duplicate_id",
    "missing",
    "non_finite",
    "out_of_range",
    "step_regressed",
    "too_large",
    "unknown_layer",
)
"""Every ``ValidationError.reason``: the ``reason`` label values of
``tamiyo_rejected_inputs_total`` that validation gives (declared, so the metric exports
each at 0 from the start and the metrics reference lists them)."""


class ValidationError(ValueError):
    """One refused field. ``field`` is the dotted path, ``reason`` a metric label (one of
    ``VALIDATION_REASONS``; another is a programming error, refused here so that an
    alert on the metric never misses an undeclared label)."""

    def __init__(self, field: str, message: str, reason: str) -> None:
        if reason not in VALIDATION_REASONS:
            raise ValueError(f"ValidationError reason {reason!r} is not in VALIDATION_REASONS")
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, eq=False)
class TopologyArrays:
    """A validated topology's layer fields and edges as validation decoded them (int64,
    read-only; ``edge_index`` [2, E]): ``topology()`` builds the ``GraphTopology`` from
    them, equal to ``GraphTopology.from_proto`` of the message (same arrays, same key)
    without reading its layers and edges a second time (~1.7 ms of event loop for a
    maximal SessionOpen)."""

    layer_ids: tuple[str, ...]
    layer_types: npt.NDArray[np.int64]
    input_sizes: npt.NDArray[np.int64]
    output_sizes: npt.NDArray[np.int64]
    parameter_counts: npt.NDArray[np.int64]
    seed_counts: npt.NDArray[np.int64]
    edge_index: npt.NDArray[np.int64]

    def topology(self) -> GraphTopology:
        return GraphTopology.build(
            self.layer_ids,
            self.layer_types,
            self.input_sizes,
            self.output_sizes,
            self.parameter_counts,
            self.seed_counts,
            self.edge_index,
        )


@dataclass(frozen=True)
class TopologyInfo:
    """What later checks need from a validated topology."""

    layer_index: Mapping[str, int]  # layer id -> node index
    seed_counts: tuple[int, ...]  # per node
    num_edges: int
    # ``full_frame_layout`` of the layers in node order (how a full columnar frame lies)
    layout: FrameLayout | None = None
    # seed_counts as int64 [N] (read-only), for the vectorised checks
    seed_array: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    max_seeds: int = 0  # max(seed_counts)
    # per node, the upper bound of each INT_FIELDS column: int64 [N, 4] (read-only)
    int_bounds: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros((0, len(INT_FIELDS)), np.int64)
    )
    # the decoded topology, for its GraphTopology (None: read the message again)
    arrays: TopologyArrays | None = field(default=None, compare=False)

    @staticmethod
    def build(
        index: Mapping[str, int],
        seeds: Sequence[int],
        num_edges: int,
        arrays: TopologyArrays | None = None,
    ) -> TopologyInfo:
        arr = np.array(seeds, np.int64) if arrays is None else arrays.seed_counts
        arr.setflags(write=False)
        layout = full_frame_layout(tuple(index))
        bounds = np.full((len(arr), len(INT_FIELDS)), UNBOUNDED, np.int64)
        bounds[:, TOTAL] = bounds[:, ACTIVE] = arr
        bounds.setflags(write=False)
        top = max(seeds, default=0)
        return TopologyInfo(index, tuple(seeds), num_edges, layout, arr, top, bounds, arrays)

    def graph_topology(self, topology: graph_pb2.Topology) -> GraphTopology:
        """``GraphTopology.from_proto(topology)``, of the topology this validated: from
        the arrays validation decoded when it kept them."""
        if self.arrays is None:
            return GraphTopology.from_proto(topology)
        return self.arrays.topology()


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_id(value: str, path: str, max_chars: int, *, allow_empty: bool = False) -> None:
    """Ids are 1..max_chars printable characters (no control characters)."""
    if not value:
        if allow_empty:
            return
        raise ValidationError(path, "must not be empty", "missing")
    if len(value) > max_chars:
        raise ValidationError(path, f"{len(value)} chars > {max_chars}", "too_large")
    if not value.isprintable():
        raise ValidationError(path, "contains control characters", "bad_id")


def all_printable(text: str) -> bool:
    """``text.isprintable()``, ~10x faster for ASCII text (the usual ids): an ASCII
    character is printable iff it is not a control character (0x00-0x1F, 0x7F).
    (``isprintable`` costs ~3 ns a character: ~150 µs for 512 ids of 100 characters.)"""
    if not text.isascii():
        return text.isprintable()
    codes = np.frombuffer(text.encode("ascii"), np.uint8)
    return not ((codes < 0x20) | (codes == 0x7F)).any()


def check_float(value: float, path: str, lo: float, hi: float | None) -> None:
    """Finite and inside ``[lo, hi]`` (``hi`` None = no upper bound)."""
    if not math.isfinite(value):
        raise ValidationError(path, f"{value} is not finite", "non_finite")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{_fmt(lo)}, {_fmt(hi)}]" if hi is not None else f">= {_fmt(lo)}"
        raise ValidationError(path, f"{_fmt(value)} not in {bound}", "out_of_range")


def validate_topology(topo: graph_pb2.Topology, limits: Limits, path: str) -> TopologyInfo:
    """Layers: 1..max_nodes, unique ids, known types, sizes >= 1, seeds <= max.
    Edges: <= max_edges, endpoints in range, no self loops, no duplicates.

    Why vectorised: a Python loop per layer and per edge held the event loop ~6 ms for a
    maximal topology (512 layers, 4,096 edges), and a client may send one with every
    SessionOpen. The fields are read once into arrays and checked with numpy; only when
    something is wrong is the first offending layer or edge (in message order, as a loop
    meets it) checked again field by field, so the error names the same field and index
    as the loop did (tests/server/test_topology_validation.py compares the two)."""
    n = len(topo.layers)
    if n == 0:
        raise ValidationError(f"{path}.layers", "at least one layer is required", "missing")
    if n > limits.max_nodes_per_graph:
        raise ValidationError(
            f"{path}.layers", f"{n} layers > limit {limits.max_nodes_per_graph}", "too_large"
        )
    ids, types, ins, outs, params, seeds = zip(
        *[
            (x.layer_id, x.layer_type, x.input_size, x.output_size, x.parameter_count, x.seed_count)
            for x in topo.layers
        ],
        strict=True,
    )
    index = dict(zip(ids, range(n), strict=True))
    first: dict[str, int] | None = None  # id -> its first layer; only when ids repeat
    if len(index) != n:
        first = {}
        for i, lid in enumerate(ids):
            first.setdefault(lid, i)
    lengths = np.fromiter(map(len, ids), np.int64, n)
    bad = (lengths > limits.max_id_chars) | (lengths == 0)
    if not all_printable("".join(ids)):  # (a string is printable iff each character is)
        bad |= np.fromiter((not s.isprintable() for s in ids), np.bool_, n)
    if first is not None:
        bad |= np.fromiter((first[s] != i for i, s in enumerate(ids)), np.bool_, n)
    type_arr, in_arr, out_arr = (np.array(c, np.int64) for c in (types, ins, outs))
    param_arr, seed_arr = np.array(params, np.uint64), np.array(seeds, np.int64)
    if _TYPES_CONTIGUOUS:
        bad |= (type_arr < _TYPE_LO) | (type_arr > _TYPE_HI)
    else:
        bad |= ~np.isin(type_arr, _LAYER_TYPE_VALUES)
    bad |= in_arr < 1
    bad |= out_arr < 1
    bad |= param_arr > MAX_PARAMETER_COUNT
    bad |= seed_arr > limits.max_seeds_per_layer
    if bad.any():
        i = int(np.argmax(bad))
        _check_layer(topo.layers[i], i, path, limits, first)
        raise AssertionError(f"{path}.layers[{i}] was flagged but passes its checks")
    m = len(topo.edges)
    if m > limits.max_edges_per_graph:
        raise ValidationError(
            f"{path}.edges", f"{m} edges > limit {limits.max_edges_per_graph}", "too_large"
        )
    edge_index = np.zeros((2, m), np.int64)
    if m:
        source, target = edge_arrays(topo)
        _check_edges(source, target, n, path)
        edge_index[0], edge_index[1] = source, target  # (each < n: exact in int64)
    arrays = TopologyArrays(
        ids,
        type_arr,
        in_arr,
        out_arr,
        param_arr.astype(np.int64),  # (each <= MAX_PARAMETER_COUNT: exact)
        seed_arr,
        edge_index,
    )
    for a in (type_arr, in_arr, out_arr, arrays.parameter_counts, seed_arr, edge_index):
        a.setflags(write=False)
    return TopologyInfo.build(index, seeds, m, arrays)


def _check_layer(
    layer: graph_pb2.LayerSpec,
    i: int,
    path: str,
    limits: Limits,
    first: Mapping[str, int] | None,
) -> None:
    """Layer ``i``'s checks in order; raises the first that fails (``first``: each id's
    first layer, when ids repeat)."""
    p = f"{path}.layers[{i}]"
    check_id(layer.layer_id, f"{p}.layer_id", limits.max_id_chars)
    if first is not None and first[layer.layer_id] != i:
        raise ValidationError(
            f"{p}.layer_id",
            f"duplicate id {layer.layer_id!r} (also layers[{first[layer.layer_id]}])",
            "duplicate_id",
        )
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


def _check_edges(
    source: npt.NDArray[np.uint64], target: npt.NDArray[np.uint64], n: int, path: str
) -> None:
    """Endpoints in range, no self loop, no repeat of an earlier edge; raises for the
    first edge that fails, with the check a loop over the edges would have met first."""
    m = len(source)
    key = (source << np.uint64(32)) | target  # (uint32 endpoints: one key per edge)
    ordered = np.sort(key)
    earlier = np.arange(m)  # each edge's first occurrence
    if (ordered[1:] == ordered[:-1]).any():  # (a sort is ~10x cheaper than np.unique)
        _, once, inverse = np.unique(key, return_index=True, return_inverse=True)
        earlier = once[inverse.reshape(-1)]
    bad = (source >= n) | (target >= n) | (source == target) | (earlier != np.arange(m))
    if not bad.any():
        return
    j = int(np.argmax(bad))
    p = f"{path}.edges[{j}]"
    for name, v in (("source", int(source[j])), ("target", int(target[j]))):
        if v >= n:
            raise ValidationError(f"{p}.{name}", f"{v} out of range for {n} layers", "bad_edge")
    if source[j] == target[j]:
        raise ValidationError(p, f"self loop on layer {int(source[j])}", "bad_edge")
    raise ValidationError(p, f"duplicate of edges[{int(earlier[j])}]", "bad_edge")


WIRE_EDGES_FROM = 128
"""From this many edges on, ``edge_arrays`` reads them from the serialized topology.
Why: reading two fields of each Edge message costs ~0.45 µs per edge (1.8 ms for
4,096 edges on this box), serializing the whole topology ~0.15 ms and decoding the edges
with numpy ~0.4 ms; below this size the attribute reads are cheaper."""


def edge_arrays(topo: graph_pb2.Topology) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """``topo.edges`` as (source, target) uint64 [M] arrays (see ``WIRE_EDGES_FROM``)."""
    edges = topo.edges
    if len(edges) >= WIRE_EDGES_FROM:
        got = _edges_from_wire(topo.SerializeToString(), len(edges))
        if got is not None:
            return got
    return (
        np.fromiter((e.source for e in edges), np.uint64, len(edges)),
        np.fromiter((e.target for e in edges), np.uint64, len(edges)),
    )


def _edges_from_wire(
    buf: bytes, m: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]] | None:
    """The ``m`` edges of a serialized Topology, decoded with numpy; None when the bytes
    are not in the one shape this reads (the caller then reads the messages).

    The shape: the layers (field 1) first, then nothing but edges (field 2), each holding
    only its two uint32 varints (fields 1, 2; either left out when 0), which is how the
    serializer writes a Topology without unknown fields. After the layers, every byte
    then belongs to a varint and the varints pair up as (tag, value): (0x12, length),
    (0x08, source), (0x10, target). Anything else (an unknown field, another order, a
    length that does not match) returns None rather than guess.
    """
    j, end = 0, len(buf)
    while j < end and buf[j] == 0x0A:  # skip the layers (length-delimited field 1)
        size = buf[j + 1]
        j += 2
        if size >= 0x80:
            size, j = varint_tail(buf, j, size)
        j += size
    b = np.frombuffer(buf, np.uint8)[j:]
    if b.size == 0 or b[-1] >= 0x80:
        return None
    ends = np.flatnonzero(b < 0x80)  # the last byte of each varint
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    widths = ends - starts + 1
    if ends.size % 2 or widths.max() > 5:  # (a uint32 takes at most 5 bytes)
        return None
    values = (b[starts] & 0x7F).astype(np.uint64)
    for k in range(1, int(widths.max())):  # (7 more bits from each further byte)
        longer = np.flatnonzero(widths > k)
        values[longer] |= (b[starts[longer] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    tags, values = values[0::2], values[1::2]
    is_edge, is_source, is_target = tags == 0x12, tags == 0x08, tags == 0x10
    starts_edge = np.flatnonzero(is_edge)
    if (
        starts_edge.size != m
        or not is_edge[0]
        or not (is_edge | is_source | is_target).all()
        or np.any(widths[0::2] != 1)
    ):
        return None
    # each edge's declared length is the bytes up to the next edge (or the end)
    body = ends[1::2][starts_edge] + 1
    after = np.append(starts[0::2][starts_edge[1:]], b.size)
    if not np.array_equal(after - body, values[starts_edge]):
        return None
    which = np.cumsum(is_edge) - 1  # the edge each (tag, value) pair belongs to
    out: list[npt.NDArray[np.uint64]] = []
    for mask in (is_source, is_target):
        pos = np.flatnonzero(mask)
        at = which[pos]  # (non-decreasing: equal neighbours = a field twice in one edge)
        if at.size > 1 and not (at[1:] != at[:-1]).all():  # twice in one edge: not the shape
            return None
        col = np.zeros(m, np.uint64)
        col[at] = values[pos]
        out.append(col)
    return out[0], out[1]


def validate_kernels(kernels: Sequence[graph_pb2.KernelSpec], limits: Limits, path: str) -> None:
    """At most max_kernels, unique non-empty ids. (The fields are read once and checked
    together; only when one fails are the kernels checked one by one, in order, so the
    error names the same kernel and field as that loop alone would.)"""
    if len(kernels) > limits.max_kernels:
        raise ValidationError(
            path, f"{len(kernels)} kernels > limit {limits.max_kernels}", "too_large"
        )
    if not kernels:
        return
    ids, params = zip(*[(k.kernel_id, k.parameter_count) for k in kernels], strict=True)
    if (
        min(map(len, ids)) >= 1
        and max(map(len, ids)) <= limits.max_id_chars
        and len(set(ids)) == len(ids)
        and max(params) <= MAX_PARAMETER_COUNT
        and all_printable("".join(ids))
    ):
        return
    _check_kernels(kernels, limits, path)
    raise AssertionError(f"{path} was flagged but passes its checks")


def _check_kernels(kernels: Sequence[graph_pb2.KernelSpec], limits: Limits, path: str) -> None:
    """The kernels' checks one by one; raises the first that fails."""
    seen: dict[str, int] = {}
    for i, k in enumerate(kernels):
        p = f"{path}[{i}].kernel_id"
        check_id(k.kernel_id, p, limits.max_id_chars)
        if k.kernel_id in seen:
            raise ValidationError(
                p, f"duplicate id {k.kernel_id!r} (also [{seen[k.kernel_id]}])", "duplicate_id"
            )
        seen[k.kernel_id] = i
        if k.parameter_count > MAX_PARAMETER_COUNT:
            raise ValidationError(
                f"{path}[{i}].parameter_count",
                f"{k.parameter_count} > {MAX_PARAMETER_COUNT}",
                "out_of_range",
            )


def validate_signal(
    sig: health_pb2.HealthSignal, path: str, topo: TopologyInfo, limits: Limits
) -> int:
    """One HealthSignal against the session's topology; returns its node index."""
    node = topo.layer_index.get(sig.layer_id)
    if node is None:
        check_id(sig.layer_id, f"{path}.layer_id", limits.max_id_chars)
        raise ValidationError(
            f"{path}.layer_id", f"unknown layer {sig.layer_id!r}", "unknown_layer"
        )
    if sig.step < 0:
        raise ValidationError(f"{path}.step", f"{sig.step} < 0", "out_of_range")
    check_float(sig.timestamp_s, f"{path}.timestamp_s", 0.0, None)
    for name, lo, hi in SIGNAL_RANGES:
        check_float(getattr(sig, name), f"{path}.{name}", lo, hi)
    if sig.total_seeds > limits.max_seeds_per_layer:
        raise ValidationError(
            f"{path}.total_seeds",
            f"{sig.total_seeds} > limit {limits.max_seeds_per_layer}",
            "too_large",
        )
    declared = topo.seed_counts[node]
    if sig.total_seeds not in (0, declared):
        raise ValidationError(
            f"{path}.total_seeds",
            f"{sig.total_seeds} != seed_count {declared} declared for {sig.layer_id!r}",
            "out_of_range",
        )
    if sig.active_seeds > max(sig.total_seeds, declared):
        raise ValidationError(
            f"{path}.active_seeds",
            f"{sig.active_seeds} > total_seeds {max(sig.total_seeds, declared)}",
            "out_of_range",
        )
    n_states = len(sig.seed_states)
    if n_states not in (0, sig.total_seeds):
        raise ValidationError(
            f"{path}.seed_states",
            f"length {n_states} must be 0 or total_seeds ({sig.total_seeds})",
            "out_of_range",
        )
    for k, state in enumerate(sig.seed_states):
        if state not in SEED_STATES:
            raise ValidationError(
                f"{path}.seed_states[{k}]", f"unknown value {state}", "out_of_range"
            )
    return node
