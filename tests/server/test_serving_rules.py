"""The decision rules a checkpoint declares (its manifest's ``serving_rules``) are the
ones its outputs are decided by, on a stream opened before the reload too, unless the
operator set them; GetPolicyInfo says which are in force and from where."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tamiyo.config import RuleConfig
from tamiyo.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb

from . import hosts
from .test_reload import ClientFactory, connect, model, watching
from .test_serving import Stream

__all__ = ["connect"]  # (the fixture, used by name)

POLICY = decision_pb2.DECISION_RULE_POLICY
VETO = decision_pb2.DECISION_RULE_HEALTH_THRESHOLD


def eager(root: Path, version: str, **serving_rules: float) -> Path:
    """A policy that always wants to adapt (no-op logit -50), with ``serving_rules``."""
    m = model(1)
    head = m.graph_head[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias[0] = -50.0
    return save_checkpoint(root, m, version=version, serving_rules=serving_rules or None)


def healthy_frame(step: int) -> pb.StreamTelemetryRequest:
    """Every layer at health 0.95: the default health veto (0.6) refuses any repair."""
    frame = pb.TelemetryFrame(
        step=step, signals=hosts.signals(6, step, sick=-1), want_decision=True
    )
    return pb.StreamTelemetryRequest(frame=frame)


async def decided(call: Stream, step: int) -> decision_pb2.AdaptationDecision:
    await call.write(healthy_frame(step))
    resp = await asyncio.wait_for(call.read(), 10.0)
    assert isinstance(resp, pb.StreamTelemetryResponse)
    assert resp.WhichOneof("message") == "decision", resp
    return resp.decision


async def test_the_rules_follow_the_policy_across_a_reload(
    tmp_path: Path, connect: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    eager(tmp_path, "v1")  # declares nothing: the server's rules (health veto 0.6)
    c = await connect(watching(tmp_path))
    info = json.loads((await c.info()).rules_json)
    assert (info["rules"]["health_threshold"], info["from_checkpoint"]) == (0.6, [])
    call = c.stub.StreamTelemetry(None)
    await call.write(hosts.session_open(6))
    first = await call.read()
    assert isinstance(first, pb.StreamTelemetryResponse)
    assert first.WhichOneof("message") == "session_accepted"
    d = await decided(call, 1)
    assert (d.action, d.rule, d.policy_version) == (
        decision_pb2.ADAPTATION_ACTION_NO_OP,
        VETO,
        "v1",
    )

    eager(tmp_path, "v2", health_threshold=1.0)  # validated with the veto off
    assert await c.swapped() == "v2"
    d = await decided(call, 2)  # the same stream, opened under v1
    assert (d.action, d.rule, d.policy_version) == (
        decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL,
        POLICY,
        "v2",
    )
    info = json.loads((await c.info()).rules_json)
    assert info["rules"]["health_threshold"] == 1.0
    assert (info["from_checkpoint"], info["from_operator"]) == (["health_threshold"], [])
    # A reload that changes the rules in force says so in the log (an operator must see
    # the veto go off, e.g. when a trained checkpoint replaces the bundled default).
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "v2 declares serving_rules health_threshold 1 (v1 declared none)" in m for m in warned
    ), warned
    await call.done_writing()


async def test_the_operators_rule_wins_over_the_checkpoints(
    tmp_path: Path, connect: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    eager(tmp_path, "v1", health_threshold=1.0)
    rules = replace(RuleConfig(), health_threshold=0.7)
    c = await connect(
        watching(tmp_path, rules=rules, operator_rules=frozenset({"health_threshold"}))
    )
    call = c.stub.StreamTelemetry(None)
    await call.write(hosts.session_open(6))
    await call.read()
    assert (await decided(call, 1)).rule == VETO
    info = json.loads((await c.info()).rules_json)
    assert info["rules"]["health_threshold"] == 0.7
    assert (info["from_checkpoint"], info["from_operator"]) == ([], ["health_threshold"])
    eager(tmp_path, "v2")  # declares nothing: but the rule in force is the operator's
    assert await c.swapped() == "v2"
    assert (await decided(call, 2)).rule == VETO
    assert not [r for r in caplog.records if "declares serving_rules" in r.getMessage()]
    await call.done_writing()


def test_the_manifest_refuses_rules_it_cannot_declare(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"max_adaptations_per_epoch: not one of"):
        save_checkpoint(tmp_path, model(1), serving_rules={"max_adaptations_per_epoch": 3})
    with pytest.raises(ValueError, match=r"health_threshold: 2 is not a number in \[0, 1\]"):
        save_checkpoint(tmp_path, model(1), serving_rules={"health_threshold": 2})
    good = eager(tmp_path, "ok", health_threshold=1.0)
    assert load_checkpoint(good).serving_rules == {"health_threshold": 1.0}
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["serving_rules"] = {"health_threshold": "off"}
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"serving_rules\.health_threshold: 'off'"):
        load_checkpoint(good)
