"""Validation of every incoming message, before any of it reaches a session or the policy.
(The checks of a graph's parts, topology, kernels and one signal, are in
``tamiyo_server.graph_validation``; they are re-exported here.)

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
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tamiyo.config import Limits
from tamiyo.policy.snapshot import SignalColumns
from tamiyo.signal_columns import (
    column_length_error,
    signals_from_columns,
)
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.graph_validation import (
    MAX_PARAMETER_COUNT,
    TopologyInfo,
    ValidationError,
    check_float,
    check_id,
    validate_kernels,
    validate_signal,
    validate_topology,
)
from tamiyo_server.signal_checks import columns_look_valid as columns_look_valid
from tamiyo_server.signal_checks import (
    decode_valid_columns,
    decode_valid_signals,
    steps_ordered_per_layer,
)
from tamiyo_server.signal_checks import signals_look_valid as signals_look_valid

_count = np.count_nonzero


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


__all__ = [
    "MAX_PARAMETER_COUNT",
    "TopologyInfo",
    "ValidationError",
    "check_float",
    "check_id",
    "columns_look_valid",
    "signals_look_valid",
    "validate_budget",
    "validate_decide",
    "validate_decide_decoded",
    "validate_frame",
    "validate_frame_header",
    "validate_frame_signals",
    "validate_kernels",
    "validate_outcome",
    "validate_session_open",
    "validate_signal",
    "validate_signal_steps",
    "validate_state",
    "validate_state_decoded",
    "validate_topology",
]
