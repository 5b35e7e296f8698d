"""The batcher's queue: earliest deadline first, and the rule for when a batch closes and
what it holds.

Why: a GCN forward over 64 small graphs costs little more than over one, so graphs from
all streams are batched; but every decision has a 10 ms deadline, so a batch must not
wait for company longer than its most urgent member can afford. This module makes that
decision and nothing else: it runs no batch, owns no thread and no timer (that is
``tamiyo_server.batcher``, which calls it with :attr:`BatchQueue.cond` held).

* Jobs wait in a heap ordered by deadline (ties by submission). Replacing a job's
  deadline or cancelling it leaves a dead heap entry behind, dropped when it reaches the
  top or, when dead entries outnumber live ones, by a compaction.
* A batch closes (:meth:`BatchQueue.wait_s` ≤ 0) on whichever comes first: the
  node/edge budget, ``max_batch_graphs``, the earliest deadline's slack falling below
  the predicted inference time (:class:`CostModel`, learned online from measured
  batches), the oldest job having waited ``max_queue_delay_ms``, or company being
  unlikely: when the mean gap between submissions (an EWMA) is longer than the wait that
  is left, nobody is expected in time, so waiting would only add latency (one
  closed-loop stream would otherwise pay the whole ``max_queue_delay_ms`` on every
  decision) — or company not being worth it: waiting w ms brings ~w/gap more graphs,
  each saving one batch's fixed cost ``a`` of CPU, and at a utilisation u each ms of CPU
  saved shortens the queueing of later work by ~u/(1-u) ms (M/M/1), so waiting pays when
  ``a·u/(1-u) > gap``. ``utilization`` (the server process's CPU share, set by the
  pipeline) decides; unknown (None) = wait. Measured here: open loop over 256 streams at
  800 frames/s, a 5 ms ``max_queue_delay_ms`` gave p99 20 vs 33 ms for 2 ms, but closed
  loops lost (1 stream: 184 vs 233 decisions/s; 64 streams: fewer network decisions),
  so the default stays 2 ms.
* What a closed batch holds (:meth:`BatchQueue.take_batch`): jobs in deadline order
  while they fit the budgets and do not make the batch miss its earliest deadline. A job
  that can no longer make its deadline even alone is taken out to be *shed* (answered
  ``shed="deadline"``, degraded). The queue is bounded (``max_queued``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from tamiyo.config import BatchConfig
from tamiyo_server.cost_model import CostModel

P = TypeVar("P")
R = TypeVar("R")

_QUEUED, _TAKEN, _GONE = 0, 1, 2
ARRIVAL_GAP_WEIGHT = 0.2  # EWMA weight of the newest gap between submissions
TIMER_SLACK_S = 0.002
"""A batch closes this much before its deadline-driven latest time. A timer or a
condition wait can fire late (epoll rounds timeouts up to whole ms; a busy loop runs
callbacks late), and a batch closed at exactly zero slack then sheds its most urgent job
as hopeless (seen in a test: the urgent job shed, the relaxed one run alone). It applies
to the deadline only: subtracted from ``max_queue_delay_ms`` as well (2 ms each by
default), it left no wait at all, and batches never waited for company."""
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


class BatchQueue(Generic[P, R]):
    """The EDF queue, its running totals, and the closing rule. Shared by the event loop
    (submissions) and, in thread mode, the inference thread (batches): every method but
    :meth:`backlog_ms` expects :attr:`cond` held, so the batcher can make one atomic
    step of several (look at the head, decide, take the batch)."""

    def __init__(self, config: BatchConfig, cost: CostModel) -> None:
        self.config = config
        self.cost = cost
        self.cond = threading.Condition()  # guards the queue; notified when it changes
        self._heap: list[tuple[float, int, Job[P, R]]] = []
        self._fifo: deque[Job[P, R]] = deque()  # arrival order, lazily pruned
        self.queued = 0
        self._queued_nodes = 0
        self._queued_edges = 0
        self._latest_deadline = 0.0  # of the jobs queued (may be stale-high: see backlog_ms)
        self._dead = 0  # heap entries of cancelled or re-queued jobs not yet popped
        self._seq = itertools.count()
        self.closing = False  # stopping: no new jobs, and every batch closes at once
        self._last_submit = 0.0
        self.arrival_gap_s = 1.0  # EWMA of the gap between submissions (s); see module doc
        self.utilization: float | None = None  # CPU share of the serving process (0-1)

    # ------------------------------------------------------------------- what is queued
    def has_room(self) -> bool:
        """A submission is accepted: not closing, and fewer than ``max_queued`` queued."""
        return not self.closing and self.queued < self.config.max_queued

    def push(self, job: Job[P, R]) -> None:
        """Queue a new job and learn the gap since the previous submission."""
        job.seq = next(self._seq)
        gap = job.arrival - self._last_submit
        self._last_submit = job.arrival
        # capped, so one quiet spell is forgotten after a few dense arrivals
        cap = 4.0 * self.config.max_queue_delay_ms / 1000.0
        self.arrival_gap_s += ARRIVAL_GAP_WEIGHT * (min(gap, cap) - self.arrival_gap_s)
        heapq.heappush(self._heap, (job.deadline, job.seq, job))
        self._latest_deadline = max(self._latest_deadline, job.deadline)
        self._fifo.append(job)
        self.queued += 1
        self._queued_nodes += job.nodes
        self._queued_edges += job.edges
        self.cond.notify()

    def replace(
        self, job: Job[P, R], payload: P, nodes: int, edges: int, deadline: float | None
    ) -> bool:
        """Swap the payload of a queued job (see ``Batcher.replace``); False if taken. A
        new ``deadline`` moves it in the EDF order: a new heap entry, the old one dead
        (its seq no longer matches)."""
        if job.state != _QUEUED:
            return False
        self._queued_nodes += nodes - job.nodes
        self._queued_edges += edges - job.edges
        job.payload, job.nodes, job.edges = payload, nodes, edges
        if deadline is not None and deadline != job.deadline:
            job.deadline = deadline
            self._latest_deadline = max(self._latest_deadline, deadline)
            job.seq = next(self._seq)
            heapq.heappush(self._heap, (deadline, job.seq, job))
            self._dead += 1
            self._compact()
            self.cond.notify()
        return True

    def withdraw(self, job: Job[P, R]) -> bool:
        """Take a queued job out for good (cancelled); False if it was already taken."""
        if job.state != _QUEUED:
            return False
        job.state = _GONE
        self.queued -= 1
        self._queued_nodes -= job.nodes
        self._queued_edges -= job.edges
        if self.queued == 0:
            self._latest_deadline = 0.0
        self._dead += 1
        self._compact()
        return True

    def backlog_ms(self, deadline: float | None = None) -> float:
        """Predicted time to run the queued work a new job waits for (ms): everything
        queued, or with ``deadline`` (monotonic s) only the jobs due no later, which EDF
        runs first. Why: with sessions on different budgets, a backlog of relaxed work
        (say 1 s budgets) made the door refuse urgent 10 ms frames that EDF would have
        run ahead of it. The common case (one budget, so the newest deadline is the
        latest) reads the totals without the lock; otherwise the queue is scanned under
        it (≤ ``max_queued``)."""
        if self.queued == 0:
            return 0.0
        if deadline is None or deadline >= self._latest_deadline - BACKLOG_TOLERANCE_S:
            return self.cost.predict_ms(self._queued_nodes, self.queued)
        nodes = graphs = 0
        with self.cond:
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

    def head(self) -> Job[P, R] | None:
        """The live job with the earliest deadline (dead entries on top are dropped)."""
        while self._heap:
            _, seq, job = self._heap[0]
            if job.state == _QUEUED and seq == job.seq:
                return job
            heapq.heappop(self._heap)
            self._dead -= 1
        return None

    def _compact(self) -> None:
        """Drop dead heap and FIFO entries once they outnumber the live ones. Why: a dead
        entry is otherwise popped only when it reaches the top, so jobs cancelled while
        the queue's head stays put (a long batch, a stalled inference thread, clients
        cancelling under overload) would keep their payloads alive beyond
        ``max_queued``."""
        if self._dead <= max(self.queued, 64):
            return
        self._heap = [e for e in self._heap if e[2].state == _QUEUED and e[1] == e[2].seq]
        heapq.heapify(self._heap)
        self._fifo = deque(j for j in self._fifo if j.state == _QUEUED)
        self._dead = 0

    def _oldest_arrival(self) -> float:
        while self._fifo and self._fifo[0].state != _QUEUED:
            self._fifo.popleft()
        return self._fifo[0].arrival if self._fifo else time.monotonic()

    # ------------------------------------------------------------- when a batch closes
    def wait_s(self, head: Job[P, R], now: float) -> float:
        """How long the batch headed by ``head`` may still wait for company (s); ≤ 0 =
        close it now. ``now`` is ``time.monotonic()`` s."""
        c = self.config
        graphs = min(self.queued, c.max_batch_graphs)
        nodes = min(self._queued_nodes, c.max_batch_nodes)
        slack = head.deadline - now - self.cost.predict_ms(nodes, graphs) / 1000.0
        slack -= c.safety_ms / 1000.0 + TIMER_SLACK_S
        wait_left = c.max_queue_delay_ms / 1000.0 - (now - self._oldest_arrival())
        full = (
            self.queued >= c.max_batch_graphs
            or self._queued_nodes >= c.max_batch_nodes
            or self._queued_edges >= c.max_batch_edges
        )
        lonely = self.arrival_gap_s > wait_left  # nobody expected before the wait ends
        if not lonely and self.utilization is not None:  # is company worth waiting for?
            u = min(self.utilization, 0.95)
            lonely = self.cost.fixed_ms() / 1000.0 * u / (1.0 - u) < self.arrival_gap_s
        if full or lonely or self.closing:
            return 0.0
        return min(slack, wait_left)

    # ------------------------------------------------------------ what a batch holds
    def take_batch(self) -> tuple[list[Job[P, R]], list[Job[P, R]]]:
        """Pop the batch to run now, and the jobs that cannot make their deadline
        even alone (to shed)."""
        c = self.config
        safety = c.safety_ms / 1000.0
        now = time.monotonic()
        run: list[Job[P, R]] = []
        shed: list[Job[P, R]] = []
        nodes = edges = 0
        batch_deadline = 0.0
        while (job := self.head()) is not None and len(run) < c.max_batch_graphs:
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

    def _take(self, job: Job[P, R]) -> None:
        heapq.heappop(self._heap)
        job.state = _TAKEN
        self.queued -= 1
        self._queued_nodes -= job.nodes
        self._queued_edges -= job.edges
        if self.queued == 0:
            self._latest_deadline = 0.0

    def take_rest(self) -> list[Job[P, R]]:
        """Empty the queue (stopping): every job still queued, taken."""
        rest = [e[2] for e in self._heap if e[2].state == _QUEUED]
        for job in rest:
            job.state = _TAKEN
        self._heap.clear()
        self._fifo.clear()
        self.queued = self._queued_nodes = self._queued_edges = self._dead = 0
        return rest
