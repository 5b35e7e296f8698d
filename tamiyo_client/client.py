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

Decisions arrive via ``decisions()`` (async iterator) or ``add_callback`` (called on the
event loop thread). Latency is client-observed: from the frame's write to the decision's
read, in ms, matched by the frame's ``request_id`` (assigned here when empty).
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

import grpc

from tamiyo.config import ClientConfig
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_client.backoff import Backoff
from tamiyo_client.coalesce import CoalescingBuffer, Frame
from tamiyo_client.frame_data import FrameData, resolve_form
from tamiyo_client.received import (
    ClientError,
    ClientStats,
    DecisionCallback,
    DecisionStream,
    ErrorCallback,
    ReceivedDecision,
)
from tamiyo_client.security import ClientSecurity

__all__ = [
    "FATAL_CODES",
    "ClientError",
    "ClientStats",
    "DecisionStream",
    "ReceivedDecision",
    "TamiyoClient",
]

log = logging.getLogger(__name__)

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
Call = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


# gRPC name-resolver schemes a target may start with (``scheme:`` or ``scheme://``).
_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds"})


def check_target(target: str) -> None:
    """Raise ValueError, naming the problem, for a target gRPC cannot use.

    Accepted: ``host:port`` (``[v6addr]:port`` for IPv6), ``dns:///host:port``, and the
    other gRPC resolver forms (``unix:/path``, ``ipv4:addr:port,...``, ``ipv6:...``,
    ``xds:///...``). Why check here: gRPC accepts anything, then retries forever with a
    misleading error (a URL, a missing port it replaces with 443, an unknown scheme), and
    an empty target even wedged the client's thread and the next client's start()."""
    if not target.strip():
        raise ValueError("target is empty: give host:port (e.g. 127.0.0.1:50051)")
    if target != target.strip():
        raise ValueError(f"target {target!r} has surrounding whitespace")
    low = target.lower()
    if low.startswith(("http://", "https://")):
        raise ValueError(
            f"target {target!r}: give host:port (gRPC targets take no http:// or "
            "https://; TLS comes from ClientSecurity)"
        )
    scheme, sep, rest = target.partition(":")
    if sep and scheme.lower() in _SCHEMES:
        if not rest.strip("/"):
            raise ValueError(f"target {target!r}: nothing after {scheme}:")
        if scheme.lower() == "dns":
            _check_host_port(target, rest.lstrip("/").rpartition("/")[2])
        return
    if "://" in target:
        raise ValueError(
            f"target {target!r}: unknown scheme {target.split('://')[0]!r} (give host:port, "
            f"or one of gRPC's {', '.join(sorted(_SCHEMES))})"
        )
    _check_host_port(target, target)


def _check_host_port(target: str, hostport: str) -> None:
    """``hostport`` must be ``host:port`` (or ``[v6]:port``) with a port in 1-65535."""
    host, sep, port = hostport.rpartition(":")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"target {target!r}: bracket an IPv6 address: [::1]:50051")
    if not sep or not host:
        raise ValueError(
            f"target {target!r}: no port (give host:port, e.g. {hostport or 'host'}:50051; "
            "gRPC would use 443)"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r}: port {port!r} is not a number in 1-65535")


def _not_ready(target: str, timeout_s: float, channel: grpc.aio.Channel) -> str:
    """Why a connection attempt failed, for ``last_error``: gRPC keeps the reason to
    itself (a refused TCP connect and a failed TLS handshake look the same from here),
    so name the channel's state and the usual causes."""
    state = channel.get_state(try_to_connect=False)
    why = (
        "the server is not running there, or it refused the TLS handshake "
        "(TLS settings that do not match the server's: CA, client certificate and key)"
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        else "the server did not answer in time"
    )
    return f"no connection to {target} within {timeout_s:.1f} s (channel {state.name}): {why}"


class TamiyoClient:
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
        self._task = asyncio.create_task(self._run(), name="tamiyo-client")

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        """Send what is pending (up to ``flush_timeout_s``), then end the stream."""
        if self._task is None:
            return
        if self.connected and self.pending():
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), flush_timeout_s)
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
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
        """True once a session is accepted (now or within ``timeout_s``)."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def pending(self) -> int:
        """Frames and outcomes not yet written to the stream."""
        with self._outcome_lock:
            outcomes = len(self._outcomes)
        return len(self._frames) + outcomes + self._in_flight

    def _encode(self, frame: FrameData) -> pb.TelemetryFrame | None:
        """``frame`` as protobuf, in ``config.signal_form`` (on the event loop thread).
        Values protobuf cannot hold (a hand-made FrameData) drop that frame with the
        reason in ``last_error`` and the log, rather than breaking the stream."""
        c = self.config
        try:
            form = resolve_form(c.signal_form, c.columns_min_signals, len(frame.signals))
            return frame.to_frame(form)
        except (TypeError, ValueError) as exc:
            self.last_error = f"frame at step {frame.step} not sent: {exc}"
            self.stats.frames_unencodable += 1
            log.error("tamiyo client: %s", self.last_error)
            return None

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
        """Replace the topology/kernels: sent now if connected, and on every reconnect."""
        self._session_open = self._with_budget(session_open)
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

    def _channel_options(self) -> list[tuple[str, int | str]]:
        c = self.config
        return [
            ("grpc.keepalive_time_ms", c.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", c.keepalive_timeout_ms),
            ("grpc.initial_reconnect_backoff_ms", int(c.backoff_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(c.backoff_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(c.backoff_max_s * 1000)),
        ]

    async def _run(self) -> None:
        backoff = Backoff.from_config(self.config, self._rng)
        connection = 0
        try:
            while not self._closing:
                accepted_before = self.stats.sessions
                try:
                    await self._connect_once(connection + 1)
                    self.last_error = "stream ended by the server"
                except grpc.aio.AioRpcError as exc:
                    self.last_error = f"{exc.code().name}: {exc.details()}"
                    if exc.code() in FATAL_CODES:
                        self.fatal_error = self.last_error
                        log.error("tamiyo client stopped: %s", self.last_error)
                        return
                except ClientError as exc:
                    self.last_error = self.fatal_error = str(exc)
                    log.error("tamiyo client stopped: %s", exc)
                    return
                except (TimeoutError, ConnectionError, OSError, asyncio.InvalidStateError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                if self.stats.sessions > accepted_before:
                    connection += 1
                    backoff.reset()
                else:
                    self.stats.connect_failures += 1
                delay = max(backoff.next_delay(), self._server_hint_s)
                self._server_hint_s = 0.0
                log.info("tamiyo stream down (%s); reconnecting in %.2f s", self.last_error, delay)
                await asyncio.sleep(delay)
        finally:
            self._connected.clear()
            self._finish_iterators()

    async def _connect_once(self, connection: int) -> None:
        channel = self.security.channel(self.config.target, self._channel_options())
        try:
            timeout = self.config.connect_timeout_s
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except TimeoutError:
                raise ConnectionError(_not_ready(self.config.target, timeout, channel)) from None
            stub = pb_grpc.TamiyoServiceStub(channel)
            # None: messages are written with call.write(), not from an iterator.
            call: Call = stub.StreamTelemetry(None, metadata=self.security.metadata())
            try:
                self._reopen = False
                await call.write(pb.StreamTelemetryRequest(session_open=self._session_open))
                first = await asyncio.wait_for(call.read(), timeout)
                if not isinstance(first, pb.StreamTelemetryResponse):
                    raise ConnectionError("stream ended before SessionAccepted")
                kind = first.WhichOneof("message")
                if kind == "error":
                    err = first.error
                    raise ClientError(f"SessionOpen refused: {err.field}: {err.message}")
                if kind != "session_accepted":
                    raise ConnectionError(f"expected session_accepted first, got {kind}")
                self._accepted(first.session_accepted)
                await self._serve(call, connection)
            finally:
                call.cancel()
        finally:
            self._connected.clear()
            await channel.close(None)

    def _accepted(self, acc: pb.SessionAccepted) -> None:
        self.session_id = acc.session_id
        self.policy_version = acc.policy_version
        self.decision_deadline_ms = acc.decision_deadline_ms
        self.stats.sessions += 1
        self.last_error = ""  # connected again: the reason it was down is history
        self._connected.set()
        log.info("tamiyo session %s accepted (policy %s)", acc.session_id, acc.policy_version)

    async def _serve(self, call: Call, connection: int) -> None:
        """Run writer and reader until either ends; re-raise what ended it."""
        self._sent_at.clear()  # decisions of the old stream will never come
        self._live = True
        self._server_closing = False
        self._wake.set()  # flush what piled up while disconnected
        writer = asyncio.create_task(self._writer(call, connection))
        reader = asyncio.create_task(self._reader(call, connection))
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            self._live = False
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)

    async def _writer(self, call: Call, connection: int) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._reopen and not self._server_closing:
                self._reopen = False
                await call.write(pb.StreamTelemetryRequest(session_open=self._session_open))
            while True:
                with self._outcome_lock:
                    outcome = self._outcomes.popleft() if self._outcomes else None
                if outcome is None:
                    break
                if self._decided_on.get(outcome.decision_id, connection) != connection:
                    self.stats.outcomes_dropped += 1  # its session is gone (see __init__)
                    continue
                self._in_flight = 1  # close() waits for it (pending() counts it)
                try:
                    await call.write(pb.StreamTelemetryRequest(outcome=outcome))
                except BaseException:
                    with self._outcome_lock:
                        self._outcomes.appendleft(outcome)
                    raise
                finally:
                    self._in_flight = 0
                self.stats.outcomes_sent += 1
            while not self._server_closing and (frame := self._frames.pop()) is not None:
                if frame.want_decision and time.monotonic() < self._pushback_until:
                    frame.want_decision = False  # the server asked for a pause
                    self.stats.decision_requests_deferred += 1
                msg = frame if isinstance(frame, pb.TelemetryFrame) else self._encode(frame)
                if msg is None:
                    continue
                if frame.want_decision:  # before the write: the answer can beat its return
                    self._sent_at[frame.request_id] = time.monotonic()
                    if len(self._sent_at) > 4096:  # unanswered ids must not pile up
                        self._sent_at.pop(next(iter(self._sent_at)))
                self._in_flight = 1
                # Counted before the write, like _sent_at: the reader can deliver the
                # answer before this task resumes, and a caller holding a decision must
                # not see its frame uncounted (a test saw 3 decisions, 2 frames sent).
                self.stats.frames_sent += 1
                try:
                    await call.write(pb.StreamTelemetryRequest(frame=msg))
                except BaseException:
                    self.stats.frames_sent -= 1  # not sent: it goes back in the queue
                    self._sent_at.pop(frame.request_id, None)
                    self._frames.push_front([frame])
                    raise
                finally:
                    self._in_flight = 0
            self._drained.set()
            if self._server_closing:
                # The server is going away: half-close (after this connection's outcomes,
                # which the next one would drop), so that it knows every frame we sent
                # has arrived and ends the stream once each is answered. Frames queued
                # now go to the next connection; the reader runs on to the end.
                await call.done_writing()
                await asyncio.Event().wait()  # (cancelled when the reader ends)

    async def _reader(self, call: Call, connection: int) -> None:
        while True:
            resp = await call.read()
            if not isinstance(resp, pb.StreamTelemetryResponse):
                return  # EOF: the server ended the stream
            kind = resp.WhichOneof("message")
            if kind == "decision":
                self._deliver(resp.decision, connection)
            elif kind == "error":
                err = resp.error
                self._sent_at.pop(err.frame_request_id, None)  # no decision will follow
                if err.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED:
                    self.stats.frames_shed += 1  # load, not a bad message
                    if err.retry_after_ms:
                        self.stats.pushbacks += 1
                        until = time.monotonic() + err.retry_after_ms / 1000
                        self._pushback_until = max(self._pushback_until, until)
                    log.debug("tamiyo shed a frame: %s", err.message)
                else:
                    self.stats.stream_errors += 1
                    self.stream_errors.append(err)
                    self.last_error = f"refused: {err.message}"  # (the stream goes on)
                    log.warning("tamiyo refused a message: %s", err.message)
                for cb in self._error_callbacks:
                    try:
                        cb(resp.error)
                    except Exception:
                        log.exception("error callback failed")
            elif kind == "closing":
                self._server_hint_s = resp.closing.reconnect_after_ms / 1000
                self._server_closing = True
                self._wake.set()
                log.info("tamiyo server closing: %s", resp.closing.reason)
            elif kind == "session_accepted":
                self._accepted(resp.session_accepted)
