"""Resumable training state: every network, optimizer moment and RNG, without pickle.

Why not ``torch.save``: the project never unpickles. Tensors go to safetensors, the
rest (step, RNG state of numpy, config) to JSON; both are written to temp files, fsynced
and renamed, so a crash leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from trainer.algos import Learner

TENSORS = "train_state.safetensors"
META = "train_state.json"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(directory: Path, learner: Learner, step: int, extra: dict[str, Any]) -> None:
    """Write the learner's full state at ``step`` (tensors first, then the JSON that
    names the step: a reader that sees the JSON sees matching tensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in learner.named_state().items():
        for k, v in module.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
    for name, opt in learner.optims.items():
        for idx, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                tensors[f"optim.{name}.{idx}.{k}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    _atomic_write(directory / TENSORS, safetensors.torch.save(tensors))
    meta = {"step": step, "algo": learner.cfg.algo, **extra}
    _atomic_write(directory / META, json.dumps(meta, indent=1).encode())


def load_state(directory: Path, learner: Learner) -> dict[str, Any] | None:
    """Restore the learner from ``directory``; returns the JSON meta, or None if absent.

    Raises ValueError naming the problem when the state belongs to another algorithm or
    its tensors do not match the networks."""
    meta_path = directory / META
    if not meta_path.exists():
        return None
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("algo") != learner.cfg.algo:
        raise ValueError(f"{meta_path}: state is for algo {meta.get('algo')!r}, not "
                         f"{learner.cfg.algo!r}")  # fmt: skip
    tensors = safetensors.torch.load((directory / TENSORS).read_bytes())
    for name, module in learner.named_state().items():
        prefix = f"model.{name}."
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    for name, opt in learner.optims.items():
        osd: dict[str, Any] = dict(opt.state_dict())
        prefix = f"optim.{name}."
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith(prefix):
                idx, key = k[len(prefix) :].split(".", 1)
                state.setdefault(int(idx), {})[key] = v
        osd["state"] = state
        opt.load_state_dict(osd)
    torch.set_rng_state(tensors["rng.torch"])
    return meta
