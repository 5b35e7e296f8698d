"""Decoding one frame's HealthSignals, in either wire form, into numpy columns.

Why a module of its own: this is the server's per-frame hot path (the event loop decodes
every frame once; validation and the window update share the result) and the place where
the two wire forms, ``HealthSignal`` messages and ``HealthSignalColumns``, must give
bit-identical columns. ``tamiyo.policy.snapshot`` re-exports everything here.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.signal_columns import (
    NUMERIC_COLUMNS,
    SEED_STATES,
    FrameLayout,
    locate_seed_columns,
    split_columns,
)
from tamiyo.v1 import health_pb2

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

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


_SEED_SLOTS = np.arange(MAX_SEEDS, dtype=np.int64)
_F4, _U4, _I8, _F8 = (np.dtype(t) for t in ("<f4", "<u4", "<i8", "<f8"))
_count = np.count_nonzero


@lru_cache(maxsize=256)
def _no_seeds(m: int) -> tuple[IntArray, npt.NDArray[np.uint8]]:
    """Read-only ``seed_state_len`` [M] and ``seed_states`` [M, MAX_SEEDS] of M signals
    without seed states (shared: nothing writes them)."""
    lens = np.zeros(m, np.int64)
    states = np.zeros((m, MAX_SEEDS), np.uint8)
    lens.setflags(write=False)
    states.setflags(write=False)
    return lens, states


_NO_STATES: IntArray = np.zeros(0, np.int64)
_NO_STATES.setflags(write=False)


@lru_cache(maxsize=256)
def _range_list(n: int) -> list[int]:
    return list(range(n))


@lru_cache(maxsize=256)
def _arange(n: int) -> IntArray:
    a = np.arange(n, dtype=np.int64)
    a.setflags(write=False)
    return a


CHUNK = 1024
"""Signals per C-level pass when decoding a large message. Why: each pass (a ``map`` of
an ``attrgetter``, ``list`` of a repeated field) runs in C and keeps the GIL for its
whole length; the server decodes a large Decide state on a thread so the event loop
keeps running, which it can only do between passes (a 16,384-signal state in whole
passes held the GIL ~30 ms at a time)."""


def _listed(signals: Sequence[health_pb2.HealthSignal]) -> list[health_pb2.HealthSignal]:
    if len(signals) <= CHUNK:
        return list(signals)
    out: list[health_pb2.HealthSignal] = []
    for i in range(0, len(signals), CHUNK):
        out.extend(signals[i : i + CHUNK])
    return out


def _flat(kind: str, get: Callable[[Any], Any], sigs: list[Any]) -> array[Any]:
    """``get``'s fields of every signal, flattened into one C array (``kind`` "d"/"q")."""
    if len(sigs) <= CHUNK:
        return array(kind, chain.from_iterable(map(get, sigs)))
    out: array[Any] = array(kind)
    for i in range(0, len(sigs), CHUNK):
        out.extend(chain.from_iterable(map(get, sigs[i : i + CHUNK])))
    return out


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
        "all_layers",
        "epochs",
        "floats",
        "ints",
        "layer",
        "seed_state_len",
        "seed_states",
        "seed_values",
        "steps",
        "timestamps",
    )

    layer: IntArray
    floats: FloatArray
    ints: IntArray
    steps: IntArray
    epochs: IntArray
    timestamps: npt.NDArray[np.float64]
    seed_state_len: IntArray
    seed_states: npt.NDArray[np.uint8]
    seed_values: IntArray  # every signal's seed_states as sent, concatenated, int64 [sum]
    all_layers: bool  # True: one signal per layer, in layer order (layer == arange(N))

    def __init__(
        self, signals: Sequence[health_pb2.HealthSignal], index: Mapping[str, int]
    ) -> None:
        sigs = _listed(signals)  # (iterating a upb repeated field builds wrappers once)
        m = len(sigs)
        try:
            layer = [index[s.layer_id] for s in sigs]
        except KeyError:
            j = next(j for j, s in enumerate(sigs) if s.layer_id not in index)
            lid = sigs[j].layer_id
            raise ValueError(f"signals[{j}].layer_id: unknown layer id {lid[:128]!r}") from None
        if m == len(index) and layer == _range_list(m):  # every layer once, in order
            self.layer = _arange(m)
            self.all_layers = True
        else:
            self.layer = np.array(layer, np.int64)
            self.all_layers = False
        nf = len(FLOAT_FIELDS)
        # one flat C array per group: ~3x faster than np.array of a list of tuples; the
        # columns are views of it (readers copy what they keep)
        fl = np.frombuffer(_flat("d", _GET_FLOATS, sigs), np.float64)
        fl = fl.reshape(m, nf + 1)
        self.floats = fl[:, :nf].astype(np.float32)
        self.timestamps = fl[:, nf]
        ni = len(INT_FIELDS)
        it = np.frombuffer(_flat("q", _GET_INTS, sigs), np.int64)
        it = it.reshape(m, ni + 2)
        self.ints = it[:, :ni]
        self.steps = it[:, ni]
        self.epochs = it[:, ni + 1]
        states = [s.seed_states for s in sigs]
        lens = [len(ss) for ss in states]
        if any(lens):
            self.seed_state_len = np.array(lens, np.int64)
            flat = [v for ss in states for v in ss]
            self._scatter_seed_states(np.array(flat, np.int64), "signals[{}].seed_states")
        else:
            self.seed_state_len, self.seed_states = _no_seeds(m)
            self.seed_values = _NO_STATES
        if _count(np.isfinite(fl)) != fl.size:
            raise ValueError("signals: every float must be finite (NaN/inf found)")

    def _scatter_seed_states(self, flat: IntArray, path: str) -> None:
        """``seed_states`` [M, MAX_SEEDS] from the concatenated states and
        ``seed_state_len`` (values clipped to uint8: validation checks ``seed_values``)."""
        lens = self.seed_state_len
        m = len(lens)
        self.seed_values = flat
        if m and lens.max() > MAX_SEEDS:
            j = int(np.argmax(lens > MAX_SEEDS))
            raise ValueError(f"{path.format(j)}: more than {MAX_SEEDS} entries")
        self.seed_states = np.zeros((m, MAX_SEEDS), np.uint8)
        if flat.size:
            # row-major boolean mask: its True cells are signal 0's states, then 1's, ...
            mask = lens[:, None] > _SEED_SLOTS
            self.seed_states[mask] = flat.clip(0, 255)

    @classmethod
    def from_columns(
        cls,
        msg: health_pb2.HealthSignalColumns,
        index: Mapping[str, int],
        layout: FrameLayout | None = None,
    ) -> SignalColumns:
        """Decode the columnar form (``HealthSignalColumns``) into the same columns as
        the message form gives. ``layout``: ``full_frame_layout`` of the layers of
        ``index`` in index order; a frame laid out so (every layer once, in order: the
        usual frame) is read as strided views of its serialized bytes after one bytes
        comparison of the ids and of each column's tag and length (~20 µs for 32 layers,
        whatever the values); any other frame column by column. Raises ValueError naming
        the column (``signal_columns.health_score``) for a wrong length, an unknown
        layer id, a non-finite float or too many seed states.
        """
        self = cls.__new__(cls)
        raw = msg.SerializeToString()
        seeds = None if layout is None else locate_seed_columns(raw, layout)
        if layout is not None and seeds is not None:
            m = layout.m
            stride = (layout.stride4, 4)
            self.layer = _arange(m)
            self.all_layers = True
            fl = np.ndarray((len(FLOAT_FIELDS), m), _F4, raw, layout.floats, stride)
            self.floats = fl.T
            it = np.ndarray((len(INT_FIELDS), m), _U4, raw, layout.ints, stride)
            self.ints = it.T.astype(np.int64)
            self.steps = np.ndarray((m,), _I8, raw, layout.step)
            self.epochs = np.ndarray((m,), _U4, raw, layout.epoch).astype(np.int64)
            self.timestamps = np.ndarray((m,), _F8, raw, layout.timestamp)
            if seeds[0]:
                self.seed_state_len = np.ndarray((m,), _U4, raw, seeds[2]).astype(np.int64)
                u8 = np.frombuffer(raw, np.uint8, seeds[1] - seeds[0], seeds[0])
                self._seeds_from_wire(msg, u8)
            else:
                self.seed_state_len, self.seed_states = _no_seeds(m)
                self.seed_values = _NO_STATES
        else:
            self._general_columns(msg, raw, index)
        fin = np.isfinite
        ts = self.timestamps
        if _count(fin(self.floats)) != self.floats.size or _count(fin(ts)) != ts.size:
            raise ValueError("signal_columns: every float must be finite (NaN/inf found)")
        return self

    def _general_columns(
        self, msg: health_pb2.HealthSignalColumns, raw: bytes, index: Mapping[str, int]
    ) -> None:
        """``from_columns`` for any frame: ids one by one, columns one by one."""
        ids = list(msg.layer_id)
        m = len(ids)
        try:
            self.layer = np.array([index[lid] for lid in ids], np.int64)
        except KeyError:
            j = next(j for j, lid in enumerate(ids) if lid not in index)
            raise ValueError(
                f"signal_columns.layer_id[{j}]: unknown layer id {ids[j][:128]!r}"
            ) from None
        self.all_layers = False
        spans = split_columns(raw)

        def col(name: str) -> npt.NDArray[Any]:
            num, dtype = NUMERIC_COLUMNS[name]
            if spans is None:  # not canonical bytes: read the container
                a = np.array(getattr(msg, name), dtype)
            else:
                b, e = spans.get(num, (0, 0))
                a = np.frombuffer(raw, dtype, (e - b) // int(dtype[2]), b)
            if len(a) != m:
                raise ValueError(f"signal_columns.{name}: {len(a)} values, expected {m}")
            return a

        self.floats = np.empty((m, len(FLOAT_FIELDS)), np.float32)
        for k, name in enumerate(FLOAT_FIELDS):
            self.floats[:, k] = col(name)
        self.ints = np.empty((m, len(INT_FIELDS)), np.int64)
        for k, name in enumerate(INT_FIELDS):
            self.ints[:, k] = col(name)
        self.steps = col("step").astype(np.int64)
        self.epochs = col("epoch").astype(np.int64)
        self.timestamps = col("timestamp_s").astype(np.float64)
        n_counts = len(msg.seed_state_counts)
        if n_counts not in (0, m):
            raise ValueError(f"signal_columns.seed_state_counts: {n_counts} values, expected {m}")
        if n_counts:
            self.seed_state_len = np.array(msg.seed_state_counts, np.int64)
            if spans is None:
                self._seeds_from_wire(msg, None)
            else:
                b, e = spans.get(SEED_STATES, (0, 0))
                self._seeds_from_wire(msg, np.frombuffer(raw, np.uint8, e - b, b))
        else:
            if len(msg.seed_states):
                raise ValueError("signal_columns.seed_state_counts: empty, but seed_states is not")
            self.seed_state_len, self.seed_states = _no_seeds(m)
            self.seed_values = _NO_STATES

    def _seeds_from_wire(
        self, msg: health_pb2.HealthSignalColumns, u8: npt.NDArray[np.uint8] | None
    ) -> None:
        """Seed states from their packed varint bytes (one byte per value when every
        value is < 128, as every valid state is; else protobuf's container)."""
        if u8 is not None and not _count(u8 >= 0x80):
            flat: IntArray = u8.astype(np.int64)
        else:  # (not canonical bytes, or a value >= 128: protobuf's container)
            flat = np.array(msg.seed_states, np.int64)
        total = int(self.seed_state_len.sum())
        if flat.size != total:
            raise ValueError(
                f"signal_columns.seed_states: {flat.size} values, but "
                f"seed_state_counts add up to {total}"
            )
        self._scatter_seed_states(flat, "signal_columns.seed_state_counts[{}]")
