"""``make train``: behaviour data → BC / IQL over several seeds → evaluation → report.

Steps (all seeded, so a fresh clone reproduces the shipped checkpoint's figures):
 1. Simic behaviour data (ε-heuristic) logged to experience stores under ``out/data``;
    one store for training, one held out for FQE (reused only when generated from the
    same recipe, see ``generate``). Read back with the one reader.
 2. Every (algo, seed) trains in a worker process (``workers`` at a time, forked after
    the dataset is featurized; one torch thread each) and is scored on the held-out
    seeds and the unseen graph sizes. Workers report through JSON files.
 3. Reference policies (no-op, oracle, heuristic, behaviour) on the same episodes.
 4. FQE of IQL seed 0 on the held-out logged data vs its true discounted return.
 5. ``report.json`` + ``report.png``; IQL seed 0 becomes the default checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamiyo.config import RuleConfig, SimicConfig, TrainConfig, rules_for_policy
from tamiyo.experience import ExperienceWriter
from tamiyo.policy.checkpoint import (
    load_checkpoint,
    prune_versions,
    resolve_latest,
    save_checkpoint,
)
from trainer.dataset import OfflineDataset, load_dataset
from trainer.evaluate import NetworkPolicy, Reference, bootstrap_ci
from trainer.fqe import fit_q
from trainer.loop import train
from trainer.report import plot_report, write_json
from trainer.simic.policies import BehaviourPolicy, HeuristicPolicy
from trainer.simic.rollout import RolloutResult, episodes_for, run_policy
from trainer.state import META as STATE_META
from trainer.state import data_fingerprint

SEED_BASE = {"data": 0, "fqe": 1_000_000, "val": 2_000_000, "test": 3_000_000,
             "unseen": 4_000_000}  # fmt: skip


def _log(msg: str) -> None:
    print(f"[tamiyo-train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Bump when generate() writes different data for the same recipe in a way the source
# hash below cannot see.
DATA_FORMAT = 2
# Code whose change changes the logged data: the simulator, its policies and rollout, and
# the experience writer / encoding. A change here regenerates the stores.
_GENERATOR_SOURCES = ("trainer/simic", "tamiyo/experience")
_ROOT = Path(__file__).resolve().parents[1]


def _source_hash() -> str:
    h = hashlib.blake2b(digest_size=12)
    for d in _GENERATOR_SOURCES:
        for f in sorted((_ROOT / d).glob("*.py")):
            h.update(f"{d}/{f.name}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def data_recipe(seeds: range, sizes: tuple[int, int], simic: SimicConfig) -> dict[str, Any]:
    """Everything the behaviour data written by ``generate`` is a function of (as read back
    from JSON): the episode seeds, graph sizes, the whole SimicConfig (dynamics, horizon,
    ε, noise) and the generator's source code."""
    recipe = {"format": DATA_FORMAT, "policy": "simic-behaviour",
              "seeds": [seeds.start, seeds.stop, seeds.step], "episodes": len(seeds),
              "sizes": list(sizes), "simic": asdict(simic), "code": _source_hash()}  # fmt: skip
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
            _log(f"reusing {path} (its marker records the same recipe)")
            return path
        _log(f"regenerating {path}: " + "; ".join(why))
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


def _rollout_stats(res: RolloutResult) -> dict[str, Any]:
    return {
        "returns": res.returns.tolist(),
        "adaptations": res.adaptations,
        "wrong_adaptations": res.wrong_adaptations,
        "both_adapt": res.both_adapt,
        "same_layer": res.same_layer,
        "oracle_adapt_steps": res.oracle_adapt_steps,
    }


def _run_jobs(jobs: list[tuple[str, Callable[[], dict[str, Any]]]], workers: int,
              out_dir: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Run jobs in up to ``workers`` forked processes; results travel as JSON files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.txt").unlink(missing_ok=True)  # a previous run's failure is not ours
    if workers <= 1:
        return {name: fn() for name, fn in jobs}
    # Longest first onto the least loaded lane (IQL/CQL cost ~3 BC runs).
    lanes: list[list[tuple[str, Callable[[], dict[str, Any]]]]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for job in sorted(jobs, key=lambda j: -_cost(j[0])):
        best = load.index(min(load))
        lanes[best].append(job)
        load[best] += _cost(job[0])
    pids = []
    for lane in lanes:
        pid = os.fork()
        if pid == 0:  # child: run the lane, write JSON, leave without cleanup handlers
            code = 0
            try:
                for name, fn in lane:
                    (out_dir / f"{name}.json").write_text(json.dumps(fn()))
            except BaseException as exc:
                (out_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
                code = 1
            os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        err = out_dir / "error.txt"
        raise RuntimeError(f"training worker failed: {err.read_text() if err.exists() else '?'}")
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name, _ in jobs}


def _cost(name: str) -> float:
    return 3.0 if name.startswith(("iql", "cql")) else 1.0


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


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
    _log(f"behaviour data: {cfg.data_episodes} + {cfg.heldout_data_episodes} episodes")
    data_path = generate(out / "data" / "behaviour.sqlite",
                         range(SEED_BASE["data"], SEED_BASE["data"] + cfg.data_episodes),
                         simic.train_sizes, simic)  # fmt: skip
    fqe_path = generate(out / "data" / "heldout.sqlite",
                        range(SEED_BASE["fqe"], SEED_BASE["fqe"] + cfg.heldout_data_episodes),
                        simic.train_sizes, simic)  # fmt: skip
    data = load_dataset([data_path], cfg.gamma, progress=progress)
    fingerprint = data_fingerprint(data)
    _log(f"dataset: {len(data)} transitions ({data.dropped_invalid} invalid actions dropped), "
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
        _log(f"--resume: continuing the saved state of {', '.join(saved)} (if it matches)")
    elif saved:
        _log(f"fresh run (no --resume): discarding the saved training state of "
             f"{', '.join(saved)} in {runs_dir}")  # fmt: skip

    def train_job(algo: str, seed: int) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            c = replace(cfg, algo=algo, seed=seed)
            res = train(c, data, runs_dir / f"{algo}-s{seed}", simic=simic, validation=val,
                        resume=resume, progress=progress, fingerprint=fingerprint,
                        provenance={"data": str(data_path), "transitions": len(data)})  # fmt: skip
            assert res.checkpoint is not None
            pol = NetworkPolicy(res.policy, algo)
            ev = {k: _rollout_stats(run_policy(pol, r.episodes, simic)) for k, r in sets.items()}
            out: dict[str, Any] = {"checkpoint": str(res.checkpoint), "eval": ev,
                                   "selected_step": res.selected_step,
                                   "validation_score": res.selected_score}  # fmt: skip
            if algo == served_algo:  # the same network behind the server's DecisionRules:
                # with the rules its checkpoint declares, and with the server's defaults
                for key, rules in (("served", served_rules(cfg)), ("served_default_rules",
                                                                   RuleConfig())):  # fmt: skip
                    srv = NetworkPolicy(res.policy, algo, rules=rules)
                    out[key] = {k: _rollout_stats(run_policy(srv, r.episodes, simic))
                                for k, r in sets.items()}  # fmt: skip
            return out

        return fn

    def fixed_job(name: str) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            pol = (HeuristicPolicy() if name == "heuristic"
                   else BehaviourPolicy(simic.behaviour_epsilon))  # fmt: skip
            return {"eval": {k: _rollout_stats(run_policy(pol, r.episodes, simic))
                             for k, r in sets.items()}}  # fmt: skip

        return fn

    jobs = [(f"{a}-s{s}", train_job(a, s)) for s in range(cfg.train_seeds) for a in cfg.algos]
    jobs += [(n, fixed_job(n)) for n in ("heuristic", "behaviour")]
    _log(f"training {len(jobs) - 2} runs + 2 reference evaluations on {cfg.workers} workers")
    results = _run_jobs(jobs, cfg.workers, out / "jobs")

    report: dict[str, Any] = {"evaluation": {}, "config": {"train": asdict(cfg),
                                                           "simic": asdict(simic)}}  # fmt: skip
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
        add("oracle", [_rollout_stats(r.oracle_run) if r.oracle_run is not None
                       else {"returns": r.oracle.tolist(), **zero}])  # fmt: skip
        report["evaluation"][set_name] = {"episodes": len(r.episodes), "normalized_score": scores,
                                          "stats": stats}  # fmt: skip

    # Which step each run's checkpoint comes from (best validation score, train sizes).
    report["selection"] = {f"{a}-s{s}": {k: results[f"{a}-s{s}"][k] for k in
                                         ("selected_step", "validation_score")}
                           for s in range(cfg.train_seeds) for a in cfg.algos}  # fmt: skip
    best_algo = "iql" if "iql" in cfg.algos else cfg.algos[0]
    default_ckpt = Path(results[f"{best_algo}-s0"]["checkpoint"])
    report["fqe"] = _fqe(cfg, simic, default_ckpt, fqe_path, progress)
    report["data"] = {"train": {"path": str(data_path), "transitions": len(data),
                                "fingerprint": fingerprint},
                      "fqe": {"path": str(fqe_path)}}  # fmt: skip
    report["targets"] = _targets(report, best_algo)
    report["default_policy"] = {"algo": best_algo, "seed": 0, "source": str(default_ckpt),
                                "serving_rules": serving_rules(cfg)}  # fmt: skip
    report["elapsed_s"] = time.monotonic() - t_start
    report = _clean(report)
    metrics = [runs_dir / n / "metrics.jsonl" for n in names]  # not other configs' runs
    write_json(report, out / "report.json")
    plot_report(report, metrics, out / "report.png")
    _log(f"report: {out / 'report.json'} and {out / 'report.png'}")
    if checkpoint_dir is not None:
        ship = publish_default(default_ckpt, checkpoint_dir, report, out / "report.png")
        _log(f"default checkpoint: {ship} (report beside it: {checkpoint_dir / 'report.json'})")
    return report


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


def _fqe(cfg: TrainConfig, simic: SimicConfig, ckpt: Path, fqe_path: Path,
         progress: bool) -> dict[str, Any]:  # fmt: skip
    model = load_checkpoint(ckpt).model
    ds: OfflineDataset = load_dataset([fqe_path], cfg.gamma, progress=progress)
    est = fit_q(model, ds, cfg, steps=cfg.fqe_steps, progress=progress)
    eps = episodes_for(range(SEED_BASE["fqe"], SEED_BASE["fqe"] + cfg.heldout_data_episodes),
                       simic.train_sizes, simic)  # fmt: skip
    # The logged horizon truncates (the critic bootstraps past it), so FQE estimates the
    # discounted value of the endless episode: the ground truth plays the same episodes
    # on until gamma^t < 1e-4 (88 steps at 0.9), not only to the logged horizon.
    endless = replace(simic, horizon=max(simic.horizon, fqe_horizon(cfg.gamma)))
    true = run_policy(NetworkPolicy(model, "iql"), eps, endless, gamma=cfg.gamma).discounted
    beh = run_policy(BehaviourPolicy(simic.behaviour_epsilon), eps, endless,
                     gamma=cfg.gamma).discounted  # fmt: skip
    shift = cfg.reward_offset * sum(cfg.gamma**t for t in range(endless.horizon))
    figures = fqe_figures(est.estimate_shifted, float(true.mean()), float(beh.mean()), shift)
    return {"transitions": len(ds), "episodes": cfg.heldout_data_episodes, **figures}


def serving_rules(cfg: TrainConfig) -> dict[str, float]:
    """The decision-rule values the published policy is served with, declared in its
    checkpoint's manifest (``tamiyo.config.POLICY_RULES``); its "served" score is
    measured with exactly these."""
    return {"health_threshold": cfg.served_health_threshold}


def served_rules(cfg: TrainConfig) -> RuleConfig:
    """The server's rules with ``serving_rules`` applied, as an unconfigured server runs
    the published checkpoint."""
    return rules_for_policy(RuleConfig(), serving_rules(cfg), ())


def fqe_horizon(gamma: float, tail: float = 1e-4) -> int:
    """Decision steps after which the discounted tail weighs less than ``tail``: the
    rollout length of FQE's ground truth for an endless (truncated, not ended) episode."""
    return math.ceil(math.log(tail) / math.log(gamma)) if 0 < gamma < 1 else 1


def _rel(err: float, scale: float) -> float:
    return err / abs(scale) if scale != 0 else math.inf


def fqe_figures(est_shifted: float, true_raw: float, behaviour_raw: float,
                shift: float) -> dict[str, Any]:  # fmt: skip
    """FQE's estimate of J(π) against the truth, on scales an estimate can fail on.

    ``shift`` = reward_offset · Σγ^t is exactly known, so raw = shifted − shift and the
    absolute error is the same on both scales. Relative to the raw return (~98% that
    constant) the error says nothing: an untrained or constant FQE came within 3%. It is
    therefore divided by the decision-dependent part instead: the shifted return, and the
    gain of π over the behaviour policy that logged the data, J(π) − J(β) on the same
    episodes (an FQE that only learned the data's own value errs by 100% of it)."""
    true_shifted = true_raw + shift
    err = est_shifted - true_shifted
    gain = true_raw - behaviour_raw
    return {
        "estimate_shifted": est_shifted,
        "true_shifted": true_shifted,
        "error": err,
        "relative_error_shifted": _rel(err, true_shifted),
        "behaviour_raw": behaviour_raw,
        "gain_over_behaviour_true": gain,
        "gain_over_behaviour_estimate": est_shifted - shift - behaviour_raw,
        "error_vs_gain_over_behaviour": _rel(err, gain),
        "estimate_raw": est_shifted - shift,
        "true_raw": true_raw,
        "relative_error_raw_info_only": _rel(err, true_raw),
        "note": "discounted return (gamma) from the first state of the held-out behaviour "
        "episodes; 'shifted' = rewards + reward_offset; 'raw' adds the constant "
        "reward_offset·Σγ^t back exactly, so the raw relative error is ~98% constant and "
        "is reported for information only, not as a target; 'gain_over_behaviour' = "
        "J(π) − J(behaviour) on the same episodes",
    }


def _targets(report: dict[str, Any], algo: str) -> dict[str, Any]:
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


def fqe_targets(f: dict[str, Any]) -> dict[str, bool]:
    """FQE targets, both on decision-dependent scales (see ``fqe_figures``); a missing
    (non-finite, cleaned to None) figure fails."""

    def within(x: float | None) -> bool:
        return x is not None and math.isfinite(x) and abs(x) <= 0.1

    return {
        "fqe_within_10pct_shifted": within(f["relative_error_shifted"]),
        "fqe_within_10pct_of_gain_over_behaviour": within(f["error_vs_gain_over_behaviour"]),
    }


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
