"""The connection loop of ``TamiyoClient``: dial, open the session, serve, reconnect.

One StreamTelemetry stream at a time, on a fresh channel each: SessionOpen first, then a
writer (outcomes, then frames, coalesced while the stream is slow) and a reader
(decisions, refusals, pushback, SessionClosing) until either ends; then an exponential
backoff with jitter (reset once a session is accepted; a server's SessionClosing hint,
or the ``grpc-retry-pushback-ms`` trailer of a first open refused for load, is the
minimum wait) and again. Only ``FATAL_CODES`` or a refused SessionOpen stop it, and
``close()``: the writer then half-closes (as on the server's SessionClosing) and the
reader reads until the server ends the RPC (OK), without a reconnect.

A re-sent SessionOpen (``update_session``) the server refuses for load (in-stream
RESOURCE_EXHAUSTED on field ``session_open``, with ``retry_after_ms``; its previous
session stays in force) is sent again, the latest one, once the pushback is over. Frames
wait (they coalesce) until it is answered (at most ``connect_timeout_s`` after it is
sent): they describe the new topology, and the server would read them against the old.

Kept apart from ``tamiyo_client.client``, which holds what callers use (construction,
``send_frame``, ``decisions``, ``close``), because this is the part that talks to gRPC.
``StreamConnection`` is ``TamiyoClient``'s base class, not used alone:
``TamiyoClient.__init__`` and ``start`` set the attributes declared on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import grpc

from tamiyo.config import ClientConfig
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_client.backoff import Backoff
from tamiyo_client.coalesce import CoalescingBuffer
from tamiyo_client.frame_data import FrameData, resolve_form
from tamiyo_client.received import ClientError, ClientStats, ErrorCallback
from tamiyo_client.security import ClientSecurity

# The client's logger, as before this code moved here (log configuration names it).
log = logging.getLogger("tamiyo_client.client")

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
Call = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


def _retry_pushback_s(exc: grpc.aio.AioRpcError) -> float:
    """gRPC's ``grpc-retry-pushback-ms`` trailer of a failed call, in s (0: none); the
    server sets it on a first SessionOpen refused for load (``open_admission``)."""
    for key, value in cast("tuple[tuple[str, str], ...]", exc.trailing_metadata() or ()):
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def _not_ready(target: str, timeout_s: float, channel: grpc.aio.Channel) -> str:
    """Why a connection attempt failed, for ``last_error``: gRPC keeps the reason to
    itself (a refused TCP connect and a failed TLS handshake look the same from here),
    so name the channel's state and the usual causes."""
    state = channel.get_state(try_to_connect=False)
    why = (
        "the server is not running there, or it refused the TLS handshake "
        "(TLS settings that do not match the server's: CA, client certificate and key; "
        "GRPC_VERBOSITY=INFO makes gRPC log the handshake's own error)"
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        else "the server did not answer in time"
    )
    return f"no connection to {target} within {timeout_s:.1f} s (channel {state.name}): {why}"


class StreamConnection:
    """The stream side of ``TamiyoClient``: ``_run`` is its task (see the module doc)."""

    # Set by TamiyoClient.__init__ (and start: the events).
    config: ClientConfig
    security: ClientSecurity
    stats: ClientStats
    session_id: str
    policy_version: str
    decision_deadline_ms: int
    last_error: str
    fatal_error: str
    stream_errors: deque[pb.StreamError]
    _session_open: pb.SessionOpen
    _rng: random.Random | None
    _frames: CoalescingBuffer
    _outcomes: deque[pb.DecisionOutcome]
    _outcome_lock: threading.Lock
    _decided_on: dict[str, int]
    _in_flight: int
    _pushback_until: float
    _sent_at: dict[str, float]
    _error_callbacks: list[ErrorCallback]
    _live: bool
    _reopen: bool  # the latest SessionOpen is to be sent on this stream (_open_lock)
    _open_lock: threading.Lock  # _reopen, _open_gen, _gen_sent, _session_open together
    _open_gen: int  # +1 per update_session
    _gen_sent: int  # _open_gen of the last SessionOpen written
    _reopen_at: float  # time.monotonic() before which a refused re-open is not re-sent
    _reopens_refused: int  # refusals of our re-open since a SessionAccepted
    _hold_until: float  # time.monotonic() until which frames wait for the re-open's answer
    _server_hint_s: float
    _server_closing: bool
    _closing: bool
    _wake: asyncio.Event
    _connected: asyncio.Event
    _drained: asyncio.Event
    _half_closed: asyncio.Event

    if TYPE_CHECKING:  # TamiyoClient's, where decisions are handed to their consumers

        def _deliver(self, decision: decision_pb2.AdaptationDecision, connection: int) -> None: ...

        def _finish_iterators(self) -> None: ...

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
            while True:  # until a fatal error, or close() (checked after each stream)
                accepted_before = self.stats.sessions
                try:
                    await self._connect_once(connection + 1)
                    if not self._closing:  # (closing: we half-closed, the server said OK)
                        self.last_error = "stream ended by the server"
                except grpc.aio.AioRpcError as exc:
                    self.last_error = f"{exc.code().name}: {exc.details()}"
                    # (a first SessionOpen refused for load: wait at least the pushback)
                    self._server_hint_s = max(self._server_hint_s, _retry_pushback_s(exc))
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
                if self._closing:
                    return  # close() began: the stream has ended, no reconnect
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
                self._reopen_at = self._hold_until = 0.0
                await call.write(pb.StreamTelemetryRequest(session_open=self._take_open()))
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
        self._half_closed.clear()
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

    def _take_open(self) -> pb.SessionOpen:
        """The latest SessionOpen, now being sent (no re-send pending)."""
        with self._open_lock:
            self._reopen = False
            self._gen_sent = self._open_gen
            return self._session_open

    async def _writer(self, call: Call, connection: int) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            if (
                self._reopen
                and not self._server_closing
                and (self._closing or now >= self._reopen_at)
            ):
                if self._hold_until:  # a re-send after a refusal: frames wait for its answer
                    # (set before the write: the answer can beat its return)
                    self._hold_until = now + self.config.connect_timeout_s
                    asyncio.get_running_loop().call_later(
                        self.config.connect_timeout_s, self._wake.set
                    )
                await call.write(pb.StreamTelemetryRequest(session_open=self._take_open()))
            # (a refused re-open not yet answered: module doc; close() sends what is pending)
            held = not self._closing and time.monotonic() < self._hold_until
            while True:
                with self._outcome_lock:
                    outcome = self._outcomes.popleft() if self._outcomes else None
                if outcome is None:
                    break
                if self._decided_on.get(outcome.decision_id, connection) != connection:
                    self.stats.outcomes_dropped += 1  # its session is gone (client.py: _decided_on)
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
            while not (self._server_closing or held) and (frame := self._frames.pop()) is not None:
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
            if not held:
                self._drained.set()
            if self._server_closing or self._closing:
                # The server is going away, or close() was called: half-close (after this
                # connection's outcomes, which the next one would drop), so that it knows
                # every frame we sent has arrived and ends the stream with OK once each
                # is answered. Frames queued now go to the next connection (if any); the
                # reader runs on to the end, delivering the last decisions.
                await call.done_writing()
                self._half_closed.set()
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
                if err.field.startswith("session_open"):  # an answer to a re-open
                    self._open_answered()
                if (
                    err.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
                    and err.field == "session_open"
                ):
                    self._reopen_refused(err)
                elif err.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED:
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
                with self._open_lock:  # (the answers come in the order of the opens)
                    if self._gen_sent == self._open_gen:  # the latest is in force, or on its
                        self._reopen = False  # way: a re-send for an older refusal is moot
                self._reopens_refused = 0
                self._open_answered()
                self._accepted(resp.session_accepted)

    def _open_answered(self) -> None:
        """A re-open was answered: frames held for it go (``_writer``)."""
        if self._hold_until:
            self._hold_until = 0.0
            self._wake.set()

    def _reopen_refused(self, err: pb.StreamError) -> None:
        """The server refused our re-sent SessionOpen for load; its previous session is
        in force. Send the latest again once the pushback is over (one re-send however
        many refusals or ``update_session`` calls come meanwhile); frames wait until it
        is answered."""
        self.stats.session_updates_refused += 1
        self._reopens_refused += 1
        wait_s = err.retry_after_ms / 1000 if err.retry_after_ms else self.config.backoff_initial_s
        with self._open_lock:
            self._reopen = True
        now = time.monotonic()
        self._reopen_at = max(self._reopen_at, now + wait_s)
        self._hold_until = max(self._hold_until, self._reopen_at)  # (then: until answered)
        asyncio.get_running_loop().call_later(wait_s, self._wake.set)
        self.last_error = (
            f"update_session: SessionOpen refused for load ({self._reopens_refused} in a row), "
            f"session {self.session_id} stays in force; the latest is sent again in "
            f"{wait_s * 1000:.0f} ms (frames wait): {err.message}"
        )
        (log.warning if self._reopens_refused >= 3 else log.info)("tamiyo %s", self.last_error)
