"""Fast, batched ``GraphSnapshot`` → serialised ``tamiyo.v1.ModelGraphState`` bytes.

Why not ``state_from_snapshot(snap).SerializeToString()``: building one protobuf
``HealthSignal`` object per (layer, window slot) costs ~5 ms for a 32-layer graph with
an 8-slot window, and the server logs every decision (thousands per second on 2 cores).
This module writes the protobuf wire format directly with numpy, for a whole batch of
snapshots at once (the experience writer's thread calls it once per flush): every
signal becomes one fixed-width row of bytes plus a mask of which bytes are present, and
one boolean gather concatenates them. Cost is a few µs per state, independent of the
number of signals in Python terms.

The bytes parse to a message *equal* to ``state_from_snapshot(snap)`` (same fields, same
signal order: by step, window slot, layer index), so ``snapshot_from_state`` gives the
snapshot back. Scalars are written even when zero (proto3 parsers accept explicit
defaults), so the bytes are valid but not byte-identical to protobuf's own output.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.policy.snapshot import FLOAT_FIELDS, INT_FIELDS, GraphSnapshot, GraphTopology, KernelSet
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.wire import varint

U8 = npt.NDArray[np.uint8]
BoolA = npt.NDArray[np.bool_]
_FIELDS = health_pb2.HealthSignal.DESCRIPTOR.fields_by_name
_SIGNALS_FIELD = graph_pb2.ModelGraphState.DESCRIPTOR.fields_by_name["signals"].number
_MAX_ROWS = 32768  # signal rows encoded per numpy pass (bounds temporary memory)


def _tag(name: str, wire_type: int) -> bytes:
    return varint((_FIELDS[name].number << 3) | wire_type)


def _varint(v: npt.NDArray[np.uint64]) -> tuple[U8, BoolA]:
    """Varint bytes of unsigned values [M] → (bytes uint8 [M, w], present [M, w]), with
    ``w`` the longest varint among them (1..10 bytes)."""
    m = v.shape[0]
    top = int(v.max()) if m else 0
    width = max(1, -(-top.bit_length() // 7))
    data = np.empty((m, width), np.uint8)
    mask = np.empty((m, width), np.bool_)
    mask[:, 0] = True
    for i in range(width):
        chunk = (v >> np.uint64(7 * i)) & np.uint64(0x7F)
        more = (v >> np.uint64(7 * (i + 1))) != 0 if i + 1 < width else np.zeros(m, np.bool_)
        data[:, i] = chunk.astype(np.uint8) | (more.astype(np.uint8) << 7)
        if i + 1 < width:
            mask[:, i + 1] = more
    return data, mask


def _with_tag(tag: bytes, data: U8, mask: BoolA, when: BoolA | None = None) -> tuple[U8, BoolA]:
    m = data.shape[0]
    t = np.broadcast_to(np.frombuffer(tag, np.uint8), (m, len(tag)))
    tm = np.ones((m, len(tag)), np.bool_)
    d, k = np.concatenate([t, data], axis=1), np.concatenate([tm, mask], axis=1)
    if when is not None:
        k &= when[:, None]
    return d, k


def _uvarint_field(name: str, values: npt.NDArray[Any]) -> tuple[U8, BoolA]:
    d, k = _varint(values.astype(np.int64).view(np.uint64))
    return _with_tag(_tag(name, 0), d, k)


def _fixed_fields(names: Sequence[str], raw: U8, size: int) -> tuple[U8, BoolA]:
    """Tagged fixed-size fields: ``raw`` uint8 [M, len(names)·size] little-endian."""
    m = raw.shape[0]
    tags = [_tag(n, 5 if size == 4 else 1) for n in names]
    tl = len(tags[0])
    block = np.empty((m, len(names), tl + size), np.uint8)
    block[:, :, :tl] = np.frombuffer(b"".join(tags), np.uint8).reshape(len(names), tl)
    block[:, :, tl:] = raw.reshape(m, len(names), size)
    flat = block.reshape(m, -1)
    return flat, np.ones(flat.shape, np.bool_)


class StateEncoder:
    """Encodes batches of snapshots; caches per-topology and per-kernel-set pieces.

    Not thread-safe (one owner: the experience writer's thread).
    """

    def __init__(self) -> None:
        self._topo: weakref.WeakKeyDictionary[GraphTopology, tuple[bytes, U8, BoolA]] = (
            weakref.WeakKeyDictionary()
        )
        self._kern: weakref.WeakKeyDictionary[KernelSet, bytes] = weakref.WeakKeyDictionary()

    def _topology(self, t: GraphTopology) -> tuple[bytes, U8, BoolA]:
        """(topology field bytes, layer_id field table uint8 [N, w], its mask [N, w])."""
        hit = self._topo.get(t)
        if hit is None:
            head = graph_pb2.ModelGraphState(topology=t.to_proto()).SerializeToString()
            ids = [
                _tag("layer_id", 2) + varint(len(b)) + b
                for b in (lid.encode() for lid in t.layer_ids)
            ]
            w = max(len(b) for b in ids)
            table = np.zeros((len(ids), w), np.uint8)
            mask = np.zeros((len(ids), w), np.bool_)
            for i, b in enumerate(ids):
                table[i, : len(b)] = np.frombuffer(b, np.uint8)
                mask[i, : len(b)] = True
            hit = self._topo[t] = (head, table, mask)
        return hit

    def _kernels(self, k: KernelSet) -> bytes:
        hit = self._kern.get(k)
        if hit is None:
            msg = graph_pb2.ModelGraphState()
            for kid, pc in zip(k.kernel_ids, k.parameter_counts.tolist(), strict=True):
                msg.kernels.add(kernel_id=kid, parameter_count=pc)
            hit = self._kern[k] = msg.SerializeToString()
        return hit

    def encode(self, snaps: Sequence[GraphSnapshot]) -> list[bytes]:
        """Serialised ``ModelGraphState`` of each snapshot, in order."""
        out: list[bytes] = []
        start = 0
        while start < len(snaps):
            rows = 0
            end = start
            while end < len(snaps) and (end == start or rows < _MAX_ROWS):
                rows += snaps[end].valid.size
                end += 1
            out.extend(self._encode_chunk(snaps[start:end]))
            start = end
        return out

    def _encode_chunk(self, snaps: Sequence[GraphSnapshot]) -> list[bytes]:
        tables = [self._topology(s.topology) for s in snaps]
        nw = np.array([s.valid.size for s in snaps], np.int64)
        w = np.array([s.window for s in snaps], np.int64)
        valid = np.concatenate([s.valid.reshape(-1) for s in snaps])
        snap_of = np.repeat(np.arange(len(snaps)), nw)
        local = np.arange(valid.size) - np.repeat(np.cumsum(nw) - nw, nw)
        layer = local // np.repeat(w, nw)
        slot = local % np.repeat(w, nw)
        steps_all = np.concatenate([s.steps.reshape(-1) for s in snaps])
        sel = np.nonzero(valid)[0]
        sel = sel[np.lexsort((layer[sel], slot[sel], steps_all[sel], snap_of[sel]))]
        m = sel.size
        signal_bytes: bytes = b""
        per_snap = np.zeros(len(snaps), np.int64)
        if m:
            signal_bytes, per_snap = self._rows(snaps, tables, sel, snap_of, layer)
        ends = np.cumsum(per_snap).tolist()
        starts = [0, *ends[:-1]]
        result = []
        for i, s in enumerate(snaps):
            head = graph_pb2.ModelGraphState(step=s.step, epoch=s.epoch).SerializeToString()
            result.append(
                b"".join(
                    (
                        tables[i][0],
                        self._kernels(s.kernels),
                        head,
                        signal_bytes[starts[i] : ends[i]],
                    )
                )
            )
        return result

    def _rows(
        self,
        snaps: Sequence[GraphSnapshot],
        tables: Sequence[tuple[bytes, U8, BoolA]],
        sel: npt.NDArray[np.int64],
        snap_of: npt.NDArray[np.int64],
        layer: npt.NDArray[np.int64],
    ) -> tuple[bytes, npt.NDArray[np.int64]]:
        """Encode the selected (snapshot, layer, slot) rows; bytes and bytes per snapshot."""

        def cat(name: str) -> npt.NDArray[np.generic]:
            arrs = [getattr(s, name) for s in snaps]
            flat = np.concatenate([a.reshape(a.shape[0] * a.shape[1], -1) for a in arrs])
            return flat[sel]

        m = sel.size
        # layer_id: gather from the per-topology tables, padded to the widest id.
        tw = max(t[1].shape[1] for t in tables)
        tab = np.zeros((sum(t[1].shape[0] for t in tables), tw), np.uint8)
        tmask = np.zeros(tab.shape, np.bool_)
        offs = np.zeros(len(tables), np.int64)
        r = 0
        for i, (_, t, k) in enumerate(tables):
            offs[i] = r
            tab[r : r + t.shape[0], : t.shape[1]] = t
            tmask[r : r + t.shape[0], : t.shape[1]] = k
            r += t.shape[0]
        tidx = offs[snap_of[sel]] + layer[sel]
        segs: list[tuple[U8, BoolA]] = [(tab[tidx], tmask[tidx])]
        segs.append(_uvarint_field("step", cat("steps").reshape(m)))
        segs.append(_uvarint_field("epoch", cat("epochs").reshape(m)))
        ts = cat("timestamps").reshape(m).astype("<f8").view(np.uint8).reshape(m, 8)
        segs.append(_fixed_fields(["timestamp_s"], ts, 8))
        fl = cat("floats").astype("<f4").view(np.uint8).reshape(m, -1)
        segs.append(_fixed_fields(FLOAT_FIELDS, fl, 4))
        ints = cat("ints")
        for j, name in enumerate(INT_FIELDS):
            segs.append(_uvarint_field(name, ints[:, j]))
        lens = cat("seed_state_len").reshape(m)
        width = int(lens.max())
        states = np.concatenate(
            [s.seed_states[:, :, :width].reshape(s.valid.size, width) for s in snaps]
        )[sel]
        segs.append(self._seed_states(states, lens))
        data = np.concatenate([d for d, _ in segs], axis=1)
        mask = np.concatenate([k for _, k in segs], axis=1)
        inner = mask.sum(axis=1).astype(np.uint64)
        hd, hk = _varint(inner)
        head = _with_tag(varint((_SIGNALS_FIELD << 3) | 2), hd, hk)
        data = np.concatenate([head[0], data], axis=1)
        mask = np.concatenate([head[1], mask], axis=1)
        row_len = mask.sum(axis=1)
        per_snap = np.bincount(snap_of[sel], weights=row_len, minlength=len(snaps))
        return data[mask].tobytes(), per_snap.astype(np.int64)

    @staticmethod
    def _seed_states(states: npt.NDArray[Any], lens: npt.NDArray[Any]) -> tuple[U8, BoolA]:
        """Packed repeated enum ``seed_states``: tag, byte length, one varint per value."""
        m = lens.shape[0]
        width = int(lens.max()) if m else 0
        v = states.reshape(m, -1)[:, :width].astype(np.uint64)
        present = np.arange(width)[None, :] < lens[:, None]
        two = v >= 128
        payload = np.empty((m, width, 2), np.uint8)
        payload[:, :, 0] = ((v & np.uint64(0x7F)) | (two.astype(np.uint64) << np.uint64(7))).astype(
            np.uint8
        )
        payload[:, :, 1] = (v >> np.uint64(7)).astype(np.uint8)
        pmask = np.stack([present, present & two], axis=2)
        nbytes = pmask.reshape(m, -1).sum(axis=1).astype(np.uint64)
        ld, lk = _varint(nbytes)
        d = np.concatenate([ld, payload.reshape(m, -1)], axis=1)
        k = np.concatenate([lk, pmask.reshape(m, -1)], axis=1)
        return _with_tag(_tag("seed_states", 2), d, k, when=lens > 0)


def encode_states(snaps: Sequence[GraphSnapshot]) -> list[bytes]:
    """One-off convenience: a fresh encoder (no cache across calls)."""
    return StateEncoder().encode(snaps)
