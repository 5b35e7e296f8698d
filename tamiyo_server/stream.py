"""One StreamTelemetry stream: read requests, keep the session, write responses.

Two coroutines per stream: a reader task consumes requests and the RPC's own task
writes responses from a bounded outbound queue. Backpressure instead of loss: the
reader only takes the next request when the queue has room for everything that request
can produce (its own answer, a superseded notice, and the session's pending decision),
so a client that stops reading stops being read (HTTP/2 flow control does the rest), and
the queue never exceeds ``outbound_queue`` + ``_RESERVE`` messages.

Every request gets an explicit outcome: a decision, a degraded decision (shed), or an
in-stream ``StreamError`` naming the field, and the stream goes on; that includes a
message protobuf cannot decode (``decode_guard`` hands it over as an ``Undecodable``
marker). The one exception is a message over ``--max-message-bytes``: gRPC core refuses
it and cancels the call before any of it reaches Python (to the server it looks exactly
like a client that went away), so that stream ends. When the client goes away, the
reader is cancelled and the pending evaluation withdrawn from the batcher, so nothing
leaks.

A SessionOpen costs milliseconds of event loop at the limits (validation, the window),
so re-opens on one stream are paced: one is read at most every ``REOPEN_INTERVAL_S``
(flow control again, nothing refused), so a client re-sending it in a loop cannot starve
the other streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.batcher import Done, Job
from tamiyo_server.decode_guard import Undecodable
from tamiyo_server.metrics import child
from tamiyo_server.pipeline import DecisionPipeline, Evaluated
from tamiyo_server.session import (
    RECENT_DECISIONS,
    FrameRef,
    Pending,
    Session,
    budget_rules,
    deadline_s,
)
from tamiyo_server.validation import (
    ValidationError,
    validate_outcome,
    validate_session_open,
)

log = logging.getLogger(__name__)

Code = pb.StreamErrorCode


_RESERVE = 3  # responses one request can cause beyond the queue bound (see module doc)
_MAX_ECHO = 256  # characters of a refused frame's request_id echoed in the error
_END = None
REOPEN_INTERVAL_S = 0.1
"""Least time, in s, between two SessionOpens read on one stream (the first is read at
once). Why: a maximal open holds the event loop ~4-10 ms, and the answer is one small
``session_accepted``, so the outbound backpressure does not slow a client that re-sends
it in a loop: it starved every other stream (review 15, finding 3). Waiting before
reading the next open (its frames wait behind it, in order) bounds one stream to ~10 %
of the loop; a host's legitimate ``update_session`` is rare and never waits."""
_CUT = pb.StreamTelemetryResponse()  # (identity-compared) end the call with UNAVAILABLE


def _transport_error(e: Exception) -> bool:
    """Whether a failed ``context.write`` means the call is over (the client cancelled or
    the connection broke): grpc raises its core's ``ExecuteBatchError`` (internal, so
    matched by name), a ``UsageError``, an ``RpcError`` or "RPC already finished" then."""
    return isinstance(e, grpc.RpcError | grpc.aio.UsageError | asyncio.InvalidStateError) or (
        type(e).__name__ == "ExecuteBatchError"
    )


def _error(
    code: pb.StreamErrorCode.ValueType,
    message: str,
    field: str = "",
    frame: pb.TelemetryFrame | FrameRef | None = None,
    retry_after_ms: int = 0,
) -> pb.StreamTelemetryResponse:
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


class _Status(NamedTuple):
    """End the call with this status (in the outbound queue in place of ``_END``)."""

    code: grpc.StatusCode
    details: str


class StreamHandler:
    """State and tasks of one stream. ``run`` is awaited by the servicer."""

    def __init__(self, pipeline: DecisionPipeline) -> None:
        self.p = pipeline
        self.limit = max(1, pipeline.config.batch.outbound_queue)
        self.out: asyncio.Queue[pb.StreamTelemetryResponse | _Status | None] = asyncio.Queue()
        self.room = asyncio.Event()
        self.idle = asyncio.Event()  # no evaluation outstanding (any session of the stream)
        self.idle.set()
        # Queued or running evaluations of this stream; several when a SessionOpen
        # replaced the session while its evaluation was in flight (each is answered).
        self.outstanding: set[Job[GraphSnapshot, Evaluated]] = set()
        self.session: Session | None = None
        # Decision id -> the id of the session that made it, for outcomes that arrive
        # after a SessionOpen replaced that session (the client sends its re-open before
        # queued outcomes); the newest RECENT_DECISIONS of the stream. Ids, not sessions:
        # a replaced session's window must not stay alive here.
        self.decided: OrderedDict[str, str] = OrderedDict()
        self.opened_at: float | None = None  # time.monotonic() s of the last SessionOpen
        self.closing = False
        self.ended = asyncio.Event()  # run() returned: the call is over
        self.broken = False  # reading failed: the client went away (not a half-close)

    # ------------------------------------------------------------------ writer side
    async def run(self, requests: AsyncIterator[pb.StreamTelemetryRequest], context: Any) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                msg = await self.out.get()
                if msg is _END:
                    break
                if isinstance(msg, _Status):
                    await context.abort(msg.code, msg.details)
                if msg is _CUT:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "server shut down before this stream ended (the client did not "
                        "half-close after SessionClosing): frames not answered by now "
                        "will not be; reconnect to another replica",
                    )
                self.room.set()
                try:
                    await context.write(msg)
                except Exception as e:
                    if not _transport_error(e):  # ours (say, a message that cannot be
                        raise  # serialized): grpc logs it and ends the call
                    log.debug("stream write ended: %s", e)  # the client went away
                    self.broken = True
                    break
            # The client went away or its deadline passed: grpc reports no code to the
            # server for either, and the metrics would count the call as OK.
            left = context.time_remaining()
            if left is not None and left <= 0:
                context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            elif self.broken:
                context.set_code(grpc.StatusCode.CANCELLED)
        finally:
            reader.cancel()
            for job in list(self.outstanding):
                self.p.batcher.cancel(job)
            await asyncio.gather(reader, return_exceptions=True)
            if self.session is not None:
                self.p.experience.close_session(self.session.session_id)
            self.ended.set()

    def close(self, reason: str, reconnect_after_ms: int = 1000) -> None:
        """Tell the client the server is going away. The stream goes on until the client
        half-closes: frames already on their way are still read and each is answered
        (in-flight evaluations with their decision, later frames with UNAVAILABLE), so
        none goes unanswered; ``cut`` ends a stream whose client does not half-close."""
        if not self.closing:
            self.closing = True
            self.out.put_nowait(
                pb.StreamTelemetryResponse(
                    closing=pb.SessionClosing(reason=reason, reconnect_after_ms=reconnect_after_ms)
                )
            )

    async def finish(self, status: _Status | None = None) -> None:
        """Wait for the pending evaluation to be answered, then end the stream (with
        ``status``, else OK)."""
        await self.idle.wait()
        self.out.put_nowait(_END if status is None else status)

    def cut(self) -> None:
        """End the call now with UNAVAILABLE (shutdown's grace is over and the client has
        not half-closed): the status tells it that frames may have gone unanswered."""
        self.out.put_nowait(_CUT)

    # ------------------------------------------------------------------ reader side
    async def _read(self, requests: AsyncIterator[pb.StreamTelemetryRequest | Undecodable]) -> None:
        end: _Status | None = None
        try:
            async for req in requests:
                # (evaluations of replaced sessions still to answer count as queued)
                while self.out.qsize() + max(len(self.outstanding) - 1, 0) >= self.limit:
                    self.room.clear()
                    await self.room.wait()
                if isinstance(req, Undecodable):  # (decode_guard) the next one is intact
                    self._undecodable(req.error)
                    continue
                if req.WhichOneof("message") == "session_open":
                    await self._pace_open()
                try:
                    self._handle(req)
                except Exception:  # a bug must not end the stream silently
                    log.exception("failed to handle a %s", req.WhichOneof("message"))
                    child(self.p.m.rejected, "internal").inc()
                    self.out.put_nowait(
                        _error(
                            Code.STREAM_ERROR_CODE_INTERNAL,
                            "internal error handling this message (logged on the server)",
                            frame=req.frame if req.WhichOneof("message") == "frame" else None,
                        )
                    )
        except asyncio.CancelledError:
            raise
        except DecodeError as e:  # no decode_guard: the request iterator cannot go on
            self._undecodable(e)
            end = _Status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a message was not a valid StreamTelemetryRequest; later messages were not read",
            )
        except Exception as e:  # transport error while reading: the stream is over
            log.debug("stream read ended: %s", e)
            self.broken = True
        await self.finish(end)

    def _undecodable(self, error: Exception) -> None:
        child(self.p.m.rejected, "undecodable").inc()
        self.out.put_nowait(
            _error(
                Code.STREAM_ERROR_CODE_INVALID_ARGUMENT,
                f"message: not a valid StreamTelemetryRequest ({error})"[:512],
                "message",
            )
        )

    async def _pace_open(self) -> None:
        """Wait until ``REOPEN_INTERVAL_S`` has passed since this stream's last
        SessionOpen (see the constant)."""
        now = time.monotonic()
        if self.opened_at is not None:
            wait = self.opened_at + REOPEN_INTERVAL_S - now
            if wait > 0:
                await asyncio.sleep(wait)
                now = time.monotonic()
        self.opened_at = now

    def _reject(self, err: ValidationError, frame: pb.TelemetryFrame | None = None) -> None:
        child(self.p.m.rejected, err.reason).inc()
        self.out.put_nowait(
            _error(Code.STREAM_ERROR_CODE_INVALID_ARGUMENT, str(err), err.field, frame)
        )

    def _handle(self, req: pb.StreamTelemetryRequest) -> None:
        kind = req.WhichOneof("message")
        if kind == "session_open":
            self._open(req.session_open)
        elif kind == "frame":
            self._frame(req.frame)
        elif kind == "outcome":
            self._outcome(req.outcome)
        else:
            child(self.p.m.rejected, "missing").inc()
            self.out.put_nowait(
                _error(
                    Code.STREAM_ERROR_CODE_INVALID_ARGUMENT,
                    "message: empty request (set session_open, frame or outcome)",
                    "message",
                )
            )

    def _open(self, msg: pb.SessionOpen) -> None:
        try:
            info = validate_session_open(msg, self.p.config.limits)
        except ValidationError as err:
            self._reject(err)
            return
        rules = self.p.rules_for(budget_rules(self.p.config.rules, msg.budget))
        deadline = deadline_s(self.p.config.batch, msg.budget)
        old = self.session
        self.session = Session.open(msg, info, rules, deadline, self.p.config.limits)
        if old is not None:  # update_session: the replaced one ends in the log (its
            # pending evaluation is still answered, and outcomes of its decisions are
            # still accepted: see ``decided``)
            self.p.experience.close_session(old.session_id)
        self.p.experience.open_session(self.session.session_id, msg)
        self.out.put_nowait(
            self.session.accepted(self.p.holder.current.version, self.p.config.limits)
        )

    def _outcome(self, msg: pb.DecisionOutcome) -> None:
        s = self.session
        if s is None:
            self._no_session("outcome")
            return
        try:
            validate_outcome(msg, self.p.config.limits)
        except ValidationError as err:
            self._reject(err)
            return
        session_id = self.decided.get(msg.decision_id)
        if session_id is None:
            child(self.p.m.rejected, "unknown_decision").inc()
            self.out.put_nowait(
                _error(
                    Code.STREAM_ERROR_CODE_NOT_FOUND,
                    f"outcome.decision_id: {msg.decision_id!r} was not decided on this "
                    f"stream (or is older than its last {RECENT_DECISIONS} decisions)",
                    "outcome.decision_id",
                )
            )
            return
        self.p.experience.outcome(session_id, msg)

    def _decided(self, s: Session, decision_id: str) -> None:
        """Remember which session made a decision (the newest ``RECENT_DECISIONS``)."""
        self.decided[decision_id] = s.session_id
        if len(self.decided) > RECENT_DECISIONS:
            self.decided.popitem(last=False)

    def _no_session(self, what: str) -> None:
        child(self.p.m.rejected, "no_session").inc()
        self.out.put_nowait(
            _error(
                Code.STREAM_ERROR_CODE_FAILED_PRECONDITION,
                f"{what}: no session yet; send session_open first",
                "session_open",
            )
        )

    def _frame(self, frame: pb.TelemetryFrame) -> None:
        arrival = time.monotonic()
        s = self.session
        if s is None:
            self._no_session("frame")
            return
        swamp = self.p.door.swamped(s.deadline_s) if frame.want_decision else ""
        if swamp == "refuse":
            # The event loop is far behind: every frame still in the transport is late.
            # Answer at the cheapest possible cost (no validation, no history update) so
            # the backlog drains and nothing goes unanswered; say the telemetry was dropped.
            child(self.p.m.shed, "swamped").inc()
            lag_ms = self.p.door.loop_lag_s * 1000.0
            self.out.put_nowait(
                _error(
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
                _error(
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
            resp = _error(
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
            _error(
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
                _error(
                    Code.STREAM_ERROR_CODE_INTERNAL,
                    "internal error deciding this frame (logged on the server)",
                    frame=pending.frame,
                )
            )
            return
        self._decided(s, d.decision_id)
        self.p.experience.decision(s.session_id, d)
        self.out.put_nowait(resp)
