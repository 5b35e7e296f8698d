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
from tamiyo.policy.snapshot import INT_FIELDS
from tamiyo.signal_columns import FrameLayout, full_frame_layout
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo_server.signal_checks import ACTIVE, SEED_STATES, SIGNAL_RANGES, TOTAL, UNBOUNDED

_LAYER_TYPES = frozenset(graph_pb2.LayerType.values())
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

    @staticmethod
    def build(index: Mapping[str, int], seeds: Sequence[int], num_edges: int) -> TopologyInfo:
        arr = np.array(seeds, np.int64)
        arr.setflags(write=False)
        layout = full_frame_layout(tuple(index))
        bounds = np.full((len(arr), len(INT_FIELDS)), UNBOUNDED, np.int64)
        bounds[:, TOTAL] = bounds[:, ACTIVE] = arr
        bounds.setflags(write=False)
        top = max(seeds, default=0)
        return TopologyInfo(index, tuple(seeds), num_edges, layout, arr, top, bounds)


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


def check_float(value: float, path: str, lo: float, hi: float | None) -> None:
    """Finite and inside ``[lo, hi]`` (``hi`` None = no upper bound)."""
    if not math.isfinite(value):
        raise ValidationError(path, f"{value} is not finite", "non_finite")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{_fmt(lo)}, {_fmt(hi)}]" if hi is not None else f">= {_fmt(lo)}"
        raise ValidationError(path, f"{_fmt(value)} not in {bound}", "out_of_range")


def validate_topology(topo: graph_pb2.Topology, limits: Limits, path: str) -> TopologyInfo:
    """Layers: 1..max_nodes, unique ids, known types, sizes >= 1, seeds <= max.
    Edges: <= max_edges, endpoints in range, no self loops, no duplicates."""
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


def validate_kernels(kernels: Sequence[graph_pb2.KernelSpec], limits: Limits, path: str) -> None:
    """At most max_kernels, unique non-empty ids."""
    if len(kernels) > limits.max_kernels:
        raise ValidationError(
            path, f"{len(kernels)} kernels > limit {limits.max_kernels}", "too_large"
        )
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
