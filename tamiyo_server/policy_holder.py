"""The serving policy behind one indirection, so it can be swapped between batches.

Why: hot reload (issue 5) must replace the policy without touching a batch in flight.
The inference thread reads ``holder.current`` once per batch; a swap is one attribute
assignment (atomic under the GIL), so a batch runs entirely on the old or the new
policy, never on a mix. Every decision carries the version of the policy that made it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from tamiyo.policy.builtin import load_policy
from tamiyo.policy.checkpoint import LoadedPolicy
from tamiyo.policy.engine import InferenceEngine, resolve_device
from tamiyo.policy.features import FEATURE_SCHEMA, FeatureSchema
from tamiyo_server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedPolicy:
    """A warmed-up engine plus where it came from (for GetPolicyInfo and decisions)."""

    engine: InferenceEngine
    version: str
    checkpoint_path: str  # "builtin" for the untrained fallback
    loaded_at: float  # time.time() s
    weights_sha256: str
    training_json: str  # manifest metrics + provenance, JSON
    schema: FeatureSchema
    builtin: bool


def serve_loaded(loaded: LoadedPolicy, device: str, warmup: bool = True) -> ServedPolicy:
    """Wrap a verified ``LoadedPolicy`` in an engine and warm it up (compiles kernels,
    fills the allocator) so the first real batch does not pay for it."""
    engine = InferenceEngine(loaded.model, resolve_device(device), loaded.version)
    if warmup:
        engine.warmup()
    m = loaded.manifest
    training = {
        "metrics": m.get("metrics", {}),
        "provenance": m.get("provenance", {}),
        "algorithm": m.get("metrics", {}).get("algorithm", "")
        if isinstance(m.get("metrics"), dict)
        else "",
    }
    builtin = loaded.path is None
    if builtin:
        training["note"] = (
            "untrained built-in fallback (deterministic seed): no trained checkpoint was "
            "found; decisions are still filtered by the decision rules"
        )
    return ServedPolicy(
        engine=engine,
        version=loaded.version,
        checkpoint_path="builtin" if builtin else str(loaded.path),
        loaded_at=time.time(),
        weights_sha256=str(m.get("weights_sha256", "")),
        training_json=json.dumps(training, sort_keys=True, default=str),
        schema=FEATURE_SCHEMA,
        builtin=builtin,
    )


def load_initial(checkpoint_dir: str, device: str) -> ServedPolicy:
    """The startup policy: ``checkpoint_dir``'s latest, else the bundled default, else
    the built-in fallback (logged loudly, and visible in GetPolicyInfo)."""
    dev = str(resolve_device(device))
    served = serve_loaded(load_policy(checkpoint_dir or None, dev), dev)
    if served.builtin:
        log.warning(
            "no trained checkpoint found; serving the UNTRAINED built-in policy %s",
            served.version,
        )
    else:
        log.info("serving policy %s from %s", served.version, served.checkpoint_path)
    return served


class PolicyHolder:
    """Current policy + reload bookkeeping. ``swap`` may be called from any thread."""

    def __init__(
        self, initial: ServedPolicy, metrics: ServerMetrics | None = None, pinned: bool = False
    ) -> None:
        self.current = initial
        self.pinned = pinned
        self._m = metrics
        self._lock = threading.Lock()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_refused_path = ""
        self.last_refused_reason = ""
        self.last_refused_at = 0.0
        if metrics is not None:
            metrics.set_policy_version(initial.version)
            metrics.reloads.labels("ok").inc(0)
            metrics.reloads.labels("failed").inc(0)

    def swap(self, new: ServedPolicy) -> None:
        """Serve ``new`` from the next batch on."""
        with self._lock:
            self.current = new
            self.reloads_ok += 1
        if self._m is not None:
            self._m.set_policy_version(new.version)
            self._m.reloads.labels("ok").inc()
        log.info("now serving policy %s", new.version)

    def refuse(self, path: str, reason: str) -> None:
        """Count a checkpoint that failed verification; the current policy stays."""
        with self._lock:
            self.reloads_failed += 1
            self.last_refused_path, self.last_refused_reason = path, reason
            self.last_refused_at = time.time()
        if self._m is not None:
            self._m.reloads.labels("failed").inc()
        log.warning("refused checkpoint %s: %s", path, reason)
