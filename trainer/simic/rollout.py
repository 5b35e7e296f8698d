"""Run policies through Simic episodes: returns, oracle agreement, optional logging.

Why one loop for evaluation and data generation: behaviour data must be what the
behaviour policy really did in the same simulator the learned policy is scored in, and
logged in the production experience format (``tamiyo.experience``) so that the trainer
reads simulator data and server logs with one reader.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tamiyo.config import SimicConfig
from tamiyo.experience import (
    ACTION_LOAD_KERNEL,
    ACTION_NO_OP,
    DecisionRecord,
    ExperienceWriter,
    OutcomeRecord,
)
from tamiyo.policy.features import GraphSnapshot, GraphTensors, featurize, state_from_snapshot
from trainer.simic.env import SimicBatch
from trainer.simic.episodes import Episode, make_episode
from trainer.simic.policies import Actions, SimPolicy, oracle_benefit


@dataclass
class RolloutResult:
    """Per-episode returns (float64 [E]) and decision statistics over all steps."""

    seeds: list[int]
    returns: npt.NDArray[np.float64]
    discounted: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    adaptations: int = 0
    wrong_adaptations: int = 0  # adapted a layer with no started, unrepaired fault
    both_adapt: int = 0  # steps where the oracle would adapt and the policy adapted
    same_layer: int = 0  # ... and chose the oracle's layer
    oracle_adapt_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def oracle_layer_agreement(self) -> float:
        """P(policy's layer = oracle's layer | both adapt at this state); NaN if never."""
        return self.same_layer / self.both_adapt if self.both_adapt else float("nan")


def episodes_for(seeds: Sequence[int], sizes: tuple[int, int], cfg: SimicConfig) -> list[Episode]:
    return [make_episode(s, sizes, cfg) for s in seeds]


def run_policy(
    policy: SimPolicy,
    episodes: Sequence[Episode],
    cfg: SimicConfig,
    *,
    writer: ExperienceWriter | None = None,
    policy_version: str = "",
    batch_envs: int = 128,
    gamma: float = 1.0,
) -> RolloutResult:
    """Play every episode to the horizon (``batch_envs`` at a time) and collect stats;
    ``discounted`` holds Σ_t γ^t r_t per episode for ``gamma`` (FQE's ground truth)."""
    returns: list[npt.NDArray[np.float64]] = []
    disc: list[npt.NDArray[np.float64]] = []
    res = RolloutResult([ep.seed for ep in episodes], np.zeros(0))
    for lo in range(0, len(episodes), batch_envs):
        env = SimicBatch(episodes[lo : lo + batch_envs], cfg)
        r, d = _run_batch(policy, env, res, writer, policy_version or policy.name, gamma)
        returns.append(r)
        disc.append(d)
    res.returns = np.concatenate(returns)
    res.discounted = np.concatenate(disc)
    return res


def _run_batch(
    policy: SimPolicy,
    env: SimicBatch,
    res: RolloutResult,
    writer: ExperienceWriter | None,
    version: str,
    gamma: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    policy.reset(env)
    total = np.zeros(env.E)
    disc = np.zeros(env.E)
    k = len(env.cfg.kernel_cost)
    while not env.done:
        snaps = [env.snapshot(i) for i in range(env.E)] if (
            policy.uses_features or writer is not None) else None  # fmt: skip
        graphs = [featurize(s) for s in snaps] if snaps is not None else None
        acts = policy.act(env, graphs)
        ob = oracle_benefit(env).reshape(env.E, -1)
        ob_best = ob.argmax(axis=1)
        oracle_go = ob[np.arange(env.E), ob_best] > 0
        adapt = acts.node >= 0
        active = env.active_fault()
        res.adaptations += int(adapt.sum())
        safe = np.clip(acts.node, 0, env.Nmax - 1)
        res.wrong_adaptations += int((adapt & ~active[np.arange(env.E), safe]).sum())
        res.oracle_adapt_steps += int(oracle_go.sum())
        both = adapt & oracle_go
        res.both_adapt += int(both.sum())
        res.same_layer += int((both & (acts.node == ob_best // k)).sum())
        records = (
            _decisions(env, snaps, graphs, acts, version)
            if writer is not None and snaps is not None and graphs is not None
            else []
        )
        for r in records:
            assert writer is not None
            writer.log_decision(r)
        policy.commit(env, acts)  # before the step: cooldowns count from the decision
        reward, applied = env.step(acts.node, acts.kernel)
        disc += gamma ** (env.t - 1) * reward
        total += reward
        if writer is not None:
            now = time.time()
            # The horizon truncates an episode; it is not a terminal state (nothing in
            # the state shows the time left, and a served host has no horizon). So the
            # last outcome carries the state after it, done = False, and the critic
            # bootstraps from it instead of learning a value ramp it cannot observe.
            last = [state_from_snapshot(env.snapshot(i)).SerializeToString()
                    for i in range(len(records))] if env.done else None  # fmt: skip
            for i, r in enumerate(records):
                writer.log_outcome(
                    OutcomeRecord(r.decision_id, now, bool(applied[i]) or acts.node[i] < 0,
                                  float(reward[i]), "simulator",
                                  last[i] if last is not None else None, False)
                )  # fmt: skip
    return total, disc


def _decisions(
    env: SimicBatch,
    snaps: Sequence[GraphSnapshot],
    graphs: Sequence[GraphTensors],
    acts: Actions,
    version: str,
) -> list[DecisionRecord]:
    out: list[DecisionRecord] = []
    now = time.time()
    for i, ep in enumerate(env.episodes):
        snap = snaps[i]
        g = graphs[i]
        node, kern = int(acts.node[i]), int(acts.kernel[i])
        adapt = node >= 0
        out.append(
            DecisionRecord(
                decision_id=f"simic-{ep.seed}-{env.t}",
                session_id=f"simic-{ep.seed}",
                host_id="simic",
                step=env.host_step(env.t),
                epoch=env.epoch_of(env.t),
                ts_s=now,
                state=state_from_snapshot(snap).SerializeToString(),
                action_kind=ACTION_LOAD_KERNEL if adapt else ACTION_NO_OP,
                node_index=node if adapt else -1,
                kernel_index=kern if adapt else -1,
                layer_id=ep.topology.layer_ids[node] if adapt else "",
                kernel_id=ep.kernels.kernel_ids[kern] if adapt else "",
                seed_index=max(int(g.free_seed[node]), 0) if adapt else 0,
                propensity=float(acts.propensity[i]),
                policy_version=version,
                rule=int(acts.rule[i]),
            )
        )
    return out
