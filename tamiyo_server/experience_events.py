"""Events of the experience log's pipe, and the frame decoding the experience process does.

Why a module of its own: what the server ships (one record per event, see
``tamiyo_server.experience_proc``) becomes these immutable events before assembly
(``tamiyo_server.experience_assembler``), and the two wire forms of a frame's signals are
turned into ``ModelGraphState.signals`` entries here: a frame of ``HealthSignal``
messages by re-tagging its serialised signals in place (``frame_signal_block``); a
columnar frame is read without a protobuf parse (``column_frame_event``) and encoded in
batches by ``tamiyo.experience.column_block`` (``encode_columns``; ``column_signals`` is
the slow path for columns not in protobuf's canonical layout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

from google.protobuf.message import DecodeError

from tamiyo.experience.column_block import FrameBlock, encode_column_blocks
from tamiyo.signal_columns import signals_from_columns
from tamiyo.v1 import decision_pb2, graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.wire import varint_tail

log = logging.getLogger(__name__)

_SIGNAL_TAG = 0x12  # ModelGraphState.signals = 2, wire type 2 (length-delimited)
_FRAME_SIGNAL_TAG = 0x1A  # TelemetryFrame.signals = 3, wire type 2


def _len_prefix(n: int) -> bytes:
    out = bytearray((_SIGNAL_TAG,))
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


_PREFIX = [_len_prefix(n) for n in range(4096)]


def column_signals(columns: bytes, step: int) -> list[health_pb2.HealthSignal]:
    """The signals of a frame sent in the columnar form (serialised
    ``HealthSignalColumns``, see ``tamiyo.signal_columns``) as ``HealthSignal`` messages,
    so a logged state is the same bytes whichever form the host used (the slow path:
    ``tamiyo.experience.column_block`` does it for canonical columns). The server
    validated the columns before the frame reached the log; columns that still do not
    decode give no signals (logged as a warning) rather than stopping the process."""
    try:
        return signals_from_columns(health_pb2.HealthSignalColumns.FromString(columns))
    except (ValueError, DecodeError) as e:
        log.warning("experience: frame step %d has malformed signal columns: %s", step, e)
        return []


_STEP, _EPOCH, _SIGNALS, _WANT, _REQUEST_ID, _COLUMNS = 1, 2, 3, 4, 5, 6  # TelemetryFrame


def column_frame_event(key: str, seq: int, raw: bytes) -> ColumnFrameEvent | None:
    """A serialised ``TelemetryFrame`` in the columnar form as a ``ColumnFrameEvent``, from
    one pass over its few top-level fields (no protobuf parse: the columns stay the
    bytes they came as); None for a frame of ``HealthSignal`` messages (or bytes laid
    out unexpectedly), which the caller parses. Why here and not on the event loop: the
    server ships each frame with one ``SerializeToString`` and nothing else."""
    step = epoch = 0
    want = False
    rid = ""
    cols = b""
    has_cols = False
    n, j = len(raw), 0
    while j < n:
        tag = raw[j]
        j += 1
        if tag >= 0x80:
            tag, j = varint_tail(raw, j, tag)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v = raw[j]
            j += 1
            if v >= 0x80:
                v, j = varint_tail(raw, j, v)
            if num == _STEP:
                step = v - (1 << 64) if v >= 1 << 63 else v
            elif num == _EPOCH:
                epoch = v & 0xFFFFFFFF
            elif num == _WANT:
                want = v != 0
        elif wt == 2:
            ln = raw[j]
            j += 1
            if ln >= 0x80:
                ln, j = varint_tail(raw, j, ln)
            if num == _SIGNALS:
                return None
            if num == _REQUEST_ID:
                rid = raw[j : j + ln].decode()
            elif num == _COLUMNS:
                if has_cols:
                    return None  # split sub-message: let protobuf merge it
                cols, has_cols = raw[j : j + ln], True
            j += ln
        elif wt in (1, 5):
            j += 8 if wt == 1 else 4
        else:
            return None
    if j != n or not has_cols:
        return None
    return ColumnFrameEvent(key, seq, step, epoch, want, rid, cols)


def frame_signal_block(f: pb.TelemetryFrame) -> bytes | None:
    """The frame's signals as consecutive ``ModelGraphState.signals`` entries, from one
    serialisation of the frame and one pass over its top-level fields (the signals are
    re-tagged in place); None if the layout is unexpected (signals not contiguous), and
    the caller falls back to encoding signal by signal."""
    out = bytearray(f.SerializeToString())
    n, j = len(out), 0
    start = end = -1
    while j < n:
        e0 = j
        tag = out[j]
        j += 1
        if tag >= 0x80:  # field number >= 16: multi-byte tag (unknown field)
            tag, j = varint_tail(out, j, tag)
        if tag == _FRAME_SIGNAL_TAG:
            if end >= 0:
                return None  # a second run of signals
            if start < 0:
                start = e0
            out[e0] = _SIGNAL_TAG
        elif start >= 0 and end < 0:
            end = e0
        wt = tag & 7
        if wt == 0:
            while out[j] >= 0x80:
                j += 1
            j += 1
        elif wt == 2:
            ln = out[j]
            j += 1
            if ln >= 0x80:
                ln, j = varint_tail(out, j, ln)
            j += ln
        elif wt in (1, 5):
            j += 8 if wt == 1 else 4
        else:
            return None
    if j != n:
        return None
    if start < 0:
        return b""
    return bytes(out[start : n if end < 0 else end])


# ------------------------------------- queued events (immutable; NamedTuple: cheapest to build)
class Resync(NamedTuple):
    """(Re)start a session: empty at open, or after a loss from ``state`` (serialised
    ``ModelGraphState`` of the session's exact window, see ``tamiyo.experience.encode``)."""

    key: str
    host_id: str
    topology: graph_pb2.Topology
    kernels: tuple[graph_pb2.KernelSpec, ...]
    seq: int
    state: bytes | None
    request_id: str = ""


class FrameEvent(NamedTuple):
    key: str
    seq: int
    frame: pb.TelemetryFrame


class ColumnFrameEvent(NamedTuple):
    """A frame sent in the columnar form, as the server shipped it: its scalars and its
    serialised ``HealthSignalColumns`` (never parsed here when canonical)."""

    key: str
    seq: int
    step: int
    epoch: int
    want_decision: bool
    request_id: str
    columns: bytes

    @staticmethod
    def of(ev: FrameEvent) -> ColumnFrameEvent:
        f = ev.frame
        return ColumnFrameEvent(
            ev.key, ev.seq, int(f.step), int(f.epoch), bool(f.want_decision), f.request_id,
            f.signal_columns.SerializeToString(),
        )  # fmt: skip


class DecisionEvent(NamedTuple):
    key: str
    msg: decision_pb2.AdaptationDecision
    ts_s: float


class OutcomeEvent(NamedTuple):
    key: str
    msg: pb.DecisionOutcome
    ts_s: float


class EndEvent(NamedTuple):
    key: str
    ts_s: float


class UnaryEvent(NamedTuple):
    state: graph_pb2.ModelGraphState
    msg: decision_pb2.AdaptationDecision
    ts_s: float


_COLUMN_BATCH = 256  # columnar frames encoded per numpy pass (bounds temporary memory)


def encode_columns(
    events: Sequence[object], layer_order: Callable[[str], tuple[str, ...]]
) -> dict[int, FrameBlock]:
    """The columnar frames among ``events``, encoded in a few batched numpy passes
    (``tamiyo.experience.column_block``), by ``id`` of their event; frames whose
    columns are not canonical are left out (decoded message by message later).

    A frame's ``layer_id`` entries are first assumed to be its session's layers in
    topology order (``layer_order(session id)``, or its ``Resync`` among ``events``: what
    clients send; checked byte for byte by the layout); only frames listing other
    layers, or another order, have their columns parsed for them."""
    opened: dict[str, tuple[str, ...]] = {}  # sessions (re)started within this batch
    todo: list[tuple[ColumnFrameEvent, tuple[str, ...]]] = []
    for ev in events:
        if isinstance(ev, ColumnFrameEvent):
            ids = opened.get(ev.key)
            todo.append((ev, layer_order(ev.key) if ids is None else ids))
        elif isinstance(ev, Resync):
            opened[ev.key] = tuple(lay.layer_id for lay in ev.topology.layers)
    out: dict[int, FrameBlock] = {}
    for attempt in range(2):
        retry: list[tuple[ColumnFrameEvent, tuple[str, ...]]] = []
        for i in range(0, len(todo), _COLUMN_BATCH):
            chunk = todo[i : i + _COLUMN_BATCH]
            blocks = encode_column_blocks([(ev.columns, ids) for ev, ids in chunk])
            for (ev, _), b in zip(chunk, blocks, strict=True):
                if b is not None:
                    out[id(ev)] = b
                elif attempt == 0 and (own := _column_ids(ev.columns)) is not None:
                    retry.append((ev, own))
        todo = retry
    return out


def _column_ids(columns: bytes) -> tuple[str, ...] | None:
    try:
        return tuple(health_pb2.HealthSignalColumns.FromString(columns).layer_id)
    except DecodeError:
        return None
