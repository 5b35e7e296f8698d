"""Fitted-Q evaluation (FQE): estimate a policy's return from logged data alone.

Why: an offline learner should be judged without a simulator too. FQE fits Q^π on
held-out logged transitions (target r + γ (1 − done) Q_target(s', π(s'))) and estimates
J = mean over the episodes' first states of Q(s_0, π(s_0)); the pipeline compares that
with the discounted return π really gets in Simic from the same episodes.

Rewards are shifted by ``reward_offset`` as in training; the estimate is reported on both
the shifted scale (what the critic learns; the part that depends on decisions) and the
raw scale (shift undone exactly: Σ_{t<T} γ^t · offset).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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

I64 = npt.NDArray[np.int64]


@dataclass
class FqeResult:
    estimate_shifted: float  # mean Q(s0, π(s0)) on the shifted reward scale
    steps: int
    final_td_loss: float


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
) -> FqeResult:
    """Fit Q^π for ``model``'s greedy policy on ``ds`` and return its J estimate.

    ``tau``: Polyak rate of the target network (default ``cfg.target_tau``). Values
    propagate one bootstrap per ~1/tau steps and need several times 1/(1−γ) bootstraps,
    so ``steps`` × ``tau`` must be large enough.
    """
    tau = cfg.target_tau if tau is None else tau
    torch.manual_seed(cfg.seed + 7919)
    rng = np.random.default_rng(cfg.seed + 7919)
    pi_node, pi_kernel = greedy_actions(model, ds)
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
    return FqeResult(float(torch.cat(vals).mean()), steps, loss_v)
