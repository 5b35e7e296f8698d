"""``make demo`` end to end, shortened: its own server process, two real training runs,
the plot and the summary where it says."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tamiyo_client import demo
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_server.policy_holder import ServedPolicy

from .conftest import ServerThread


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--steps", "100", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "==== Tamiyo demo summary ====" in printed
    assert "[step " in printed  # decisions were printed as they arrived
    summary = json.loads((tmp_path / "summary.json").read_text())
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # asked at steps 0, 20, 40, 60, 80: each answered by a decision or a shed notice
    assert summary["decisions"] >= 1
    # every 20th of 100 steps asks: answered, shed, or not asked under the server's pushback
    asks = summary["decisions"] + summary["frames_shed"] + summary["decision_requests_deferred"]
    assert asks >= 5
    assert summary["decision_deadline_ms"] == 50
    # every frame was sent or folded into a newer one (latest wins), none lost
    assert summary["frames"]["submitted"] == 100
    assert summary["frames"]["sent"] + summary["frames_coalesced"] == 100
    assert summary["fault_step"] == 50  # half-way through a run shorter than an epoch
    assert summary["adaptations_by_policy"] >= 0
    assert "fault_repaired_at" in summary
    assert "broken block adapted" in printed
    assert "false positives" in printed
    assert summary["stream_errors"] == 0
    assert summary["client_latency_ms"]["p50"] > 0
    # Both runs start from the same weights and see the same data: identical until the
    # first adaptation, and exactly identical if none was applied.
    without, with_ = summary["curves"]["without"], summary["curves"]["with"]
    assert [s for s, _ in without] == [s for s, _ in with_]
    first = min((a["step"] for a in summary["adaptations_applied"]), default=10**9)
    for (step, a), (_, b) in zip(without, with_, strict=True):
        if step <= first:
            assert a == pytest.approx(b, rel=1e-5)


def test_fault_findings_tell_a_repair_from_false_positives() -> None:
    """A kernel into the broken block after the fault is the repair (the first one's
    step); into it before the fault, or into any other layer, a false positive."""
    applied: list[dict[str, object]] = [
        {"step": 40, "layer": "hidden"},  # before the fault: a false positive
        {"step": 262, "layer": "mixer"},  # a healthy layer
        {"step": 270, "layer": "hidden"},
        {"step": 300, "layer": "hidden"},
    ]
    repaired, wrong = demo.fault_findings(applied, "hidden", 250)
    assert repaired == 270
    assert [a["step"] for a in wrong] == [40, 262]
    assert demo.fault_findings(applied[:2], "hidden", 250) == (None, applied[:2])
    assert demo.fault_findings([], "hidden", 250) == (None, [])


def test_a_wrong_token_is_reported_at_once_not_after_the_connect_timeout(
    served_policy: ServedPolicy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QA 16 L1: ``make demo`` with a wrong token waited the whole --connect-timeout-s
    (60 s) before saying UNAUTHENTICATED, which the client knew at once."""
    started: list[float] = []

    class Timed(ProcessTamiyoClient):
        def start(self, wait_connected_s: float = 0.0) -> bool:
            started.append(time.monotonic())
            return super().start(wait_connected_s)

    monkeypatch.setattr(demo, "ProcessTamiyoClient", Timed)
    server = ServerThread(served_policy, auth_token="s3cret-token")
    assert server.server is not None
    threads = torch.get_num_threads()
    timeout_s = 30.0
    try:
        rc = demo.main(
            [
                *("--target", f"127.0.0.1:{server.server.port}", "--token", "wrong-token"),
                *("--steps", "10", "--out", str(tmp_path)),
                *("--connect-timeout-s", str(timeout_s)),
            ]
        )
        took = time.monotonic() - started[0]
    finally:
        torch.set_num_threads(threads)
        server.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert "could not reach Tamiyo" in err
    assert "UNAUTHENTICATED" in err
    assert took < timeout_s / 4, took  # the sidecar's start and one status, not the timeout
