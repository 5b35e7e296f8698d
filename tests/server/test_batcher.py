"""The batcher: EDF order, batching across submitters, shedding, bounds, replace, cancel.

Tests that hold the runner inside a batch (a gate) need the inference thread; the others
run in both modes (``run_on`` "thread" and "loop")."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from tamiyo.config import BatchConfig
from tamiyo_server.batcher import Batcher

CFG = BatchConfig(run_on="thread")
MODES = pytest.mark.parametrize("mode", ["thread", "loop"])


class Recorder:
    """A real runner that records each batch (the unit under test is the batcher)."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.sleep_s = sleep_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        self.gate.wait(5.0)
        self.batches.append(list(payloads))
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [p * 10 for p in payloads]


@MODES
async def test_results_come_back_batched(mode: str) -> None:
    rec = Recorder(sleep_s=0.002)
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on=mode))
    b.start()
    now = time.monotonic()
    jobs = [b.submit(i, 4, 3, now, now + 1.0) for i in range(50)]
    done = await asyncio.gather(*(j.future for j in jobs if j is not None))
    assert [d.result for d in done] == [i * 10 for i in range(50)]
    assert sum(len(x) for x in rec.batches) == 50
    assert len(rec.batches) < 50  # graphs from many submitters share batches
    assert await b.drain(1.0)
    b.stop()


async def test_earliest_deadline_first_and_replace() -> None:
    rec = Recorder()
    rec.gate.clear()  # hold the thread inside the first batch while we queue more
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    first = b.submit(0, 1, 0, now, now + 5.0)
    await asyncio.sleep(0.05)
    late = b.submit(1, 1, 0, now, now + 4.0)
    early = b.submit(2, 1, 0, now, now + 2.0)
    mid = b.submit(3, 1, 0, now, now + 3.0)
    assert first
    assert late
    assert early
    assert mid
    assert b.replace(mid, 33, 2, 0)
    rec.gate.set()
    outs = await asyncio.gather(first.future, late.future, early.future, mid.future)
    assert [x[0] for x in rec.batches] == [0, 2, 33, 1]
    assert outs[3].result == 330
    assert not b.replace(mid, 4, 1, 0)  # already ran
    b.stop()


@MODES
async def test_hopeless_deadline_is_shed_not_run(mode: str) -> None:
    rec = Recorder()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on=mode))
    b.start()
    now = time.monotonic()
    job = b.submit(7, 10, 0, now - 1.0, now - 0.5)  # already late
    ok = b.submit(8, 10, 0, now, now + 1.0)
    assert job
    assert ok
    shed, fine = await asyncio.gather(job.future, ok.future)
    assert (shed.shed, shed.result) == ("deadline", None)
    assert (fine.shed, fine.result) == ("", 80)
    assert all(7 not in x for x in rec.batches)
    b.stop()


async def test_queue_is_bounded_and_cancel_and_stop_shed() -> None:
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_queued=3, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    running = b.submit(0, 1, 0, now, now + 9.0)
    await asyncio.sleep(0.05)  # thread now blocked in the runner with job 0
    queued = [b.submit(i, 1, 0, now, now + 9.0) for i in (1, 2, 3)]
    assert all(queued)
    assert b.submit(4, 1, 0, now, now + 9.0) is None  # full: caller must answer explicitly
    assert queued[0] is not None
    assert b.cancel(queued[0])
    assert queued[0].future.cancelled()
    assert b.submit(5, 1, 0, now, now + 9.0) is not None  # room again
    threading.Timer(0.05, rec.gate.set).start()
    b.stop()  # stopping refuses new work but still runs what was accepted
    assert b.submit(6, 1, 0, now, now + 9.0) is None
    assert running is not None
    assert (await running.future).result == 0
    rest = await asyncio.gather(*(q.future for q in queued[1:] if q is not None))
    assert [d.result for d in rest] == [20, 30]


async def test_stop_leaves_a_stuck_batch_behind_and_sheds_what_waits() -> None:
    """A batch that does not end (a stuck device): ``stop(timeout_s)`` returns False after
    about ``timeout_s`` (it used to join for 10 s whatever the server's grace), with the
    thread left behind (a daemon); the job queued behind it is shed "shutdown", not left
    unanswered. The thread still answers its own batch if it ever ends."""
    entered = threading.Event()
    release = threading.Event()

    def stuck(payloads: Sequence[int]) -> list[int]:
        entered.set()
        release.wait()
        return [p * 10 for p in payloads]

    b: Batcher[int, int] = Batcher(stuck, replace(CFG, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    running = b.submit(0, 1, 0, now, now + 30.0)
    assert running is not None
    try:
        assert await asyncio.to_thread(entered.wait, 10.0)
        behind = b.submit(1, 1, 0, now, now + 30.0)
        assert behind is not None
        t0 = time.monotonic()
        assert not await asyncio.to_thread(b.stop, 0.2)
        assert time.monotonic() - t0 < 5.0  # (generous: the old join took 10 s)
        assert b._thread.is_alive()
        assert b._thread.daemon
        assert (await asyncio.wait_for(behind.future, 10.0)).shed == "shutdown"
        assert not running.future.done()
    finally:
        release.set()
    assert (await asyncio.wait_for(running.future, 10.0)).result == 0
    await asyncio.to_thread(b._thread.join, 10.0)
    assert not b._thread.is_alive()


@MODES
async def test_runner_error_is_answered(mode: str) -> None:
    def boom(payloads: Sequence[int]) -> list[int]:
        raise RuntimeError("broken engine")

    b: Batcher[int, int] = Batcher(boom, replace(CFG, run_on=mode))
    b.start()
    now = time.monotonic()
    job = b.submit(1, 1, 0, now, now + 1.0)
    assert job is not None
    assert (await job.future).shed == "error"
    b.stop()


async def test_replace_with_a_deadline_moves_the_job_in_edf_order() -> None:
    """A newer frame that takes a queued job answers by its own deadline: earlier moves
    the job ahead, later lets it run after more urgent work instead of being shed on the
    older frame's deadline."""
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    first = b.submit(0, 1, 0, now, now + 5.0)
    await asyncio.sleep(0.05)
    a = b.submit(1, 1, 0, now, now + 2.0)
    c = b.submit(2, 1, 0, now, now + 3.0)
    assert first
    assert a
    assert c
    assert b.replace(c, 22, 1, 0, deadline=now + 1.0)  # now the most urgent
    assert b.replace(a, 11, 1, 0, deadline=now + 4.0)  # now the least
    assert b.queued == 2
    rec.gate.set()
    outs = await asyncio.gather(first.future, a.future, c.future)
    assert [x[0] for x in rec.batches] == [0, 22, 11]
    assert [o.result for o in outs] == [0, 110, 220]
    b.stop()


async def test_a_replaced_job_is_judged_by_the_newer_deadline() -> None:
    """The older frame's deadline passed while the thread was busy; the newer frame's
    has not: the job runs (it used to be shed as hopeless)."""
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    blocker = b.submit(0, 1, 0, now, now + 5.0)
    await asyncio.sleep(0.05)
    job = b.submit(1, 1, 0, now, time.monotonic() + 0.03)
    await asyncio.sleep(0.05)  # its 30 ms have gone
    assert job is not None
    assert b.replace(job, 2, 1, 0, deadline=time.monotonic() + 1.0)
    rec.gate.set()
    assert blocker is not None
    await blocker.future
    done = await job.future
    assert (done.shed, done.result) == ("", 20)
    b.stop()


@MODES
async def test_one_bad_graph_fails_only_its_own_job(mode: str) -> None:
    def runner(payloads: Sequence[int]) -> list[int]:
        if 13 in payloads:
            raise ValueError("cannot take graph 13")
        return [p * 10 for p in payloads]

    b: Batcher[int, int] = Batcher(runner, replace(CFG, run_on=mode, max_queue_delay_ms=50.0))
    b.start()
    b.arrival_gap_s = 0.0  # dense arrivals: they share a batch
    now = time.monotonic()
    jobs = [b.submit(p, 4, 3, now, now + 1.0) for p in (1, 2, 13, 4, 5)]
    done = await asyncio.gather(*(j.future for j in jobs if j is not None))
    assert [d.shed for d in done] == ["", "", "error", "", ""]
    assert [d.result for d in done] == [10, 20, None, 40, 50]
    b.stop()


async def test_a_broken_runner_fails_batches_whole_after_one_retry_pass() -> None:
    """Every graph failing alone too means the runner is broken, not a graph: the next
    failing batch is not retried graph by graph (N more failing runs on the loop)."""
    calls: list[int] = []

    def boom(payloads: Sequence[int]) -> list[int]:
        calls.append(len(payloads))
        raise RuntimeError("broken engine")

    b: Batcher[int, int] = Batcher(boom, replace(CFG, run_on="loop", max_queue_delay_ms=50.0))
    b.start()
    for _ in range(2):
        b.arrival_gap_s = 0.0
        now = time.monotonic()
        jobs = [b.submit(p, 4, 3, now, now + 1.0) for p in range(4)]
        done = await asyncio.gather(*(j.future for j in jobs if j is not None))
        assert [d.shed for d in done] == ["error"] * 4
    assert calls == [4, 1, 1, 1, 1, 4]  # one retry pass, then whole batches only
    b.stop()


async def test_a_failed_probe_does_not_teach_the_cost_model() -> None:
    def boom(payloads: Sequence[int]) -> list[int]:
        raise RuntimeError("broken engine")

    b: Batcher[int, int] = Batcher(boom, replace(CFG, run_on="loop", prior_batch_ms=100.0))
    b.probe_interval_s = 0.0
    b.start()
    before = b.cost.predict_ms(8, 1, safe=False)
    for _ in range(3):
        now = time.monotonic()
        job = b.submit(1, 8, 0, now, now + 0.05)  # 100 ms predicted: shed, then probed
        assert job is not None
        assert (await job.future).shed == "deadline"
    assert b.cost.predict_ms(8, 1, safe=False) == before
    b.stop()


async def test_cancelled_jobs_do_not_pile_up_behind_the_head() -> None:
    """A cancelled job's heap entry used to stay until it reached the top: behind a
    head that stays put, cancellations kept every payload alive past ``max_queued``."""
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_queued=4, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    first = b.submit(0, 1, 0, now, now + 5.0)
    await asyncio.sleep(0.05)  # the thread holds job 0
    head = b.submit(-1, 1, 0, now, now + 0.5)  # earliest deadline: pins the heap's top
    for i in range(1000):
        job = b.submit(i, 1, 0, now, now + 1.0)
        assert job is not None
        b.cancel(job)
    assert len(b.queue._heap) <= 2 * 64
    assert len(b.queue._fifo) <= 2 * 64
    rec.gate.set()
    assert first is not None
    assert head is not None
    assert [(await j.future).result for j in (first, head)] == [0, -10]
    b.stop()


@pytest.mark.parametrize("budget", ["max_batch_nodes", "max_batch_edges", "max_batch_graphs"])
async def test_a_queue_over_any_budget_closes_the_batch_at_once(budget: str) -> None:
    knobs: dict[str, Any] = {budget: 2}
    cfg = replace(BatchConfig(run_on="loop"), max_queue_delay_ms=300.0, **knobs)
    b: Batcher[int, int] = Batcher(Recorder(), cfg)
    b.start()
    b.arrival_gap_s = 0.0  # dense arrivals: it would otherwise wait for company
    now = time.monotonic()
    jobs = [b.submit(i, 3, 3, now, now + 5.0) for i in range(3)]
    assert b._tick_at <= time.monotonic()  # due now, not in 300 ms
    await asyncio.gather(*(j.future for j in jobs if j is not None))
    b.stop()


async def test_the_backlog_ahead_of_a_deadline_counts_only_work_due_no_later() -> None:
    """EDF runs urgent work first: 200 queued jobs due in 1 s are not ahead of a job due
    in 10 ms (the door refused such frames as overloaded), but are ahead of one due
    later than all of them."""
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_batch_graphs=1))
    b.start()
    now = time.monotonic()
    held = b.submit(0, 8, 0, now, now + 5.0)
    await asyncio.sleep(0.05)  # the thread holds job 0
    jobs = [b.submit(i + 1, 8, 0, now, now + 2.0) for i in range(200)]
    assert b.backlog_ms(now + 0.010) == 0.0
    everything = b.backlog_ms()
    assert b.backlog_ms(now + 3.0) == everything > 0.0
    urgent = b.submit(-1, 8, 0, now, now + 1.0)
    assert 0.0 < b.backlog_ms(now + 1.5) < everything
    rec.gate.set()
    await asyncio.gather(*(j.future for j in [held, urgent, *jobs] if j is not None))
    assert rec.batches[1] == [-1]  # (and it ran first)
    assert b.backlog_ms(now + 1.5) == 0.0
    b.stop()


@MODES
async def test_pessimistic_model_recovers_by_probing(mode: str) -> None:
    rec = Recorder()
    # A prior of 10 s per batch: every 50 ms deadline looks hopeless.
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on=mode, prior_batch_ms=10_000.0))
    b.probe_interval_s = 0.0
    b.start()
    sheds = 0
    for i in range(200):
        now = time.monotonic()
        job = b.submit(i, 8, 0, now, now + 0.05)
        assert job is not None
        done = await job.future
        if not done.shed:
            break
        sheds += 1
    assert sheds >= 1  # the first ones were shed (answered, not run) ...
    assert done.result == i * 10  # ... until measured probes corrected the model
    b.stop()


async def test_backlog_prediction_grows_with_the_queue() -> None:
    rec = Recorder()
    rec.gate.clear()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, max_batch_graphs=1))
    b.start()
    assert b.backlog_ms() == 0.0
    now = time.monotonic()
    jobs = [b.submit(i, 100, 0, now, now + 9.0) for i in range(5)]
    await asyncio.sleep(0.05)  # the thread holds job 0; four stay queued
    four = b.backlog_ms()
    extra = b.submit(9, 400, 0, now, now + 9.0)
    assert b.backlog_ms() > four > 0.0
    rec.gate.set()
    await asyncio.gather(*(j.future for j in [*jobs, extra] if j is not None))
    assert b.backlog_ms() == 0.0
    b.stop()


@MODES
async def test_a_lone_submitter_is_not_held_for_company(mode: str) -> None:
    """Sparse arrivals (one closed-loop stream): waiting max_queue_delay for graphs that
    will not come only adds latency, so the batch closes at once."""
    rec = Recorder()
    # (long, so a busy box's thread wake-ups, seen at up to ~0.35 s under a load of 6
    # on 2 cores, cannot pass for a held batch)
    wait_s = 1.5
    b: Batcher[int, int] = Batcher(
        rec, replace(CFG, run_on=mode, max_queue_delay_ms=wait_s * 1000.0)
    )
    b.start()
    took = []
    for i in range(3):
        now = time.monotonic()
        job = b.submit(i, 4, 3, now, now + 10.0)
        assert job is not None
        await job.future
        took.append(time.monotonic() - now)
        await asyncio.sleep(wait_s + 0.1)  # gaps longer than the wait: nobody could join
    assert max(took) < 0.5 * wait_s, took
    assert rec.batches == [[0], [1], [2]]
    b.stop()


@MODES
async def test_dense_arrivals_still_wait_for_company(mode: str) -> None:
    """Submissions closer together than the wait: the batch waits and fills."""
    rec = Recorder()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on=mode, max_queue_delay_ms=300.0))
    b.start()
    now = time.monotonic()
    for i in range(20):  # teach the gap estimate that arrivals are dense
        b.submit(i, 4, 3, now, now + 10.0)
    jobs = []
    for i in range(20, 30):
        await asyncio.sleep(0.005)
        t = time.monotonic()
        jobs.append(b.submit(i, 4, 3, t, t + 10.0))
    await asyncio.gather(*(j.future for j in jobs if j is not None))
    later = [bt for bt in rec.batches if any(x >= 20 for x in bt)]
    assert len(later) < 10, rec.batches  # the spaced submissions shared batches
    b.stop()


async def test_on_the_loop_a_full_batch_runs_without_waiting() -> None:
    """Loop mode schedules the batch when it should close: a submission that fills it
    makes it run at once, not when the (long) queue delay ends."""
    rec = Recorder()
    cfg = replace(CFG, run_on="loop", max_queue_delay_ms=5_000.0, max_batch_graphs=4)
    b: Batcher[int, int] = Batcher(rec, cfg)
    b.start()
    b.arrival_gap_s = 0.0  # dense arrivals: the batch would wait for company
    now = time.monotonic()
    jobs = [b.submit(i, 4, 3, now, now + 30.0) for i in range(4)]
    done = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs if j)), 1.0)
    assert [d.result for d in done] == [0, 10, 20, 30]
    assert rec.batches == [[0, 1, 2, 3]]
    b.stop()


async def test_on_the_loop_stop_runs_queued_work_first() -> None:
    rec = Recorder()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on="loop", max_queue_delay_ms=5_000.0))
    b.start()
    b.arrival_gap_s = 0.0
    now = time.monotonic()
    jobs = [b.submit(i, 4, 3, now, now + 30.0) for i in range(3)]
    assert rec.batches == []  # still waiting for company
    b.stop()
    assert b.submit(9, 4, 3, now, now + 30.0) is None
    done = await asyncio.gather(*(j.future for j in jobs if j))
    assert [d.result for d in done] == [0, 10, 20]


async def test_on_the_loop_an_urgent_job_brings_the_batch_forward() -> None:
    """A batch planned to wait for company runs early when a job with a near deadline
    joins (its slack, not the queue delay, now decides), and EDF puts that job first."""
    rec = Recorder()
    cfg = replace(CFG, run_on="loop", max_queue_delay_ms=2_000.0)
    b: Batcher[int, int] = Batcher(rec, cfg)
    b.start()
    b.arrival_gap_s = 0.0  # dense arrivals: the batch waits for company
    # 1 ms + 10 ms per graph: the 2-graph batch closes ~21 ms before the urgent deadline,
    # while the job alone needs ~11 ms, so a callback a few ms late does not shed it
    b.cost.fit([(4, 1, 11.0), (8, 2, 21.0), (40, 10, 101.0)])
    now = time.monotonic()
    relaxed = b.submit(1, 4, 3, now, now + 30.0)
    await asyncio.sleep(0.05)
    assert rec.batches == []  # still waiting (2 s of queue delay left)
    urgent = b.submit(2, 4, 3, now, time.monotonic() + 0.3)
    assert relaxed
    assert urgent
    await asyncio.wait_for(urgent.future, 0.5)  # long before the 2 s queue delay ends
    assert rec.batches[0][0] == 2, rec.batches
    assert (await relaxed.future).result == 10
    b.stop()


@pytest.mark.parametrize(("utilization", "waits"), [(0.05, False), (0.9, True)])
async def test_company_is_awaited_only_when_it_pays(utilization: float, waits: bool) -> None:
    """Arrivals 2 ms apart, a 1 ms fixed batch cost: on an idle server (u = 0.05) the
    saving is not worth any wait, on a busy one (u = 0.9: 1 ms · 9 > 2 ms) it is."""
    rec = Recorder()
    b: Batcher[int, int] = Batcher(rec, replace(CFG, run_on="loop", max_queue_delay_ms=500.0))
    b.start()
    b.cost.fit([(4, 1, 1.0), (8, 2, 1.0), (40, 10, 1.0)])
    b.utilization = utilization
    b.arrival_gap_s = 0.002
    now = time.monotonic()
    job = b.submit(1, 4, 3, now, now + 30.0)
    assert job is not None
    b.arrival_gap_s = 0.002  # (the first submission's gap is not representative)
    await asyncio.sleep(0.1)
    assert (rec.batches == []) == waits, rec.batches
    await job.future
    b.stop()


@pytest.mark.parametrize(("utilization", "held"), [(0.05, False), (0.9, True)])
async def test_default_knobs_hold_a_busy_batch_for_company(utilization: float, held: bool) -> None:
    """With the default knobs (2 ms queue delay, 10 ms deadline) a busy server holds a
    lone job for company, for about the queue delay; an idle one runs it at once. (The
    2 ms timer slack, meant for the deadline, was once also taken off the 2 ms queue
    delay, which left no wait at all: batches never waited for company.)"""
    rec = Recorder()
    b: Batcher[int, int] = Batcher(rec, replace(BatchConfig(), run_on="loop"))
    b.start()
    b.cost.fit([(4, 1, 0.3), (8, 2, 0.35), (40, 10, 0.8)])  # ~0.3 ms fixed cost
    b.utilization = utilization  # 0.3 ms · u/(1-u): 0.02 ms (idle) or 2.7 ms (busy)
    b.arrival_gap_s = 0.0005  # vs a gap of 0.5 ms between arrivals
    now = time.monotonic()
    b.queue._last_submit = now - 0.0005
    job = b.submit(1, 4, 3, now, now + 0.010)
    assert job is not None
    planned_in_s = b._tick_at - time.monotonic()
    if held:
        assert 0.0005 < planned_in_s <= 0.002, planned_in_s
    else:
        assert planned_in_s <= 0.0, planned_in_s
    assert (await job.future).result == 10
    assert rec.batches == [[1]]
    b.stop()
