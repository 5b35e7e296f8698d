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
