"""The TamiyoService servicer: a thin layer between gRPC and the decision pipeline.

It maps outcomes to gRPC status codes and keeps the registry of open streams (for the
concurrent-stream limit and for telling streams to close at shutdown); the work itself
is in ``tamiyo_server.stream`` and ``tamiyo_server.pipeline``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.pipeline import DecisionPipeline, RefusedError
from tamiyo_server.stream import StreamHandler
from tamiyo_server.validation import ValidationError


def _ts(unix_s: float) -> Timestamp:
    t = Timestamp()
    if unix_s > 0:
        t.FromNanoseconds(int(unix_s * 1e9))
    return t


class TamiyoServicer(pb_grpc.TamiyoServiceServicer):
    def __init__(self, pipeline: DecisionPipeline) -> None:
        self.p = pipeline
        self.streams: set[StreamHandler] = set()

    async def StreamTelemetry(  # type: ignore[override]  # coroutine + context.write
        self,
        request_iterator: AsyncIterator[pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse],
    ) -> None:
        if self.p.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        limit = self.p.config.limits.max_concurrent_streams
        if len(self.streams) >= limit:
            self.p.m.rejected.labels("too_many_streams").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{limit} streams already open (limit)"
            )
        handler = StreamHandler(self.p)
        self.streams.add(handler)
        self.p.m.active_streams.inc()
        try:
            await handler.run(request_iterator, context)
        finally:
            self.streams.discard(handler)
            self.p.m.active_streams.dec()

    async def Decide(
        self,
        request: pb.DecideRequest,
        context: grpc.aio.ServicerContext[pb.DecideRequest, pb.DecideResponse],
    ) -> pb.DecideResponse:
        try:
            decision = await self.p.decide_unary(request, context.time_remaining())
        except ValidationError as err:
            self.p.m.rejected.labels(err.reason).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RefusedError as r:
            await context.abort(grpc.StatusCode[r.code], str(r))
        return pb.DecideResponse(decision=decision)

    async def GetPolicyInfo(
        self,
        request: pb.GetPolicyInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetPolicyInfoRequest, pb.GetPolicyInfoResponse],
    ) -> pb.GetPolicyInfoResponse:
        h = self.p.holder
        cur = h.current
        return pb.GetPolicyInfoResponse(
            version=cur.version,
            checkpoint_path=cur.checkpoint_path,
            loaded_at=_ts(cur.loaded_at),
            device=str(cur.engine.device),
            parameter_count=cur.engine.parameter_count,
            feature_schema_version=cur.schema.version,
            features=[
                pb.FeatureSpec(name=n, normalization=z)
                for n, z in zip(cur.schema.names, cur.schema.normalizations, strict=True)
            ],
            weights_sha256=cur.weights_sha256,
            training_json=cur.training_json,
            reloads_ok=h.reloads_ok,
            reloads_failed=h.reloads_failed,
            last_refused_path=h.last_refused_path,
            last_refused_reason=h.last_refused_reason,
            last_refused_at=_ts(h.last_refused_at),
            pinned=h.pinned,
        )
