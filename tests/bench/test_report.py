"""``bench.report.write_json``: one bench's run never drops another bench's rows from a
shared results file (``bench.experience`` adds its rows to ``serving.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import write_json


def test_a_part_run_alone_keeps_the_other_benches_rows(tmp_path: Path) -> None:
    write_json(tmp_path, "serving", [{"scenario": "slo64", "v": 1}], merge=True)
    write_json(
        tmp_path, "serving", [{"source": "bench.experience", "logging": True}], merge=True,
        source="bench.experience",
    )  # fmt: skip
    # The serving bench alone again: its own rows replaced, experience's kept.
    write_json(tmp_path, "serving", [{"scenario": "slo64", "v": 2}], merge=True)
    rows = json.loads((tmp_path / "serving.json").read_text())
    assert rows == [
        {"source": "bench.experience", "logging": True},
        {"scenario": "slo64", "v": 2},
    ]
    # The experience bench again: its rows replaced, serving's kept.
    write_json(
        tmp_path, "serving", [{"source": "bench.experience", "logging": False}], merge=True,
        source="bench.experience",
    )  # fmt: skip
    rows = json.loads((tmp_path / "serving.json").read_text())
    assert rows == [{"scenario": "slo64", "v": 2}, {"source": "bench.experience", "logging": False}]


def test_without_merge_the_file_is_the_rows(tmp_path: Path) -> None:
    write_json(tmp_path, "x", [{"source": "a"}, {"b": 1}])
    write_json(tmp_path, "x", [{"c": 2}])
    assert json.loads((tmp_path / "x.json").read_text()) == [{"c": 2}]
