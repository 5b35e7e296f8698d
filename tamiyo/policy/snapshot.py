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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.policy.frame_ingest import FrameChecks, build_checks, write_full_frame
from tamiyo.policy.signal_decode import FLOAT_FIELDS as FLOAT_FIELDS
from tamiyo.policy.signal_decode import INT_FIELDS as INT_FIELDS
from tamiyo.policy.signal_decode import MAX_SEEDS as MAX_SEEDS
from tamiyo.policy.signal_decode import SignalColumns as SignalColumns
from tamiyo.signal_columns import full_frame_layout
from tamiyo.v1 import graph_pb2, health_pb2

F_HEALTH = FLOAT_FIELDS.index("health_score")

_count = np.count_nonzero
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
    state: graph_pb2.ModelGraphState, window: int, columns: SignalColumns | None = None
) -> GraphSnapshot:
    """Build the snapshot of a full ``ModelGraphState`` (Decide path, trainer replay).

    Per layer, signals are stably ordered by step (message order breaks ties) and the
    newest ``window`` are kept. ``columns``: ``state.signals`` already decoded against
    the topology's layer order (the server's validation decodes them; decoding is most
    of the cost). Raises ValueError naming the offending field.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    topo = GraphTopology.from_proto(state.topology)
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


_RECORD = np.dtype(
    [
        ("floats", np.float32, (len(FLOAT_FIELDS),)),
        ("ints", np.int64, (len(INT_FIELDS),)),
        ("steps", np.int64),
        ("epochs", np.int64),
        ("timestamps", np.float64),
        ("seed_state_len", np.int64),
        ("seed_states", np.uint8, (MAX_SEEDS,)),
    ]
)
"""One stored signal: every per-slot array of ``GraphSnapshot`` as one record."""
_max = np.maximum.reduce


@lru_cache(maxsize=1024)
def _valid_rows(n: int, window: int, filled: int) -> BoolArray:
    """Read-only ``valid`` [N, W] when every layer holds ``filled`` signals."""
    v = np.zeros((n, window), np.bool_)
    v[:, window - filled :] = True
    v.setflags(write=False)
    return v


class SignalWindow:
    """Mutable per-session ring buffer of the last ``window`` signals of every layer.

    The server keeps one per stream and the simulator one per environment. Layout: one
    structured array ``[N, 2W]`` of records (``_RECORD``: a signal's floats, ints, step,
    epoch, timestamp, seed states); a layer's k-th signal goes to ring slot ``k % W`` *and*
    to its twin ``k % W + W``. Why records: a full frame (every layer once: the usual
    case) writes one ring column, slot for slot, and the snapshot's arrays are field
    views of one record array. Why twins: while every layer holds as many signals, the
    right-aligned window (oldest to newest) is then the plain slice ``[:, k % W :
    k % W + W]``, so a snapshot is a read-only *view*, not a copy (the copy, 46 KB for
    36 layers, was ~40 µs of event loop per decision in the server). Other frames
    scatter by rows (µs, not per-layer Python), and a snapshot of layers holding
    different numbers of signals is gathered into a copy. Slots never written stay
    zero, which is exactly what an invalid snapshot slot must hold.

    Snapshots stay immutable by copy-on-write: before writing, the window checks
    whether anything still holds a view of its ring (the ring's reference count: every
    numpy view keeps its base alive) and, if so, moves to a copy of the ring, leaving
    the old one to the snapshots. A snapshot is usually consumed (featurized) before the
    host's next frame, so the copy is rare. The inference thread therefore never sees a
    half-written window. Memory: the ring is twice the window (~92 KB for 36 layers), and
    a snapshot alive across writes keeps its old ring. Not thread-safe: one owner (the
    session) writes and snapshots.
    """

    def __init__(self, topology: GraphTopology, kernels: KernelSet, window: int = 8) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.topology = topology
        self.kernels = kernels
        self.window = window
        self._index = {lid: i for i, lid in enumerate(topology.layer_ids)}
        self._layout = full_frame_layout(topology.layer_ids)
        n = topology.num_nodes
        self._ring = np.zeros((n, 2 * window), _RECORD)
        self._views()
        # signals ever written per layer; while they are all equal, ``_even`` is that
        # count and ``_count`` is not kept up to date (a numpy call saved per frame)
        self._count = np.zeros(n, np.int64)
        self._even: int | None = 0
        self._base = np.arange(n, dtype=np.int64) * (2 * window)  # first ring row of a layer
        self._slots = np.arange(window, dtype=np.int64)
        self.last_step = 0
        self.last_epoch = 0

    def _views(self) -> None:
        """The working views of a new ``_ring`` [N, 2W], and how many references the
        window itself holds to it."""
        ring = self._ring
        assert ring.base is None, "the ring must own its memory: views reference the owner"
        # Writes go through these views; the ring itself is then made read-only, so a
        # snapshot's views of it cannot be made writeable (numpy refuses once the base
        # is read-only).
        self._rw = ring.view()
        self._flat = ring.reshape(-1)  # view: row i*2W + k = layer i, slot k
        self._bytes = ring.view(np.uint8).reshape(*ring.shape, ring.dtype.itemsize)
        ring.setflags(write=False)
        del ring
        self._own_refs = self._refs()

    def _refs(self) -> int:
        """References to the ring: the window's own, plus one or more per live view
        (every numpy view keeps its base alive). Same call shape wherever it is read."""
        return sys.getrefcount(self._ring)

    def _unshare(self) -> None:
        """Copy-on-write (see the class docstring): a snapshot still views the ring, so
        further writes go to a copy of it. (A byte copy: ~10x faster than numpy's
        field-by-field copy of a record array.)"""
        if self._refs() > self._own_refs:
            ring = np.empty_like(self._ring)  # owns its memory (views reference it)
            ring.view(np.uint8).reshape(self._bytes.shape)[...] = self._bytes
            self._ring = ring
            del ring
            self._views()

    def _twin(self, slot: int) -> None:
        """Copy ring column ``slot`` (< W) to its twin ``slot + W``."""
        self._bytes[:, slot + self.window] = self._bytes[:, slot]

    def decode(self, signals: Sequence[health_pb2.HealthSignal]) -> SignalColumns:
        """Decode a frame's signals against this window's layers (ValueError naming the
        field); pass the result to ``update`` to avoid decoding twice."""
        return SignalColumns(signals, self._index)

    def decode_columns(self, columns: health_pb2.HealthSignalColumns) -> SignalColumns:
        """``decode`` for the columnar form (``TelemetryFrame.signal_columns``)."""
        return SignalColumns.from_columns(columns, self._index, self._layout)

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
            self._unshare()
            w = self.window
            full = m == self.topology.num_nodes and (cols.all_layers or _is_arange(cols.layer))
            slot = -1
            if self._even is not None and full:
                slot = self._even % w
                target = self._rw[:, slot]  # one ring column, layer order
                src: IntArray | slice = slice(None)
                self._even += 1
            else:
                if self._even is not None:
                    self._count[:] = self._even
                layer = cols.layer
                per_layer = np.bincount(layer, minlength=len(self._count))
                if per_layer.max() == 1:  # one signal per layer
                    src = slice(None)
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
                self._even = None
                target = self._flat[rows]  # (a copy: written back below)
            target["floats"] = cols.floats[src]
            target["ints"] = cols.ints[src]
            target["steps"] = cols.steps[src]
            target["epochs"] = cols.epochs[src]
            target["timestamps"] = cols.timestamps[src]
            target["seed_state_len"] = cols.seed_state_len[src]
            target["seed_states"] = cols.seed_states[src]
            if slot >= 0:
                self._twin(slot)
            else:
                self._flat[rows] = target
                self._flat[rows + w] = target
                self._even = self._even_count()
            self.last_step = max(self.last_step, int(_max(cols.steps)))
            self.last_epoch = max(self.last_epoch, int(_max(cols.epochs)))
        if step is not None:
            self.last_step = max(self.last_step, int(step))

    def frame_checks(
        self,
        hi: npt.ArrayLike,
        bounds: npt.ArrayLike,
        declared: npt.ArrayLike,
        state_range: tuple[int, int],
    ) -> FrameChecks | None:
        """The rules of a valid signal, laid out for ``ingest_full`` (``frame_ingest``):
        per float column its upper bound ``hi`` (all lower bounds are 0), per layer the
        upper ``bounds`` [N, 4] of the counts and the ``declared`` seed count,
        the valid seed-state values. None for a window of no layers."""
        if self._layout is None:
            return None
        return build_checks(
            self._layout,
            self._ring.dtype,
            2 * self.window,  # the ring's slots, twins included (the native path writes < W)
            hi,
            bounds,
            declared,
            state_range,
            INT_FIELDS.index("total_seeds"),
        )

    def ingest_full(self, raw: bytes, checks: FrameChecks, step: int) -> bool:
        """``update`` with a full columnar frame (``raw``: its serialized
        ``HealthSignalColumns``), checked against ``checks`` and written by the native
        code (``frame_ingest``). False, with nothing written, when the frame is not a
        valid full frame in canonical layout, when the layers hold different numbers of
        signals, or without the native module: the caller then decodes, validates and
        ``update``s as usual."""
        if self._even is None:
            return False
        self._unshare()
        slot = self._even % self.window
        got = write_full_frame(raw, checks, self._rw, slot, slot + self.window)
        if got is None:
            return False
        self._even += 1
        self.last_step = max(self.last_step, got[0], int(step))
        self.last_epoch = max(self.last_epoch, got[1])
        return True

    def _even_count(self) -> int | None:
        c = self._count
        first = int(c[0]) if len(c) else 0
        return first if not _count(c != first) else None

    def snapshot(self, step: int | None = None, epoch: int | None = None) -> GraphSnapshot:
        """Immutable right-aligned window at host ``step`` / ``epoch``: a read-only view
        of the ring while every layer holds as many signals (copy-on-write keeps it
        unchanged, see the class docstring), a copy otherwise."""
        w = self.window
        n = len(self._count)
        if self._even is not None:
            first = self._even % w  # oldest signal's slot; its newer ones follow (twins)
            out = self._ring[:, first : first + w]
            valid = _valid_rows(n, w, min(self._even, w))
        else:
            count = self._count[:, None]
            # Output slot k of layer i holds ring slot (count_i - w + k) mod w.
            rows = (self._base[:, None] + (count - w + self._slots) % w).reshape(-1)
            flat = self._flat.take(rows)
            flat.setflags(write=False)  # (before the reshape: its view cannot undo it)
            out = flat.reshape(n, w)
            valid = self._slots >= w - np.minimum(count, w)
            valid.setflags(write=False)
        out.setflags(write=False)
        return GraphSnapshot(
            self.topology,
            self.kernels,
            valid,
            out["floats"],
            out["ints"],
            out["steps"],
            out["epochs"],
            out["timestamps"],
            out["seed_states"],
            out["seed_state_len"],
            step=self.last_step if step is None else int(step),
            epoch=self.last_epoch if epoch is None else int(epoch),
        )


def _is_arange(layer: IntArray) -> bool:
    """``layer == arange(len(layer))`` (message-form frames of every layer in order)."""
    m = len(layer)
    return bool(layer[0] == 0 and layer[-1] == m - 1 and not _count(np.diff(layer) != 1))
