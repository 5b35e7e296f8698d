"""The TamiyoService servicer: a thin layer between gRPC and the decision pipeline.

It maps outcomes to gRPC status codes and keeps the registry of open streams (for the
concurrent-stream limit and for telling streams to close at shutdown); the work itself
is in ``tamiyo_server.stream`` and ``tamiyo_server.pipeline``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.decode_queue import RefusedError
from tamiyo_server.pipeline import DecisionPipeline
from tamiyo_server.stream import StreamHandler
from tamiyo_server.validation import ValidationError


def _ts(unix_s: float) -> Timestamp:
    t = Timestamp()
    if unix_s > 0:
        t.FromNanoseconds(int(unix_s * 1e9))
    return t


WARMING_UP = "warming up: the policy is loading; health is NOT_SERVING until it is ready"


class TamiyoServicer(pb_grpc.TamiyoServiceServicer):
    """``pipeline`` is None while the server warms up (port bound, health NOT_SERVING);
    every RPC then answers UNAVAILABLE so clients retry instead of hanging."""

    def __init__(self, pipeline: DecisionPipeline | None = None) -> None:
        self.pipeline = pipeline
        self.streams: set[StreamHandler] = set()

    async def _ready(self, context: grpc.aio.ServicerContext[Any, Any]) -> DecisionPipeline:
        if self.pipeline is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, WARMING_UP)
        assert self.pipeline is not None
        return self.pipeline

    async def StreamTelemetry(  # type: ignore[override]  # coroutine + context.write
        self,
        request_iterator: AsyncIterator[pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse],
    ) -> None:
        p = await self._ready(context)
        if p.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        limit = p.config.limits.max_concurrent_streams
        if len(self.streams) >= limit:
            p.m.rejected.labels("too_many_streams").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{limit} streams already open (limit)"
            )
        handler = StreamHandler(p)
        self.streams.add(handler)
        p.m.active_streams.inc()
        p.door.open_streams += 1
        try:
            await handler.run(request_iterator, context)
        finally:
            self.streams.discard(handler)
            p.m.active_streams.dec()
            p.door.open_streams -= 1

    async def Decide(
        self,
        request: pb.DecideRequest,
        context: grpc.aio.ServicerContext[pb.DecideRequest, pb.DecideResponse],
    ) -> pb.DecideResponse:
        p = await self._ready(context)
        try:
            decision = await p.decide_unary(request, context.time_remaining())
        except ValidationError as err:
            p.m.rejected.labels(err.reason).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RefusedError as r:
            pushback = (("grpc-retry-pushback-ms", str(r.retry_after_ms)),)
            await context.abort(
                grpc.StatusCode[r.code], str(r), pushback if r.retry_after_ms else ()
            )
        return pb.DecideResponse(decision=decision)

    async def GetPolicyInfo(
        self,
        request: pb.GetPolicyInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetPolicyInfoRequest, pb.GetPolicyInfoResponse],
    ) -> pb.GetPolicyInfoResponse:
        pipeline = await self._ready(context)
        h = pipeline.holder
        cur = h.current
        rules = {
            "rules": asdict(pipeline.policy_rules(cur)),
            "from_checkpoint": sorted(
                k for k, _ in cur.serving_rules if k not in pipeline.config.operator_rules
            ),
            "from_operator": sorted(pipeline.config.operator_rules),
        }
        return pb.GetPolicyInfoResponse(
            version=cur.version,
            checkpoint_path=cur.checkpoint_path,
            loaded_at=_ts(cur.loaded_at),
            device=str(cur.engine.device),
            forward=cur.engine.forward_name,
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
            last_refused_at=_ts(h.last_refused_at) if h.last_refused_at else None,  # never
            pinned=h.pinned,
            rules_json=json.dumps(rules, sort_keys=True),
        )
