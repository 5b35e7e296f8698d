"""Validation of every incoming message, before any of it reaches a session or the policy.

Why a separate pass: the featurizer and the network assume finite numbers in known ranges
and a consistent graph. A bad value must be refused with an error that names the field
(``frame.signals[3].health_score: 1.7 not in [0, 1]``), not turn into a NaN decision.

Each check raises :class:`ValidationError` carrying the field path, a human message and a
short ``reason`` label (used as the ``reason`` label of the rejected-inputs metric).
The functions are pure: they never mutate the message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tamiyo.config import Limits
from tamiyo.policy.snapshot import INT_FIELDS, SignalColumns
from tamiyo.signal_columns import (
    FrameLayout,
    column_length_error,
    full_frame_layout,
    signals_from_columns,
)
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.signal_checks import (
    ACTIVE,
    SEED_STATES,
    SIGNAL_RANGES,
    TOTAL,
    UNBOUNDED,
    decode_valid_columns,
    decode_valid_signals,
    steps_ordered_per_layer,
)
from tamiyo_server.signal_checks import columns_look_valid as columns_look_valid
from tamiyo_server.signal_checks import signals_look_valid as signals_look_valid

_LAYER_TYPES = frozenset(graph_pb2.LayerType.values())
# uint64 counts must fit the featurizer's int64 arrays; 2**53 (exact in float64) is far
# beyond any real layer (the largest models have ~2**41 parameters in all).
MAX_PARAMETER_COUNT = 2**53
_count = np.count_nonzero


class ValidationError(ValueError):
    """One refused field. ``field`` is the dotted path, ``reason`` a metric label."""

    def __init__(self, field: str, message: str, reason: str) -> None:
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


def validate_budget(budget: pb.SessionBudget, path: str) -> None:
    """Zero means "server default"; values above the server maximum are capped, not
    refused (see ``BatchConfig.max_deadline_ms``), so only absurd values are refused."""
    if budget.max_adaptations_per_epoch > 1_000_000:
        raise ValidationError(
            f"{path}.max_adaptations_per_epoch", "must be <= 1000000", "out_of_range"
        )


def validate_session_open(msg: pb.SessionOpen, limits: Limits) -> TopologyInfo:
    path = "session_open"
    check_id(msg.host_id, f"{path}.host_id", limits.max_id_chars)
    check_id(msg.model_id, f"{path}.model_id", limits.max_id_chars, allow_empty=True)
    if not msg.HasField("topology"):
        raise ValidationError(f"{path}.topology", "is required", "missing")
    info = validate_topology(msg.topology, limits, f"{path}.topology")
    validate_kernels(msg.kernels, limits, f"{path}.kernels")
    validate_budget(msg.budget, f"{path}.budget")
    return info


def validate_frame(
    frame: pb.TelemetryFrame, topo: TopologyInfo, limits: Limits, last_step: int | None
) -> SignalColumns:
    """A frame of a session: step >= 0 and non-decreasing, at most one signal per layer,
    every signal valid against the session topology. Returns the decoded signals (for
    ``SignalWindow.update``, so a frame is decoded once)."""
    validate_frame_header(frame, limits, last_step)
    return validate_frame_signals(frame, topo, limits)


def validate_frame_header(frame: pb.TelemetryFrame, limits: Limits, last_step: int | None) -> None:
    """The checks of a frame before its signals: step >= 0 and not below the session's
    last, client clock >= 0, the request id."""
    path = "frame"
    if frame.step < 0:
        raise ValidationError(f"{path}.step", f"{frame.step} < 0", "out_of_range")
    if frame.client_clock_us < 0:
        raise ValidationError(
            f"{path}.client_clock_us", f"{frame.client_clock_us} < 0", "out_of_range"
        )
    if last_step is not None and frame.step < last_step:
        raise ValidationError(
            f"{path}.step", f"{frame.step} < previous step {last_step}", "step_regressed"
        )
    check_id(frame.request_id, f"{path}.request_id", limits.max_request_id_chars, allow_empty=True)


def validate_frame_signals(
    frame: pb.TelemetryFrame, topo: TopologyInfo, limits: Limits
) -> SignalColumns:
    """The signals of a frame (either form), decoded; the rest of ``validate_frame``."""
    path = "frame"
    if frame.HasField("signal_columns"):
        if len(frame.signals):
            raise ValidationError(
                f"{path}.signal_columns",
                "set either frame.signals or frame.signal_columns, not both",
                "conflicting_fields",
            )
        return _validate_columns(frame.signal_columns, topo, limits, f"{path}.signal_columns")
    n = len(frame.signals)
    if n > limits.max_signals_per_frame:
        raise ValidationError(
            f"{path}.signals", f"{n} signals > limit {limits.max_signals_per_frame}", "too_large"
        )
    cols = decode_valid_signals(frame.signals, topo, limits, unique=True)
    if cols is not None:
        return cols
    _check_frame_signals(frame.signals, f"{path}.signals", topo, limits)
    return SignalColumns(frame.signals, topo.layer_index)


def validate_signal_steps(
    frame: pb.TelemetryFrame,
    cols: SignalColumns,
    newest: npt.NDArray[np.int64],
    layer_ids: Sequence[str],
) -> None:
    """A frame's (decoded) signals against its session's history: none measured after
    the frame's step, and none older than its layer's newest recorded signal. Why: a
    layer's history is oldest first, the rule ``validate_state`` holds a Decide state to;
    a stream that let a step go back would decide on a window (and log a state) that
    Decide refuses. ``newest``: ``SignalWindow.newest_steps`` [N], -1 for none."""
    steps = cols.steps
    ahead = steps > frame.step
    behind = steps < newest[cols.layer]
    if not (_count(ahead) or _count(behind)):
        return
    i = int(np.flatnonzero(ahead | behind)[0])
    path = (
        f"frame.signal_columns.step[{i}]"
        if frame.HasField("signal_columns")
        else f"frame.signals[{i}].step"
    )
    if ahead[i]:
        raise ValidationError(path, f"{steps[i]} > frame step {frame.step}", "out_of_range")
    node = int(cols.layer[i])
    raise ValidationError(
        path,
        f"{steps[i]} < step {newest[node]} of the newest signal of {layer_ids[node]!r}",
        "step_regressed",
    )


def _check_frame_signals(
    signals: Sequence[health_pb2.HealthSignal], path: str, topo: TopologyInfo, limits: Limits
) -> None:
    """The per-field checks of a frame's signals, in order; raises for the first bad
    field (``path[i].name``)."""
    seen: dict[int, int] = {}
    last = path.rsplit(".", 1)[-1]
    for i, sig in enumerate(signals):
        node = validate_signal(sig, f"{path}[{i}]", topo, limits)
        if node in seen:
            raise ValidationError(
                f"{path}[{i}].layer_id",
                f"second signal for {sig.layer_id!r} (also {last}[{seen[node]}])",
                "duplicate_id",
            )
        seen[node] = i


_SIGNAL_PATH = re.compile(r"^signals\[(\d+)\]\.(\w+)(?:\[(\d+)\])?$")


def _validate_columns(
    columns: health_pb2.HealthSignalColumns, topo: TopologyInfo, limits: Limits, path: str
) -> SignalColumns:
    """``TelemetryFrame.signal_columns``: the same checks as ``signals``, in the same
    order, and errors that name the column entry (``path.health_score[3]``)."""
    m = len(columns.layer_id)
    if m > limits.max_signals_per_frame:
        raise ValidationError(
            f"{path}.layer_id",
            f"{m} signals > limit {limits.max_signals_per_frame}",
            "too_large",
        )
    cols = decode_valid_columns(columns, topo, limits)
    if cols is not None:
        return cols
    bad = column_length_error(columns)
    if bad is not None:
        raise ValidationError(f"{path}.{bad[0]}", bad[1], "bad_length")
    try:
        _check_frame_signals(signals_from_columns(columns), "signals", topo, limits)
    except ValidationError as err:
        raise _columnar_error(err, columns, path) from None
    return SignalColumns.from_columns(columns, topo.layer_index, topo.layout)


def _columnar_error(
    err: ValidationError, columns: health_pb2.HealthSignalColumns, path: str
) -> ValidationError:
    """The error of ``signals[i].name[k]`` (message form) for the columnar form:
    ``name[i]``; a seed state ``seed_states[offset of i + k]``; the seed-state list
    length ``seed_state_counts[i]``."""
    match = _SIGNAL_PATH.match(err.field)
    if match is None:  # (every per-signal check names signals[i].field)
        return ValidationError(path, str(err), err.reason)
    i, name, k = int(match[1]), match[2], match[3]
    if name == "seed_states" and k is not None:
        field_path = f"{path}.seed_states[{sum(columns.seed_state_counts[:i]) + int(k)}]"
    elif name == "seed_states":
        field_path = f"{path}.seed_state_counts[{i}]"
    else:
        field_path = f"{path}.{name}[{i}]"
    message = str(err).removeprefix(f"{err.field}: ").replace("(also signals[", "(also layer_id[")
    return ValidationError(field_path, message, err.reason)


def validate_outcome(outcome: pb.DecisionOutcome, limits: Limits) -> None:
    path = "outcome"
    check_id(outcome.decision_id, f"{path}.decision_id", limits.max_id_chars)
    if outcome.HasField("reward"):
        check_float(outcome.reward, f"{path}.reward", -math.inf, None)
    if len(outcome.detail) > limits.max_detail_chars:
        raise ValidationError(
            f"{path}.detail",
            f"{len(outcome.detail)} chars > {limits.max_detail_chars}",
            "too_large",
        )


def validate_state(state: graph_pb2.ModelGraphState, limits: Limits, path: str) -> TopologyInfo:
    """A self-contained snapshot (Decide): topology, kernels, and a signal history in
    which each layer's signals are oldest first (steps non-decreasing per layer) and none
    is newer than the state's step."""
    return validate_state_decoded(state, limits, path)[0]


def validate_state_decoded(
    state: graph_pb2.ModelGraphState, limits: Limits, path: str
) -> tuple[TopologyInfo, SignalColumns]:
    """``validate_state``, also returning the decoded signals (for
    ``snapshot_from_state(state, window, columns)``, so Decide decodes them once)."""
    if not state.HasField("topology"):
        raise ValidationError(f"{path}.topology", "is required", "missing")
    info = validate_topology(state.topology, limits, f"{path}.topology")
    validate_kernels(state.kernels, limits, f"{path}.kernels")
    if state.step < 0:
        raise ValidationError(f"{path}.step", f"{state.step} < 0", "out_of_range")
    n = len(state.signals)
    if n > limits.max_signals_per_state:
        raise ValidationError(
            f"{path}.signals", f"{n} signals > limit {limits.max_signals_per_state}", "too_large"
        )
    cols = decode_valid_signals(state.signals, info, limits, unique=False)
    if cols is not None and steps_ordered_per_layer(cols) and not _count(cols.steps > state.step):
        return info, cols  # (the common case, in ~20 numpy calls, not ~15 checks a signal)
    _check_state_signals(state.signals, f"{path}.signals", info, limits, state.step)
    return info, SignalColumns(state.signals, info.layer_index)


def _check_state_signals(
    signals: Sequence[health_pb2.HealthSignal],
    path: str,
    topo: TopologyInfo,
    limits: Limits,
    step: int,
) -> None:
    """The per-field checks of a state's signal history, in order; raises for the first
    bad field (``path[i].name``). No signal may be newer than the state's ``step``."""
    last: dict[int, int] = {}
    for i, sig in enumerate(signals):
        p = f"{path}[{i}]"
        node = validate_signal(sig, p, topo, limits)
        if sig.step > step:
            raise ValidationError(f"{p}.step", f"{sig.step} > state step {step}", "out_of_range")
        if node in last and sig.step < last[node]:
            raise ValidationError(
                f"{p}.step",
                f"{sig.step} < earlier signal step {last[node]} of {sig.layer_id!r}",
                "step_regressed",
            )
        last[node] = sig.step


def validate_decide(req: pb.DecideRequest, limits: Limits) -> TopologyInfo:
    return validate_decide_decoded(req, limits)[0]


def validate_decide_decoded(
    req: pb.DecideRequest, limits: Limits
) -> tuple[TopologyInfo, SignalColumns]:
    """``validate_decide``, also returning the state's decoded signals (pass them to
    ``snapshot_from_state(req.state, window, columns)``: ~1 ms less event loop for a
    32-layer x 8-window state)."""
    if not req.HasField("state"):
        raise ValidationError("state", "is required", "missing")
    info, cols = validate_state_decoded(req.state, limits, "state")
    validate_budget(req.budget, "budget")
    check_id(req.request_id, "request_id", limits.max_request_id_chars, allow_empty=True)
    return info, cols
