"""Background half of the experience log: logged events → store records.

Why here and not on the event loop: see ``tamiyo_server.experience_log``. Everything in
this module runs in the experience process (``Assembler.prepare``, once per assembly
period, see ``experience_proc.periods``), on the events of
``tamiyo_server.experience_events``.

State assembly: a session's ``ModelGraphState`` is topology + kernels (serialised once per
session), step/epoch, and its signals, already encoded as ``ModelGraphState.signals``
entries. Fast path — every frame so far carried one signal per layer (frames are
validated: at most one per layer, so N signals means all N): the last ``window`` frames'
signal blocks *are* the per-layer windows, and each frame costs one
``SerializeToString`` plus re-tagging its entries (field 3 of ``TelemetryFrame`` → field 2
of ``ModelGraphState``), or for a columnar frame its share of one batched numpy pass
(``tamiyo.experience.column_block``). After the first partial frame the session switches
for good to per-layer rings of encoded signals. A decision's state is logged as
``StateParts`` (header, tail, the window's blocks), which the writer stores once each.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience.column_block import FrameBlock
from tamiyo.experience.retention import enforce_retention
from tamiyo.experience.schema import (
    ACTION_LOAD_KERNEL,
    ACTION_NO_OP,
    DecisionRecord,
    OutcomeRecord,
    PartsDecision,
    StateParts,
)
from tamiyo.v1 import decision_pb2, graph_pb2, health_pb2
from tamiyo.wire import varint
from tamiyo_server.experience_events import (
    _PREFIX,
    ColumnFrameEvent,
    DecisionEvent,
    EndEvent,
    FrameEvent,
    OutcomeEvent,
    Resync,
    UnaryEvent,
    _len_prefix,
    column_signals,
    encode_columns,
    frame_signal_block,
)

log = logging.getLogger(__name__)

MAX_SESSIONS = 65536  # sessions remembered (a lost "end" event cannot leak memory)
MARKS_PER_SESSION = 8  # states kept for decisions not yet logged (superseded frames)
ENDED_BYTES = 16 << 20
"""Next states (bytes, in total; at most ``ENDED_MAX`` of them) kept of ended sessions'
last decisions (the newest), for a client outcome that comes after the end. Why: a host
re-sends SessionOpen, then its queued outcomes, so the replaced session's end is logged
before the outcome of its last decision; written alone, that outcome replaced the end's
record in the store and its next state was lost (review 15b). It now carries it."""
ENDED_MAX = 4096
_TAILS = [b"\x28" + varint(e) for e in range(128)]  # ``.epoch`` fields of small epochs


def _state_tail(step: int, epoch: int) -> bytes:
    """``ModelGraphState.step`` (4) and ``.epoch`` (5) as varint fields (zeros written
    explicitly: valid proto3, and cheaper than building a message). ``step`` >= 0.
    Once per decision: the common sizes without the generic varint loop."""
    if step < 0x4000:
        st = bytes((0x20, step)) if step < 0x80 else bytes((0x20, step & 0x7F | 0x80, step >> 7))
    else:
        st = b"\x20" + varint(step)
    return st + (_TAILS[epoch] if epoch < 128 else b"\x28" + varint(epoch))


def _action_indices(
    msg: decision_pb2.AdaptationDecision, layers: dict[str, int], kernels: dict[str, int]
) -> tuple[int, int, int, str, str]:
    """(action_kind, node_index, kernel_index, layer_id, kernel_id) of a decision."""
    if msg.action == ACTION_LOAD_KERNEL:
        return (
            ACTION_LOAD_KERNEL,
            layers[msg.target_layer_id],
            kernels[msg.kernel_id],
            msg.target_layer_id,
            msg.kernel_id,
        )
    return ACTION_NO_OP, -1, -1, "", ""


def _propensity(msg: decision_pb2.AdaptationDecision) -> float:
    p = float(msg.propensity)
    return p if 0.0 < p <= 1.0 else 1.0  # deterministic answers may leave it unset


class SessionState:
    """Background side of one session: encoded signal rings, pending states, last
    decision (for the end-of-stream outcome)."""

    def __init__(self, ev: Resync, window: int) -> None:
        self.host_id = ev.host_id
        self.layers = {lay.layer_id: i for i, lay in enumerate(ev.topology.layers)}
        self.layer_order = tuple(self.layers)  # how a full columnar frame lists them
        self.kernels = {k.kernel_id: i for i, k in enumerate(ev.kernels)}
        head = graph_pb2.ModelGraphState(topology=ev.topology, kernels=ev.kernels)
        self.header = head.SerializeToString()
        self.window = window
        self.blocks: deque[bytes] | None = deque(maxlen=window)  # fast path; None = rings
        self.rings: list[deque[bytes]] = []
        # (frame step, request id) → (seq, state, step, epoch), oldest first
        self.marks: OrderedDict[int, tuple[tuple[int, str], StateParts, int, int]] = OrderedDict()
        self.step = 0
        self.epoch = 0
        self.last_id = ""
        self.last_seq = -1
        self.seq = ev.seq
        self.last_client: OutcomeRecord | None = None
        if ev.state is not None:
            state = graph_pb2.ModelGraphState.FromString(ev.state)
            self._to_rings()
            self._append(state.signals)
            self.step, self.epoch = int(state.step), int(state.epoch)
            self._mark(ev.seq, ev.request_id)

    def _to_rings(self) -> None:
        """Leave the fast path: per-layer rings from the frame blocks kept so far."""
        if self.blocks is None:
            return
        blocks, self.blocks = self.blocks, None
        self.rings = [deque(maxlen=self.window) for _ in self.layers]
        self._append(graph_pb2.ModelGraphState.FromString(b"".join(blocks)).signals)

    def _append(self, signals: Iterable[health_pb2.HealthSignal]) -> None:
        rings, layers, prefix = self.rings, self.layers, _PREFIX
        for sig in signals:
            b = sig.SerializeToString()
            n = len(b)
            rings[layers[sig.layer_id]].append((prefix[n] if n < 4096 else _len_prefix(n)) + b)

    def state(self) -> bytes:
        return self.parts().join()

    def parts(self) -> StateParts:
        """The current state as pieces: on the fast path the frame blocks themselves
        (the writer stores each once per file), else the rings joined into one."""
        tail = _state_tail(self.step, self.epoch)
        if self.blocks is not None:
            return StateParts(self.header, tail, tuple(self.blocks))
        return StateParts(self.header, tail, (b"".join(itertools.chain(*self.rings)),))

    def _mark(self, seq: int, request_id: str) -> None:
        self.marks[seq] = ((self.step, request_id), self.parts(), self.step, self.epoch)
        while len(self.marks) > MARKS_PER_SESSION:
            self.marks.popitem(last=False)

    def take_mark(self, step: int, request_id: str) -> tuple[int, StateParts, int, int] | None:
        """The state of the newest frame answered by a decision echoing (step, request
        id); older marks are dropped (their frames were superseded or answered)."""
        key = (step, request_id)
        hit = next((seq for seq, m in reversed(self.marks.items()) if m[0] == key), None)
        if hit is None:
            return None
        _, state, st, ep = self.marks[hit]
        for seq in [k for k in self.marks if k <= hit]:
            del self.marks[seq]
        return hit, state, st, ep

    def frame(self, ev: FrameEvent) -> None:
        """Apply a frame of ``HealthSignal`` messages."""
        f = ev.frame
        signals: Sequence[health_pb2.HealthSignal] = f.signals
        block = None
        if self.blocks is not None and len(signals) == len(self.layers):
            block = frame_signal_block(f)
        self._apply(block, signals)
        self._advance(ev.seq, int(f.step), int(f.epoch), f.want_decision, f.request_id)

    def column_frame(self, ev: ColumnFrameEvent, encoded: FrameBlock | None) -> None:
        """Apply a columnar frame; ``encoded``: its signals already in the message form's
        bytes (``tamiyo.experience.column_block``, batched by ``Assembler.prepare``), or
        None (columns not in protobuf's canonical layout: decoded message by message)."""
        if encoded is None:
            signals = column_signals(ev.columns, ev.step)
            block = None
            if self.blocks is not None and len(signals) == len(self.layers):
                block = graph_pb2.ModelGraphState(signals=signals).SerializeToString()
            self._apply(block, signals)
        elif self.blocks is not None and len(encoded.layer_ids) == len(self.layers):
            self.blocks.append(encoded.block)
        else:
            self._to_rings()
            rings, layers = self.rings, self.layers
            for lid, entry in zip(encoded.layer_ids, encoded.entries(), strict=True):
                rings[layers[lid]].append(entry)
        self._advance(ev.seq, ev.step, ev.epoch, ev.want_decision, ev.request_id)

    def _apply(self, block: bytes | None, signals: Sequence[health_pb2.HealthSignal]) -> None:
        if block is not None and self.blocks is not None:
            self.blocks.append(block)
        else:
            self._to_rings()
            self._append(signals)

    def _advance(self, seq: int, step: int, epoch: int, want: bool, request_id: str) -> None:
        self.seq, self.step, self.epoch = seq, step, epoch
        if want:
            self._mark(seq, request_id)


class Assembler:
    """Runs off the event loop (one thread at a time): turns events into store records."""

    def __init__(self, window: int, config: ExperienceLogConfig, directory: Path) -> None:
        self.window = window
        self.config = config
        self.directory = directory
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.unmatched = 0  # decisions whose state was lost with a dropped event
        self.ended: OrderedDict[str, OutcomeRecord] = OrderedDict()  # see ENDED_BYTES
        self._ended_bytes = 0
        self.current: Path | None = None
        self.deleted_files = 0
        self._next_retention = 0.0

    def _get(self, key: str) -> SessionState | None:
        s = self.sessions.get(key)
        if s is not None:
            self.sessions.move_to_end(key)
        return s

    def _layer_order(self, key: str) -> tuple[str, ...]:
        s = self.sessions.get(key)
        return s.layer_order if s is not None else ()

    def prepare(self, batch: list[object]) -> list[object]:
        """Records for a flush's worth of items: events, or lists of events (shipped in
        bulk by ``ExperienceLog``), processed in order."""
        out: list[object] = []
        events = list(
            itertools.chain.from_iterable(x if isinstance(x, list) else (x,) for x in batch)
        )
        events = [
            ColumnFrameEvent.of(ev)
            if isinstance(ev, FrameEvent) and ev.frame.HasField("signal_columns")
            else ev
            for ev in events
        ]
        encoded = encode_columns(events, self._layer_order)
        for ev in events:
            if isinstance(ev, ColumnFrameEvent):
                s = self._get(ev.key)
                if s is not None:
                    s.column_frame(ev, encoded.get(id(ev)))
            elif isinstance(ev, FrameEvent):
                s = self._get(ev.key)
                if s is not None:
                    s.frame(ev)
            elif isinstance(ev, DecisionEvent):
                rec = self._decision(ev)
                if rec is not None:
                    out.append(rec)
            elif isinstance(ev, Resync):
                self.sessions[ev.key] = SessionState(ev, self.window)
                self.sessions.move_to_end(ev.key)
                while len(self.sessions) > MAX_SESSIONS:
                    self.sessions.popitem(last=False)
            elif isinstance(ev, OutcomeEvent):
                out.append(self._outcome(ev))
            elif isinstance(ev, EndEvent):
                end = self._end(ev)
                if end is not None:
                    out.append(end)
            elif isinstance(ev, UnaryEvent):
                out.append(self._unary(ev))
            else:
                out.append(ev)  # already a record
        self._retention()
        return out

    def _decision(self, ev: DecisionEvent) -> PartsDecision | None:
        s = self._get(ev.key)
        m = ev.msg
        mark = s.take_mark(int(m.frame_step), m.frame_request_id) if s is not None else None
        if s is None or mark is None:
            self.unmatched += 1
            return None
        seq, state, step, epoch = mark
        kind, node, kern, lid, kid = _action_indices(m, s.layers, s.kernels)
        s.last_id, s.last_seq, s.last_client = m.decision_id, seq, None
        row = (
            m.decision_id,
            ev.key,
            s.host_id,
            step,
            epoch,
            ev.ts_s,
            b"",
            kind,
            node,
            kern,
            lid,
            kid,
            int(m.seed_index),
            _propensity(m),
            m.policy_version,
            int(m.rule),
        )  # fmt: skip  (DecisionRecord's fields: _action_indices and _propensity make them valid)
        return PartsDecision(row, state)

    def _outcome(self, ev: OutcomeEvent) -> OutcomeRecord:
        m = ev.msg
        has = m.HasField("reward")
        rec = OutcomeRecord(
            decision_id=m.decision_id,
            ts_s=ev.ts_s,
            applied=bool(m.applied),
            reward=float(m.reward) if has else None,
            reward_source="client" if has else "derived",
            next_state=None,
            done=False,
        )
        s = self._get(ev.key)
        if s is not None and s.last_id == m.decision_id:
            s.last_client = rec
        end = self.ended.pop(m.decision_id, None) if s is None else None
        if end is not None and end.next_state is not None:  # after its session's end
            self._ended_bytes -= len(end.next_state)
            return replace(rec, next_state=end.next_state)
        return rec

    def _end(self, ev: EndEvent) -> OutcomeRecord | None:
        """The stream ended: the last decision's next state is the state after the last
        frame (if any frame followed it); its client outcome, if any, is kept."""
        s = self.sessions.pop(ev.key, None)
        if s is None or not s.last_id or s.seq <= s.last_seq:
            return None
        c, state = s.last_client, s.state()
        rec = OutcomeRecord(
            decision_id=s.last_id,
            ts_s=ev.ts_s,
            applied=c.applied if c is not None else True,
            reward=c.reward if c is not None else None,
            reward_source=c.reward_source if c is not None else "derived",
            next_state=state,
            done=False,
        )
        if c is None:  # the client's outcome may still come (ENDED_BYTES)
            self.ended[rec.decision_id] = rec
            self._ended_bytes += len(state)
            while self._ended_bytes > ENDED_BYTES or len(self.ended) > ENDED_MAX:
                _, old = self.ended.popitem(last=False)
                self._ended_bytes -= len(old.next_state or b"")
        return rec

    def _unary(self, ev: UnaryEvent) -> DecisionRecord:
        st, m = ev.state, ev.msg
        layers = {lay.layer_id: i for i, lay in enumerate(st.topology.layers)}
        kernels = {k.kernel_id: i for i, k in enumerate(st.kernels)}
        kind, node, kern, lid, kid = _action_indices(m, layers, kernels)
        return DecisionRecord(
            m.decision_id, f"unary-{m.decision_id}", "", int(st.step), int(st.epoch), ev.ts_s,
            st.SerializeToString(), kind, node, kern, lid, kid, int(m.seed_index),
            _propensity(m), m.policy_version, int(m.rule),
        )  # fmt: skip

    def _retention(self) -> None:
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + max(1.0, self.config.flush_interval_s * 5)
        self.deleted_files += enforce_retention(
            self.directory,
            keep=self.current,
            max_total_bytes=int(self.config.max_total_mb * 1e6),
            max_age_s=self.config.max_age_s,
            idle_s=self.config.idle_s,
        )
