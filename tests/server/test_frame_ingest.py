"""The native path of a full columnar frame (``_ingest.c`` via ``Session.ingest``) decides
and writes exactly as the Python path: the same accept / refuse answer (and the same
error, which the Python path names), and bit-identical windows, frame after frame."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tamiyo.policy.frame_ingest as frame_ingest
from tamiyo.policy.frame_ingest import native_available, write_full_frame
from tamiyo.policy.rules import DecisionRules
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.session import Session
from tamiyo_server.validation import ValidationError, validate_session_open

from .test_validation import LIMITS, signals, topologies
from .test_validation_columns import MUTATIONS, columnar, mutate

# Where a C compiler is (this box, CI) the module must have been built: a silently failed
# build (setup.py marks it optional) would otherwise only show as a slower server.
pytestmark = pytest.mark.skipif(
    not native_available() and not (shutil.which("cc") or shutil.which("gcc")),
    reason="tamiyo.policy._ingest not built (no C compiler at install)",
)


def _sessions(open_: pb.SessionOpen) -> tuple[Session, Session]:
    """(native, python): the same session, with and without the native path."""
    info = validate_session_open(open_, LIMITS)
    native = Session.open(open_, info, DecisionRules(), 0.01, LIMITS)
    python = Session.open(open_, info, DecisionRules(), 0.01)
    assert native.checks is not None
    assert python.checks is None
    return native, python


def _outcome(s: Session, frame: pb.TelemetryFrame) -> tuple[str, str, str] | None:
    try:
        s.ingest(frame, LIMITS)
    except ValidationError as err:
        return err.field, err.reason, str(err)
    return None


def _assert_same_window(a: Session, b: Session) -> None:
    wa, wb = a.window, b.window
    assert wa._ring.tobytes() == wb._ring.tobytes()
    if wa._even is None:
        assert np.array_equal(wa._count, wb._count)
    assert (wa._even, wa.last_step, wa.last_epoch) == (wb._even, wb.last_step, wb.last_epoch)
    assert a.last_step == b.last_step
    sa, sb = wa.snapshot(), wb.snapshot()
    for name in ("valid", "floats", "ints", "steps", "epochs", "timestamps", "seed_states"):
        assert np.array_equal(getattr(sa, name), getattr(sb, name)), name


@st.composite
def sessions_and_frames(draw: st.DrawFn) -> tuple[pb.SessionOpen, list[pb.TelemetryFrame]]:
    """A session and 1-12 columnar frames: mostly full (every layer, in order), some
    partial or reordered, some with one or more bad values, frame steps non-decreasing,
    some signal steps below their layer's newest or above their frame's step."""
    topo = draw(topologies(max_layers=10))
    open_ = pb.SessionOpen(host_id="h", topology=topo)
    frames = []
    step = draw(st.integers(0, 1000))
    for _ in range(draw(st.integers(1, 12))):
        step += draw(st.integers(0, 3))
        layers = list(topo.layers)
        shape = draw(st.sampled_from(["full"] * 6 + ["partial", "reversed"]))
        if shape == "partial":
            layers = [x for x in layers if draw(st.booleans())]
        elif shape == "reversed":
            layers = layers[::-1]
        frame = pb.TelemetryFrame(
            step=step, want_decision=True, signals=[draw(signals(x, step)) for x in layers]
        )
        if frame.signals and draw(st.integers(0, 3)) == 0:  # a signal step off its frame's:
            sig = frame.signals[draw(st.integers(0, len(frame.signals) - 1))]
            # older than that layer's last (refused), older but not (kept), or newer
            # than the frame (refused)
            sig.step = max(0, step + draw(st.sampled_from([-7, -4, -1, 1])))
        if frame.signals and draw(st.integers(0, 3)) == 0:
            for _ in range(draw(st.integers(1, 2))):
                i = draw(st.integers(0, len(frame.signals) - 1))
                field, value = draw(st.sampled_from(MUTATIONS))
                mutate(frame.signals[i], frame.signals[0] if i else None, value, field)
        frames.append(columnar(frame))
    return open_, frames


Case = tuple[pb.SessionOpen, list[pb.TelemetryFrame]]


@settings(max_examples=150, deadline=None)
@given(sessions_and_frames())
def test_native_and_python_paths_agree(case: Case) -> None:
    open_, frames = case
    native, python = _sessions(open_)
    kept = []  # snapshots held while later frames are written (copy-on-write)
    for frame in frames:
        assert _outcome(native, frame) == _outcome(python, frame)
        _assert_same_window(native, python)
        snap = native.window.snapshot()
        kept.append((snap, copy.deepcopy(snap)))
    for snap, was in kept:
        assert snap.equals(was)


def _full(n: int = 4, seeds: int = 2, step: int = 5) -> tuple[pb.SessionOpen, pb.TelemetryFrame]:
    layers = [
        graph_pb2.LayerSpec(layer_id=f"l{i}", input_size=4, output_size=4, seed_count=seeds)
        for i in range(n)
    ]
    open_ = pb.SessionOpen(host_id="h", topology=graph_pb2.Topology(layers=layers))
    sigs = [
        health_pb2.HealthSignal(
            layer_id=f"l{i}",
            step=step,
            epoch=1,
            timestamp_s=1.0e9,
            health_score=0.5,
            total_seeds=seeds,
            active_seeds=1,
            seed_states=[health_pb2.SEED_LIFECYCLE_STATE_DORMANT] * seeds,
        )
        for i in range(n)
    ]
    return open_, columnar(pb.TelemetryFrame(step=step, signals=sigs, want_decision=True))


def test_the_usual_frame_takes_the_native_path() -> None:
    open_, frame = _full()
    native, _ = _sessions(open_)
    raw = frame.signal_columns.SerializeToString()
    assert native.checks is not None
    assert native.window.ingest_full(raw, native.checks, frame.step)
    assert native.window._even == 1
    snap = native.window.snapshot()
    assert snap.valid[:, -1].all()
    assert (snap.seed_state_len[:, -1] == 2).all()
    assert (snap.seed_states[:, -1, :2] == health_pb2.SEED_LIFECYCLE_STATE_DORMANT).all()
    assert not snap.seed_states[:, -1, 2:].any()


@pytest.mark.parametrize(
    "change",
    ["unknown_field", "truncated", "extra_byte", "two_byte_state", "counts_without_states"],
)
def test_other_layouts_are_left_to_python(change: str) -> None:
    """Bytes the native path does not recognise: it writes nothing and says so."""
    open_, frame = _full()
    native, _ = _sessions(open_)
    raw = frame.signal_columns.SerializeToString()
    if change == "unknown_field":
        raw += b"\xa8\x06\x01"  # field 101, varint
    elif change == "truncated":
        raw = raw[:-1]
    elif change == "extra_byte":
        raw += b"\x00"
    elif change == "two_byte_state":  # a valid value written as a 2-byte varint
        cols = health_pb2.HealthSignalColumns.FromString(raw)
        k = raw.index(b"\x8a\x01")
        n = raw[k + 2]
        body = b"\x81\x00" + raw[k + 4 : k + 3 + n]
        raw = raw[:k] + b"\x8a\x01" + bytes([n + 1]) + body + raw[k + 3 + n :]
        assert list(health_pb2.HealthSignalColumns.FromString(raw).seed_states) == list(
            cols.seed_states
        )
    else:
        cols = health_pb2.HealthSignalColumns.FromString(raw)
        cols.ClearField("seed_states")
        cols.seed_state_counts[:] = [0] * len(cols.layer_id)
        raw = cols.SerializeToString()
    before = native.window._ring.tobytes()
    assert native.checks is not None
    assert not native.window.ingest_full(raw, native.checks, frame.step)
    assert native.window._ring.tobytes() == before
    assert native.window._even == 0


@pytest.mark.parametrize(
    ("first", "second", "frame_step", "error"),
    [
        (5, 4, 5, "frame.signal_columns.step[2]: 4 < step 5 of the newest signal of 'l2'"),
        (5, 6, 5, "frame.signal_columns.step[2]: 6 > frame step 5"),
        (5, 5, 5, None),  # the same step again (a step's second frame) is kept
        (5, 3, 7, "frame.signal_columns.step[2]: 3 < step 5 of the newest signal of 'l2'"),
    ],
)
def test_a_signal_step_that_goes_back_or_ahead_is_refused_on_either_path(
    first: int, second: int, frame_step: int, error: str | None
) -> None:
    """A layer's history stays oldest first and no newer than its frame, as Decide
    requires of a state's history; the native path leaves such a frame to Python, which
    names the signal, and nothing of it is written."""
    open_, frame = _full(step=first)
    for s in _sessions(open_):
        s.ingest(frame, LIMITS)
        later = pb.TelemetryFrame()
        later.CopyFrom(frame)
        later.step = frame_step
        later.signal_columns.step[:] = [frame_step] * 4
        later.signal_columns.step[2] = second
        before = s.window._ring.tobytes()
        got = _outcome(s, later)
        if error is None:
            assert got is None
            continue
        assert got is not None
        assert got[2] == error
        assert s.window._ring.tobytes() == before
        assert s.last_step == first


def test_bad_arguments_raise() -> None:
    """A caller's mistake is an exception, never a silent "no"."""
    open_, frame = _full()
    native, _ = _sessions(open_)
    c = native.checks
    assert c is not None
    raw = frame.signal_columns.SerializeToString()
    ring = native.window._rw
    with pytest.raises(ValueError, match="ring"):
        write_full_frame(raw, c, ring[:, :2], 0)
    frozen = ring.copy()
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        write_full_frame(raw, c, frozen, 0)
    with pytest.raises(ValueError, match="plan"):
        write_full_frame(raw, c, ring, ring.shape[1])
    for twin in (0, -2, ring.shape[1]):  # the slot itself, or out of range
        with pytest.raises(ValueError, match="plan"):
            write_full_frame(raw, c, ring, 0, twin)
    for prev in (-2, ring.shape[1]):
        with pytest.raises(ValueError, match="plan"):
            write_full_frame(raw, c, ring, 0, -1, prev)
    with pytest.raises(TypeError, match="bounds"):
        write_full_frame(raw, c._replace(bounds=c.bounds.astype(np.int32)), ring, 0)
    with pytest.raises(ValueError, match="declared"):
        write_full_frame(raw, c._replace(declared=c.declared[:-1]), ring, 0)
    bad_plan = c.plan.copy()
    bad_plan[-2] = 10**6  # a column header past the tail
    with pytest.raises(ValueError, match="header"):
        write_full_frame(raw, c._replace(plan=bad_plan), ring, 0)
    with pytest.raises(ValueError, match="header"):  # (whatever the frame: even empty)
        write_full_frame(b"", c._replace(plan=bad_plan), ring, 0)
    for k in range(len(c.plan)):  # values that would overflow the offset arithmetic
        huge = c.plan.copy()
        huge[k] = 2**62
        with pytest.raises(ValueError, match="out of range"):
            write_full_frame(raw, c._replace(plan=huge), ring, 0)
    objects = np.zeros(ring.shape, [("o", object), ("pad", f"V{ring.itemsize - 8}")])
    with pytest.raises(TypeError, match="objects"):
        write_full_frame(raw, c, objects, 0)
    with pytest.raises(TypeError):
        write_full_frame(bytearray(raw), c, ring, 0)  # type: ignore[arg-type]
    assert not ring.tobytes().strip(b"\x00")  # nothing written by any of them


def test_a_non_canonical_length_is_left_to_python() -> None:
    """A seed-state length written as a 10-byte varint whose high bits are shifted out
    (protobuf refuses to parse it) is not read as the short length."""
    open_, frame = _full()
    native, _ = _sessions(open_)
    raw = frame.signal_columns.SerializeToString()
    k = raw.index(b"\x8a\x01")
    n = raw[k + 2]
    assert n < 0x80
    padded = bytes([n | 0x80]) + b"\x80" * 8 + b"\x02"
    bad = raw[: k + 2] + padded + raw[k + 3 :]
    assert native.checks is not None
    assert write_full_frame(bad, native.checks, native.window._rw, 0) is None
    assert not native.window._ring.tobytes().strip(b"\x00")


def test_a_frame_over_the_signal_limit_is_refused_on_either_path() -> None:
    open_, frame = _full(n=4)
    small = replace(LIMITS, max_signals_per_frame=2)
    info = validate_session_open(open_, small)
    s = Session.open(open_, info, DecisionRules(), 0.01, small)
    assert s.checks is None  # (the native path does not count signals)
    with pytest.raises(ValidationError, match="4 signals > limit 2"):
        s.ingest(frame, small)


def test_without_the_c_module_frames_take_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    open_, frame = _full()
    native, python = _sessions(open_)
    monkeypatch.setattr(frame_ingest, "_ingest", None)
    native.ingest(frame, LIMITS)  # (checks built, module gone: the Python path)
    python.ingest(frame, LIMITS)
    _assert_same_window(native, python)
    assert native.window._even == 1
