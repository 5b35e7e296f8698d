"""The asyncio streaming client: one StreamTelemetry session that survives outages.

Why it is built this way:

- **The training step never waits.** ``send_frame`` and ``report_outcome`` only append
  to bounded buffers (``CoalescingBuffer`` for frames, a deque for outcomes) and wake
  the event loop; they are safe to call from any thread. If the server is slow (the
  stream is flow-controlled) or gone, frames coalesce, latest wins, and the step goes on
  without a decision.
- **Outages are routine.** Any broken stream is reopened after an exponential backoff
  with jitter (reset once a session is accepted) on a fresh channel, and SessionOpen is
  sent again first, so the new server (or replica) knows the topology. A
  ``SessionClosing`` hint from a draining server is honoured as the minimum wait.
- **Only configuration errors stop it**: UNAUTHENTICATED, PERMISSION_DENIED,
  UNIMPLEMENTED, INVALID_ARGUMENT, or an in-stream error answering SessionOpen. Then
  ``last_error`` says why; frames are still accepted (and coalesced), nothing raises
  into the training loop, and decision iterators end with ``ClientError``.
- **Pushback is honoured.** An overload refusal (RESOURCE_EXHAUSTED) carrying
  ``StreamError.retry_after_ms`` stops this stream from asking for decisions for that
  long: frames still go out (telemetry keeps flowing), with ``want_decision`` cleared
  (``stats.decision_requests_deferred``), so a loaded server is not asked again at once.
  A SessionOpen refused for load is sent again after its pushback: a first one on a new
  stream (``grpc-retry-pushback-ms``), an ``update_session`` in-stream, the latest
  topology only, frames waiting for it (``stats.session_updates_refused``).
- **A clean exit ends the RPC with OK.** ``close()`` writes what is pending, half-closes
  the request stream and reads on until the server, having answered every frame it got,
  ends the stream (bounded by ``answer_timeout_s``); only then is anything cancelled. So
  a finished job is not counted as a ``CANCELLED`` RPC on the server, and a decision
  asked for just before the exit still arrives.

Decisions arrive via ``decisions()`` (async iterator) or ``add_callback`` (called on the
event loop thread). Latency is client-observed: from the frame's write to the decision's
read, in ms, matched by the frame's ``request_id`` (assigned here when empty).

This module is what callers use; the connection loop (dial, SessionOpen, writer and
reader, reconnect with backoff) is ``tamiyo_client.connection``, the check of the target
string ``tamiyo_client.target``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
from collections import deque

from tamiyo.config import ClientConfig
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.coalesce import CoalescingBuffer, Frame
from tamiyo_client.connection import FATAL_CODES, Call, StreamConnection
from tamiyo_client.frame_data import resolve_form
from tamiyo_client.received import (
    ClientError,
    ClientStats,
    DecisionCallback,
    DecisionStream,
    ErrorCallback,
    ReceivedDecision,
)
from tamiyo_client.security import ClientSecurity
from tamiyo_client.target import check_target

__all__ = [
    "CLOSE_ANSWER_TIMEOUT_S",
    "FATAL_CODES",
    "Call",
    "ClientError",
    "ClientStats",
    "DecisionStream",
    "ReceivedDecision",
    "TamiyoClient",
    "check_target",
]

log = logging.getLogger(__name__)
FIRST = asyncio.FIRST_COMPLETED

CLOSE_ANSWER_TIMEOUT_S = 2.0
"""How long ``TamiyoClient.close`` waits, by default, after half-closing the stream for the
server to answer the frames in flight and end the RPC with OK (it answers within its
decision deadline, milliseconds, when healthy). Before: close cancelled the RPC, so every
clean job exit counted as ``CANCELLED`` in ``grpc_server_handled_total`` and a decision
still in flight was lost (QA 16, M3)."""


class TamiyoClient(StreamConnection):
    """Asyncio client for one host session. ``await start()`` inside the loop that will
    run it (or use ``async with``); the send methods may be called from any thread."""

    def __init__(
        self,
        session_open: pb.SessionOpen,
        config: ClientConfig | None = None,
        security: ClientSecurity | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        resolve_form(self.config.signal_form, 0, 0)  # raises ValueError when unknown
        check_target(self.config.target)
        self.security = security or ClientSecurity()
        self._session_open = self._with_budget(session_open)
        self._rng = rng
        self.stats = ClientStats()
        self.session_id = ""
        self.policy_version = ""
        self.decision_deadline_ms = 0  # in force for the session, from SessionAccepted
        self.last_error = ""
        self.fatal_error = ""
        self.stream_errors: deque[pb.StreamError] = deque(maxlen=100)
        self._frames = CoalescingBuffer(self.config.frame_buffer, on_put=self._wake_threadsafe)
        self._outcomes: deque[pb.DecisionOutcome] = deque()
        self._outcome_lock = threading.Lock()
        # decision id -> the connection (session) it came on; an outcome still queued when
        # that session ended cannot be matched by the next one (the server would answer
        # NOT_FOUND), so it is dropped and counted instead of sent
        self._decided_on: dict[str, int] = {}
        self._in_flight = 0  # popped from a buffer, its call.write not yet returned
        self._pushback_until = 0.0  # time.monotonic() before which no decision is asked
        self._ids = itertools.count(1)
        self._sent_at: dict[str, float] = {}
        self._callbacks: list[DecisionCallback] = []
        self._error_callbacks: list[ErrorCallback] = []
        self._queues: list[asyncio.Queue[ReceivedDecision | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake_scheduled = False
        self._live = False  # a session is accepted and its writer runs (read from any thread)
        self._reopen = False
        self._open_lock = threading.Lock()
        self._open_gen = 0
        self._gen_sent = 0
        self._reopen_at = 0.0
        self._reopens_refused = 0
        self._hold_until = 0.0
        self._server_hint_s = 0.0
        self._server_closing = False  # SessionClosing seen on this stream: half-close it
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _with_budget(self, so: pb.SessionOpen) -> pb.SessionOpen:
        if self.config.decision_deadline_ms and not so.budget.decision_deadline_ms:
            so = pb.SessionOpen.FromString(so.SerializeToString())
            so.budget.decision_deadline_ms = self.config.decision_deadline_ms
        return so

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("client already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._drained = asyncio.Event()  # set by the writer each time it empties the buffers
        self._half_closed = asyncio.Event()  # set by the writer after done_writing()
        self._task = asyncio.create_task(self._run(), name="tamiyo-client")

    async def close(
        self, flush_timeout_s: float = 1.0, answer_timeout_s: float = CLOSE_ANSWER_TIMEOUT_S
    ) -> None:
        """End the stream the way a finished job should: write what is pending and
        half-close the request stream (within ``flush_timeout_s``), then wait up to
        ``answer_timeout_s`` for the server to answer the frames it has (those decisions
        are delivered as usual, before the iterators end) and end the RPC with OK. Only
        what is still running then is cancelled: a server that is gone or does not answer
        costs at most the two timeouts. Not connected (no server, reconnecting): cancelled
        at once. No reconnect is attempted once ``close`` has begun."""
        task = self._task
        if task is None:
            return
        self._closing = True
        if self.connected and not task.done():
            self._wake.set()  # the writer flushes, then half-closes (connection.py)
            half = asyncio.ensure_future(self._half_closed.wait())
            try:
                await asyncio.wait({task, half}, timeout=flush_timeout_s, return_when=FIRST)
            finally:
                half.cancel()
            if self._half_closed.is_set() and not task.done():
                await asyncio.wait({task}, timeout=answer_timeout_s)  # the server's OK
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._finish_iterators()

    async def __aenter__(self) -> TamiyoClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._task is not None and self._connected.is_set()

    @property
    def stopped(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once a session is accepted (now or within ``timeout_s``). False at once
        when the client has stopped (``fatal_error``: it will never connect), instead of
        after ``timeout_s`` (a wrong token cost ``make demo`` its 60 s; QA 16, L1)."""
        task = self._task
        if task is None:
            return False
        if not self._connected.is_set() and not task.done():
            accepted = asyncio.ensure_future(self._connected.wait())
            try:
                await asyncio.wait({task, accepted}, timeout=timeout_s, return_when=FIRST)
            finally:
                accepted.cancel()
        return self._connected.is_set()

    def pending(self) -> int:
        """Frames and outcomes not yet written to the stream."""
        with self._outcome_lock:
            outcomes = len(self._outcomes)
        return len(self._frames) + outcomes + self._in_flight

    # -- what the training loop calls (any thread, never blocks) -------------------
    def send_frame(self, frame: Frame) -> None:
        """Queue a frame. Assigns ``frame.request_id`` when a decision is wanted and the
        id is empty, and ``frame.client_clock_us`` (now: the decision's budget runs from
        the moment it was asked for, queueing here included) when it is 0: pass a fresh
        frame each time, since a re-sent one keeps its first stamp and is judged late.
        Returns at once; coalesces when the stream cannot keep up.

        Pass ``KasminaHost.frame_data()`` (a ``FrameData``) from a training loop: its
        protobuf is built on the client's thread, in ``config.signal_form``. A
        ``TelemetryFrame`` is sent as it is."""
        if frame.want_decision and not frame.request_id:
            frame.request_id = f"f{next(self._ids)}"
        if not frame.client_clock_us:  # the decision budget runs from now (server: transit)
            frame.client_clock_us = time.monotonic_ns() // 1000
        self.stats.frames_submitted += 1
        self._frames.put(frame)

    def report_outcome(self, outcome: pb.DecisionOutcome) -> None:
        """Queue a DecisionOutcome; beyond ``outcome_buffer`` the oldest is dropped."""
        with self._outcome_lock:
            if len(self._outcomes) >= self.config.outcome_buffer:
                self._outcomes.popleft()
                self.stats.outcomes_dropped += 1
            self._outcomes.append(outcome)
        self._wake_threadsafe()

    def update_session(self, session_open: pb.SessionOpen) -> None:
        """Replace the topology/kernels: sent now if connected, and on every reconnect.
        The server may refuse it for load (its previous session stays in force): then it
        is sent again after the server's pushback (``stats.session_updates_refused``,
        ``last_error``); the new ``session_id`` says it is in force."""
        so = self._with_budget(session_open)
        with self._open_lock:
            self._session_open = so
            self._open_gen += 1
            self._reopen = True
        self._wake_threadsafe()

    @property
    def frames_coalesced(self) -> int:
        return self._frames.coalesced

    # -- decisions -----------------------------------------------------------------
    def add_callback(self, on_decision: DecisionCallback) -> None:
        """Call ``on_decision`` for every decision, on the event loop thread. It must be
        quick; exceptions are logged and swallowed."""
        self._callbacks.append(on_decision)

    def add_error_callback(self, on_error: ErrorCallback) -> None:
        self._error_callbacks.append(on_error)

    def decisions(self) -> DecisionStream:
        """Every decision from this call on, in arrival order (``async for``). Ends when
        the client is closed; raises ClientError if it stopped on a fatal error. A slow
        consumer loses the oldest beyond ``decision_buffer`` (``stats.decisions_dropped``).
        """
        return DecisionStream(self._queues, lambda: self.fatal_error)

    def _deliver(self, decision: decision_pb2.AdaptationDecision, connection: int) -> None:
        sent = self._sent_at.pop(decision.frame_request_id, None)
        latency = (time.monotonic() - sent) * 1e3 if sent is not None else None
        received = ReceivedDecision(decision, latency, self.session_id, connection)
        self.stats.decisions += 1
        self._decided_on[decision.decision_id] = connection
        if len(self._decided_on) > 4096:  # only recent decisions can still get an outcome
            self._decided_on.pop(next(iter(self._decided_on)))
        if latency is not None:
            self.stats.latencies_ms.append(latency)
        for queue in self._queues:
            if queue.qsize() >= self.config.decision_buffer:
                queue.get_nowait()
                self.stats.decisions_dropped += 1
            queue.put_nowait(received)
        for cb in self._callbacks:
            try:
                cb(received)
            except Exception:
                log.exception("decision callback failed")

    def _finish_iterators(self) -> None:
        for queue in self._queues:
            queue.put_nowait(None)

    # -- the connection loop -------------------------------------------------------
    def _wake_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or self._task is None or not self._live:
            return  # no writer to wake while disconnected; connecting flushes the buffer
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        elif not self._wake_scheduled:
            self._wake_scheduled = True
            try:
                loop.call_soon_threadsafe(self._do_wake)
            except RuntimeError:  # loop closed: the client is gone, nothing to wake
                self._wake_scheduled = False

    def _do_wake(self) -> None:
        self._wake_scheduled = False
        self._wake.set()
