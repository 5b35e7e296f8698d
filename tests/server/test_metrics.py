"""gRPC metrics of a real server: how each RPC ended, including the ends grpc reports
to the server without a status code (a client's cancel, a passed deadline)."""

from __future__ import annotations

import asyncio

import grpc

from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tests.server.test_serving import open_stream


def _handled(server: TamiyoServer, code: str) -> float:
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "tamiyo.v1.TamiyoService",
        "grpc_method": "StreamTelemetry",
        "grpc_code": code,
    }
    return server.metrics.registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


def _all_codes(server: TamiyoServer) -> dict[str, float]:
    return {
        f"{s.labels['grpc_method']}:{s.labels['grpc_code']}": s.value
        for m in server.metrics.registry.collect()
        if m.name == "grpc_server_handled"
        for s in m.samples
        if s.name.endswith("_total")
    }


async def _until_handled(server: TamiyoServer, code: str, timeout_s: float = 10.0) -> None:
    """Wait until one stream has been counted with ``code`` (grpc's done callbacks run
    after the client has seen the end)."""
    for _ in range(int(timeout_s / 0.01)):
        if _handled(server, code) == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no stream counted {code} in time: {_all_codes(server)}")


async def test_a_cancelled_stream_is_counted_cancelled_not_ok(server: TamiyoServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        call.cancel()
        await _until_handled(server, "CANCELLED")
    assert _handled(server, "OK") == 0


async def test_a_stream_past_its_deadline_is_counted_deadline_exceeded(
    server: TamiyoServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = stub.StreamTelemetry(None, timeout=0.5)
        from tests.server import hosts

        await call.write(hosts.session_open(6))
        await call.read()  # accepted; then nothing until the deadline
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until_handled(server, "DEADLINE_EXCEEDED")
    assert _handled(server, "OK") == 0


def test_process_metrics_are_exported(server: TamiyoServer) -> None:
    reg = server.metrics.registry
    assert (reg.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert (reg.get_sample_value("process_open_fds") or 0) > 0
    # a stream's lifetime lands in a finite bucket (the top one used to be 1 s)
    assert 3600.0 in server.metrics.rpc_seconds._upper_bounds


def _literal_reasons() -> tuple[set[str], set[str]]:
    """The reason string literals of every ``ValidationError(...)`` and every
    ``.rejected.labels(...)`` / ``child(....rejected, ...)`` in the server's source."""
    import ast
    from pathlib import Path

    errors: set[str] = set()
    labels: set[str] = set()
    for src in (Path(__file__).resolve().parents[2] / "tamiyo_server").glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            if not isinstance(node, ast.Call):
                continue
            text = ast.unparse(node.func)
            last = node.args[-1] if node.args else None
            if not (isinstance(last, ast.Constant) and isinstance(last.value, str)):
                continue
            if text == "ValidationError" and len(node.args) == 3:
                errors.add(last.value)
            elif text.endswith("rejected.labels") or (
                text == "child" and ast.unparse(node.args[0]).endswith("rejected")
            ):
                labels.add(last.value)
    return errors, labels


def test_every_rejection_reason_is_declared_and_exported_at_zero() -> None:
    """An alert on ``tamiyo_rejected_inputs_total{reason=...}`` needs the label to exist
    before the first refusal (else "no data", not 0), and the metrics reference lists
    the declared values: so every reason the code gives must be declared."""
    from tamiyo_server.graph_validation import VALIDATION_REASONS
    from tamiyo_server.metrics import REJECT_REASONS, ServerMetrics

    errors, labels = _literal_reasons()
    assert errors, "the scan found no ValidationError reasons"
    assert labels >= {"undecodable", "too_many_streams"}
    assert errors <= set(VALIDATION_REASONS)
    assert errors | labels == set(REJECT_REASONS)
    registry = ServerMetrics().registry
    for reason in REJECT_REASONS:
        got = registry.get_sample_value("tamiyo_rejected_inputs_total", {"reason": reason})
        assert got == 0.0, reason


def test_an_undeclared_validation_reason_is_a_programming_error() -> None:
    import pytest

    from tamiyo_server.graph_validation import ValidationError

    with pytest.raises(ValueError, match="not in VALIDATION_REASONS"):
        ValidationError("frame.step", "bad", "no_such_reason")
