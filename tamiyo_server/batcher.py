"""Deadline-aware dynamic batching of graph evaluations: the batcher's front and its
engine room, on the event loop or on ONE inference thread.

Why: a GCN forward over 64 small graphs costs little more than over one, so graphs from
all streams are batched, each decision within its deadline. Three modules share the work:
``tamiyo_server.batch_queue`` decides which jobs form a batch and when it closes (EDF,
budgets, deadline slack vs predicted inference time, waiting for company);
``tamiyo_server.batch_execution`` runs a closed batch (shed answers, timing, failure
isolation, probes); this module takes submissions, drives the queue where batches run,
and delivers the answers to the submitters' futures.

* The event loop calls :meth:`Batcher.submit` (non-blocking, O(log n)); the job lands in
  the queue, guarded by its ``threading.Condition``. A full queue (``max_queued``) or a
  stopping batcher makes ``submit`` return ``None``; the caller answers explicitly.
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
  - ``"thread"``: a dedicated inference thread blocks on the queue's condition;
    results go back with one ``loop.call_soon_threadsafe`` per batch. For CUDA, where the
    forward is mostly waiting for the device and the loop can work meanwhile.

* Idle means nothing queued and no batch taken but unanswered; :meth:`Batcher.drain`
  waits for it. :meth:`Batcher.stop` runs what is queued, then sheds the rest
  (``shed="shutdown"``).

The batcher is generic over the payload and result types: the runner passed in does the
featurize + forward (see ``tamiyo_server.pipeline``), so this module knows no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from tamiyo.config import BatchConfig
from tamiyo_server.batch_execution import BatchExecutor
from tamiyo_server.batch_queue import BatchQueue, Done, Job
from tamiyo_server.cost_model import CostModel
from tamiyo_server.metrics import ServerMetrics

__all__ = ["Batcher", "Done", "Job"]

P = TypeVar("P")
R = TypeVar("R")

DUE_TOLERANCE_S = 0.0002  # a tick this close to its planned time runs the batch


class Batcher(Generic[P, R]):
    """Takes submissions, runs the queue's batches where ``run_on`` says and delivers
    the answers. ``runner(payloads) -> results`` runs there; ``prepare_shed(payloads)``
    (optional) too, for jobs about to be shed, so the cheap degraded answer needs no
    per-job work on the event loop."""

    def __init__(
        self,
        runner: Callable[[Sequence[P]], Sequence[R]],
        config: BatchConfig,
        metrics: ServerMetrics | None = None,
        name: str = "tamiyo-inference",
        prepare_shed: Callable[[Sequence[P]], Sequence[object]] | None = None,
    ) -> None:
        self.config = config
        self.cost = CostModel(config)
        self.queue: BatchQueue[P, R] = BatchQueue(config, self.cost)
        self.executor: BatchExecutor[P, R] = BatchExecutor(
            runner, self.cost, self._post, metrics, prepare_shed
        )
        self._busy = False  # a batch was taken and has not been answered yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._idle = asyncio.Event()
        self.on_loop = config.run_on == "loop"
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
        return self.queue.queued

    @property
    def utilization(self) -> float | None:
        """CPU share of the serving process (0-1; None = unknown), set by the pipeline:
        it decides whether company is worth waiting for (see ``batch_queue``)."""
        return self.queue.utilization

    @utilization.setter
    def utilization(self, u: float | None) -> None:
        self.queue.utilization = u

    @property
    def arrival_gap_s(self) -> float:
        """EWMA of the gap between submissions (s); see ``batch_queue``."""
        return self.queue.arrival_gap_s

    @arrival_gap_s.setter
    def arrival_gap_s(self, gap_s: float) -> None:
        self.queue.arrival_gap_s = gap_s

    @property
    def probe_interval_s(self) -> float:
        """Quiet time (s) after which a shed job is run as a probe (see
        ``batch_execution``)."""
        return self.executor.probe_interval_s

    @probe_interval_s.setter
    def probe_interval_s(self, interval_s: float) -> None:
        self.executor.probe_interval_s = interval_s

    def backlog_ms(self, deadline: float | None = None) -> float:
        """Predicted time to run the queued work a job due at ``deadline`` (monotonic s;
        None = any) waits for, ms (see ``BatchQueue.backlog_ms``)."""
        return self.queue.backlog_ms(deadline)

    def submit(
        self, payload: P, nodes: int, edges: int, arrival: float, deadline: float
    ) -> Job[P, R] | None:
        """Queue one evaluation; ``None`` when the queue is full or stopping (the caller
        must answer explicitly: degraded decision or RESOURCE_EXHAUSTED)."""
        assert self._loop is not None, "start() first"
        q = self.queue
        with q.cond:
            if not q.has_room():
                return None
            job: Job[P, R] = Job(
                payload, nodes, edges, arrival, deadline, self._loop.create_future()
            )
            q.push(job)
            self._idle.clear()
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
        with self.queue.cond:
            if not self.queue.replace(job, payload, nodes, edges, deadline):
                return False
        if self.on_loop and deadline is not None:
            self._schedule()
        return True

    def cancel(self, job: Job[P, R]) -> bool:
        """Withdraw a queued job (its stream went away). True if it had not started."""
        with self.queue.cond:
            if not self.queue.withdraw(job):
                return False
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

    def request_stop(self) -> None:
        """Stop taking submissions and tell the inference thread to run what is queued
        and end, without waiting for it (``stop`` waits). Why separate: the server
        signals it before gRPC's own stop, so the thread ends meanwhile and ``stop``'s
        join is not the first chance it gets."""
        q = self.queue
        with q.cond:
            q.closing = True
            q.cond.notify()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Run what is queued, then stop (thread mode: the thread; loop mode: call it
        from the loop thread). Jobs that cannot run are shed with reason "shutdown".

        Thread mode waits at most ``timeout_s`` (s) for the thread; True when it ended.
        A thread still in a batch then (a stuck device, a pathological batch) is left
        behind (a daemon: it does not keep the process alive), and what is still queued
        behind it is shed here. Loop mode runs the batches itself, on the loop (a batch
        that never ends there has stalled the loop already), and returns True."""
        self.request_stop()
        q = self.queue
        if self.on_loop:  # queued work runs first, as the thread does
            if self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = None
            while True:
                with q.cond:
                    batch = self._take_batch() if q.head() is not None else None
                if batch is None:
                    break
                self.executor.execute(*batch)
            self._shed_rest()
            return True
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return True
        self._shed_rest()  # (the thread sheds again when its batch ends: then nothing)
        return False

    # ------------------------------------------------------------- taking batches
    def _take_batch(self) -> tuple[list[Job[P, R]], list[Job[P, R]]]:
        """The queue's batch to run now and its jobs to shed, marked busy first (so an
        idle check between the two cannot see an empty queue and nothing running). Call
        with the queue's lock held."""
        self._busy = True
        return self.queue.take_batch()

    # ---------------------------------------------------------------- thread mode
    def _run(self) -> None:
        """The inference thread: batches as they close, then, stopping, shed the rest."""
        while True:
            got = self._next_batch()
            if got is None:
                break
            run, shed = got
            self.executor.execute(run, shed)
        self._shed_rest()

    def _next_batch(self) -> tuple[list[Job[P, R]], list[Job[P, R]]] | None:
        """Thread mode: block until a batch closes; (to run, to shed) or None to exit."""
        q = self.queue
        with q.cond:
            while True:
                head = q.head()
                if head is None:
                    if q.closing:
                        return None
                    if self._busy:
                        self._busy = False
                        self._post_idle_check()
                    q.cond.wait()
                    continue
                wait = q.wait_s(head, time.monotonic())
                if wait <= DUE_TOLERANCE_S:
                    break
                q.cond.wait(timeout=wait)
            return self._take_batch()

    # ------------------------------------------------------------------ loop mode
    def _schedule(self) -> None:
        """Loop mode: make sure a ``_tick`` runs when the queued batch should close
        (earlier than planned if a submission made it full or more urgent)."""
        assert self._loop is not None
        q = self.queue
        with q.cond:
            head = q.head()
            if head is None:
                return
            now = time.monotonic()
            at = now + max(q.wait_s(head, now), 0.0)
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
        q = self.queue
        with q.cond:
            head = q.head()
            due = head is not None and q.wait_s(head, time.monotonic()) <= DUE_TOLERANCE_S
            batch = self._take_batch() if due else None
        if batch is not None:
            try:
                self.executor.execute(*batch)
            finally:
                self._busy = False
            self._check_idle()
        self._schedule()  # the rest: due at once runs after the loop polled I/O again

    # ----------------------------------------------------------- delivering answers
    def _post(self, out: list[tuple[Job[P, R], Done[R]]]) -> None:
        """Answer ``out`` on the loop: at once in loop mode, else one threadsafe call."""
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
        """Stopping: answer every job still queued ``shed="shutdown"``."""
        with self.queue.cond:
            rest = self.queue.take_rest()
            self._busy = False
        self._post([(j, Done(shed="shutdown")) for j in rest])

    def _check_idle(self) -> None:
        if self.queue.queued == 0 and not self._busy:
            self._idle.set()

    def _deliver(self, batch: list[tuple[Job[P, R], Done[R]]]) -> None:
        for job, done in batch:
            if not job.future.done():
                job.future.set_result(done)
        self._check_idle()
