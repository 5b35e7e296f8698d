"""The blocking front end: the asyncio client on its own thread, for plain training loops.

A training loop calls ``send_frame`` each reporting step (returns at once) and
``poll_decisions()`` between steps, so decisions are applied on the training thread,
never in the middle of a forward/backward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType

from tamiyo.config import ClientConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.client import CLOSE_ANSWER_TIMEOUT_S, TamiyoClient
from tamiyo_client.coalesce import Frame
from tamiyo_client.received import ClientStats, DecisionCallback, ReceivedDecision
from tamiyo_client.security import ClientSecurity

log = logging.getLogger(__name__)

_RUNNING: weakref.WeakSet[BlockingTamiyoClient] = weakref.WeakSet()  # started, not closed


def _warn_at_fork() -> None:
    """Before a fork: gRPC cannot fork while its threads run (a fork-based DataLoader
    worker then crashes or hangs in gRPC's fork handlers), so say what to use instead."""
    if any(c._thread is not None and c._thread.is_alive() for c in list(_RUNNING)):
        warnings.warn(
            "fork() while a BlockingTamiyoClient runs in this process: the child may crash "
            "in gRPC (DataLoader workers: use ProcessTamiyoClient, or "
            "multiprocessing_context='spawn')",
            RuntimeWarning,
            stacklevel=2,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_warn_at_fork)


class DecisionInbox:
    """Decisions waiting for the training thread: bounded (oldest dropped), thread-safe."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[ReceivedDecision] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: ReceivedDecision) -> None:
        with self._cond:
            if len(self._items) >= self._capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()

    def drain(self) -> list[ReceivedDecision]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        return items

    def get(self, timeout_s: float | None) -> ReceivedDecision | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout_s):
                return None
            return self._items.popleft()


CLOSE_MARGIN_S = 0.5  # of a close's timeout_s, kept for the cancel and the thread's end


def close_budget(timeout_s: float) -> tuple[float, float]:
    """``TamiyoClient.close``'s (flush, answer) timeouts within ``timeout_s`` in all:
    flush ≤ 1 s, answer ≤ ``CLOSE_ANSWER_TIMEOUT_S``, ``CLOSE_MARGIN_S`` left over."""
    spare = max(0.0, timeout_s - CLOSE_MARGIN_S)
    flush = min(1.0, spare / 2)
    return flush, min(CLOSE_ANSWER_TIMEOUT_S, spare - flush)


class BlockingTamiyoClient:
    """``TamiyoClient`` run by a daemon thread with its own event loop.

    ``on_decision`` callbacks run on that thread; ``poll_decisions`` / ``get_decision``
    hand decisions to the caller's thread instead.
    """

    def __init__(
        self,
        session_open: pb.SessionOpen,
        config: ClientConfig | None = None,
        security: ClientSecurity | None = None,
        *,
        on_decision: DecisionCallback | None = None,
    ) -> None:
        self.client = TamiyoClient(session_open, config, security)
        self.inbox = DecisionInbox(self.client.config.decision_buffer)
        self.client.add_callback(self.inbox.put)
        if on_decision is not None:
            self.client.add_callback(on_decision)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, wait_connected_s: float = 0.0) -> bool:
        """Start the client thread; optionally wait up to ``wait_connected_s`` for the
        session. Returns whether it is connected (training may start either way)."""
        if self._thread is not None:
            raise RuntimeError("client already started")
        self._thread = threading.Thread(target=self._main, name="tamiyo-client", daemon=True)
        self._thread.start()
        _RUNNING.add(self)
        self._ready.wait()
        return self.wait_connected(wait_connected_s) if wait_connected_s > 0 else self.connected

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self.client.start())
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self._ready.set()
            loop.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """End the stream cleanly (``TamiyoClient.close``: flush ≤ 1 s, half-close, wait
        for the server's last answers and its OK, ≤ ``CLOSE_ANSWER_TIMEOUT_S``; both
        shortened to fit ``timeout_s``) and stop the thread. Decisions that arrive
        meanwhile are in ``poll_decisions`` afterwards. Never raises: it runs in a
        training job's shutdown (``with`` exit, ``finally``), where an exception from a
        stuck client would hide the job's own result; a problem is logged, and a thread
        that does not stop in time is left behind (it is a daemon)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        flush_s, answer_s = close_budget(timeout_s)
        try:
            fut = asyncio.run_coroutine_threadsafe(self.client.close(flush_s, answer_s), loop)
            fut.result(timeout_s)
        except Exception as exc:  # (TimeoutError, a closed loop, ...)
            log.warning(
                "tamiyo client close: %s: %s (the stream may not have ended cleanly)",
                type(exc).__name__,
                exc,
            )
        finally:
            with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("tamiyo client thread did not stop within %.1f s", timeout_s)

    def __enter__(self) -> BlockingTamiyoClient:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- training-thread API (never blocks unless a timeout is given) ---------------
    def send_frame(self, frame: Frame) -> None:
        """Queue a frame (see ``TamiyoClient.send_frame``); returns at once."""
        self.client.send_frame(frame)

    def report_outcome(self, outcome: pb.DecisionOutcome) -> None:
        self.client.report_outcome(outcome)

    def update_session(self, session_open: pb.SessionOpen) -> None:
        self.client.update_session(session_open)

    def poll_decisions(self) -> list[ReceivedDecision]:
        """Decisions received since the last poll, oldest first; [] if none."""
        return self.inbox.drain()

    def get_decision(self, timeout_s: float | None = None) -> ReceivedDecision | None:
        """The next decision, waiting at most ``timeout_s`` (None = forever)."""
        return self.inbox.get(timeout_s)

    def decisions(self, timeout_s: float | None = None) -> Iterator[ReceivedDecision]:
        """Iterate decisions as they arrive; stops after ``timeout_s`` without one."""
        while (item := self.get_decision(timeout_s)) is not None:
            yield item

    def wait_connected(self, timeout_s: float) -> bool:
        """True once a session is accepted (now or within about ``timeout_s``). Never
        raises for a slow event loop (a loaded box): then it answers ``connected``."""
        loop = self._loop
        if loop is None:
            return False
        fut = asyncio.run_coroutine_threadsafe(self.client.wait_connected(timeout_s), loop)
        try:
            return fut.result(timeout_s + 1.0)
        except TimeoutError:  # the loop thread did not get to it in time
            fut.cancel()
            return self.connected

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``predicate()`` every 10 ms until true or ``timeout_s``; for tests/demos."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- state ------------------------------------------------------------------
    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def session_id(self) -> str:
        return self.client.session_id

    @property
    def last_error(self) -> str:
        return self.client.last_error

    @property
    def policy_version(self) -> str:
        return self.client.policy_version

    @property
    def decision_deadline_ms(self) -> int:
        return self.client.decision_deadline_ms

    @property
    def frames_coalesced(self) -> int:
        return self.client.frames_coalesced

    def pending(self) -> int:
        """Frames and outcomes not yet written to the stream."""
        return self.client.pending()

    @property
    def fatal_error(self) -> str:
        return self.client.fatal_error
