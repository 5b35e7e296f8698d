"""One StreamTelemetry stream: read requests, keep the session, write responses (a
frame's way to its decision is ``tamiyo_server.stream_frames``, this class's base).

Two coroutines per stream: a reader task consumes requests and the RPC's own task
writes responses from a bounded outbound queue. Backpressure instead of loss: the
reader only takes the next request when the queue has room for everything that request
can produce (its own answer, a superseded notice, and the session's pending decision),
so a client that stops reading stops being read (HTTP/2 flow control does the rest), and
the queue never exceeds ``outbound_queue`` + ``_RESERVE`` messages.

Every request gets an explicit outcome: a decision, a degraded decision (shed), or an
in-stream ``StreamError`` naming the field, and the stream goes on; that includes a
message protobuf cannot decode (``decode_guard`` hands it over as an ``Undecodable``
marker). The one exception is a message over ``Limits.max_message_bytes`` (4 MiB, set
in code): gRPC core refuses
it and cancels the call before any of it reaches Python (to the server it looks exactly
like a client that went away), so that stream ends. When the client goes away, the
reader is cancelled and the pending evaluation withdrawn from the batcher, so nothing
leaks. A stream ends OK only when the client half-closed: grpc ends the request iterator
the same way when the client cancels, so a stream that wrote nothing since its requests
ended writes one empty response before its OK (only a half-closed call takes it; a
cancelled one ends CANCELLED, as ``grpc_server_handled_total`` counts it).

A SessionOpen costs milliseconds of event loop at the limits (validation, the window),
so re-opens on one stream are paced: one is read at most every ``REOPEN_INTERVAL_S``
(flow control again, nothing refused), and every open, first or not, then waits for its
turn server-wide (``tamiyo_server.open_admission``: open work gets a share of the loop,
so many streams opening at once cannot starve the others either). An open that would
wait too long is refused RESOURCE_EXHAUSTED with pushback: in-stream for a re-open (the
session in force stays), as the call's status for a stream's first open (a stream
without a session has nothing to go on with, and the client reconnects after its
backoff instead of stopping, as it does on an error answering its first open).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.batcher import Job
from tamiyo_server.decode_guard import Undecodable
from tamiyo_server.metrics import child
from tamiyo_server.open_admission import OpenRefusedError
from tamiyo_server.pipeline import DecisionPipeline, Evaluated
from tamiyo_server.session import RECENT_DECISIONS, Session, budget_rules, deadline_s
from tamiyo_server.stream_frames import Code, FrameFlow, stream_error
from tamiyo_server.validation import (
    ValidationError,
    validate_outcome,
    validate_session_open,
)

log = logging.getLogger(__name__)


_RESERVE = 3  # responses one request can cause beyond the queue bound (see module doc)
_END = None
REOPEN_INTERVAL_S = 0.1
"""Least time, in s, between two SessionOpens read on one stream (the first is read at
once). Why: a maximal open holds the event loop ~4-10 ms, and the answer is one small
``session_accepted``, so the outbound backpressure does not slow a client that re-sends
it in a loop: it starved every other stream (review 15, finding 3). Waiting before
reading the next open (its frames wait behind it, in order) bounds one stream to ~10 %
of the loop; a host's legitimate ``update_session`` is rare and never waits."""
_CUT = pb.StreamTelemetryResponse()  # (identity-compared) end the call with UNAVAILABLE
_PROBE = pb.StreamTelemetryResponse()  # (identity-compared) is the call half-closed? (run)


def _transportstream_error(e: Exception) -> bool:
    """Whether a failed ``context.write`` means the call is over (the client cancelled or
    the connection broke): grpc raises its core's ``ExecuteBatchError`` (internal, so
    matched by name), a ``UsageError``, an ``RpcError`` or "RPC already finished" then."""
    return isinstance(e, grpc.RpcError | grpc.aio.UsageError | asyncio.InvalidStateError) or (
        type(e).__name__ == "ExecuteBatchError"
    )


class _Status(NamedTuple):
    """End the call with this status (in the outbound queue in place of ``_END``), and
    ``retry_after_ms`` > 0 as gRPC's ``grpc-retry-pushback-ms`` trailer."""

    code: grpc.StatusCode
    details: str
    retry_after_ms: int = 0


class StreamHandler(FrameFlow):
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
        self.requests_ended = False  # the request iterator ended: a half-close, or a cancel
        self.half_closed = False  # a write begun after that went through: a half-close

    # ------------------------------------------------------------------ writer side
    async def run(self, requests: AsyncIterator[pb.StreamTelemetryRequest], context: Any) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                msg = await self.out.get()
                if msg is _END:
                    if self.half_closed or self.broken:
                        break
                    # The requests ended and nothing was written since: a half-close
                    # or a client's cancel, which grpc ends the iterator for alike and
                    # cancels this task for only when the core's close event comes in,
                    # sometimes after our OK (then counted OK: ~1 idle cancel in 5-30).
                    # Only a half-closed call takes a write (a cancelled one fails it,
                    # or holds it until that cancel): an empty response, ignored by
                    # clients (a oneof they do not know looks the same).
                    msg = _PROBE
                if isinstance(msg, _Status):
                    back = msg.retry_after_ms
                    trailer = (("grpc-retry-pushback-ms", str(back)),) if back else ()
                    await context.abort(msg.code, msg.details, trailer)
                if msg is _CUT:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "server shut down before this stream ended (the client did not "
                        "half-close after SessionClosing): frames not answered by now "
                        "will not be; reconnect to another replica",
                    )
                self.room.set()
                after_end = self.requests_ended  # (before the write: see the _END probe)
                try:
                    await context.write(msg)
                except Exception as e:
                    if not _transportstream_error(e):  # ours (say, a message that cannot be
                        raise  # serialized): grpc logs it and ends the call
                    log.debug("stream write ended: %s", e)  # the client went away
                    self.broken = True
                    break
                if after_end:
                    self.half_closed = True
                if msg is _PROBE:
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
            if self.session is not None:  # (ends in the log once its evaluation is answered)
                self._retire(self.session)
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
                kind = req.WhichOneof("message")  # (read once per message)
                if kind != "session_open":
                    self._dispatch(req, kind)
                    continue
                await self._pace_open()
                try:
                    async with self.p.door.opens.turn(req.session_open):
                        self._dispatch(req, kind)
                except OpenRefusedError as r:
                    child(self.p.m.shed, "open_overload").inc()
                    if self.session is None:  # a fresh stream: end the call (module doc)
                        end = _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(r), r.retry_after_ms)
                        break
                    self.out.put_nowait(
                        stream_error(
                            Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
                            f"{r}; session {self.session.session_id} stays in force",
                            "session_open",
                            retry_after_ms=r.retry_after_ms,
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
        self.requests_ended = end is None and not self.broken
        await self.finish(end)

    def _dispatch(self, req: pb.StreamTelemetryRequest, kind: str | None) -> None:
        """``_handle``, where a bug answers INTERNAL and the stream goes on."""
        try:
            self._handle(req, kind)
        except Exception:  # a bug must not end the stream silently
            log.exception("failed to handle a %s", kind)
            child(self.p.m.rejected, "internal").inc()
            self.out.put_nowait(
                stream_error(
                    Code.STREAM_ERROR_CODE_INTERNAL,
                    "internal error handling this message (logged on the server)",
                    frame=req.frame if kind == "frame" else None,
                )
            )

    def _undecodable(self, error: Exception) -> None:
        child(self.p.m.rejected, "undecodable").inc()
        self.out.put_nowait(
            stream_error(
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

    def _handle(self, req: pb.StreamTelemetryRequest, kind: str | None) -> None:
        """Dispatch one decoded request by its ``message`` oneof (``kind``)."""
        if kind == "session_open":
            self._open(req.session_open)
        elif kind == "frame":
            self._frame(req.frame)
        elif kind == "outcome":
            self._outcome(req.outcome)
        else:
            child(self.p.m.rejected, "missing").inc()
            self.out.put_nowait(
                stream_error(
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
        if old is not None:  # update_session: the replaced one ends in the log once its
            # pending evaluation is answered (FrameFlow._retire); outcomes of its
            # decisions are still accepted (see ``decided``)
            self._retire(old)
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
                stream_error(
                    Code.STREAM_ERROR_CODE_NOT_FOUND,
                    f"outcome.decision_id: {msg.decision_id!r} was not decided on this "
                    f"stream (or is older than its last {RECENT_DECISIONS} decisions)",
                    "outcome.decision_id",
                )
            )
            return
        self.p.experience.outcome(session_id, msg)
