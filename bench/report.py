"""Printing result tables and writing them as JSON under ``bench-results/``."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width text table; ``columns`` = (row key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> None:
    print(f"\n== {title} ==")
    print(format_table(rows, columns))


def environment() -> Row:
    """Where the figures were measured (stored next to them)."""
    import os

    import torch

    return {
        "measured_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_json(
    out_dir: Path, part: str, rows: Sequence[Row], merge: bool = False, source: str | None = None
) -> Path:
    """Write ``rows`` (a JSON list of objects) to ``out_dir/<part>.json``; returns it.

    ``merge``: the file holds the rows of several benches (``bench.experience`` adds its
    rows to ``serving.json``, each marked ``"source"``); only the rows of ``source``
    (None: the file owner's unmarked rows) are replaced and every other bench's are kept,
    so running one part alone never drops another's committed figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{part}.json"
    kept: list[Row] = []
    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = []
        if isinstance(old, list):
            kept = [r for r in old if isinstance(r, dict) and r.get("source") != source]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept + list(rows), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
