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
from trainer.behaviour_data import generate
from trainer.cli import main
from trainer.dataset import OfflineDataset, load_dataset
from trainer.fqe import FqeEnsemble, FqeResult, fit_q, fit_q_ensemble, member_seeds
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
              members: int = 3, workers: int = 1) -> FqeEnsemble:  # fmt: skip
    return fit_q_ensemble(policy, data, cfg, members=members, steps=STEPS, progress=False,
                          workers=workers)  # fmt: skip


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
    # Member 0 is the single critic of earlier reports (its default seed).
    single = fit_q(policy, data, CFG, steps=STEPS, progress=False)
    assert single.seed == seeds[0]
    assert single.estimate_shifted == ens.members[0].estimate_shifted


def test_forked_members_give_the_same_figures_and_identical_runs_identical_ones(
    policy: TamiyoPolicy, data: OfflineDataset
) -> None:
    first = _ensemble(policy, data)
    assert _ensemble(policy, data, workers=2).estimates.tolist() == first.estimates.tolist()
    assert _ensemble(policy, data).estimates.tolist() == first.estimates.tolist()
    other = _ensemble(policy, data, replace(CFG, seed=4))
    assert not set(m.seed for m in other.members) & set(m.seed for m in first.members)
    assert other.estimates.tolist() != first.estimates.tolist()


def test_member_seeds_come_from_the_run_seed_and_never_repeat() -> None:
    assert member_seeds(0, 1) == [7919]  # the single critic's seed since session 1
    seen = [s for run in range(50) for s in member_seeds(run, 8)]
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="at least one member"):
        member_seeds(0, 0)


def test_spread_of_hand_computed_values() -> None:
    s = spread([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)
    assert s["mean"] == 2.5
    assert s["std"] == pytest.approx(std)
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert s["ci_low"] == pytest.approx(2.5 - 3.182 * std / 2)
    assert s["ci_high"] == pytest.approx(2.5 + 3.182 * std / 2)
    one = spread([0.7])
    assert one["mean"] == one["min"] == one["max"] == 0.7
    assert math.isnan(one["std"])
    assert math.isnan(one["ci_low"])


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
                       ((-0.25, 1), (-0.15, 2), (-0.23, 3))])  # fmt: skip
    f = ensemble_figures(ens, true_raw, beh, shift)
    mean_fig = fqe_figures(ens.estimate_shifted, true_raw, beh, shift)
    assert f["size"] == 3
    assert f["seeds"] == [1, 2, 3]
    rel = f["relative_error_shifted"]
    assert rel["members"] == pytest.approx([-0.25, 0.25, -0.15])
    assert rel["mean"] == pytest.approx(mean_fig["relative_error_shifted"])
    assert (rel["min"], rel["max"]) == pytest.approx((-0.25, 0.25))
    assert rel["ci_low"] < rel["mean"] < rel["ci_high"]
    gain = f["error_vs_gain_over_behaviour"]
    assert gain["members"] == pytest.approx([-0.1, 0.1, -0.06])
    assert f["estimate_shifted"]["std"] == pytest.approx(np.std([-0.25, -0.15, -0.23], ddof=1))


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
