"""Running one closed batch: shed answers first, the runner timed into the cost model,
and failures kept to the graphs that caused them.

The batcher (``tamiyo_server.batcher``) decides where this runs (event loop or inference
thread) and how answers reach their futures (``post``); the queue
(``tamiyo_server.batch_queue``) decided what the batch holds. What happens to a batch of
(to run, to shed) jobs, in order:

* The jobs to shed are answered at once (``shed="deadline"``), before the batch runs,
  so they do not wait for it; ``prepare_shed`` turns their payloads into what the
  degraded answer needs, off the event loop in thread mode.
* Every job's wait in the queue is recorded (``tamiyo_queue_delay_seconds``, outcome
  ``run`` or ``shed``): the shed ones are the longest waits, and without them the
  histogram read low exactly under overload.
* The runner runs the rest, timed from then on (preparing the shed answers is not
  inference: counting it fed back until every job was shed), and the measured time
  teaches the :class:`CostModel` that the queue's closing rule predicts with.
* A failing batch is retried graph by graph, so one graph the runner cannot take fails
  only its own job (``shed="error"``). When every graph fails alone too, the runner
  itself is broken: later failing batches fail whole, without that pass, until one
  succeeds.
* A pessimistic cost model sheds everything and so measures nothing: when only shed jobs
  were seen for ``probe_interval_s``, one of them is run as a probe, for timing only
  (it was answered degraded already).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from tamiyo_server.batch_queue import Done, Job
from tamiyo_server.cost_model import CostModel
from tamiyo_server.metrics import ServerMetrics, child

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

PROBE_INTERVAL_S = 0.1  # see BatchExecutor._probe


class BatchExecutor(Generic[P, R]):
    """Runs closed batches with ``runner(payloads) -> results`` and hands each job's
    :class:`Done` to ``post`` (a list per call: the shed ones, then the batch's)."""

    def __init__(
        self,
        runner: Callable[[Sequence[P]], Sequence[R]],
        cost: CostModel,
        post: Callable[[list[tuple[Job[P, R], Done[R]]]], None],
        metrics: ServerMetrics | None = None,
        prepare_shed: Callable[[Sequence[P]], Sequence[object]] | None = None,
    ) -> None:
        self.runner = runner
        self.cost = cost
        self._post = post
        self._m = metrics
        self._prepare_shed = prepare_shed
        self._runner_broken = False  # see _one_by_one
        self._last_run = time.monotonic()  # end of the last measured batch
        self.probe_interval_s = PROBE_INTERVAL_S

    def execute(self, run: list[Job[P, R]], shed: list[Job[P, R]]) -> None:
        """Answer ``shed``, then run ``run`` as one batch (see the module doc)."""
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
            if self._m is not None:  # (their wait counts too: the longest ones, in overload)
                waited = child(self._m.queue_seconds, "shed")
                for j in shed:
                    waited.observe(start - j.arrival)
        out: list[tuple[Job[P, R], Done[R]]] = []
        if run:
            # Timed from here: preparing the shed answers above is not inference. Counting
            # it fed back (more shed → "slower" batches → higher predictions → more shed)
            # until every job was shed.
            start = time.monotonic()
            nodes = sum(j.nodes for j in run)
            try:
                results = self.runner([j.payload for j in run])
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
            if self._m is not None:  # (a failed batch's jobs ran; _one_by_one may shed)
                ran = child(self._m.queue_seconds, "run")
                late = child(self._m.queue_seconds, "shed")
                for _, done in out:
                    (late if done.shed == "deadline" else ran).observe(done.queue_s)
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
                (r,) = self.runner([j.payload])
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
            self.runner([job.payload])
        except Exception:  # a failure says nothing about how long a batch takes
            log.exception("probe inference failed")
            self._last_run = time.monotonic()
            return
        self._last_run = time.monotonic()
        self.cost.update(job.nodes, 1, (self._last_run - start) * 1000.0)
