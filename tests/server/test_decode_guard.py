"""Bytes that are not the request message, on a real server's unary RPCs: a clear
INVALID_ARGUMENT, counted, no traceback in the log; the server goes on."""

from __future__ import annotations

import logging

import grpc
import pytest

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x80"]  # a varint that never ends; a cut length


@pytest.mark.parametrize("raw", GARBAGE)
@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/tamiyo.v1.TamiyoService/Decide", "tamiyo.v1.DecideRequest"),
        ("/tamiyo.v1.TamiyoService/GetPolicyInfo", "tamiyo.v1.GetPolicyInfoRequest"),
    ],
)
async def test_undecodable_unary_request_is_invalid_argument(
    server: TamiyoServer, raw: bytes, method: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    if method.endswith("Decide"):  # also: request_id (field 3) that is not UTF-8
        raw = raw if raw != GARBAGE[1] else b"\x1a\x03\xff\xfe\xfd"
    before = (
        server.metrics.registry.get_sample_value(
            "tamiyo_rejected_inputs_total", {"reason": "undecodable"}
        )
        or 0.0
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_unary(method, None, None)  # raw bytes in, raw bytes out
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"request: not a valid {message}" in (err.value.details() or "")
        # the server goes on serving, the same method included
        info = await pb_grpc.TamiyoServiceStub(ch).GetPolicyInfo(pb.GetPolicyInfoRequest())
        assert info.version
    after = server.metrics.registry.get_sample_value(
        "tamiyo_rejected_inputs_total", {"reason": "undecodable"}
    )
    assert after == before + 1
    assert "Traceback" not in caplog.text
    assert "DecodeError" not in caplog.text
