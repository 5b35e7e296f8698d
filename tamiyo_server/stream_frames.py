"""A telemetry frame's way to its decision on one stream: admission at the door, the
session's window, one pending evaluation per session, and the answer.

``StreamHandler`` (``tamiyo_server.stream``: reading, writing, flow control, sessions)
hands each frame to ``FrameFlow._frame``, in stream order on the event loop:

* Swamped loop (``Door.swamped``): answered at once, unprocessed (RESOURCE_EXHAUSTED
  with pushback), so a backlog drains at the cheapest cost.
* Otherwise the frame is checked and written into the session's window (its telemetry
  is kept even if no decision follows), and logged for experience.
* A frame that wants a decision is judged against its budget, which runs from when the
  host asked (``client_clock_us``, ``tamiyo_server.transit``): one that cannot make it
  (the queued work and the loop's lag, plus its own wait) is refused at once; one that
  can replaces the session's queued evaluation if there is one (the old frame gets a
  "superseded" answer: one pending evaluation per session) or is submitted to the
  batcher; a full batcher queue gets a rules-only decision now.
* When the evaluation is done (``_answered``) the decision is built and queued for the
  writer; a bug there answers INTERNAL for that frame, never silence.
* A session that is no longer the stream's (replaced by a SessionOpen, or its stream
  ended) ends in the experience log only once its pending evaluation is answered
  (``_retire``), so its last decision is logged before its end.

Why a module of its own: this is the per-frame hot path and the overload policy of a
stream, read and tuned apart from the transport around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from functools import partial
from typing import Any

from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.batcher import Done, Job
from tamiyo_server.metrics import child
from tamiyo_server.pipeline import DecisionPipeline, Evaluated
from tamiyo_server.session import RECENT_DECISIONS, FrameRef, Pending, Session
from tamiyo_server.validation import ValidationError

log = logging.getLogger("tamiyo_server.stream")  # (the stream's: one logger per stream path)

Code = pb.StreamErrorCode
_MAX_ECHO = 256  # characters of a refused frame's request_id echoed in the error


def stream_error(
    code: pb.StreamErrorCode.ValueType,
    message: str,
    field: str = "",
    frame: pb.TelemetryFrame | FrameRef | None = None,
    retry_after_ms: int = 0,
) -> pb.StreamTelemetryResponse:
    """An in-stream ``StreamError`` response naming the field (and the frame it answers,
    its request id cut to ``_MAX_ECHO`` characters; ``retry_after_ms``: pushback)."""
    # (fields set in place: ~2.5x cheaper than building a StreamError and copying it in,
    # and the shed paths answer nearly every frame under overload)
    resp = pb.StreamTelemetryResponse()
    err = resp.error
    err.SetInParent()  # (the oneof is "error" even if every field were empty)
    err.code = code
    err.message = message
    err.field = field
    if frame is not None:
        err.frame_step = frame.step
        # (cut: a refused frame's id may be the oversized field; 1 MB came back whole)
        err.frame_request_id = frame.request_id[:_MAX_ECHO]
    if retry_after_ms:
        err.retry_after_ms = retry_after_ms
    return resp


class FrameFlow:
    """The frame handling of ``StreamHandler`` (its base class, not used alone:
    ``StreamHandler.__init__`` sets the attributes declared here)."""

    p: DecisionPipeline
    out: asyncio.Queue[Any]  # StreamHandler.out: responses, and its end markers
    idle: asyncio.Event
    outstanding: set[Job[GraphSnapshot, Evaluated]]
    session: Session | None
    decided: OrderedDict[str, str]  # decision id -> session id (see StreamHandler)
    closing: bool

    def _reject(self, err: ValidationError, frame: pb.TelemetryFrame | None = None) -> None:
        child(self.p.m.rejected, err.reason).inc()
        self.out.put_nowait(
            stream_error(Code.STREAM_ERROR_CODE_INVALID_ARGUMENT, str(err), err.field, frame)
        )

    def _decided(self, s: Session, decision_id: str) -> None:
        """Remember which session made a decision (the newest ``RECENT_DECISIONS``)."""
        self.decided[decision_id] = s.session_id
        if len(self.decided) > RECENT_DECISIONS:
            self.decided.popitem(last=False)

    def _retire(self, s: Session) -> None:
        """``s`` is no longer the stream's session (a SessionOpen replaced it, or the
        stream ended): end it in the experience log now if nothing of it is in flight,
        else when its pending evaluation is answered, dropped or shed (``_answered``).
        Why not at once: the experience process then got the session's end before the
        in-flight decision, dropped the session, counted the decision "unmatched" (its
        data-loss signal) and stored its outcome without it (review 15b, finding 2).
        Each replaced session waits for its own evaluation, however many re-opens follow."""
        s.retired = True
        if s.pending is None:
            self._end_in_log(s)

    def _end_in_log(self, s: Session) -> None:
        if not s.logged_end:
            s.logged_end = True
            self.p.experience.close_session(s.session_id)

    def _no_session(self, what: str, frame: pb.TelemetryFrame | None = None) -> None:
        """Refuse a message sent before SessionOpen; a frame's answer names it by step
        and request id, as every other frame error does (QA N4: it carried neither, so a
        client matching answers to frames could not tell which one was refused)."""
        child(self.p.m.rejected, "no_session").inc()
        self.out.put_nowait(
            stream_error(
                Code.STREAM_ERROR_CODE_FAILED_PRECONDITION,
                f"{what}: no session yet; send session_open first",
                "session_open",
                frame,
            )
        )

    def _frame(self, frame: pb.TelemetryFrame) -> None:
        arrival = time.monotonic()
        s = self.session
        if s is None:
            self._no_session("frame", frame)
            return
        swamp = self.p.door.swamped(s.deadline_s) if frame.want_decision else ""
        if swamp == "refuse":
            # The event loop is far behind: every frame still in the transport is late.
            # Answer at the cheapest possible cost (no validation, no history update) so
            # the backlog drains and nothing goes unanswered; say the telemetry was dropped.
            child(self.p.m.shed, "swamped").inc()
            lag_ms = self.p.door.loop_lag_s * 1000.0
            self.out.put_nowait(
                stream_error(
                    Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
                    f"shed: server overloaded (event loop {lag_ms:.0f} ms behind); this "
                    "frame was not processed and its telemetry was dropped",
                    "frame",
                    frame,
                    self.p.door.pushback_ms(lag_ms),
                )
            )
            return
        try:
            s.ingest(frame, self.p.config.limits)
        except ValidationError as err:
            self._reject(err, frame)
            return
        self.p.experience.frame(s, frame)
        # Time already spent since the host asked (0 without a client clock): the
        # budget runs from then (see tamiyo_server.transit).
        waited = (
            self.p.door.transit_wait(
                s.transit, frame.client_clock_us, arrival, s.deadline_s, s.host_id
            )
            if frame.client_clock_us
            else 0.0
        )
        if not frame.want_decision:
            return
        if self.closing or self.p.closing:
            self.out.put_nowait(
                stream_error(
                    Code.STREAM_ERROR_CODE_UNAVAILABLE,
                    "server is shutting down; reconnect to another replica",
                    frame=frame,
                )
            )
            return
        budget_ms = s.deadline_s * 1000.0
        deadline = arrival - waited + s.deadline_s
        # (the lag: see Door.swamped; the deadline: only work due no later is ahead)
        ahead_ms = self.p.door.ahead_ms(lag=swamp != "probe", deadline=deadline)
        # A frame that replaces this session's queued evaluation adds no work. The job
        # then answers by the frame's own deadline; a hopeless frame (one that cannot
        # make its own) may only take it if asked no earlier, and the job keeps its
        # deadline, which it was on course to make.
        queued = s.pending if s.pending is not None and s.pending.job.queued else None
        hopeless = ahead_ms + waited * 1000.0 > budget_ms
        if hopeless and not (queued is not None and deadline >= queued.job.deadline):
            self._refuse_hopeless(frame, ahead_ms, waited, budget_ms)
            return
        asked = arrival - waited if frame.client_clock_us else None
        ref = FrameRef(frame.step, frame.epoch, frame.request_id, arrival, asked)
        snap = s.snapshot(frame)
        if queued is not None and self.p.batcher.replace(
            queued.job, snap, snap.topology.num_nodes, s.num_edges, None if hopeless else deadline
        ):
            old, queued.frame = queued.frame, ref
            child(self.p.m.shed, "superseded").inc()
            resp = stream_error(
                Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
                f"frame step {old.step} superseded by step {frame.step} before "
                "it was evaluated (one pending evaluation per session)",
                "frame",
            )
            resp.error.frame_step = old.step
            resp.error.frame_request_id = old.request_id
            self.out.put_nowait(resp)
            return
        if hopeless:  # it could only have replaced the pending job, which just started
            self._refuse_hopeless(frame, ahead_ms, waited, budget_ms)
            return
        job = self.p.submit(snap, s.num_edges, arrival, deadline)
        if job is None:  # queue full: answer now from the rules alone
            resp = pb.StreamTelemetryResponse()
            d = self.p.decision(
                None, snap, s.rules, s.rule_state, ref, "stream", "queue_full", resp.decision
            )
            self._decided(s, d.decision_id)
            self.p.experience.decision(s.session_id, d)
            self.out.put_nowait(resp)
            return
        pending = Pending(job, ref)
        s.pending = pending
        self.outstanding.add(job)
        self.idle.clear()
        job.future.add_done_callback(partial(self._answered, s, pending))

    def _refuse_hopeless(
        self, frame: pb.TelemetryFrame, ahead_ms: float, waited: float, budget_ms: float
    ) -> None:
        """Answer a frame that cannot make its budget at once, cheaply (no snapshot, no
        featurize), so overload sheds at the door instead of in the batcher (see
        ``Door.ahead_ms``); its telemetry was recorded."""
        if ahead_ms > budget_ms:
            reason = "overload"
            why = (
                f"the queued work and the event loop's lag alone need {ahead_ms:.1f} ms, "
                f"more than the {budget_ms:.0f} ms decision deadline"
            )
        else:
            reason = "late"
            why = (
                f"the frame waited {waited * 1000.0:.1f} ms before it was read and the "
                f"server needs {ahead_ms:.1f} ms (queued work and event-loop lag) of "
                f"its {budget_ms:.0f} ms budget"
            )
        child(self.p.m.shed, reason).inc()
        self.out.put_nowait(
            stream_error(
                Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
                f"shed: overloaded, {why}; telemetry was recorded, ask again with a later frame",
                "frame.want_decision",
                frame,
                self.p.door.pushback_ms(max(ahead_ms, waited * 1000.0)),
            )
        )

    def _answered(self, s: Session, pending: Pending, fut: asyncio.Future[Done[Evaluated]]) -> None:
        if s.pending is pending:
            s.pending = None
        self.outstanding.discard(pending.job)
        if not self.outstanding:
            self.idle.set()
        try:
            self._answer(s, pending, fut)
        finally:  # (a retired session's last decision is logged by now: see _retire)
            if s.retired and s.pending is None:
                self._end_in_log(s)

    def _answer(self, s: Session, pending: Pending, fut: asyncio.Future[Done[Evaluated]]) -> None:
        if fut.cancelled():
            return
        done = fut.result()
        resp = pb.StreamTelemetryResponse()
        try:
            d = self.p.decision(
                done,
                pending.job.payload,
                s.rules,
                s.rule_state,
                pending.frame,
                "stream",
                into=resp.decision,
            )
        except Exception:  # a bug must not leave the frame unanswered
            log.exception("failed to build the decision for a frame")
            child(self.p.m.rejected, "internal").inc()
            self.out.put_nowait(
                stream_error(
                    Code.STREAM_ERROR_CODE_INTERNAL,
                    "internal error deciding this frame (logged on the server)",
                    frame=pending.frame,
                )
            )
            return
        self._decided(s, d.decision_id)
        self.p.experience.decision(s.session_id, d)
        self.out.put_nowait(resp)
