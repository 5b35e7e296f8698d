"""The TamiyoService servicer: a thin layer between gRPC and the decision pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc


class TamiyoServicer(pb_grpc.TamiyoServiceServicer):
    """Placeholder until the serving pipeline lands: every RPC is registered (so reflection
    lists it) and answers UNIMPLEMENTED with a message saying so."""

    async def StreamTelemetry(
        self,
        request_iterator: AsyncIterator[pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse],
    ) -> AsyncIterator[pb.StreamTelemetryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamTelemetry is not served yet")
        yield pb.StreamTelemetryResponse()  # type: ignore[unreachable]  # makes a generator

    async def Decide(
        self,
        request: pb.DecideRequest,
        context: grpc.aio.ServicerContext[pb.DecideRequest, pb.DecideResponse],
    ) -> pb.DecideResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Decide is not served yet")

    async def GetPolicyInfo(
        self,
        request: pb.GetPolicyInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetPolicyInfoRequest, pb.GetPolicyInfoResponse],
    ) -> pb.GetPolicyInfoResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetPolicyInfo is not served yet")
