"""``tamiyo_queue_delay_seconds`` counts every job that waited, including those then shed
(review 15, finding 7: only jobs that ran were observed, so the histogram read low
exactly under overload). Waits are set up by back-dating arrivals, so the lower bounds
asserted hold however slow the box is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import pytest

from tamiyo.config import BatchConfig
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tamiyo_server.batch_execution import BatchExecutor
from tamiyo_server.batch_queue import Done, Job
from tamiyo_server.cost_model import CostModel
from tamiyo_server.metrics import QUEUE_OUTCOMES, ServerMetrics
from tests.server import hosts
from tests.server.test_serving import channel, open_stream, read


def _count(m: ServerMetrics, outcome: str) -> float:
    value = m.registry.get_sample_value("tamiyo_queue_delay_seconds_count", {"outcome": outcome})
    assert value is not None, outcome
    return value


def _sum(m: ServerMetrics, outcome: str) -> float:
    value = m.registry.get_sample_value("tamiyo_queue_delay_seconds_sum", {"outcome": outcome})
    assert value is not None, outcome
    return value


def _job(waited_s: float, deadline_in_s: float) -> Job[int, int]:
    now = time.monotonic()
    future: asyncio.Future[Done[int]] = asyncio.get_running_loop().create_future()
    return Job(1, 4, 3, now - waited_s, now + deadline_in_s, future)


def _executor(
    runner: Callable[[Sequence[int]], Sequence[int]], m: ServerMetrics
) -> BatchExecutor[int, int]:
    posted: list[tuple[Job[int, int], Done[int]]] = []
    ex: BatchExecutor[int, int] = BatchExecutor(runner, CostModel(BatchConfig()), posted.extend, m)
    ex.probe_interval_s = 1e9  # (no probe: it is timing only and would run a shed job)
    return ex


def test_both_outcomes_are_exported_from_the_start() -> None:
    m = ServerMetrics()
    assert [_count(m, o) for o in QUEUE_OUTCOMES] == [0.0, 0.0]


async def test_shed_jobs_wait_is_observed_with_the_run_ones() -> None:
    m = ServerMetrics()
    ex = _executor(lambda payloads: [p + 1 for p in payloads], m)
    ran = _job(0.2, 10.0)
    shed = [_job(0.3, -0.1), _job(0.5, -0.1)]
    ex.execute([ran], shed)
    assert _count(m, "run") == 1
    assert _count(m, "shed") == 2
    assert _sum(m, "run") >= 0.2
    assert _sum(m, "shed") >= 0.8


async def test_a_job_shed_while_retrying_a_failed_batch_one_by_one_counts_as_shed() -> None:
    m = ServerMetrics()

    def runner(payloads: Sequence[int]) -> list[int]:
        if len(payloads) > 1:
            raise RuntimeError("the batch fails; graphs alone do not")
        return [p + 1 for p in payloads]

    ex = _executor(runner, m)
    late, fine = _job(0.4, -0.1), _job(0.1, 10.0)  # (late: past its deadline at the retry)
    ex.execute([late, fine], [])
    assert _count(m, "shed") == 1
    assert _count(m, "run") == 1
    assert _sum(m, "shed") >= 0.4


async def test_overload_shows_in_the_queue_delay(
    server: TamiyoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's scenario (queue_metric.py): predicted cost pinned at 50 ms, a 5 ms
    budget, so every frame is shed for its deadline; each one's wait is counted."""
    assert server.pipeline is not None
    cost = server.pipeline.batcher.cost
    monkeypatch.setattr(cost, "predict_ms", lambda nodes, graphs, safe=True: 50.0)
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch), decision_deadline_ms=5)
        for step in range(1, 21):
            await call.write(hosts.frame(6, step))
            await read(call)
        await call.done_writing()
    shed = server.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": "deadline"})
    assert shed is not None
    assert shed > 0
    assert _count(server.metrics, "shed") == shed
