"""The telemetry (per-signal) columns of the node features, for a batch of graphs at once.

Two renderings of one definition: ``_numpy_dynamic`` is the reference (~70 numpy calls
per *batch*, ~0.4 ms for a lone graph); ``_native_dynamic`` is the same arithmetic in C
(``_features.c``, one call, ~1 µs per node), which reads every column index, field index
and constant from here (``_native_plan``) rather than defining any of its own.
``telemetry_columns`` uses the C one when it was built and, on the first batch of the
process, agrees with numpy; numpy otherwise. ``featurize_many`` (``features.py``) is the
caller; the columns are named in ``feature_schema.py``.

The scales below are part of ``FEATURE_SCHEMA``: bump its version if one changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.policy.feature_schema import (
    FEATURE_INDEX,
    SEED_STATE_NAMES,
    FeatureSchema,
    log_scaled,
)
from tamiyo.policy.snapshot import (
    F_HEALTH,
    FLOAT_FIELDS,
    INT_FIELDS,
    MAX_SEEDS,
    BoolArray,
    FloatArray,
    GraphSnapshot,
    GraphTopology,
    IntArray,
)

log = logging.getLogger(__name__)

__all__ = ["Dynamic", "TelemetryBatch", "native_available", "telemetry_columns"]

_IDX = FEATURE_INDEX
_I_ERR, _I_ACTIVE, _I_TOTAL, _I_ADAPT = (INT_FIELDS.index(f) for f in INT_FIELDS)
_F = {n: i for i, n in enumerate(FLOAT_FIELDS)}

# Newest-signal columns: log-scaled floats, copied floats, log-scaled ints.
_LOG_F = (
    ("log_exec_time_ms", "avg_execution_time_ms"),
    ("log_latency_variance", "latency_variance"),
    ("log_activation_variance", "activation_variance"),
    ("log_gradient_norm", "gradient_norm"),
)
_COPY_F = (
    ("dead_neuron_ratio", "dead_neuron_ratio"),
    ("avg_correlation", "avg_correlation"),
    ("memory_utilization", "memory_utilization"),
)
_LOG_F_DST = [_IDX[a] for a, _ in _LOG_F]
_LOG_F_SRC = [_F[b] for _, b in _LOG_F]
_COPY_F_DST = [_IDX[a] for a, _ in _COPY_F]
_COPY_F_SRC = [_F[b] for _, b in _COPY_F]
_STATE_DST = [_IDX[f"seeds_{st}"] for st in SEED_STATE_NAMES]
_SEED_POS = np.arange(MAX_SEEDS)[None, :]
_ERR_DST = [_IDX["log_error_count"], _IDX["log_errors_in_window"], _IDX["log_adaptation_count"]]
_ERR_SCALE = (5.0, 5.0, 3.0)
_LOG_F_SCALE = (5.0,) * len(_LOG_F)


@lru_cache(maxsize=8)
def _log_scales(max_age_steps: int) -> npt.NDArray[np.float64]:
    """Divisors of featurize_many's log1p columns: newest floats, error and adaptation
    counts, then the telemetry age (saturating at ``max_age_steps``)."""
    return np.array([*_LOG_F_SCALE, *_ERR_SCALE, np.log1p(max_age_steps)])


_FLOATS = attrgetter("floats")
_INTS = attrgetter("ints")
_VALID = attrgetter("valid")
_STEPS = attrgetter("steps")
_SLEN = attrgetter("seed_state_len")
_STATES = attrgetter("seed_states")
_SEEDS = attrgetter("seed_counts")


class TelemetryBatch(NamedTuple):
    """What the telemetry columns of a batch of B graphs are computed from (both
    renderings, ``_numpy_dynamic`` and ``_native_dynamic``): the snapshots, their
    topologies, each topology's cached static columns float32 [N_g, F], nodes, steps and
    kernels per graph int64 [B], and the schema."""

    snaps: Sequence[GraphSnapshot]
    topos: list[GraphTopology]
    statics: list[FloatArray]
    counts: IntArray
    steps_g: IntArray
    kcounts: IntArray
    schema: FeatureSchema


Dynamic = tuple[FloatArray, BoolArray, FloatArray, IntArray]
"""x float32 [N, F], target bool [N], health float32 [N], free_seed int64 [N]."""


def _cat(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _numpy_dynamic(batch: TelemetryBatch) -> Dynamic:
    """x float32 [N, F] (the topology columns plus the telemetry ones), target bool [N],
    health float32 [N] and free_seed int64 [N] of a batch, in ~70 numpy calls."""
    snaps, topos, statics, counts, steps_g, kcounts, schema = batch
    w = snaps[0].window
    n = int(counts.sum())
    x = np.concatenate(statics)  # a fresh copy
    # Only the slices the features use are stacked: copying whole [N, W, 8] windows cost
    # more than the per-graph slicing it saves once a batch has a few thousand nodes.
    floats = list(map(_FLOATS, snaps))
    ints = list(map(_INTS, snaps))
    valid = _cat(list(map(_VALID, snaps)))  # [N, W]
    steps = _cat(list(map(_STEPS, snaps)))  # [N, W]
    hw = _cat([f[:, :, F_HEALTH] for f in floats]).astype(np.float64)  # 0 if invalid
    newest_f = _cat([f[:, w - 1] for f in floats])  # [N, 8]
    newest_i = _cat([i[:, w - 1] for i in ints])  # [N, 4]
    errs = _cat([i[:, :, _I_ERR] for i in ints])  # [N, W]
    slen = _cat([sl[:, w - 1] for sl in map(_SLEN, snaps)])
    seeds = _cat(list(map(_SEEDS, topos)))
    # Seed lists are ≤ 64 long but usually short: look only at the used columns.
    ncols = max(int(slen.max()), int(seeds.max()), 1)
    states = _cat([st[:, w - 1, :ncols] for st in map(_STATES, snaps)])  # 0 past the list
    step_node = np.repeat(steps_g, counts)
    kernels_node = np.repeat(kcounts > 0, counts)

    nvalid = valid.sum(axis=1)
    has = nvalid > 0
    # Right-aligned windows: slot W-1 holds the newest signal whenever there is one
    # (and zeros otherwise, so "newest" features of a layer without telemetry are 0).
    age = np.maximum(step_node - steps[:, w - 1], 0)
    # Every log1p-scaled column in one pass: newest floats, error / adaptation counts, age.
    raw = np.column_stack(
        [
            newest_f[:, _LOG_F_SRC],
            newest_i[:, _I_ERR],
            errs.sum(axis=1),
            newest_i[:, _I_ADAPT],
            age,
        ]
    )
    logs = log_scaled(raw, _log_scales(schema.max_age_steps))
    x[:, _LOG_F_DST] = logs[:, : len(_LOG_F_DST)]
    x[:, _ERR_DST] = logs[:, len(_LOG_F_DST) : -1]
    x[:, _IDX["has_telemetry"]] = has
    x[:, _IDX["telemetry_stale"]] = ~has | (age > schema.stale_after_steps)
    x[:, _IDX["telemetry_age"]] = np.where(has, np.minimum(logs[:, -1], 1.0), 1.0)
    x[:, _IDX["window_fill"]] = nvalid / w

    cnt = np.maximum(nvalid, 1)
    hmean = hw.sum(axis=1) / cnt
    t = steps.astype(np.float64)
    tmean = t.sum(axis=1) / cnt
    dt = (t - tmean[:, None]) * valid
    var = np.einsum("nw,nw->n", dt, dt)
    cov = np.einsum("nw,nw->n", dt, hw)  # Σ dt·(h - h̄) = Σ dt·h since Σ dt = 0
    slope = np.divide(cov, var, out=np.zeros(n), where=var > 0)
    x[:, _IDX["health_latest"]] = newest_f[:, F_HEALTH]
    x[:, _IDX["health_mean"]] = hmean
    x[:, _IDX["health_min"]] = np.where(has, np.where(valid, hw, np.inf).min(axis=1), 0.0)
    x[:, _IDX["health_trend"]] = np.clip(slope * schema.trend_scale_steps, -1.0, 1.0)

    x[:, _COPY_F_DST] = newest_f[:, _COPY_F_SRC]
    total = newest_i[:, _I_TOTAL]
    active = newest_i[:, _I_ACTIVE]
    x[:, _IDX["active_seed_fraction"]] = np.divide(active, total, out=np.zeros(n), where=total > 0)

    # Seed states of the newest signal: counts per state with one bincount over
    # (node, state) codes, and the first DORMANT slot within the layer's seed count.
    codes = (np.arange(n) * 8)[:, None] + states
    per_state = np.bincount(codes.ravel(), minlength=n * 8).reshape(n, 8)[:, 1:6]
    x[:, _STATE_DST] = np.divide(
        per_state, slen[:, None], out=np.zeros(per_state.shape), where=slen[:, None] > 0
    )
    dormant = (states == 1) & (seeds[:, None] > _SEED_POS[:, :ncols])
    has_states = has & (slen > 0)
    free = np.where(has_states, dormant.sum(axis=1), np.maximum(seeds - active, 0))
    first_dormant = np.where(dormant.any(axis=1), dormant.argmax(axis=1), -1)
    free_seed = np.where(free > 0, np.where(has_states, first_dormant, active), -1)
    target = (free > 0) & kernels_node
    x[:, _IDX["free_seed_fraction"]] = np.divide(free, seeds, out=np.zeros(n), where=seeds > 0)
    x[:, _IDX["has_free_seed"]] = target
    health = np.where(has, newest_f[:, F_HEALTH], np.nan).astype(np.float32)
    free_seed = free_seed.astype(np.int64)

    return x, target, health, free_seed


# --- the telemetry columns in C (tamiyo/policy/_features.c) ----------------------------

try:
    from tamiyo.policy import _features  # type: ignore[attr-defined]
except ImportError:  # not built (no C compiler at install): numpy only
    _features = None


def native_available() -> bool:
    """Whether the C rendering of the telemetry columns was built for this interpreter."""
    return _features is not None


@lru_cache(maxsize=8)
def _native_plan(schema: FeatureSchema) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """The column / field indices and constants ``_features.c`` reads, in its order
    (``P_*`` and ``S_*`` there): everything the numpy rendering above uses, from here."""
    cols = (
        "has_telemetry",
        "telemetry_stale",
        "telemetry_age",
        "window_fill",
        "health_latest",
        "health_mean",
        "health_min",
        "health_trend",
        "active_seed_fraction",
        "free_seed_fraction",
        "has_free_seed",
    )
    plan = [
        *_LOG_F_DST,
        *_COPY_F_DST,
        *_STATE_DST,
        *_ERR_DST,
        *(_IDX[c] for c in cols),
        *_LOG_F_SRC,
        *_COPY_F_SRC,
        F_HEALTH,
        _I_ERR,
        _I_ACTIVE,
        _I_TOTAL,
        _I_ADAPT,
        schema.stale_after_steps,
        len(FLOAT_FIELDS),
        len(INT_FIELDS),
    ]
    scales = [*_log_scales(schema.max_age_steps), schema.trend_scale_steps]
    out = np.asarray(plan, np.int64), np.asarray(scales, np.float64)
    for a in out:
        a.setflags(write=False)
    return out


def _native_dynamic(batch: TelemetryBatch) -> Dynamic:
    """``_numpy_dynamic`` in one native call (~1 µs per node instead of ~0.4 ms per batch
    plus ~1-3 µs per node; ``bench --only hotpath``)."""
    if _features is None:
        raise RuntimeError("tamiyo.policy._features is not built")
    snaps, topos, statics, _, steps_g, kcounts, schema = batch
    plan, scales = _native_plan(schema)
    out: Dynamic = _features.dynamic(  # (window arrays are read in place, strided)
        plan,
        scales,
        statics,
        list(map(_VALID, snaps)),
        list(map(_FLOATS, snaps)),
        list(map(_INTS, snaps)),
        list(map(_STEPS, snaps)),
        list(map(_SLEN, snaps)),
        list(map(_STATES, snaps)),
        list(map(_SEEDS, topos)),
        steps_g,
        kcounts > 0,
    )
    return out


_NATIVE_STATE: list[bool] = []  # [] unchecked, [True] checked and used, [False] off


def telemetry_columns(batch: TelemetryBatch) -> Dynamic:
    """The telemetry columns of a batch (x float32 [N, F] with the static columns copied
    in, target bool [N], health float32 [N], free_seed int64 [N]; N = Σ nodes): native
    when built and, on the first batch of the process, equal to the numpy rendering (to
    float32 rounding); numpy otherwise."""
    if _features is None or _NATIVE_STATE == [False]:
        if not _NATIVE_STATE:  # (not built: said once)
            _NATIVE_STATE.append(False)
            log.warning(
                "tamiyo.policy._features is not built (no C compiler at install): "
                "featurizing with numpy, ~0.4 ms more per batch"
            )
        return _numpy_dynamic(batch)
    try:
        got = _native_dynamic(batch)
    except ValueError:  # input numpy takes but C refuses: a bug here, not in the caller
        log.exception("native featurizer refused a batch; featurizing with numpy from now on")
        _NATIVE_STATE[:] = [False]
        return _numpy_dynamic(batch)
    if not _NATIVE_STATE:
        want = _numpy_dynamic(batch)
        same = all(
            np.allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6, equal_nan=True)
            for g, w in zip(got, want, strict=True)
        )
        _NATIVE_STATE.append(same)
        if not same:
            log.warning("native featurizer disagrees with numpy on a batch; featurizing with numpy")
            return want
    return got
