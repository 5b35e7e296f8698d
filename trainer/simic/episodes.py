"""Random host graphs and hidden fault schedules for Simic episodes.

Why a separate module: an episode is fully determined by its integer seed (graph, hidden
faults, telemetry noise), so every policy is evaluated on exactly the same episodes
(common random numbers) and held-out seeds are truly unseen.

Graphs are chains or DAGs with skip connections (residual-style edges ``i → i+2..i+4``),
nodes in topological order. Faults sit on layers that have seeds (fixable) and start at
a hidden onset with a hidden degradation rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tamiyo.config import SimicConfig
from tamiyo.policy.snapshot import GraphTopology, KernelSet
from tamiyo.v1 import graph_pb2

_TYPES = (
    graph_pb2.LAYER_TYPE_LINEAR,
    graph_pb2.LAYER_TYPE_CONV,
    graph_pb2.LAYER_TYPE_ATTENTION,
    graph_pb2.LAYER_TYPE_NORM,
)


@dataclass(frozen=True, eq=False)
class Episode:
    """One episode's graph and hidden truth. Arrays have N entries (one per layer).

    ``fault_rate`` intrinsic damage per decision step (0 = healthy layer);
    ``fault_onset`` decision step at which damage starts growing; ``parents`` bool [N, N]
    (``parents[p, j]``: edge p → j); ``base_*`` telemetry baselines (ms, variance, norm).
    """

    seed: int
    topology: GraphTopology
    kernels: KernelSet
    parents: npt.NDArray[np.bool_]
    seed_counts: npt.NDArray[np.int64]
    fault_rate: npt.NDArray[np.float64]
    fault_onset: npt.NDArray[np.int64]
    base_latency_ms: npt.NDArray[np.float64]
    base_activation_var: npt.NDArray[np.float64]
    base_grad_norm: npt.NDArray[np.float64]
    memory_share: npt.NDArray[np.float64]

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes


def kernel_set(cfg: SimicConfig) -> KernelSet:
    """The kernels every Simic host offers (ids and parameter counts from the config)."""
    return KernelSet.build(cfg.kernel_ids, cfg.kernel_parameter_counts)


def make_episode(seed: int, sizes: tuple[int, int], cfg: SimicConfig) -> Episode:
    """Draw the graph (``sizes`` = inclusive layer-count range) and its hidden faults."""
    rng = np.random.default_rng([seed, 0x5131C])
    n = int(rng.integers(sizes[0], sizes[1] + 1))
    types = rng.choice(np.array(_TYPES, dtype=np.int64), size=n, p=[0.45, 0.2, 0.2, 0.15])
    width = 2 ** rng.integers(6, 11, size=n)
    in_sizes = np.roll(width, 1)
    params = in_sizes * width + width
    seeds = np.where(types == graph_pb2.LAYER_TYPE_NORM, 0, rng.integers(1, 4, size=n))
    src = [np.arange(n - 1)]
    dst = [np.arange(1, n)]
    if n > 3 and rng.random() < cfg.dag_probability:
        for skip in (2, 3, 4):
            pick = np.nonzero(rng.random(n - skip) < cfg.skip_edge_probability / skip)[0]
            src.append(pick)
            dst.append(pick + skip)
    edge_index = np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64)
    edge_index = np.unique(edge_index, axis=1)
    parents = np.zeros((n, n), np.bool_)
    parents[edge_index[0], edge_index[1]] = True
    topo = GraphTopology.build(
        [f"layer{i:02d}" for i in range(n)], types, in_sizes, width, params, seeds, edge_index
    )
    rate = np.zeros(n)
    onset = np.full(n, 1 << 30, np.int64)
    nfaults = int(rng.choice(len(cfg.fault_count_probs), p=cfg.fault_count_probs))
    fixable = np.nonzero(seeds > 0)[0]
    nfaults = min(nfaults, len(fixable))
    if nfaults:
        where = rng.choice(fixable, size=nfaults, replace=False)
        rate[where] = rng.uniform(*cfg.fault_rate_range, size=nfaults)
        onset[where] = rng.integers(cfg.onset_range[0], cfg.onset_range[1] + 1, size=nfaults)
    return Episode(
        seed=seed,
        topology=topo,
        kernels=kernel_set(cfg),
        parents=parents,
        seed_counts=seeds.astype(np.int64),
        fault_rate=rate,
        fault_onset=onset,
        base_latency_ms=np.log1p(params) * 0.05 * rng.uniform(0.8, 1.2, size=n),
        base_activation_var=rng.uniform(0.5, 2.0, size=n),
        base_grad_norm=rng.uniform(0.2, 1.5, size=n),
        memory_share=np.minimum(params / params.sum(), 1.0),
    )
