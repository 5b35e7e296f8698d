"""``make train``: behaviour data → BC / IQL over several seeds → evaluation → report.

Steps (all seeded, so a fresh clone reproduces the shipped checkpoint's figures):
 1. Simic behaviour data (ε-heuristic) logged to experience stores under ``out/data``;
    one store for training, one held out for FQE (reused only when generated from the
    same recipe, see ``generate``). Read back with the one reader.
 2. Every (algo, seed) trains in a worker process (``workers`` at a time, forked after
    the dataset is featurized; one torch thread each) and is scored on the held-out
    seeds and the unseen graph sizes. Workers report through JSON files.
 3. Reference policies (no-op, oracle, heuristic, behaviour) on the same episodes.
 4. FQE of IQL seed 0 on the held-out logged data vs its true discounted return: the
    mean of ``fqe_members`` critics (seeds from ``seed``) and their spread.
 5. ``report.json`` + ``report.png``; IQL seed 0 becomes the default checkpoint.

This module says what runs, in order; the code of each step is its own module:
``trainer.behaviour_data`` (1), ``trainer.workers`` (how the jobs of 2 and 3 run),
``trainer.fqe_check`` (4), ``trainer.summary`` (the report's scores, selection and
targets) and ``trainer.publish`` (the default checkpoint) for 5. Their public names are
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from tamiyo.config import RuleConfig, SimicConfig, TrainConfig
from trainer.behaviour_data import (
    DATA_FORMAT,
    SEED_BASE,
    data_recipe,
    generate,
    log,
    recipe_differences,
)
from trainer.dataset import load_dataset
from trainer.evaluate import NetworkPolicy, Reference
from trainer.fqe_check import check_fqe, fqe_figures, fqe_horizon, fqe_targets, heldout_store
from trainer.loop import train
from trainer.publish import publish_default, served_rules, serving_rules
from trainer.report import plot_report, write_json
from trainer.simic.policies import BehaviourPolicy, HeuristicPolicy
from trainer.simic.rollout import episodes_for, run_policy
from trainer.state import META as STATE_META
from trainer.state import data_fingerprint
from trainer.summary import clean, evaluation, rollout_stats, selection, targets
from trainer.workers import run_jobs

__all__ = [
    "DATA_FORMAT",
    "SEED_BASE",
    "data_recipe",
    "fqe_figures",
    "fqe_horizon",
    "fqe_targets",
    "generate",
    "publish_default",
    "recipe_differences",
    "run_pipeline",
    "served_rules",
    "serving_rules",
]


def run_pipeline(cfg: TrainConfig, simic: SimicConfig, out: Path, checkpoint_dir: Path | None,
                 *, progress: bool = True, resume: bool = False) -> dict[str, Any]:  # fmt: skip
    """Everything ``make train`` does; returns the report dict.

    Without ``resume`` every training run starts fresh: a previous run's saved state under
    ``out/runs`` is discarded (and the log names the runs), because a report must describe
    the configuration it states, and an old state matching only on the algorithm once
    turned a re-run with new hyperparameters into zero updates of the old weights. With
    ``resume`` (``--resume``) a saved state continues only if it is the same run (same
    config outside ``state.RESUME_IGNORED``, same data and validation set), else the run
    stops with the differences named."""
    t_start = time.monotonic()
    if cfg.num_threads > 0:  # FQE runs here: 2 spinning OpenMP threads under load ran 20x slower
        torch.set_num_threads(cfg.num_threads)
    out.mkdir(parents=True, exist_ok=True)
    log(f"behaviour data: {cfg.data_episodes} + {cfg.heldout_data_episodes} episodes")
    data_path = generate(out / "data" / "behaviour.sqlite",
                         range(SEED_BASE["data"], SEED_BASE["data"] + cfg.data_episodes),
                         simic.train_sizes, simic)  # fmt: skip
    fqe_path = heldout_store(cfg, simic, out / "data")
    data = load_dataset([data_path], cfg.gamma, progress=progress)
    fingerprint = data_fingerprint(data)
    log(f"dataset: {len(data)} transitions ({data.dropped_invalid} invalid actions dropped), "
        f"fingerprint {fingerprint}")  # fmt: skip

    def ref(kind: str, n: int, sizes: tuple[int, int]) -> Reference:
        return Reference.build(episodes_for(range(SEED_BASE[kind], SEED_BASE[kind] + n),
                                            sizes, simic), simic)  # fmt: skip

    val = ref("val", cfg.eval_episodes, simic.train_sizes)
    sets = {"heldout_seeds": ref("test", cfg.final_eval_episodes, simic.train_sizes),
            "unseen_sizes": ref("unseen", cfg.final_eval_episodes, simic.unseen_sizes)}  # fmt: skip
    runs_dir = out / "runs"
    served_algo = "iql" if "iql" in cfg.algos else cfg.algos[0]
    names = [f"{a}-s{s}" for s in range(cfg.train_seeds) for a in cfg.algos]
    saved = [n for n in names if (runs_dir / n / "state" / STATE_META).exists()]
    if saved and resume:
        log(f"--resume: continuing the saved state of {', '.join(saved)} (if it matches)")
    elif saved:
        log(f"fresh run (no --resume): discarding the saved training state of "
            f"{', '.join(saved)} in {runs_dir}")  # fmt: skip

    def train_job(algo: str, seed: int) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            c = replace(cfg, algo=algo, seed=seed)
            res = train(c, data, runs_dir / f"{algo}-s{seed}", simic=simic, validation=val,
                        resume=resume, progress=progress, fingerprint=fingerprint,
                        provenance={"data": str(data_path), "transitions": len(data)})  # fmt: skip
            assert res.checkpoint is not None
            pol = NetworkPolicy(res.policy, algo)
            ev = {k: rollout_stats(run_policy(pol, r.episodes, simic)) for k, r in sets.items()}
            out: dict[str, Any] = {"checkpoint": str(res.checkpoint), "eval": ev,
                                   "selected_step": res.selected_step,
                                   "validation_score": res.selected_score}  # fmt: skip
            if algo == served_algo:  # the same network behind the server's DecisionRules:
                # with the rules its checkpoint declares, and with the server's defaults
                for key, rules in (("served", served_rules(cfg)), ("served_default_rules",
                                                                   RuleConfig())):  # fmt: skip
                    srv = NetworkPolicy(res.policy, algo, rules=rules)
                    out[key] = {k: rollout_stats(run_policy(srv, r.episodes, simic))
                                for k, r in sets.items()}  # fmt: skip
            return out

        return fn

    def fixed_job(name: str) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            pol = (HeuristicPolicy() if name == "heuristic"
                   else BehaviourPolicy(simic.behaviour_epsilon))  # fmt: skip
            return {"eval": {k: rollout_stats(run_policy(pol, r.episodes, simic))
                             for k, r in sets.items()}}  # fmt: skip

        return fn

    jobs = [(f"{a}-s{s}", train_job(a, s)) for s in range(cfg.train_seeds) for a in cfg.algos]
    jobs += [(n, fixed_job(n)) for n in ("heuristic", "behaviour")]
    log(f"training {len(jobs) - 2} runs + 2 reference evaluations on {cfg.workers} workers")
    results = run_jobs(jobs, cfg.workers, out / "jobs")

    report: dict[str, Any] = {"evaluation": evaluation(sets, results, cfg, served_algo),
                              "config": {"train": asdict(cfg), "simic": asdict(simic)}}  # fmt: skip
    report["selection"] = selection(results, cfg)
    best_algo = "iql" if "iql" in cfg.algos else cfg.algos[0]
    default_ckpt = Path(results[f"{best_algo}-s0"]["checkpoint"])
    report["fqe"] = check_fqe(cfg, simic, default_ckpt, fqe_path, progress)
    report["data"] = {"train": {"path": str(data_path), "transitions": len(data),
                                "fingerprint": fingerprint},
                      "fqe": {"path": str(fqe_path)}}  # fmt: skip
    report["targets"] = targets(report, best_algo)
    report["default_policy"] = {"algo": best_algo, "seed": 0, "source": str(default_ckpt),
                                "serving_rules": serving_rules(cfg)}  # fmt: skip
    report["elapsed_s"] = time.monotonic() - t_start
    report = clean(report)
    metrics = [runs_dir / n / "metrics.jsonl" for n in names]  # not other configs' runs
    write_json(report, out / "report.json")
    plot_report(report, metrics, out / "report.png")
    log(f"report: {out / 'report.json'} and {out / 'report.png'}")
    if checkpoint_dir is not None:
        ship = publish_default(default_ckpt, checkpoint_dir, report, out / "report.png")
        log(f"default checkpoint: {ship} (report beside it: {checkpoint_dir / 'report.json'})")
    return report
