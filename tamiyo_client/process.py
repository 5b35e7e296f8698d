"""The training-loop front end: the streaming client in a child process (the sidecar).

``ProcessTamiyoClient`` has the calls of ``BlockingTamiyoClient`` (``send_frame``,
``poll_decisions``, ``report_outcome``, ...) but starts no thread in the training
process: ``python -m tamiyo_client.sidecar`` runs the asyncio client, and the training
thread talks to it over two pipes (``tamiyo_client.pipe_records``). Why: the client's
Python work (protobuf, grpc.aio, ~0.5-0.7 ms per frame here) competed with the training
thread for the GIL; see ``tamiyo_client.sidecar`` and ``python -m bench --only client``
(rows ``up``/``slow``/``down`` vs ``thread-*``).

Never blocks the step: frames are written to a non-blocking pipe; if the sidecar falls
behind and the pipe is full, frames coalesce in one pending slot (latest wins, as in
``CoalescingBuffer``) and outcomes wait in a bounded deque. The sidecar reconnects to
the server on its own; if the sidecar itself dies, it is restarted (at most once per
``backoff_max_s``) with the latest SessionOpen, and what was pending is sent to the new
one. Counters and state (``stats``, ``connected``, ...) mirror the sidecar's as of its
latest ``STATUS`` record (sent within ~20 ms of a change) and are refreshed by every
call that reads the pipe (``poll_decisions``, ``stats``, ``connected``, ...).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any

from tamiyo.config import ClientConfig
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client import pipe_records as rec
from tamiyo_client.client import check_target
from tamiyo_client.coalesce import Frame, merge_any
from tamiyo_client.frame_data import resolve_form
from tamiyo_client.received import ClientStats, ReceivedDecision
from tamiyo_client.security import ClientSecurity
from tamiyo_client.sidecar import init_payload

log = logging.getLogger(__name__)
_ROOT = str(Path(__file__).resolve().parents[1])  # the directory holding tamiyo_client/
_BELL = struct.Struct("<Q")
# How often the pipe is read even when the doorbell has not moved: notices a sidecar
# that died (EOF) without the training loop writing to it.
CHECK_EVERY_S = 0.5
# Of close's timeout_s, what the sidecar does not give its client's close: the decisions'
# and the final STATUS's way here, and the process's exit (imports torn down, ~0.1 s).
CLOSE_MARGIN_S = 1.0


class ProcessTamiyoClient:
    """A ``TamiyoClient`` in a sidecar process, driven from the training thread.

    Call every method from one thread (the training loop's); none of them blocks unless
    it takes a timeout. ``start()`` spawns the sidecar (~0.5 s of imports, in parallel).
    """

    def __init__(
        self,
        session_open: pb.SessionOpen,
        config: ClientConfig | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        resolve_form(self.config.signal_form, 0, 0)  # raises ValueError when unknown
        check_target(self.config.target)  # (here, not only in the sidecar, which would loop)
        self.security = security or ClientSecurity()
        self._session_open = session_open
        self._init = rec.encode_json(rec.INIT, init_payload(self.config, self.security))
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: int = -1  # write end of the sidecar's stdin (non-blocking)
        self._from: int = -1  # read end of its stdout (non-blocking)
        # The doorbell: an 8-byte shared counter the sidecar bumps after each record it
        # writes to stdout, so a poll with nothing new costs a memory read, not a read()
        # syscall (~40-50 µs on this VM right after a training step, cold caches).
        self._bell: mmap.mmap | None = None
        self._seen = 0
        self._next_check = 0.0
        self._reader = rec.RecordReader()
        self._chunk: memoryview | None = None  # the rest of a record being written
        self._frame: Frame | None = None  # next frame to write (coalesced while waiting)
        self._outcomes: deque[pb.DecisionOutcome] = deque()
        self._session_dirty = False
        self._query = 0  # latest QUERY asked (see pending)
        self._query_sent = 0
        self._answered = 0  # latest QUERY the sidecar answered
        self._decisions: deque[ReceivedDecision] = deque()
        self._status: dict[str, Any] = {}
        self._ids = 0
        self._died_at: float | None = None
        self._closed = False
        self._base: dict[str, int] = {}  # counters of earlier (dead) sidecars
        self._local: dict[str, int] = {}  # drops counted here, added to the sidecar's
        self.restarts = 0  # sidecar processes started after the first
        self.local_coalesced = 0  # frames folded here while the pipe was full
        self.stats = ClientStats()  # mirror; frames_submitted and decisions counted here

    # -- lifecycle -----------------------------------------------------------------
    def start(self, wait_connected_s: float = 0.0) -> bool:
        """Spawn the sidecar; optionally wait up to ``wait_connected_s`` for the session.
        Returns whether it is connected (training may start either way)."""
        if self._proc is not None:
            raise RuntimeError("client already started")
        self._spawn()
        return self.wait_connected(wait_connected_s) if wait_connected_s > 0 else self.connected

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        # gRPC C-core's own log lines (a failed TLS handshake: "I... Handshake failed" on
        # every attempt) went to the training job's stderr; the client's last_error and
        # log say what failed. Errors only, unless the user set GRPC_VERBOSITY.
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        with tempfile.TemporaryFile() as bell_file:  # unlinked; the mapping outlives it
            bell_file.truncate(_BELL.size)
            fd = bell_file.fileno()
            self._bell = mmap.mmap(fd, _BELL.size)
            self._seen = 0
            proc = subprocess.Popen(
                [sys.executable, "-m", "tamiyo_client.sidecar", str(fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
                pass_fds=(fd,),
            )
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._proc = proc
        self._to, self._from = proc.stdin.fileno(), proc.stdout.fileno()
        # Before going non-blocking: the sidecar reads these first (a few hundred bytes).
        session = rec.record(rec.SESSION, self._session_open.SerializeToString())
        os.write(self._to, self._init + session)
        os.set_blocking(self._to, False)
        os.set_blocking(self._from, False)
        self._reader = rec.RecordReader()
        self._chunk = None
        self._died_at = None
        self._session_dirty = False

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is pending and let the sidecar end the stream cleanly (flush ≤ 1 s,
        half-close, the server's last decisions and its OK: ``BlockingTamiyoClient.close``
        with ``timeout_s`` less ``CLOSE_MARGIN_S``) and exit; kill it if it has not ended
        within ``timeout_s``. Decisions that arrived meanwhile are in ``poll_decisions``
        afterwards, and ``stats`` are the sidecar's final counters."""
        proc = self._proc
        if proc is None or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        if self._died_at is None:
            try:
                os.set_blocking(self._to, True)
                self._flush(blocking=True)
                allowed = max(0.0, timeout_s - CLOSE_MARGIN_S)
                os.write(self._to, rec.record(rec.CLOSE, f"{allowed:.3f}".encode()))
            except OSError:
                pass
        while time.monotonic() < deadline and self._pump(wait_s=0.05):
            pass  # read the last decisions and the final STATUS until EOF
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        self._to = self._from = -1

    def __enter__(self) -> ProcessTamiyoClient:
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
        """Queue a frame: written to the sidecar now, or coalesced with the one waiting
        if the pipe is full. Assigns ``request_id`` when a decision is wanted and the id
        is empty (``p1``, ``p2``, ...), and ``client_clock_us`` (now) when it is 0: the
        decision's budget runs from here (CLOCK_MONOTONIC is the sidecar's clock too)."""
        if frame.want_decision and not frame.request_id:
            self._ids += 1
            frame.request_id = f"p{self._ids}"
        if not frame.client_clock_us:
            frame.client_clock_us = time.monotonic_ns() // 1000
        self.stats.frames_submitted += 1
        if self._frame is None:
            self._frame = frame
        else:
            self._frame = merge_any(self._frame, frame)
            self.local_coalesced += 1
        self._flush()

    def report_outcome(self, outcome: pb.DecisionOutcome) -> None:
        """Queue a DecisionOutcome; beyond ``outcome_buffer`` waiting, the oldest is dropped.
        It is written with the next ``send_frame`` / ``poll_decisions`` (any call that
        talks to the sidecar), in the same ``write`` as that call's records: a pipe write
        costs ~50 µs right after a training step here."""
        if len(self._outcomes) >= self.config.outcome_buffer:
            self._outcomes.popleft()
            self._local["outcomes_dropped"] = self._local.get("outcomes_dropped", 0) + 1
            self.stats.outcomes_dropped += 1
        self._outcomes.append(outcome)

    def update_session(self, session_open: pb.SessionOpen) -> None:
        """Replace the topology/kernels (sent now, and by the sidecar on every reconnect)."""
        self._session_open = session_open
        self._session_dirty = True
        self._flush()

    def poll_decisions(self) -> list[ReceivedDecision]:
        """Decisions received since the last poll, oldest first; [] if none."""
        self._pump()
        self._flush()
        items = list(self._decisions)
        self._decisions.clear()
        return items

    def get_decision(self, timeout_s: float | None = None) -> ReceivedDecision | None:
        """The next decision, waiting at most ``timeout_s`` (None = forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._pump()
            self._flush()
            if self._decisions:
                return self._decisions.popleft()
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                return None
            self._pump(wait_s=left)
            if self._decisions:
                return self._decisions.popleft()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once a session is accepted (now or within about ``timeout_s``). False as
        soon as the sidecar's client has stopped on a ``fatal_error`` (it never connects
        then): a wrong token is reported at once, not after ``timeout_s``."""
        self.wait_for(lambda: self.connected or bool(self.fatal_error), timeout_s)
        return self.connected

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Poll ``predicate()`` every 10 ms (reading the sidecar's records) until true
        or ``timeout_s``; for tests and demos."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(wait_s=min(0.01, left))
            self._flush()
        return True

    # -- pipes ---------------------------------------------------------------------
    def _next_record(self) -> bytes | None:
        queued = self._outcomes or self._frame is not None or self._session_dirty
        if self._query > self._query_sent and not queued:
            self._query_sent = self._query  # after everything queued before it
            return rec.record(rec.QUERY, str(self._query).encode())
        if self._session_dirty:
            self._session_dirty = False
            return rec.record(rec.SESSION, self._session_open.SerializeToString())
        if self._outcomes:
            return rec.record(rec.OUTCOME, self._outcomes.popleft().SerializeToString())
        if self._frame is not None:
            frame, self._frame = self._frame, None
            return rec.frame_record(frame)
        return None

    def _flush(self, blocking: bool = False) -> None:
        """Write pending records until the pipe is full (``blocking``: until done)."""
        if self._closed:
            return
        if self._died_at is not None or self._proc is None:
            self._maybe_restart()
            if self._died_at is not None or self._proc is None:
                return
        while True:
            if self._chunk is None:  # everything queued, in one write when it fits
                parts = []
                while (data := self._next_record()) is not None:
                    parts.append(data)
                if not parts:
                    return
                self._chunk = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
            try:
                n = os.write(self._to, self._chunk)
            except BlockingIOError:
                if not blocking:
                    return
                select.select([], [self._to], [], 0.05)
                continue
            except OSError as exc:  # BrokenPipeError: the sidecar is gone
                self._gone(f"sidecar pipe: {exc}")
                return
            self._chunk = self._chunk[n:] if n < len(self._chunk) else None

    def _pump(self, wait_s: float = 0.0) -> bool:
        """Read what the sidecar sent (waiting up to ``wait_s`` for something); False
        once its stdout is closed."""
        if self._proc is None or self._from < 0:
            return False
        bell = self._bell
        rung = _BELL.unpack_from(bell)[0] if bell is not None else -1
        if wait_s <= 0 and rung == self._seen:
            now = time.monotonic()
            if now < self._next_check:
                return True  # nothing new: no syscall
            self._next_check = now + CHECK_EVERY_S
        if wait_s > 0 and not select.select([self._from], [], [], wait_s)[0]:
            return True
        self._seen = rung
        while True:
            try:
                data = os.read(self._from, 1 << 16)
            except BlockingIOError:
                return True
            except OSError as exc:
                self._gone(f"sidecar pipe: {exc}")
                return False
            if not data:
                self._gone("sidecar exited")
                return False
            for kind, payload in self._reader.feed(data):
                self._record(kind, payload)

    def _record(self, kind: int, payload: bytes) -> None:
        if kind == rec.DECISION:
            raw, latency, sid, connection = rec.decode_decision(payload)
            d = decision_pb2.AdaptationDecision.FromString(raw)
            if len(self._decisions) >= self.config.decision_buffer:
                self._decisions.popleft()
                self._local["decisions_dropped"] = self._local.get("decisions_dropped", 0) + 1
                self.stats.decisions_dropped += 1
            self._decisions.append(ReceivedDecision(d, latency, sid, connection))
            self.stats.decisions += 1
            if latency is not None:
                self.stats.latencies_ms.append(latency)
        elif kind == rec.STATUS:
            st = json.loads(payload)
            self._status = st
            self._answered = max(self._answered, int(st.get("query", 0)))
            for name, value in st["stats"].items():
                if name != "frames_submitted" and hasattr(self.stats, name):
                    total = value + self._base.get(name, 0) + self._local.get(name, 0)
                    setattr(self.stats, name, total)

    def _gone(self, why: str) -> None:
        if self._died_at is not None:
            return
        self._died_at = time.monotonic()
        code = self._proc.poll() if self._proc is not None else None
        if not self._closed:
            self._status = dict(self._status, connected=False)
            self._status["last_error"] = f"{why} (exit code {code}); restarting it"
            log.warning("tamiyo client: %s", self._status["last_error"])

    def _maybe_restart(self) -> None:
        """Start a new sidecar once ``backoff_max_s`` has passed since the last died."""
        if self._closed or self._proc is None or self._died_at is None:
            return
        if time.monotonic() - self._died_at < self.config.backoff_max_s:
            return
        old = self._proc
        if old.poll() is None:
            old.kill()
        old.wait()
        for f in (old.stdin, old.stdout):
            if f is not None:
                f.close()
        base = self._base
        for name, value in self._status.get("stats", {}).items():
            base[name] = base.get(name, 0) + value
        self._status = {"last_error": self._status.get("last_error", "")}
        self.restarts += 1
        self._spawn()

    # -- state ---------------------------------------------------------------------
    def _state(self, key: str, default: Any) -> Any:
        self._pump()
        return self._status.get(key, default)

    @property
    def connected(self) -> bool:
        return bool(self._state("connected", False))

    @property
    def session_id(self) -> str:
        return str(self._state("session_id", ""))

    @property
    def policy_version(self) -> str:
        return str(self._state("policy_version", ""))

    @property
    def decision_deadline_ms(self) -> int:
        return int(self._state("decision_deadline_ms", 0))

    @property
    def last_error(self) -> str:
        return str(self._state("last_error", ""))

    @property
    def fatal_error(self) -> str:
        return str(self._state("fatal_error", ""))

    @property
    def frames_coalesced(self) -> int:
        """Frames folded into newer ones, here (pipe full) and in the sidecar."""
        return self.local_coalesced + int(self._state("frames_coalesced", 0))

    def pending(self, timeout_s: float = 1.0) -> int:
        """Frames and outcomes not yet written to the stream. Asks the sidecar and waits
        (up to ``timeout_s``) for its answer, so it is exact but not for every step: the
        counters in ``stats`` are refreshed only every ~0.25 s."""
        self._query += 1
        asked = self._query
        self._flush()
        self.wait_for(lambda: self._answered >= asked or self._died_at is not None, timeout_s)
        here = len(self._outcomes) + (self._frame is not None) + (self._chunk is not None)
        return here + int(self._status.get("pending", 0))

    @property
    def sidecar_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid
