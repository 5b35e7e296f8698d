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

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import accumulate, pairwise
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.policy.signal_window import SignalWindow
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
    snapshot_from_state,
    state_from_snapshot,
)
from tamiyo.policy.topology import ADJACENCY_CACHE, LruCache, NormAdjacency

log = logging.getLogger(__name__)

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
    "featurize_many",
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


class GraphTensors(NamedTuple):
    """Featurized graph, ready to collate. All arrays numpy, read-only. A NamedTuple
    because the server builds one per graph per decision and tuples are cheapest.

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


def _log(a: npt.NDArray[Any], scale: float | npt.NDArray[np.float64]) -> FloatArray:
    out: FloatArray = (np.log1p(np.maximum(a, 0).astype(np.float64)) / scale).astype(np.float32)
    return out


_STATIC = (
    "log_input_size",
    "log_output_size",
    "log_parameter_count",
    "log_in_degree",
    "log_out_degree",
)
_STATIC_SCALE = np.array([10.0, 10.0, 20.0, 4.0, 4.0])
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
_STATE_DST = [_IDX[f"seeds_{st}"] for st in _SEED_STATES]
_SEED_POS = np.arange(MAX_SEEDS)[None, :]
_ERR_DST = [_IDX["log_error_count"], _IDX["log_errors_in_window"], _IDX["log_adaptation_count"]]
_ERR_SCALE = (5.0, 5.0, 3.0)
_LOG_F_SCALE = (5.0,) * len(_LOG_F)


@lru_cache(maxsize=8)
def _log_scales(max_age_steps: int) -> npt.NDArray[np.float64]:
    """Divisors of featurize_many's log1p columns: newest floats, error and adaptation
    counts, then the telemetry age (saturating at ``max_age_steps``)."""
    return np.array([*_LOG_F_SCALE, *_ERR_SCALE, np.log1p(max_age_steps)])


_TOPOLOGY = attrgetter("topology")
_KERNELS = attrgetter("kernels")
_LAYER_IDS = attrgetter("layer_ids")
_KERNEL_IDS = attrgetter("kernel_ids")
_STEP = attrgetter("step")
_EPOCH = attrgetter("epoch")
_FLOATS = attrgetter("floats")
_INTS = attrgetter("ints")
_VALID = attrgetter("valid")
_STEPS = attrgetter("steps")
_SLEN = attrgetter("seed_state_len")
_STATES = attrgetter("seed_states")
_SEEDS = attrgetter("seed_counts")
_PIECES = LruCache[tuple[FloatArray, NormAdjacency]](4096)


def _static_block(topo: GraphTopology, num_features: int) -> FloatArray:
    """Topology-only part of x (one-hot type, sizes, degrees), float32 [N, F]."""
    n = topo.num_nodes
    x = np.zeros((n, num_features), np.float32)
    x[np.arange(n), np.clip(topo.layer_types, 0, len(_LAYER_TYPES) - 1)] = 1.0
    ei = topo.edge_index
    raw = np.stack(
        [
            topo.input_sizes,
            topo.output_sizes,
            topo.parameter_counts,
            np.bincount(ei[1], minlength=n),
            np.bincount(ei[0], minlength=n),
        ],
        axis=1,
    )
    x[:, [_IDX[f] for f in _STATIC]] = _log(raw, _STATIC_SCALE)
    x[:, _IDX["seed_capacity"]] = topo.seed_counts / MAX_SEEDS
    x.setflags(write=False)
    return x


def _topology_pieces(
    topos: list[GraphTopology], num_features: int
) -> tuple[list[FloatArray], list[NormAdjacency]]:
    """Static feature block and Â of each topology, cached per topology key: one cache
    lock per batch, one lookup per graph (a session's topology rarely changes)."""
    found = _PIECES.get_many([t.key for t in topos])
    for i, (t, hit) in enumerate(zip(topos, found, strict=True)):
        if hit is None:
            hit = (_static_block(t, num_features), ADJACENCY_CACHE.get_for(t))
            _PIECES.put(t.key, hit)
            found[i] = hit
    pieces = [p for p in found if p is not None]
    return [p[0] for p in pieces], [p[1] for p in pieces]


_KERNEL_FEATURES = LruCache[tuple[KernelSet, FloatArray]](4096)


def _kernel_block(kernels: KernelSet) -> FloatArray:
    """Kernel features float32 [K, Fk]: log size, and size relative to the largest
    kernel the host offered (0 when that is 0)."""
    kp = kernels.parameter_counts
    kx = np.zeros((len(kp), KERNEL_SCHEMA.num_features), np.float32)
    if len(kp):
        kx[:, 0] = _log(kp, 20)
        kmax = kp.max()
        if kmax > 0:
            kx[:, 1] = kp / kmax
    kx.setflags(write=False)
    return kx


def _kernel_features(kernels: list[KernelSet]) -> list[FloatArray]:
    """``_kernel_block`` of each graph's kernel set, cached per KernelSet object (a
    session keeps one for its lifetime). The entry holds the set itself, so its id
    cannot be reused by another object while cached."""
    keys = [str(id(ks)) for ks in kernels]
    found = _KERNEL_FEATURES.get_many(keys)
    out: list[FloatArray] = []
    for key, ks, hit in zip(keys, kernels, found, strict=True):
        if hit is None or hit[0] is not ks:
            hit = (ks, _kernel_block(ks))
            _KERNEL_FEATURES.put(key, hit)
        out.append(hit[1])
    return out


def featurize(snap: GraphSnapshot, schema: FeatureSchema = FEATURE_SCHEMA) -> GraphTensors:
    """Node and kernel features of one snapshot (``featurize_many`` of one graph)."""
    return featurize_many([snap], schema)[0]


def _cat(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def featurize_many(
    snaps: Sequence[GraphSnapshot], schema: FeatureSchema = FEATURE_SCHEMA
) -> list[GraphTensors]:
    """Features of many snapshots at once: the topology columns come from a cache per
    topology; the telemetry columns are computed in one pass over all N_total nodes
    (``_dynamic``: one native call, or ~70 numpy calls per *batch*), then split back per
    graph (views, O(1) Python per graph). This is what the server calls for a batch.
    """
    if schema.version != FEATURE_SCHEMA.version:
        raise ValueError(f"featurize: unsupported schema {schema.version!r}")
    if not snaps:
        return []
    w = snaps[0].window
    if any(sn.window != w for sn in snaps):
        raise ValueError("featurize_many: all snapshots need the same window")
    b = len(snaps)
    topos = list(map(_TOPOLOGY, snaps))
    kernels = list(map(_KERNELS, snaps))
    sizes = list(map(len, map(_LAYER_IDS, topos)))
    counts = np.array(sizes, np.int64)
    kcounts = np.fromiter(map(len, map(_KERNEL_IDS, kernels)), np.int64, b)
    steps_g = np.fromiter(map(_STEP, snaps), np.int64, b)
    statics, adjs = _topology_pieces(topos, schema.num_features)
    x, target, health, free_seed = _dynamic(
        TelemetryBatch(snaps, topos, statics, counts, steps_g, kcounts, schema)
    )
    for a in (x, target, health, free_seed):
        a.setflags(write=False)
    # Split back per graph by slicing (np.split costs ~3 µs per piece in Python; the
    # bounds in plain ints: numpy's cumsum and concatenate cost more than the sums).
    bounds = list(pairwise(accumulate(sizes, initial=0)))
    return list(
        map(
            GraphTensors,
            [x[lo:hi] for lo, hi in bounds],
            _kernel_features(kernels),
            [target[lo:hi] for lo, hi in bounds],
            [health[lo:hi] for lo, hi in bounds],
            [free_seed[lo:hi] for lo, hi in bounds],
            adjs,
            map(_LAYER_IDS, topos),
            map(_KERNEL_IDS, kernels),
            steps_g.tolist(),
            map(_EPOCH, snaps),
        )
    )


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
    logs = _log(raw, _log_scales(schema.max_age_steps))
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


def _dynamic(batch: TelemetryBatch) -> Dynamic:
    """The telemetry columns: native when built and, on the first batch of the process,
    equal to the numpy rendering (to float32 rounding); numpy otherwise."""
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
