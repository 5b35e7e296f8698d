"""Numpy-backed, immutable views of a host graph (the per-session ring buffer that
makes them is ``tamiyo.policy.signal_window``).

Why numpy and not protobuf: the featurizer must be vectorised (O(1) Python calls per
graph), and the server, the trainer and the simulator must all feed it the same thing.
``GraphSnapshot`` is that thing. It converts losslessly to and from the wire message
``tamiyo.v1.ModelGraphState`` (``snapshot_from_state`` / ``state_from_snapshot``), so a
state logged by the server replays bit-exactly in the trainer.

History layout: every per-layer window array is right-aligned, slot ``W-1`` holds the
newest signal and ``valid[i, w]`` says whether slot ``w`` of layer ``i`` holds one at all.
A layer without any signal has ``valid[i, :] == False``; the featurizer encodes that as
"no telemetry", never as healthy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.policy.signal_decode import FLOAT_FIELDS as FLOAT_FIELDS
from tamiyo.policy.signal_decode import INT_FIELDS as INT_FIELDS
from tamiyo.policy.signal_decode import MAX_SEEDS as MAX_SEEDS
from tamiyo.policy.signal_decode import SignalColumns as SignalColumns
from tamiyo.v1 import graph_pb2

F_HEALTH = FLOAT_FIELDS.index("health_score")

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def _frozen(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class GraphTopology:
    """Static structure of one host model: N layers (nodes) and E directed edges.

    Arrays (read-only): ``layer_types`` int64 [N] (``LayerType`` values), ``input_sizes``,
    ``output_sizes``, ``parameter_counts``, ``seed_counts`` int64 [N], ``edge_index``
    int64 [2, E] (row 0 = source index, row 1 = target index). ``key`` is a content hash
    used to cache the normalised adjacency per topology.
    """

    layer_ids: tuple[str, ...]
    layer_types: IntArray
    input_sizes: IntArray
    output_sizes: IntArray
    parameter_counts: IntArray
    seed_counts: IntArray
    edge_index: IntArray
    key: str

    @property
    def num_nodes(self) -> int:
        return len(self.layer_ids)

    @staticmethod
    def build(
        layer_ids: Sequence[str],
        layer_types: npt.ArrayLike,
        input_sizes: npt.ArrayLike,
        output_sizes: npt.ArrayLike,
        parameter_counts: npt.ArrayLike,
        seed_counts: npt.ArrayLike,
        edge_index: npt.ArrayLike,
    ) -> GraphTopology:
        """Validate shapes and ranges, freeze the arrays and compute the content key."""
        n = len(layer_ids)
        if n == 0:
            raise ValueError("topology.layers: a topology needs at least one layer")
        if len(set(layer_ids)) != n:
            raise ValueError("topology.layers: layer ids must be unique")
        cols = [
            np.asarray(v, dtype=np.int64).reshape(-1)
            for v in (layer_types, input_sizes, output_sizes, parameter_counts, seed_counts)
        ]
        for name, c in zip(
            ("layer_type", "input_size", "output_size", "parameter_count", "seed_count"),
            cols,
            strict=True,
        ):
            if c.shape != (n,):
                raise ValueError(f"topology.layers.{name}: expected {n} values, got {c.shape}")
            if (c < 0).any():
                raise ValueError(f"topology.layers.{name}: negative value")
        if (cols[4] > MAX_SEEDS).any():
            raise ValueError(f"topology.layers.seed_count: more than {MAX_SEEDS} seeds")
        ei: IntArray = np.asarray(edge_index, dtype=np.int64).reshape(2, -1)
        if ei.size and (ei.min() < 0 or ei.max() >= n):
            raise ValueError(f"topology.edges: index out of range for {n} layers")
        if ei.size and (ei[0] == ei[1]).any():
            raise ValueError("topology.edges: self loops are not allowed (source == target)")
        h = hashlib.blake2b(digest_size=16)
        h.update("\x00".join(layer_ids).encode())
        for c in (*cols, ei):
            h.update(np.ascontiguousarray(c).tobytes())
        lt, ins, outs, pcs, seeds = (_frozen(c) for c in cols)
        return GraphTopology(
            tuple(layer_ids), lt, ins, outs, pcs, seeds, _frozen(ei), h.hexdigest()
        )

    @staticmethod
    def from_proto(topology: graph_pb2.Topology) -> GraphTopology:
        layers = topology.layers
        edges = topology.edges
        return GraphTopology.build(
            [lay.layer_id for lay in layers],
            [lay.layer_type for lay in layers],
            [lay.input_size for lay in layers],
            [lay.output_size for lay in layers],
            [lay.parameter_count for lay in layers],
            [lay.seed_count for lay in layers],
            np.array([[e.source for e in edges], [e.target for e in edges]], dtype=np.int64),
        )

    def to_proto(self) -> graph_pb2.Topology:
        t = graph_pb2.Topology()
        for i, lid in enumerate(self.layer_ids):
            t.layers.add(
                layer_id=lid,
                layer_type=int(self.layer_types[i]),
                input_size=int(self.input_sizes[i]),
                output_size=int(self.output_sizes[i]),
                parameter_count=int(self.parameter_counts[i]),
                seed_count=int(self.seed_counts[i]),
            )
        for s, d in self.edge_index.T.tolist():
            t.edges.add(source=s, target=d)
        return t


@dataclass(frozen=True, eq=False)
class KernelSet:
    """Kernels a host offered: ids and parameter counts int64 [K]. K may be 0."""

    kernel_ids: tuple[str, ...]
    parameter_counts: IntArray

    @property
    def num_kernels(self) -> int:
        return len(self.kernel_ids)

    @staticmethod
    def build(kernel_ids: Sequence[str], parameter_counts: npt.ArrayLike) -> KernelSet:
        pc = np.asarray(parameter_counts, dtype=np.int64).reshape(-1)
        if pc.shape != (len(kernel_ids),):
            raise ValueError("kernels.parameter_count: one value per kernel expected")
        if len(set(kernel_ids)) != len(kernel_ids):
            raise ValueError("kernels.kernel_id: kernel ids must be unique")
        return KernelSet(tuple(kernel_ids), _frozen(pc))

    @staticmethod
    def from_proto(kernels: Sequence[graph_pb2.KernelSpec]) -> KernelSet:
        return KernelSet.build([k.kernel_id for k in kernels], [k.parameter_count for k in kernels])


@dataclass(frozen=True, eq=False)
class GraphSnapshot:
    """One host graph at one moment: topology, kernels and a W-slot history per layer.

    Window arrays (read-only, right-aligned, newest in slot W-1):
      ``valid`` bool [N, W]; ``floats`` float32 [N, W, len(FLOAT_FIELDS)];
      ``ints`` int64 [N, W, len(INT_FIELDS)]; ``steps`` int64 [N, W];
      ``epochs`` int64 [N, W]; ``timestamps`` float64 [N, W] (s since Unix epoch);
      ``seed_states`` uint8 [N, W, MAX_SEEDS] (SeedLifecycleState values);
      ``seed_state_len`` int64 [N, W] (length of the signal's seed_states list).
    Invalid slots are all zeros. A ``SignalWindow``'s snapshot is a read-only view of the
    window's storage (kept unchanged by copy-on-write): never write to it by other means
    (``torch.from_numpy`` ignores the read-only flag); copy it first.
    """

    topology: GraphTopology
    kernels: KernelSet
    valid: BoolArray
    floats: FloatArray
    ints: IntArray
    steps: IntArray
    epochs: IntArray
    timestamps: npt.NDArray[np.float64]
    seed_states: npt.NDArray[np.uint8]
    seed_state_len: IntArray
    step: int
    epoch: int

    @property
    def window(self) -> int:
        return int(self.valid.shape[1])

    def equals(self, other: GraphSnapshot) -> bool:
        """Exact equality of every field (for tests and replay checks)."""
        if self.topology.key != other.topology.key or self.step != other.step:
            return False
        if self.epoch != other.epoch or self.kernels.kernel_ids != other.kernels.kernel_ids:
            return False
        pairs = [(getattr(self, f), getattr(other, f)) for f in _WINDOW_FIELDS]
        pairs.append((self.kernels.parameter_counts, other.kernels.parameter_counts))
        return all(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs)


_WINDOW_FIELDS = (
    "valid",
    "floats",
    "ints",
    "steps",
    "epochs",
    "timestamps",
    "seed_states",
    "seed_state_len",
)


def snapshot_from_state(
    state: graph_pb2.ModelGraphState,
    window: int,
    columns: SignalColumns | None = None,
    topology: GraphTopology | None = None,
) -> GraphSnapshot:
    """Build the snapshot of a full ``ModelGraphState`` (Decide path, trainer replay).

    Per layer, signals are stably ordered by step (message order breaks ties) and the
    newest ``window`` are kept. ``columns``: ``state.signals`` already decoded against
    the topology's layer order (the server's validation decodes them; decoding is most
    of the cost). ``topology``: ``GraphTopology.from_proto(state.topology)``, when the
    caller has it (the server's validation keeps the arrays it decoded). Raises
    ValueError naming the offending field.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    topo = GraphTopology.from_proto(state.topology) if topology is None else topology
    kernels = KernelSet.from_proto(state.kernels)
    if columns is None:
        index = {lid: i for i, lid in enumerate(topo.layer_ids)}
        columns = SignalColumns(state.signals, index)
    cols = columns
    n, m = topo.num_nodes, len(cols.layer)
    # Order signals by (layer, step, message position); then rank within each layer
    # from the newest (rank 0) to place them right-aligned into the window.
    order = np.lexsort((np.arange(m), cols.steps, cols.layer))
    layer_sorted = cols.layer[order]
    counts = np.bincount(layer_sorted, minlength=n)
    ends = np.cumsum(counts)
    rank_from_newest = ends[layer_sorted] - 1 - np.arange(m)
    keep = rank_from_newest < window
    src = order[keep]
    rows = layer_sorted[keep]
    slots = window - 1 - rank_from_newest[keep]
    return _assemble(
        topo, kernels, window, rows, slots, src, cols, int(state.step), int(state.epoch)
    )


def _assemble(
    topo: GraphTopology,
    kernels: KernelSet,
    window: int,
    rows: IntArray,
    slots: IntArray,
    src: IntArray,
    cols: SignalColumns,
    step: int,
    epoch: int,
) -> GraphSnapshot:
    n = topo.num_nodes
    valid = np.zeros((n, window), np.bool_)
    valid[rows, slots] = True
    out: dict[str, npt.NDArray[Any]] = {}
    for name, arr in (
        ("floats", cols.floats),
        ("ints", cols.ints),
        ("steps", cols.steps),
        ("epochs", cols.epochs),
        ("timestamps", cols.timestamps),
        ("seed_states", cols.seed_states),
        ("seed_state_len", cols.seed_state_len),
    ):
        buf = np.zeros((n, window, *arr.shape[1:]), arr.dtype)
        buf[rows, slots] = arr[src]
        out[name] = _frozen(buf)
    return GraphSnapshot(topo, kernels, _frozen(valid), step=step, epoch=epoch, **out)


def state_from_snapshot(snap: GraphSnapshot) -> graph_pb2.ModelGraphState:
    """The wire message for a snapshot; ``snapshot_from_state`` of it gives it back.

    Signals are emitted oldest first: ordered by (step, window slot, layer index).
    """
    state = graph_pb2.ModelGraphState(step=snap.step, epoch=snap.epoch)
    state.topology.CopyFrom(snap.topology.to_proto())
    for kid, pc in zip(
        snap.kernels.kernel_ids, snap.kernels.parameter_counts.tolist(), strict=True
    ):
        state.kernels.add(kernel_id=kid, parameter_count=pc)
    li, wi = np.nonzero(snap.valid)
    order = np.lexsort((li, wi, snap.steps[li, wi]))
    li, wi = li[order], wi[order]
    floats = snap.floats[li, wi].tolist()
    ints = snap.ints[li, wi].tolist()
    steps = snap.steps[li, wi].tolist()
    epochs = snap.epochs[li, wi].tolist()
    ts = snap.timestamps[li, wi].tolist()
    lens = snap.seed_state_len[li, wi].tolist()
    states = snap.seed_states[li, wi]
    ids = snap.topology.layer_ids
    for j, layer in enumerate(li.tolist()):
        f, k = floats[j], ints[j]
        state.signals.add(
            layer_id=ids[layer],
            step=steps[j],
            epoch=epochs[j],
            timestamp_s=ts[j],
            health_score=f[0],
            avg_execution_time_ms=f[1],
            activation_variance=f[2],
            dead_neuron_ratio=f[3],
            avg_correlation=f[4],
            gradient_norm=f[5],
            latency_variance=f[6],
            memory_utilization=f[7],
            error_count=k[0],
            active_seeds=k[1],
            total_seeds=k[2],
            adaptation_count=k[3],
            seed_states=states[j, : lens[j]].tolist(),
        )
    return state
