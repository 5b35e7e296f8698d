"""``python -m bench [--only inference,serving] [--quick] [--threads N]``: run bench parts."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import bench
from bench import BenchOptions
from tamiyo.cli_text import HelpFormatter, describe


def discover() -> dict[str, ModuleType]:
    """Modules of this package that define ``PART`` and ``run`` (sorted by ``ORDER``)."""
    found: list[tuple[int, str, ModuleType]] = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name in ("report", "seed_reference"):
            continue
        try:
            mod = importlib.import_module(f"bench.{info.name}")
        except Exception as e:  # one broken part must not hide the others
            print(f"bench: skipping module bench.{info.name}: {type(e).__name__}: {e}")
            continue
        if isinstance(getattr(mod, "PART", None), str) and callable(getattr(mod, "run", None)):
            found.append((int(getattr(mod, "ORDER", 100)), mod.PART, mod))
    return {name: mod for _, name, mod in sorted(found, key=lambda t: (t[0], t[1]))}


def main(argv: list[str] | None = None) -> int:
    parts = discover()
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=describe(__doc__), formatter_class=HelpFormatter
    )
    ap.add_argument("--only", default="", help=f"comma-separated parts of: {', '.join(parts)}")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="JSON and plots")
    args = ap.parse_args(argv)
    wanted = [p.strip() for p in args.only.split(",") if p.strip()] or list(parts)
    unknown = [p for p in wanted if p not in parts]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; known: {list(parts)}")
    opts = BenchOptions(quick=args.quick, out_dir=args.out, threads=args.threads)
    for name in wanted:
        run: Callable[[BenchOptions], None] = parts[name].run
        print(f"\n#### bench part: {name}", flush=True)
        run(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
