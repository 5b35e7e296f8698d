"""Large Decide requests at the decode thread's door (review 15, finding 2).

A Decide state over ``OFFLOAD_SIGNALS`` signals is decoded on one thread. Its queue is
bounded: beyond ``BatchConfig.max_decodes`` in flight, or when the predicted wait for
the thread exceeds the request's budget, the request is refused RESOURCE_EXHAUSTED with
pushback at once; a request whose decode used up its budget is answered degraded
without reaching the batcher. Assertions are on answers and counts, never on times.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from typing import Any, cast

import grpc
import pytest

from tamiyo.config import BatchConfig
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import decode_queue
from tamiyo_server.app import TamiyoServer
from tamiyo_server.decode_queue import RefusedError
from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config

LAYERS = 256
STEPS = 9  # 2,304 signals: just over OFFLOAD_SIGNALS, so decoded on the thread


def big_request(steps: int = STEPS) -> pb.DecideRequest:
    state = graph_pb2.ModelGraphState(
        topology=hosts.topology(LAYERS), kernels=hosts.KERNELS, step=steps
    )
    for step in range(1, steps + 1):
        state.signals.extend(hosts.signals(LAYERS, step))
    req = pb.DecideRequest(state=state)
    assert len(req.state.signals) > decode_queue.OFFLOAD_SIGNALS
    return req


def shed(m: ServerMetrics, reason: str) -> float:
    return m.registry.get_sample_value("tamiyo_shed_total", {"reason": reason}) or 0.0


def watch_in_flight(p: DecisionPipeline, seen: list[int]) -> None:
    """Record ``p.decodes.in_flight`` each time the decode thread starts a decode."""
    inner = p.decodes._timed

    def timed(req: pb.DecideRequest) -> tuple[object, float]:
        seen.append(p.decodes.in_flight)
        return inner(req)

    p.decodes._timed = timed  # type: ignore[assignment, method-assign]


async def test_a_flood_of_large_decides_is_bounded_and_healthy_streams_are_served(
    make_server: ServerFactory,
) -> None:
    cap = 3
    cfg = make_config()
    srv: TamiyoServer = await make_server(replace(cfg, batch=replace(cfg.batch, max_decodes=cap)))
    p = srv.pipeline
    assert p is not None
    seen: list[int] = []
    watch_in_flight(p, seen)
    peak = 0
    req = big_request()
    flood = 40
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch2,
    ):
        stub = pb_grpc.TamiyoServiceStub(ch)
        healthy = pb_grpc.TamiyoServiceStub(ch2).StreamTelemetry(None)
        await healthy.write(hosts.session_open(6))
        first = await asyncio.wait_for(healthy.read(), 10.0)
        assert isinstance(first, pb.StreamTelemetryResponse)
        assert first.WhichOneof("message") == "session_accepted"
        calls = [asyncio.ensure_future(stub.Decide(req)) for _ in range(flood)]
        answers: list[str] = []
        step = 0
        while not all(c.done() for c in calls) or step < 5:
            step += 1
            await healthy.write(hosts.frame(6, step))
            msg = await asyncio.wait_for(healthy.read(), 10.0)
            assert isinstance(msg, pb.StreamTelemetryResponse), msg
            answers.append(str(msg.WhichOneof("message")))
            peak = max(peak, p.decodes.in_flight)
        await healthy.done_writing()
        codes: dict[str, int] = {}
        refusals: list[grpc.aio.AioRpcError] = []
        for c in calls:
            err = c.exception()
            if err is None:
                codes["OK"] = codes.get("OK", 0) + 1
                continue
            assert isinstance(err, grpc.aio.AioRpcError), err
            codes[err.code().name] = codes.get(err.code().name, 0) + 1
            refusals.append(err)
    for refused in refusals:
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "decode queue full" in (refused.details() or "")
        trailer = cast("tuple[tuple[str, str], ...]", refused.trailing_metadata() or ())
        assert [k for k, _ in trailer].count("grpc-retry-pushback-ms") == 1
    # every Decide got an explicit answer: a decision or RESOURCE_EXHAUSTED
    assert sum(codes.values()) == flood
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= 1, codes
    assert codes.get("OK", 0) >= 1, codes
    assert max(seen) <= cap, seen
    assert peak <= cap
    assert p.decodes.in_flight == 0
    assert p.decodes.signals == 0
    assert shed(srv.metrics, "queue_full") == codes["RESOURCE_EXHAUSTED"]
    # the healthy stream was answered with a decision for every frame it sent
    assert answers == ["decision"] * step


async def test_a_decide_that_would_wait_past_its_budget_is_refused_before_decoding(
    served_policy: ServedPolicy,
) -> None:
    """The first large Decide is admitted; while it decodes, the predicted wait for the
    next ones (its signals × µs per signal, pinned high here) exceeds their budget."""
    m = ServerMetrics()
    cfg = make_config()
    cfg = replace(cfg, batch=replace(cfg.batch, max_decodes=64, decode_prior_us=1e6))
    p = DecisionPipeline(cfg, PolicyHolder(served_policy, m), m)
    p.start()
    try:
        got = await asyncio.gather(
            *(p.decide_unary(big_request(), None) for _ in range(4)), return_exceptions=True
        )
    finally:
        await p.stop()
    assert not isinstance(got[0], BaseException), got[0]
    assert got[0].policy_version
    for refused in got[1:]:
        assert isinstance(refused, RefusedError), refused
        assert refused.code == "RESOURCE_EXHAUSTED"
        assert refused.retry_after_ms > 0
        assert "more than the" in str(refused)
    assert shed(m, "overload") == 3
    assert shed(m, "queue_full") == 0
    # the measured cost replaced the pinned prior (an estimate that only grew would
    # refuse everything for good)
    assert p.decodes.us_per_signal < 1e6


async def test_a_decode_that_used_up_the_budget_is_answered_degraded_at_once(
    served_policy: ServedPolicy,
) -> None:
    m = ServerMetrics()
    p = DecisionPipeline(make_config(), PolicyHolder(served_policy, m), m)
    p.start()
    budget_s = 0.2
    inner = p._decode

    def slow(req: pb.DecideRequest) -> object:
        snap = inner(req)
        time.sleep(budget_s * 1.5)  # (the decode thread: the loop goes on)
        return snap

    p._decode = slow  # type: ignore[assignment, method-assign]
    submitted: list[object] = []
    submit = p.submit

    def counted(*args: Any) -> Any:
        submitted.append(args)
        return submit(*args)

    p.submit = counted  # type: ignore[assignment, method-assign]
    try:
        d = await p.decide_unary(big_request(), budget_s)
    finally:
        await p.stop()
    assert d.degraded
    assert "[shed: deadline]" in d.reason
    assert submitted == []  # never queued for a batch
    assert shed(m, "deadline") == 1


async def test_cancelled_decides_leave_nothing_counted(served_policy: ServedPolicy) -> None:
    """A client that gives up while its request waits for the thread: the count drops
    when the thread is done with it (dropped unstarted, or decoded and discarded)."""
    m = ServerMetrics()
    p = DecisionPipeline(make_config(), PolicyHolder(served_policy, m), m)
    p.start()
    gate = threading.Event()
    inner = p._decode

    def held(req: pb.DecideRequest) -> object:
        gate.wait(10.0)
        return inner(req)

    p._decode = held  # type: ignore[assignment, method-assign]
    try:
        tasks = [asyncio.ensure_future(p.decide_unary(big_request(), None)) for _ in range(3)]
        for _ in range(2000):  # (all three admitted: each counts before its first await)
            if p.decodes.in_flight == 3:
                break
            await asyncio.sleep(0.005)
        assert p.decodes.in_flight == 3
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert p.decodes.in_flight >= 1  # the running one is still on the thread
        gate.set()
        for _ in range(2000):
            if p.decodes.in_flight == 0:
                break
            await asyncio.sleep(0.005)
        assert p.decodes.in_flight == 0
        assert p.decodes.signals == 0
    finally:
        gate.set()
        await p.stop()


def test_decode_knobs_are_checked() -> None:
    with pytest.raises(ValueError, match="max_decodes"):
        BatchConfig(max_decodes=0)
    with pytest.raises(ValueError, match="decode_prior_us"):
        BatchConfig(decode_prior_us=0.0)
