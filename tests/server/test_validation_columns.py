"""The columnar form of a frame's signals validates exactly like the message form: the
same SignalColumns for the same signals, and the same refusal (same signal, same field,
same reason) for the same bad value, named the columnar way."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy.snapshot import SignalColumns
from tamiyo.signal_columns import NUMERIC_COLUMNS, columns_from_signals
from tamiyo.v1 import health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.validation import ValidationError, validate_frame, validate_session_open

from .test_validation import BAD_FLOAT_FIELDS, LIMITS, opens_and_frames

Case = tuple[pb.SessionOpen, pb.TelemetryFrame]
_S = health_pb2.SeedLifecycleState.ValueType


def columnar(frame: pb.TelemetryFrame) -> pb.TelemetryFrame:
    out = pb.TelemetryFrame()
    out.CopyFrom(frame)
    out.ClearField("signals")
    out.signal_columns.CopyFrom(columns_from_signals(frame.signals))
    return out


def outcome(frame: pb.TelemetryFrame, open_: pb.SessionOpen) -> SignalColumns | ValidationError:
    info = validate_session_open(open_, LIMITS)
    try:
        return validate_frame(frame, info, LIMITS, last_step=None)
    except ValidationError as err:
        return err


def expected_columnar_field(field: str, frame: pb.TelemetryFrame) -> str:
    """Independent statement of the naming rule: signals[i].f -> signal_columns.f[i]."""
    m = re.fullmatch(r"frame\.signals\[(\d+)\]\.(\w+)(?:\[(\d+)\])?", field)
    assert m is not None, field
    i, name, k = int(m[1]), m[2], m[3]
    if name == "seed_states" and k is not None:
        offset = sum(len(s.seed_states) for s in frame.signals[:i])
        return f"frame.signal_columns.seed_states[{offset + int(k)}]"
    if name == "seed_states":
        return f"frame.signal_columns.seed_state_counts[{i}]"
    return f"frame.signal_columns.{name}[{i}]"


def assert_same(open_: pb.SessionOpen, frame: pb.TelemetryFrame) -> None:
    a = outcome(frame, open_)
    b = outcome(columnar(frame), open_)
    if isinstance(a, ValidationError):
        assert isinstance(b, ValidationError), (a, b)
        assert b.field == expected_columnar_field(a.field, frame)
        assert b.reason == a.reason
        msg_a = str(a).removeprefix(f"{a.field}: ").replace("also signals[", "also layer_id[")
        assert str(b) == f"{b.field}: {msg_a}"
        return
    assert isinstance(b, SignalColumns), b
    for name in SignalColumns.__slots__:
        if name == "all_layers":
            continue
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert np.array_equal(x, y), name


@settings(max_examples=80, deadline=None)
@given(opens_and_frames())
def test_valid_frames_decode_identically(case: Case) -> None:
    assert_same(*case)


# (field, value) mutations of one signal, each refused by the message form
MUTATIONS: list[tuple[str, object]] = [
    *BAD_FLOAT_FIELDS,
    ("total_seeds", 70),
    ("total_seeds", 1),
    ("active_seeds", 9),
    ("step", -3),
    ("layer_id", "nope"),
    ("layer_id", "x" * 200),
    ("layer_id", "duplicate"),
    ("seed_states", "too_long"),
    ("seed_states", "unknown_value"),
    ("seed_states", "negative_value"),
    ("seed_states", "sixty_five"),
]


def mutate(
    sig: health_pb2.HealthSignal, other: health_pb2.HealthSignal | None, how: object, field: str
) -> None:
    if field == "layer_id" and how == "duplicate":
        if other is not None:
            sig.layer_id = other.layer_id
    elif field == "seed_states":
        n = sig.total_seeds
        del sig.seed_states[:]
        if how == "too_long":
            sig.seed_states.extend([_S(1)] * (n + 1))
        elif how == "sixty_five":
            sig.seed_states.extend([_S(1)] * 65)
        else:
            bad = _S(42 if how == "unknown_value" else -7)
            sig.seed_states.extend([_S(1)] * max(n - 1, 0) + [bad])
    else:
        setattr(sig, field, how)


@settings(max_examples=200, deadline=None)
@given(opens_and_frames(), st.sampled_from(MUTATIONS), st.data())
def test_bad_values_are_refused_alike(
    case: Case, bad: tuple[str, object], data: st.DataObject
) -> None:
    open_, frame = case
    if not frame.signals:
        frame.signals.append(health_pb2.HealthSignal(layer_id="l0", step=frame.step))
    i = data.draw(st.integers(0, len(frame.signals) - 1))
    j = data.draw(st.integers(0, len(frame.signals) - 1))
    other = frame.signals[j] if j != i else None
    mutate(frame.signals[i], other, bad[1], bad[0])
    assert_same(open_, frame)
    if bad not in (("layer_id", "duplicate"), ("total_seeds", 1)):  # (may be valid)
        assert isinstance(outcome(columnar(frame), open_), ValidationError)


@settings(max_examples=60, deadline=None)
@given(opens_and_frames(), st.data())
def test_several_bad_values_first_one_named_alike(case: Case, data: st.DataObject) -> None:
    open_, frame = case
    if not frame.signals:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame.signals) - 1))
        field, value = data.draw(st.sampled_from(MUTATIONS))
        mutate(frame.signals[i], frame.signals[0] if i else None, value, field)
    assert_same(open_, frame)


COLUMNS = [*NUMERIC_COLUMNS, "seed_state_counts"]


@settings(max_examples=80, deadline=None)
@given(opens_and_frames(), st.sampled_from(COLUMNS), st.booleans())
def test_wrong_column_length_names_the_column(case: Case, column: str, longer: bool) -> None:
    open_, frame = case
    col = columnar(frame)
    c = col.signal_columns
    container = getattr(c, column)
    if longer:
        container.append(0)
    elif len(container):
        del container[-1]
    else:
        return
    counts = list(c.seed_state_counts)
    m = len(c.layer_id)
    if column == "seed_state_counts" and len(counts) == m and sum(counts) == len(c.seed_states):
        # e.g. one zero count per signal where none was needed: still well-formed
        assert isinstance(outcome(col, open_), SignalColumns)
        return
    err = outcome(col, open_)
    assert isinstance(err, ValidationError)
    assert err.reason == "bad_length"
    if column == "seed_state_counts":  # a count too many or too few, or counts without states
        assert err.field in (
            "frame.signal_columns.seed_state_counts",
            "frame.signal_columns.seed_states",
        )
    else:
        assert err.field == f"frame.signal_columns.{column}"
    assert str(err).startswith(f"{err.field}: ")


def test_seed_state_count_total_must_match() -> None:
    open_, frame = _small()
    col = columnar(frame)
    col.signal_columns.seed_states.append(_S(1))
    err = outcome(col, open_)
    assert isinstance(err, ValidationError)
    assert (err.field, err.reason) == ("frame.signal_columns.seed_states", "bad_length")
    col.signal_columns.ClearField("seed_state_counts")
    err = outcome(col, open_)
    assert isinstance(err, ValidationError)
    assert err.field == "frame.signal_columns.seed_state_counts"


def test_both_forms_in_one_frame_are_refused() -> None:
    open_, frame = _small()
    both = columnar(frame)
    both.signals.extend(frame.signals)
    err = outcome(both, open_)
    assert isinstance(err, ValidationError)
    assert (err.field, err.reason) == ("frame.signal_columns", "conflicting_fields")
    assert "frame.signals" in str(err)
    assert "frame.signal_columns" in str(err)


def test_too_many_signals_in_columns() -> None:
    open_, frame = _small()
    info = validate_session_open(open_, LIMITS)
    small = type(LIMITS)(max_signals_per_frame=1)
    with pytest.raises(ValidationError) as err:
        validate_frame(columnar(frame), info, small, None)
    assert (err.value.field, err.value.reason) == ("frame.signal_columns.layer_id", "too_large")


def test_empty_columns_frame_is_valid_and_empty() -> None:
    open_, _ = _small()
    frame = pb.TelemetryFrame(step=1, signal_columns=health_pb2.HealthSignalColumns())
    assert frame.HasField("signal_columns")
    cols = outcome(frame, open_)
    assert isinstance(cols, SignalColumns)
    assert len(cols.layer) == 0


def test_out_of_order_and_partial_columns() -> None:
    """Not the session's full layer order: ids are matched one by one."""
    open_, frame = _small()
    sigs = list(frame.signals)
    partial = pb.TelemetryFrame(step=frame.step)
    partial.signals.extend([sigs[2], sigs[0]])
    assert_same(open_, partial)
    cols = outcome(columnar(partial), open_)
    assert isinstance(cols, SignalColumns)
    assert cols.layer.tolist() == [2, 0]
    assert not cols.all_layers
    full = outcome(columnar(frame), open_)
    assert isinstance(full, SignalColumns)
    assert full.all_layers


def test_nan_in_columns_named() -> None:
    open_, frame = _small()
    col = columnar(frame)
    col.signal_columns.gradient_norm[1] = math.nan
    err = outcome(col, open_)
    assert isinstance(err, ValidationError)
    assert (err.field, err.reason) == ("frame.signal_columns.gradient_norm[1]", "non_finite")


def _small() -> Case:
    from .test_validation import _open

    open_ = _open(n=3, seeds=2)
    sigs = [
        health_pb2.HealthSignal(
            layer_id=f"l{i}",
            step=5,
            total_seeds=2,
            seed_states=[_S(1), _S(3)],
            health_score=0.5,
        )
        for i in range(3)
    ]
    return open_, pb.TelemetryFrame(step=5, signals=sigs, want_decision=True)


@settings(max_examples=40, deadline=None)
@given(opens_and_frames(), st.sampled_from([b"\xa8\x06\x05", b"\xab\x06\x08\x01\xac\x06"]))
def test_unknown_fields_in_columns_take_the_general_paths(case: Case, unknown: bytes) -> None:
    """A newer client's unknown field (here a varint, or a group, which the raw column
    reader does not walk) moves decoding off the strided fast path: to the per-column
    byte reader or to protobuf's containers. The result is the same either way."""
    open_, frame = case
    col = columnar(frame)
    raw = col.signal_columns.SerializeToString() + unknown
    col.signal_columns.Clear()
    col.signal_columns.MergeFromString(raw)
    a, b = outcome(frame, open_), outcome(col, open_)
    assert isinstance(a, SignalColumns)
    assert isinstance(b, SignalColumns)
    assert not b.all_layers
    for name in SignalColumns.__slots__:
        if name != "all_layers":
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


@settings(max_examples=300, deadline=None)
@given(opens_and_frames(), st.binary(max_size=300), st.integers(0, 400))
def test_garbage_in_columns_is_refused_by_name_never_crashes(
    case: Case, garbage: bytes, cut: int
) -> None:
    """Arbitrary bytes that protobuf parses as HealthSignalColumns (spliced into a real
    frame's columns, or alone): a ValidationError naming a signal_columns field, or
    valid columns; never another exception (which the stream would report as internal)."""
    open_, frame = case
    raw = columnar(frame).signal_columns.SerializeToString()
    for data in (garbage, raw[:cut] + garbage + raw[cut:]):
        col = pb.TelemetryFrame(step=frame.step)
        try:
            col.signal_columns.MergeFromString(data)
        except DecodeError:  # not a message at all: grpc refuses it before we see it
            continue
        got = outcome(col, open_)
        if isinstance(got, ValidationError):
            assert got.field.startswith("frame.signal_columns")
            assert str(got).startswith(f"{got.field}: ")
