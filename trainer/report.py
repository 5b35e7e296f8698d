"""The training report: JSON figures and a PNG of learning curves and final scores.

Why both: the JSON is what tests, the checkpoint manifest and humans diff; the PNG shows
at a glance whether training converged and where each policy lands between no-op (0)
and the oracle (100), with bootstrap CIs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MAIN_LOSS = {"iql": "q_loss", "bc": "bc_loss", "cql": "td_loss"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_report(report: dict[str, Any], metrics_files: list[Path], out_png: Path) -> Path:
    """Three panels: main training loss per run, validation score per run, and final
    normalised scores with 95% CIs per policy on each evaluation set."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in metrics_files:
        for rec in read_metrics(p):
            runs[f"{rec['algo']} s{rec['seed']}"].append(rec)
    for name, recs in sorted(runs.items()):
        algo = name.split()[0]
        tr = [r for r in recs if r["kind"] == "train" and MAIN_LOSS[algo] in r]
        ev = [r for r in recs if r["kind"] == "eval"]
        if tr:
            axes[0].plot([r["step"] for r in tr], [r[MAIN_LOSS[algo]] for r in tr],
                         label=f"{name} {MAIN_LOSS[algo]}")  # fmt: skip
        if ev:
            axes[1].plot([r["step"] for r in ev], [r["eval_score"] for r in ev], marker="o",
                         label=name)  # fmt: skip
    axes[0].set(xlabel="gradient step", ylabel="loss", title="training loss", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="gradient step", ylabel="normalised score",
                title="validation (seeds 2,000,000+, train sizes; picks the step)")  # fmt: skip
    axes[1].axhline(100, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7)
    ax = axes[2]
    sets = list(report["evaluation"].keys())
    policies = list(report["evaluation"][sets[0]]["normalized_score"].keys())
    width = 0.8 / max(len(sets), 1)
    for si, s in enumerate(sets):
        scores = report["evaluation"][s]["normalized_score"]
        xs = [i + si * width for i in range(len(policies))]
        means = [scores[p]["mean"] for p in policies]
        err = [[scores[p]["mean"] - scores[p]["ci_low"] for p in policies],
               [scores[p]["ci_high"] - scores[p]["mean"] for p in policies]]  # fmt: skip
        ax.bar(xs, means, width, yerr=err, capsize=3, label=s)
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(policies))], policies)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.axhline(85, color="green", lw=0.8, ls=":")
    ax.set(ylabel="normalised score (0 = no-op, 100 = oracle)", title="final evaluation, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
