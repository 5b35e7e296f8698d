"""The per-session ring buffer of layer signals, and its snapshots.

The server keeps one ``SignalWindow`` per stream and the simulator one per
environment; a decision reads it as an immutable ``GraphSnapshot``
(``tamiyo.policy.snapshot``), usually as a view of the ring rather than a copy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from tamiyo.policy.frame_ingest import FrameChecks, build_checks, write_full_frame
from tamiyo.policy.signal_decode import FLOAT_FIELDS, INT_FIELDS, MAX_SEEDS, SignalColumns
from tamiyo.policy.snapshot import BoolArray, GraphSnapshot, GraphTopology, IntArray, KernelSet
from tamiyo.signal_columns import full_frame_layout
from tamiyo.v1 import health_pb2

_count = np.count_nonzero

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
        self._index = dict(zip(topology.layer_ids, range(topology.num_nodes), strict=True))
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
        ``update``s as usual. Also False for a signal older than its layer's newest
        or newer than ``step`` (the rules of ``newest_steps``)."""
        if self._even is None:
            return False
        self._unshare()
        w = self.window
        slot = self._even % w
        prev = (self._even - 1) % w if self._even else -1  # every layer's newest signal
        got = write_full_frame(raw, checks, self._rw, slot, slot + w, prev, step)
        if got is None:
            return False
        self._even += 1
        self.last_step = max(self.last_step, got[0], int(step))
        self.last_epoch = max(self.last_epoch, got[1])
        return True

    def newest_steps(self) -> IntArray:
        """The step of each layer's newest signal, -1 for a layer without one, int64
        [N]. Why: a layer's steps never go back within a history (a Decide state's rule),
        so the server refuses a frame's signal older than this; the native path
        (``ingest_full``) checks the same against the ring."""
        n = len(self._count)
        count = np.full(n, self._even, np.int64) if self._even is not None else self._count
        steps = self._flat["steps"][self._base + (count - 1) % self.window]
        return np.where(count > 0, steps, -1)

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
