"""Checkpoint format: atomic writes, the latest pointer, and every refusal reason."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tamiyo.policy.checkpoint import (
    CheckpointError,
    history,
    load_checkpoint,
    prune_versions,
    resolve_latest,
    save_checkpoint,
    set_latest,
)
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy

SMALL = PolicyConfig(hidden=16, kernel_hidden=8, head_hidden=16, gcn_layers=2)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path,
        TamiyoPolicy(SMALL),
        metrics={"loss": 0.5},
        provenance={"seed": 1, "data": ["a.sqlite"]},
        version="v1",
    )


def test_round_trip_and_latest(tmp_path: Path, ckpt: Path) -> None:
    assert resolve_latest(tmp_path) == ckpt
    loaded = load_checkpoint(ckpt)
    assert loaded.version == "v1"
    assert loaded.config == SMALL
    assert loaded.manifest["metrics"] == {"loss": 0.5}
    assert loaded.manifest["provenance"]["seed"] == 1
    torch.manual_seed(0)
    ref = TamiyoPolicy(SMALL).state_dict()
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert not loaded.model.training
    # A second checkpoint moves the pointer; no temp files are left behind.
    second = save_checkpoint(tmp_path, loaded.model, version="v2")
    assert resolve_latest(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "latest.history", "v1", "v2"]
    set_latest(tmp_path, "v1")
    assert resolve_latest(tmp_path) == ckpt
    assert history(tmp_path) == ["v1", "v2"]  # what latest named, newest first, no repeats
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, loaded.model, version="v2")


def test_no_latest(tmp_path: Path) -> None:
    assert resolve_latest(tmp_path) is None
    (tmp_path / "latest").write_text("../etc\n")
    assert resolve_latest(tmp_path) is None


def _refused(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_manifest_refused(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()
    _refused(ckpt, "manifest missing")


def test_garbage_manifest_refused(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text("{not json")
    _refused(ckpt, "not valid JSON")


def test_truncated_weights_refused(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    _refused(ckpt, "truncated")


def test_corrupted_weights_refused(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    _refused(ckpt, "sha256")


def test_missing_weights_refused(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    _refused(ckpt, "weights missing")


def _rewrite(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights with a consistent manifest (hash and size updated)."""
    import hashlib

    blob = safetensors.torch.save(tensors)
    (ckpt / "model.safetensors").write_bytes(blob)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    m["weights_bytes"] = len(blob)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def test_bad_hash_in_manifest_refused(ckpt: Path) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m["weights_sha256"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(m))
    _refused(ckpt, "sha256")


def test_nan_weights_refused(ckpt: Path) -> None:
    t = load_checkpoint(ckpt).model.state_dict()
    t["convs.0.weight"][0, 0] = float("nan")
    _rewrite(ckpt, t)
    _refused(ckpt, r"convs.0.weight has non-finite")


def test_wrong_shapes_refused(ckpt: Path) -> None:
    t = load_checkpoint(ckpt).model.state_dict()
    t["convs.0.weight"] = torch.zeros(3, 3)
    _rewrite(ckpt, t)
    _refused(ckpt, r"tensor convs.0.weight is float32\[3, 3\]")


def test_missing_tensor_refused(ckpt: Path) -> None:
    t = load_checkpoint(ckpt).model.state_dict()
    del t["graph_head.0.bias"]
    _rewrite(ckpt, t)
    _refused(ckpt, "missing .'graph_head.0.bias'")


def test_not_safetensors_refused(ckpt: Path) -> None:
    _rewrite(ckpt, {})
    import hashlib

    blob = b"\x80\x04not a safetensors file, maybe a pickle"
    (ckpt / "model.safetensors").write_bytes(blob)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["weights_sha256"], m["weights_bytes"] = hashlib.sha256(blob).hexdigest(), len(blob)
    (ckpt / "manifest.json").write_text(json.dumps(m))
    _refused(ckpt, "not valid safetensors")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("feature_schema", {"version": "node-v0"}, "feature_schema version 'node-v0'"),
        ("kernel_feature_schema", None, "kernel_feature_schema version None"),
        ("format", "something-else", "manifest format"),
        ("format_version", 99, "format_version"),
        ("model_config", {"hidden": 16, "bogus": 1}, "unknown keys"),
        ("model_config", {"hidden": -1}, "model_config.hidden"),
    ],
)
def test_wrong_manifest_refused(ckpt: Path, key: str, value: object, match: str) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m[key] = value
    (ckpt / "manifest.json").write_text(json.dumps(m))
    _refused(ckpt, match)


def test_schema_names_changed_refused(ckpt: Path) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m["feature_schema"]["names"][0] = "renamed"
    (ckpt / "manifest.json").write_text(json.dumps(m))
    _refused(ckpt, "differs from this build")


def test_bad_version_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must match"):
        save_checkpoint(tmp_path, TamiyoPolicy(SMALL), version="../escape")


def test_no_pickle_or_torch_load_in_policy_package() -> None:
    src = Path(__file__).resolve().parents[2] / "tamiyo" / "policy"
    for f in src.glob("*.py"):
        text = f.read_text()
        assert re.search(r"import pickle|pickle\.(loads?|dumps?)\(", text) is None, f
        assert re.search(r"(?<!safetensors\.)torch\.load\(", text) is None, f


def test_crash_while_writing_leaves_latest_on_the_old_checkpoint(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tamiyo.policy.checkpoint as cp

    real = cp._write_synced

    def crash_on_manifest(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(cp, "_write_synced", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, TamiyoPolicy(SMALL), version="v2")
    assert resolve_latest(tmp_path) == ckpt
    assert not (tmp_path / "v2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "latest.history",
        "v1",
    ]  # temp removed
    assert load_checkpoint(resolve_latest(tmp_path) or ckpt).version == "v1"


def test_huge_weights_file_is_refused_without_reading_it(ckpt: Path) -> None:
    """A sparse 2 GiB file once pushed the loader to 2.3 GB of memory before refusal."""
    weights = ckpt / "model.safetensors"
    weights.unlink()
    with weights.open("wb") as f:
        f.truncate(2 << 30)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match=r"over the .* limit"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["model.safetensors", "manifest.json"])
def test_fifo_in_place_of_a_file_is_refused_not_waited_on(ckpt: Path, name: str) -> None:
    target = ckpt / name
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(CheckpointError, match=r"not a regular file|manifest unreadable"):
        load_checkpoint(ckpt)


def test_prune_deletes_only_old_checkpoint_versions(tmp_path: Path) -> None:
    """Pointed at a directory that holds other things (a repository, say), pruning must
    delete nothing but verified checkpoint versions, and never the one ``latest`` names."""
    model = TamiyoPolicy(SMALL)
    for v in ("v1", "v2", "v3"):
        save_checkpoint(tmp_path, model, version=v)
    (tmp_path / ".git").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "manifest.json").write_text("{}")  # looks like, is not, a checkpoint
    deleted = prune_versions(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["v1"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".git", "latest", "latest.history", "notes", "src", "v2", "v3"]
    assert resolve_latest(tmp_path) == tmp_path / "v3"
    assert prune_versions(tmp_path, keep=1) == [tmp_path / "v2"]
    assert (tmp_path / "src" / "code.py").exists()
