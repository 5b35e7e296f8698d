"""Simic: a vectorised batch of simulated host models whose layers degrade.

Why vectorised: evaluation runs hundreds of episodes per policy, so the dynamics of all
E environments advance with a few numpy calls per step (arrays padded to the largest
graph, ``mask`` marks real layers); only snapshot building is per environment.

Dynamics per decision step t → t+1 (hidden from the policy):
  * intrinsic damage ``d_i`` grows by the hidden rate ``r_i`` once t ≥ onset_i, capped at 1;
  * true health propagates downstream in topological order:
    ``h_j = (1 - d_j) · (1 - β · max_{p → j} (1 - h_p))``;
  * a kernel loaded into a faulty layer repairs it (d = r = 0) ``delay`` steps later;
    loading costs ``kernel_cost``; a layer without a started, unrepaired fault earns
    ``wrong_layer_penalty`` on top; each adaptation over the per-epoch budget earns
    ``over_budget_penalty``;
  * reward = mean true health over layers (unitless, [0, 1]) − costs.

Telemetry (what the policy sees) is the real ``HealthSignal`` schema with noise:
health_score = h + N(0, σ_h); intrinsic damage shows in dead_neuron_ratio, error_count,
gradient_norm and latency_variance; propagated damage only in health_score,
avg_correlation and activation_variance — so the root cause is identifiable from the
features, but not from health alone. A layer's signal is missing with p_drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tamiyo.config import SimicConfig
from tamiyo.policy.snapshot import FLOAT_FIELDS, INT_FIELDS, MAX_SEEDS, GraphSnapshot
from trainer.simic.episodes import Episode

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
MAX_SIM_SEEDS = 3
_T0 = 1.8e9  # Unix s of host step 0 (timestamps only need to be plausible and increasing)
_DORMANT, _GERMINATED, _TRAINING, _FOSSILIZED = 1, 2, 3, 4


def _frozen(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


class SimicBatch:
    """E episodes advanced in lock step. ``t`` is the current decision step (0..horizon)."""

    def __init__(self, episodes: Sequence[Episode], cfg: SimicConfig) -> None:
        if not episodes:
            raise ValueError("episodes: at least one episode is needed")
        self.cfg = cfg
        self.episodes = list(episodes)
        e = len(episodes)
        nm = max(ep.num_nodes for ep in episodes)
        self.E, self.Nmax = e, nm
        self.n = np.array([ep.num_nodes for ep in episodes], np.int64)
        self.mask = np.arange(nm)[None, :] < self.n[:, None]
        self.parents = np.zeros((e, nm, nm), np.bool_)
        self.rate = np.zeros((e, nm))
        self.onset = np.full((e, nm), 1 << 30, np.int64)
        self.seeds_total = np.zeros((e, nm), np.int64)
        base = np.zeros((4, e, nm))
        for i, ep in enumerate(episodes):
            k = ep.num_nodes
            self.parents[i, :k, :k] = ep.parents
            self.rate[i, :k] = ep.fault_rate
            self.onset[i, :k] = ep.fault_onset
            self.seeds_total[i, :k] = ep.seed_counts
            base[:, i, :k] = (ep.base_latency_ms, ep.base_activation_var, ep.base_grad_norm,
                              ep.memory_share)  # fmt: skip
        self.base_latency, self.base_actvar, self.base_grad, self.mem_share = base
        self.impact = self._impact_weights()
        self.damage = np.zeros((e, nm))
        self.pending_until = np.full((e, nm), -1, np.int64)
        self.seed_load_t = np.full((e, nm, MAX_SIM_SEEDS), -1, np.int64)
        self.seed_ready_t = np.full((e, nm, MAX_SIM_SEEDS), -1, np.int64)
        self.adapt_count = np.zeros((e, nm), np.int64)
        self.epoch_adapts = np.zeros(e, np.int64)
        self.t = 0
        w = cfg.window
        frames = cfg.horizon + w
        self._z = np.zeros((e, frames, nm, 8))
        self._u = np.zeros((e, frames, nm, 2))
        for i, ep in enumerate(episodes):
            rng = np.random.default_rng([ep.seed, 0x70153])
            self._z[i] = rng.standard_normal((frames, nm, 8))
            self._u[i] = rng.random((frames, nm, 2))
        self._count = np.zeros((e, nm), np.int64)
        self._floats = np.zeros((e, nm, w, len(FLOAT_FIELDS)), np.float32)
        self._ints = np.zeros((e, nm, w, len(INT_FIELDS)), np.int64)
        self._steps = np.zeros((e, nm, w), np.int64)
        self._epochs = np.zeros((e, nm, w), np.int64)
        self._times = np.zeros((e, nm, w), np.float64)
        self._seed_states = np.zeros((e, nm, w, MAX_SEEDS), np.uint8)
        self.health = self._true_health()
        for t in range(-w + 1, 1):  # pre-roll: the first decision sees a full window
            self._emit(t)

    # ---- hidden quantities (oracle, metrics) -------------------------------------------
    def _impact_weights(self) -> F64:
        """∂ mean health / ∂ d_i near full health: Σ_j β^dist(i, j) / N (N = layers)."""
        beta = self.cfg.propagation
        eye = np.eye(self.Nmax, dtype=np.bool_)[None].repeat(self.E, axis=0)
        reach = eye & self.mask[:, :, None]
        frontier = reach.copy()
        w = reach.astype(np.float64)
        adj = self.parents.astype(np.float32)
        for dist in range(1, self.Nmax):
            frontier = (np.matmul(frontier.astype(np.float32), adj) > 0) & ~reach
            if not frontier.any():
                break
            reach |= frontier
            w += frontier * beta**dist
        impact: F64 = w.sum(axis=2) / self.n[:, None]
        return impact

    def _true_health(self) -> F64:
        beta = self.cfg.propagation
        h = np.ones((self.E, self.Nmax))
        for j in range(self.Nmax):
            up = (self.parents[:, :, j] * (1.0 - h)).max(axis=1)
            h[:, j] = (1.0 - self.damage[:, j]) * (1.0 - beta * up)
        out: F64 = np.where(self.mask, h, 1.0)
        return out

    def host_step(self, t: int) -> int:
        return (t + self.cfg.window) * self.cfg.host_steps_per_decision

    def epoch_of(self, t: int) -> int:
        return self.host_step(t) // self.cfg.host_steps_per_epoch

    @property
    def done(self) -> bool:
        return self.t >= self.cfg.horizon

    def free_seeds(self) -> I64:
        free: I64 = self.seeds_total - (self.seed_load_t >= 0).sum(axis=2)
        return free

    def active_fault(self) -> npt.NDArray[np.bool_]:
        """Faults that have started, are not repaired and not being repaired."""
        return (self.rate > 0) & (self.onset <= self.t) & (self.pending_until < 0) & self.mask

    # ---- telemetry ----------------------------------------------------------------------
    def _seed_state_codes(self, t: int) -> npt.NDArray[np.uint8]:
        lt, rt = self.seed_load_t, self.seed_ready_t
        s = np.full(lt.shape, _DORMANT, np.uint8)
        loaded = (lt >= 0) & (t > lt)
        s[loaded] = _TRAINING
        s[loaded & (t == lt + 1)] = _GERMINATED
        s[loaded & (t >= rt)] = _FOSSILIZED
        return s

    def _emit(self, t: int) -> None:
        """Write the frame of decision step t into each layer's ring (drops included)."""
        cfg, w = self.cfg, self.cfg.window
        fi = t + w - 1
        z, u = self._z[:, fi], self._u[:, fi]
        h, d = self.health, self.damage
        active = (self.seed_load_t >= 0).sum(axis=2)
        floats = np.stack(
            [
                np.clip(h + cfg.health_noise * z[..., 0], 0.0, 1.0),
                self.base_latency * (1 + 0.1 * active) * np.exp(0.05 * z[..., 1]),
                self.base_actvar * (1 - 0.6 * (1 - h)) * np.exp(0.1 * z[..., 2]),
                np.clip(0.03 + 0.8 * d + cfg.dead_noise * z[..., 3], 0.0, 1.0),
                np.clip(0.15 + 0.5 * (1 - h) + 0.04 * z[..., 4], 0.0, 1.0),
                self.base_grad * (1 + 3 * d) * np.exp(0.15 * z[..., 5]),
                0.01 * self.base_latency * (1 + 2 * d) * np.exp(0.2 * z[..., 6]),
                np.clip(self.mem_share + 0.01 * active, 0.0, 1.0),
            ],
            axis=-1,
        ).astype(np.float32)
        errors = np.floor(6 * d * np.exp(0.3 * z[..., 7]) + u[..., 0]).astype(np.int64)
        ints = np.stack([errors, active, self.seeds_total, self.adapt_count], axis=-1)
        report = self.mask & (u[..., 1] >= cfg.drop_probability)
        ee, nn = np.nonzero(report)
        slot = self._count[ee, nn] % w
        self._count[ee, nn] += 1
        step = self.host_step(t)
        self._floats[ee, nn, slot] = floats[ee, nn]
        self._ints[ee, nn, slot] = ints[ee, nn]
        self._steps[ee, nn, slot] = step
        self._epochs[ee, nn, slot] = step // cfg.host_steps_per_epoch
        self._times[ee, nn, slot] = _T0 + step * 0.05
        codes = np.zeros((self.E, self.Nmax, MAX_SEEDS), np.uint8)
        codes[..., :MAX_SIM_SEEDS] = self._seed_state_codes(t)
        codes[..., :MAX_SIM_SEEDS] *= np.arange(MAX_SIM_SEEDS) < self.seeds_total[..., None]
        self._seed_states[ee, nn, slot] = codes[ee, nn]

    def snapshot(self, i: int) -> GraphSnapshot:
        """What environment i's SignalWindow would hold now (same ring semantics)."""
        ep = self.episodes[i]
        k, w = ep.num_nodes, self.cfg.window
        count = self._count[i, :k]
        slots = np.arange(w)
        src = (count[:, None] - w + slots[None, :]) % w
        valid = slots[None, :] >= (w - np.minimum(count, w))[:, None]

        def take(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            a = a[i, :k]
            out = np.take_along_axis(a, src.reshape(src.shape + (1,) * (a.ndim - 2)), axis=1)
            out[~valid] = 0
            return _frozen(out)

        seed_len = np.where(valid, ep.seed_counts[:, None], 0).astype(np.int64)
        return GraphSnapshot(
            ep.topology, ep.kernels, _frozen(valid), take(self._floats), take(self._ints),
            take(self._steps), take(self._epochs), take(self._times), take(self._seed_states),
            _frozen(seed_len), step=self.host_step(self.t), epoch=self.epoch_of(self.t),
        )  # fmt: skip

    # ---- dynamics -----------------------------------------------------------------------
    def step(self, node: I64, kernel: I64) -> tuple[F64, npt.NDArray[np.bool_]]:
        """Apply one action per env (node −1 = no-op) at step t, advance to t+1.

        Returns (reward float64 [E], applied bool [E]); an adaptation the host cannot apply
        (no free seed, bad index) is refused, costs ``wrong_layer_penalty`` and changes
        nothing else.
        """
        if self.done:
            raise RuntimeError("episode batch is finished")
        cfg, t = self.cfg, self.t
        node = np.asarray(node, np.int64)
        kernel = np.asarray(kernel, np.int64)
        cost = np.zeros(self.E)
        epoch = self.epoch_of(t)
        if t == 0 or self.epoch_of(t - 1) != epoch:
            self.epoch_adapts[:] = 0
        want = node >= 0
        nk = len(cfg.kernel_cost)
        safe_node = np.clip(node, 0, self.Nmax - 1)
        free = self.free_seeds()[np.arange(self.E), safe_node]
        ok = want & (node < self.n) & (kernel >= 0) & (kernel < nk) & (free > 0)
        cost[want & ~ok] += cfg.wrong_layer_penalty
        e_ok = np.nonzero(ok)[0]
        for e in e_ok:
            j, k = int(node[e]), int(kernel[e])
            delay = cfg.kernel_delay[k]
            cost[e] += cfg.kernel_cost[k]
            self.epoch_adapts[e] += 1
            if self.epoch_adapts[e] > cfg.max_adaptations_per_epoch:
                cost[e] += cfg.over_budget_penalty
            fixes = self.rate[e, j] > 0 and self.onset[e, j] <= t and self.pending_until[e, j] < 0
            if fixes:
                self.pending_until[e, j] = t + delay
            else:
                cost[e] += cfg.wrong_layer_penalty
            s = int(np.argmax(self.seed_load_t[e, j] < 0))
            self.seed_load_t[e, j, s] = t
            self.seed_ready_t[e, j, s] = t + delay
            self.adapt_count[e, j] += 1
        self.t = t = t + 1
        grow = (self.onset < t) & (self.rate > 0)
        self.damage = np.where(grow, np.minimum(self.damage + self.rate, 1.0), self.damage)
        repaired = self.pending_until == t
        self.damage[repaired] = 0.0
        self.rate[repaired] = 0.0
        self.pending_until[repaired] = -1
        self.health = self._true_health()
        reward = np.where(self.mask, self.health, 0.0).sum(axis=1) / self.n - cost
        self._emit(t)
        return reward, ok
