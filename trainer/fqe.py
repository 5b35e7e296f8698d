"""Fitted-Q evaluation (FQE): estimate a policy's return from logged data alone.

Why: an offline learner should be judged without a simulator too. FQE fits Q^π on
held-out logged transitions (target r + γ (1 − done) Q_target(s', π(s'))) and estimates
J = mean over the episodes' first states of Q(s_0, π(s_0)); the pipeline compares that
with the discounted return π really gets in Simic from the same episodes.

Rewards are shifted by ``reward_offset`` as in training; the estimate is reported on both
the shifted scale (what the critic learns; the part that depends on decisions) and the
raw scale (shift undone exactly: Σ_{t<T} γ^t · offset).

One critic's estimate depends on its seed (initialisation and minibatch order) by more
than the target allows (README, "Left open"), so the pipeline averages an ensemble
(``fit_q_ensemble``): K independent runs of ``fit_q`` with seeds derived from the run
seed (``member_seeds``), on the same data and the same policy actions.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from tamiyo.config import TrainConfig
from tamiyo.policy.batch import collate
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


@dataclass
class FqeResult:
    estimate_shifted: float  # mean Q(s0, π(s0)) on the shifted reward scale
    steps: int
    final_td_loss: float
    seed: int = SEED_OFFSET  # the critic's torch / numpy seed


@dataclass
class FqeEnsemble:
    """K critics fitted alone (``fit_q``) with the seeds ``member_seeds`` gives; the
    estimate is their mean, the members' spread is the seed noise of one critic."""

    members: list[FqeResult]

    @property
    def estimates(self) -> F64:
        """The members' J estimates (shifted reward scale), in member order."""
        return np.array([m.estimate_shifted for m in self.members], np.float64)

    @property
    def estimate_shifted(self) -> float:
        """The ensemble's J estimate: the members' mean (shifted reward scale)."""
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
) -> FqeResult:
    """Fit Q^π for ``model``'s greedy policy on ``ds`` and return its J estimate.

    ``tau``: Polyak rate of the target network (default ``cfg.target_tau``). Values
    propagate one bootstrap per ~1/tau steps and need several times 1/(1−γ) bootstraps,
    so ``steps`` × ``tau`` must be large enough. ``seed`` seeds the critic's
    initialisation and minibatches (default ``cfg.seed`` + ``SEED_OFFSET``, as always);
    ``actions``: π's greedy actions on ``ds`` if already computed (``greedy_actions``).
    """
    tau = cfg.target_tau if tau is None else tau
    seed = member_seeds(cfg.seed, 1)[0] if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pi_node, pi_kernel = greedy_actions(model, ds) if actions is None else actions
    q = TamiyoPolicy(PolicyConfig())
    target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    reward = torch.from_numpy(ds.reward + np.float32(cfg.reward_offset))
    done = torch.from_numpy(ds.done)
    loss_v = float("nan")
    for _ in tqdm(range(steps), desc="fqe", unit="step", disable=not progress, leave=False):
        idx = ds.sample(rng, cfg.batch_size)
        s, ns = ds.state[idx], ds.next_state[idx]
        b = len(idx)
        both = collate([ds.graphs[i] for i in s.tolist()] + [ds.graphs[i] for i in ns.tolist()])
        a_node = torch.from_numpy(np.concatenate([ds.node[idx], pi_node[ns]]))
        a_kernel = torch.from_numpy(np.concatenate([ds.kernel[idx], pi_kernel[ns]]))
        with torch.no_grad():
            t_out = target(both)
            q_next = losses.taken(t_out.pair_logits, t_out.noop_logit, both.ptr, a_node,
                                  a_kernel)[b:]  # fmt: skip
        out = q(both)
        q_a = losses.taken(out.pair_logits, out.noop_logit, both.ptr, a_node[:b], a_kernel[:b])
        t_idx = torch.from_numpy(idx)
        loss = losses.td_loss(q_a, reward[t_idx], done[t_idx], q_next, cfg.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(q.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for tp, p in zip(target.parameters(), q.parameters(), strict=True):
                tp.lerp_(p, tau)
        loss_v = float(loss.detach())
    first = ds.initial_indices()
    with torch.no_grad():
        vals = []
        for lo in range(0, len(first), 256):
            sel = ds.state[first[lo : lo + 256]]
            bt = collate([ds.graphs[i] for i in sel.tolist()])
            out = q(bt)
            vals.append(losses.taken(out.pair_logits, out.noop_logit, bt.ptr,
                                     torch.from_numpy(pi_node[sel]),
                                     torch.from_numpy(pi_kernel[sel])))  # fmt: skip
    return FqeResult(float(torch.cat(vals).mean()), steps, loss_v, seed)


def fit_q_ensemble(
    model: TamiyoPolicy,
    ds: OfflineDataset,
    cfg: TrainConfig,
    *,
    members: int,
    steps: int = 1500,
    progress: bool = True,
    workers: int = 1,
) -> FqeEnsemble:
    """``members`` runs of ``fit_q`` on ``ds`` with the seeds ``member_seeds(cfg.seed,
    members)``, each exactly as it would run alone; their mean is the estimate.

    Why not one critic: its estimate moves with its seed by more than the error target
    (README). Why not one critic trained longer or with a vectorised K-head: independent
    runs are what the spread must measure, and they are the same code as the single
    critic. With ``workers`` > 1 the members run in that many forked processes
    (``trainer.workers``; ``cfg.num_threads`` torch threads each), which changes nothing
    in the figures: each member seeds itself. Progress bars only in-process."""
    seeds = member_seeds(cfg.seed, members)
    actions = greedy_actions(model, ds)  # deterministic: the same for every member

    def member(seed: int, show: bool) -> FqeResult:
        return fit_q(model, ds, cfg, steps=steps, progress=show, seed=seed, actions=actions)

    def forked(seed: int) -> Callable[[], dict[str, Any]]:
        def fn() -> dict[str, Any]:
            if cfg.num_threads > 0:  # as a training worker: no OpenMP threads spinning
                torch.set_num_threads(cfg.num_threads)
            return asdict(member(seed, False))

        return fn

    lanes = min(workers, members)
    if lanes <= 1:
        return FqeEnsemble([member(s, progress) for s in seeds])
    with tempfile.TemporaryDirectory(prefix="tamiyo-fqe-") as tmp:
        out = run_jobs([(f"fqe-{k}", forked(s)) for k, s in enumerate(seeds)], lanes,
                       Path(tmp))  # fmt: skip
    return FqeEnsemble([FqeResult(**out[f"fqe-{k}"]) for k in range(members)])
