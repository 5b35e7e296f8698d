"""The report's evaluation, selection and targets, assembled from the jobs' results.

Steps 3 and 5 of ``make train`` (``trainer.pipeline``): every run reports its rollouts
(``rollout_stats``); here they become normalized scores with bootstrap CIs over seeds ×
episodes and decision statistics per policy and evaluation set, which checkpoint step
each run serves, and the targets the README reports. Apart from the pipeline, which runs
things, because this part only computes, from plain JSON-able dicts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tamiyo.config import TrainConfig
from trainer.evaluate import Reference, bootstrap_ci
from trainer.fqe_check import fqe_targets
from trainer.simic.rollout import RolloutResult


def rollout_stats(res: RolloutResult) -> dict[str, Any]:
    """What a job reports of its rollouts (JSON-able): returns and decision counts."""
    return {
        "returns": res.returns.tolist(),
        "adaptations": res.adaptations,
        "wrong_adaptations": res.wrong_adaptations,
        "both_adapt": res.both_adapt,
        "same_layer": res.same_layer,
        "oracle_adapt_steps": res.oracle_adapt_steps,
    }


def evaluation(sets: dict[str, Reference], results: dict[str, dict[str, Any]],
               cfg: TrainConfig, served_algo: str) -> dict[str, Any]:  # fmt: skip
    """The report's ``evaluation``: per evaluation set, each policy's normalized score and
    decision statistics (no-op, the fixed policies, every algorithm over its seeds, the
    served policy with its declared and with the server's default rules, the oracle)."""
    evaluation: dict[str, Any] = {}
    for set_name, r in sets.items():
        scores: dict[str, Any] = {}
        stats: dict[str, Any] = {}

        zero = {"both_adapt": 0, "same_layer": 0, "adaptations": 0, "wrong_adaptations": 0}

        def add(
            name: str,
            runs: list[dict[str, Any]],
            r: Reference = r,
            scores: dict[str, Any] = scores,
            stats: dict[str, Any] = stats,
        ) -> None:
            scores[name], stats[name] = _summarise(r, runs)

        add("noop", [{"returns": r.noop.tolist(), **zero}])
        for n in ("heuristic", "behaviour"):
            add(n, [results[n]["eval"][set_name]])
        for a in cfg.algos:
            add(a, [results[f"{a}-s{s}"]["eval"][set_name] for s in range(cfg.train_seeds)])
        if served_algo in cfg.algos:
            for key in ("served", "served_default_rules"):
                add(f"{served_algo}_{key}", [results[f"{served_algo}-s{s}"][key][set_name]
                                             for s in range(cfg.train_seeds)])  # fmt: skip
        add("oracle", [rollout_stats(r.oracle_run) if r.oracle_run is not None
                       else {"returns": r.oracle.tolist(), **zero}])  # fmt: skip
        evaluation[set_name] = {"episodes": len(r.episodes), "normalized_score": scores,
                                "stats": stats}  # fmt: skip
    return evaluation


def selection(results: dict[str, dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """Which step each run's checkpoint comes from (best validation score, train sizes)."""
    keys = ("selected_step", "validation_score")
    return {f"{a}-s{s}": {k: results[f"{a}-s{s}"][k] for k in keys}
            for s in range(cfg.train_seeds) for a in cfg.algos}  # fmt: skip


def _summarise(r: Reference, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score with bootstrap CI (seeds × episodes) and decision statistics of some runs."""
    ret = np.array([x["returns"] for x in runs], np.float64)
    mean, lo, hi = bootstrap_ci(r, ret)
    score = {"mean": mean, "ci_low": lo, "ci_high": hi,
             "per_seed": [r.score(row) for row in ret]}  # fmt: skip
    both = sum(x["both_adapt"] for x in runs)
    adapt = sum(x["adaptations"] for x in runs)
    stats = {
        "mean_return": float(ret.mean()),
        "oracle_layer_agreement": sum(x["same_layer"] for x in runs) / both if both else None,
        "adaptations_per_episode": adapt / ret.size,
        "wrong_adaptation_rate": sum(x["wrong_adaptations"] for x in runs) / adapt
        if adapt
        else None,
    }
    return score, stats


def targets(report: dict[str, Any], algo: str) -> dict[str, Any]:
    """The report's ``targets``: per evaluation set, ``algo``'s score and oracle-layer
    agreement against the README's thresholds; then FQE's (``fqe_targets``)."""
    out: dict[str, Any] = {}
    for s, ev in report["evaluation"].items():
        sc = ev["normalized_score"]
        out[s] = {
            f"{algo}_score": sc[algo]["mean"],
            f"{algo}_ge_85": sc[algo]["mean"] >= 85,
            f"{algo}_minus_behaviour": sc[algo]["mean"] - sc["behaviour"]["mean"],
            "ge_20_above_behaviour": sc[algo]["mean"] - sc["behaviour"]["mean"] >= 20,
            "oracle_layer_agreement": ev["stats"][algo]["oracle_layer_agreement"],
            "agreement_ge_80pct": (ev["stats"][algo]["oracle_layer_agreement"] or 0) >= 0.8,
        }
    out.update(fqe_targets(report["fqe"]))
    return out


def clean(x: Any) -> Any:
    """``x`` for JSON: non-finite floats become None, tuples lists (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x
