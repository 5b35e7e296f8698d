"""Which policy to serve when nobody named one, and the untrained built-in fallback.

Order: an explicit checkpoint directory (its ``latest``), else the repository's
``checkpoints/default/`` (shipped by ``make train`` with a fixed seed; an installed
package finds it through ``TAMIYO_DEFAULT_CHECKPOINT_DIR``, as the image does), else a
deterministic-seed *untrained* network. The last one exists only so a fresh checkout
can serve before any training; its version string says so ("builtin-untrained-…") and
its decisions are still filtered by the rules.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from tamiyo.policy.checkpoint import LoadedPolicy, load_checkpoint, resolve_latest
from tamiyo.policy.feature_schema import FEATURE_SCHEMA
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy

DEFAULT_CHECKPOINT_DIR = Path(
    os.environ.get("TAMIYO_DEFAULT_CHECKPOINT_DIR")  # an installed package (the image)
    or Path(__file__).resolve().parents[2] / "checkpoints" / "default"  # a source checkout
)
BUILTIN_SEED = 20240607


def builtin_policy(
    config: PolicyConfig | None = None, seed: int = BUILTIN_SEED, device: str | torch.device = "cpu"
) -> LoadedPolicy:
    """Untrained policy with weights fixed by ``seed`` (same weights on every machine)."""
    config = config or PolicyConfig()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TamiyoPolicy(config)
    finally:
        torch.random.set_rng_state(gen_state)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    version = f"builtin-untrained-{h.hexdigest()[:8]}"
    model.to(device).eval()
    manifest = {
        "version": version,
        "model_config": config.to_dict(),
        "feature_schema": FEATURE_SCHEMA.to_dict(),
        "provenance": {"seed": seed},
    }
    return LoadedPolicy(model, config, version, None, manifest)


def load_policy(
    checkpoint_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedPolicy:
    """Latest checkpoint of ``checkpoint_dir`` (or of the default dir), else built-in.

    An explicitly named directory without a valid ``latest`` raises ``CheckpointError``
    via ``load_checkpoint`` only when ``latest`` points at a broken checkpoint; an empty
    directory falls back to the built-in policy (the trainer may not have run yet).
    """
    root = Path(checkpoint_dir) if checkpoint_dir else DEFAULT_CHECKPOINT_DIR
    latest = resolve_latest(root)
    if latest is None:
        return builtin_policy(device=device)
    return load_checkpoint(latest, device=device)
