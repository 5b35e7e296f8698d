"""The FQE ensemble (``trainer.fqe.fit_q_ensemble``) and the spread it reports
(``trainer.fqe_check``): on real, tiny Simic behaviour data with the real critic.

One critic's estimate moved with its seed by more than the target (README, "Left open");
the ensemble is K independent runs of the same ``fit_q``, so its mean must be exactly the
mean of the members fitted alone, its figures must not depend on how many processes fit
them, and identical runs must give identical figures."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tamiyo.config import SimicConfig, TrainConfig
from tamiyo.policy.checkpoint import save_checkpoint
from tamiyo.policy.model import TamiyoPolicy
from tests.trainer.test_learning import SMALL
from trainer import fqe
from trainer.behaviour_data import generate
from trainer.cli import main
from trainer.dataset import OfflineDataset, load_dataset
from trainer.fqe import (
    FqeEnsemble,
    FqeResult,
    episode_resample,
    fit_q,
    fit_q_ensemble,
    member_seeds,
)
from trainer.fqe_check import ensemble_figures, fqe_figures, spread

SIMIC = replace(SimicConfig(), horizon=6, train_sizes=(4, 5), unseen_sizes=(6, 7),
                onset_range=(1, 2), fault_rate_range=(0.2, 0.3),
                fault_count_probs=(0.0, 1.0))  # fmt: skip
CFG = TrainConfig(batch_size=8, seed=3)
STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as the pipeline and ``trainer fqe`` run (``num_threads`` = 1),
    so in-process and forked members run the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> OfflineDataset:
    store = tmp_path_factory.mktemp("fqe") / "heldout.sqlite"
    return load_dataset([generate(store, range(4), SIMIC.train_sizes, SIMIC)], CFG.gamma,
                        progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def policy() -> TamiyoPolicy:
    torch.manual_seed(0)
    return TamiyoPolicy(SMALL)


def _ensemble(policy: TamiyoPolicy, data: OfflineDataset, cfg: TrainConfig = CFG,
              members: int = 3, workers: int = 1,
              resampled: bool = True) -> FqeEnsemble:  # fmt: skip
    return fit_q_ensemble(policy, data, cfg, members=members, steps=STEPS, progress=False,
                          workers=workers, resampled=resampled)  # fmt: skip


def test_the_ensemble_is_the_mean_of_its_members_fitted_alone(
    policy: TamiyoPolicy, data: OfflineDataset
) -> None:
    ens = _ensemble(policy, data)
    seeds = member_seeds(CFG.seed, 3)
    assert [m.seed for m in ens.members] == seeds
    alone = [fit_q(policy, data, CFG, steps=STEPS, progress=False, seed=s) for s in seeds]
    assert ens.estimates.tolist() == [a.estimate_shifted for a in alone]
    assert ens.estimate_shifted == pytest.approx(np.mean([a.estimate_shifted for a in alone]),
                                                 abs=1e-12)  # fmt: skip
    assert len(set(ens.estimates.tolist())) == 3  # the seeds make different critics
    assert not any(m.resampled for m in ens.members)
    # Beside them, the same seeds each on its own resample of the episodes: not in the
    # estimate, only in the interval.
    assert [m.seed for m in ens.resampled] == seeds
    assert all(m.resampled for m in ens.resampled)
    boot = [fit_q(policy, data, CFG, steps=STEPS, progress=False, seed=s, resample=True)
            for s in seeds]  # fmt: skip
    assert ens.resampled_estimates.tolist() == [b.estimate_shifted for b in boot]
    assert ens.resampled_estimates.tolist() != ens.estimates.tolist()
    # Member 0 is the single critic with its default seed.
    single = fit_q(policy, data, CFG, steps=STEPS, progress=False)
    assert single.seed == seeds[0]
    assert single.estimate_shifted == ens.members[0].estimate_shifted
    assert _ensemble(policy, data, members=2, resampled=False).resampled == []


def test_forked_members_give_the_same_figures_and_identical_runs_identical_ones(
    policy: TamiyoPolicy, data: OfflineDataset
) -> None:
    first = _ensemble(policy, data)
    forked = _ensemble(policy, data, workers=2)
    assert forked.estimates.tolist() == first.estimates.tolist()
    assert forked.resampled_estimates.tolist() == first.resampled_estimates.tolist()
    assert _ensemble(policy, data).estimates.tolist() == first.estimates.tolist()
    other = _ensemble(policy, data, replace(CFG, seed=4))
    assert not set(m.seed for m in other.members) & set(m.seed for m in first.members)
    assert other.estimates.tolist() != first.estimates.tolist()


def _drawn(data: OfflineDataset, pool: np.ndarray) -> list[int]:
    """The episodes of a resample, checking that each comes whole and in order."""
    first = data.initial_indices()
    bounds = np.append(first, len(data))
    drawn, i = [], 0
    while i < len(pool):
        e = int(data.session[pool[i]])
        whole = list(range(bounds[e], bounds[e + 1]))
        assert pool[i : i + len(whole)].tolist() == whole
        drawn.append(e)
        i += len(whole)
    return drawn


def test_a_member_trains_on_a_bootstrap_resample_of_whole_episodes(data: OfflineDataset) -> None:
    """``episode_resample``: as many episodes as the data has, drawn with replacement
    from the member's seed, each with all its transitions in order; J is taken on the
    first states of the episodes drawn (the bootstrap of the whole estimate)."""
    first = data.initial_indices()
    pool, starts = episode_resample(data, 11)
    again = episode_resample(data, 11)
    assert np.array_equal(pool, again[0])  # a function of the seed
    assert np.array_equal(starts, again[1])
    assert not np.array_equal(pool, episode_resample(data, 12)[0])
    draws = []
    for s in range(5):
        pool, starts = episode_resample(data, s)
        drawn = _drawn(data, pool)
        assert len(drawn) == len(first)
        assert starts.tolist() == [int(first[e]) for e in drawn]
        draws.append(drawn)
    assert any(len(set(d)) < len(first) for d in draws)  # with replacement


def test_a_critics_estimate_is_its_mean_over_the_last_quarter_of_its_steps(
    policy: TamiyoPolicy, data: OfflineDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """J is taken every ``TAIL_EVERY`` steps over the last ``TAIL_FRACTION`` of the run
    and averaged (one evaluation of the last iterate moved by ~17% of the shifted value
    from one evaluation to the next within a run); ``estimate_last`` is the last one."""
    seen: list[float] = []
    real = fqe._start_value

    def spy(*args: object) -> float:
        v = real(*args)  # type: ignore[arg-type]
        seen.append(v)
        return v

    monkeypatch.setattr(fqe, "_start_value", spy)
    steps = 8 * fqe.TAIL_EVERY  # tail = 2 · TAIL_EVERY: steps 7·E and 8·E
    res = fit_q(policy, data, CFG, steps=steps, progress=False)
    assert res.tail_evaluations == len(seen) == 2
    assert res.estimate_shifted == pytest.approx(float(np.mean(seen)), abs=1e-12)
    assert res.estimate_last == seen[-1]
    assert seen[0] != seen[1]


def test_the_interval_covers_the_datas_error_that_the_members_share() -> None:
    """``spread`` on simulated ensembles: every all-data critic = truth + the data's error
    D (one draw per ensemble: the critics share the data) + its seed noise; a resampled
    critic adds its own draw of the data's noise instead. The interval must cover the
    truth ≥ 95% of the time; the interval of the all-data members' mean (t · std / √K,
    until session 16) covers only the seed noise and misses often."""
    rng = np.random.default_rng(0)
    k, n, data_sd, seed_sd = 10, 4000, 1.0, 1.0
    shared = rng.normal(0.0, data_sd, n)
    members = shared[:, None] + rng.normal(0.0, seed_sd, (n, k))
    boot = (shared[:, None] + rng.normal(0.0, data_sd, (n, k))
            + rng.normal(0.0, seed_sd, (n, k)))  # fmt: skip
    new = old = 0
    for row, brow in zip(members, boot, strict=True):
        s = spread(row.tolist(), brow.tolist())
        new += s["ci_low"] <= 0.0 <= s["ci_high"]
        old += abs(row.mean()) <= 2.262 * row.std(ddof=1) / math.sqrt(k)
    assert new / n >= 0.95
    assert old / n < 0.6


def test_member_seeds_come_from_the_run_seed_and_never_repeat() -> None:
    assert member_seeds(0, 1) == [7919]  # the single critic's seed since session 1
    seen = [s for run in range(50) for s in member_seeds(run, 8)]
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="at least one member"):
        member_seeds(0, 0)


def test_spread_of_hand_computed_values() -> None:
    s = spread([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 4.0])
    std, std_r = math.sqrt(5 / 3), 2.0
    assert s["mean"] == 2.5  # the all-data members' mean; the resampled ones are not in it
    assert s["std"] == pytest.approx(std)
    assert s["resampled_std"] == pytest.approx(std_r)
    assert (s["min"], s["max"]) == (1.0, 4.0)
    # mean ± t(K_r − 1) · √(std_r² + std²/K): the data's error is shared by the all-data
    # members, so it is not divided by K (the mean's interval, ± t · std / √4 until
    # session 16, covered only the seed noise)
    half = 4.303 * math.sqrt(std_r**2 + std**2 / 4)
    assert s["ci_low"] == pytest.approx(2.5 - half)
    assert s["ci_high"] == pytest.approx(2.5 + half)
    assert math.isnan(spread([1.0, 2.0])["ci_low"])  # no resampled members: no interval
    one = spread([0.7], [0.5, 0.9])
    assert one["mean"] == one["min"] == one["max"] == 0.7
    assert math.isnan(one["std"])
    assert one["ci_low"] == pytest.approx(0.7 - 12.706 * math.sqrt(0.08))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_the_t_quantiles_are_the_975_quantiles(df: int) -> None:
    """P(T ≤ q) = 0.975 for the tabulated q, by integrating the t density numerically."""
    from trainer.fqe_check import _T975

    q = _T975[df - 1]
    x = np.linspace(0.0, q, 200_001)
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    pdf = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    assert 0.5 + float(np.trapezoid(pdf, x)) == pytest.approx(0.975, abs=2e-4)


def test_ensemble_figures_report_each_members_error_against_the_same_truth() -> None:
    shift, true_raw, beh = -9.0, 8.8, 8.3  # true shifted −0.2, gain 0.5
    ens = FqeEnsemble([FqeResult(e, 10, 0.01, seed) for e, seed in
                       ((-0.25, 1), (-0.15, 2), (-0.23, 3))],
                      [FqeResult(e, 10, 0.01, seed, resampled=True) for e, seed in
                       ((-0.3, 1), (-0.1, 2), (-0.2, 3))])  # fmt: skip
    f = ensemble_figures(ens, true_raw, beh, shift)
    mean_fig = fqe_figures(ens.estimate_shifted, true_raw, beh, shift)
    assert (f["size"], f["resampled_size"]) == (3, 3)
    assert f["seeds"] == [1, 2, 3]
    rel = f["relative_error_shifted"]
    assert rel["members"] == pytest.approx([-0.25, 0.25, -0.15])
    assert rel["mean"] == pytest.approx(mean_fig["relative_error_shifted"])
    assert (rel["min"], rel["max"]) == pytest.approx((-0.25, 0.25))
    assert rel["ci_low"] < rel["mean"] < rel["ci_high"]
    gain = f["error_vs_gain_over_behaviour"]
    assert gain["members"] == pytest.approx([-0.1, 0.1, -0.06])
    assert f["estimate_shifted"]["std"] == pytest.approx(np.std([-0.25, -0.15, -0.23], ddof=1))
    assert f["estimate_shifted"]["resampled_std"] == pytest.approx(0.1)
    assert rel["resampled_members"] == pytest.approx([-0.5, 0.5, 0.0])


def test_the_fqe_command_reports_the_ensemble_and_repeats_itself(
    tmp_path: Path, policy: TamiyoPolicy
) -> None:
    """``python -m trainer fqe``: the pipeline's check alone, on a checkpoint root."""
    save_checkpoint(tmp_path / "ckpt", policy, SMALL)
    sets = ["--set", "batch_size=8", "--set", f"fqe_steps={STEPS}", "--set", "fqe_members=3",
            "--set", "heldout_data_episodes=3", "--set", "simic.horizon=6",
            "--set", "simic.train_sizes=4,5", "--set", "simic.onset_range=1,2",
            "--set", "simic.fault_count_probs=0,1"]  # fmt: skip
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert main(["fqe", "--checkpoint", str(tmp_path / "ckpt"), "--data-dir",
                     str(tmp_path / "data"), "--out", str(out), "--no-progress",
                     *sets]) == 0  # fmt: skip
    a, b = (json.loads(p.read_text()) for p in outs)
    assert a == b  # identical runs, identical figures
    fqe = a["fqe"]
    ens = fqe["ensemble"]
    assert ens["size"] == 3
    assert len(ens["estimate_shifted"]["members"]) == 3
    assert fqe["estimate_shifted"] == pytest.approx(np.mean(ens["estimate_shifted"]["members"]))
    assert fqe["relative_error_shifted"] == pytest.approx(ens["relative_error_shifted"]["mean"])
    assert ens["estimate_shifted"]["std"] > 0
    assert ens["estimate_shifted"]["ci_low"] < fqe["estimate_shifted"]
    assert fqe["estimate_shifted"] < ens["estimate_shifted"]["ci_high"]
    assert set(a["targets"]) == {"fqe_within_10pct_shifted",
                                 "fqe_within_10pct_of_gain_over_behaviour"}  # fmt: skip
