"""The featurizer's telemetry columns in C (``_features.c``) against the numpy rendering
in ``telemetry_features.py``, on random snapshots that reach every branch (no telemetry, stale,
seed lists shorter than the seed count or empty, no seeds, no kernels, windows of 1-12
slots), and its refusal of malformed arrays."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy import features as fm
from tamiyo.policy import telemetry_features as tf
from tamiyo.policy.feature_schema import FEATURE_SCHEMA, FeatureSchema
from tamiyo.policy.signal_window import SignalWindow
from tamiyo.policy.snapshot import INT_FIELDS, MAX_SEEDS, GraphSnapshot, _frozen
from tamiyo.policy.synthetic import random_snapshot

pytestmark = pytest.mark.skipif(
    not tf.native_available() and not (shutil.which("cc") or shutil.which("gcc")),
    reason="tamiyo.policy._features not built (no C compiler at install)",
)


def _varied(rng: np.random.Generator, n: int, k: int, window: int, missing: float) -> GraphSnapshot:
    """random_snapshot plus what it leaves constant: seed-state lists of any length up to
    the seed count (0 = no list), large counters, a current step far past the newest
    signal for some layers (stale), layers without seeds."""
    snap = random_snapshot(rng, n, k, window=window, missing=missing)
    valid = snap.valid
    seeds = snap.topology.seed_counts
    slen = np.where(valid, rng.integers(0, seeds[:, None] + 1, (n, window)), 0)
    states = snap.seed_states.copy()
    states[np.arange(MAX_SEEDS)[None, None, :] >= slen[..., None]] = 0
    ints = snap.ints.copy()
    ints[..., INT_FIELDS.index("error_count")] = rng.integers(0, 10**6, (n, window))
    ints *= valid[..., None]
    steps = snap.steps - rng.choice([0, 0, 150, 10**5], (n, 1)) * valid
    step = int(snap.step + rng.integers(0, 300))
    return replace(
        snap,
        seed_state_len=_frozen(slen),
        seed_states=_frozen(states),
        ints=_frozen(ints),
        steps=_frozen(steps),
        step=step,
    )


def _batch(snaps: list[GraphSnapshot], schema: FeatureSchema = FEATURE_SCHEMA) -> tf.TelemetryBatch:
    """What featurize_many hands either rendering for ``snaps``."""
    topos = [s.topology for s in snaps]
    statics, _ = fm._topology_pieces(topos, schema.num_features)
    return tf.TelemetryBatch(
        snaps,
        topos,
        statics,
        np.array([t.num_nodes for t in topos], np.int64),
        np.array([s.step for s in snaps], np.int64),
        np.array([s.kernels.num_kernels for s in snaps], np.int64),
        schema,
    )


def _both(
    snaps: list[GraphSnapshot], schema: FeatureSchema = FEATURE_SCHEMA
) -> tuple[tf.Dynamic, tf.Dynamic]:
    batch = _batch(snaps, schema)
    return tf._numpy_dynamic(batch), tf._native_dynamic(batch)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    k=st.integers(0, 3),
    window=st.integers(1, 12),
    missing=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_native_columns_equal_numpy(
    seed: int, sizes: list[int], k: int, window: int, missing: float
) -> None:
    rng = np.random.default_rng(seed)
    snaps = [_varied(rng, n, k, window, missing) for n in sizes]
    want, got = _both(snaps)
    for name, w_, g_ in zip(("x", "target", "health", "free_seed"), want, got, strict=True):
        w, g = np.asarray(w_), np.asarray(g_)
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=name)


def test_schema_constants_reach_the_native_columns() -> None:
    """A schema with other constants (staleness, age scale, trend scale) gives the same
    columns both ways: nothing is hard-coded in C."""
    rng = np.random.default_rng(3)
    snaps = [_varied(rng, 12, 2, FEATURE_SCHEMA.window, 0.2) for _ in range(3)]
    schema = replace(FEATURE_SCHEMA, stale_after_steps=7, max_age_steps=50, trend_scale_steps=3.0)
    want, got = _both(snaps, schema)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_featurize_many_checks_once_then_uses_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "_NATIVE_STATE", [])
    snaps = [random_snapshot(np.random.default_rng(4), 9)]
    fm.featurize_many(snaps)
    assert tf._NATIVE_STATE == [True]
    calls: list[int] = []
    real = tf._numpy_dynamic

    def counting(batch: tf.TelemetryBatch) -> tf.Dynamic:
        calls.append(1)
        return real(batch)

    monkeypatch.setattr(tf, "_numpy_dynamic", counting)
    fm.featurize_many(snaps)
    assert calls == []


def _off_by_one(batch: tf.TelemetryBatch) -> tf.Dynamic:
    x, target, health, free_seed = _REAL_NATIVE(batch)
    return x + 1, target, health, free_seed


def _refusing(batch: tf.TelemetryBatch) -> tf.Dynamic:
    raise ValueError("featurize: graph 0: floats must be ...")


_REAL_NATIVE = tf._native_dynamic


@pytest.mark.parametrize(
    ("state", "native", "message"),
    [
        # the first batch's comparison finds a disagreeing build
        ([], _off_by_one, "native featurizer disagrees"),
        # a checked build later refuses a batch numpy takes
        ([True], _refusing, "native featurizer refused a batch"),
    ],
)
def test_a_native_build_that_fails_is_replaced_by_numpy(
    state: list[bool],
    native: Callable[[tf.TelemetryBatch], tf.Dynamic],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tf, "_NATIVE_STATE", list(state))
    monkeypatch.setattr(tf, "_native_dynamic", native)
    snaps = [random_snapshot(np.random.default_rng(5), 7)]
    with caplog.at_level(logging.WARNING):
        (g,) = fm.featurize_many(snaps)
    assert message in caplog.text
    assert tf._NATIVE_STATE == [False]
    np.testing.assert_array_equal(g.x, tf._numpy_dynamic(_batch(snaps))[0])


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("floats", lambda a: a.astype(np.float64), "graph 1: floats must be"),
        ("steps", lambda a: a[:, :-1].copy(), "graph 1: steps must be"),
        ("ints", lambda a: a.astype(np.int32), "graph 1: ints must be"),
        ("valid", lambda a: a.astype(np.uint8), "graph 1: valid must be"),
    ],
)
def test_malformed_arrays_are_refused_with_the_graph_and_field_named(
    field: str, bad: object, message: str
) -> None:
    rng = np.random.default_rng(6)
    snaps = [random_snapshot(rng, 5), random_snapshot(rng, 6)]
    snaps[1] = replace(snaps[1], **{field: bad(getattr(snaps[1], field))})  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        tf._native_dynamic(_batch(snaps))


def test_session_windows_are_featurized_natively() -> None:
    """A server session's window arrays are fields of one record array (strided views),
    which the C code reads in place."""
    snap = random_snapshot(np.random.default_rng(8), 6)
    window = SignalWindow(snap.topology, snap.kernels, FEATURE_SCHEMA.window)
    strided = window.snapshot(step=snap.step)
    assert not strided.floats.flags.c_contiguous
    want, got = _both([strided])
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_without_the_c_module_numpy_featurizes_and_it_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tf, "_features", None)
    monkeypatch.setattr(tf, "_NATIVE_STATE", [])
    snaps = [random_snapshot(np.random.default_rng(9), 6)]
    with caplog.at_level(logging.WARNING):
        (g,) = fm.featurize_many(snaps)
        fm.featurize_many(snaps)
    assert caplog.text.count("tamiyo.policy._features is not built") == 1
    np.testing.assert_array_equal(g.x, tf._numpy_dynamic(_batch(snaps))[0])
