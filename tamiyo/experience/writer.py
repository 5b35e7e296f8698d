"""Background, batched writer of the experience store.

Why a thread and a bounded queue: logging must never delay a decision. ``log_*`` only
does a non-blocking ``put``; when the disk is slow and the queue is full the record is
dropped and counted (``dropped``), never waited for. A background thread commits what
has queued up once per flush interval (default 1 s), in one transaction, so a
``kill -9`` loses at most the last interval and never corrupts earlier rows (WAL).

Shared state pieces: a ``PartsDecision`` (the server's log) gives its state as
``StateParts``; each piece (a bytes object, recognised by identity) is inserted into the
``blocks`` table once per file, in the same transaction as the first decision naming it,
and the row holds a reference (``schema.state_reference``). The last ``MAX_BLOCKS``
pieces are remembered; an older one named again is simply stored again.

Rotation: with ``max_file_bytes`` or ``max_file_age_s`` set, the writer moves on to a
new file ``<stem>-NNNN<suffix>`` beside the first one once the current file is too big
or too old; the reader joins all files (see ``tamiyo.experience.reader``).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from pathlib import Path

from tamiyo.experience.schema import (
    STATE_INDEX,
    DecisionRecord,
    OutcomeRecord,
    PartsDecision,
    connect,
    state_reference,
)

_LOG = logging.getLogger(__name__)

_INSERT_DECISION = "INSERT OR IGNORE INTO decisions VALUES (" + ",".join("?" * 16) + ")"
_INSERT_OUTCOME = "INSERT OR REPLACE INTO outcomes VALUES (?,?,?,?,?,?,?)"
_INSERT_BLOCK = "INSERT INTO blocks(id, data) VALUES (?, ?)"
MAX_BLOCKS = 8192  # state pieces remembered (by identity) for reuse; ~20 MB at 58 layers
_STATE = STATE_INDEX
# Row tuple of a decision; dataclasses.astuple deep-copies and cost ~25 µs per record.
_DECISION_ROW = attrgetter(*(f.name for f in fields(DecisionRecord)))


class _Barrier:
    """Queued marker: the thread sets ``done`` once everything before it is committed."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class ExperienceWriter:
    """Appends decisions and outcomes to a store file from a background thread.

    ``flush_interval_s`` bounds how much a crash can lose (s); ``max_queue`` bounds memory
    (records). Thread-safe: any thread may call ``log_decision`` / ``log_outcome``.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        flush_interval_s: float = 1.0,
        max_queue: int = 65536,
        max_file_bytes: int = 0,
        max_file_age_s: float = 0.0,
        writer_name: str = "",
        prepare: Callable[[list[object]], list[object]] | None = None,
    ) -> None:
        """``prepare`` (optional) runs on the writer thread once per flush, turning the
        items queued with ``offer`` into records (e.g. serialising states there, off the
        caller's thread); it may drop items, and must not block."""
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s: {flush_interval_s} must be > 0")
        if max_queue < 1:
            raise ValueError(f"max_queue: {max_queue} must be >= 1")
        self._first = Path(path)
        self._flush_interval_s = flush_interval_s
        self._max_file_bytes = max_file_bytes
        self._max_file_age_s = max_file_age_s
        self._writer_name = writer_name
        self._prepare = prepare
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self.dropped = 0
        self.written_decisions = 0
        self.written_outcomes = 0
        self.write_errors = 0
        self.files: list[Path] = []
        self._file_index = 0
        # state pieces in the current file: id(bytes) -> (the bytes, block id), LRU order
        self._blocks: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._next_block = 1
        self._conn = self._open(self._first)
        self._opened_at = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="experience-writer", daemon=True)
        self._thread.start()

    @property
    def current_path(self) -> Path:
        return self.files[-1]

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def log_decision(self, record: DecisionRecord) -> bool:
        """Queue a decision; False (and ``dropped`` += 1) if the queue is full."""
        return self._offer(record)

    def log_outcome(self, record: OutcomeRecord) -> bool:
        """Queue an outcome; False (and ``dropped`` += 1) if the queue is full."""
        return self._offer(record)

    def offer(self, item: object) -> bool:
        """Queue an item for ``prepare``; False (and ``dropped`` += 1) if the queue is full."""
        return self._offer(item)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything queued before this call is committed (True) or timeout."""
        if self._closed:
            return True
        barrier = _Barrier()
        self._queue.put(barrier, timeout=timeout_s)
        return barrier.done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, stop the thread and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(timeout_s)

    def __enter__(self) -> ExperienceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _offer(self, item: object) -> bool:
        if self._closed:
            raise RuntimeError("ExperienceWriter is closed")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def _open(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path, create=True)
        with conn:
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at_s', ?)",
                (repr(time.time()),),
            )
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('writer', ?)",
                (self._writer_name,),
            )
        self.files.append(path)
        self._blocks.clear()
        row = conn.execute("SELECT max(id) FROM blocks").fetchone()
        self._next_block = (row[0] or 0) + 1
        return conn

    def _maybe_rotate(self) -> None:
        too_big = False
        if self._max_file_bytes > 0:
            size = self.current_path.stat().st_size
            wal = self.current_path.with_name(self.current_path.name + "-wal")
            size += wal.stat().st_size if wal.exists() else 0
            too_big = size >= self._max_file_bytes
        too_old = (
            self._max_file_age_s > 0 and time.monotonic() - self._opened_at >= self._max_file_age_s
        )
        if not (too_big or too_old):
            return
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._file_index += 1
        nxt = self._first.with_name(
            f"{self._first.stem}-{self._file_index:04d}{self._first.suffix}"
        )
        self._conn = self._open(nxt)
        self._opened_at = time.monotonic()

    def _commit(self, batch: list[object]) -> None:
        if self._prepare is not None and batch:
            try:
                batch = self._prepare(batch)
            except Exception:
                _LOG.exception("experience prepare failed; %d items lost", len(batch))
                with self._lock:
                    self.write_errors += 1
                    self.dropped += len(batch)
                return
        decisions: list[tuple[object, ...]] = []
        new_blocks: list[tuple[int, bytes]] = []
        for r in batch:
            if isinstance(r, DecisionRecord):
                decisions.append(_DECISION_ROW(r))
            elif isinstance(r, PartsDecision):
                p = r.parts
                ids = [self._block_id(b, new_blocks) for b in (p.head, *p.blocks)]
                ref = state_reference(p.tail, ids)
                decisions.append((*r.row[:_STATE], ref, *r.row[_STATE + 1 :]))
        outcomes = [
            (r.decision_id, r.ts_s, int(r.applied), r.reward, r.reward_source, r.next_state,
             int(r.done))
            for r in batch
            if isinstance(r, OutcomeRecord)
        ]  # fmt: skip
        if not decisions and not outcomes:
            return
        try:
            with self._conn:
                if new_blocks:
                    self._conn.executemany(_INSERT_BLOCK, new_blocks)
                if decisions:
                    self._conn.executemany(_INSERT_DECISION, decisions)
                if outcomes:
                    self._conn.executemany(_INSERT_OUTCOME, outcomes)
        except sqlite3.Error:
            self._blocks.clear()  # rolled back: the blocks of this batch are not stored
            _LOG.exception("experience store write failed; %d records lost", len(batch))
            with self._lock:
                self.write_errors += 1
                self.dropped += len(decisions) + len(outcomes)
            return
        with self._lock:
            self.written_decisions += len(decisions)
            self.written_outcomes += len(outcomes)
        self._maybe_rotate()

    def _block_id(self, data: bytes, new: list[tuple[int, bytes]]) -> int:
        """The block id of ``data`` in the current file; queued in ``new`` if not stored
        yet (identity, not equality: equal pieces from different frames are rare)."""
        hit = self._blocks.get(id(data))
        if hit is not None and hit[0] is data:
            self._blocks.move_to_end(id(data))
            return hit[1]
        bid = self._next_block
        self._next_block += 1
        new.append((bid, data))
        self._blocks[id(data)] = (data, bid)
        if len(self._blocks) > MAX_BLOCKS:
            self._blocks.popitem(last=False)
        return bid

    def _run(self) -> None:
        stop = False
        while not stop:
            deadline = time.monotonic() + self._flush_interval_s
            batch: list[object] = []
            barriers: list[_Barrier] = []
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, _Barrier):
                    barriers.append(item)
                    break
                batch.append(item)
            self._commit(batch)
            for b in barriers:
                b.done.set()
        self._conn.close()
