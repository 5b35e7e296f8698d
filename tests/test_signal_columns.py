"""The shared columnar encoder writes exactly what protobuf writes, converts losslessly to
and from HealthSignal messages, and the raw decoders find the columns protobuf wrote."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.signal_columns import (
    NUMERIC_COLUMNS,
    build_signal_columns,
    column_length_error,
    columns_from_signals,
    encode_signal_columns,
    full_frame_layout,
    locate_seed_columns,
    signals_from_columns,
    split_columns,
)
from tamiyo.v1 import health_pb2

_S = health_pb2.SeedLifecycleState.ValueType
u32 = st.integers(0, 2**32 - 1)
f32 = st.floats(width=32, allow_nan=False)
VALUES = {
    "<f4": f32,
    "<u4": u32,
    "<i8": st.integers(-(2**63), 2**63 - 1),
    "<f8": st.floats(allow_nan=False),
}


@st.composite
def frames(
    draw: st.DrawFn,
) -> tuple[list[str], dict[str, list[float | int]], list[list[int]] | None]:
    m = draw(st.integers(0, 12))
    ids = draw(st.lists(st.text(min_size=1, max_size=20), min_size=m, max_size=m))
    cols = {
        name: draw(st.lists(VALUES[dtype], min_size=m, max_size=m))
        for name, (_, dtype) in NUMERIC_COLUMNS.items()
        if draw(st.booleans())  # a missing column is all zeros
    }
    states = None
    if draw(st.booleans()):
        value = st.integers(-(2**31), 2**31 - 1) if draw(st.booleans()) else st.integers(0, 5)
        states = [draw(st.lists(value, max_size=6)) for _ in range(m)]
    return ids, cols, states


def reference(
    ids: list[str], cols: dict[str, list[float | int]], states: list[list[int]] | None
) -> health_pb2.HealthSignalColumns:
    """The same columns through protobuf's own API."""
    msg = health_pb2.HealthSignalColumns(layer_id=ids)
    for name in NUMERIC_COLUMNS:
        getattr(msg, name).extend(cols.get(name, [0] * len(ids)))
    if states is not None and any(states):
        msg.seed_states.extend(_S(v) for ss in states for v in ss)
        msg.seed_state_counts.extend(len(ss) for ss in states)
    return msg


@settings(max_examples=150, deadline=None)
@given(frames())
def test_encoder_writes_what_protobuf_writes(
    case: tuple[list[str], dict[str, list[float | int]], list[list[int]] | None],
) -> None:
    ids, cols, states = case
    arrays = {k: np.array(v, NUMERIC_COLUMNS[k][1]) for k, v in cols.items()}
    raw = encode_signal_columns(ids, seed_states=states, **arrays)
    ref = reference(ids, cols, states)
    assert raw == ref.SerializeToString()
    msg = build_signal_columns(ids, seed_states=states, **arrays)
    assert msg == ref
    assert column_length_error(msg) is None
    sigs = signals_from_columns(msg)
    assert [s.layer_id for s in sigs] == ids
    assert columns_from_signals(sigs) == msg  # lossless both ways
    spans = split_columns(raw)
    assert spans is not None
    for name, (num, dtype) in NUMERIC_COLUMNS.items():
        if ids:
            b, e = spans[num]
            got = np.frombuffer(raw[b:e], dtype)
            assert got.tobytes() == np.array(getattr(ref, name), dtype).tobytes(), name


def test_scalars_broadcast_and_bad_input_is_refused() -> None:
    raw = encode_signal_columns(["a", "b"], step=7, health_score=0.5)
    msg = health_pb2.HealthSignalColumns.FromString(raw)
    assert list(msg.step) == [7, 7]
    assert list(msg.health_score) == [0.5, 0.5]
    assert list(msg.error_count) == [0, 0]
    with pytest.raises(ValueError, match="unknown HealthSignalColumns fields"):
        encode_signal_columns(["a"], health=1.0)
    with pytest.raises(ValueError, match="health_score: expected 2 values"):
        encode_signal_columns(["a", "b"], health_score=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="error_count: integer values expected"):
        encode_signal_columns(["a"], error_count=[1.5])
    with pytest.raises(ValueError, match="error_count: value out of range"):
        encode_signal_columns(["a"], error_count=[-1])
    with pytest.raises(ValueError, match="seed_states: 1 lists for 2 signals"):
        encode_signal_columns(["a", "b"], seed_states=[[1]])


def test_column_length_errors_name_the_column() -> None:
    msg = build_signal_columns(["a", "b"], seed_states=[[1], [2, 3]])
    del msg.gradient_norm[-1]
    assert column_length_error(msg) == (
        "gradient_norm",
        "1 values, expected 2 (one per layer_id entry)",
    )
    msg = build_signal_columns(["a", "b"], seed_states=[[1], [2, 3]])
    msg.seed_states.append(_S(1))
    err = column_length_error(msg)
    assert err is not None
    assert err[0] == "seed_states"
    with pytest.raises(ValueError, match="seed_states"):
        signals_from_columns(msg)


def test_split_refuses_non_canonical_bytes_and_skips_unknown_fields() -> None:
    raw = encode_signal_columns(["a"], health_score=0.25)
    unknown = b"\xa8\x06\x05"  # field 101, varint 5 (a newer client's field)
    spans = split_columns(raw + unknown)
    assert spans is not None
    assert spans == split_columns(raw)
    unpacked = b"\x15" + np.array([0.5], "<f4").tobytes()  # field 2 as one fixed32
    assert split_columns(raw + unpacked) is None
    twice = encode_signal_columns(["b"], health_score=0.5)
    assert split_columns(raw + twice) is None  # columns in two runs


def test_full_frame_layout_locates_seed_columns() -> None:
    ids = tuple(f"layer-{i}" for i in range(40))
    lay = full_frame_layout(ids)
    assert lay is not None
    assert full_frame_layout(()) is None
    plain = encode_signal_columns(ids, health_score=np.linspace(0, 1, 40, dtype=np.float32))
    assert locate_seed_columns(plain, lay) == (0, 0, 0)
    floats = np.ndarray((8, 40), "<f4", plain, lay.floats, (lay.stride4, 4))
    assert np.array_equal(floats[0], np.linspace(0, 1, 40, dtype=np.float32))
    seeded = encode_signal_columns(ids, seed_states=[[1, 2]] * 40)
    loc = locate_seed_columns(seeded, lay)
    assert loc is not None
    assert seeded[loc[0] : loc[1]] == bytes([1, 2] * 40)
    assert np.frombuffer(seeded, "<u4", 40, loc[2]).tolist() == [2] * 40
    # not laid out as a full frame of these layers: None (decoded generally)
    assert locate_seed_columns(encode_signal_columns(ids[:-1]), lay) is None
    assert locate_seed_columns(encode_signal_columns(ids[::-1]), lay) is None
    assert locate_seed_columns(plain + b"\xa8\x06\x05", lay) is None
    assert locate_seed_columns(plain[:-1], lay) is None
