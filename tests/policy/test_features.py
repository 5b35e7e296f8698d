"""The featurizer: schema, explicit missing/stale telemetry, trend, masks, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy.feature_schema import FEATURE_SCHEMA, KERNEL_SCHEMA
from tamiyo.policy.features import featurize, featurize_many, snapshot_from_state
from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.policy.synthetic import random_snapshot
from tamiyo.v1 import health_pb2

from .conftest import make_state, signal

IDX = {n: i for i, n in enumerate(FEATURE_SCHEMA.names)}


def feat(snap: GraphSnapshot, name: str) -> np.ndarray:
    return featurize(snap).x[:, IDX[name]]


def test_schema_is_named_versioned_and_consistent() -> None:
    assert FEATURE_SCHEMA.version
    assert KERNEL_SCHEMA.version
    assert len(set(FEATURE_SCHEMA.names)) == FEATURE_SCHEMA.num_features
    assert len(FEATURE_SCHEMA.normalizations) == FEATURE_SCHEMA.num_features
    g = featurize(snapshot_from_state(make_state(3), FEATURE_SCHEMA.window))
    assert g.x.shape == (3, FEATURE_SCHEMA.num_features)
    assert g.x.dtype == np.float32
    assert g.kernel_x.shape == (2, KERNEL_SCHEMA.num_features)


def test_missing_telemetry_is_explicit_not_healthy() -> None:
    state = make_state(3, signals=[signal("l0", 100, 1.0), signal("l1", 100, 0.2)])
    snap = snapshot_from_state(state, 4)
    g = featurize(snap)
    assert feat(snap, "has_telemetry").tolist() == [1, 1, 0]
    assert feat(snap, "telemetry_stale").tolist() == [0, 0, 1]
    assert feat(snap, "telemetry_age")[2] == 1.0
    assert feat(snap, "health_latest")[2] == 0.0  # not 1.0 ("healthy")
    assert np.isnan(g.health[2])
    assert g.health[0] == pytest.approx(1.0)
    # Missing differs from both a healthy and a sick layer.
    assert not np.array_equal(g.x[2], g.x[0])
    assert not np.array_equal(g.x[2], g.x[1])


def test_stale_telemetry_is_flagged() -> None:
    limit = FEATURE_SCHEMA.stale_after_steps
    state = make_state(
        2, step=1000, signals=[signal("l0", 1000 - limit - 1, 0.9), signal("l1", 1000 - limit, 0.9)]
    )
    snap = snapshot_from_state(state, 4)
    assert feat(snap, "telemetry_stale").tolist() == [1, 0]
    assert feat(snap, "telemetry_age")[0] > feat(snap, "telemetry_age")[1] > 0


def test_health_trend_sign_and_window() -> None:
    down = [signal("l0", s, 1.0 - 0.005 * s) for s in range(0, 100, 10)]
    up = [signal("l1", s, 0.2 + 0.005 * s) for s in range(0, 100, 10)]
    snap = snapshot_from_state(make_state(3, signals=down + up + [signal("l2", 5, 0.5)]), 4)
    trend = feat(snap, "health_trend")
    assert trend[0] == pytest.approx(-0.5, abs=1e-5)  # -0.005 per step x 100
    assert trend[1] == pytest.approx(0.5, abs=1e-5)
    assert trend[2] == 0.0  # one point: no trend
    assert feat(snap, "window_fill").tolist() == [1.0, 1.0, 0.25]
    assert feat(snap, "health_min")[0] == pytest.approx(
        1.0 - 0.005 * 90
    )  # newest of 4 kept: 60..90


def test_target_mask_and_free_seed() -> None:
    sigs = [
        signal("l0", 100, 0.5, active_seeds=2),  # full
        signal("l1", 100, 0.5, active_seeds=1),  # seed 1 free by count
        signal("l2", 100, 0.5, seed_states=[3, 1]),  # seed 1 dormant by state
    ]
    g = featurize(snapshot_from_state(make_state(5, seeds=[2, 2, 2, 2, 0], signals=sigs), 4))
    assert g.target_mask.tolist() == [False, True, True, True, False]
    assert g.free_seed.tolist() == [-1, 1, 1, 0, -1]
    no_kernels = featurize(snapshot_from_state(make_state(3, kernels=()), 4))
    assert not no_kernels.target_mask.any()
    assert no_kernels.kernel_x.shape[0] == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 5), st.integers(0, 2**31), st.floats(0, 1))
def test_features_finite_and_bounded(n: int, k: int, seed: int, missing: float) -> None:
    snap = random_snapshot(np.random.default_rng(seed), n, k, missing=missing)
    g = featurize(snap)
    assert g.x.shape == (n, FEATURE_SCHEMA.num_features)
    assert np.isfinite(g.x).all()
    assert np.isfinite(g.kernel_x).all()
    assert (g.x >= -1).all()
    assert (g.x <= 4).all()
    assert not g.x.flags.writeable
    assert (np.isnan(g.health) == (snap.valid.sum(1) == 0)).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**31))
def test_featurizer_is_permutation_equivariant(n: int, seed: int) -> None:
    """Renaming/reordering layers reorders rows and changes nothing else."""
    from tamiyo.policy.features import state_from_snapshot

    rng = np.random.default_rng(seed)
    snap = random_snapshot(rng, n)
    state = state_from_snapshot(snap)
    perm = rng.permutation(n)
    inv = np.argsort(perm)
    layers = list(state.topology.layers)
    del state.topology.layers[:]
    state.topology.layers.extend(layers[p] for p in perm)
    for e in state.topology.edges:
        e.source, e.target = int(inv[e.source]), int(inv[e.target])
    a, b = featurize(snap), featurize(snapshot_from_state(state, snap.window))
    np.testing.assert_array_equal(b.x, a.x[perm])
    np.testing.assert_array_equal(b.target_mask, a.target_mask[perm])
    np.testing.assert_array_equal(b.health, a.health[perm])


def test_unknown_schema_refused() -> None:
    import dataclasses

    snap = snapshot_from_state(make_state(2), 4)
    with pytest.raises(ValueError, match="schema"):
        featurize(snap, dataclasses.replace(FEATURE_SCHEMA, version="node-v0"))


def test_signal_fields_reach_features() -> None:
    s = health_pb2.HealthSignal(
        layer_id="l0",
        step=100,
        health_score=0.3,
        error_count=5,
        dead_neuron_ratio=0.25,
        memory_utilization=0.75,
        gradient_norm=float(np.e - 1),
        total_seeds=2,
        active_seeds=1,
    )
    snap = snapshot_from_state(make_state(1, signals=[s]), 4)
    assert feat(snap, "dead_neuron_ratio")[0] == pytest.approx(0.25)
    assert feat(snap, "memory_utilization")[0] == pytest.approx(0.75)
    assert feat(snap, "log_gradient_norm")[0] == pytest.approx(0.2, rel=1e-5)
    assert feat(snap, "log_error_count")[0] == pytest.approx(np.log1p(5) / 5, rel=1e-5)
    assert feat(snap, "active_seed_fraction")[0] == pytest.approx(0.5)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 4)), min_size=1, max_size=8),
    st.integers(0, 2**31),
)
def test_featurize_many_equals_one_at_a_time(shapes: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    snaps = [random_snapshot(rng, n, k) for n, k in shapes]
    many = featurize_many(snaps)
    for sn, g in zip(snaps, many, strict=True):
        one = featurize(sn)
        for f in ("x", "kernel_x", "target_mask", "health", "free_seed"):
            np.testing.assert_array_equal(getattr(g, f), getattr(one, f), err_msg=f)
        assert g.layer_ids == one.layer_ids
        assert g.kernel_ids == one.kernel_ids
        assert g.adj is one.adj  # cached per topology
    assert featurize_many([]) == []
