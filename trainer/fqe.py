"""Fitted-Q evaluation (FQE): estimate a policy's return from logged data alone.

Why: an offline learner should be judged without a simulator too. FQE fits Q^π on
held-out logged transitions (target r + γ (1 − done) Q_target(s', π(s'))) and estimates
J = mean over the episodes' first states of Q(s_0, π(s_0)); the pipeline compares that
with the discounted return π really gets in Simic from the same episodes.

Rewards are shifted by ``reward_offset`` as in training; the estimate is reported on both
the shifted scale (what the critic learns; the part that depends on decisions) and the
raw scale (shift undone exactly: Σ_{t<T} γ^t · offset).

One critic's estimate depends on its seed (initialisation and minibatch order) by more
than the target allows (README, "FQE ensemble and its uncertainty"), so each critic
averages its estimate over the last quarter of its steps, and the pipeline averages an
ensemble
(``fit_q_ensemble``): K independent runs of ``fit_q`` with seeds derived from the run
seed (``member_seeds``), on the same data and the same policy actions. As many again,
each on its own bootstrap resample of the episodes, give the data's sampling noise for
the interval (``fqe_check.spread``).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from tamiyo.config import TrainConfig
from tamiyo.policy.batch import Batch, collate
from tamiyo.policy.engine import InferenceEngine
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from trainer import losses
from trainer.dataset import OfflineDataset
from trainer.workers import run_jobs

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# Member k of the ensemble of run seed s is seeded s + SEED_OFFSET + k · MEMBER_STRIDE.
# Member 0 is the seed the single critic always used, so an ensemble of one reproduces
# earlier reports exactly; the stride (a prime) keeps the members of run seeds
# 0 … 104,728 apart, so the ensembles of different run seeds share no critic.
SEED_OFFSET = 7919
MEMBER_STRIDE = 104_729


def member_seeds(seed: int, members: int) -> list[int]:
    """The FQE critics' seeds of an ensemble of ``members`` for run seed ``seed``."""
    if members < 1:
        raise ValueError(f"an FQE ensemble needs at least one member, not {members}")
    return [seed + SEED_OFFSET + k * MEMBER_STRIDE for k in range(members)]


# The estimate of one critic averages J over the last quarter of its steps, every 10
# steps (``fit_q``); episodes are resampled from the stream [seed, 1] (``episode_resample``).
TAIL_FRACTION = 0.25
TAIL_EVERY = 10
RESAMPLE_STREAM = 1


@dataclass
class FqeResult:
    estimate_shifted: float  # J: mean Q(s0, π(s0)), shifted scale, averaged over the tail
    steps: int
    final_td_loss: float
    seed: int = SEED_OFFSET  # the critic's torch / numpy seed
    estimate_last: float = math.nan  # J of the last iterate alone (the estimate until session 16)
    tail_evaluations: int = 1  # evaluations of J averaged into ``estimate_shifted``
    resampled: bool = False  # fitted on a bootstrap resample of the episodes


@dataclass
class FqeEnsemble:
    """K critics fitted alone on all the data (``fit_q``, seeds ``member_seeds``): their
    mean is the estimate, their spread the seed noise of one critic. ``resampled``: the
    same seeds fitted on bootstrap resamples of the episodes (``fit_q(resample=True)``):
    their spread is the sampling noise of one critic fitted on data like this (plus its
    seed noise), for the interval (``fqe_check.spread``); empty if not fitted."""

    members: list[FqeResult]
    resampled: list[FqeResult] = field(default_factory=list)

    @property
    def estimates(self) -> F64:
        """The all-data members' J estimates (shifted reward scale), in member order."""
        return np.array([m.estimate_shifted for m in self.members], np.float64)

    @property
    def resampled_estimates(self) -> F64:
        """The resampled members' J estimates (shifted reward scale), in member order."""
        return np.array([m.estimate_shifted for m in self.resampled], np.float64)

    @property
    def estimate_shifted(self) -> float:
        """The ensemble's J estimate: the all-data members' mean (shifted reward scale)."""
        return float(self.estimates.mean())


def greedy_actions(model: TamiyoPolicy, ds: OfflineDataset, chunk: int = 256) -> tuple[I64, I64]:
    """π's greedy (node, kernel) for every graph of ``ds`` (node −1 = no-op)."""
    engine = InferenceEngine(copy.deepcopy(model), "cpu")
    nodes, kernels = [], []
    for lo in range(0, len(ds.graphs), chunk):
        graphs = ds.graphs[lo : lo + chunk]
        out = engine.forward_batch(collate(graphs))
        ptr = np.cumsum([0] + [g.num_nodes for g in graphs])
        bn, bk = out["best_node"].numpy(), out["best_kernel"].numpy()
        pl, nl = out["pair_logp"].numpy(), out["noop_logp"].numpy()
        for i in range(len(graphs)):
            best = pl[ptr[i] + bn[i], bk[i]] if bn[i] >= 0 else -np.inf
            go = best > nl[i]
            nodes.append(int(bn[i]) if go else -1)
            kernels.append(int(bk[i]) if go else -1)
    return np.asarray(nodes, np.int64), np.asarray(kernels, np.int64)


def episode_resample(ds: OfflineDataset, seed: int) -> tuple[I64, I64]:
    """A bootstrap resample of ``ds``'s episodes (sessions drawn with replacement, as many
    as there are, from ``seed``): (its transitions, an episode drawn twice listed twice;
    the first transition of each drawn episode, in draw order). One FQE member's data."""
    first = ds.initial_indices()
    bounds = np.append(first, len(ds))
    draw = np.random.default_rng([seed, RESAMPLE_STREAM]).integers(0, len(first), len(first))
    pool: I64 = np.concatenate([np.arange(bounds[e], bounds[e + 1]) for e in draw])
    starts: I64 = first[draw]
    return pool, starts


def fit_q(
    model: TamiyoPolicy,
    ds: OfflineDataset,
    cfg: TrainConfig,
    *,
    steps: int = 1500,
    progress: bool = True,
    tau: float | None = None,
    seed: int | None = None,
    actions: tuple[I64, I64] | None = None,
    resample: bool = False,
) -> FqeResult:
    """Fit Q^π for ``model``'s greedy policy on ``ds`` and return its J estimate.

    The estimate is J = mean over the episodes' first states of Q(s0, π(s0)), averaged
    over the last ``TAIL_FRACTION`` of the steps (every ``TAIL_EVERY`` steps, the last
    step included). Why not the last iterate alone: with a constant learning rate the
    critic's J moves by ~17% of the shifted value (std) from one evaluation to the next
    within a run, which was most of one critic's "seed noise" (18% across seeds);
    averaged over the last 500 of 2000 steps the spread across seeds was 9.5% (12
    critics; trainer/README, "FQE ensemble and its uncertainty"). ``estimate_last``
    keeps the last iterate's J for comparison.

    ``resample``: the bootstrap of the whole estimate: fit on a resample of the episodes
    (``episode_resample``, drawn from ``seed``) and take J on the first states of the
    episodes drawn (an episode drawn twice counts twice), so that critics fitted so
    spread by the data's sampling noise too (``fit_q_ensemble``'s resampled critics).

    ``tau``: Polyak rate of the target network (default ``cfg.target_tau``). Values
    propagate one bootstrap per ~1/tau steps and need several times 1/(1−γ) bootstraps,
    so ``steps`` × ``tau`` must be large enough. ``seed`` seeds the critic's
    initialisation and minibatches (default ``cfg.seed`` + ``SEED_OFFSET``, as always);
    ``actions``: π's greedy actions on ``ds`` if already computed (``greedy_actions``).
    The critic is run on the states s of a minibatch and the target on the s' only
    (each half alone: they were once run on both, twice the work for the same values).
    """
    tau = cfg.target_tau if tau is None else tau
    seed = member_seeds(cfg.seed, 1)[0] if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pi_node, pi_kernel = greedy_actions(model, ds) if actions is None else actions
    pool, start = episode_resample(ds, seed) if resample else (None, ds.initial_indices())
    q = TamiyoPolicy(PolicyConfig())
    target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    reward = torch.from_numpy(ds.reward + np.float32(cfg.reward_offset))
    done = torch.from_numpy(ds.done)
    node, kernel = torch.from_numpy(ds.node), torch.from_numpy(ds.kernel)
    s0_idx = ds.state[start]
    s0 = collate([ds.graphs[i] for i in s0_idx.tolist()])
    a0 = torch.from_numpy(pi_node[s0_idx]), torch.from_numpy(pi_kernel[s0_idx])
    tail = max(1, round(steps * TAIL_FRACTION))
    loss_v = float("nan")
    js: list[float] = []
    for step in tqdm(range(1, steps + 1), desc="fqe", unit="step", disable=not progress,
                     leave=False):  # fmt: skip
        idx = ds.sample(rng, cfg.batch_size) if pool is None else pool[
            rng.integers(0, len(pool), cfg.batch_size)]  # fmt: skip
        s_idx, ns_idx = ds.state[idx], ds.next_state[idx]
        sb = collate([ds.graphs[i] for i in s_idx.tolist()])
        nb = collate([ds.graphs[i] for i in ns_idx.tolist()])
        with torch.no_grad():
            t_out = target(nb)
            q_next = losses.taken(t_out.pair_logits, t_out.noop_logit, nb.ptr,
                                  torch.from_numpy(pi_node[ns_idx]),
                                  torch.from_numpy(pi_kernel[ns_idx]))  # fmt: skip
        out = q(sb)
        t_idx = torch.from_numpy(idx)
        q_a = losses.taken(out.pair_logits, out.noop_logit, sb.ptr, node[t_idx], kernel[t_idx])
        loss = losses.td_loss(q_a, reward[t_idx], done[t_idx], q_next, cfg.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(q.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for tp, p in zip(target.parameters(), q.parameters(), strict=True):
                tp.lerp_(p, tau)
        loss_v = float(loss.detach())
        if steps - step < tail and (steps - step) % TAIL_EVERY == 0:
            js.append(_start_value(q, s0, a0))
    return FqeResult(float(np.mean(js)), steps, loss_v, seed, js[-1], len(js), resample)


def _start_value(q: TamiyoPolicy, s0: Batch, a0: tuple[torch.Tensor, torch.Tensor]) -> float:
    """mean Q(s0, π(s0)) over the episodes' first states ``s0`` (π's actions ``a0``)."""
    with torch.no_grad():
        out = q(s0)
        return float(losses.taken(out.pair_logits, out.noop_logit, s0.ptr, *a0).mean())


def fit_q_ensemble(
    model: TamiyoPolicy,
    ds: OfflineDataset,
    cfg: TrainConfig,
    *,
    members: int,
    steps: int = 1500,
    progress: bool = True,
    workers: int = 1,
    resampled: bool = True,
) -> FqeEnsemble:
    """``members`` runs of ``fit_q`` on all of ``ds`` with the seeds
    ``member_seeds(cfg.seed, members)``, each exactly as it would run alone (their mean
    is the estimate), and with ``resampled`` as many again, the same seeds each on its
    own bootstrap resample of the episodes (for the interval).

    Why not one critic: its estimate moves with its seed by more than the error target
    (README). Why resampled critics beside them: the all-data critics share the data, so
    their spread shows only the seed noise, and an interval built from it missed the
    truth on 2 of 6 held-out sets by the data's own error (+12.7%, −11.4%; README "FQE
    ensemble and its uncertainty"); the bootstrap over episodes puts the data's
    sampling noise into the interval (bootstrapped FQE, Hao et al., ICML 2021). Why they
    do not make the estimate: a critic fitted on ~63% of the episodes, some twice, is a
    worse critic (their spread was 20-37% of the shifted value against 6.5-14% on all
    the data; their mean erred by rms 18% where the all-data mean did by 7.5%). Why not
    one critic trained longer or with a vectorised K-head: independent runs are what the
    spread must measure, and they are the same code as the single critic. With
    ``workers`` > 1 the critics run in that many forked processes (``trainer.workers``;
    ``cfg.num_threads`` torch threads each), which changes nothing in the figures: each
    critic seeds itself. Progress bars only in-process."""
    seeds = member_seeds(cfg.seed, members)
    actions = greedy_actions(model, ds)  # deterministic: the same for every member
    jobs = [(seed, False) for seed in seeds]
    if resampled:
        jobs += [(seed, True) for seed in seeds]

    def member(seed: int, resample: bool, show: bool) -> FqeResult:
        return fit_q(model, ds, cfg, steps=steps, progress=show, seed=seed, actions=actions,
                     resample=resample)  # fmt: skip

    def forked(seed: int, resample: bool) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            if cfg.num_threads > 0:  # as a training worker: no OpenMP threads spinning
                torch.set_num_threads(cfg.num_threads)
            return asdict(member(seed, resample, False))

        return fn

    lanes = min(workers, len(jobs))
    if lanes <= 1:
        fits = [member(s, r, progress) for s, r in jobs]
    else:
        with tempfile.TemporaryDirectory(prefix="tamiyo-fqe-") as tmp:
            out = run_jobs([(f"fqe-{k}", forked(s, r)) for k, (s, r) in enumerate(jobs)],
                           lanes, Path(tmp))  # fmt: skip
        fits = [FqeResult(**out[f"fqe-{k}"]) for k in range(len(jobs))]
    return FqeEnsemble(fits[:members], fits[members:])
