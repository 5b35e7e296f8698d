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
from dataclasses import dataclass

import torch
from torch import nn

from tamiyo.config import TrainConfig
from tamiyo.policy.batch import Batch
from tamiyo.policy.model import PolicyConfig, PolicyForward, TamiyoPolicy
from trainer import losses

ALGOS = ("iql", "bc", "cql")


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

    def _step(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optims[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(self.modules[name].parameters(), self.cfg.grad_clip)
        opt.step()

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
        out: PolicyForward = self.modules["actor"](s)
        logp = losses.action_log_prob(
            out.pair_logits, out.noop_logit, s.node_batch, s.ptr, mb.node, mb.kernel
        )
        return logp, out.value

    def _bc(self, mb: Minibatch) -> dict[str, float]:
        logp, value = self._actor_logp(mb)
        bc = losses.bc_loss(logp)
        v = (value - mb.mc_return).pow(2).mean()
        self._step("actor", bc + self.cfg.value_weight * v)
        return {"bc_loss": _f(bc), "value_loss": _f(v)}

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
        self._step("critic", q_loss + v_loss)
        self._polyak()
        adv = (qt_a - v).detach()
        logp, actor_v = self._actor_logp(mb)
        pi_loss = losses.awr_loss(logp, adv, cfg.iql_beta, cfg.iql_max_weight, mb.propensity,
                                  cfg.iql_prior_power)  # fmt: skip
        av_loss = (actor_v - v.detach()).pow(2).mean()
        self._step("actor", pi_loss + cfg.value_weight * av_loss)
        return {
            "q_loss": _f(q_loss),
            "v_loss": _f(v_loss),
            "pi_loss": _f(pi_loss),
            "q_mean": _f(q_a.mean()),
            "adv_mean": _f(adv.mean()),
            "logp_data": _f(logp.mean()),
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
        self._step("critic", td + cfg.cql_alpha * pen + cfg.value_weight * v_loss)
        self._polyak()
        return {"td_loss": _f(td), "cql_penalty": _f(pen), "q_mean": _f(q_a.mean())}
