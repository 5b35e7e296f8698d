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
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray

from tamiyo.config import KasminaConfig


class WindowStats(NamedTuple):
    """What one layer measured over one reporting window (a tuple: built every frame)."""

    samples: int  # N, rows of the flattened output sampled in this window (0: stats carried)
    activation_variance: float
    dead_neuron_ratio: float  # [0, 1]
    avg_correlation: float  # [0, 1]
    avg_execution_time_ms: float
    latency_variance: float  # ms²
    error_count: int  # non-finite forwards in the window (sampled outputs; seed kernels)


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


def to_numpy(t: torch.Tensor) -> NDArray[np.floating]:
    """A detached tensor as a numpy array, without a copy for CPU float32/float64 tensors.

    Why numpy: on small per-layer tensors a numpy call costs ~1-5 µs where a torch op
    costs ~10 µs of fixed overhead, and these run on the training thread. Other devices
    are copied to the host (a sync; only on sampled forwards), other dtypes to float32.
    """
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy()


def all_finite(a: NDArray[np.floating]) -> bool:
    """True when no entry of ``a`` is NaN or ±inf, by one BLAS dot product of ``a`` with
    itself (no temporary; NaN and inf propagate). It also flags float32 entries above
    ~1.8e19, whose squares overflow: an exploding output, which should be flagged too.
    (Quietly: the caller reports it; numpy's own overflow warning in a training job's log
    would only be noise.)"""
    flat = a.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(np.dot(flat, flat)))


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """``all_finite`` as a 0-d bool tensor on ``t``'s device, never read back to the
    host (on CUDA that read is a sync): Σ t² by one dot, ~20 µs for [256, 512] on CPU
    where ``isfinite().all()`` took ~450. Half precision is widened first, or the
    squares of a sane output would overflow it."""
    flat = t.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat).isfinite()


def squared_norm(t: torch.Tensor) -> float:
    """Σ t² of a gradient: numpy for contiguous CPU float tensors (~µs, no torch op),
    else one torch op in float64 (a device sync on GPU; read once per window)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = (t.detach() if t.requires_grad else t).numpy().reshape(-1)
        with np.errstate(over="ignore"):  # (no RuntimeWarning on the training thread)
            sq = float(np.dot(flat, flat))
        if math.isinf(sq) and flat.dtype != np.float64:
            # Σg² above float32's 3.4e38 from finite gradients: a diverging, not a
            # vanishing, gradient; float64 holds it (a copy, only in this case).
            wide = flat.astype(np.float64)
            sq = float(np.dot(wide, wide))
        return sq
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


_RESUM = 4096  # latencies appended between exact recomputations of the running sums


class WindowAccumulator:
    """Running sums of a layer's outputs and forward times over one reporting window.

    ``add_output`` (training thread, sampled forwards only) does a handful of numpy calls
    on at most ``sample_rows`` rows of the output; ``collect`` turns the sums into
    ``WindowStats``. A window in which no forward was sampled (the layer samples every
    ``sample_every``-th forward, frames may come every step) reports the activation
    statistics of the latest window that had a sample, with its own latencies and
    errors: the stats are at most ``sample_every`` forwards old, never made up.
    """

    def __init__(self, config: KasminaConfig) -> None:
        self.config = config
        self.latencies_ms: deque[float] = deque(maxlen=config.window)
        self._lat_sum = 0.0  # running Σ and Σ² of latencies_ms (O(1) per forward and
        self._lat_sq = 0.0  # per collect); recomputed exactly every _RESUM appends
        self._lat_count = 0
        self.forwards = 0  # forwards timed since the last collect
        self._last: tuple[int, float, float, float] | None = None  # N, var, dead, corr
        # key (a seed) -> device int64 count of non-finite forwards not read yet: counted
        # where they happen without a sync, read by take_pending every cull_check_every
        # training forwards (SeedSlots._add_seeds), or by the host's step-boundary sync in
        # a data-parallel job (drain_pending); key -1: failed kernels removed since.
        # Not a module buffer (kept out of state_dict: checkpoints load strictly as before).
        self.pending: dict[int, torch.Tensor] = {}
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.errors = 0
        self.forwards = 0
        self.sum: NDArray[np.float64] | None = None  # [D]
        self.sumsq: NDArray[np.float64] | None = None  # [D]
        self.max: NDArray[np.float64] | None = None  # [D] largest value seen per unit
        self.cross: NDArray[np.float64] | None = None  # [C, C], C = min(D, max_corr_units)

    def add_latency(self, ms: float) -> None:
        lat = self.latencies_ms
        if len(lat) == lat.maxlen:
            old = lat[0]
            self._lat_sum -= old
            self._lat_sq -= old * old
        lat.append(ms)
        self._lat_sum += ms
        self._lat_sq += ms * ms
        self.forwards += 1
        self._lat_count += 1
        if self._lat_count % _RESUM == 0:  # keep rounding drift from accumulating
            self._lat_sum = math.fsum(lat)
            self._lat_sq = math.fsum(t * t for t in lat)

    def add_error(self, n: int = 1) -> None:
        """Count ``n`` non-finite forwards (of the output or of a seed's kernel)."""
        self.errors += n

    def add_pending(self, key: int, ok: torch.Tensor) -> None:
        """Count one forward whose device flag ``ok`` may be false, on ``ok``'s device."""
        c = self.pending.get(key)
        if c is None or c.device != ok.device:
            z = torch.zeros((), dtype=torch.int64, device=ok.device)
            c = self.pending[key] = z if c is None else c.to(ok.device)
        c.add_(ok.logical_not())

    def retire_pending(self, key: int) -> None:
        """``key``'s kernel is being removed: count it under key -1, once if it failed."""
        c = self.pending.pop(key, None)
        if c is not None:
            c = c.clamp(max=1)
            old = self.pending.get(-1)
            self.pending[-1] = c if old is None else old + c.to(old.device)

    def drain_pending(self) -> dict[int, torch.Tensor]:
        """The pending device counts by key, not read, and cleared here: what a host's
        step-boundary sync (``tamiyo_client.seed_sync``) gathers for its one reduce."""
        pending, self.pending = self.pending, {}
        return pending

    def take_pending(self, slots: int) -> dict[int, int]:
        """The non-zero pending counts of keys -1 … ``slots`` − 1, read in one
        device-to-host copy, then cleared."""
        if not self.pending:
            return {}
        dev = next(iter(self.pending.values())).device
        counts = torch.zeros(slots + 1, dtype=torch.int64, device=dev)
        for key, c in self.drain_pending().items():
            counts[key + 1] += c.to(dev)
        return {i - 1: n for i, n in enumerate(counts.tolist()) if n}

    def add_output(self, y2d: torch.Tensor | NDArray[np.floating]) -> bool:
        """Accumulate one forward's output, [N, D] (detached). A non-finite output is
        counted as an error and adds nothing; returns whether it was finite. When N >
        ``sample_rows``, every ceil(N / sample_rows)-th row is used (the finiteness check
        still covers all rows)."""
        a = to_numpy(y2d) if isinstance(y2d, torch.Tensor) else y2d
        if not all_finite(a):
            self.errors += 1
            return False
        rows = self.config.sample_rows
        if 0 < rows < a.shape[0]:
            a = a[:: -(-a.shape[0] // rows)]
        z = a.astype(np.float64)
        d = z.shape[1]
        if self.sum is None or self.sum.shape[0] != d:
            c = min(d, self.config.max_corr_units)
            self.n = 0
            self.sum = np.zeros(d)
            self.sumsq = np.zeros(d)
            self.max = np.full(d, -np.inf)
            self.cross = np.zeros((c, c))
        assert self.sumsq is not None
        assert self.max is not None
        assert self.cross is not None
        if z.shape[0] == 0:
            return True
        self.n += z.shape[0]
        self.sum += z.sum(0)
        self.sumsq += np.einsum("ij,ij->j", z, z)
        np.maximum(self.max, z.max(0), out=self.max)
        zc = z[:, : self.cross.shape[0]]
        self.cross += zc.T @ zc
        return True

    @property
    def has_data(self) -> bool:
        """Anything to report: a timed forward, a sampled output or an error."""
        return self.n > 0 or self.errors > 0 or self.forwards > 0

    def collect(self) -> WindowStats:
        """Statistics of the window so far, then start a new window (latencies roll).

        The sums are tiny ([D] and [C, C]): a few numpy calls, microseconds."""
        k = len(self.latencies_ms)
        lat_mean = self._lat_sum / k if k else 0.0
        lat_var = max(self._lat_sq / k - lat_mean * lat_mean, 0.0) if k else 0.0
        if self.n > 0 and self.sum is not None:
            assert self.sumsq is not None
            assert self.max is not None
            assert self.cross is not None
            d = self.sum.shape[0]
            mean = self.sum / self.n
            var = np.maximum(self.sumsq / self.n - mean * mean, 0.0)
            variance = float(var.sum()) / d
            dead = 1.0 - float(np.count_nonzero(self.max > 0)) / d
            corr = _mean_abs_correlation(self.cross / self.n, mean, var)
            self._last = (self.n, variance, dead, corr)
        _, variance, dead, corr = self._last if self._last else (0, 0.0, 0.0, 0.0)
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
