"""Vectorised checks of a frame's decoded signals (``SignalColumns``): the common, valid
case of every telemetry frame, on the event loop.

Why separate from ``tamiyo_server.validation``: these checks only say *whether* a frame
is valid, in ~10 numpy calls for the whole frame (each numpy call costs µs here, so they
are counted, not looped); the per-field checks in ``validation`` say *what* is wrong and
run only when these refuse. Both hold the same rules (the ranges live here), and
hypothesis tests hold them to the same answers. ``frame_checks`` hands the same ranges
to the native path of the usual frame (``tamiyo.policy.frame_ingest``), which checks and
records a full columnar frame in one pass before any of this runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tamiyo.config import Limits
from tamiyo.policy.frame_ingest import FrameChecks, native_available
from tamiyo.policy.signal_window import SignalWindow
from tamiyo.policy.snapshot import FLOAT_FIELDS, INT_FIELDS, SignalColumns
from tamiyo.v1 import health_pb2

if TYPE_CHECKING:
    from tamiyo_server.validation import TopologyInfo

SEED_STATES = frozenset(health_pb2.SeedLifecycleState.values())  # valid seed_states values

# HealthSignal float fields and their closed ranges (None = unbounded above).
SIGNAL_RANGES: tuple[tuple[str, float, float | None], ...] = (
    ("health_score", 0.0, 1.0),
    ("avg_execution_time_ms", 0.0, None),
    ("activation_variance", 0.0, None),
    ("dead_neuron_ratio", 0.0, 1.0),
    ("avg_correlation", 0.0, 1.0),
    ("gradient_norm", 0.0, None),
    ("latency_variance", 0.0, None),
    ("memory_utilization", 0.0, 1.0),
)

assert all(lo == 0.0 for _, lo, _ in SIGNAL_RANGES)  # (columns_look_valid relies on it)
_FAST_HI = np.array([np.inf if hi is None else hi for _, _, hi in SIGNAL_RANGES], np.float32)
assert tuple(name for name, _, _ in SIGNAL_RANGES) == FLOAT_FIELDS  # column order
_STATE_LO, _STATE_HI = min(SEED_STATES), max(SEED_STATES)
assert frozenset(range(_STATE_LO, _STATE_HI + 1)) == SEED_STATES  # a contiguous range
TOTAL = INT_FIELDS.index("total_seeds")  # column of SignalColumns.ints
ACTIVE = INT_FIELDS.index("active_seeds")
_count = np.count_nonzero  # (~3x cheaper than ndarray.any() here)
_min = np.minimum.reduce  # (the ufunc's C reduce; ndarray.min() goes through Python)
UNBOUNDED = 2**62  # bound of the count columns that have none


def columns_look_valid(
    cols: SignalColumns, topo: TopologyInfo, limits: Limits, unique: bool
) -> bool:
    """Every check of ``validate_signal`` (and uniqueness) on decoded columns, in ~10
    numpy calls (each costs µs on the event loop: they are counted, not looped). A False
    says only "something is wrong"; the per-field checks then name it. Never True for an
    input the per-field checks would refuse (property tests hold both to that)."""
    layer = cols.layer
    if not len(layer):
        return True
    if topo.max_seeds > limits.max_seeds_per_layer:
        return False
    if cols.all_layers:
        bounds, declared = topo.int_bounds, topo.seed_array
    else:
        if unique and np.bincount(layer).max() > 1:  # (np.unique is ~50x slower here)
            return False
        bounds, declared = topo.int_bounds[layer], topo.seed_array[layer]
    fl = cols.floats  # finite: SignalColumns refuses NaN/inf; every lower bound is 0
    if _min(fl, None) < 0 or _count(fl > _FAST_HI):
        return False
    if _min(cols.timestamps) < 0 or _min(cols.steps) < 0:
        return False
    ints = cols.ints
    if _count(ints > bounds):  # active_seeds, total_seeds <= the declared seed_count
        return False
    total = ints[:, TOTAL]
    # total in {0, declared} (then max(total, declared) == declared, which was checked
    # against max_seeds_per_layer above); usually total == declared: one bytes compare
    if total.tobytes() != declared.tobytes() and _count(total * (declared - total)):
        return False
    n_states = cols.seed_state_len
    if not _count(n_states):
        return True
    values = cols.seed_values
    return not (
        _count(n_states * (n_states - total))
        or _count(values < _STATE_LO)
        or _count(values > _STATE_HI)
    )


def frame_checks(window: SignalWindow, topo: TopologyInfo, limits: Limits) -> FrameChecks | None:
    """These rules laid out for the native full-frame path (``SignalWindow.ingest_full``)
    of a session; None when that path is not built or cannot decide for this session."""
    if (
        not native_available()
        or topo.max_seeds > limits.max_seeds_per_layer
        or len(topo.layer_index) > limits.max_signals_per_frame  # (a full frame is refused)
    ):
        return None
    return window.frame_checks(_FAST_HI, topo.int_bounds, topo.seed_array, (_STATE_LO, _STATE_HI))


def decode_valid_signals(
    signals: Sequence[health_pb2.HealthSignal],
    topo: TopologyInfo,
    limits: Limits,
    unique: bool,
) -> SignalColumns | None:
    """Vectorised check of many signals (the common, valid case): decode them once into
    numpy columns (``SignalColumns``, reused by the session's window update) and check
    every range with ``columns_look_valid``. ``None`` means "something is wrong": the
    caller then runs the per-field checks, which name the field."""
    try:
        cols = SignalColumns(signals, topo.layer_index)
    except (ValueError, OverflowError):
        return None
    return cols if columns_look_valid(cols, topo, limits, unique) else None


def signals_look_valid(
    signals: Sequence[health_pb2.HealthSignal],
    topo: TopologyInfo,
    limits: Limits,
    unique: bool,
) -> bool:
    """True when ``decode_valid_signals`` accepts the signals (see there)."""
    return decode_valid_signals(signals, topo, limits, unique) is not None


def decode_valid_columns(
    columns: health_pb2.HealthSignalColumns, topo: TopologyInfo, limits: Limits
) -> SignalColumns | None:
    """``decode_valid_signals`` for the columnar form (at most one signal per layer)."""
    try:
        cols = SignalColumns.from_columns(columns, topo.layer_index, topo.layout)
    except (ValueError, OverflowError):
        return None
    return cols if columns_look_valid(cols, topo, limits, unique=True) else None


def steps_ordered_per_layer(cols: SignalColumns) -> bool:
    """Each layer's signals are oldest first: steps non-decreasing in message order
    within every layer (a ``ModelGraphState`` history). One stable sort by layer."""
    m = len(cols.layer)
    if m < 2:
        return True
    order = np.argsort(cols.layer, kind="stable")
    layer, steps = cols.layer[order], cols.steps[order]
    return not _count((layer[1:] == layer[:-1]) & (steps[1:] < steps[:-1]))
