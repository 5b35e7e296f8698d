"""Disk-side faults: a checkpoint directory filled with garbage while serving, and a full
disk under the experience store.

Both run a real server process with a healthy stream through it; decisions must keep
flowing (no error, nothing lost), the server must not exit, and each fault must be
*counted* (refused reloads, lost log rows), never silent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from soak.harness import HealthyStream
from soak.proc import ServerProcess
from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.checkpoint import save_checkpoint
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc

POLL_WAIT_S = 2.5  # > 2 poll intervals (1 s default): the watcher has seen each fault
DISK_LIMIT_BYTES = 2 * 1024 * 1024  # RLIMIT_FSIZE of the disk-full server


def _policy_info(target: str) -> pb.GetPolicyInfoResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.TamiyoServiceStub(ch).GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=10)


def _point(root: Path, content: bytes) -> None:
    """Replace ``latest`` atomically with arbitrary bytes (as a hostile writer might)."""
    tmp = root / f".soak-latest-{time.monotonic_ns()}"
    tmp.write_bytes(content)
    os.replace(tmp, root / "latest")


def _clone(root: Path, good: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    for f in good.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _rehash(d: Path) -> None:
    """Make the manifest agree with whatever the weights now are (hash and size)."""
    w = (d / "model.safetensors").read_bytes()
    m = json.loads((d / "manifest.json").read_text())
    m["weights_sha256"], m["weights_bytes"] = hashlib.sha256(w).hexdigest(), len(w)
    (d / "manifest.json").write_text(json.dumps(m))


def _garbage(root: Path, good: Path, marker: Path) -> list[tuple[str, Callable[[], bytes]]]:
    """Each entry: a fault name and a function that plants it, returning what ``latest``
    should then contain."""

    def junk_files() -> bytes:
        for i in range(50):
            (root / f"junk-{i}.bin").write_bytes(os.urandom(4096))
        (root / "latest.tmp").write_bytes(os.urandom(64))
        return (good.name + "\n").encode()  # pointer unchanged: junk must be ignored

    def dir_with(name: str, mutate: Callable[[Path], None]) -> Callable[[], bytes]:
        def plant() -> bytes:
            mutate(_clone(root, good, name))
            return (name + "\n").encode()

        return plant

    def emptied(d: Path) -> None:
        for f in d.iterdir():
            f.unlink()

    def bad_json(d: Path) -> None:
        (d / "manifest.json").write_text("{not json")

    def wrong_format(d: Path) -> None:
        (d / "manifest.json").write_text(json.dumps({"format": "pytorch", "version": 1}))

    def huge_manifest(d: Path) -> None:
        (d / "manifest.json").write_bytes(b" " * (2 << 20) + b"{}")

    def pickle_weights(d: Path) -> None:
        (d / "model.safetensors").write_bytes(f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode())
        _rehash(d)

    def truncated(d: Path) -> None:
        w = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(w[: len(w) // 2])

    def random_weights(d: Path) -> None:
        (d / "model.safetensors").write_bytes(os.urandom(100_000))
        _rehash(d)

    def no_weights(d: Path) -> None:
        (d / "model.safetensors").unlink()

    def weights_is_dir(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()

    def nan_weights() -> bytes:
        pol = builtin_policy()
        with torch.no_grad():
            next(pol.model.parameters()).fill_(float("nan"))
        save_checkpoint(root, pol.model, pol.config, {}, {}, version="g-nan", update_latest=False)
        return b"g-nan\n"

    return [
        ("junk files beside the checkpoints", junk_files),
        ("latest = binary junk", lambda: os.urandom(300)),
        ("latest = path escape", lambda: b"../../../../etc\n"),
        ("latest = missing version", lambda: b"no-such-version\n"),
        ("latest = empty", lambda: b""),
        ("empty checkpoint dir", dir_with("g-empty", emptied)),
        ("manifest not JSON", dir_with("g-badjson", bad_json)),
        ("manifest wrong format", dir_with("g-format", wrong_format)),
        ("manifest 2 MiB", dir_with("g-huge", huge_manifest)),
        ("weights = code-running pickle", dir_with("g-pickle", pickle_weights)),
        ("weights truncated", dir_with("g-trunc", truncated)),
        ("weights random bytes", dir_with("g-random", random_weights)),
        ("weights missing", dir_with("g-noweights", no_weights)),
        ("weights is a directory", dir_with("g-dir", weights_is_dir)),
        ("NaN weights", nan_weights),
    ]


def checkpoint_garbage(log_dir: Path, work: Path) -> dict[str, Any]:
    """Serve from a checkpoint directory, fill it with garbage (one fault per poll
    window), then publish a good new version: the old policy must serve throughout, each
    refusal be counted, and the good version be picked up."""
    root = work / "checkpoints"
    marker = work / "pwned"
    pol = builtin_policy()
    good = save_checkpoint(root, pol.model, pol.config, {"soak": 1}, {}, version="good-1")
    srv = ServerProcess("checkpoint-garbage", ["--checkpoint-dir", str(root)], log_dir=log_dir)
    srv.start()
    out: dict[str, Any] = {"scenario": "checkpoint dir garbage"}
    violations: list[str] = []
    h = HealthyStream(srv.target).start()
    faults = _garbage(root, good, marker)
    try:
        h.wait_decisions("before", 200)
        before = _policy_info(srv.target)
        h.phase = "storm"
        for name, plant in faults:
            _point(root, plant())
            time.sleep(POLL_WAIT_S)
            info = _policy_info(srv.target)
            if info.version != before.version:
                violations.append(f"{name}: policy changed to {info.version}")
            srv.check()
        refused = _policy_info(srv.target)
        out["reloads_failed"] = refused.reloads_failed - before.reloads_failed
        out["last_refused_reason"] = refused.last_refused_reason[:160]
        good2 = save_checkpoint(root, pol.model, pol.config, {"soak": 2}, {}, version="good-2")
        t0 = time.monotonic()
        while _policy_info(srv.target).version != good2.name and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        out["good_version_picked_up_s"] = round(time.monotonic() - t0, 2)
        if _policy_info(srv.target).version != good2.name:
            violations.append("the good checkpoint after the garbage was never loaded")
        h.phase = "after"
        h.wait_decisions("after", 50)
    finally:
        st = h.stop()
        srv.check()
        out["server_crashes"] = srv.unexpected_exits + (0 if srv.alive else 1)
        srv.stop()
    out["faults_injected"] = len(faults)
    # "junk files" and "latest = <junk>" need not count as reloads (nothing to load).
    if out.get("reloads_failed", 0) < 10:
        violations.append(f"only {out.get('reloads_failed')} refusals counted for {len(faults)}")
    if marker.exists():
        violations.append("a checkpoint ran code")
    out.update(_healthy(st, violations))
    out["violations"] = violations
    return out


def _healthy(st: Any, violations: list[str]) -> dict[str, Any]:
    if st.errors:
        violations.append(f"healthy stream: {len(st.errors)} errors: {st.errors[0]}")
    if st.lost:
        violations.append(f"healthy stream lost {st.lost} decisions")
    return {
        "decisions_lost": st.lost,
        "healthy_late_over_2s": st.late,
        "healthy_shed": st.shed,
        "healthy_p99_before_ms": round(st.p("before", 99), 2),
        "healthy_p99_storm_ms": round(st.p("storm", 99), 2),
        "healthy_decisions": st.decisions,
    }


def disk_full(log_dir: Path, work: Path, seconds: float = 10.0) -> dict[str, Any]:
    """Serve with the experience store on a 'disk' of ``DISK_LIMIT_BYTES`` (RLIMIT_FSIZE)
    and hosts with 64-layer graphs until writes fail; decisions must go on, the loss be
    counted, shutdown still be clean, and the store file stay intact."""
    exp = work / "experience-full"
    srv = ServerProcess(
        "disk-full",
        ["--experience-dir", str(exp), "--flush-interval-s", "0.2"],
        log_dir=log_dir,
        fsize_limit_bytes=DISK_LIMIT_BYTES,
        watch={"write_failed": r"experience store write failed; (\d+) records lost"},
    )
    srv.start()
    out: dict[str, Any] = {"scenario": "experience disk full"}
    violations: list[str] = []
    hs = [HealthyStream(srv.target, n_layers=64).start() for _ in range(2)]
    try:
        hs[0].wait_decisions("before", 100)
        for h in hs:
            h.phase = "storm"
        t0 = time.monotonic()
        while srv.counts["write_failed"] == 0 and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        out["s_until_disk_full"] = round(time.monotonic() - t0, 1)
        time.sleep(seconds)  # serve on a full disk
        srv.check()
        out["log_rows_lost"] = srv.sums["write_failed"]
        out["log_write_failures"] = srv.counts["write_failed"]
        drops = "tamiyo_experience_dropped_total"
        out["queue_drops"] = srv.metric(drops, reason="buffer_full")
        # The loss must be in the metric an operator alerts on, with a disk reason.
        out["metric_rows_lost_disk_full"] = srv.metric(drops, kind="row", reason="disk_full")
        out["metric_rows_lost_other"] = sum(
            srv.metric(drops, kind="row", reason=r) for r in ("io_error", "write_error")
        )
        for h in hs:
            h.phase = "after"
        hs[0].wait_decisions("after", 20)
    finally:
        stats = [h.stop() for h in hs]
        srv.check()
        out["server_crashes"] = srv.unexpected_exits + (0 if srv.alive else 1)
        code = srv.stop()
    out["shutdown_exit_code"] = code
    if code != 0:
        violations.append(f"shutdown on a full disk exited {code}")
    if out.get("log_write_failures", 0) == 0:
        violations.append("the disk never filled (no write failure seen)")
    elif out.get("metric_rows_lost_disk_full", 0) == 0:
        violations.append("rows lost on the full disk are not in tamiyo_experience_dropped_total")
    files = sorted(exp.glob("*.sqlite"))
    integrity = []
    for f in files:
        with contextlib.closing(sqlite3.connect(f)) as conn:
            integrity.append(conn.execute("PRAGMA integrity_check").fetchone()[0])
    out["store_integrity"] = integrity
    if any(x != "ok" for x in integrity):
        violations.append(f"store damaged by the full disk: {integrity}")
    out["faults_injected"] = 1
    merged = _healthy(stats[0], violations)
    second = _healthy(stats[1], violations)
    for key in ("decisions_lost", "healthy_late_over_2s", "healthy_shed", "healthy_decisions"):
        merged[key] += second[key]
    out.update(merged)
    out["violations"] = violations
    return out
