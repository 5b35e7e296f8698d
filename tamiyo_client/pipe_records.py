"""The byte records a training process and its client sidecar exchange over two pipes.

Why a hand-made format: the training thread encodes a frame every reporting step, so
the encoding must cost a few µs (``struct`` packs a 4-layer frame in ~3-9 µs on this
VM; ``json`` takes ~40-70 µs) and must never run arbitrary code when decoded (no
pickle). Messages that already are protobuf (outcomes, SessionOpen, decisions) travel
as their serialized bytes.

A record is ``<I`` payload length, ``<B`` kind, then the payload. A ``FrameData`` is
packed as ``<qq?HHq`` (step, epoch, want_decision, request id length, signal count,
client clock µs),
the request id (UTF-8), then per signal ``<HH`` (layer id length, seed count), the layer
id, the 15 numeric ``SignalValues`` fields (``_SIGNAL``) and one byte per seed state.
Values ``struct`` cannot hold (a hand-made ``FrameData`` with a float count, a huge
int, a state > 255) make ``encode_frame`` fall back to JSON (``FRAME_JSON``), so the
sidecar's protobuf encoder, not the training thread, reports what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.frame_data import FrameData, SignalValues

# parent -> sidecar
INIT = 1  # JSON: {"config": {...ClientConfig fields}, "security": {...}}
# (2 and 3 were FRAME / FRAME_JSON before client_clock_us: a record from an older
# parent is refused as an unknown kind rather than misread)
FRAME = 12  # struct-packed FrameData
FRAME_JSON = 13  # FrameData as JSON (values struct cannot hold)
FRAME_PB = 4  # a serialized TelemetryFrame (passed to send_frame as protobuf)
OUTCOME = 5  # a serialized DecisionOutcome
SESSION = 6  # a serialized SessionOpen (initial and update_session)
# the seconds the client's close may take, ASCII (e.g. b"4.000"; empty: the sidecar's
# CLOSE_S): flush, half-close the stream, read the last answers, exit
CLOSE = 7
QUERY = 8  # <Q sequence number: answer with a STATUS carrying "query": that number
# sidecar -> parent
DECISION = 10  # <dIH latency (NaN: unmatched), connection, session id length; id; decision
STATUS = 11  # JSON: the sidecar client's counters and state (see sidecar.status)

_HEAD = struct.Struct("<IB")
_FRAME_HEAD = struct.Struct("<qq?HHq")
_SIG_HEAD = struct.Struct("<HH")
# SignalValues[1:15] + adaptation_count: step, epoch, timestamp_s, health_score,
# avg_execution_time_ms, error_count, active_seeds, total_seeds, activation_variance,
# dead_neuron_ratio, avg_correlation, gradient_norm, latency_variance,
# memory_utilization, adaptation_count.
_SIGNAL = struct.Struct("<qqdddqqqddddddq")
_DECISION_HEAD = struct.Struct("<dIH")
MAX_PAYLOAD = 64 * 1024 * 1024  # a longer length prefix means a corrupt stream


def record(kind: int, payload: bytes = b"") -> bytes:
    """One record: length, kind, payload."""
    return _HEAD.pack(len(payload), kind) + payload


def encode_frame(frame: FrameData) -> bytes:
    """``frame`` as a ``FRAME`` record, or a ``FRAME_JSON`` one when struct cannot hold
    its values (the sidecar then reports them as unencodable)."""
    try:
        rid = frame.request_id.encode()
        parts = [_FRAME_HEAD.pack(frame.step, frame.epoch, frame.want_decision, len(rid),
                                  len(frame.signals), frame.client_clock_us), rid]  # fmt: skip
        pack, head = _SIGNAL.pack, _SIG_HEAD.pack
        for s in frame.signals:
            lid, states = s[0].encode(), s[15]
            parts += (head(len(lid), len(states)), lid, pack(*s[1:15], s[16]), bytes(states))
        return record(FRAME, b"".join(parts))
    except (struct.error, TypeError, ValueError, AttributeError, OverflowError):
        return record(FRAME_JSON, _frame_json(frame))


def _frame_json(frame: FrameData) -> bytes:
    def plain(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return repr(v)  # JSON has no NaN/inf: the sidecar turns "nan" back into a float
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v if isinstance(v, int | float | str | bool) or v is None else repr(v)

    body = [frame.step, frame.epoch, bool(frame.want_decision), frame.request_id,
            [plain(tuple(s)) for s in frame.signals], frame.client_clock_us]  # fmt: skip
    return json.dumps(plain(body)).encode()


def decode_frame(kind: int, payload: bytes) -> FrameData:
    """The ``FrameData`` of a ``FRAME`` or ``FRAME_JSON`` payload."""
    if kind == FRAME_JSON:
        step, epoch, want, rid, sigs, clock = json.loads(payload)

        def value(v: Any) -> Any:
            return float(v) if v in ("nan", "inf", "-inf") else v

        signals = [
            SignalValues._make([s[0], *(value(v) for v in s[1:15]), tuple(s[15]), value(s[16])])
            for s in sigs
        ]
        return FrameData(step, epoch, signals, want, rid, clock)
    step, epoch, want, rid_len, count, clock = _FRAME_HEAD.unpack_from(payload)
    pos = _FRAME_HEAD.size
    rid = payload[pos : pos + rid_len].decode()
    pos += rid_len
    signals = []
    for _ in range(count):
        lid_len, n_states = _SIG_HEAD.unpack_from(payload, pos)
        pos += _SIG_HEAD.size
        lid = payload[pos : pos + lid_len].decode()
        pos += lid_len
        v = _SIGNAL.unpack_from(payload, pos)
        pos += _SIGNAL.size
        states = tuple(payload[pos : pos + n_states])
        pos += n_states
        signals.append(SignalValues._make((lid, *v[:14], states, v[14])))
    return FrameData(step, epoch, signals, want, rid, clock)


def encode_decision(decision_bytes: bytes, latency_ms: float | None, session_id: str,
                    connection: int) -> bytes:  # fmt: skip
    """A ``DECISION`` record (the decision as serialized protobuf)."""
    sid = session_id.encode()
    lat = math.nan if latency_ms is None else latency_ms
    return record(DECISION, _DECISION_HEAD.pack(lat, connection, len(sid)) + sid + decision_bytes)


def decode_decision(payload: bytes) -> tuple[bytes, float | None, str, int]:
    """(decision bytes, latency ms or None, session id, connection) of a ``DECISION``."""
    lat, connection, sid_len = _DECISION_HEAD.unpack_from(payload)
    pos = _DECISION_HEAD.size
    sid = payload[pos : pos + sid_len].decode()
    return payload[pos + sid_len :], None if math.isnan(lat) else lat, sid, connection


def encode_json(kind: int, value: Any) -> bytes:
    return record(kind, json.dumps(value).encode())


def frame_record(frame: pb.TelemetryFrame | FrameData) -> bytes:
    """The record carrying what ``send_frame`` was given."""
    if isinstance(frame, FrameData):
        return encode_frame(frame)
    return record(FRAME_PB, frame.SerializeToString())


class RecordReader:
    """Splits a byte stream into records; keeps an incomplete tail for the next feed."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every complete record in what was fed so far, as (kind, payload).
        ValueError when a length prefix is impossible (a corrupt stream)."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            length, kind = _HEAD.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ValueError(f"pipe record of {length} bytes: the stream is corrupt")
            end = pos + _HEAD.size + length
            if end > len(buf):
                break
            out.append((kind, bytes(buf[pos + _HEAD.size : end])))
            pos = end
        del buf[:pos]
        return out
