"""The batcher's cost model: online fit, calibration fit, and its safety margin."""

from __future__ import annotations

import pytest

from tamiyo.config import BatchConfig
from tamiyo_server.cost_model import CostModel

CFG = BatchConfig()


def test_cost_model_learns_linear_cost() -> None:
    model = CostModel(CFG)
    for i in range(1500):
        nodes = 50 + (i * 37) % 3000
        graphs = 1 + i % 64
        model.update(nodes, graphs, 0.3 + 2.0 * nodes / 1000.0 + 0.5 * graphs / 100.0)
    for nodes, graphs in ((100, 2), (2000, 40)):
        truth = 0.3 + 2.0 * nodes / 1000.0 + 0.5 * graphs / 100.0
        assert model.predict_ms(nodes, graphs) == pytest.approx(truth, rel=0.1, abs=0.1)


def _native_like(nodes: int, graphs: int) -> float:
    """A runner's cost (ms) with a small fixed part, as the native forward has."""
    return 0.04 + 1.6 * nodes / 1000.0 + 0.4 * graphs / 100.0


CASES = ((30, 1), (200, 4), (300, 1), (320, 5), (2000, 40))  # (nodes, graphs)


def test_cost_model_calibration_fits_the_runner_and_keeps_a_margin() -> None:
    """The prior (CFG: ms-scale fixed cost) is far off; a calibration over a spread of
    shapes predicts each case within 5 %, and exact fits still keep a safety margin."""
    model = CostModel(CFG)
    assert model.predict_ms(30, 1, safe=False) > 2 * _native_like(30, 1)
    shapes = [(1 + i % 64, 4 + (i * 37) % 60) for i in range(300)]
    model.fit([(g * n, g, _native_like(g * n, g)) for g, n in shapes])
    for nodes, graphs in CASES:
        got = model.predict_ms(nodes, graphs, safe=False)
        assert got == pytest.approx(_native_like(nodes, graphs), rel=0.05, abs=0.01)
        # exact fits say nothing about noise: a margin stays (MIN_CALIBRATED_REL)
        assert model.predict_ms(nodes, graphs) >= 1.2 * got
