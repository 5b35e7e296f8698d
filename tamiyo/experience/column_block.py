"""Columnar frames → ``ModelGraphState.signals`` entries, many frames per numpy pass.

Why: the experience process logs the state each decision saw as serialised
``ModelGraphState`` bytes, and a frame sent in the columnar form
(``TelemetryFrame.signal_columns``, see ``tamiyo.signal_columns``) must log exactly the
bytes the message form would (``HealthSignal`` messages). Building one ``HealthSignal``
per layer (``signals_from_columns``) then serialising cost ~400 µs of CPU per 58-layer
frame — 2/3 of the experience process's work per decision. Here the columns' raw bytes
are read as numpy views (the layout the server already checked: ``full_frame_layout``)
and the protobuf wire form of every signal is written for a whole batch of frames at
once: tags, zero-field omission (proto3: a field whose bits are all zero is not written,
as protobuf's upb encoder does; ``-0.0`` is written), varints, packed seed states
(copied as they came: the column holds the same varints). Cost ~10-20 µs per frame.

Bytes equal ``ModelGraphState(signals=signals_from_columns(cols)).SerializeToString()``
(property-tested against protobuf); a frame whose columns are not in protobuf's
canonical layout gives None and the caller takes the message path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.policy.signal_decode import FLOAT_FIELDS
from tamiyo.signal_columns import FrameLayout, full_frame_layout, locate_seed_columns
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.wire import varint

U8 = npt.NDArray[np.uint8]
BoolA = npt.NDArray[np.bool_]
I64 = npt.NDArray[np.int64]
_SIG = health_pb2.HealthSignal.DESCRIPTOR.fields_by_name
_ENTRY_TAG = varint(graph_pb2.ModelGraphState.DESCRIPTOR.fields_by_name["signals"].number << 3 | 2)
# Float columns of HealthSignalColumns in their wire order.
_FLOATS = FLOAT_FIELDS
_COUNTS = ("error_count", "active_seeds", "total_seeds", "adaptation_count")
_F4, _U4, _I8, _F8 = (np.dtype(t) for t in ("<f4", "<u4", "<i8", "<f8"))


def _tag(name: str, wire_type: int) -> bytes:
    return varint(_SIG[name].number << 3 | wire_type)


class FrameBlock(NamedTuple):
    """One frame's signals as ``ModelGraphState.signals`` entries (tag + length + the
    serialised ``HealthSignal``), in the frame's order; ``layer_ids[i]`` is signal
    ``i``'s layer. ``ends - base`` [M] are the end offsets of the entries in ``block``
    (kept as a view of the batch's array: only the per-layer rings path needs them)."""

    block: bytes
    layer_ids: tuple[str, ...]
    ends: I64
    base: int

    def entries(self) -> list[bytes]:
        """Each signal's entry on its own (for the per-layer rings path)."""
        ends = (self.ends - self.base).tolist()
        starts = [0, *ends[:-1]] if ends else []
        return [self.block[a:b] for a, b in zip(starts, ends, strict=True)]


_NO_ENDS: I64 = np.zeros(0, np.int64)


class _Cols(NamedTuple):
    """A frame's columns as numpy views of its bytes."""

    ids: tuple[str, ...]
    floats: npt.NDArray[np.float32]  # [M, 8] (_FLOATS order)
    counts: npt.NDArray[np.uint32]  # [M, 4] (_COUNTS order)
    step: npt.NDArray[np.int64]  # [M]
    epoch: npt.NDArray[np.uint32]  # [M]
    ts: npt.NDArray[np.float64]  # [M]
    seed_bytes: bytes  # packed SeedLifecycleState varints of all signals
    seed_counts: npt.NDArray[np.uint32]  # [M] values per signal


def _columns(raw: bytes, ids: tuple[str, ...]) -> _Cols | None:
    """Views of serialised ``HealthSignalColumns`` whose ``layer_id`` entries are
    ``ids``; None when the bytes are not in the canonical full-frame layout."""
    lay = _per_ids(ids).layout
    if lay is None:
        return None
    seeds = locate_seed_columns(raw, lay)
    if seeds is None:
        return None
    m, s4 = lay.m, lay.stride4
    floats = np.ndarray((m, 8), _F4, raw, lay.floats, (4, s4))
    counts = np.ndarray((m, 4), _U4, raw, lay.ints, (4, s4))
    step = np.ndarray((m,), _I8, raw, lay.step)
    epoch = np.ndarray((m,), _U4, raw, lay.epoch)
    ts = np.ndarray((m,), _F8, raw, lay.timestamp)
    sb, se, cb = seeds
    seed_counts = np.ndarray((m,), _U4, raw, cb) if cb else np.zeros(m, _U4)
    return _Cols(ids, floats, counts, step, epoch, ts, raw[sb:se], seed_counts)


def _varint(v: npt.NDArray[np.uint64], width: int) -> tuple[U8, BoolA]:
    """Varints of unsigned values (any shape S) → (bytes uint8 [width, *S], present
    [width, *S]), byte-major; ``width`` must hold the largest value (``_width``)."""
    data = np.empty((width, *v.shape), np.uint8)
    mask = np.empty((width, *v.shape), np.bool_)
    mask[0] = True
    for i in range(width):
        data[i] = (v >> np.uint64(7 * i)).astype(np.uint8)
        if i + 1 < width:
            mask[i + 1] = (v >> np.uint64(7 * (i + 1))) != 0
    data &= 0x7F
    data[:-1] |= mask[1:].view(np.uint8) << 7
    return data, mask


def _width(v: npt.NDArray[np.uint64]) -> int:
    """Bytes of the longest varint among ``v`` (1..10)."""
    return max(1, -(-int(v.max(initial=0)).bit_length() // 7))


class _PerIds(NamedTuple):
    ids: tuple[str, ...]
    layout: FrameLayout | None
    table: U8  # layer_id field bytes, padded [M, w]
    lens: I64  # their lengths [M]
    padded: dict[int, U8]  # by width: ``_padded``


_PER_IDS: dict[int, _PerIds] = {}  # by id() of the tuple, which each entry keeps alive


def _per_ids(ids: tuple[str, ...]) -> _PerIds:
    """What depends only on a frame's layer ids, cached by tuple *identity*: a
    session's frames share one tuple, and hashing a tuple of ~60 strings per frame
    (what an lru_cache does) costs more than the lookup is worth."""
    hit = _PER_IDS.get(id(ids))
    if hit is not None and hit.ids is ids:
        return hit
    if len(_PER_IDS) >= 4096:
        _PER_IDS.clear()
    table, lens = _layer_table(ids)
    hit = _PER_IDS[id(ids)] = _PerIds(ids, full_frame_layout(ids), table, lens, {})
    return hit


@lru_cache(maxsize=1024)
def _layer_table(ids: tuple[str, ...]) -> tuple[U8, I64]:
    """``layer_id`` field bytes of each id, padded: uint8 [M, w], and lengths [M]."""
    enc = [
        (_tag("layer_id", 2) + varint(len(b)) + b) if b else b"" for b in (i.encode() for i in ids)
    ]
    w = max((len(b) for b in enc), default=0)
    table = np.zeros((len(enc), w), np.uint8)
    for i, b in enumerate(enc):
        table[i, : len(b)] = np.frombuffer(b, np.uint8)
    lens = np.array([len(b) for b in enc], np.int64)
    table.setflags(write=False)
    lens.setflags(write=False)
    return table, lens


def _padded(p: _PerIds, width: int) -> U8:
    """``p.table`` transposed and padded to ``width`` rows: uint8 [width, M] (cached)."""
    out = p.padded.get(width)
    if out is None:
        t = p.table
        out = np.zeros((width, t.shape[0]), np.uint8)
        out[: t.shape[1]] = t.T
        out.setflags(write=False)
        p.padded[width] = out
    return out


def _seed_spans(cols: Sequence[_Cols]) -> tuple[U8, I64, I64] | None:
    """(all frames' packed seed-state bytes, each row's first byte, byte count); None
    when some frame's counts do not match its values (malformed: the caller falls back)."""
    counts = np.concatenate([c.seed_counts for c in cols]).astype(np.int64)
    s = np.frombuffer(b"".join(c.seed_bytes for c in cols), np.uint8)
    if not s.size:
        if counts.any():
            return None
        zero = np.zeros(counts.shape[0], np.int64)
        return s, zero, zero
    term = s < 0x80  # the last byte of each varint
    last = np.flatnonzero(term)
    # per frame: its bytes end on a value boundary and hold as many values as it counts
    byte_end = np.cumsum([len(c.seed_bytes) for c in cols])
    row_end = np.cumsum([len(c.ids) for c in cols])
    values = np.concatenate(([0], np.cumsum(term)))[byte_end]
    counted = np.concatenate(([0], np.cumsum(counts)))[row_end]
    nonempty = byte_end > np.concatenate(([0], byte_end[:-1]))
    if not np.array_equal(values, counted) or not term[byte_end[nonempty] - 1].all():
        return None
    hi = np.cumsum(counts)
    lo = hi - counts
    start = np.where(lo > 0, last[np.maximum(lo - 1, 0)] + 1, 0)
    end = np.where(hi > 0, last[np.maximum(hi - 1, 0)] + 1, 0)
    return s, start, end - start


_SEED_TAG = np.frombuffer(_tag("seed_states", 2), np.uint8)
_ADAPT_TAG = np.frombuffer(_tag("adaptation_count", 0), np.uint8)
assert _SEED_TAG.size == _ADAPT_TAG.size == 2  # fields 16 and 17: two-byte tags
_TAGS1 = {n: _tag(n, 0)[0] for n in ("step", "epoch", *_COUNTS[:3])}
_FTAGS = np.frombuffer(b"".join(_tag(n, 5) for n in _FLOATS), np.uint8)
_TS_TAG = _tag("timestamp_s", 1)[0]


def _encode(cols: Sequence[_Cols]) -> list[FrameBlock] | None:
    """One pass for all frames: every row's fields are written at fixed positions of a
    [W, R] byte matrix (field-major: W = the widest row's bytes, each field a few
    contiguous rows of R values), with a mask of the bytes present; the entries are the
    masked bytes in signal order (the transposed matrix read row by row)."""
    seeds = _seed_spans(cols)
    if seeds is None:
        return None
    sbytes, sstart, slen = seeds
    floats = np.concatenate([c.floats.T for c in cols], axis=1)  # [8, R]
    r = floats.shape[1]
    ints = np.empty((6, r), np.uint64)  # step, epoch, error, active, total, adaptation
    ints[0] = np.concatenate([c.step for c in cols]).view(np.uint64)
    ints[1] = np.concatenate([c.epoch for c in cols])
    ints[2:] = np.concatenate([c.counts.T for c in cols], axis=1)
    ts = np.concatenate([c.ts for c in cols]).view(np.uint64)
    per = [_per_ids(c.ids) for c in cols]
    lid_w = max(p.table.shape[1] for p in per)
    w_step, w_int = _width(ints[0]), _width(ints[1:])
    w_slen = _width(slen.astype(np.uint64))
    s_w = int(slen.max(initial=0))
    # row positions of each piece
    p_lid = 3  # after the entry tag and a 2-byte length (widened below if needed)
    p_step = p_lid + lid_w
    p_epoch = p_step + 1 + w_step
    p_ts = p_epoch + 1 + w_int
    p_f2 = p_ts + 9
    p_cnt = p_f2 + 10
    p_f6 = p_cnt + 3 * (1 + w_int)
    p_seed = p_f6 + 30
    p_adapt = p_seed + 2 + w_slen + s_w
    width = p_adapt + 2 + w_int
    # (bytes of d outside the mask k are never read: no need to clear them)
    d = np.empty((width, r), np.uint8)
    k = np.zeros((width, r), np.bool_)
    # layer ids
    d[p_lid : p_lid + lid_w] = np.concatenate([_padded(p, lid_w) for p in per], axis=1)
    lens = np.concatenate([p.lens for p in per])
    k[p_lid : p_lid + lid_w] = np.arange(lid_w)[:, None] < lens
    # varint fields: step, epoch, then the three counts, then adaptation_count
    vd, vk = _varint(ints, max(w_step, w_int))  # [w, 6, R]
    present = ints != 0
    vk &= present
    for j, (pos, w, tag) in enumerate(
        (
            (p_step, w_step, _TAGS1["step"]),
            (p_epoch, w_int, _TAGS1["epoch"]),
            (p_cnt, w_int, _TAGS1["error_count"]),
            (p_cnt + 1 + w_int, w_int, _TAGS1["active_seeds"]),
            (p_cnt + 2 * (1 + w_int), w_int, _TAGS1["total_seeds"]),
        )
    ):
        d[pos] = tag
        k[pos] = present[j]
        d[pos + 1 : pos + 1 + w] = vd[:w, j]
        k[pos + 1 : pos + 1 + w] = vk[:w, j]
    d[p_adapt : p_adapt + 2] = _ADAPT_TAG[:, None]
    k[p_adapt : p_adapt + 2] = present[5]
    d[p_adapt + 2 : p_adapt + 2 + w_int] = vd[:w_int, 5]
    k[p_adapt + 2 : p_adapt + 2 + w_int] = vk[:w_int, 5]
    # fixed-width fields: timestamp, 2 + 6 floats (tag byte, then little-endian value)
    d[p_ts] = _TS_TAG
    d[p_ts + 1 : p_ts + 9] = ts.view(np.uint8).reshape(r, 8).T
    ts_present = ts != 0
    k[p_ts : p_ts + 9] = ts_present
    fbits = floats.view(np.uint32)  # [8, R]
    fpresent = fbits != 0
    fb = fbits.view(np.uint8).reshape(8, r, 4)
    for pos, lo, hi in ((p_f2, 0, 2), (p_f6, 2, 8)):
        for i in range(lo, hi):
            q = pos + 5 * (i - lo)
            d[q] = _FTAGS[i]
            d[q + 1 : q + 5] = fb[i].T
            k[q : q + 5] = fpresent[i]
    # entry header: tag + varint length of the signal's bytes, i.e. of what k selects,
    # added up field by field ([R] arrays: cheaper than a pass over k)
    inner = lens + vk.sum(axis=(0, 1), dtype=np.int64) + present[:5].sum(axis=0)
    inner += 2 * present[5] + 9 * ts_present + 5 * fpresent.sum(axis=0)
    # seed states: tag, byte length, the packed values as they came
    if s_w:
        has = slen > 0
        d[p_seed : p_seed + 2] = _SEED_TAG[:, None]
        k[p_seed : p_seed + 2] = has
        ld, lk = _varint(slen.astype(np.uint64), w_slen)  # [w, R]
        lk &= has
        d[p_seed + 2 : p_seed + 2 + w_slen] = ld
        k[p_seed + 2 : p_seed + 2 + w_slen] = lk
        span = np.arange(s_w)
        q = p_seed + 2 + w_slen
        d[q : q + s_w] = sbytes[np.minimum(sstart + span[:, None], sbytes.size - 1)]
        k[q : q + s_w] = span[:, None] < slen
        inner += 2 * has + lk.sum(axis=0) + slen
    w_len = _width(inner.astype(np.uint64))
    if w_len > 2:  # a signal over 16 KB: room for a longer length
        d = np.concatenate([np.zeros((w_len - 2, r), np.uint8), d])
        k = np.concatenate([np.zeros((w_len - 2, r), np.bool_), k])
    d[0] = _ENTRY_TAG[0]
    k[0] = True
    hd, hk = _varint(inner.astype(np.uint64), w_len)
    d[1 : 1 + w_len] = hd
    k[1 : 1 + w_len] = hk
    out = d.T[k.T].tobytes()
    ends = np.cumsum(inner + 1 + hk.sum(axis=0))
    m_of = [len(c.ids) for c in cols]
    frame_end = np.cumsum(m_of)
    last = np.concatenate(([0], ends))[frame_end].tolist()
    blocks = []
    row = pos = 0
    for c, m, end in zip(cols, m_of, last, strict=True):
        blocks.append(FrameBlock(out[pos:end], c.ids, ends[row : row + m], pos))
        row += m
        pos = end
    return blocks


def encode_column_blocks(
    frames: Sequence[tuple[bytes, tuple[str, ...]]],
) -> list[FrameBlock | None]:
    """For each frame, (serialised ``HealthSignalColumns``, the ``layer_id`` entries it
    is expected to start with): its ``FrameBlock``, or None when its bytes are not the
    canonical layout of exactly those layers (or its seed columns do not add up) — the
    caller then finds out the frame's own ids, or decodes it message by message. One
    numpy pass for all frames given (~60 array operations in all)."""
    parsed = [_columns(raw, ids) if ids else None for raw, ids in frames]
    ok = [c for c in parsed if c is not None]
    blocks: list[FrameBlock | None] = []
    whole = _encode(ok) if ok else []
    if whole is None:  # a malformed seed column somewhere: each frame on its own
        for cols in ok:
            one = _encode([cols])
            blocks.append(one[0] if one is not None else None)
    else:
        blocks.extend(whole)
    it = iter(blocks)
    out: list[FrameBlock | None] = []
    for (raw, ids), parsed_cols in zip(frames, parsed, strict=True):
        if parsed_cols is not None:
            out.append(next(it))
        elif not ids and not raw:  # no signals at all
            out.append(FrameBlock(b"", (), _NO_ENDS, 0))
        else:
            out.append(None)
    return out
