"""Random but well-formed host graphs, for warm-up forwards, tests and benchmarks.

Not the simulator (``trainer`` owns that): these graphs have no dynamics, only valid
shapes and plausible value ranges. Deterministic for a given ``numpy`` Generator.
"""

from __future__ import annotations

import numpy as np

from tamiyo.policy.feature_schema import FEATURE_SCHEMA
from tamiyo.policy.features import GraphTensors, featurize_many
from tamiyo.policy.snapshot import (
    FLOAT_FIELDS,
    INT_FIELDS,
    MAX_SEEDS,
    GraphSnapshot,
    GraphTopology,
    KernelSet,
)
from tamiyo.v1 import graph_pb2


def chain_topology(
    n: int, *, width: int = 64, seeds: int = 2, prefix: str = "l"
) -> graph_pb2.Topology:
    """A chain of ``n`` square linear layers (``width`` in and out, ids ``{prefix}{i}``) with
    ``seeds`` free seed slots each: the well-formed host of tests, benches and the soak."""
    return graph_pb2.Topology(
        layers=[
            graph_pb2.LayerSpec(
                layer_id=f"{prefix}{i}",
                layer_type=graph_pb2.LAYER_TYPE_LINEAR,
                input_size=width,
                output_size=width,
                parameter_count=width * width + width,
                seed_count=seeds,
            )
            for i in range(n)
        ],
        edges=[graph_pb2.Edge(source=i, target=i + 1) for i in range(n - 1)],
    )


def random_topology(rng: np.random.Generator, n: int, extra_edges: float = 0.5) -> GraphTopology:
    """A chain of ``n`` layers plus about ``extra_edges × n`` random skip connections."""
    chain = np.stack([np.arange(n - 1), np.arange(1, n)]) if n > 1 else np.zeros((2, 0))
    m = int(extra_edges * n) if n > 2 else 0
    src = rng.integers(0, max(n - 2, 1), m)
    dst = np.minimum(src + rng.integers(2, max(n // 4, 3), m), n - 1)
    skip = np.stack([src, dst])[:, src != dst]
    return GraphTopology.build(
        [f"layer{i}" for i in range(n)],
        rng.integers(1, 8, n),
        rng.integers(16, 4097, n),
        rng.integers(16, 4097, n),
        rng.integers(0, 10_000_000, n),
        rng.integers(0, 5, n),
        np.concatenate([chain, skip], axis=1).astype(np.int64),
    )


def random_snapshot(
    rng: np.random.Generator,
    n: int,
    k: int = 3,
    window: int = FEATURE_SCHEMA.window,
    missing: float = 0.1,
) -> GraphSnapshot:
    """A snapshot of a random ``n``-layer topology with ``k`` kernels; a ``missing``
    fraction of layers has no telemetry and the others a partly filled window."""
    topo = random_topology(rng, n)
    kernels = KernelSet.build([f"k{j}" for j in range(k)], rng.integers(0, 100_000, k))
    fill = np.where(rng.random(n) < missing, 0, rng.integers(1, window + 1, n))
    valid = np.arange(window)[None, :] >= (window - fill)[:, None]
    floats = rng.random((n, window, len(FLOAT_FIELDS))).astype(np.float32)
    ints = rng.integers(0, 3, (n, window, len(INT_FIELDS)))
    ints[..., INT_FIELDS.index("total_seeds")] = topo.seed_counts[:, None]
    ints[..., INT_FIELDS.index("active_seeds")] = np.minimum(
        ints[..., INT_FIELDS.index("active_seeds")], topo.seed_counts[:, None]
    )
    step = 1000
    steps = step - (window - 1 - np.arange(window))[None, :] * 10 - rng.integers(0, 5, (n, 1))
    steps = np.broadcast_to(steps, (n, window)).copy()
    lens = np.broadcast_to(topo.seed_counts[:, None], (n, window)).copy()
    states = rng.integers(1, 6, (n, window, MAX_SEEDS)).astype(np.uint8)
    states[np.arange(MAX_SEEDS)[None, None, :] >= lens[..., None]] = 0

    def z(a: np.ndarray) -> np.ndarray:
        a = np.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype)
        a.setflags(write=False)
        return a

    return GraphSnapshot(
        topo,
        kernels,
        z(valid),
        z(floats),
        z(ints),
        z(steps),
        z(np.full((n, window), 3)),
        z(1.7e9 + steps.astype(np.float64)),
        z(states),
        z(lens),
        step=step,
        epoch=3,
    )


def random_graphs(seed: int, sizes: list[int], k: int = 3) -> list[GraphTensors]:
    """Featurized random graphs of the given node counts (one per entry)."""
    rng = np.random.default_rng(seed)
    return featurize_many([random_snapshot(rng, n, k) for n in sizes])
