"""Window statistics and the health formula against values computed by hand."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import KasminaConfig
from tamiyo_client.telemetry import (
    WindowAccumulator,
    WindowStats,
    all_finite,
    finite_flag,
    flatten_units,
    reference_health,
)

# Three units over four samples (see test_kasmina for the layer that produces them):
# u1 = [0, 1, 2, 3], u2 = [-1, 0, -2, -1] (never > 0), u3 = 2·u1 + 1 = [1, 3, 5, 7].
Y = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, 3.0], [2.0, -2.0, 5.0], [3.0, -1.0, 7.0]])
# Population variances 1.25, 0.5, 5.0; r12 = r32 = -1/sqrt(10), r13 = 1.
HAND_VARIANCE = (1.25 + 0.5 + 5.0) / 3
HAND_DEAD = 1 / 3
HAND_CORR = (1 + 2 / math.sqrt(10)) / 3


def test_window_statistics_match_hand_computation() -> None:
    acc = WindowAccumulator(KasminaConfig())
    acc.add_output(Y[:2])  # two forwards in one window accumulate like one
    acc.add_output(Y[2:])
    for ms in (1.0, 3.0):
        acc.add_latency(ms)
    stats = acc.collect()
    assert stats.samples == 4
    assert stats.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-12)
    assert stats.dead_neuron_ratio == pytest.approx(HAND_DEAD)
    assert stats.avg_correlation == pytest.approx(HAND_CORR, rel=1e-12)
    assert stats.avg_execution_time_ms == pytest.approx(2.0)
    assert stats.latency_variance == pytest.approx(1.0)
    assert stats.error_count == 0
    # collect() starts a new window: activations reset, latencies keep rolling.
    assert not acc.has_data
    acc.add_latency(2.0)  # a forward that was timed but not sampled
    assert acc.forwards == 1  # (has_data again; mypy keeps the narrowing above)
    carried = acc.collect()
    # no sample in this window: the latest measured statistics are carried, marked N = 0
    assert carried.samples == 0
    assert carried.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-12)
    assert carried.avg_correlation == pytest.approx(HAND_CORR, rel=1e-12)
    assert carried.latency_variance == pytest.approx(2 / 3)  # latencies 1, 3, 2


def test_non_finite_output_is_an_error_and_adds_nothing() -> None:
    acc = WindowAccumulator(KasminaConfig())
    assert acc.add_output(Y)
    for bad in (math.nan, math.inf, -math.inf):
        y = Y.clone()
        y[1, 2] = bad
        assert not acc.add_output(y)
    stats = acc.collect()
    assert (stats.samples, stats.error_count) == (4, 3)
    assert stats.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-12)


def test_sample_rows_strides_over_the_batch() -> None:
    # 8 rows, at most 4 used: every 2nd row, i.e. Y itself from the interleaved batch
    y = torch.stack([Y, torch.full_like(Y, 100.0)], dim=1).reshape(8, 3)
    acc = WindowAccumulator(KasminaConfig(sample_rows=4))
    acc.add_output(y)
    stats = acc.collect()
    assert stats.samples == 4
    assert stats.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-12)


def test_correlation_leaves_out_constant_units_and_caps_units() -> None:
    acc = WindowAccumulator(KasminaConfig(max_corr_units=2))
    y = torch.cat([Y, torch.full((4, 1), 5.0)], dim=1)  # u4 constant, beyond the cap anyway
    acc.add_output(y)
    # only u1 and u2 are used: |r12| = 1/sqrt(10)
    assert acc.collect().avg_correlation == pytest.approx(1 / math.sqrt(10))
    acc.add_output(torch.full((4, 3), 2.0))  # all constant: undefined r -> 0
    assert acc.collect().avg_correlation == 0.0


def test_health_formula_by_hand() -> None:
    cfg = KasminaConfig()
    stats = WindowStats(4, HAND_VARIANCE, HAND_DEAD, HAND_CORR, 2.0, 1.0, 0)
    g = math.sqrt(204.0)
    expected = (
        (1 - HAND_DEAD)
        * (1 - 0.5 * HAND_CORR)
        * HAND_VARIANCE
        / (HAND_VARIANCE + cfg.variance_floor)
        * g
        / (g + cfg.gradient_floor)
    )
    assert reference_health(stats, g, cfg) == pytest.approx(expected)
    # no gradient seen yet: factor 1; one error halves it; vanished gradient ~ 0
    no_grad = reference_health(stats, None, cfg)
    assert no_grad > reference_health(stats, g, cfg)
    err = WindowStats(4, HAND_VARIANCE, HAND_DEAD, HAND_CORR, 2.0, 1.0, 1)
    assert reference_health(err, None, cfg) == pytest.approx(no_grad * 0.5)
    assert reference_health(stats, 0.0, cfg) == 0.0
    collapsed = WindowStats(4, 0.0, 0.0, 0.0, 1.0, 0.0, 0)
    assert reference_health(collapsed, 1.0, cfg) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    var=st.floats(0, 1e30),
    dead=st.floats(0, 1),
    corr=st.floats(0, 1),
    grad=st.one_of(st.none(), st.floats(0, 1e30), st.just(math.inf)),
    errors=st.integers(0, 1000),
)
def test_health_is_always_in_unit_interval(
    var: float, dead: float, corr: float, grad: float | None, errors: int
) -> None:
    h = reference_health(WindowStats(1, var, dead, corr, 0.0, 0.0, errors), grad, KasminaConfig())
    assert 0.0 <= h <= 1.0


def test_flatten_units_conv_channels_are_units() -> None:
    y = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    flat = flatten_units(y, channels_first=True)
    assert flat.shape == (8, 3)
    assert torch.equal(flat[:, 1].sort().values, y[:, 1].reshape(-1).sort().values)
    assert flatten_units(y, channels_first=False).shape == (12, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=200), st.integers(1, 40))
def test_latency_running_sums_match_the_window(lat: list[float], window: int) -> None:
    acc = WindowAccumulator(KasminaConfig(window=window))
    for ms in lat:
        acc.add_latency(ms)
    kept = lat[-window:]
    stats = acc.collect()
    assert stats.avg_execution_time_ms == pytest.approx(statistics.fmean(kept), abs=1e-9)
    assert stats.latency_variance == pytest.approx(statistics.pvariance(kept), rel=1e-6, abs=1e-6)


def test_an_exploding_output_is_flagged_without_a_numpy_warning() -> None:
    """Squares above float32's range flag the output; numpy's overflow warning would
    only be noise in the training job's log (the caller reports the bad output)."""
    import warnings

    big = np.full(4, 1e20, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not all_finite(big)
        assert not all_finite(np.array([1.0, np.nan], np.float32))
        assert all_finite(np.ones(3, np.float32))


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, -2.0], torch.float32, True),
        ([], torch.float32, True),  # an empty batch
        ([1.0, math.nan], torch.float32, False),
        ([math.inf, -math.inf], torch.float32, False),
        ([1e20, 0.0], torch.float32, False),  # exploding: flagged, as all_finite does
        ([1e20, 0.0], torch.float64, True),
        ([200.0] * 4, torch.float16, True),  # Σ² overflows float16, not the output
        ([math.inf], torch.bfloat16, False),
    ],
)
def test_finite_flag_agrees_with_the_host_check_on_the_device(
    values: list[float], dtype: torch.dtype, finite: bool
) -> None:
    t = torch.tensor(values, dtype=dtype)
    flag = finite_flag(t)
    assert (flag.dtype, flag.shape) == (torch.bool, ())
    assert bool(flag) is finite
    if dtype in (torch.float32, torch.float64):
        assert all_finite(t.numpy()) is finite


def test_pending_errors_are_counted_on_the_device_and_read_once() -> None:
    acc = WindowAccumulator(KasminaConfig())
    for ok in (True, False, False):
        acc.add_pending(0, torch.tensor(ok))
    for _ in range(2):  # two kernels in slot 1 fail twice each, and are removed
        acc.add_pending(1, torch.tensor(False))
        acc.add_pending(1, torch.tensor(False))
        acc.retire_pending(1)
    acc.add_pending(1, torch.tensor(True))
    acc.retire_pending(2)  # (nothing pending there)
    assert acc.take_pending(4) == {0: 2, -1: 2}
    assert acc.take_pending(4) == {}
    assert acc.errors == 0  # the caller decides what a pending count is


def test_drained_pending_counts_are_handed_over_unread() -> None:
    """What a data-parallel host's sync gathers: the device counters themselves (it adds
    them into its one vector on the device), and nothing is left pending here."""
    acc = WindowAccumulator(KasminaConfig())
    acc.add_pending(1, torch.tensor(False))
    acc.add_pending(1, torch.tensor(True))
    acc.retire_pending(0)
    drained = acc.drain_pending()
    assert {k: int(v) for k, v in drained.items()} == {1: 1}
    assert all(isinstance(v, torch.Tensor) for v in drained.values())
    assert acc.pending == {}
    assert acc.take_pending(2) == {}
