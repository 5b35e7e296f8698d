"""Columnar frames (``TelemetryFrame.signal_columns``) end to end, against a real
in-process server on port 0: the same decisions as the message form for the same
signals, and bad columns refused in-stream, naming the column, while the stream goes on."""

from __future__ import annotations

import math

import grpc

from tamiyo.signal_columns import columns_from_signals
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tests.server import hosts

Stream = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


def columnar_frame(n: int, step: int, tag: str = "") -> pb.StreamTelemetryRequest:
    req = hosts.frame(n, step, tag=tag)
    req.frame.signal_columns.CopyFrom(columns_from_signals(req.frame.signals))
    req.frame.ClearField("signals")
    return req


async def _open(stub: pb_grpc.TamiyoServiceAsyncStub, n: int) -> Stream:
    call: Stream = stub.StreamTelemetry(None)
    await call.write(hosts.session_open(n))
    first = await call.read()
    assert isinstance(first, pb.StreamTelemetryResponse)
    assert first.WhichOneof("message") == "session_accepted"
    return call


async def _read(call: Stream) -> pb.StreamTelemetryResponse:
    msg = await call.read()
    assert isinstance(msg, pb.StreamTelemetryResponse)
    return msg


async def test_columnar_and_message_frames_get_the_same_decisions(server: TamiyoServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        cols, msgs = await _open(stub, 8), await _open(stub, 8)
        for step in range(1, 6):
            await cols.write(columnar_frame(8, step, tag=f"c{step}"))
            await msgs.write(hosts.frame(8, step, tag=f"m{step}"))
            a, b = (await _read(cols)).decision, (await _read(msgs)).decision
            assert (a.frame_step, a.frame_request_id) == (step, f"c{step}")
            assert a.layer_scores == b.layer_scores  # the same graph features
            assert (a.action, a.target_layer_id, a.rule) == (b.action, b.target_layer_id, b.rule)
            assert not a.degraded
        await cols.done_writing()
        await msgs.done_writing()


async def test_bad_columns_are_refused_in_stream_and_the_stream_goes_on(
    server: TamiyoServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = await _open(pb_grpc.TamiyoServiceStub(ch), 6)
        step = 10

        async def expect(req: pb.StreamTelemetryRequest, field: str, reason_word: str) -> None:
            nonlocal step
            await call.write(req)
            err = (await _read(call)).error
            assert err.code == pb.STREAM_ERROR_CODE_INVALID_ARGUMENT, err
            assert err.field == field, err
            assert err.message.startswith(f"{field}: "), err
            assert reason_word in err.message, err
            step += 1
            await call.write(columnar_frame(6, step))
            assert (await _read(call)).WhichOneof("message") == "decision"

        nan = columnar_frame(6, step)
        nan.frame.signal_columns.health_score[3] = math.nan
        await expect(nan, "frame.signal_columns.health_score[3]", "not finite")
        short = columnar_frame(6, step)
        del short.frame.signal_columns.gradient_norm[-1]
        await expect(short, "frame.signal_columns.gradient_norm", "expected 6")
        unknown = columnar_frame(6, step)
        unknown.frame.signal_columns.layer_id[4] = "nope"
        await expect(unknown, "frame.signal_columns.layer_id[4]", "unknown layer")
        both = columnar_frame(6, step)
        both.frame.signals.extend(hosts.signals(6, step))
        await expect(both, "frame.signal_columns", "not both")
        await call.done_writing()


async def test_a_failure_deciding_a_frame_answers_it_with_an_internal_error(
    server: TamiyoServer,
) -> None:
    """A bug while building a decision (here: the pipeline raising for one frame) must not
    leave that frame unanswered: the stream gets an INTERNAL error naming the frame and
    the next frame is decided as usual."""
    pipeline = server.pipeline
    assert pipeline is not None
    real = pipeline.decision
    calls: list[int] = []

    def failing_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    pipeline.decision = failing_once  # type: ignore[assignment,method-assign]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            call = await _open(pb_grpc.TamiyoServiceStub(ch), 6)
            await call.write(columnar_frame(6, 1, tag="first"))
            err = (await _read(call)).error
            assert err.code == pb.STREAM_ERROR_CODE_INTERNAL
            assert (err.frame_step, err.frame_request_id) == (1, "first")
            await call.write(columnar_frame(6, 2, tag="second"))
            d = (await _read(call)).decision
            assert (d.frame_step, d.frame_request_id) == (2, "second")
            await call.done_writing()
    finally:
        pipeline.decision = real  # type: ignore[method-assign]
