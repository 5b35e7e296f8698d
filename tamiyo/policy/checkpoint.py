"""The one checkpoint format: safetensors weights + JSON manifest, written atomically.

Layout of a checkpoint directory ``root``::

    root/<version>/model.safetensors   weights (safetensors: no pickle, no code)
    root/<version>/manifest.json       format, version, model config, feature schemas,
                                       sha256 + size + tensor shapes, metrics, provenance
    root/latest                        text file: the name of the newest <version>

Writing (``save_checkpoint``): both files go to a fresh temp directory inside ``root``,
are fsynced, the directory is renamed to ``<version>`` and ``root`` is fsynced; only then
is ``latest`` replaced atomically (temp file + fsync + ``os.replace`` + fsync). A reader
that follows ``latest`` therefore never sees a half-written checkpoint.

Loading (``load_checkpoint``) verifies manifest format, feature schemas, the sha256 and
size of the weight bytes (hashed from the same bytes that are then parsed), tensor names,
shapes and dtypes, and that every weight is finite; anything else raises
``CheckpointError`` whose message names the reason. ``torch.load`` is never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from tamiyo.config import check_serving_rules
from tamiyo.policy.feature_schema import FEATURE_SCHEMA, KERNEL_SCHEMA, FeatureSchema
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy

FORMAT = "tamiyo-policy-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
# Far above any policy this project trains (~0.1 MB), far below what hurts a server.
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
LATEST = "latest"
LATEST_HISTORY = "latest.history"
"""What ``latest`` named before, newest first (one version per line, the current one
included): where a server starting while ``latest`` is refused goes (``history``)."""
MAX_HISTORY = 32
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MANIFEST_BYTES = 1 << 20


class CheckpointError(Exception):
    """A checkpoint was refused; ``str(err)`` names the path and the reason."""


@dataclass(frozen=True, eq=False)
class LoadedPolicy:
    """A verified policy: model in eval mode on the requested device, and its manifest."""

    model: TamiyoPolicy
    config: PolicyConfig
    version: str
    path: Path | None
    manifest: dict[str, Any]

    @property
    def serving_rules(self) -> dict[str, float]:
        """The decision-rule values the policy was validated with (checked at load)."""
        return check_serving_rules(self.manifest.get("serving_rules", {}))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: str | Path,
    model: TamiyoPolicy,
    config: PolicyConfig | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    version: str | None = None,
    update_latest: bool = True,
    serving_rules: dict[str, float] | None = None,
) -> Path:
    """Write ``model`` as a new checkpoint under ``root``; returns its directory.

    ``version`` defaults to ``<UTC yyyymmddThhmmssZ>-<sha256[:8]>``; it must match
    ``[A-Za-z0-9][A-Za-z0-9._-]*`` (≤ 128 chars) and not exist yet. ``metrics`` and
    ``provenance`` must be JSON-serialisable (non-finite floats are refused).
    ``serving_rules``: the decision-rule values the policy was validated with (names in
    ``tamiyo.config.POLICY_RULES``); a server applies them unless its operator set them.
    """
    rules = check_serving_rules(serving_rules or {})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = config or model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(state, metadata={"format": FORMAT})
    sha = hashlib.sha256(blob).hexdigest()
    if version is None:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{sha[:8]}"
    if not _VERSION_RE.match(version):
        raise ValueError(f"checkpoint version {version!r} must match {_VERSION_RE.pattern}")
    final = root / version
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_unix_s": time.time(),
        "model_config": config.to_dict(),
        "feature_schema": FEATURE_SCHEMA.to_dict(),
        "kernel_feature_schema": KERNEL_SCHEMA.to_dict(),
        "weights_file": WEIGHTS,
        "weights_sha256": sha,
        "weights_bytes": len(blob),
        "tensors": {k: {"shape": list(v.shape), "dtype": _dt(v)} for k, v in state.items()},
        "metrics": metrics or {},
        "provenance": provenance or {},
        "serving_rules": rules,
        "torch_version": torch.__version__,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    tmp = root / f".tmp-{version}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_synced(tmp / WEIGHTS, blob)
        _write_synced(tmp / MANIFEST, text)
        _fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint
        raise
    _fsync_dir(root)
    if update_latest:
        set_latest(root, version)
    return final


def set_latest(root: str | Path, version: str) -> None:
    """Atomically point ``root/latest`` at ``root/<version>``."""
    root = Path(root)
    if not _VERSION_RE.match(version) or not (root / version).is_dir():
        raise ValueError(f"no checkpoint {version!r} in {root}")
    # latest first: a crash before the history is written leaves the history one step
    # behind (the previous latest is then still its head, as it should be); written
    # the other way round it could name a version never published. The previous latest
    # goes in explicitly, so a history a crash left behind catches up here.
    prev = resolve_latest(root)
    older = [prev.name] if prev is not None else []
    names = list(dict.fromkeys([version, *older, *history(root)]))[:MAX_HISTORY]
    for name, data in ((LATEST, version), (LATEST_HISTORY, "\n".join(names))):
        tmp = root / f".latest-{secrets.token_hex(4)}"
        _write_synced(tmp, (data + "\n").encode())
        os.replace(tmp, root / name)
    _fsync_dir(root)


def history(root: str | Path) -> list[str]:
    """The versions ``latest`` has named, newest first (``LATEST_HISTORY``); [] without
    one (a directory published to before the history existed)."""
    try:
        lines = (Path(root) / LATEST_HISTORY).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return []
    return [v for v in lines if _VERSION_RE.match(v)]


def resolve_latest(root: str | Path) -> Path | None:
    """Directory named by ``root/latest``, or None when there is no (valid) pointer."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    if not _VERSION_RE.match(name):
        return None
    path = root / name
    return path if path.is_dir() else None


def prune_versions(root: str | Path, keep: int = 1) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoint versions of ``root``; never ``latest``.

    Only a directory whose name is a version and whose manifest parses as a Tamiyo
    checkpoint is ever deleted: pointed at the wrong directory (a repository, a home
    directory) this removes nothing else. Returns the deleted paths.
    """
    root = Path(root)
    latest = resolve_latest(root)
    found: list[tuple[float, Path]] = []
    for d in root.iterdir() if root.is_dir() else ():
        if not _VERSION_RE.match(d.name) or d.is_symlink() or not d.is_dir() or d == latest:
            continue
        try:
            created = float(read_manifest(d).get("created_unix_s", 0.0))
        except (CheckpointError, TypeError, ValueError):
            continue  # not a checkpoint of ours: leave it alone
        found.append((created, d))
    found.sort()
    doomed = [d for _, d in found[: max(0, len(found) - max(0, keep - (latest is not None)))]]
    for d in doomed:
        shutil.rmtree(d)
    return doomed


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@functools.cache
def _schema_dict(schema: FeatureSchema) -> dict[str, Any]:
    """``schema.to_dict()``, built once (read-only; a reload compares it, ~0.1 ms each)."""
    return schema.to_dict()


def _finite(t: torch.Tensor) -> bool:
    """Every value of a floating tensor is finite. Through numpy for float32 (~5 µs a
    tensor; two torch ops cost ~20 µs and hand the GIL around in a busy server)."""
    if t.dtype == torch.float32 and t.device.type == "cpu":
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _fail(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} refused: {reason}")


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of regular file ``path``. A FIFO or device in place of a
    checkpoint file would block (or never end) a plain read; it raises OSError instead."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check the manifest of checkpoint directory ``path`` (not the weights)."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        raw = _read_regular(mpath, MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _fail(path, f"manifest missing ({MANIFEST})") from None
    except OSError as e:
        raise _fail(path, f"manifest unreadable: {e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _fail(path, "manifest larger than 1 MiB")
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise _fail(path, "manifest is not a JSON object")
    if m.get("format") != FORMAT:
        raise _fail(path, f"manifest format {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path, f"manifest format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for key in ("version", "weights_sha256", "weights_file"):
        if not isinstance(m.get(key), str):
            raise _fail(path, f"manifest field {key!r} missing or not a string")
    if m["weights_file"] != WEIGHTS:
        raise _fail(path, f"manifest weights_file {m['weights_file']!r}, expected {WEIGHTS!r}")
    try:  # (absent in checkpoints written before it existed: the server's rules apply)
        check_serving_rules(m.get("serving_rules", {}))
    except ValueError as e:
        raise _fail(path, f"manifest {e}") from None
    for key, schema in (
        ("feature_schema", FEATURE_SCHEMA),
        ("kernel_feature_schema", KERNEL_SCHEMA),
    ):
        got = m.get(key)
        if not isinstance(got, dict) or got.get("version") != schema.version:
            ver = got.get("version") if isinstance(got, dict) else None
            raise _fail(
                path, f"{key} version {ver!r} does not match this build's {schema.version!r}"
            )
        if got != _schema_dict(schema):
            raise _fail(
                path,
                f"{key} {schema.version!r} differs from this build's (names, "
                "order, normalisation or constants)",
            )
    return m


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    between: Callable[[], object] | None = None,
) -> LoadedPolicy:
    """Load and verify checkpoint directory ``path``; raises ``CheckpointError``.

    ``between``, when given, is called between the steps (read + sha256, parse, model
    build, checks; each ≤ ~1-2 ms of CPU): a server's hot reload passes a function that
    gives the GIL back to the serving threads until they are idle, so the load never
    holds it for long stretches (``tamiyo_server.reload``).
    """
    step = between or (lambda: None)
    path = Path(path)
    m = read_manifest(path)
    try:
        config = PolicyConfig.from_dict(m.get("model_config"))  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError) as e:
        raise _fail(path, f"model_config invalid: {e}") from None
    if (
        config.node_features != FEATURE_SCHEMA.num_features
        or config.kernel_features != KERNEL_SCHEMA.num_features
    ):
        raise _fail(path, "model_config feature widths do not match the feature schema")
    # Size and file type are checked before reading: a huge (or sparse) file must not be
    # read into memory, and a FIFO or device in its place must not block the reload thread.
    try:
        st = (path / WEIGHTS).stat()
    except FileNotFoundError:
        raise _fail(path, f"weights missing ({WEIGHTS})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, f"weights ({WEIGHTS}) is not a regular file")
    if st.st_size > MAX_WEIGHTS_BYTES:
        raise _fail(path, f"weights are {st.st_size} bytes, over the {MAX_WEIGHTS_BYTES} limit")
    if st.st_size != m.get("weights_bytes"):
        raise _fail(
            path,
            f"weights are {st.st_size} bytes, manifest says "
            f"{m.get('weights_bytes')} (truncated or replaced)",
        )
    try:
        blob = _read_regular(path / WEIGHTS, MAX_WEIGHTS_BYTES + 1)
    except OSError as e:
        raise _fail(path, f"weights unreadable: {e}") from None
    if len(blob) != m.get("weights_bytes"):
        raise _fail(
            path,
            f"weights are {len(blob)} bytes, manifest says "
            f"{m.get('weights_bytes')} (truncated or replaced)",
        )
    sha = hashlib.sha256(blob).hexdigest()
    if sha != m["weights_sha256"]:
        raise _fail(
            path,
            f"weights sha256 {sha[:16]}… does not match the manifest ({m['weights_sha256'][:16]}…)",
        )
    step()
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed input
        raise _fail(path, f"weights are not valid safetensors ({e})") from None
    step()
    model = TamiyoPolicy(config)
    step()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise _fail(
            path,
            f"tensor names differ from the model: missing {missing[:5]}, unexpected {extra[:5]}",
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise _fail(
                path,
                f"tensor {name} is {_dt(got)}{list(got.shape)}, model needs "
                f"{_dt(want)}{list(want.shape)}",
            )
        if got.is_floating_point() and not _finite(got):
            raise _fail(path, f"tensor {name} has non-finite values (NaN/inf)")
    step()
    # = load_state_dict(strict=True): names, shapes and dtypes were checked above, so copy
    # straight into the parameters' storage (state_dict() tensors share it) without its
    # module walk (~0.5 ms of a hot reload)
    with torch.no_grad():
        for name, want in expected.items():
            want.copy_(tensors[name])
    if torch.device(device).type != "cpu":  # built on the CPU: no tree walk for nothing
        model.to(device)
    model.eval()
    return LoadedPolicy(model, config, m["version"], path, m)
