"""The columnar wire form of a frame's signals (``tamiyo.v1.HealthSignalColumns``).

Why a second form: the server pays ~15 attribute reads per ``HealthSignal`` message to
decode a frame (~100 µs for 32 layers on the event loop); the columnar form carries each
field as one fixed-width packed array that the server turns into numpy with one
``np.frombuffer`` per column and the client writes straight from numpy. The message form
(``TelemetryFrame.signals``) stays the readable one for grpcurl.

One encoder (``encode_signal_columns`` / ``build_signal_columns``) for every client and
the load generator, one raw decoder (``split_columns``) for the server's
``SignalColumns``, and lossless conversions to and from the message form
(``columns_from_signals`` / ``signals_from_columns``). Tests compare every byte string
built here with protobuf's own ``SerializeToString``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.v1 import health_pb2
from tamiyo.wire import varint, varint_tail

_DESC = health_pb2.HealthSignalColumns.DESCRIPTOR

# Numeric per-signal columns: name -> (field number, little-endian numpy dtype). Field
# numbers and names mirror HealthSignal.
NUMERIC_COLUMNS: dict[str, tuple[int, str]] = {
    "health_score": (2, "<f4"),
    "avg_execution_time_ms": (3, "<f4"),
    "activation_variance": (4, "<f4"),
    "dead_neuron_ratio": (5, "<f4"),
    "avg_correlation": (6, "<f4"),
    "gradient_norm": (7, "<f4"),
    "latency_variance": (8, "<f4"),
    "memory_utilization": (9, "<f4"),
    "error_count": (10, "<u4"),
    "active_seeds": (11, "<u4"),
    "total_seeds": (12, "<u4"),
    "adaptation_count": (13, "<u4"),
    "step": (14, "<i8"),
    "epoch": (15, "<u4"),
    "timestamp_s": (16, "<f8"),
}
"""Every numeric column of ``HealthSignalColumns`` except ``seed_state_counts``, in
field-number order: the 8 float fields (``snapshot.FLOAT_FIELDS`` order), the 4 counts
(``snapshot.INT_FIELDS`` order), step, epoch, timestamp."""

LAYER_ID = 1
SEED_STATES = 17
SEED_STATE_COUNTS = 18
_COUNTS_DTYPE = "<u4"

for _name, (_num, _) in NUMERIC_COLUMNS.items():  # the table must match the contract
    assert _DESC.fields_by_name[_name].number == _num, _name
assert _DESC.fields_by_name["layer_id"].number == LAYER_ID
assert _DESC.fields_by_name["seed_states"].number == SEED_STATES
assert _DESC.fields_by_name["seed_state_counts"].number == SEED_STATE_COUNTS
assert len(_DESC.fields) == len(NUMERIC_COLUMNS) + 3

_ORDER = sorted(NUMERIC_COLUMNS.items(), key=lambda kv: kv[1][0])


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


@lru_cache(maxsize=4096)
def layer_id_block(layer_ids: tuple[str, ...]) -> bytes:
    """The serialized ``layer_id`` entries for these ids (the start of every serialized
    ``HealthSignalColumns`` that lists them; cached: hosts reuse one order)."""
    return b"".join(_field(LAYER_ID, lid.encode()) for lid in layer_ids)


def _seed_state_bytes(values: npt.NDArray[np.int64]) -> bytes:
    """Packed varints of enum values (int32; negatives take 10 bytes, as protobuf)."""
    if values.size == 0 or (values.min() >= 0 and values.max() < 0x80):
        return values.astype(np.uint8).tobytes()
    return b"".join(varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values.tolist())


def encode_signal_columns(
    layer_ids: Sequence[str],
    *,
    seed_states: Sequence[Sequence[int] | npt.ArrayLike] | None = None,
    **columns: npt.ArrayLike,
) -> bytes:
    """Serialized ``HealthSignalColumns`` for M signals, from numpy arrays or scalars.

    ``columns`` are keyed by ``HealthSignal`` field names (``step``, ``epoch``,
    ``timestamp_s``, ``health_score``, ...): each an array of M values or a scalar for
    all M; a missing column is all zeros. ``seed_states``: per-signal sequences of
    ``SeedLifecycleState`` values (None = no signal reports seed states). Values are
    converted to the column's wire type (float32 for the float fields, uint32 counts,
    int64 steps) exactly as protobuf would store them; ranges are the server's job.
    Bytes equal ``build_signal_columns(...).SerializeToString()``.
    """
    unknown = set(columns) - set(NUMERIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown HealthSignalColumns fields: {sorted(unknown)}")
    ids = tuple(layer_ids)
    m = len(ids)
    parts = [layer_id_block(ids)]
    counts: npt.NDArray[np.int64] | None = None
    flat: npt.NDArray[np.int64] | None = None
    if seed_states is not None:
        if len(seed_states) != m:
            raise ValueError(f"seed_states: {len(seed_states)} lists for {m} signals")
        arrs = [np.asarray(s, np.int64).reshape(-1) for s in seed_states]
        counts = np.array([a.size for a in arrs], np.int64)
        flat = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
        if not flat.size:
            counts = flat = None
    for name, (num, dtype) in _ORDER:
        if num > SEED_STATES and flat is not None:
            parts.append(_field(SEED_STATES, _seed_state_bytes(flat)))
            flat = None
        if m == 0:
            continue
        a = np.asarray(columns.get(name, 0))
        if a.ndim == 0:
            a = np.full(m, a)
        if a.shape != (m,):
            raise ValueError(f"{name}: expected {m} values, got shape {a.shape}")
        if dtype[1] in "iu":
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name}: integer values expected, got {a.dtype}")
            lo, hi = (0, 2**32 - 1) if dtype == "<u4" else (-(2**63), 2**63 - 1)
            if a.size and (int(a.min()) < lo or int(a.max()) > hi):
                raise ValueError(f"{name}: value out of range for {dtype} (as protobuf)")
        with np.errstate(over="ignore"):  # float32 overflow -> inf, as protobuf stores it
            parts.append(_field(num, a.astype(dtype).tobytes()))
    if flat is not None:
        parts.append(_field(SEED_STATES, _seed_state_bytes(flat)))
    if counts is not None:
        parts.append(_field(SEED_STATE_COUNTS, counts.astype(_COUNTS_DTYPE).tobytes()))
    return b"".join(parts)


def build_signal_columns(
    layer_ids: Sequence[str],
    *,
    seed_states: Sequence[Sequence[int] | npt.ArrayLike] | None = None,
    **columns: npt.ArrayLike,
) -> health_pb2.HealthSignalColumns:
    """``encode_signal_columns`` as a message (for ``TelemetryFrame(signal_columns=...)``)."""
    return health_pb2.HealthSignalColumns.FromString(
        encode_signal_columns(layer_ids, seed_states=seed_states, **columns)
    )


def columns_from_signals(
    signals: Iterable[health_pb2.HealthSignal],
) -> health_pb2.HealthSignalColumns:
    """The columnar form of HealthSignal messages (lossless; order kept)."""
    sigs = list(signals)
    cols: dict[str, Any] = {name: [getattr(s, name) for s in sigs] for name in NUMERIC_COLUMNS}
    states = [list(s.seed_states) for s in sigs]
    any_states = any(states)
    msg = health_pb2.HealthSignalColumns(layer_id=[s.layer_id for s in sigs], **cols)
    if any_states:
        msg.seed_states.extend(v for ss in states for v in ss)
        msg.seed_state_counts.extend(len(ss) for ss in states)
    return msg


def signals_from_columns(
    cols: health_pb2.HealthSignalColumns,
) -> list[health_pb2.HealthSignal]:
    """The message form of well-formed columns (every per-signal column has
    len(layer_id) entries and the seed-state counts add up; ``column_length_error``
    says which column is not). Lossless inverse of ``columns_from_signals``."""
    err = column_length_error(cols)
    if err is not None:
        raise ValueError(f"{err[0]}: {err[1]}")
    m = len(cols.layer_id)
    values = {name: list(getattr(cols, name)) for name in NUMERIC_COLUMNS}
    counts = list(cols.seed_state_counts) or [0] * m
    states = list(cols.seed_states)
    out: list[health_pb2.HealthSignal] = []
    pos = 0
    for i, lid in enumerate(cols.layer_id):
        sig = health_pb2.HealthSignal(layer_id=lid, **{name: v[i] for name, v in values.items()})
        sig.seed_states.extend(states[pos : pos + counts[i]])
        pos += counts[i]
        out.append(sig)
    return out


def column_length_error(cols: health_pb2.HealthSignalColumns) -> tuple[str, str] | None:
    """(column name, message) for the first column whose length is wrong, else None."""
    m = len(cols.layer_id)
    for name in NUMERIC_COLUMNS:
        k = len(getattr(cols, name))
        if k != m:
            return name, f"{k} values, expected {m} (one per layer_id entry)"
    n_counts = len(cols.seed_state_counts)
    n_states = len(cols.seed_states)
    if n_counts == 0:
        if n_states:
            return "seed_state_counts", (
                f"empty, but seed_states has {n_states} values (give one count per signal)"
            )
        return None
    if n_counts != m:
        return "seed_state_counts", f"{n_counts} values, expected {m} (one per layer_id entry)"
    total = sum(cols.seed_state_counts)
    if total != n_states:
        return "seed_states", f"{n_states} values, but seed_state_counts add up to {total}"
    return None


def split_columns(raw: bytes, start: int = 0) -> dict[int, tuple[int, int]] | None:
    """Byte ranges ``(begin, end)`` of the packed columns in a serialized
    ``HealthSignalColumns``, by field number, from offset ``start`` (after a known
    ``layer_id`` prefix); ``layer_id`` entries are skipped. None when the bytes are not in
    the canonical form protobuf writes (a column split in several runs, or an unpacked
    numeric field): the caller then reads the message's containers instead. Unknown
    fields are skipped. Cost: one Python step per column, not per value.
    """
    out: dict[int, tuple[int, int]] = {}
    n = len(raw)
    j = start
    while j < n:
        tag = raw[j]
        j += 1
        if tag >= 0x80:
            tag, j = varint_tail(raw, j, tag)
        wt = tag & 7
        if wt == 2:
            ln = raw[j]
            j += 1
            if ln >= 0x80:
                ln, j = varint_tail(raw, j, ln)
            num = tag >> 3
            if num != LAYER_ID:
                if num in out:
                    return None
                out[num] = (j, j + ln)
            j += ln
        elif tag >> 3 in _KNOWN:
            return None  # a known column not packed
        elif wt == 0:
            while raw[j] >= 0x80:
                j += 1
            j += 1
        elif wt in (1, 5):
            j += 8 if wt == 1 else 4
        else:
            return None
    return out if j == n else None


_KNOWN = frozenset(f.number for f in _DESC.fields)
_SEED_STATES_TAG = varint(SEED_STATES << 3 | 2)
_COUNTS_TAG = varint(SEED_STATE_COUNTS << 3 | 2)


class FrameLayout(NamedTuple):
    """Where the columns of a full frame lie in its canonical serialization: the frame
    lists every layer of the session once, in session order (the usual frame). Offsets
    are those of each column's first value; the float and count columns are evenly
    spaced (``stride4`` bytes apart), so each group is one strided view."""

    prefix: bytes  # the layer_id entries
    m: int  # signals (= layers)
    headers: tuple[tuple[int, bytes], ...]  # (offset, tag + length) of each numeric column
    floats: int  # first float column (health_score)
    ints: int  # first count column (error_count)
    stride4: int  # bytes from one 4-byte column's values to the next's
    step: int
    epoch: int
    timestamp: int
    tail: int  # end of the numeric columns (seed states, if any, follow)
    header_bytes: Callable[[bytes], tuple[int, ...]]  # itemgetter of every header byte
    header_values: tuple[int, ...]  # what it must return


@lru_cache(maxsize=4096)
def full_frame_layout(layer_ids: tuple[str, ...]) -> FrameLayout | None:
    """The layout of a full frame of these layers (None for zero layers)."""
    m = len(layer_ids)
    if not m:
        return None
    raw = encode_signal_columns(layer_ids)  # all zeros: the same layout as any full frame
    prefix = layer_id_block(layer_ids)
    spans = split_columns(raw, len(prefix))
    assert spans is not None
    assert set(spans) == {n for n, _ in NUMERIC_COLUMNS.values()}
    headers = []
    pos = len(prefix)
    for _, (b, e) in sorted(spans.items()):
        headers.append((pos, raw[pos:b]))
        pos = e
    begin = {name: spans[num][0] for name, (num, _) in NUMERIC_COLUMNS.items()}
    stride4 = begin["avg_execution_time_ms"] - begin["health_score"]
    for name, (num, dtype) in NUMERIC_COLUMNS.items():  # the strided groups hold
        assert dtype != "<f4" or begin[name] == begin["health_score"] + (num - 2) * stride4
        assert (
            num > 13 or dtype != "<u4" or begin[name] == begin["error_count"] + (num - 10) * stride4
        )
    return FrameLayout(
        prefix,
        m,
        tuple(headers),
        begin["health_score"],
        begin["error_count"],
        stride4,
        begin["step"],
        begin["epoch"],
        begin["timestamp_s"],
        pos,
        itemgetter(*(off + k for off, head in headers for k in range(len(head)))),
        tuple(b for _, head in headers for b in head),
    )


def locate_seed_columns(raw: bytes, lay: FrameLayout) -> tuple[int, int, int] | None:
    """For bytes laid out as ``lay`` (checked here: the layer prefix and every numeric
    column's tag and length): ``(states_begin, states_end, counts_begin)`` of the seed
    columns, ``(0, 0, 0)`` when absent; None when the bytes are laid out otherwise
    (partial or reordered frame, unknown fields): the caller decodes generally."""
    if not raw.startswith(lay.prefix):
        return None
    try:  # every tag and length byte of the numeric columns, in one C call
        if lay.header_bytes(raw) != lay.header_values:
            return None
    except IndexError:  # shorter than a full frame
        return None
    j = lay.tail
    n = len(raw)
    if j == n:
        return (0, 0, 0)
    if raw[j : j + 2] != _SEED_STATES_TAG:
        return None
    j += 2
    ln = raw[j]
    j += 1
    if ln >= 0x80:
        ln, j = varint_tail(raw, j, ln)
    states = (j, j + ln)
    j += ln
    head = _COUNTS_TAG + varint(4 * lay.m)
    if raw[j : j + len(head)] != head or j + len(head) + 4 * lay.m != n:
        return None
    return states[0], states[1], j + len(head)
