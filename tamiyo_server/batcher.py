"""Deadline-aware dynamic batching of graph evaluations, run on the event loop or on ONE
inference thread.

Why: a GCN forward over 64 small graphs costs little more than over one, so graphs from
all streams are batched; but every decision has a 10 ms deadline, so a batch must not
wait for company longer than its most urgent member can afford.

* The event loop calls :meth:`Batcher.submit` (non-blocking, O(log n)); the job lands in
  an earliest-deadline-first heap guarded by a ``threading.Condition``.
* A batch closes on whichever comes first: the node/edge budget,
  ``max_batch_graphs``, the earliest deadline's slack falling below the predicted
  inference time (:class:`CostModel`, learned online from measured batches), the
  oldest job having waited ``max_queue_delay_ms``, or company being unlikely: when the
  mean gap between submissions (an EWMA) is longer than the wait that is left, nobody is
  expected in time, so waiting would only add latency (one closed-loop stream would
  otherwise pay the whole ``max_queue_delay_ms`` on every decision) — or company not
  being worth it: waiting w ms brings ~w/gap more graphs, each saving one batch's fixed
  cost ``a`` of CPU, and at a utilisation u each ms of CPU saved shortens the queueing of
  later work by ~u/(1-u) ms (M/M/1), so waiting pays when ``a·u/(1-u) > gap``.
  ``utilization`` (the server process's CPU share, set by the pipeline) decides;
  unknown (None) = wait. Measured here: open loop over 256 streams at 800 frames/s, a
  5 ms ``max_queue_delay_ms`` gave p99 20 vs 33 ms for 2 ms, but closed loops lost
  (1 stream: 184 vs 233 decisions/s; 64 streams: fewer network decisions), so the
  default stays 2 ms.
* A job that can no longer make its deadline even alone is *shed*: its future resolves
  with ``shed="deadline"`` and the caller answers with a degraded decision. The queue is
  bounded (``max_queued``); a full queue makes ``submit`` return ``None``.
* Where batches run (``BatchConfig.run_on``):

  - ``"loop"`` (default): on the event loop itself, from a callback scheduled when the
    batch should close (``call_soon`` / ``call_later``), so I/O is polled between
    batches. Why: with a separate thread, the inference thread and a busy asyncio loop
    fight over the GIL. Each time the inference thread gives the GIL up (the compiled
    forward releases it), getting it back from a busy loop takes up to the interpreter's
    switch interval (5 ms), several times per batch. Measured on this 2-core box: a
    batch took 2-3x its CPU time in wall time under load, the online cost model learned
    those inflated times and shed work that would have made its deadline. On the loop
    there is nobody to wait for; the loop is blocked for the batch (~1-5 ms here),
    which only delays reading frames that will join the next batch anyway.
  - ``"thread"``: a dedicated inference thread blocks on a ``threading.Condition``;
    results go back with one ``loop.call_soon_threadsafe`` per batch. For CUDA, where the
    forward is mostly waiting for the device and the loop can work meanwhile.

The batcher is generic over the payload and result types: the runner passed in does the
featurize + forward (see ``tamiyo_server.pipeline``), so this module knows no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tamiyo.config import BatchConfig
from tamiyo_server.cost_model import CostModel
from tamiyo_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

_QUEUED, _TAKEN, _GONE = 0, 1, 2
PROBE_INTERVAL_S = 0.1  # see Batcher._probe_due
ARRIVAL_GAP_WEIGHT = 0.2  # EWMA weight of the newest gap between submissions
TIMER_SLACK_S = 0.002
"""A batch closes this much before its deadline-driven latest time. A timer or a
condition wait can fire late (epoll rounds timeouts up to whole ms; a busy loop runs
callbacks late), and a batch closed at exactly zero slack then sheds its most urgent job
as hopeless (seen in a test: the urgent job shed, the relaxed one run alone). It applies
to the deadline only: subtracted from ``max_queue_delay_ms`` as well (2 ms each by
default), it left no wait at all, and batches never waited for company."""
DUE_TOLERANCE_S = 0.0002  # a tick this close to its planned time runs the batch
BACKLOG_TOLERANCE_S = 0.005
"""``backlog_ms(deadline)`` reads the queue's totals for a deadline this close to the
latest queued one (s): with one budget, transit jitter moves deadlines by ms, and work due
that little later is as good as ahead. The walk of the heap is for mixed budgets."""


@dataclass(eq=False)
class Job(Generic[P, R]):
    """One evaluation waiting for (or in) a batch. Times are ``time.monotonic()`` s."""

    payload: P
    nodes: int
    edges: int
    arrival: float
    deadline: float
    future: asyncio.Future[Done[R]]
    seq: int = 0
    state: int = _QUEUED

    @property
    def queued(self) -> bool:
        """Still waiting for a batch (so ``Batcher.replace`` can swap its payload)."""
        return self.state == _QUEUED


@dataclass
class Done(Generic[R]):
    """How a job ended: ``result`` from the network, or ``shed`` naming why not."""

    result: R | None = None
    shed: str = ""  # "", "deadline", "error", "shutdown"
    queue_s: float = 0.0
    batch_graphs: int = 0
    prepared: object = None  # shed jobs: what ``prepare_shed`` made of the payload


class Batcher(Generic[P, R]):
    """EDF queue + where batches run. ``runner(payloads) -> results`` runs there;
    ``prepare_shed(payloads)`` (optional) too, for jobs about to be shed, so the cheap
    degraded answer needs no per-job work on the event loop."""

    def __init__(
        self,
        runner: Callable[[Sequence[P]], Sequence[R]],
        config: BatchConfig,
        metrics: ServerMetrics | None = None,
        name: str = "tamiyo-inference",
        prepare_shed: Callable[[Sequence[P]], Sequence[object]] | None = None,
    ) -> None:
        self._runner = runner
        self._prepare_shed = prepare_shed
        self.config = config
        self.cost = CostModel(config)
        self._m = metrics
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Job[P, R]]] = []
        self._fifo: deque[Job[P, R]] = deque()  # arrival order, lazily pruned
        self._queued = 0
        self._queued_nodes = 0
        self._queued_edges = 0
        self._latest_deadline = 0.0  # of the jobs queued (may be stale-high: see backlog_ms)
        self._dead = 0  # heap entries of cancelled or re-queued jobs not yet popped
        self._runner_broken = False  # see _one_by_one
        self._seq = itertools.count()
        self._busy = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._idle = asyncio.Event()
        self._last_run = time.monotonic()  # end of the last measured batch
        self.probe_interval_s = PROBE_INTERVAL_S
        self._last_submit = 0.0
        self.arrival_gap_s = 1.0  # EWMA of the gap between submissions (s); see module doc
        self.on_loop = config.run_on == "loop"
        self.utilization: float | None = None  # CPU share of the serving process (0-1)
        self._tick_handle: asyncio.Handle | None = None  # on_loop: the scheduled _tick
        self._tick_at = 0.0  # when that tick runs (monotonic s)

    # ----------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        if not self.on_loop:
            self._thread.start()

    @property
    def queued(self) -> int:
        return self._queued

    def backlog_ms(self, deadline: float | None = None) -> float:
        """Predicted time to run the queued work a new job waits for (ms): everything
        queued, or with ``deadline`` (monotonic s) only the jobs due no later, which EDF
        runs first. Why: with sessions on different budgets, a backlog of relaxed work
        (say 1 s budgets) made the door refuse urgent 10 ms frames that EDF would have
        run ahead of it. The common case (one budget, so the newest deadline is the
        latest) reads the totals; otherwise the queue is scanned (≤ ``max_queued``)."""
        if self._queued == 0:
            return 0.0
        if deadline is None or deadline >= self._latest_deadline - BACKLOG_TOLERANCE_S:
            return self.cost.predict_ms(self._queued_nodes, self._queued)
        nodes = graphs = 0
        with self._cond:
            heap = self._heap
            todo = [0]  # a min-heap: past an entry due later, its whole subtree is too
            while todo:
                i = todo.pop()
                if i >= len(heap):
                    continue
                due, seq, job = heap[i]
                if due > deadline:
                    continue
                if job.state == _QUEUED and seq == job.seq:
                    nodes += job.nodes
                    graphs += 1
                todo += (2 * i + 1, 2 * i + 2)
        return self.cost.predict_ms(nodes, graphs) if graphs else 0.0

    def submit(
        self, payload: P, nodes: int, edges: int, arrival: float, deadline: float
    ) -> Job[P, R] | None:
        """Queue one evaluation; ``None`` when the queue is full or stopping (the caller
        must answer explicitly: degraded decision or RESOURCE_EXHAUSTED)."""
        assert self._loop is not None, "start() first"
        with self._cond:
            if self._stopping or self._queued >= self.config.max_queued:
                return None
            job: Job[P, R] = Job(
                payload, nodes, edges, arrival, deadline, self._loop.create_future()
            )
            job.seq = next(self._seq)
            gap = arrival - self._last_submit
            self._last_submit = arrival
            # capped, so one quiet spell is forgotten after a few dense arrivals
            cap = 4.0 * self.config.max_queue_delay_ms / 1000.0
            self.arrival_gap_s += ARRIVAL_GAP_WEIGHT * (min(gap, cap) - self.arrival_gap_s)
            heapq.heappush(self._heap, (deadline, job.seq, job))
            self._latest_deadline = max(self._latest_deadline, deadline)
            self._fifo.append(job)
            self._queued += 1
            self._queued_nodes += nodes
            self._queued_edges += edges
            self._idle.clear()
            self._cond.notify()
        if self.on_loop:
            self._schedule()
        return job

    def replace(
        self, job: Job[P, R], payload: P, nodes: int, edges: int, deadline: float | None = None
    ) -> bool:
        """Swap the payload of a job still queued (a newer frame of the same session
        replaces the older one); False if it was already taken. With ``deadline`` the job
        now answers by that time (the newer frame's own budget) and moves in the EDF
        order accordingly; without it, it keeps its place and deadline."""
        with self._cond:
            if job.state != _QUEUED:
                return False
            self._queued_nodes += nodes - job.nodes
            self._queued_edges += edges - job.edges
            job.payload, job.nodes, job.edges = payload, nodes, edges
            if deadline is not None and deadline != job.deadline:
                # a new heap entry; the old one is dead (its seq no longer matches)
                job.deadline = deadline
                self._latest_deadline = max(self._latest_deadline, deadline)
                job.seq = next(self._seq)
                heapq.heappush(self._heap, (deadline, job.seq, job))
                self._dead += 1
                self._compact()
                self._cond.notify()
        if self.on_loop and deadline is not None:
            self._schedule()
        return True

    def cancel(self, job: Job[P, R]) -> bool:
        """Withdraw a queued job (its stream went away). True if it had not started."""
        with self._cond:
            if job.state != _QUEUED:
                return False
            job.state = _GONE
            self._queued -= 1
            self._queued_nodes -= job.nodes
            self._queued_edges -= job.edges
            if self._queued == 0:
                self._latest_deadline = 0.0
            self._dead += 1
            self._compact()
        if not job.future.done():
            job.future.cancel()
        self._check_idle()
        return True

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Run what is queued, then stop (thread mode: the thread; loop mode: call it
        from the loop thread). Jobs that cannot run are shed with reason "shutdown"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.on_loop:  # queued work runs first, as the thread does
            if self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = None
            while True:
                with self._cond:
                    batch = self._take_batch() if self._pop_live() is not None else None
                if batch is None:
                    break
                self._execute(*batch)
            self._shed_rest()
        elif self._thread.is_alive():
            self._thread.join(timeout=10.0)

    def _check_idle(self) -> None:
        if self._queued == 0 and not self._busy:
            self._idle.set()

    def _deliver(self, batch: list[tuple[Job[P, R], Done[R]]]) -> None:
        for job, done in batch:
            if not job.future.done():
                job.future.set_result(done)
        self._check_idle()

    # ------------------------------------------------------- closing and running batches
    def _pop_live(self) -> Job[P, R] | None:
        while self._heap:
            _, seq, job = self._heap[0]
            if job.state == _QUEUED and seq == job.seq:
                return job
            heapq.heappop(self._heap)
            self._dead -= 1
        return None

    def _compact(self) -> None:
        """Drop dead heap and FIFO entries once they outnumber the live ones (call with
        the lock held). Why: a dead entry is otherwise popped only when it reaches the
        top, so jobs cancelled while the queue's head stays put (a long batch, a stalled
        inference thread, clients cancelling under overload) would keep their payloads
        alive beyond ``max_queued``."""
        if self._dead <= max(self._queued, 64):
            return
        self._heap = [e for e in self._heap if e[2].state == _QUEUED and e[1] == e[2].seq]
        heapq.heapify(self._heap)
        self._fifo = deque(j for j in self._fifo if j.state == _QUEUED)
        self._dead = 0

    def _oldest_arrival(self) -> float:
        while self._fifo and self._fifo[0].state != _QUEUED:
            self._fifo.popleft()
        return self._fifo[0].arrival if self._fifo else time.monotonic()

    def _take(self, job: Job[P, R]) -> None:
        heapq.heappop(self._heap)
        job.state = _TAKEN
        self._queued -= 1
        self._queued_nodes -= job.nodes
        self._queued_edges -= job.edges
        if self._queued == 0:
            self._latest_deadline = 0.0

    def _wait_s(self, head: Job[P, R], now: float) -> float:
        """How long the batch headed by ``head`` may still wait for company (s); ≤ 0 =
        close it now. Call with the lock held."""
        c = self.config
        graphs = min(self._queued, c.max_batch_graphs)
        nodes = min(self._queued_nodes, c.max_batch_nodes)
        slack = head.deadline - now - self.cost.predict_ms(nodes, graphs) / 1000.0
        slack -= c.safety_ms / 1000.0 + TIMER_SLACK_S
        wait_left = c.max_queue_delay_ms / 1000.0 - (now - self._oldest_arrival())
        full = (
            self._queued >= c.max_batch_graphs
            or self._queued_nodes >= c.max_batch_nodes
            or self._queued_edges >= c.max_batch_edges
        )
        lonely = self.arrival_gap_s > wait_left  # nobody expected before the wait ends
        if not lonely and self.utilization is not None:  # is company worth waiting for?
            u = min(self.utilization, 0.95)
            lonely = self.cost.fixed_ms() / 1000.0 * u / (1.0 - u) < self.arrival_gap_s
        if full or lonely or self._stopping:
            return 0.0
        return min(slack, wait_left)

    def _next_batch(self) -> tuple[list[Job[P, R]], list[Job[P, R]]] | None:
        """Thread mode: block until a batch closes; (to run, to shed) or None to exit."""
        with self._cond:
            while True:
                head = self._pop_live()
                if head is None:
                    if self._stopping:
                        return None
                    if self._busy:
                        self._busy = False
                        self._post_idle_check()
                    self._cond.wait()
                    continue
                wait = self._wait_s(head, time.monotonic())
                if wait <= DUE_TOLERANCE_S:
                    break
                self._cond.wait(timeout=wait)
            return self._take_batch()

    # ------------------------------------------------------------------ loop mode
    def _schedule(self) -> None:
        """Loop mode: make sure a ``_tick`` runs when the queued batch should close
        (earlier than planned if a submission made it full or more urgent)."""
        assert self._loop is not None
        with self._cond:
            head = self._pop_live()
            if head is None:
                return
            now = time.monotonic()
            at = now + max(self._wait_s(head, now), 0.0)
        if self._tick_handle is not None:
            if self._tick_at <= at:
                return
            self._tick_handle.cancel()
        self._tick_at = at
        if at <= now:
            self._tick_handle = self._loop.call_soon(self._tick)
        else:
            self._tick_handle = self._loop.call_at(self._loop.time() + (at - now), self._tick)

    def _tick(self) -> None:
        """Loop mode: run the batch that is due (or reschedule if it is not yet)."""
        self._tick_handle = None
        with self._cond:
            head = self._pop_live()
            due = head is not None and self._wait_s(head, time.monotonic()) <= DUE_TOLERANCE_S
            batch = self._take_batch() if due else None
        if batch is not None:
            try:
                self._execute(*batch)
            finally:
                self._busy = False
            self._check_idle()
        self._schedule()  # the rest: due at once runs after the loop polled I/O again

    def _take_batch(self) -> tuple[list[Job[P, R]], list[Job[P, R]]]:
        """Pop the batch to run now, and the jobs that cannot make their deadline
        even alone (to shed). Call with the lock held."""
        c = self.config
        safety = c.safety_ms / 1000.0
        now = time.monotonic()
        self._busy = True
        run: list[Job[P, R]] = []
        shed: list[Job[P, R]] = []
        nodes = edges = 0
        batch_deadline = 0.0
        while (job := self._pop_live()) is not None and len(run) < c.max_batch_graphs:
            if nodes + job.nodes > c.max_batch_nodes and run:
                break
            if edges + job.edges > c.max_batch_edges and run:
                break
            alone = self.cost.predict_ms(job.nodes, 1, safe=False) / 1000.0
            if job.deadline < now + alone + safety:
                self._take(job)
                shed.append(job)
                continue
            finish = now + self.cost.predict_ms(nodes + job.nodes, len(run) + 1) / 1000.0
            if run and finish + safety > batch_deadline:
                break  # adding it would make the batch miss its earliest deadline
            self._take(job)
            if not run:
                batch_deadline = job.deadline
            run.append(job)
            nodes += job.nodes
            edges += job.edges
        return run, shed

    def _probe(self, run: list[Job[P, R]], shed: list[Job[P, R]]) -> None:
        """Measure a batch of one shed job when nothing else was measured for a while.

        Without this, a pessimistic cost model (say, fitted while the machine was busy)
        sheds everything, measures nothing and never recovers. The shed job is still
        answered at once (degraded); the probe's result is only used for timing.
        """
        if run or not shed or time.monotonic() - self._last_run < self.probe_interval_s:
            return
        job = shed[0]
        start = time.monotonic()
        try:
            self._runner([job.payload])
        except Exception:  # a failure says nothing about how long a batch takes
            log.exception("probe inference failed")
            self._last_run = time.monotonic()
            return
        self._last_run = time.monotonic()
        self.cost.update(job.nodes, 1, (self._last_run - start) * 1000.0)

    def _run(self) -> None:
        while True:
            got = self._next_batch()
            if got is None:
                break
            run, shed = got
            self._execute(run, shed)
        self._shed_rest()

    def _execute(self, run: list[Job[P, R]], shed: list[Job[P, R]]) -> None:
        start = time.monotonic()
        if shed:  # answered before the batch runs: a shed job must not wait for it
            prepared: Sequence[object] = [None] * len(shed)
            if self._prepare_shed is not None:
                try:
                    prepared = self._prepare_shed([j.payload for j in shed])
                except Exception:
                    log.exception("preparing %d shed jobs failed", len(shed))
            self._post(
                [
                    (j, Done(shed="deadline", queue_s=start - j.arrival, prepared=p))
                    for j, p in zip(shed, prepared, strict=True)
                ]
            )
        out: list[tuple[Job[P, R], Done[R]]] = []
        if run:
            # Timed from here: preparing the shed answers above is not inference. Counting
            # it fed back (more shed → "slower" batches → higher predictions → more shed)
            # until every job was shed.
            start = time.monotonic()
            nodes = sum(j.nodes for j in run)
            try:
                results = self._runner([j.payload for j in run])
                if len(results) != len(run):
                    raise RuntimeError(f"runner returned {len(results)} for {len(run)} jobs")
            except Exception:
                self._last_run = time.monotonic()
                log.exception("inference failed for a batch of %d graphs", len(run))
                if len(run) == 1 or self._runner_broken:
                    out += [(j, Done(shed="error", queue_s=start - j.arrival)) for j in run]
                else:
                    out += self._one_by_one(run, start)
            else:
                self._runner_broken = False
                self._last_run = time.monotonic()
                took = self._last_run - start
                self.cost.update(nodes, len(run), took * 1000.0)
                out += [
                    (j, Done(result=r, queue_s=start - j.arrival, batch_graphs=len(run)))
                    for j, r in zip(run, results, strict=True)
                ]
                if self._m is not None:
                    self._m.inference_seconds.observe(took)
                    self._m.batch_graphs.observe(len(run))
                    self._m.batch_nodes.observe(nodes)
            if self._m is not None:
                for j in run:
                    self._m.queue_seconds.observe(start - j.arrival)
        if out:
            self._post(out)
        self._probe(run, shed)

    def _one_by_one(self, run: list[Job[P, R]], start: float) -> list[tuple[Job[P, R], Done[R]]]:
        """After a batch failed: each graph alone, so that one graph the runner cannot
        take (a bug its validation missed) fails only its own job, not every session
        batched with it. A job already past its deadline is shed instead. When every
        graph fails alone too, the runner itself is broken (a bad engine, memory): later
        failing batches fail whole, without this pass, until a batch succeeds. Not timed:
        the batch's cost model is about batches."""
        out: list[tuple[Job[P, R], Done[R]]] = []
        failed = tried = 0
        for j in run:
            if time.monotonic() > j.deadline:
                out.append((j, Done(shed="deadline", queue_s=start - j.arrival)))
                continue
            tried += 1
            try:
                (r,) = self._runner([j.payload])
            except Exception:
                if not failed:
                    log.exception("inference failed for one graph of the batch, alone")
                failed += 1
                out.append((j, Done(shed="error", queue_s=start - j.arrival)))
            else:
                out.append((j, Done(result=r, queue_s=start - j.arrival, batch_graphs=1)))
        self._last_run = time.monotonic()
        self._runner_broken = tried > 0 and failed == tried
        if failed:
            log.error(
                "%d of %d graphs failed alone too%s",
                failed,
                tried,
                "; the runner is broken: failing batches fail whole until one succeeds"
                if self._runner_broken
                else "",
            )
        return out

    def _post(self, out: list[tuple[Job[P, R], Done[R]]]) -> None:
        assert self._loop is not None
        if self.on_loop:
            self._deliver(out)
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._deliver, out)

    def _post_idle_check(self) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._check_idle)

    def _shed_rest(self) -> None:
        with self._cond:
            rest = [e[2] for e in self._heap if e[2].state == _QUEUED]
            for job in rest:
                job.state = _TAKEN
            self._heap.clear()
            self._fifo.clear()
            self._queued = self._queued_nodes = self._queued_edges = self._dead = 0
            self._busy = False
        self._post([(j, Done(shed="shutdown")) for j in rest])
