"""The client honours the server's pushback (``StreamError.retry_after_ms``): no decision
is asked on the stream for that long, telemetry keeps flowing. A stub stands in for the
gRPC call to isolate the reader/writer logic (the server side has its own tests)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.client import TamiyoClient
from tamiyo_client.frame_data import FrameData

from .hosts import make_host


class StubCall:
    """Replays ``responses`` to ``read()`` (then EOF); records ``write()`` calls."""

    def __init__(self, responses: list[pb.StreamTelemetryResponse]) -> None:
        self.responses = list(responses)
        self.written: list[pb.StreamTelemetryRequest] = []

    async def read(self) -> object:
        return self.responses.pop(0) if self.responses else None

    async def write(self, req: pb.StreamTelemetryRequest) -> None:
        self.written.append(req)


def refusal(ms: int) -> pb.StreamTelemetryResponse:
    return pb.StreamTelemetryResponse(
        error=pb.StreamError(
            code=pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
            message="overloaded",
            frame_request_id="f1",
            retry_after_ms=ms,
        )
    )


async def written_asks(client: TamiyoClient, call: StubCall, step: int) -> bool:
    """Send one frame asking for a decision; whether it went out still asking."""
    client.send_frame(FrameData(step, 0, [], want_decision=True))
    client._wake.set()
    for _ in range(100):
        await asyncio.sleep(0.001)
        if call.written and call.written[-1].frame.step == step:
            return call.written[-1].frame.want_decision
    raise AssertionError(f"frame {step} was not written")


@pytest.mark.parametrize("retry_ms", [0, 300])
async def test_overload_pushback_pauses_decision_requests(retry_ms: int) -> None:
    _, host = make_host()
    client = TamiyoClient(host.session_open())
    await client.start()  # its connection task fails quietly: nothing listens there
    call = StubCall([refusal(retry_ms)])
    client._live = True
    writer = asyncio.create_task(client._writer(call, 1))  # type: ignore[arg-type]
    try:
        assert await written_asks(client, call, 1)  # before any refusal: asks
        await client._reader(call, 1)  # type: ignore[arg-type]  # the refusal, then EOF
        assert client.stats.frames_shed == 1
        t0 = time.monotonic()
        asked = await written_asks(client, call, 2)
        if retry_ms == 0:  # a plain shed notice: no pause
            assert asked
            assert client.stats.pushbacks == 0
        else:
            assert not asked  # the frame went out, without asking
            assert client.stats.pushbacks == 1
            assert client.stats.decision_requests_deferred == 1
            assert time.monotonic() - t0 < retry_ms / 1000
            await asyncio.sleep(retry_ms / 1000)
            assert await written_asks(client, call, 3)  # the pause is over
        # only frames that asked wait for a decision (and count in latency)
        assert ("f2" in client._sent_at) == (retry_ms == 0)
    finally:
        writer.cancel()
        await client.close()


async def test_outcome_of_an_ended_session_is_dropped_not_sent() -> None:
    """An outcome still queued when its decision's session ended cannot be matched by
    the next session (the server would answer NOT_FOUND): the writer of the new
    connection drops and counts it, and still sends outcomes of its own decisions."""
    _, host = make_host()
    client = TamiyoClient(host.session_open())
    await client.start()
    old = pb.StreamTelemetryResponse()
    old.decision.decision_id = "d-old"
    new = pb.StreamTelemetryResponse()
    new.decision.decision_id = "d-new"
    await client._reader(StubCall([old]), 1)  # type: ignore[arg-type]  # then EOF
    await client._reader(StubCall([new]), 2)  # type: ignore[arg-type]
    client.report_outcome(pb.DecisionOutcome(decision_id="d-old"))
    client.report_outcome(pb.DecisionOutcome(decision_id="d-new"))
    call = StubCall([])
    client._live = True
    writer = asyncio.create_task(client._writer(call, 2))  # type: ignore[arg-type]
    try:
        client._wake.set()
        for _ in range(200):
            await asyncio.sleep(0.001)
            if call.written:
                break
        assert [w.outcome.decision_id for w in call.written] == ["d-new"]
        assert client.stats.outcomes_dropped == 1
        assert client.stats.outcomes_sent == 1
    finally:
        writer.cancel()
        await client.close()
