"""The serving bench's own logic: the sweep's plot and the verdicts on the issue's
targets (the runs themselves are ``make bench``; they take minutes and a quiet box)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.serving import _verdicts, overload_rate, plot_sweep


def _sweep_row(offered: float, ours: float, p99: float | None, echo_p99: float) -> dict[str, Any]:
    return {
        "offered_per_s": offered,
        "decisions_per_s": ours,
        "p99_ms": p99,
        "echo_per_s": offered,
        "echo_p99_ms": echo_p99,
    }


def test_the_sweep_plot_is_written_even_where_nothing_was_decided(tmp_path: Path) -> None:
    rows = [_sweep_row(500, 500, 4.0, 1.0), _sweep_row(1000, 980, 9.0, 1.5)]
    rows.append(_sweep_row(3000, 0.0, None, 9.0))  # everything shed: no p99 at all
    out = tmp_path / "sub" / "serving.png"
    plot_sweep(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_follow_the_targets() -> None:
    closed = {"streams": 64, "mode": "closed", "echo_per_s": 1000.0}
    slo = {"scenario": "slo64", "mode": "open", "decisions_per_s": 700.0, "p99_ms": 9.9}
    slo |= {"ratio": 1.0}
    big = {"scenario": "1000@2000", "mode": "open", "p99_ms": 10.5, "lost": 0}
    over = {"scenario": "overload", "mode": "open", "offered_per_s": 4000.0}
    over |= {"decisions_per_s": 100.0, "p99_ms": 8.0, "shed": 5, "lost": 0}
    got = _verdicts([closed, slo, big, over])
    assert [v.rsplit(": ", 1)[1] for v in got] == ["MET", "NOT MET", "MET"]
    slo["p99_ms"] = 10.1
    over["lost"] = 1
    got = _verdicts([closed, slo, big, over])
    assert [v.rsplit(": ", 1)[1] for v in got] == ["NOT MET", "NOT MET", "NOT MET"]


def test_overload_is_twice_the_best_closed_loop_row() -> None:
    rows = [
        {"mode": "closed", "decisions_per_s": 900.0},
        {"mode": "closed", "decisions_per_s": 1500.0},
        {"mode": "open", "decisions_per_s": 2400.0},  # an open row (sweep, SLO) never counts
    ]
    assert overload_rate(rows) == 3000.0
