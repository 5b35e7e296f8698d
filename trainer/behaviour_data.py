"""Behaviour data for the trainer: Simic ε-behaviour episodes logged to experience stores.

Step 1 of ``make train`` (``trainer.pipeline``), apart because it is the one step with its
own cache: a store is reused only when its ``.complete`` marker records the same recipe
(``data_recipe``: episode seeds, graph sizes, the whole SimicConfig, the generator's
source), so the data always is what the report says it is. Also the seed blocks of every
episode set (``SEED_BASE``), kept disjoint here, and the pipeline's progress line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tamiyo.config import RuleConfig, SimicConfig
from tamiyo.experience import ExperienceWriter
from trainer.simic.policies import BehaviourPolicy
from trainer.simic.rollout import episodes_for, run_policy

# First episode seed of each set: the logged data, the held-out data FQE reads, validation,
# the final test on the training sizes and on the unseen sizes. Far apart: never overlapping.
SEED_BASE = {"data": 0, "fqe": 1_000_000, "val": 2_000_000, "test": 3_000_000,
             "unseen": 4_000_000}  # fmt: skip


def log(msg: str) -> None:
    """A progress line of ``make train`` (stdout, timestamped)."""
    print(f"[tamiyo-train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Bump when generate() writes different data for the same recipe in a way the source
# hash below cannot see.
DATA_FORMAT = 2
# Code whose change changes the logged data: the simulator, its policies and rollout, the
# experience writer / encoding, and what builds the logged states (the policy package's
# snapshots and featurizer, the signal columns, the wire helpers) and the behaviour
# policy's rules (tamiyo/config.py). A change here regenerates the stores.
_GENERATOR_SOURCES = (
    "trainer/simic",
    "tamiyo/experience",
    "tamiyo/policy",
    "tamiyo/signal_columns.py",
    "tamiyo/wire.py",
    "tamiyo/config.py",
)
_ROOT = Path(__file__).resolve().parents[1]


def _source_hash() -> str:
    h = hashlib.blake2b(digest_size=12)
    for d in _GENERATOR_SOURCES:
        path = _ROOT / d
        for f in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            h.update(f"{f.relative_to(_ROOT)}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def data_recipe(seeds: range, sizes: tuple[int, int], simic: SimicConfig) -> dict[str, Any]:
    """Everything the behaviour data written by ``generate`` is a function of (as read back
    from JSON): the episode seeds, graph sizes, the whole SimicConfig (dynamics, horizon,
    ε, noise), the behaviour policy's rules and the source code the data depends on."""
    recipe = {"format": DATA_FORMAT, "policy": "simic-behaviour",
              "seeds": [seeds.start, seeds.stop, seeds.step], "episodes": len(seeds),
              "sizes": list(sizes), "simic": asdict(simic),
              "rules": asdict(RuleConfig()),  # the behaviour policy's heuristic rules
              "code": _source_hash()}  # fmt: skip
    out: dict[str, Any] = json.loads(json.dumps(recipe))
    return out


def recipe_differences(old: Any, new: dict[str, Any]) -> list[str]:
    """``"key: old → new"`` (dotted keys) for every difference between two recipes."""
    if not isinstance(old, dict):
        return [f"marker: {old!r} is not a recipe"]

    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(old), flat(new)
    absent = "<absent>"
    keys = sorted(k for k in set(a) | set(b) if a.get(k, absent) != b.get(k, absent))
    return [f"{k}: {a.get(k, absent)!r} → {b.get(k, absent)!r}" for k in keys]


def generate(path: Path, seeds: range, sizes: tuple[int, int], simic: SimicConfig) -> Path:
    """Log ε-behaviour episodes to ``path``.

    An existing store is reused only when its ``.complete`` marker records exactly this
    ``data_recipe``; otherwise it is regenerated and the log says why (a changed config
    once trained silently on the old data while the report claimed the new config). The
    marker is removed before and written (atomically) after the data, so an interrupted
    generation is never taken for a complete one."""
    done_marker = path.with_name(path.name + ".complete")
    recipe = data_recipe(seeds, sizes, simic)
    if path.exists() or done_marker.exists():
        if not path.exists():
            why = ["the store is missing"]
        elif not done_marker.exists():
            why = ["no completion marker (an interrupted generation)"]
        else:
            try:
                why = recipe_differences(json.loads(done_marker.read_text()), recipe)
            except (OSError, json.JSONDecodeError) as exc:
                why = [f"unreadable marker ({exc})"]
        if not why:
            log(f"reusing {path} (its marker records the same recipe)")
            return path
        log(f"regenerating {path}: " + "; ".join(why))
    path.parent.mkdir(parents=True, exist_ok=True)
    done_marker.unlink(missing_ok=True)
    for p in (path, *(path.with_name(path.name + x) for x in ("-wal", "-shm", "-journal"))):
        p.unlink(missing_ok=True)
    with ExperienceWriter(path, writer_name="simic") as w:
        beh = BehaviourPolicy(simic.behaviour_epsilon)
        run_policy(beh, episodes_for(seeds, sizes, simic), simic, writer=w,
                   policy_version=f"simic-behaviour-eps{simic.behaviour_epsilon}")  # fmt: skip
        w.flush()
        if w.dropped:
            raise RuntimeError(f"{path}: {w.dropped} records dropped while generating")
    tmp = done_marker.with_name(done_marker.name + ".tmp")
    tmp.write_text(json.dumps(recipe, indent=1))
    os.replace(tmp, done_marker)
    return path
