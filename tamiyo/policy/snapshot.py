"""Numpy-backed, immutable views of a host graph, and the per-session signal ring buffer.

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
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.v1 import graph_pb2, health_pb2

MAX_SEEDS = 64
"""Seeds per layer the snapshot can hold (HealthSignal.total_seeds <= 64)."""

FLOAT_FIELDS: tuple[str, ...] = (
    "health_score",
    "avg_execution_time_ms",
    "activation_variance",
    "dead_neuron_ratio",
    "avg_correlation",
    "gradient_norm",
    "latency_variance",
    "memory_utilization",
)
"""HealthSignal float32 fields, in the order of ``GraphSnapshot.floats[..., s]``."""

INT_FIELDS: tuple[str, ...] = ("error_count", "active_seeds", "total_seeds", "adaptation_count")
"""HealthSignal integer fields, in the order of ``GraphSnapshot.ints[..., s]``."""

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
    Invalid slots are all zeros.
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


_GET_FLOATS = attrgetter(*FLOAT_FIELDS, "timestamp_s")
_GET_INTS = attrgetter(*INT_FIELDS, "step", "epoch")


class SignalColumns:
    """Flat per-signal columns decoded from HealthSignal messages (decode once per frame:
    the server's validation and the window update share them).

    Per signal one C-level ``attrgetter`` call fetches all floats and one all ints, then
    one ``np.array`` per group (per-field Python reads were ~5-10x slower, and numpy row
    assignments inside a Python loop slower still). Shapes: ``layer`` int64 [M],
    ``floats`` float32 [M, 8], ``ints`` int64 [M, 4], ``steps``, ``epochs``,
    ``seed_state_len`` int64 [M], ``timestamps`` float64 [M], ``seed_states`` uint8
    [M, MAX_SEEDS]. Raises ValueError naming the field (unknown layer, non-finite float,
    too many seed states).
    """

    __slots__ = (
        "epochs",
        "floats",
        "ints",
        "layer",
        "seed_state_len",
        "seed_states",
        "steps",
        "timestamps",
    )

    def __init__(
        self, signals: Sequence[health_pb2.HealthSignal], index: Mapping[str, int]
    ) -> None:
        sigs = list(signals)  # (iterating a upb repeated field builds wrappers once)
        m = len(sigs)
        try:
            layer = [index[s.layer_id] for s in sigs]
        except KeyError:
            j = next(j for j, s in enumerate(sigs) if s.layer_id not in index)
            lid = sigs[j].layer_id
            raise ValueError(f"signals[{j}].layer_id: unknown layer id {lid[:128]!r}") from None
        self.layer = np.array(layer, np.int64)
        nf = len(FLOAT_FIELDS)
        # one flat C array per group: ~3x faster than np.array of a list of tuples
        fl = np.frombuffer(array("d", chain.from_iterable(map(_GET_FLOATS, sigs))), np.float64)
        fl = fl.reshape(m, nf + 1)
        self.floats = fl[:, :nf].astype(np.float32)
        self.timestamps = np.ascontiguousarray(fl[:, nf])
        ni = len(INT_FIELDS)
        it = np.frombuffer(array("q", chain.from_iterable(map(_GET_INTS, sigs))), np.int64)
        it = it.reshape(m, ni + 2)
        self.ints = np.ascontiguousarray(it[:, :ni])
        self.steps = np.ascontiguousarray(it[:, ni])
        self.epochs = np.ascontiguousarray(it[:, ni + 1])
        states = [s.seed_states for s in sigs]
        self.seed_state_len = np.array([len(ss) for ss in states], np.int64)
        self.seed_states = np.zeros((m, MAX_SEEDS), np.uint8)
        if m and self.seed_state_len.max() > MAX_SEEDS:
            j = int(np.argmax(self.seed_state_len > MAX_SEEDS))
            raise ValueError(f"signals[{j}].seed_states: more than {MAX_SEEDS} entries")
        if m and self.seed_state_len.any():
            flat = [v for ss in states for v in ss]
            lens = self.seed_state_len
            rows = np.repeat(np.arange(m), lens)
            offs = np.cumsum(lens) - lens
            cols = np.arange(len(flat)) - np.repeat(offs, lens)
            self.seed_states[rows, cols] = np.array(flat, np.int64).clip(0, 255)
        if not np.isfinite(fl).all():
            raise ValueError("signals: every float must be finite (NaN/inf found)")


def snapshot_from_state(state: graph_pb2.ModelGraphState, window: int) -> GraphSnapshot:
    """Build the snapshot of a full ``ModelGraphState`` (Decide path, trainer replay).

    Per layer, signals are stably ordered by step (message order breaks ties) and the
    newest ``window`` are kept. Raises ValueError naming the offending field.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    topo = GraphTopology.from_proto(state.topology)
    kernels = KernelSet.from_proto(state.kernels)
    index = {lid: i for i, lid in enumerate(topo.layer_ids)}
    cols = SignalColumns(state.signals, index)
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


class SignalWindow:
    """Mutable per-session ring buffer of the last ``window`` signals of every layer.

    The server keeps one per stream and the simulator one per environment. Layout: each
    window array is stored flat as [N·W, ...] rows (layer i, ring slot k at row i·W + k),
    so ``update`` is one fancy-index scatter per array and ``snapshot`` one ``np.take`` of
    rows per array, whatever N is (µs, not per-layer Python). Ring rows never written stay
    zero, which is exactly what an invalid snapshot slot must hold, so no masking pass.
    ``snapshot`` returns immutable copies, so the inference thread never sees a
    half-written window. Not thread-safe: one owner (the session) writes and snapshots.
    """

    def __init__(self, topology: GraphTopology, kernels: KernelSet, window: int = 8) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.topology = topology
        self.kernels = kernels
        self.window = window
        self._index = {lid: i for i, lid in enumerate(topology.layer_ids)}
        n = topology.num_nodes
        rows = n * window
        self._count = np.zeros(n, np.int64)  # signals ever written per layer
        self._floats = np.zeros((rows, len(FLOAT_FIELDS)), np.float32)
        self._ints = np.zeros((rows, len(INT_FIELDS)), np.int64)
        self._steps = np.zeros(rows, np.int64)
        self._epochs = np.zeros(rows, np.int64)
        self._timestamps = np.zeros(rows, np.float64)
        self._seed_states = np.zeros((rows, MAX_SEEDS), np.uint8)
        self._seed_state_len = np.zeros(rows, np.int64)
        self._base = np.arange(n, dtype=np.int64) * window  # first ring row of each layer
        self._slots = np.arange(window, dtype=np.int64)
        self.last_step = 0
        self.last_epoch = 0

    def decode(self, signals: Sequence[health_pb2.HealthSignal]) -> SignalColumns:
        """Decode a frame's signals against this window's layers (ValueError naming the
        field); pass the result to ``update`` to avoid decoding twice."""
        return SignalColumns(signals, self._index)

    def update(
        self,
        signals: Sequence[health_pb2.HealthSignal] | SignalColumns,
        step: int | None = None,
    ) -> None:
        """Append one frame's signals (message order = time order within the frame).

        ``signals`` may be already decoded (``decode``). ``step`` is the frame's step; it
        becomes the default ``snapshot`` step, so the age of each layer's newest signal
        is measured against it. Raises ValueError naming the field for an unknown layer
        id or non-finite float, and then writes nothing.
        """
        cols = (
            signals if isinstance(signals, SignalColumns) else SignalColumns(signals, self._index)
        )
        m = len(cols.layer)
        if m:
            w = self.window
            layer = cols.layer
            per_layer = np.bincount(layer, minlength=len(self._count))
            if per_layer.max() == 1:  # the server's case: one signal per layer per frame
                src: IntArray | slice = slice(None)
                rows = self._base[layer] + self._count[layer] % w
            else:  # k-th signal of a layer in this frame goes k slots later
                order = np.argsort(layer, kind="stable")
                starts = np.cumsum(per_layer) - per_layer
                occ = np.empty(m, np.int64)
                occ[order] = np.arange(m) - starts[layer[order]]
                keep = occ >= per_layer[layer] - w  # only the newest w can survive
                src = np.flatnonzero(keep)
                lk = layer[src]
                rows = self._base[lk] + (self._count[lk] + occ[src]) % w
            self._count += per_layer
            self._floats[rows] = cols.floats[src]
            self._ints[rows] = cols.ints[src]
            self._steps[rows] = cols.steps[src]
            self._epochs[rows] = cols.epochs[src]
            self._timestamps[rows] = cols.timestamps[src]
            self._seed_states[rows] = cols.seed_states[src]
            self._seed_state_len[rows] = cols.seed_state_len[src]
            self.last_step = max(self.last_step, int(cols.steps.max()))
            self.last_epoch = max(self.last_epoch, int(cols.epochs.max()))
        if step is not None:
            self.last_step = max(self.last_step, int(step))

    def snapshot(self, step: int | None = None, epoch: int | None = None) -> GraphSnapshot:
        """Immutable right-aligned copy of the window at host ``step`` / ``epoch``."""
        w = self.window
        n = len(self._count)
        count = self._count[:, None]
        # Output slot k of layer i holds ring slot (count_i - w + k) mod w.
        rows = (self._base[:, None] + (count - w + self._slots) % w).reshape(-1)
        valid = self._slots >= w - np.minimum(count, w)

        def take(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            out = a.take(rows, axis=0).reshape((n, w, *a.shape[1:]))
            out.setflags(write=False)
            return out

        valid.setflags(write=False)
        return GraphSnapshot(
            self.topology,
            self.kernels,
            valid,
            take(self._floats),
            take(self._ints),
            take(self._steps),
            take(self._epochs),
            take(self._timestamps),
            take(self._seed_states),
            take(self._seed_state_len),
            step=self.last_step if step is None else int(step),
            epoch=self.last_epoch if epoch is None else int(epoch),
        )
