"""The one featurizer: ``GraphSnapshot`` → node / kernel feature tensors.

Server, trainer and simulator all call ``featurize`` so that what is trained is what is
served. The feature layout is a named, versioned schema (``FEATURE_SCHEMA``); checkpoints
record it and the loader refuses a checkpoint trained on a different schema. Bump
``version`` whenever a name, order, normalisation or constant below changes.

Missing and stale telemetry are explicit features (``has_telemetry``, ``telemetry_stale``,
``telemetry_age``); a layer without signals gets zeros in the signal features *and* those
flags, never a fake "healthy" value, and its ``health`` is NaN (unknown) for the rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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
    KernelSet,
    SignalWindow,
    snapshot_from_state,
    state_from_snapshot,
)
from tamiyo.policy.topology import ADJACENCY_CACHE, NormAdjacency

__all__ = [
    "FEATURE_SCHEMA",
    "KERNEL_SCHEMA",
    "FeatureSchema",
    "GraphSnapshot",
    "GraphTensors",
    "GraphTopology",
    "KernelSet",
    "SignalWindow",
    "featurize",
    "snapshot_from_state",
    "state_from_snapshot",
]


@dataclass(frozen=True)
class FeatureSchema:
    """Names, order and normalisation of one feature matrix, plus its constants."""

    name: str
    version: str
    names: tuple[str, ...]
    normalizations: tuple[str, ...]
    window: int = 8  # history slots per layer (signals)
    stale_after_steps: int = 100  # newest signal older than this → telemetry_stale = 1
    max_age_steps: int = 10_000  # telemetry_age saturates at 1 here (log scale)
    trend_scale_steps: float = 100.0  # health_trend = slope per step × this, clipped ±1

    @property
    def num_features(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["names"] = list(self.names)
        d["normalizations"] = list(self.normalizations)
        return d


_LAYER_TYPES = (
    "unspecified",
    "linear",
    "conv",
    "attention",
    "norm",
    "embedding",
    "recurrent",
    "other",
)
_SEED_STATES = ("dormant", "germinated", "training", "fossilized", "culled")

_NODE_FEATURES: tuple[tuple[str, str], ...] = (
    *((f"type_{t}", "one-hot LayerSpec.layer_type") for t in _LAYER_TYPES),
    ("log_input_size", "log1p(input_size)/10"),
    ("log_output_size", "log1p(output_size)/10"),
    ("log_parameter_count", "log1p(parameter_count)/20"),
    ("seed_capacity", "seed_count/64"),
    ("log_in_degree", "log1p(directed in-degree)/4"),
    ("log_out_degree", "log1p(directed out-degree)/4"),
    ("has_telemetry", "1 if the window holds any signal else 0"),
    ("telemetry_stale", "1 if no signal or newest is > stale_after_steps old"),
    ("telemetry_age", "min(log1p(step - newest step)/log1p(max_age_steps), 1); 1 if none"),
    ("window_fill", "valid signals / window"),
    ("health_latest", "newest health_score in [0,1]; 0 if none"),
    ("health_mean", "mean health_score over the window; 0 if none"),
    ("health_min", "min health_score over the window; 0 if none"),
    ("health_trend", "least-squares slope of health vs step × trend_scale_steps, clip ±1"),
    ("log_exec_time_ms", "log1p(avg_execution_time_ms)/5 (newest)"),
    ("log_latency_variance", "log1p(latency_variance ms²)/5 (newest)"),
    ("log_error_count", "log1p(error_count)/5 (newest)"),
    ("log_errors_in_window", "log1p(sum of error_count over window)/5"),
    ("active_seed_fraction", "active_seeds/total_seeds (newest); 0 if total 0"),
    ("free_seed_fraction", "free seeds/seed_count; 1 if no telemetry and seeds exist"),
    ("has_free_seed", "1 if the layer can be a target"),
    ("log_activation_variance", "log1p(activation_variance)/5 (newest)"),
    ("dead_neuron_ratio", "in [0,1] (newest)"),
    ("avg_correlation", "in [0,1] (newest)"),
    ("log_gradient_norm", "log1p(gradient_norm)/5 (newest)"),
    ("memory_utilization", "in [0,1] (newest)"),
    ("log_adaptation_count", "log1p(adaptation_count)/3 (newest)"),
    *((f"seeds_{s}", f"fraction of seed_states == {s.upper()} (newest)") for s in _SEED_STATES),
)

FEATURE_SCHEMA = FeatureSchema(
    name="tamiyo.node",
    version="node-v1",
    names=tuple(n for n, _ in _NODE_FEATURES),
    normalizations=tuple(d for _, d in _NODE_FEATURES),
)
"""Node feature schema: float32 [N, FEATURE_SCHEMA.num_features]."""

KERNEL_SCHEMA = FeatureSchema(
    name="tamiyo.kernel",
    version="kernel-v1",
    names=("log_parameter_count", "relative_parameter_count"),
    normalizations=("log1p(parameter_count)/20", "parameter_count / max over offered kernels"),
)
"""Kernel feature schema: float32 [K, KERNEL_SCHEMA.num_features]."""

_IDX = {n: i for i, n in enumerate(FEATURE_SCHEMA.names)}
_I_ERR, _I_ACTIVE, _I_TOTAL, _I_ADAPT = (INT_FIELDS.index(f) for f in INT_FIELDS)
_F = {n: i for i, n in enumerate(FLOAT_FIELDS)}


@dataclass(frozen=True, eq=False)
class GraphTensors:
    """Featurized graph, ready to collate. All arrays numpy, read-only.

    ``x`` float32 [N, F]; ``kernel_x`` float32 [K, Fk]; ``target_mask`` bool [N] (layer has
    a free seed and K > 0); ``health`` float32 [N] (newest health_score, NaN = unknown);
    ``free_seed`` int64 [N] (first free seed index, -1 if none); ``adj`` the cached Â.
    """

    x: FloatArray
    kernel_x: FloatArray
    target_mask: BoolArray
    health: FloatArray
    free_seed: IntArray
    adj: NormAdjacency
    layer_ids: tuple[str, ...]
    kernel_ids: tuple[str, ...]
    step: int
    epoch: int

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_kernels(self) -> int:
        return int(self.kernel_x.shape[0])


def _log(a: npt.NDArray[Any], scale: float) -> FloatArray:
    out: FloatArray = (np.log1p(np.maximum(a, 0).astype(np.float64)) / scale).astype(np.float32)
    return out


def featurize(snap: GraphSnapshot, schema: FeatureSchema = FEATURE_SCHEMA) -> GraphTensors:
    """Node and kernel features of one snapshot (vectorised; ~20 numpy calls per graph)."""
    if schema.version != FEATURE_SCHEMA.version:
        raise ValueError(f"featurize: unsupported schema {schema.version!r}")
    topo = snap.topology
    n, w = topo.num_nodes, snap.window
    x = np.zeros((n, schema.num_features), np.float32)
    x[np.arange(n), 0 + np.clip(topo.layer_types, 0, len(_LAYER_TYPES) - 1)] = 1.0
    x[:, _IDX["log_input_size"]] = _log(topo.input_sizes, 10)
    x[:, _IDX["log_output_size"]] = _log(topo.output_sizes, 10)
    x[:, _IDX["log_parameter_count"]] = _log(topo.parameter_counts, 20)
    x[:, _IDX["seed_capacity"]] = topo.seed_counts / MAX_SEEDS
    ei = topo.edge_index
    x[:, _IDX["log_in_degree"]] = _log(np.bincount(ei[1], minlength=n), 4)
    x[:, _IDX["log_out_degree"]] = _log(np.bincount(ei[0], minlength=n), 4)

    valid = snap.valid
    nvalid = valid.sum(axis=1)
    has = nvalid > 0
    # Index of the newest valid slot (right-aligned windows: W-1 when any).
    newest_f = snap.floats[:, w - 1]
    newest_i = snap.ints[:, w - 1]
    newest_step = snap.steps[:, w - 1]
    age = np.maximum(snap.step - newest_step, 0)
    age_norm = np.minimum(_log(age, float(np.log1p(schema.max_age_steps))), 1.0)
    x[:, _IDX["has_telemetry"]] = has
    x[:, _IDX["telemetry_stale"]] = ~has | (age > schema.stale_after_steps)
    x[:, _IDX["telemetry_age"]] = np.where(has, age_norm, 1.0)
    x[:, _IDX["window_fill"]] = nvalid / w

    hw = snap.floats[:, :, F_HEALTH].astype(np.float64)
    cnt = np.maximum(nvalid, 1)
    hmean = np.where(valid, hw, 0.0).sum(axis=1) / cnt
    hmin = np.where(valid, hw, np.inf).min(axis=1)
    t = snap.steps.astype(np.float64)
    tmean = np.where(valid, t, 0.0).sum(axis=1) / cnt
    dt = np.where(valid, t - tmean[:, None], 0.0)
    dh = np.where(valid, hw - hmean[:, None], 0.0)
    var = (dt * dt).sum(axis=1)
    slope = np.divide((dt * dh).sum(axis=1), var, out=np.zeros(n), where=var > 0)
    x[:, _IDX["health_latest"]] = np.where(has, newest_f[:, F_HEALTH], 0.0)
    x[:, _IDX["health_mean"]] = np.where(has, hmean, 0.0)
    x[:, _IDX["health_min"]] = np.where(has, hmin, 0.0)
    x[:, _IDX["health_trend"]] = np.clip(slope * schema.trend_scale_steps, -1.0, 1.0)

    x[:, _IDX["log_exec_time_ms"]] = _log(newest_f[:, _F["avg_execution_time_ms"]], 5)
    x[:, _IDX["log_latency_variance"]] = _log(newest_f[:, _F["latency_variance"]], 5)
    x[:, _IDX["log_error_count"]] = _log(newest_i[:, _I_ERR], 5)
    x[:, _IDX["log_errors_in_window"]] = _log(snap.ints[:, :, _I_ERR].sum(axis=1), 5)
    total = newest_i[:, _I_TOTAL]
    x[:, _IDX["active_seed_fraction"]] = np.divide(
        newest_i[:, _I_ACTIVE], total, out=np.zeros(n), where=total > 0
    )
    x[:, _IDX["log_activation_variance"]] = _log(newest_f[:, _F["activation_variance"]], 5)
    x[:, _IDX["dead_neuron_ratio"]] = newest_f[:, _F["dead_neuron_ratio"]]
    x[:, _IDX["avg_correlation"]] = newest_f[:, _F["avg_correlation"]]
    x[:, _IDX["log_gradient_norm"]] = _log(newest_f[:, _F["gradient_norm"]], 5)
    x[:, _IDX["memory_utilization"]] = newest_f[:, _F["memory_utilization"]]
    x[:, _IDX["log_adaptation_count"]] = _log(newest_i[:, _I_ADAPT], 3)

    # Seed states of the newest signal: fractions, and the first DORMANT slot.
    slen = snap.seed_state_len[:, w - 1]
    states = snap.seed_states[:, w - 1, :]
    in_list = np.arange(MAX_SEEDS)[None, :] < slen[:, None]
    first = _IDX["seeds_dormant"]
    for k in range(len(_SEED_STATES)):
        x[:, first + k] = np.divide(
            ((states == k + 1) & in_list).sum(axis=1), slen, out=np.zeros(n), where=slen > 0
        )
    seeds = topo.seed_counts
    dormant = (states == 1) & in_list & (np.arange(MAX_SEEDS)[None, :] < seeds[:, None])
    has_states = has & (slen > 0)
    free_by_states = dormant.sum(axis=1)
    active = np.where(has, newest_i[:, _I_ACTIVE], 0)
    free_by_count = np.maximum(seeds - active, 0)
    free = np.where(has_states, free_by_states, free_by_count)
    first_dormant = np.where(dormant.any(axis=1), dormant.argmax(axis=1), -1)
    free_seed = np.where(free > 0, np.where(has_states, first_dormant, active), -1)
    k_count = snap.kernels.num_kernels
    target = (free > 0) & (k_count > 0)
    x[:, _IDX["free_seed_fraction"]] = np.divide(free, seeds, out=np.zeros(n), where=seeds > 0)
    x[:, _IDX["has_free_seed"]] = target

    kp = snap.kernels.parameter_counts
    kx = np.zeros((k_count, KERNEL_SCHEMA.num_features), np.float32)
    if k_count:
        kx[:, 0] = _log(kp, 20)
        kmax = kp.max()
        kx[:, 1] = kp / kmax if kmax > 0 else 0.0
    health = np.where(has, newest_f[:, F_HEALTH], np.nan).astype(np.float32)
    free_seed = free_seed.astype(np.int64)
    for a in (x, kx, target, health, free_seed):
        a.setflags(write=False)
    return GraphTensors(
        x,
        kx,
        target,
        health,
        free_seed,
        ADJACENCY_CACHE.get(topo),
        topo.layer_ids,
        snap.kernels.kernel_ids,
        snap.step,
        snap.epoch,
    )
