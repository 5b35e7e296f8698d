"""Which policy is served: a checkpoint's latest, else the deterministic built-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tamiyo.policy.builtin import builtin_policy, load_policy
from tamiyo.policy.checkpoint import CheckpointError, save_checkpoint


def test_builtin_is_deterministic_and_labelled() -> None:
    a, b = builtin_policy(), builtin_policy()
    assert a.version == b.version
    assert a.version.startswith("builtin-untrained-")
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb
        assert torch.equal(va, vb)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    builtin_policy()
    assert torch.equal(torch.rand(1), before)  # global RNG untouched


def test_load_policy_prefers_latest_checkpoint(tmp_path: Path) -> None:
    assert load_policy(tmp_path).version.startswith("builtin-untrained-")
    save_checkpoint(tmp_path, builtin_policy().model, version="trained-1")
    assert load_policy(tmp_path).version == "trained-1"
    (tmp_path / "trained-1" / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError):
        load_policy(tmp_path)


def test_an_installed_package_finds_the_bundled_default_through_the_environment(
    tmp_path: Path,
) -> None:
    """The image installs the package into site-packages, where the repository's
    checkpoints/ is not next to the code: TAMIYO_DEFAULT_CHECKPOINT_DIR names it."""
    save_checkpoint(tmp_path, builtin_policy().model, version="bundled-1")
    code = "from tamiyo.policy.builtin import load_policy; print(load_policy(None).version)"
    env = {**os.environ, "TAMIYO_DEFAULT_CHECKPOINT_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "bundled-1"
