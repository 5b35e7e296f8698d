"""The training loop: sampling, updates, metrics, periodic evaluation, checkpoints, resume.

Why this shape: one loop serves a laptop run, ``make train`` and ``torchrun`` (DDP):
with ``WORLD_SIZE`` > 1 every process samples its own minibatches, gradients are
averaged by DDP (an actor's policy and value-head terms each by one all-reduce of its
own, ``algos.Learner._step``, since they are clipped apart), and only rank 0 evaluates
and writes (metrics JSON lines, resumable
state, checkpoints through the shared writer so a running server hot-reloads them).

Why the minibatch RNG is keyed by (seed, rank, step) instead of carried along: a resumed
run must draw exactly the batches the uninterrupted run would have drawn, on *every*
rank, and only rank 0 writes the state. A generator derived from the step needs no saved
state at all, so no rank can come back with a fresh one (session 4; before, rank > 0
restarted its draws from step 0 after a resume).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tamiyo.config import SimicConfig, TrainConfig
from tamiyo.policy.batch import collate
from tamiyo.policy.checkpoint import (
    load_checkpoint,
    prune_versions,
    read_manifest,
    resolve_latest,
    save_checkpoint,
)
from tamiyo.policy.engine import resolve_device
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from trainer.algos import Learner, Minibatch
from trainer.dataset import OfflineDataset
from trainer.evaluate import Reference, evaluate_network
from trainer.publish import serving_rules
from trainer.state import data_fingerprint, load_state, run_identity, save_state

LOG_EVERY = 25  # steps averaged into one metrics line


@dataclass
class TrainResult:
    """``policy`` is the network that was checkpointed: the weights with the best
    validation score when ``TrainConfig.keep_best`` (from step ``selected_step``),
    else the final ones. ``learner`` holds the final weights (what a resume continues)."""

    run_dir: Path
    checkpoint: Path | None  # None on ranks > 0
    steps: int
    start_step: int
    last_eval_score: float | None
    learner: Learner
    policy: TamiyoPolicy
    selected_step: int
    selected_score: float | None


def make_minibatch(
    ds: OfflineDataset,
    idx: np.ndarray,
    device: torch.device,
    with_next: bool,
    reward_offset: float = 0.0,
) -> Minibatch:
    """Collate transitions ``idx`` (int64 [B]) into device tensors; rewards shifted by
    ``reward_offset`` (Monte-Carlo returns are left on the raw scale)."""
    states = [ds.graphs[i] for i in ds.state[idx].tolist()]
    both = None
    if with_next:
        both = collate(states + [ds.graphs[i] for i in ds.next_state[idx].tolist()]).to(device)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Minibatch(
        states=collate(states).to(device),
        both=both,
        node=t(ds.node[idx]),
        kernel=t(ds.kernel[idx]),
        reward=t(ds.reward[idx] + np.float32(reward_offset)),
        done=t(ds.done[idx]),
        mc_return=t(ds.mc_return[idx]),
        propensity=t(ds.propensity[idx]),
    )


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator that draws ``rank``'s minibatch of gradient step ``step`` (0-based):
    a pure function of its key, so a resume needs no saved sampler state."""
    return np.random.default_rng([seed, rank, step])


def _keep_metrics_upto(path: Path, step: int) -> float | None:
    """Rewrite ``path`` keeping the records with ``step`` <= ``step`` (a resume re-logs
    everything after the saved state; unreadable lines, e.g. cut by a kill, are dropped).
    Returns the validation score recorded at ``step``, if any."""
    if not path.exists():
        return None
    kept, score = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec["step"] <= step:
            kept.append(line)
            if rec["step"] == step and rec.get("kind") == "eval":
                score = rec.get("eval_score")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return None if score is None else float(score)


def _dist_setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _ddp(device: torch.device, module: nn.Module) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def train(
    cfg: TrainConfig,
    data: OfflineDataset,
    run_dir: Path,
    *,
    simic: SimicConfig,
    validation: Reference | None = None,
    resume: bool = False,
    progress: bool = True,
    policy_config: PolicyConfig | None = None,
    provenance: dict[str, Any] | None = None,
    fingerprint: str | None = None,
) -> TrainResult:
    """Train ``cfg.algo`` on ``data`` for ``cfg.steps`` steps; write metrics, state and a
    final checkpoint under ``run_dir``.

    With ``resume`` a saved state continues only if it belongs to this run (same
    TrainConfig outside ``state.RESUME_IGNORED``, data, validation set, world size and
    network; else ``StateMismatchError`` names the differences), and metrics.jsonl keeps
    the records up to the resumed step. Without it (or with no saved state) the run
    starts clean: a previous run's state and best checkpoint in ``run_dir`` are removed
    first, so nothing of it can be picked up later. ``fingerprint`` is
    ``state.data_fingerprint(data)``, computed here when not given."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    rank, world, device = _dist_setup(cfg)
    lead = rank == 0
    wrap = partial(_ddp, device) if world > 1 else None
    pcfg = policy_config or PolicyConfig()
    learner = Learner(cfg, pcfg, device, wrap=wrap)
    identity = run_identity(
        data=fingerprint if fingerprint is not None else data_fingerprint(data),
        validation=validation.fingerprint() if validation is not None else None,
        world_size=world,
        policy_config=asdict(pcfg),
    )
    state_dir = run_dir / "state"
    best_dir = run_dir / "best"
    start = 0
    if resume:
        meta = load_state(state_dir, learner, identity)
        if meta is not None:
            start = int(meta["step"])
            if start > cfg.steps:
                raise ValueError(f"{state_dir}: the saved state is at step {start}, beyond "
                                 f"steps={cfg.steps}; resume with steps >= {start}")  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    last_eval: float | None = None
    if lead and start:
        last_eval = _keep_metrics_upto(metrics_path, start)
    elif lead:  # a fresh run: nothing of an earlier run in run_dir may be resumed later
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(best_dir, ignore_errors=True)
    log = open(metrics_path, "a" if start else "w", encoding="utf-8") if lead else None  # noqa: SIM115
    with_next = cfg.algo != "bc"
    acc: dict[str, list[float]] = defaultdict(list)
    t0 = time.monotonic()
    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.algo} s{cfg.seed}", unit="step",
               disable=not (progress and lead), initial=start, total=cfg.steps)  # fmt: skip

    def write(rec: dict[str, Any]) -> None:
        if log is not None:
            clean = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                     for k, v in rec.items()}  # fmt: skip
            log.write(json.dumps(clean, allow_nan=False) + "\n")
            log.flush()

    best = _best_so_far(best_dir) if start and cfg.keep_best else None

    def evaluate(step: int) -> None:
        nonlocal last_eval, best
        if validation is None or not lead:
            return
        res = evaluate_network(learner.policy, cfg.algo, validation, simic)
        last_eval = validation.score(res.returns)
        write({"step": step, "kind": "eval", "algo": cfg.algo, "seed": cfg.seed,
               "eval_score": last_eval, "agreement": res.oracle_layer_agreement,
               "time_s": time.monotonic() - t0})  # fmt: skip
        if cfg.keep_best and (best is None or last_eval > best[1]):
            path = save_checkpoint(best_dir, learner.policy, metrics={
                "steps": step, "algo": cfg.algo, "validation_score": last_eval})  # fmt: skip
            prune_versions(best_dir, keep=1)
            best = (step, last_eval, path)

    try:
        for step in bar:
            idx = data.sample(batch_rng(cfg.seed, rank, step), cfg.batch_size)
            for k, v in learner.update(
                make_minibatch(data, idx, device, with_next, cfg.reward_offset)
            ).items():
                acc[k].append(v)
            done_steps = step + 1
            if done_steps % LOG_EVERY == 0 or done_steps == cfg.steps:
                rec = {k: float(np.mean(v)) for k, v in acc.items()}
                acc.clear()
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(rec.items())[:3]})
                write({"step": done_steps, "kind": "train", "algo": cfg.algo, "seed": cfg.seed,
                       "time_s": time.monotonic() - t0, **rec})  # fmt: skip
            if cfg.eval_every and done_steps % cfg.eval_every == 0 and done_steps < cfg.steps:
                evaluate(done_steps)
            if cfg.checkpoint_every and done_steps % cfg.checkpoint_every == 0 and lead:
                save_state(state_dir, learner, done_steps, identity)
        final = cfg.steps
        if start < cfg.steps or last_eval is None:
            evaluate(final)
        ckpt = None
        policy, sel_step, sel_score = learner.policy, final, last_eval
        if best is not None and (last_eval is None or best[1] > last_eval):
            policy = load_checkpoint(best[2]).model.to(device)
            sel_step, sel_score = best[0], best[1]
        if lead:
            save_state(state_dir, learner, final, identity)
            ckpt = save_checkpoint(
                run_dir / "checkpoints",
                policy,
                metrics={"steps": final, "algo": cfg.algo, "validation_score": sel_score,
                         "selected_step": sel_step, "final_validation_score": last_eval},
                provenance={"train_config": asdict(cfg), "world_size": world,
                            "data_fingerprint": identity["data"], **(provenance or {})},
                # The rules this policy is meant to be served with (the health veto off
                # by default): without them a replica that hot-reloads the checkpoint
                # falls back to the server's 0.6 veto (~20 points lower in Simic).
                serving_rules=serving_rules(cfg),
            )  # fmt: skip
    finally:
        if log is not None:
            log.close()
        if world > 1 and dist.is_initialized():
            dist.barrier()
    return TrainResult(run_dir, ckpt, cfg.steps, start, last_eval, learner, policy, sel_step,
                       sel_score)  # fmt: skip


def _best_so_far(best_dir: Path) -> tuple[int, float, Path] | None:
    """(step, validation score, checkpoint dir) of the best checkpoint a resumed run kept."""
    path = resolve_latest(best_dir)
    if path is None:
        return None
    m = read_manifest(path).get("metrics", {})
    if m.get("validation_score") is None:
        return None
    return int(m["steps"]), float(m["validation_score"]), path
