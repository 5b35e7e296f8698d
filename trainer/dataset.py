"""Offline dataset: experience-store transitions, featurized once, sampled as batches.

Why featurize up front: every state goes through ``snapshot_from_state`` → ``featurize``
exactly as the server's Decide path does, once; training steps then only collate.
Next states that are the session's next decision reuse that decision's features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from tamiyo.experience import ACTION_NO_OP, ExperienceReader, Transition
from tamiyo.policy.features import FEATURE_SCHEMA, GraphTensors, featurize, snapshot_from_state
from tamiyo.v1 import graph_pb2

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass
class OfflineDataset:
    """M transitions. ``graphs`` holds every distinct featurized state; ``state`` and
    ``next_state`` int64 [M] index into it (``next_state`` = ``state`` when ``done``).
    ``node`` / ``kernel`` int64 [M] (−1 = no-op); ``reward``, ``done``, ``mc_return``,
    ``propensity`` float32 [M]; ``session`` int64 [M] (episode id, for splits)."""

    graphs: list[GraphTensors]
    state: I64
    next_state: I64
    node: I64
    kernel: I64
    reward: F32
    done: F32
    mc_return: F32
    propensity: F32
    session: I64
    dropped_invalid: int = 0
    relabelled_noop: int = 0  # served adaptations the host did not apply (build_dataset)

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def sample(self, rng: np.random.Generator, batch_size: int) -> I64:
        idx: I64 = rng.integers(0, len(self), size=batch_size)
        return idx

    def initial_indices(self) -> I64:
        """First transition of every session (for FQE's J estimate)."""
        first = np.ones(len(self), np.bool_)
        first[1:] = self.session[1:] != self.session[:-1]
        out: I64 = np.nonzero(first)[0]
        return out


def _features(state: bytes) -> GraphTensors:
    msg = graph_pb2.ModelGraphState.FromString(state)
    return featurize(snapshot_from_state(msg, FEATURE_SCHEMA.window))


class MixedRewardsError(ValueError):
    """Transitions whose rewards follow different conventions (``reward_source``)."""


def check_reward_sources(transitions: Sequence[Transition]) -> dict[str, int]:
    """Transitions per ``reward_source``; raises ``MixedRewardsError`` when simulator
    rewards meet served ones. Why: they do not share a scale. The simulator's reward is a
    level (mean true health − costs, ~0.9 per step), the server's derived one a change
    (of mean reported health, ~0 per step, adaptations free). One critic fitting both
    learns targets ~0.9 apart per step for the same (s, a). A served session's own mix of
    ``client`` and ``derived`` is the protocol's design (the server derives a reward
    only where the host reported none: ``DecisionOutcome.reward``), so it is allowed."""
    counts: dict[str, int] = {}
    for tr in transitions:
        counts[tr.reward_source] = counts.get(tr.reward_source, 0) + 1
    if "simulator" in counts and len(counts) > 1:
        found = ", ".join(f"{n:,} {src}" for src, n in sorted(counts.items()))
        raise MixedRewardsError(
            f"simulator and served rewards in one dataset ({found} transitions): the "
            "simulator's is a level (mean true health − costs), 'derived' a change of mean "
            "reported health, 'client' the host's own; train on one kind, or pass "
            "mixed_rewards=True once their scales agree"
        )
    return counts


def build_dataset(
    transitions: Sequence[Transition],
    gamma: float,
    *,
    progress: bool = True,
    mixed_rewards: bool = False,
) -> OfflineDataset:
    """Featurize ``transitions`` (ordered by session and step, as the reader returns
    them). Logged actions the featurizer deems invalid (no free seed visible, kernel out
    of range) cannot be scored by the policy; they are dropped and counted. Rewards of
    more than one convention are refused (``check_reward_sources``) unless
    ``mixed_rewards``.

    A served adaptation the host did not apply (``applied`` false, any source but the
    simulator) is relabelled a no-op: that is what the host's training went on with.
    Its propensity becomes 1: the server decides deterministically (it logs 1.0 unless
    exploring) and the host's refusal is part of the environment. (The simulator's
    refused loads stay: there the refusal itself is penalised.)"""
    if not mixed_rewards:
        check_reward_sources(transitions)
    graphs: list[GraphTensors] = []
    index_of: dict[int, int] = {}  # id(state bytes) → graphs index
    names = ("s", "ns", "node", "kernel", "r", "d", "p", "sess")
    cols: dict[str, list[float]] = {k: [] for k in names}
    sessions: dict[str, int] = {}
    dropped = relabelled = 0

    def index(b: bytes) -> int:
        key = id(b)
        if key not in index_of:
            index_of[key] = len(graphs)
            graphs.append(_features(b))
        return index_of[key]

    keep: list[Transition] = []
    for tr in tqdm(transitions, desc="featurize", unit="tr", disable=not progress, leave=False):
        d = tr.decision
        s = index(d.state)
        g = graphs[s]
        adapt = d.action_kind != ACTION_NO_OP
        refused = adapt and not tr.applied and tr.reward_source != "simulator"
        if refused:
            adapt = False
            relabelled += 1
        elif adapt and not (
            0 <= d.node_index < g.num_nodes
            and bool(g.target_mask[d.node_index])
            and 0 <= d.kernel_index < g.num_kernels
        ):
            dropped += 1
            continue
        ns = index(tr.next_state) if tr.next_state is not None else s
        cols["s"].append(s)
        cols["ns"].append(ns)
        cols["node"].append(d.node_index if adapt else -1)
        cols["kernel"].append(d.kernel_index if adapt else -1)
        cols["r"].append(tr.reward)
        cols["d"].append(float(tr.done or tr.next_state is None))
        cols["p"].append(1.0 if refused else d.propensity)
        cols["sess"].append(sessions.setdefault(d.session_id, len(sessions)))
        keep.append(tr)
    arr = {k: np.asarray(v) for k, v in cols.items()}
    reward = arr["r"].astype(np.float32)
    done = arr["d"].astype(np.float32)
    mc = np.zeros(len(reward), np.float32)
    acc = 0.0
    for i in range(len(reward) - 1, -1, -1):
        cont = i + 1 < len(reward) and arr["sess"][i + 1] == arr["sess"][i] and not done[i]
        acc = float(reward[i]) + (gamma * acc if cont else 0.0)
        mc[i] = acc
    return OfflineDataset(
        graphs=graphs,
        state=arr["s"].astype(np.int64),
        next_state=arr["ns"].astype(np.int64),
        node=arr["node"].astype(np.int64),
        kernel=arr["kernel"].astype(np.int64),
        reward=reward,
        done=done,
        mc_return=mc,
        propensity=arr["p"].astype(np.float32),
        session=arr["sess"].astype(np.int64),
        dropped_invalid=dropped,
        relabelled_noop=relabelled,
    )


def load_dataset(
    sources: Sequence[Path | str],
    gamma: float,
    *,
    progress: bool = True,
    mixed_rewards: bool = False,
) -> OfflineDataset:
    """Read experience stores (files or directories) with the one reader and featurize."""
    return build_dataset(
        ExperienceReader(sources).transitions(),
        gamma,
        progress=progress,
        mixed_rewards=mixed_rewards,
    )
