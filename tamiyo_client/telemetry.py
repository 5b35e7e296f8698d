"""Telemetry of one layer over a reporting window, and the reference health formula.

A reporting window is everything between two ``collect`` calls (usually a few training
steps). Activations are accumulated as float64 running sums so that ``collect`` costs
O(D²) once, not a pass over stored tensors, and so hand-computed values match exactly.

Definitions (``y`` is the layer output flattened to [N, D]: N samples over the window,
D output units; for conv layers a unit is a channel and every position is a sample):

- ``activation_variance`` = mean over units of the population variance of the unit.
- ``dead_neuron_ratio`` = fraction of units that were never > 0 in the window.
- ``avg_correlation`` = mean |Pearson r| over unit pairs i < j among the first
  ``max_corr_units`` units; units with zero variance are left out (r is undefined);
  0 when fewer than two units remain.
- ``avg_execution_time_ms`` / ``latency_variance`` = mean / population variance (ms²)
  of the forward times of the last ``window`` forwards.

Health score, in [0, 1] (``reference_health``)::

    health = (1 - dead) · (1 - corr_weight · corr) · var / (var + variance_floor)
             · g / (g + gradient_floor) · error_decay ** errors

The variance factor punishes collapsed outputs, the gradient factor vanishing gradients
(it is 1 until the first backward has been seen), and each non-finite forward in the
window multiplies the health by ``error_decay``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from tamiyo.config import KasminaConfig


@dataclass(frozen=True)
class WindowStats:
    """What one layer measured over one reporting window."""

    samples: int  # N, rows of the flattened output
    activation_variance: float
    dead_neuron_ratio: float  # [0, 1]
    avg_correlation: float  # [0, 1]
    avg_execution_time_ms: float
    latency_variance: float  # ms²
    error_count: int  # non-finite forwards in the window


def flatten_units(y: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """``y`` as [N, D]: D = channels (dim 1) when ``channels_first``, else the last dim."""
    if y.dim() == 0:
        return y.reshape(1, 1)
    if y.dim() == 1:
        return y.reshape(1, -1)
    if channels_first and y.dim() > 2:
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def reference_health(
    stats: WindowStats, gradient_norm: float | None, config: KasminaConfig
) -> float:
    """The documented health formula (module docstring); ``gradient_norm`` None = unseen."""
    var = max(stats.activation_variance, 0.0)
    health = (1.0 - stats.dead_neuron_ratio) * (1.0 - config.corr_weight * stats.avg_correlation)
    health *= var / (var + config.variance_floor)
    if gradient_norm is not None and math.isfinite(gradient_norm):
        health *= gradient_norm / (gradient_norm + config.gradient_floor)
    elif gradient_norm is not None:  # non-finite gradient: treat as an error
        health *= config.error_decay
    health *= config.error_decay**stats.error_count
    return float(min(1.0, max(0.0, health)))


class WindowAccumulator:
    """Running sums of a layer's outputs and forward times over one reporting window."""

    def __init__(self, config: KasminaConfig) -> None:
        self.config = config
        self.latencies_ms: deque[float] = deque(maxlen=config.window)
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.errors = 0
        self.sum: torch.Tensor | None = None  # [D] float64
        self.sumsq: torch.Tensor | None = None  # [D] float64
        self.ever_positive: torch.Tensor | None = None  # [D] bool
        self.cross: torch.Tensor | None = None  # [C, C] float64, C = min(D, max_corr_units)

    def add_latency(self, ms: float) -> None:
        self.latencies_ms.append(ms)

    def add_error(self) -> None:
        self.errors += 1

    def add_output(self, y2d: torch.Tensor) -> None:
        """Accumulate one forward's output, [N, D] (already detached)."""
        y = y2d.to(torch.float64)
        if self.sum is None or self.sum.shape[0] != y.shape[1]:
            d = y.shape[1]
            c = min(d, self.config.max_corr_units)
            self.n = 0
            self.sum = torch.zeros(d, dtype=torch.float64)
            self.sumsq = torch.zeros(d, dtype=torch.float64)
            self.ever_positive = torch.zeros(d, dtype=torch.bool)
            self.cross = torch.zeros(c, c, dtype=torch.float64)
        assert self.sumsq is not None
        assert self.ever_positive is not None
        assert self.cross is not None
        self.n += y.shape[0]
        self.sum += y.sum(0)
        self.sumsq += (y * y).sum(0)
        self.ever_positive |= (y > 0).any(0)
        yc = y[:, : self.cross.shape[0]]
        self.cross += yc.T @ yc

    @property
    def has_data(self) -> bool:
        return self.n > 0 or self.errors > 0

    def collect(self) -> WindowStats:
        """Statistics of the window so far, then start a new window (latencies roll).

        The sums are tiny ([D] and [C, C]), so they are moved to numpy once here: a few
        numpy calls cost microseconds where the same torch calls cost ~10 µs each."""
        lat = list(self.latencies_ms)  # <= window floats: plain Python is cheapest
        lat_mean = sum(lat) / len(lat) if lat else 0.0
        lat_var = sum((t - lat_mean) ** 2 for t in lat) / len(lat) if lat else 0.0
        variance = dead = corr = 0.0
        if self.n > 0 and self.sum is not None:
            assert self.sumsq is not None
            assert self.ever_positive is not None
            assert self.cross is not None
            d = self.sum.shape[0]
            mean = self.sum.cpu().numpy() / self.n
            var = np.maximum(self.sumsq.cpu().numpy() / self.n - mean * mean, 0.0)
            variance = float(var.sum()) / d
            dead = 1.0 - float(np.count_nonzero(self.ever_positive.cpu().numpy())) / d
            corr = _mean_abs_correlation(self.cross.cpu().numpy() / self.n, mean, var)
        stats = WindowStats(
            samples=self.n,
            activation_variance=variance,
            dead_neuron_ratio=dead,
            avg_correlation=corr,
            avg_execution_time_ms=lat_mean,
            latency_variance=lat_var,
            error_count=self.errors,
        )
        self._reset()
        return stats


def _mean_abs_correlation(
    second_moment: NDArray[np.float64], mean: NDArray[np.float64], var: NDArray[np.float64]
) -> float:
    """Mean |r| over pairs of units with non-zero variance; ``second_moment`` is E[y_i y_j]
    [C, C], ``mean`` and ``var`` are [D] (only the first C are used)."""
    c = second_moment.shape[0]
    v = var[:c]
    live = v > 1e-12
    k = int(np.count_nonzero(live))
    if k < 2:
        return 0.0
    m, std = mean[:c], np.sqrt(v)
    if k < c:  # drop constant units (usually none are)
        second_moment = second_moment[live][:, live]
        m, std = m[live], std[live]
    r = np.abs((second_moment - np.outer(m, m)) / np.outer(std, std))
    np.minimum(r, 1.0, out=r)
    # r is symmetric: the mean over pairs i < j is the off-diagonal sum over k(k-1).
    return float((r.sum() - np.trace(r)) / (k * (k - 1)))
