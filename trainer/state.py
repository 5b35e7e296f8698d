"""Resumable training state: every network, optimizer moment and RNG, without pickle.

Why not ``torch.save``: the project never unpickles. Tensors go to safetensors, the
rest (step, config, what the run was trained on) to JSON; both are written to temp
files, fsynced and renamed, so a crash leaves either the old or the new state, never
half of one.

Why the identity check: resuming is only honest when the saved state belongs to *this*
run. A state trained with other hyperparameters, on other data, against another
validation set or with another number of DDP processes would silently be continued (or,
at ``step == steps``, returned unchanged) under the new run's name and provenance, and
so would a state saved by another version of the update rule (``algos.UPDATE_RULE``), so
``load_state`` refuses it and names every difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from tamiyo.config import TrainConfig
from trainer.algos import UPDATE_RULE, Learner
from trainer.dataset import OfflineDataset

TENSORS = "train_state.safetensors"
META = "train_state.json"

# TrainConfig fields that cannot change the weights a run produces from a given state,
# so a resume may differ in them:
# * steps: resuming to train further is the point of resuming;
# * eval_every: evaluation reads the weights and draws no training randomness (the
#   batch RNG is keyed by step, torch's RNG is only used at initialisation); it changes
#   which steps are candidates for ``keep_best``, and metrics.jsonl records which were;
# * checkpoint_every: only when the state is written;
# * device, num_threads: where and how fast (last-bit float differences at most);
# * eval_episodes: the validation set is compared itself (``validation_fingerprint``),
#   so ``trainer train --validation-episodes`` is covered as well;
# * the pipeline's experiment sizes (data_episodes, heldout_data_episodes,
#   final_eval_episodes, train_seeds, algos, fqe_steps, fqe_members, workers): they
#   act on other runs, the evaluation after training or on the data, which the data
#   fingerprint compares directly;
# * served_health_threshold: only how the published policy is evaluated and served.
# Every other field (and any field added later) must match.
RESUME_IGNORED: frozenset[str] = frozenset({
    "steps", "eval_every", "checkpoint_every", "device", "num_threads", "eval_episodes",
    "data_episodes", "heldout_data_episodes", "final_eval_episodes", "train_seeds",
    "algos", "fqe_steps", "fqe_members", "workers", "served_health_threshold",
})  # fmt: skip


IDENTITY_NAMES = {
    "data": "data (transitions:hash)",
    "validation": "validation set (episodes:hash)",
    "world_size": "world size (DDP processes)",
    "policy_config": "network (PolicyConfig)",
    "update_rule": "update rule (trainer.algos.UPDATE_RULE)",
}


class StateMismatchError(ValueError):
    """The saved training state belongs to another run (config, data, validation set)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x))


def _feed(h: Any, v: Any) -> None:
    """Hash ``v`` (arrays, containers, dataclasses, scalars) into ``h``, type-tagged."""
    if isinstance(v, np.ndarray):
        h.update(f"a{v.dtype.str}{v.shape}".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    elif isinstance(v, list | tuple):
        h.update(f"l{len(v)}".encode())
        for x in v:
            _feed(h, x)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        h.update(type(v).__name__.encode())
        for f in dataclasses.fields(v):
            _feed(h, getattr(v, f.name))
    elif v is None or isinstance(v, str | int | float | bool | np.generic):
        h.update(f"s{v!r}".encode())
    else:
        raise TypeError(f"data_fingerprint: cannot hash a {type(v).__name__}")


def data_fingerprint(data: OfflineDataset) -> str:
    """``"<transitions>:<hash>"`` of every array of the dataset (transitions and the
    featurized graphs): equal exactly when training would see the same data."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, data)
    return f"{len(data)}:{h.hexdigest()}"


def run_identity(
    *,
    data: str,
    validation: str | None,
    world_size: int,
    policy_config: Mapping[str, Any],
    update_rule: int = UPDATE_RULE,
) -> dict[str, Any]:
    """What, besides the TrainConfig, a resumed run must share with the saved one (the
    update rule too: the same config under another rule is another run)."""
    return {"data": data, "validation": validation, "world_size": world_size,
            "policy_config": dict(policy_config), "update_rule": update_rule}  # fmt: skip


def config_differences(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """``"key: saved → current"`` for every TrainConfig field outside ``RESUME_IGNORED``
    that differs (a field missing from the saved config counts as different)."""
    now = _jsonable(dataclasses.asdict(current))
    out = []
    for key in sorted(set(now) | set(saved)):
        if key in RESUME_IGNORED:
            continue
        old, new = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if old != new:
            out.append(f"{key}: {old!r} → {new!r}")
    return out


def save_state(directory: Path, learner: Learner, step: int, identity: Mapping[str, Any]) -> None:
    """Write the learner's full state at ``step`` (tensors first, then the JSON that
    names the step: a reader that sees the JSON sees matching tensors), with the
    TrainConfig and ``identity`` (``run_identity``) a resume is checked against."""
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
    meta = {"step": step, "algo": learner.cfg.algo,
            "train_config": _jsonable(dataclasses.asdict(learner.cfg)),
            "identity": _jsonable(dict(identity))}  # fmt: skip
    _atomic_write(directory / META, json.dumps(meta, indent=1).encode())


def load_state(
    directory: Path, learner: Learner, identity: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Restore the learner from ``directory``; returns the JSON meta, or None if absent.

    Raises ``StateMismatchError`` naming every difference when the state belongs to
    another algorithm, TrainConfig (outside ``RESUME_IGNORED``) or ``identity`` (data,
    validation set, world size, network shape), and ValueError when its tensors do not
    match the networks."""
    meta_path = directory / META
    if not meta_path.exists():
        return None
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("algo") != learner.cfg.algo:
        raise StateMismatchError(f"{meta_path}: state is for algo {meta.get('algo')!r}, not "
                                 f"{learner.cfg.algo!r}")  # fmt: skip
    diffs = config_differences(meta.get("train_config", {}), learner.cfg)
    saved_id = meta.get("identity", {})
    for key, new in _jsonable(dict(identity)).items():
        old = saved_id.get(key, "<absent>")
        if old != new:
            diffs.append(f"{IDENTITY_NAMES.get(key, key)}: {old!r} → {new!r}")
    if diffs:
        raise StateMismatchError(
            f"{meta_path}: refusing to resume a different run (saved → now): "
            + "; ".join(diffs)
            + ". Start a fresh run (no --resume) or use another --out."
        )
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
