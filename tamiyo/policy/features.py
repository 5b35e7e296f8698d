"""The one featurizer: ``GraphSnapshot`` → ``GraphTensors`` (node / kernel feature arrays).

Server, trainer and simulator all call ``featurize`` / ``featurize_many`` so that what is
trained is what is served. The columns are those of ``FEATURE_SCHEMA`` and
``KERNEL_SCHEMA`` (``feature_schema.py``). This module assembles each graph's tensors:
the topology-only columns and Â cached per topology, the kernel columns cached per kernel
set, and the telemetry columns of the whole batch in one pass (``telemetry_features.py``),
split back per graph. The topology and kernel scales below are part of the schema: bump
its version if one changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate, pairwise
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from tamiyo.policy.feature_schema import (
    FEATURE_INDEX,
    FEATURE_SCHEMA,
    KERNEL_SCHEMA,
    LAYER_TYPE_NAMES,
    FeatureSchema,
    log_scaled,
)
from tamiyo.policy.signal_window import SignalWindow
from tamiyo.policy.snapshot import (
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
from tamiyo.policy.telemetry_features import TelemetryBatch, telemetry_columns
from tamiyo.policy.topology import ADJACENCY_CACHE, LruCache, NormAdjacency

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


# Topology-only columns with a log1p(v)/scale normalisation, and their scales.
_STATIC = (
    "log_input_size",
    "log_output_size",
    "log_parameter_count",
    "log_in_degree",
    "log_out_degree",
)
_STATIC_SCALE = np.array([10.0, 10.0, 20.0, 4.0, 4.0])

_TOPOLOGY = attrgetter("topology")
_KERNELS = attrgetter("kernels")
_LAYER_IDS = attrgetter("layer_ids")
_KERNEL_IDS = attrgetter("kernel_ids")
_STEP = attrgetter("step")
_EPOCH = attrgetter("epoch")
_PIECES = LruCache[tuple[FloatArray, NormAdjacency]](4096)


def _static_block(topo: GraphTopology, num_features: int) -> FloatArray:
    """Topology-only part of x (one-hot type, sizes, degrees), float32 [N, F]."""
    n = topo.num_nodes
    x = np.zeros((n, num_features), np.float32)
    x[np.arange(n), np.clip(topo.layer_types, 0, len(LAYER_TYPE_NAMES) - 1)] = 1.0
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
    x[:, [FEATURE_INDEX[f] for f in _STATIC]] = log_scaled(raw, _STATIC_SCALE)
    x[:, FEATURE_INDEX["seed_capacity"]] = topo.seed_counts / MAX_SEEDS
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
        kx[:, 0] = log_scaled(kp, 20)
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


def featurize_many(
    snaps: Sequence[GraphSnapshot], schema: FeatureSchema = FEATURE_SCHEMA
) -> list[GraphTensors]:
    """Features of many snapshots at once: the topology columns come from a cache per
    topology; the telemetry columns are computed in one pass over all N_total nodes
    (``telemetry_columns``: one native call, or ~70 numpy calls per *batch*), then split
    back per graph (views, O(1) Python per graph). This is what the server calls for a
    batch.
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
    x, target, health, free_seed = telemetry_columns(
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
