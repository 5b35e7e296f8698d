"""The pipe records between a training process and its client sidecar round-trip exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client import pipe_records as rec
from tamiyo_client.frame_data import FrameData, SignalValues

ints = st.integers(0, 2**31 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
signals = st.builds(
    SignalValues,
    layer_id=st.text(min_size=1, max_size=40),
    step=st.integers(-(2**63), 2**63 - 1),
    epoch=ints,
    timestamp_s=floats,
    health_score=floats,
    avg_execution_time_ms=floats,
    error_count=ints,
    active_seeds=ints,
    total_seeds=ints,
    activation_variance=floats,
    dead_neuron_ratio=floats,
    avg_correlation=floats,
    gradient_norm=floats,
    latency_variance=floats,
    memory_utilization=floats,
    seed_states=st.lists(st.integers(0, 5), max_size=8).map(tuple),
    adaptation_count=ints,
)
frames = st.builds(
    FrameData,
    step=st.integers(0, 2**62),
    epoch=ints,
    signals=st.lists(signals, max_size=6),
    want_decision=st.booleans(),
    request_id=st.text(max_size=20),
    client_clock_us=st.integers(0, 2**62),
)


def one(data: bytes) -> tuple[int, bytes]:
    got = rec.RecordReader().feed(data)
    assert len(got) == 1
    return got[0]


@given(frames)
def test_frame_round_trips_through_struct_records(frame: FrameData) -> None:
    kind, payload = one(rec.encode_frame(frame))
    assert kind == rec.FRAME
    assert rec.decode_frame(kind, payload) == frame


def test_values_struct_cannot_hold_fall_back_to_json_and_survive() -> None:
    sig = SignalValues("a", 1, 0, 1.5, math.nan, 1.0, 2**70, 0, 2, math.inf, 0.0, 0.0, 0.0,
                       0.0, 0.0, (1, 300), 0)  # fmt: skip
    frame = FrameData(3, 0, [sig], True, "r1", 77)
    kind, payload = one(rec.encode_frame(frame))
    assert kind == rec.FRAME_JSON  # 2**70 and the seed state 300 do not fit
    back = rec.decode_frame(kind, payload)
    s = back.signals[0]
    assert (back.step, back.request_id, s.error_count, s.seed_states) == (3, "r1", 2**70, (1, 300))
    assert back.client_clock_us == 77
    assert math.isnan(s.health_score)
    assert s.activation_variance == math.inf
    bad = FrameData(4, 0, [sig._replace(layer_id="nan", error_count=1.5)])  # type: ignore[arg-type]
    kind, payload = one(rec.encode_frame(bad))
    back = rec.decode_frame(kind, payload)
    assert kind == rec.FRAME_JSON
    assert back.signals[0].layer_id == "nan"  # a layer id is never read as a number
    assert back.signals[0].error_count == 1.5  # the sidecar's encoder will name it


@given(st.floats(min_value=0, max_value=1e6) | st.none(), st.text(max_size=30), ints)
def test_decision_record_round_trips(latency: float | None, sid: str, conn: int) -> None:
    d = decision_pb2.AdaptationDecision(decision_id="d1", target_layer_id="l", seed_index=1)
    kind, payload = one(rec.encode_decision(d.SerializeToString(), latency, sid, conn))
    assert kind == rec.DECISION
    raw, lat, sid2, conn2 = rec.decode_decision(payload)
    assert decision_pb2.AdaptationDecision.FromString(raw) == d
    assert (lat, sid2, conn2) == (latency, sid, conn)


@given(st.lists(st.binary(max_size=50), max_size=6), st.integers(1, 7))
def test_reader_reassembles_records_split_anywhere(payloads: list[bytes], cut: int) -> None:
    stream = b"".join(rec.record(rec.OUTCOME, p) for p in payloads)
    reader = rec.RecordReader()
    got = []
    for i in range(0, len(stream), cut):
        got += reader.feed(stream[i : i + cut])
    assert got == [(rec.OUTCOME, p) for p in payloads]


def test_protobuf_frames_travel_as_bytes_and_corrupt_lengths_are_refused() -> None:
    f = pb.TelemetryFrame(step=5, want_decision=True, request_id="x")
    kind, payload = one(rec.frame_record(f))
    assert kind == rec.FRAME_PB
    assert pb.TelemetryFrame.FromString(payload) == f
    with pytest.raises(ValueError, match="corrupt"):
        rec.RecordReader().feed(b"\xff\xff\xff\xff\x02")  # a 4 GiB record
