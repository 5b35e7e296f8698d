"""The batcher's cost model: how long a batch of graphs takes to run, learned online.

The batcher closes a batch when the earliest deadline's slack falls under the
predicted inference time, the door refuses work whose predicted wait exceeds its budget,
and pushback is sized from it: all of them read ``CostModel.predict_ms``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tamiyo.config import BatchConfig

MIN_CALIBRATED_REL = 0.1
"""Relative error assumed after a calibration at least (``CostModel.fit``): a 20 % safety
margin on the first batches (measured: real batches ran 10-18 % over a fresh fit)."""

Coefs = tuple[float, float, float]  # a (ms), b (ms per 1000 nodes), c (ms per 100 graphs)


class CostModel:
    """Predicts a batch's inference time in ms as ``a + b·nodes/1000 + c·graphs/100``.

    Fitted online by normalised LMS (``θ += μ·r·x/|x|²``, μ = 1 - ``cost_forgetting``
    scaled up), so it follows the machine's current speed (thermal, noisy neighbours).
    Asymmetric robustness: a measurement far *above* the fit (one preempted batch) moves
    the fit by at most 2× per step, while one below it is taken at face value, so a
    pessimistic model recovers in a few batches. The prediction is inflated by twice the
    EWMA of the *relative* error: the batcher needs a safe bound, not the mean.
    Thread-safety: only the thread that runs batches calls ``update``; ``predict_ms`` reads a
    tuple that is swapped atomically.
    """

    def __init__(self, config: BatchConfig) -> None:
        self._mu = min(0.9, 15.0 * (1.0 - config.cost_forgetting))
        self._theta: Coefs = (config.prior_batch_ms, config.prior_node_us, 0.0)
        self._rel = 0.0
        self._publish()

    def _publish(self) -> None:
        self._coef: tuple[Coefs, float] = (self._theta, self._rel)

    @staticmethod
    def _x(nodes: int, graphs: int) -> np.ndarray:
        return np.array([1.0, nodes / 1000.0, graphs / 100.0])

    def fixed_ms(self) -> float:
        """The fitted cost of a (small) batch regardless of its size (ms): what one more
        graph joining a batch, instead of running in its own, saves."""
        return max(self._coef[0][0], 0.05)

    def predict_ms(self, nodes: int, graphs: int, safe: bool = True) -> float:
        """Predicted ms; ``safe`` inflates by the error margin (closing a batch), while
        ``safe=False`` is the plain fit (deciding that a job cannot make it at all: an
        inflated guess there sheds work that would have made its deadline)."""
        (a, b, c), rel = self._coef
        fit = max(0.05, a + b * nodes / 1000.0 + c * graphs / 100.0)
        return fit * (1.0 + 2.0 * rel) if safe else fit

    def fit(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Least-squares fit to measured ``(nodes, graphs, ms)`` batches (calibration).

        Why not a few ``update`` steps: normalised LMS from the prior needs far more
        than a calibration's handful of batches, and meanwhile the intercept absorbs the
        cost of the big batches (observed: 10 ms fixed cost, 16 ms predicted for a
        4-node graph that takes ~1 ms), so the first decisions of every session were
        shed although their deadline was ample. Relative errors are minimised (small
        batches, the common case, count as much as big ones); coefficients are >= 0.
        """
        if not samples:
            return
        x = np.array([self._x(n, g) for n, g, _ in samples])
        y = np.array([ms for _, _, ms in samples], np.float64)
        theta = _nonnegative_fit(x, y)
        fit = np.maximum(x @ theta, 0.05)
        self._theta = (float(theta[0]), float(theta[1]), float(theta[2]))
        rel = float(np.median(np.abs(y - fit) / np.maximum(y, fit)))
        # A few batches leave few residuals (3 shapes fit 3 coefficients exactly): they
        # say nothing about this machine's noise, so keep a margin.
        self._rel = min(max(rel, MIN_CALIBRATED_REL), 1.0)
        self._publish()

    def update(self, nodes: int, graphs: int, measured_ms: float) -> None:
        # (three floats in plain Python: numpy's per-call cost made this ~60 µs of event
        # loop per batch under load, for six multiply-adds)
        x1, x2 = nodes / 1000.0, graphs / 100.0
        a, b, c = self._theta
        fit = max(a + b * x1 + c * x2, 0.05)
        raw = measured_ms - fit
        err = min(raw, 2.0 * fit)
        k = self._mu * err / (1.0 + x1 * x1 + x2 * x2)  # (x = [1, x1, x2])
        self._theta = (a + k, b + k * x1, c + k * x2)
        self._rel = 0.9 * self._rel + 0.1 * min(abs(raw) / max(measured_ms, fit), 1.0)
        self._publish()


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of relative errors with coefficients >= 0 (negative ones dropped and
    the rest refitted)."""
    w = 1.0 / np.maximum(y, 0.05)
    keep = np.ones(x.shape[1], bool)
    theta = np.zeros(x.shape[1])
    for _ in range(3):
        sol = np.linalg.lstsq(x[:, keep] * w[:, None], y * w, rcond=None)[0]
        theta[:] = 0.0
        theta[keep] = sol
        if (theta >= 0).all():
            break
        keep &= theta > 0
    return np.maximum(theta, 0.0)
