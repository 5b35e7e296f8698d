"""Server-wide admission of SessionOpen work (``tamiyo_server.open_admission``, review
15b finding 4): opens take turns within a share of the event loop, an open that would
wait too long is refused with pushback (in-stream for a re-open, the call's status for
a first open), and the real client's reconnect storm against refusals converges.
No assertion on absolute times: shares, orders and outcomes."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from typing import Any, cast

import grpc
import pytest

from tamiyo.config import BatchConfig, ClientConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_client.client import TamiyoClient
from tamiyo_server.app import TamiyoServer
from tamiyo_server.open_admission import OpenAdmission, OpenRefusedError
from tamiyo_server.stream import StreamHandler
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config
from tests.server.test_serving import channel, open_stream, read, read_all
from tests.server.test_stream_contract import _healthy_round_trips, _maximal_open

Code = pb.StreamErrorCode
OPEN = hosts.session_open(6).session_open


def _config(**batch: Any) -> Any:
    cfg = make_config()
    return replace(cfg, batch=replace(cfg.batch, **batch))


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _least_quiet(spans: list[tuple[float, float]], share: float) -> float:
    """The smallest ratio, over consecutive opens, of the time without opens after an
    open to the time it ran, in units of the share's due ``1/share − 1`` (>= 1: every open
    was followed by its quiet time; the spans do not overlap: opens run on one loop)."""
    spans = sorted(spans)
    due = 1.0 / share - 1.0
    return min((b0 - a1) / (due * (a1 - a0)) for (a0, a1), (b0, _) in itertools.pairwise(spans))


# ------------------------------------------------------------------ the admission alone
async def test_opens_take_turns_in_arrival_order_within_their_share_of_the_loop() -> None:
    """Ten opens arrive together: they run one at a time in arrival order, and open work
    takes no more of the loop than the share: each open is followed by its cost ×
    (1/share − 1) without opens."""
    share = 0.2
    adm = OpenAdmission(BatchConfig(open_loop_share=share, max_open_wait_ms=60_000.0))
    order: list[int] = []
    spans: list[tuple[float, float]] = []

    async def one(i: int) -> None:
        async with adm.turn(OPEN):
            t0 = time.perf_counter()
            order.append(i)
            _busy(0.002)
            spans.append((t0, time.perf_counter()))

    await asyncio.gather(*(one(i) for i in range(10)))
    assert order == list(range(10))
    assert _least_quiet(spans, share) >= 0.99
    assert adm.waiting == 0
    assert adm.ahead_s == 0.0


async def test_an_open_that_would_wait_too_long_is_refused_and_a_leaver_frees_its_place() -> None:
    """Past ``max_open_wait_ms`` an open is refused at once with pushback (not queued);
    an open whose stream goes away while it waits takes its estimate out of the queue."""
    adm = OpenAdmission(BatchConfig(open_loop_share=0.5, max_open_wait_ms=50.0))
    adm.free_at = time.monotonic() + 60.0  # a minute of quiet time owed: far too long
    with pytest.raises(OpenRefusedError) as refused:
        async with adm.turn(OPEN):
            raise AssertionError("admitted")
    assert refused.value.retry_after_ms >= BatchConfig().max_pushback_ms
    assert "session_open" in str(refused.value)
    assert adm.waiting == 0

    adm.free_at = time.monotonic() + 0.02  # within the bound: it waits its turn
    entered = asyncio.Event()

    async def waiter() -> None:
        async with adm.turn(OPEN):
            entered.set()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert adm.waiting == 1
    assert adm.ahead_s > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not entered.is_set()
    assert (adm.waiting, adm.ahead_s) == (0, 0.0)
    adm.free_at = 0.0
    async with adm.turn(OPEN):  # the turn is free again
        pass


# ------------------------------------------------------------------ through a server
def _shed(server: TamiyoServer, reason: str) -> float:
    got = server.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": reason})
    return got or 0.0


async def test_streams_reopening_in_a_loop_get_only_their_share_of_the_loop(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six streams re-send a maximal SessionOpen back to back (each is paced per stream
    too); open work, timed around the server's open handler, takes no more than the
    configured share of the loop: each open is followed by its time × (1/share − 1)
    without opens (without the server-wide admission the streams' opens ran back to
    back: 6 streams × 10 opens/s × 2-5 ms = 12-30 % of the loop), and a healthy stream
    gets every decision it asks for meanwhile."""
    share = 0.04
    spans: list[tuple[float, float]] = []
    enough = asyncio.Event()
    real = StreamHandler._open

    def timed(self: StreamHandler, msg: pb.SessionOpen) -> None:
        t0 = time.perf_counter()
        try:
            real(self, msg)
        finally:
            spans.append((t0, time.perf_counter()))
            if len(spans) > 25:
                enough.set()

    monkeypatch.setattr(StreamHandler, "_open", timed)
    # (no refusals here: on a loaded machine the queue of six maximal opens is long)
    server = await make_server(_config(open_loop_share=share, max_open_wait_ms=60_000.0))
    req = _maximal_open()
    stop = asyncio.Event()
    async with channel(server) as ch, channel(server) as ch2:
        healthy = await open_stream(pb_grpc.TamiyoServiceStub(ch2))

        async def loop_opens() -> None:
            call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
            while not stop.is_set():
                await call.write(req)
                m = await read(call)
                assert m.WhichOneof("message") == "session_accepted", m
            await call.done_writing()
            await read_all(call)

        flood = [asyncio.create_task(loop_opens()) for _ in range(6)]
        try:
            await asyncio.wait_for(enough.wait(), 100.0)
            kinds = await _healthy_round_trips(healthy, 1, 10)
        finally:
            stop.set()
            await asyncio.gather(*flood)
        assert kinds == ["decision"] * 10
        await healthy.done_writing()
        await read_all(healthy)
    assert _least_quiet(spans[1:], share) >= 0.99  # (the healthy stream's own open was first)
    assert _shed(server, "open_overload") == 0  # they waited their turns, none too long


async def test_a_refused_reopen_is_answered_in_stream_and_a_refused_first_open_ends_the_call(
    server: TamiyoServer,
) -> None:
    """With open work over its budget: a re-open gets RESOURCE_EXHAUSTED on field
    ``session_open`` with ``retry_after_ms``, and the session in force goes on deciding;
    a fresh stream's first open ends its call RESOURCE_EXHAUSTED with gRPC's
    ``grpc-retry-pushback-ms`` trailer (the client reconnects after its backoff: an
    in-stream error answering its first open would stop it). Both are counted."""
    assert server.pipeline is not None
    opens = server.pipeline.door.opens
    before = _shed(server, "open_overload")
    async with channel(server) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = await open_stream(stub)
        opens.free_at = time.monotonic() + 3600.0  # an hour of open work ahead
        await call.write(hosts.session_open(6))
        err = (await read(call)).error
        assert err.code == Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
        assert err.field == "session_open"
        assert err.retry_after_ms > 0
        assert "stays in force" in err.message
        await call.write(hosts.frame(6, 1, tag="after"))
        assert (await read(call)).decision.frame_request_id == "after"

        fresh = stub.StreamTelemetry(None)
        await fresh.write(hosts.session_open(6))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_all(fresh)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailer = dict(cast("tuple[tuple[str, str], ...]", ended.value.trailing_metadata() or ()))
        assert int(trailer["grpc-retry-pushback-ms"]) > 0

        opens.free_at = 0.0  # the budget is back: opens are admitted again
        await call.write(hosts.session_open(6))
        assert (await read(call)).WhichOneof("message") == "session_accepted"
        await call.done_writing()
        await read_all(call)
    assert _shed(server, "open_overload") == before + 2


@pytest.mark.timeout(120)
async def test_a_reconnect_storm_of_real_clients_converges_through_refusals(
    make_server: ServerFactory,
) -> None:
    """Twenty-four ``TamiyoClient`` hosts connect at once to a server whose open work
    may not wait at all and gets 5 % of the loop: most first opens are refused (call
    status RESOURCE_EXHAUSTED), no client stops (a refusal is not a configuration
    error), and every one gets its session through its backoff."""
    server = await make_server(_config(open_loop_share=0.05, max_open_wait_ms=0.0))
    cfg = ClientConfig(target=f"127.0.0.1:{server.port}", backoff_max_s=0.5)
    clients = [
        TamiyoClient(hosts.session_open(6, host=f"h{i}").session_open, cfg) for i in range(24)
    ]
    try:
        await asyncio.gather(*(c.start() for c in clients))
        ok = await asyncio.gather(*(c.wait_connected(90.0) for c in clients))
        assert all(ok), [c.last_error for c in clients if not c.connected]
        assert not [c.fatal_error for c in clients if c.fatal_error]
        assert _shed(server, "open_overload") > 0  # the storm was refused, then converged
        assert sum(c.stats.connect_failures for c in clients) > 0
    finally:
        await asyncio.gather(*(c.close() for c in clients))


@pytest.mark.timeout(120)
async def test_the_load_generator_retries_refused_first_opens_after_their_pushback(
    make_server: ServerFactory,
) -> None:
    """The serving bench's generator opens all its streams before it measures: a first
    open refused RESOURCE_EXHAUSTED (the server's turns of open work are full) is sent
    again after the ``grpc-retry-pushback-ms`` trailer, not a crash of the whole run."""
    import random as _random

    from tamiyo_client import loadgen

    server = await make_server(
        _config(open_loop_share=0.05, max_open_wait_ms=0.0, min_pushback_ms=5.0)
    )
    rng = _random.Random(0)
    fleet = [loadgen.make_host(rng, i, 4, 16) for i in range(32)]
    plan = loadgen.Plan(mode="closed", streams=32, rate=0.0, warmup_s=0.0, duration_s=0.3,
                        drain_s=2.0)  # fmt: skip
    st = await loadgen.run(f"127.0.0.1:{server.port}", fleet, plan)
    assert st.open_refused > 0  # the burst was refused at first...
    assert _shed(server, "open_overload") == st.open_refused
    assert st.decisions > 0  # ...and every stream opened and was measured
