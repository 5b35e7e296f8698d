"""``make bench``: speed and memory measurements, each compared with a baseline measured
in the same run (ratios, not absolute times: the CI box is 2 noisy cores).

A *part* is any module in this package that defines ``PART: str`` (its name, used by
``--only``) and ``run(opts: BenchOptions) -> None``; ``python -m bench`` discovers them,
so adding a part needs no edit here. Every part prints a table and writes
``bench-results/<part>.json`` through ``bench.report``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchOptions:
    """Options shared by every part. ``quick`` trades precision for time (CI smoke)."""

    quick: bool = False
    out_dir: Path = Path("bench-results")
    threads: int = 1  # torch intra-op threads (see bench.inference for why 1)
