"""The stream's "every request gets an explicit outcome, and the stream goes on", at its
edges (review 15): undecodable bytes, an oversized message, a re-sent SessionOpen (its
replaced session, its pacing, the outcomes of its decisions) and a failure inside the
server. Real in-process servers on port 0; no assertion on absolute times."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import experience_log
from tamiyo_server.app import TamiyoServer
from tamiyo_server.session import Session
from tamiyo_server.stream import REOPEN_INTERVAL_S, StreamHandler
from tests.server import hosts
from tests.server.test_serving import channel, open_stream, read, read_all

Code = pb.StreamErrorCode
METHOD = "/tamiyo.v1.TamiyoService/StreamTelemetry"


class RecordingSink:
    """An experience sink that records what the stream hands it."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.decisions: list[tuple[str, str]] = []  # (session id, decision id)
        self.outcomes: list[tuple[str, str]] = []  # (session id, decision id)

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        self.opened.append(session_id)

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        pass

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        self.decisions.append((session_id, msg.decision_id))

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        self.outcomes.append((session_id, msg.decision_id))

    def close_session(self, session_id: str) -> None:
        self.closed.append(session_id)

    def unary(self, state: graph_pb2.ModelGraphState, msg: Any) -> None:
        pass


def _rejected(server: TamiyoServer, reason: str) -> float:
    got = server.metrics.registry.get_sample_value(
        "tamiyo_rejected_inputs_total", {"reason": reason}
    )
    return got or 0.0


def _raw_stream(ch: grpc.aio.Channel) -> Any:
    """StreamTelemetry with bytes in (any bytes), messages out."""
    return ch.stream_stream(
        METHOD,
        request_serializer=lambda b: b,
        response_deserializer=pb.StreamTelemetryResponse.FromString,
    )(None)


async def _healthy_round_trips(call: Any, first_step: int, count: int) -> list[str]:
    """``count`` frames, one at a time, each waiting for its answer: the kinds."""
    kinds = []
    for step in range(first_step, first_step + count):
        await call.write(hosts.frame(6, step))
        kinds.append(str((await read(call)).WhichOneof("message")))
    return kinds


# ------------------------------------------------------------------ undecodable bytes
async def test_an_undecodable_message_is_refused_in_stream_and_the_stream_goes_on(
    server: TamiyoServer,
) -> None:
    """good / bad UTF-8 / good frames written back to back on one stream: the bad one
    gets INVALID_ARGUMENT (field ``message``), both good ones their decisions, and the
    call ends OK at the half-close; a concurrent healthy stream is served throughout."""
    before = _rejected(server, "undecodable")
    async with channel(server) as ch:
        healthy = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        call = _raw_stream(ch)
        await call.write(hosts.session_open(6).SerializeToString())
        assert (await read(call)).WhichOneof("message") == "session_accepted"
        bad = hosts.frame(6, 2, tag="XX").SerializeToString().replace(b"XX", b"\xff\xfe")
        with pytest.raises(Exception, match="UTF-8"):  # (what protobuf says of it)
            pb.StreamTelemetryRequest.FromString(bad)
        for raw in (
            hosts.frame(6, 1, tag="ok1").SerializeToString(),
            bad,
            hosts.frame(6, 3, tag="ok3").SerializeToString(),
        ):
            await call.write(raw)
        assert await _healthy_round_trips(healthy, 1, 3) == ["decision"] * 3
        await call.done_writing()
        answers = await read_all(call)
        assert await call.code() == grpc.StatusCode.OK
        errors = [m.error for m in answers if m.WhichOneof("message") == "error"]
        decided = [m.decision.frame_request_id for m in answers if m.HasField("decision")]
        assert decided == ["ok1", "ok3"]  # the frame after the bad one too
        (err,) = errors
        assert err.code == Code.STREAM_ERROR_CODE_INVALID_ARGUMENT
        assert err.field == "message"
        assert "not a valid StreamTelemetryRequest" in err.message
        assert await _healthy_round_trips(healthy, 4, 1) == ["decision"]
        await healthy.done_writing()
    assert _rejected(server, "undecodable") == before + 1


# ------------------------------------------------------------------ oversized message
async def test_a_message_over_the_size_limit_ends_only_its_own_stream(
    server: TamiyoServer,
) -> None:
    """gRPC core refuses a message over ``Limits.max_message_bytes`` (4 MiB, set in code)
    before Tamiyo sees it
    and ends that call (documented in the README): the call ends with an error status,
    never OK, no handler is left behind, and a concurrent stream is not disturbed."""
    limit = server.config.limits.max_message_bytes
    async with channel(server) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        healthy = await open_stream(stub)
        call = _raw_stream(ch)
        await call.write(hosts.session_open(6).SerializeToString())
        assert (await read(call)).WhichOneof("message") == "session_accepted"
        big = hosts.frame(6, 1, tag="big")
        big.frame.request_id = "x" * (limit + 1)

        async def send_it() -> None:  # the write fails, or reading the end does
            await call.write(big.SerializeToString())
            await read_all(call)

        with pytest.raises(grpc.aio.AioRpcError):
            await send_it()
        assert await call.code() != grpc.StatusCode.OK
        assert await _healthy_round_trips(healthy, 1, 2) == ["decision"] * 2
        await healthy.done_writing()
        await read_all(healthy)
    assert server.servicer is not None
    for _ in range(200):  # the cut call's handler ends (no leak); bounded wait
        if not server.servicer.streams:
            break
        await asyncio.sleep(0.01)
    assert not server.servicer.streams


# ------------------------------------------------------------------ a bug inside
async def test_an_internal_failure_names_the_frame_it_answers(
    server: TamiyoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame whose handling fails inside the server gets INTERNAL echoing its step and
    request id (a pipelining client knows which frame gets no decision); the stream
    goes on."""
    real = StreamHandler._frame

    def failing(self: StreamHandler, frame: pb.TelemetryFrame) -> None:
        if frame.request_id == "boom":
            raise RuntimeError("a bug")
        real(self, frame)

    monkeypatch.setattr(StreamHandler, "_frame", failing)
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1, tag="boom"))
        err = (await read(call)).error
        assert err.code == Code.STREAM_ERROR_CODE_INTERNAL
        assert (err.frame_step, err.frame_request_id) == (1, "boom")
        await call.write(hosts.frame(6, 2, tag="after"))
        assert (await read(call)).decision.frame_request_id == "after"
        await call.done_writing()


async def test_a_frame_before_session_open_is_refused_naming_the_frame(
    server: TamiyoServer,
) -> None:
    """A frame sent before SessionOpen gets FAILED_PRECONDITION echoing its step and
    request id, like every other frame error (QA N4: it carried neither); an outcome
    then gets the same refusal (no frame to name), and the stream goes on to open."""
    async with channel(server) as ch:
        call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
        await call.write(hosts.frame(6, 7, tag="early"))
        err = (await read(call)).error
        assert err.code == Code.STREAM_ERROR_CODE_FAILED_PRECONDITION
        assert err.field == "session_open"
        assert (err.frame_step, err.frame_request_id) == (7, "early")
        await call.write(pb.StreamTelemetryRequest(outcome=pb.DecisionOutcome(decision_id="d")))
        err = (await read(call)).error
        assert err.code == Code.STREAM_ERROR_CODE_FAILED_PRECONDITION
        assert (err.frame_step, err.frame_request_id) == (0, "")
        await call.write(hosts.session_open(6))
        assert (await read(call)).WhichOneof("message") == "session_accepted"
        await call.write(hosts.frame(6, 8, tag="after"))
        assert (await read(call)).decision.frame_request_id == "after"
        await call.done_writing()
        await read_all(call)
    assert _rejected(server, "no_session") == 2


# ------------------------------------------------------------------ update_session
async def test_outcomes_reach_the_experience_log_under_the_session_that_decided(
    server: TamiyoServer,
) -> None:
    """A re-sent SessionOpen closes the replaced session in the experience log; the
    outcome of a decision that session made, sent after the re-open (the client's
    writer sends re-opens first), is accepted and logged under that session, and one
    for a decision never made is refused NOT_FOUND."""
    assert server.pipeline is not None
    sink = server.pipeline.experience = RecordingSink()
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1))
        old = (await read(call)).decision
        await call.write(hosts.session_open(6))
        assert (await read(call)).WhichOneof("message") == "session_accepted"
        first, second = sink.opened
        assert sink.closed == [first]  # replaced, nothing in flight: closed at once
        # (one with an evaluation in flight: tests/server/test_stream_reopen_log.py)
        assert sink.decisions == [(first, old.decision_id)]
        for decision_id in (old.decision_id, "d-never"):
            await call.write(
                pb.StreamTelemetryRequest(
                    outcome=pb.DecisionOutcome(decision_id=decision_id, applied=True, reward=1)
                )
            )
        err = (await read(call)).error
        assert err.code == Code.STREAM_ERROR_CODE_NOT_FOUND
        assert "d-never" in err.message
        await call.write(hosts.frame(6, 2))
        new = (await read(call)).decision
        await call.write(pb.StreamTelemetryRequest(outcome=pb.DecisionOutcome(
            decision_id=new.decision_id, applied=True)))  # fmt: skip
        await call.done_writing()
        assert await read_all(call) == []
    assert sink.outcomes == [(first, old.decision_id), (second, new.decision_id)]
    assert sink.closed == [first, second]


def _maximal_open(layers: int = 512, edges: int = 4096) -> pb.StreamTelemetryRequest:
    """A valid SessionOpen at the default limits (~96 KB): the costliest to accept."""
    topo = graph_pb2.Topology()
    for i in range(layers):
        topo.layers.add(
            layer_id=f"layer-{i:04d}-" + "x" * 100,
            layer_type=graph_pb2.LAYER_TYPE_LINEAR,
            input_size=64,
            output_size=64,
            parameter_count=4096,
            seed_count=64,
        )
    rnd, seen = random.Random(0), set()
    while len(topo.edges) < edges:
        a, b = rnd.randrange(layers), rnd.randrange(layers)
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            topo.edges.add(source=a, target=b)
    kernels = [graph_pb2.KernelSpec(kernel_id=f"k{i}", parameter_count=100) for i in range(64)]
    return pb.StreamTelemetryRequest(
        session_open=pb.SessionOpen(host_id="h", model_id="m", topology=topo, kernels=kernels)
    )


async def test_a_client_looping_session_open_does_not_starve_other_streams(
    server: TamiyoServer,
) -> None:
    """One client re-sends a maximal SessionOpen back to back, reading every answer;
    meanwhile a healthy stream gets every decision it asks for, and the looping stream
    is paced: its opens are read no faster than one per ``REOPEN_INTERVAL_S`` (a bound
    that follows from the measured span, whatever the machine's speed)."""
    req = _maximal_open()
    accepted: list[float] = []
    stop, under_way = asyncio.Event(), asyncio.Event()
    async with channel(server) as ch, channel(server) as ch2:
        healthy = await open_stream(pb_grpc.TamiyoServiceStub(ch2))

        async def loop_opens() -> None:
            call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
            while not stop.is_set():
                await call.write(req)
                msg = await read(call)
                assert msg.WhichOneof("message") == "session_accepted", msg
                accepted.append(time.monotonic())
                if len(accepted) >= 3:
                    under_way.set()
            await call.done_writing()
            await read_all(call)

        flood = asyncio.create_task(loop_opens())
        try:
            await asyncio.wait_for(under_way.wait(), 60.0)
            kinds = await _healthy_round_trips(healthy, 1, 20)
        finally:
            stop.set()
            await flood
        assert kinds == ["decision"] * 20
        span = accepted[-1] - accepted[0]
        assert len(accepted) - 1 <= span / REOPEN_INTERVAL_S + 1
        await healthy.done_writing()
        await read_all(healthy)


# ------------------------------------------------------------------ experience log
async def test_live_sessions_are_evicted_by_use_and_evictions_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_SESSIONS the log stops tracking the session idle longest, not the one
    opened first (a long-lived stream that keeps sending frames stays logged), and the
    frames of an evicted session are counted as dropped, not lost silently."""
    from tamiyo.config import ExperienceLogConfig
    from tamiyo.policy.rules import DecisionRules
    from tamiyo_server.validation import validate_session_open
    from tests.server.conftest import make_config

    monkeypatch.setattr(experience_log, "MAX_SESSIONS", 2)
    xp = experience_log.ExperienceLog(ExperienceLogConfig(dir=str(tmp_path)), 8)
    try:
        msg = hosts.session_open(4).session_open
        info = validate_session_open(msg, make_config().limits)
        long_lived, idle, newest = (Session.open(msg, info, DecisionRules(), 1.0) for _ in "abc")
        xp.open_session(long_lived.session_id, msg)
        xp.open_session(idle.session_id, msg)
        frame = hosts.frame(4, 1).frame
        long_lived.apply_frame(frame)
        xp.frame(long_lived, frame)  # used since: the idle one is now the oldest
        xp.open_session(newest.session_id, msg)
        dropped = xp.dropped
        frame2 = hosts.frame(4, 2).frame
        long_lived.apply_frame(frame2)
        xp.frame(long_lived, frame2)
        assert xp.dropped == dropped  # still logged
        idle.apply_frame(frame)
        xp.frame(idle, frame)
        assert xp.dropped == dropped + 1  # evicted: counted
        assert xp._dropped.labels("frame", "evicted")._value.get() == 1
    finally:
        xp.close()


async def test_undecodable_bytes_on_another_request_stream_end_it_invalid_argument(
    server: TamiyoServer,
) -> None:
    """A request-streaming method that does not take the markers (reflection) ends
    INVALID_ARGUMENT at the bad message, counted, instead of grpc's UNKNOWN."""
    before = _rejected(server, "undecodable")
    async with channel(server) as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )(iter([b"\x0a\x80"]))  # a cut length
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_all(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _rejected(server, "undecodable") == before + 1


def test_the_garbage_oracle_counts_what_a_stream_owes() -> None:
    """soak.garbage: a stream that ends OK owes an answer to each message that does not
    parse, each SessionOpen and each frame asking for a decision, none to the others."""
    from soak.garbage import answers_owed

    msgs = [
        b"\x0a\x80",  # does not parse
        hosts.session_open(2).SerializeToString(),
        hosts.frame(2, 1).SerializeToString(),
        hosts.frame(2, 2, want=False).SerializeToString(),
        b"",  # empty request: refused
    ]
    assert answers_owed(msgs) == 4
