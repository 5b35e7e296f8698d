"""The generated contracts are fresh and expose the public names DESIGN.md fixes."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _protogen() -> object:
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "tools" / "protogen.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["protogen"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    assert _protogen().stale_files() == []  # type: ignore[attr-defined]


def test_editing_a_proto_without_regenerating_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    protogen = _protogen()
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    health = protos / "tamiyo" / "v1" / "health.proto"
    health.write_text(
        health.read_text().replace(
            "uint32 adaptation_count = 17;", "uint32 adaptation_count = 17;\n  bool extra = 18;"
        )
    )
    monkeypatch.setattr(protogen, "PROTO_ROOT", protos)
    problems = protogen.stale_files()  # type: ignore[attr-defined]
    assert any("health_pb2" in p for p in problems), problems


def test_public_names() -> None:
    from tamiyo.v1 import decision_pb2, graph_pb2, health_pb2, tamiyo_service_pb2

    service = tamiyo_service_pb2.DESCRIPTOR.services_by_name["TamiyoService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"StreamTelemetry", "Decide", "GetPolicyInfo"}
    assert methods["StreamTelemetry"].client_streaming
    assert methods["StreamTelemetry"].server_streaming
    assert not methods["Decide"].client_streaming
    for module, name in [
        (health_pb2, "HealthSignal"),
        (graph_pb2, "ModelGraphState"),
        (decision_pb2, "AdaptationDecision"),
        (tamiyo_service_pb2, "SessionOpen"),
        (tamiyo_service_pb2, "TelemetryFrame"),
        (tamiyo_service_pb2, "DecisionOutcome"),
    ]:
        assert name in module.DESCRIPTOR.message_types_by_name, name
    actions = decision_pb2.AdaptationAction
    assert actions.Value("ADAPTATION_ACTION_NO_OP")
    assert actions.Value("ADAPTATION_ACTION_LOAD_KERNEL")
    oneof = tamiyo_service_pb2.StreamTelemetryRequest.DESCRIPTOR.oneofs_by_name["message"]
    assert {f.name for f in oneof.fields} == {"session_open", "frame", "outcome"}


def test_stubs_are_typed() -> None:
    stubs = list((ROOT / "tamiyo" / "v1").glob("*_pb2.pyi"))
    assert len(stubs) == 4
    assert "class HealthSignal" in (ROOT / "tamiyo" / "v1" / "health_pb2.pyi").read_text()
