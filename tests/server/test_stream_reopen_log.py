"""A re-sent SessionOpen and the experience log (review 15b, finding 2): a replaced
session ends in the log only after its in-flight evaluation is answered, so the decision
is stored under it and its outcome joins it; the same when the stream dies with an
evaluation running. Batches run on the inference thread behind a gate, so an evaluation
is held in flight deterministically (no timing)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience import ExperienceReader
from tamiyo.experience.schema import OutcomeRecord
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tamiyo_server.experience_assembler import Assembler
from tamiyo_server.experience_events import (
    DecisionEvent,
    EndEvent,
    FrameEvent,
    OutcomeEvent,
    Resync,
)
from tamiyo_server.experience_log import ExperienceLog
from tamiyo_server.session import Session
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config
from tests.server.test_serving import channel, read, read_all


class Gate:
    """Holds every batch inside the runner while closed; ``entered`` is set when a batch
    reaches it."""

    def __init__(self, server: TamiyoServer) -> None:
        assert server.pipeline is not None
        self.executor = server.pipeline.batcher.executor
        self.real = self.executor.runner
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.executor.runner = self._run

    def _run(self, payloads: Sequence[Any]) -> Sequence[Any]:
        self.entered.set()
        self.open.wait(30.0)
        return self.real(payloads)

    async def close_and_wait_for_a_batch(self, call: Any, frame: pb.StreamTelemetryRequest) -> None:
        """Close the gate, write ``frame``, and return once its batch is held."""
        self.open.clear()
        self.entered.clear()
        await call.write(frame)
        assert await asyncio.to_thread(self.entered.wait, 30.0)


def _thread_config(**over: Any) -> Any:
    cfg = make_config(**over)
    return replace(cfg, batch=replace(cfg.batch, run_on="thread"))


def _outcome(decision_id: str, reward: float) -> pb.StreamTelemetryRequest:
    return pb.StreamTelemetryRequest(
        outcome=pb.DecisionOutcome(decision_id=decision_id, applied=True, reward=reward)
    )


async def test_a_decision_in_flight_across_a_reopen_is_stored_and_its_outcome_joins_it(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """The real experience log (its process, the assembler, the store): frame f2's
    evaluation is running when the host re-sends SessionOpen. Its decision is stored
    under the replaced session (it was counted "unmatched" and lost: the session's end
    reached the assembler first), the outcome the host sends after the re-open joins
    it, and nothing is unmatched."""
    xp = replace(ExperienceLogConfig(), dir=str(tmp_path), flush_interval_s=0.1)
    server = await make_server(_thread_config(experience=xp))
    gate = Gate(server)
    async with channel(server) as ch:
        call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
        await call.write(hosts.session_open(6))
        first = (await read(call)).session_accepted.session_id
        await call.write(hosts.frame(6, 1, tag="f1"))
        d1 = (await read(call)).decision
        await gate.close_and_wait_for_a_batch(call, hosts.frame(6, 2, tag="f2"))
        await call.write(hosts.session_open(6))  # update_session while f2 is in flight
        second = (await read(call)).session_accepted.session_id
        gate.open.set()
        d2 = (await read(call)).decision
        assert d2.frame_request_id == "f2"
        await call.write(_outcome(d2.decision_id, 0.5))
        await call.write(hosts.frame(6, 3, tag="f3"))
        d3 = (await read(call)).decision
        await call.done_writing()
        assert await read_all(call) == []
    assert server.pipeline is not None
    log = server.pipeline.experience
    assert isinstance(log, ExperienceLog)
    assert await asyncio.to_thread(log.flush, 30.0)
    assert log.unmatched == 0
    store = ExperienceReader([tmp_path])
    sessions = {d.decision_id: d.session_id for d in store.decisions()}
    assert sessions == {d1.decision_id: first, d2.decision_id: first, d3.decision_id: second}
    out = store.outcome(d2.decision_id)
    assert out is not None
    assert (out.reward, out.reward_source) == (0.5, "client")


class OrderSink:
    """An experience sink that records the order of what the stream hands it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []  # (what, session id)

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        self.events.append(("open", session_id))

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        pass

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        self.events.append(("decision", session_id))

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        self.events.append(("outcome", session_id))

    def close_session(self, session_id: str) -> None:
        self.events.append(("close", session_id))

    def unary(self, state: graph_pb2.ModelGraphState, msg: Any) -> None:
        pass

    def closed(self) -> list[str]:
        return [sid for what, sid in self.events if what == "close"]

    def check_order(self) -> None:
        """Each session is closed once, and after everything logged under it."""
        for sid in self.closed():
            mine = [what for what, s in self.events if s == sid]
            assert mine.count("close") == 1, (sid, mine)
            assert mine[-1] == "close", (sid, mine)


async def _until(cond: Any) -> None:
    for _ in range(1000):  # bounded: 10 s
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_reopens_in_a_row_and_a_stream_that_dies_end_each_session_after_its_decision(
    make_server: ServerFactory,
) -> None:
    """Session A's evaluation is held when B replaces it, and B's is queued when C
    replaces B: neither ends in the log until its own decision is logged (A and B stay
    open meanwhile, a session with nothing in flight ends at once). Then a stream that
    dies (client cancels) with its evaluation held: its session ends only after that
    decision."""
    server = await make_server(_thread_config())
    assert server.pipeline is not None
    sink = server.pipeline.experience = OrderSink()
    gate = Gate(server)
    async with channel(server) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = stub.StreamTelemetry(None)
        await call.write(hosts.session_open(6))
        a = (await read(call)).session_accepted.session_id
        await gate.close_and_wait_for_a_batch(call, hosts.frame(6, 1, tag="a1"))
        await call.write(hosts.session_open(6))
        b = (await read(call)).session_accepted.session_id
        await call.write(hosts.frame(6, 2, tag="b2"))  # queued behind the held batch
        await call.write(hosts.session_open(6))
        c = (await read(call)).session_accepted.session_id
        assert sink.closed() == []  # A and B each have an evaluation in flight
        gate.open.set()
        answers = {(await read(call)).decision.frame_request_id for _ in range(2)}
        assert answers == {"a1", "b2"}
        await _until(lambda: len(sink.closed()) == 2)
        assert set(sink.closed()) == {a, b}
        await call.write(hosts.session_open(6))  # nothing in flight: C ends at once
        d = (await read(call)).session_accepted.session_id
        assert sink.closed()[-1] == c
        await call.done_writing()
        assert await read_all(call) == []
        assert sink.closed()[-1] == d

        dying = stub.StreamTelemetry(None)
        await dying.write(hosts.session_open(6))
        e = (await read(dying)).session_accepted.session_id
        await gate.close_and_wait_for_a_batch(dying, hosts.frame(6, 1, tag="e1"))
        dying.cancel()
        assert server.servicer is not None
        await _until(lambda: not server.servicer.streams)
        assert e not in sink.closed()  # its decision is still to come
        gate.open.set()
        await _until(lambda: e in sink.closed())
    assert ("decision", e) in sink.events
    sink.check_order()


def test_an_outcome_after_its_sessions_end_keeps_the_next_state_of_the_end() -> None:
    """The host re-sends SessionOpen, then the outcome of the replaced session's last
    decision: the session's end (with the state after its last frame) reaches the
    assembler first. The outcome's record carries that next state and the client's
    reward; written alone it replaced the end's record in the store and the transition
    was lost."""
    n = 4
    msg = hosts.session_open(n).session_open
    asm = Assembler(8, ExperienceLogConfig(), Path("/nonexistent-unused"))
    frames = {k: hosts.frame(n, k, tag=f"t{k}").frame for k in (1, 2)}
    decision = decision_pb2.AdaptationDecision(
        decision_id="d1",
        action=decision_pb2.ADAPTATION_ACTION_NO_OP,
        propensity=1.0,
        frame_step=1,
        frame_request_id="t1",
    )
    evs: list[object] = [Resync("s", "h", msg.topology, tuple(msg.kernels), 0, None)]
    evs += [FrameEvent("s", 1, frames[1]), DecisionEvent("s", decision, 1.0)]
    evs += [FrameEvent("s", 2, frames[2]), EndEvent("s", 2.0)]
    client = pb.DecisionOutcome(decision_id="d1", applied=False, reward=0.25)
    out = asm.prepare([*evs, OutcomeEvent("s", client, 3.0)])
    ends = [r for r in out if isinstance(r, OutcomeRecord)]
    assert len(ends) == 2  # the end's, then the client's (it replaces the first in the store)
    end, last = ends
    assert end.next_state is not None
    assert last.next_state == end.next_state
    assert (last.reward, last.reward_source, last.applied) == (0.25, "client", False)
    assert not asm.ended  # taken: nothing kept for it
    again = asm.prepare([OutcomeEvent("s", client, 4.0)])  # a duplicate: alone
    assert isinstance(again[0], OutcomeRecord)
    assert again[0].next_state is None
