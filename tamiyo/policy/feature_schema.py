"""What the featurizer's columns are: the named, versioned feature schemas.

``FEATURE_SCHEMA`` names the node feature columns in order, with each one's normalisation
and the constants of the telemetry ones; ``KERNEL_SCHEMA`` does the same for kernels.
Checkpoints record both and the loader refuses a checkpoint trained on another schema, so
what is trained is what is served. Bump ``version`` whenever a name, order, normalisation
or constant changes: here, or the scales beside the code that computes the columns
(``features.py`` for the topology and kernel columns, ``telemetry_features.py`` for the
telemetry ones).

Missing and stale telemetry are explicit features (``has_telemetry``, ``telemetry_stale``,
``telemetry_age``); a layer without signals gets zeros in the signal features *and* those
flags, never a fake "healthy" value, and its ``health`` is NaN (unknown) for the rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.policy.snapshot import FloatArray

__all__ = [
    "FEATURE_INDEX",
    "FEATURE_SCHEMA",
    "KERNEL_SCHEMA",
    "LAYER_TYPE_NAMES",
    "SEED_STATE_NAMES",
    "FeatureSchema",
    "log_scaled",
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


LAYER_TYPE_NAMES = (
    "unspecified",
    "linear",
    "conv",
    "attention",
    "norm",
    "embedding",
    "recurrent",
    "other",
)
"""``LayerSpec.layer_type`` codes 0..7 in order (the one-hot ``type_*`` columns)."""

SEED_STATE_NAMES = ("dormant", "germinated", "training", "fossilized", "culled")
"""Seed-state codes 1..5 in order (the ``seeds_*`` columns; 0 = past the seed list)."""

_NODE_FEATURES: tuple[tuple[str, str], ...] = (
    *((f"type_{t}", "one-hot LayerSpec.layer_type") for t in LAYER_TYPE_NAMES),
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
    *((f"seeds_{s}", f"fraction of seed_states == {s.upper()} (newest)") for s in SEED_STATE_NAMES),
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

FEATURE_INDEX = {n: i for i, n in enumerate(FEATURE_SCHEMA.names)}
"""Column of each ``FEATURE_SCHEMA`` name in x."""


def log_scaled(a: npt.NDArray[Any], scale: float | npt.NDArray[np.float64]) -> FloatArray:
    """The ``log1p(v)/scale`` normalisation: ``a`` any shape (negatives count as 0),
    ``scale`` a scalar or broadcast over ``a`` (one per column of a 2-D ``a``), float32
    of ``a``'s shape. log1p and the division in float64, then rounded to float32, as
    ``_features.c`` does it."""
    out: FloatArray = (np.log1p(np.maximum(a, 0).astype(np.float64)) / scale).astype(np.float32)
    return out
