"""IQL (default), BC and CQL learners over the shared ``TamiyoPolicy``.

Why the same module everywhere: the actor is exactly the network the server runs (its
per-graph log-softmax over (node × kernel) ∪ {no-op} is the policy), and the critic is a
second ``TamiyoPolicy`` whose pair/no-op outputs are read as Q-values and whose value
head is V. CQL's greedy policy *is* its critic (softmax of Q), so CQL checkpoints that.

* BC:  −log π(a|s); the value head regresses the Monte-Carlo return of the behaviour.
* IQL: V ← τ-expectile of Q_target(s,a) − V(s); Q ← r + γ V(s'); π ← AWR with
  weights min(exp(β (Q_target − V)), w_max); the actor's value head regresses V.
* CQL: Q ← r + γ max_a' Q_target(s',a') plus α (logsumexp_a Q(s,a) − Q(s,a_data)).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tamiyo.config import TrainConfig
from tamiyo.policy.batch import Batch
from tamiyo.policy.model import PolicyConfig, PolicyForward, TamiyoPolicy
from trainer import losses

ALGOS = ("iql", "bc", "cql")

# The version of the update rule, part of a run's identity (``state.run_identity``): a
# state saved under another rule is refused on resume, since continuing it would mix two
# rules in one run under one config. 2 (session 16): the actors' policy and value-head
# losses are clipped each by its own gradient norm (``Learner._step``); 1 (states saved
# before, which do not record it): one clip over their sum.
UPDATE_RULE = 2


@dataclass
class Minibatch:
    """B transitions on the training device. ``both`` collates [s_1..s_B, s'_1..s'_B]
    (None for BC); ``states`` collates s_1..s_B; the rest are float32/int64 [B]
    (``propensity`` = μ(a_data|s) logged by the behaviour policy)."""

    states: Batch
    both: Batch | None
    node: torch.Tensor
    kernel: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    mc_return: torch.Tensor
    propensity: torch.Tensor


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _average_over_ranks(grads: list[torch.Tensor]) -> None:
    """Replace ``grads`` (one per parameter) in place by their mean over the DDP ranks:
    one all-reduce of the flattened gradient (what DDP does, bucketed, in backward)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _unwrap(m: nn.Module) -> TamiyoPolicy:
    inner = getattr(m, "module", m)
    assert isinstance(inner, TamiyoPolicy)
    return inner


class Learner:
    """Owns the networks and optimizers of one algorithm; ``update`` is one step."""

    def __init__(
        self,
        cfg: TrainConfig,
        policy_config: PolicyConfig,
        device: torch.device,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if cfg.algo not in ALGOS:
            raise ValueError(f"algo: {cfg.algo!r} is not one of {ALGOS}")
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)
        self.modules: dict[str, nn.Module] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        if cfg.algo in ("iql", "bc"):
            self.modules["actor"] = TamiyoPolicy(policy_config).to(device)
        if cfg.algo in ("iql", "cql"):
            self.modules["critic"] = TamiyoPolicy(policy_config).to(device)
            self.target = copy.deepcopy(_unwrap(self.modules["critic"]))
            for p in self.target.parameters():
                p.requires_grad_(False)
        for name, m in list(self.modules.items()):
            self.optims[name] = torch.optim.Adam(
                m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
            if wrap is not None:
                self.modules[name] = wrap(m)

    @property
    def policy(self) -> TamiyoPolicy:
        """The network to checkpoint and serve."""
        return _unwrap(self.modules["critic" if self.cfg.algo == "cql" else "actor"])

    def named_state(self) -> dict[str, nn.Module]:
        """Every module whose weights a resume needs (target included)."""
        out: dict[str, nn.Module] = {k: _unwrap(v) for k, v in self.modules.items()}
        if hasattr(self, "target"):
            out["target"] = self.target
        return out

    def _step(self, name: str, **terms: torch.Tensor) -> dict[str, float]:
        """One optimiser step of ``name`` on the sum of ``terms``, each term's gradient
        clipped to norm ``grad_clip`` on its own; returns every term's gradient norm
        before clipping (``grad_norm_<term>``).

        Why per term: the actor's policy loss and its value head's loss share the
        network, and one clip over their sum let either one's gradient decide how much
        of the other's was kept. An AWR batch with weights up to 1e5 scaled the value
        head's gradient down ~28× in ~1% of IQL steps (session 13), and BC's value head,
        which starts ~10 from its Monte-Carlo target, scaled the cloning gradient down
        early in training. Now a term's clip factor depends on its own gradient only.

        One term (the critics): ``loss.backward()`` and ``clip_grad_norm_``, as always
        (DDP averages the gradient). Several (the actors): one forward, each term's
        gradient by ``torch.autograd.grad``; under DDP the forward ran in ``no_sync``
        (``_forward``) and each term's gradient is averaged over the ranks here, one
        all-reduce per term, before its norm is taken, so every rank clips by the same
        factors and the replicas stay identical."""
        module, opt, clip = self.modules[name], self.optims[name], self.cfg.grad_clip
        opt.zero_grad(set_to_none=True)
        if len(terms) == 1:
            ((key, loss),) = terms.items()
            loss.backward()  # type: ignore[no-untyped-call]
            norm = nn.utils.clip_grad_norm_(module.parameters(), clip)
            opt.step()
            return {f"grad_norm_{key}": _f(norm)}
        params = list(module.parameters())
        total: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        norms: dict[str, float] = {}
        for i, (key, loss) in enumerate(terms.items()):
            got = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(terms),
                                      allow_unused=True)  # fmt: skip
            pairs = zip(got, params, strict=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in pairs]
            if isinstance(module, DistributedDataParallel):
                _average_over_ranks(grads)
            norm = nn.utils.get_total_norm(grads)
            factor = torch.clamp(clip / (norm + 1e-6), max=1.0)  # = clip_grad_norm_'s
            for t, g in zip(total, grads, strict=True):
                t.add_(g, alpha=float(factor))
            norms[f"grad_norm_{key}"] = _f(norm)
        for p, t in zip(params, total, strict=True):
            p.grad = t
        opt.step()
        return norms

    def _forward(self, name: str, batch: Batch) -> PolicyForward:
        """``modules[name](batch)``; a DDP module runs it in ``no_sync``: its gradients
        come from ``_step``'s per-term path, which averages them itself."""
        m = self.modules[name]
        ctx = m.no_sync() if isinstance(m, DistributedDataParallel) else nullcontext()
        with ctx:
            out: PolicyForward = m(batch)
        return out

    def _polyak(self) -> None:
        tau = self.cfg.target_tau
        with torch.no_grad():
            src = _unwrap(self.modules["critic"]).parameters()
            for tp, p in zip(self.target.parameters(), src, strict=True):
                tp.lerp_(p, tau)

    def update(self, mb: Minibatch) -> dict[str, float]:
        """One gradient step; returns scalar metrics (losses, mean Q/V/advantage)."""
        if self.cfg.algo == "bc":
            return self._bc(mb)
        if self.cfg.algo == "iql":
            return self._iql(mb)
        return self._cql(mb)

    def _actor_logp(self, mb: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        s = mb.states
        out = self._forward("actor", s)
        logp = losses.action_log_prob(
            out.pair_logits, out.noop_logit, s.node_batch, s.ptr, mb.node, mb.kernel
        )
        return logp, out.value

    def _bc(self, mb: Minibatch) -> dict[str, float]:
        logp, value = self._actor_logp(mb)
        bc = losses.bc_loss(logp)
        v = (value - mb.mc_return).pow(2).mean()
        norms = self._step("actor", pi=bc, value=self.cfg.value_weight * v)
        return {"bc_loss": _f(bc), "value_loss": _f(v), **norms}

    def _critic_q(self, net: nn.Module, mb: Minibatch) -> tuple[torch.Tensor, PolicyForward]:
        """Q(s, a_data) [B] and the raw outputs on ``both``."""
        assert mb.both is not None
        out: PolicyForward = net(mb.both)
        q_a = losses.taken(out.pair_logits, out.noop_logit, mb.both.ptr, mb.node, mb.kernel)
        return q_a, out

    def _iql(self, mb: Minibatch) -> dict[str, float]:
        cfg, b = self.cfg, mb.node.shape[0]
        q_a, out = self._critic_q(self.modules["critic"], mb)
        v, v_next = out.value[:b], out.value[b:]
        with torch.no_grad():  # the target is only needed at (s, a): B graphs, not 2B
            t_out: PolicyForward = self.target(mb.states)
            qt_a = losses.taken(t_out.pair_logits, t_out.noop_logit, mb.states.ptr, mb.node,
                                mb.kernel)  # fmt: skip
        v_loss = losses.expectile_loss(qt_a - v, cfg.iql_expectile)
        q_loss = losses.td_loss(q_a, mb.reward, mb.done, v_next, cfg.gamma)
        critic_norm = self._step("critic", critic=q_loss + v_loss)
        self._polyak()
        adv = (qt_a - v).detach()
        logp, actor_v = self._actor_logp(mb)
        pi_loss = losses.awr_loss(logp, adv, cfg.iql_beta, cfg.iql_max_weight, mb.propensity,
                                  cfg.iql_prior_power)  # fmt: skip
        av_loss = (actor_v - v.detach()).pow(2).mean()
        actor_norms = self._step("actor", pi=pi_loss, value=cfg.value_weight * av_loss)
        return {
            "q_loss": _f(q_loss),
            "v_loss": _f(v_loss),
            "pi_loss": _f(pi_loss),
            "value_loss": _f(av_loss),
            "q_mean": _f(q_a.mean()),
            "adv_mean": _f(adv.mean()),
            "logp_data": _f(logp.mean()),
            **critic_norm,
            **actor_norms,
        }

    def _cql(self, mb: Minibatch) -> dict[str, float]:
        cfg, b = self.cfg, mb.node.shape[0]
        assert mb.both is not None
        q_a, out = self._critic_q(self.modules["critic"], mb)
        nb = mb.both.node_batch
        lse = losses.graph_logsumexp(out.pair_logits, out.noop_logit, nb)[:b]
        with torch.no_grad():
            t_out: PolicyForward = self.target(mb.both)
            next_max = losses.graph_max(t_out.pair_logits, t_out.noop_logit, nb)[b:]
        td = losses.td_loss(q_a, mb.reward, mb.done, next_max, cfg.gamma)
        pen = losses.cql_penalty(lse, q_a)
        # The value head tracks V(s) = max_a Q(s, a) so served value estimates make sense.
        v_loss = (out.value[:b] - losses.graph_max(out.pair_logits, out.noop_logit, nb)[:b]
                  .detach()).pow(2).mean()  # fmt: skip
        norm = self._step("critic", critic=td + cfg.cql_alpha * pen + cfg.value_weight * v_loss)
        self._polyak()
        return {"td_loss": _f(td), "cql_penalty": _f(pen), "q_mean": _f(q_a.mean()), **norm}
