"""Publishing the default policy: the rules it is served with and its checkpoint.

The last step of ``make train`` (``trainer.pipeline``), apart because it is what the
server sees: the checkpoint re-saved through the shared writer with the evaluation in its
manifest, the decision rules it declares (``serving_rules``, which its "served" score is
measured with), older versions pruned, and the report beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tamiyo.config import RuleConfig, TrainConfig, rules_for_policy
from tamiyo.policy.checkpoint import (
    load_checkpoint,
    prune_versions,
    resolve_latest,
    save_checkpoint,
)
from trainer.report import write_json


def serving_rules(cfg: TrainConfig) -> dict[str, float]:
    """The decision-rule values the published policy is served with, declared in its
    checkpoint's manifest (``tamiyo.config.POLICY_RULES``); its "served" score is
    measured with exactly these."""
    return {"health_threshold": cfg.served_health_threshold}


def served_rules(cfg: TrainConfig) -> RuleConfig:
    """The server's rules with ``serving_rules`` applied, as an unconfigured server runs
    the published checkpoint."""
    return rules_for_policy(RuleConfig(), serving_rules(cfg), ())


def publish_default(src: Path, checkpoint_dir: Path, report: dict[str, Any],
                    png: Path) -> Path:  # fmt: skip
    """Re-save ``src`` into ``checkpoint_dir`` through the shared writer (new version,
    manifest carrying the evaluation), drop older versions, put the report beside it."""
    loaded = load_checkpoint(src)
    summary = {s: {p: {k: v[k] for k in ("mean", "ci_low", "ci_high")}
                   for p, v in ev["normalized_score"].items()}
               for s, ev in report["evaluation"].items()}  # fmt: skip
    metrics = {**loaded.manifest.get("metrics", {}), "normalized_score": summary,
               "targets": report["targets"], "fqe": report["fqe"]}  # fmt: skip
    final = save_checkpoint(checkpoint_dir, loaded.model, loaded.config, metrics=metrics,
                            provenance=loaded.manifest.get("provenance", {}),
                            serving_rules=report["default_policy"]["serving_rules"])  # fmt: skip
    if resolve_latest(checkpoint_dir) == final:
        prune_versions(checkpoint_dir, keep=1)  # deletes verified checkpoint dirs only
    write_json(report, checkpoint_dir / "report.json")
    shutil.copyfile(png, checkpoint_dir / "report.png")
    return final
