"""GraphSnapshot <-> ModelGraphState round trips and the SignalWindow ring buffer."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy.features import SignalWindow, snapshot_from_state, state_from_snapshot
from tamiyo.policy.snapshot import GraphTopology, KernelSet
from tamiyo.policy.synthetic import random_snapshot
from tamiyo.signal_columns import columns_from_signals
from tamiyo.v1 import health_pb2

from .conftest import make_state, signal

STATES = list(health_pb2.SeedLifecycleState.values())
finite32 = st.floats(0, 1e6, allow_nan=False, width=32)
unit32 = st.floats(0, 1, allow_nan=False, width=32)


@st.composite
def signals(draw: st.DrawFn, n: int) -> health_pb2.HealthSignal:
    total = draw(st.integers(0, 64))
    return health_pb2.HealthSignal(
        layer_id=f"l{draw(st.integers(0, n - 1))}",
        step=draw(st.integers(0, 2**40)),
        epoch=draw(st.integers(0, 2**32 - 1)),
        timestamp_s=draw(st.floats(0, 4e9, allow_nan=False)),
        health_score=draw(unit32),
        avg_execution_time_ms=draw(finite32),
        error_count=draw(st.integers(0, 2**32 - 1)),
        active_seeds=draw(st.integers(0, total)),
        total_seeds=total,
        activation_variance=draw(finite32),
        dead_neuron_ratio=draw(unit32),
        avg_correlation=draw(unit32),
        gradient_norm=draw(finite32),
        latency_variance=draw(finite32),
        memory_utilization=draw(unit32),
        seed_states=draw(st.lists(st.sampled_from(STATES), min_size=total, max_size=total)),
        adaptation_count=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def states(draw: st.DrawFn) -> tuple[object, int]:
    n = draw(st.integers(1, 8))
    sigs = draw(st.lists(signals(n), max_size=30))
    state = make_state(
        n,
        seeds=draw(st.lists(st.integers(0, 64), min_size=n, max_size=n)),
        signals=sigs,
        step=draw(st.integers(0, 2**40)),
    )
    return state, draw(st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(states())
def test_snapshot_state_snapshot_round_trip(case: tuple[object, int]) -> None:
    state, window = case
    snap = snapshot_from_state(state, window)  # type: ignore[arg-type]
    again = snapshot_from_state(state_from_snapshot(snap), window)
    assert again.equals(snap)
    # Canonical states round-trip byte for byte.
    canon = state_from_snapshot(snap)
    assert state_from_snapshot(again).SerializeToString(
        deterministic=True
    ) == canon.SerializeToString(deterministic=True)


@settings(max_examples=40, deadline=None)
@given(states())
def test_window_keeps_newest_signals_per_layer(case: tuple[object, int]) -> None:
    state, window = case
    snap = snapshot_from_state(state, window)  # type: ignore[arg-type]
    for i, lid in enumerate(snap.topology.layer_ids):
        steps = sorted(s.step for s in state.signals if s.layer_id == lid)  # type: ignore[attr-defined]
        kept = steps[-window:]
        assert snap.valid[i].sum() == len(kept)
        assert snap.steps[i][snap.valid[i]].tolist() == kept
        assert not snap.valid[i, : window - len(kept)].any()  # right-aligned


def test_signal_window_matches_snapshot_from_state() -> None:
    state = make_state(3, step=0)
    topo = GraphTopology.from_proto(state.topology)
    kernels = KernelSet.from_proto(state.kernels)
    win = SignalWindow(topo, kernels, window=4)
    rng = np.random.default_rng(0)
    for step in range(10):
        frame = [signal(f"l{i}", step, float(rng.random())) for i in range(3) if rng.random() < 0.7]
        win.update(frame, step)
        state.signals.extend(frame)
        state.step = step
        assert win.snapshot(step, 1).equals(snapshot_from_state(state, 4))


@settings(max_examples=60, deadline=None)
@given(
    frames=st.lists(st.lists(st.integers(0, 2), max_size=9), min_size=1, max_size=6),
    window=st.integers(1, 4),
    decoded=st.booleans(),
)
def test_vectorised_window_matches_state_with_repeated_layers(
    frames: list[list[int]], window: int, decoded: bool
) -> None:
    """Several signals of one layer in one frame (more than the window, too): the
    vectorised scatter must keep exactly the newest ``window`` per layer, in message
    order, like the full-state path; pre-decoded columns give the same result."""
    state = make_state(3, step=0)
    win = SignalWindow(
        GraphTopology.from_proto(state.topology), KernelSet.from_proto(state.kernels), window
    )
    step = 0
    for f, layers in enumerate(frames):
        frame = []
        for li in layers:
            step += 1
            frame.append(signal(f"l{li}", step, (step % 97) / 97.0))
        win.update(win.decode(frame) if decoded else frame, step)
        state.signals.extend(frame)
        state.step = step
        assert win.snapshot(step, 1).equals(snapshot_from_state(state, window)), f"frame {f}"


def test_snapshot_is_immutable_and_independent_of_later_updates() -> None:
    state = make_state(2)
    win = SignalWindow(
        GraphTopology.from_proto(state.topology), KernelSet.from_proto(state.kernels), window=2
    )
    win.update([signal("l0", 1, 0.5)], 1)
    snap = win.snapshot()
    win.update([signal("l0", 2, 0.1)], 2)
    assert snap.floats[0, -1, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="read-only"):
        snap.floats[0, 0, 0] = 1.0


def test_bad_input_is_named() -> None:
    state = make_state(2, signals=[signal("nope", 1, 0.5)])
    with pytest.raises(ValueError, match=r"signals\[0\].layer_id"):
        snapshot_from_state(state, 4)
    state = make_state(2, signals=[signal("l0", 1, float("nan"))])
    with pytest.raises(ValueError, match="finite"):
        snapshot_from_state(state, 4)
    state = make_state(2)
    state.topology.edges.add(source=0, target=5)
    with pytest.raises(ValueError, match=r"topology\.edges"):
        snapshot_from_state(state, 4)


def test_random_snapshot_round_trips() -> None:
    snap = random_snapshot(np.random.default_rng(1), 30, 4)
    assert snapshot_from_state(state_from_snapshot(snap), snap.window).equals(snap)


@settings(max_examples=80, deadline=None)
@given(
    frames=st.lists(
        st.one_of(st.just("full"), st.lists(st.integers(0, 2), max_size=5)),
        min_size=1,
        max_size=12,
    ),
    window=st.integers(1, 4),
    form=st.sampled_from(["message", "decoded", "columns"]),
)
def test_window_mixing_full_and_partial_frames(
    frames: list[str | list[int]], window: int, form: str
) -> None:
    """Full frames (every layer once, in order: the ring-column fast path) interleaved
    with partial and repeated-layer frames (the scatter path), in each signal form:
    always the snapshot of the accumulated history, and every snapshot taken stays
    what it was while later frames are written (copy-on-write)."""
    kept = []
    state = make_state(3, step=0)
    win = SignalWindow(
        GraphTopology.from_proto(state.topology), KernelSet.from_proto(state.kernels), window
    )
    step = 0
    for f, spec in enumerate(frames):
        layers = [0, 1, 2] if spec == "full" else spec
        frame = []
        for li in layers:
            step += 1
            states = [1 + step % 5, 1 + (step + 1) % 5] if step % 3 else []
            frame.append(
                signal(f"l{li}", step, (step % 97) / 97.0, error_count=step, seed_states=states)
            )
        if form == "message":
            win.update(frame, step)
        elif form == "decoded":
            win.update(win.decode(frame), step)
        else:
            win.update(win.decode_columns(columns_from_signals(frame)), step)
        state.signals.extend(frame)
        state.step = step
        snap = win.snapshot(step, 1)
        want = snapshot_from_state(state, window)
        assert snap.equals(want), f"frame {f}"
        assert not snap.floats.flags.writeable
        assert not snap.valid.flags.writeable
        with pytest.raises(ValueError, match="WRITEABLE"):  # view or copy: for good
            snap.floats.setflags(write=True)
        if f % 2:
            kept.append((snap, want))
    for snap, want in kept:
        assert snap.equals(want)


def test_a_snapshot_is_a_view_until_the_window_is_written_while_it_lives() -> None:
    state = make_state(2)
    win = SignalWindow(
        GraphTopology.from_proto(state.topology), KernelSet.from_proto(state.kernels), window=3
    )

    def full(step: int) -> list[health_pb2.HealthSignal]:
        return [signal("l0", step, 0.5), signal("l1", step, 0.4)]

    win.update(full(1), 1)
    ring = weakref.ref(win._ring)  # (a plain reference would count as a live view)
    snap = win.snapshot()
    assert np.shares_memory(snap.floats, win._ring)  # no copy taken
    del snap
    win.update(full(2), 2)
    assert win._ring is ring()  # nobody was looking: written in place
    snap = win.snapshot()
    win.update(full(3), 3)
    assert win._ring is not ring()  # a live snapshot: the window moved to a copy
    with pytest.raises(ValueError, match="WRITEABLE"):  # and nobody writes through it
        snap.floats.setflags(write=True)
    assert snap.steps[:, -1].tolist() == [2, 2]
    assert win.snapshot().steps[:, -1].tolist() == [3, 3]
