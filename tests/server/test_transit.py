"""Transit waits from ``TelemetryFrame.client_clock_us``: the estimator on its own
(properties over arbitrary clocks) and the door of a real in-process server."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tamiyo.config import BatchConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tamiyo_server.transit import TransitClock
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config
from tests.server.test_serving import channel, open_stream, read

# Frames as (gap since the previous one on the server, s; extra wait in transit, s).
_frames = st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 2.0)), min_size=1, max_size=40)


def _waits(
    frames: list[tuple[float, float]],
    offset_us: int = 0,
    rate: float = 1.0,
    drift_ppm: float = 0.0,
    believable_s: float = math.inf,
) -> list[float]:
    """Waits the estimator reads for frames asked at client times t (µs, on a clock
    ``offset_us`` ahead of the server's, running ``rate`` times as fast) and read
    ``extra`` s later; the first frame has no extra wait (it sets the baseline)."""
    clock = TransitClock()
    now, out = 100.0, []
    for i, (gap, extra) in enumerate(frames):
        now += gap
        asked = now - (extra if i else 0.0)
        stamp = offset_us + round(asked * rate * 1e6)
        out.append(clock.wait_s(stamp, now, drift_ppm, believable_s))
    return out


@given(_frames, st.integers(-(10**15), 10**15))
def test_the_clocks_offset_does_not_matter(frames: list[tuple[float, float]], off: int) -> None:
    # What a frame waited is read the same whatever the client's clock reads: only
    # differences between a stream's readings count.
    for a, b in zip(_waits(frames, off), _waits(frames, 0), strict=True):
        assert math.isclose(a, b, abs_tol=2e-6)


@given(_frames)
def test_waits_are_read_within_a_microsecond_or_under(frames: list[tuple[float, float]]) -> None:
    # Above the shortest wait seen so far (the first frame's, 0 here): exact to the µs
    # stamp; never more than the truth, never negative.
    got = _waits(frames)
    assert got[0] == 0.0
    for (_, extra), wait in zip(frames[1:], got[1:], strict=True):
        assert 0.0 <= wait <= extra + 1e-6
        assert wait >= extra - 1e-6


@given(st.lists(st.floats(0.0, 60.0), min_size=2, max_size=40), st.floats(-15.0, 15.0))
def test_a_clock_drifting_within_the_allowance_reads_no_wait(gaps: list[float], ppm: float) -> None:
    # A client clock 15 ppm fast or slow, with no transit at all, and a 20 ppm allowance:
    # minutes of drift never read as waiting.
    got = _waits([(g, 0.0) for g in gaps], rate=1.0 + ppm * 1e-6, drift_ppm=20.0)
    assert max(got) <= 1e-6


def test_an_unbelievable_wait_rebases_and_the_next_short_one_restores() -> None:
    clock = TransitClock()
    assert clock.wait_s(1_000_000, 50.0, 0.0, 0.01) == 0.0  # baseline: offset 49 s
    assert math.isclose(clock.wait_s(1_000_000, 50.005, 0.0, 0.01), 0.005, abs_tol=1e-9)
    # a client clock that stepped back by 1 s: not believable here, re-based, read as 0
    assert clock.wait_s(1_000_000, 51.01, 0.0, 0.01) == 0.0
    assert clock.wait_s(1_000_000, 51.012, 0.0, 0.01) > 0.0  # judged from the new base
    # a frame with the old, shorter offset brings the baseline back at once
    assert clock.wait_s(3_000_000, 52.0, 0.0, 0.01) == 0.0
    assert math.isclose(clock.wait_s(3_000_000, 52.004, 0.0, 0.01), 0.004, abs_tol=1e-9)


def _frame(step: int, tag: str, clock_us: int) -> pb.StreamTelemetryRequest:
    req = hosts.frame(6, step, tag=tag)
    req.frame.client_clock_us = clock_us
    return req


async def test_a_frame_that_waited_past_its_budget_is_refused_at_once(
    make_server: ServerFactory,
) -> None:
    # A never-idle server (every wait believed), a 150 ms budget. The host's clock
    # runs from t0; the second frame claims it was asked 400 ms before it was sent.
    batch = replace(make_config().batch, transit_idle_utilization=0.0)
    srv = await make_server(make_config(batch=batch))
    async with channel(srv) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch), decision_deadline_ms=150)
        t0 = time.monotonic()

        def now_us() -> int:
            return 7_000_000 + round((time.monotonic() - t0) * 1e6)

        await call.write(_frame(1, "fresh", now_us()))
        assert (await read(call)).decision.frame_request_id == "fresh"
        await asyncio.sleep(0.05)
        await call.write(_frame(2, "stale", now_us() - 400_000))
        err = (await read(call)).error
        assert err.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
        assert (err.frame_request_id, err.frame_step) == ("stale", 2)
        assert "before it was read" in err.message
        assert "telemetry was recorded" in err.message
        assert err.retry_after_ms > 0
        await call.write(_frame(3, "again", now_us()))
        d = (await read(call)).decision
        assert (d.frame_request_id, d.degraded) == ("again", False)
        await call.done_writing()
    reg = srv.metrics.registry
    assert reg.get_sample_value("tamiyo_shed_total", {"reason": "late"}) == 1
    assert reg.get_sample_value("tamiyo_transit_wait_seconds_count") == 3
    waited = reg.get_sample_value("tamiyo_transit_wait_seconds_sum")
    assert waited is not None
    assert waited >= 0.35


async def test_an_idle_server_does_not_believe_a_long_wait(server: TamiyoServer) -> None:
    # Nothing of this server's can have delayed a frame while it idles: a wait past the
    # budget is the client's clock, re-based (and judged from arrival), not refused.
    p = server.pipeline
    assert p is not None
    assert BatchConfig().transit_idle_utilization > 0.0
    clock = TransitClock()
    p.batcher.utilization = 0.0
    assert p.transit_wait(clock, 1_000_000, 10.0, 0.01) == 0.0
    assert p.transit_wait(clock, 1_000_000, 10.5, 0.01) == 0.0  # idle: re-based
    p.batcher.utilization = 1.0
    assert math.isclose(p.transit_wait(clock, 1_000_000, 10.52, 0.01), 0.02, rel_tol=1e-3)


async def test_the_budget_runs_from_when_the_host_asked(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inference predicted at 80 ms (pinned), a 150 ms budget: a frame read at once makes
    # it; one that already waited 100 ms has 50 ms left and is shed by the batcher.
    batch = replace(make_config().batch, transit_idle_utilization=0.0)
    srv = await make_server(make_config(batch=batch))
    assert srv.pipeline is not None
    cost = srv.pipeline.batcher.cost
    monkeypatch.setattr(cost, "predict_ms", lambda nodes, graphs, safe=True: 80.0)
    monkeypatch.setattr(srv.pipeline.batcher, "backlog_ms", lambda: 0.0)
    async with channel(srv) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch), decision_deadline_ms=150)
        t0 = time.monotonic()

        def now_us() -> int:
            return 7_000_000 + round((time.monotonic() - t0) * 1e6)

        await call.write(_frame(1, "fresh", now_us()))
        assert (await read(call)).decision.degraded is False
        await call.write(_frame(2, "waited", now_us() - 100_000))
        d = (await read(call)).decision
        assert (d.frame_request_id, d.degraded) == ("waited", True)
        assert "shed: deadline" in d.reason
        await call.done_writing()
