"""The experience log's own process: decode events from a pipe, assemble, write the store.

Why a separate process: CPython threads share one GIL. Assembling states and binding
SQLite rows is Python work; in a background *thread* it competes with the event loop and
the inference thread for the GIL, and on an oversubscribed box a background thread that
is descheduled while holding the GIL stalls serving for a whole OS time slice. Here the
server only serialises what it already has (one ``SerializeToString`` per message, C)
and writes bytes to a pipe from a thread that releases the GIL while it writes; all the
rest runs in this process, with its own interpreter.

Crash safety: if the server is killed, this process reads EOF, commits everything it
received and exits; if both are killed, at most the last flush interval (assembly period
+ the writer's commit interval, see ``periods``) plus the server's last ship period (≤ 20
ms) is lost and the store stays consistent (SQLite WAL).

Wire format (little endian), one record per event::

    u8 kind | u16 key length | f64 ts (Unix s) | u32 payload length | key | payload

``FRAME`` payload = u64 seq + ``TelemetryFrame`` (a columnar one is not parsed here:
``column_frame_event``); ``RESYNC`` = u64 seq + u16 len + request id
+ u32 len + ``SessionOpen`` + serialised state (may be empty); ``UNARY`` = u32 len +
``ModelGraphState`` + ``AdaptationDecision``; ``FLUSH``: key = token, answered on stdout
with ``ACK <token> <stats JSON>`` once everything before it is committed. Stats lines
``STATS <json>`` are also written once per flush interval.

Losses at the store: a commit that fails (full disk, I/O error) loses its rows; the
writer logs them. ``LossCounter`` classifies each such failure by its exception
(``loss_reason``) and the stats carry ``lost`` = rows lost per reason, which the server
exports as ``tamiyo_experience_dropped_total{kind="row", reason=...}``: a full disk is
counted where an operator can alert on it, not only written to a log.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import resource
import select
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience import writer as writer_module
from tamiyo.experience.writer import ExperienceWriter
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.background_priority import NICE
from tamiyo_server.experience_assembler import Assembler
from tamiyo_server.experience_events import (
    DecisionEvent,
    EndEvent,
    FrameEvent,
    OutcomeEvent,
    Resync,
    UnaryEvent,
    column_frame_event,
)

HEADER = struct.Struct("<BHdI")
OPEN, FRAME, DECISION, OUTCOME, END, UNARY, RESYNC, FLUSH = range(1, 9)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_RESYNC = struct.Struct("<QHI")
MAX_ASSEMBLE_S = 0.25  # events are assembled at least this often (s), see ``periods``


def _yield_cpu_to_serving() -> None:
    """Start at nice ``NICE``: background work, so decisions win the CPU. The server
    then runs this process as ``SCHED_IDLE`` while it keeps up, where it may
    (``tamiyo_server.background_priority``)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICE)  # (absolute: the server may have set it)


LOSS_REASONS = ("disk_full", "io_error", "write_error")
_SQLITE_FULL, _SQLITE_IOERR = 13, 10  # primary result codes (low byte of the extended code)
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
ROOM_BYTES = 1 << 20  # less free space than this next to the store counts as a full disk


def no_room(store: Path) -> bool:
    """True when ``store`` cannot grow by a few pages: its filesystem has less than
    ``ROOM_BYTES`` free for this user, or the store (or its WAL / journal) is within
    ``ROOM_BYTES`` of this process's file-size limit (RLIMIT_FSIZE)."""
    try:
        st = os.statvfs(store.parent)
    except OSError:
        return False
    if st.f_bavail * st.f_frsize < ROOM_BYTES:
        return True
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return False
    sizes = [0]
    for suffix in ("", "-wal", "-journal"):
        f = store.with_name(store.name + suffix)
        with contextlib.suppress(OSError):
            sizes.append(f.stat().st_size)
    return max(sizes) + ROOM_BYTES >= limit


def loss_reason(exc: BaseException | None, store: Path | None = None) -> str:
    """Why a store commit failed, as a metric label.

    ``disk_full``: SQLite's SQLITE_FULL (the OS said ENOSPC, or wrote only part of a
    page), an ``OSError`` ENOSPC / EDQUOT / EFBIG, or an SQLITE_IOERR while ``store`` has
    no room left (``no_room``: SQLite reports a write refused with EFBIG or EDQUOT as
    SQLITE_IOERR_WRITE, the same code as a failing device); ``io_error``: any other I/O
    error; ``write_error``: anything else (locked, corrupt, a bug).
    """
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
            return "disk_full"
        if isinstance(code, int) and code & 0xFF == _SQLITE_IOERR:
            return "disk_full" if store is not None and no_room(store) else "io_error"
        return "write_error"
    if isinstance(exc, OSError):
        if exc.errno in _DISK_FULL_ERRNOS or (store is not None and no_room(store)):
            return "disk_full"
        return "io_error"
    return "write_error"


class LossCounter(logging.Handler):
    """Counts the rows of every failed store commit by ``loss_reason``.

    The writer (``tamiyo.experience.writer``) reports a failed commit only by logging it
    with the exception and the number of records lost (``"...; %d records lost"``); this
    handler on its logger turns those into counters. Logging still reaches stderr.
    """

    def __init__(self, store: Callable[[], Path] | None = None) -> None:
        super().__init__(logging.ERROR)
        self._store = store  # the file being written (it changes on rotation)
        self.rows = dict.fromkeys(LOSS_REASONS, 0)  # rows lost, by reason
        self.failures = dict.fromkeys(LOSS_REASONS, 0)  # failed commits, by reason
        self._mu = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        reason = loss_reason(exc, self._store() if self._store is not None else None)
        args = record.args if isinstance(record.args, tuple) else ()
        n = args[0] if len(args) == 1 and isinstance(args[0], int) else 0
        with self._mu:
            self.failures[reason] += 1
            self.rows[reason] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._mu:
            return {"lost": dict(self.rows), "failed_commits": dict(self.failures)}


def record(kind: int, key: str, ts_s: float, payload: bytes) -> bytes:
    k = key.encode()
    return HEADER.pack(kind, len(k), ts_s, len(payload)) + k + payload


def _event(kind: int, key: str, ts: float, p: bytes) -> object:
    if kind == FRAME:
        seq = _U64.unpack_from(p)[0]
        raw = p[8:]
        ev = column_frame_event(key, seq, raw)
        return ev if ev is not None else FrameEvent(key, seq, pb.TelemetryFrame.FromString(raw))
    if kind == DECISION:
        return DecisionEvent(key, decision_pb2.AdaptationDecision.FromString(p), ts)
    if kind == OUTCOME:
        return OutcomeEvent(key, pb.DecisionOutcome.FromString(p), ts)
    if kind == END:
        return EndEvent(key, ts)
    if kind in (OPEN, RESYNC):
        seq, rid_len, open_len = _RESYNC.unpack_from(p) if kind == RESYNC else (0, 0, len(p))
        o = _RESYNC.size if kind == RESYNC else 0
        rid = p[o : o + rid_len].decode()
        msg = pb.SessionOpen.FromString(p[o + rid_len : o + rid_len + open_len])
        state = p[o + rid_len + open_len :] if kind == RESYNC else None
        return Resync(key, msg.host_id, msg.topology, tuple(msg.kernels), seq, state, rid)
    if kind == UNARY:
        n = _U32.unpack_from(p)[0]
        st = graph_pb2.ModelGraphState.FromString(p[4 : 4 + n])
        return UnaryEvent(st, decision_pb2.AdaptationDecision.FromString(p[4 + n :]), ts)
    raise ValueError(f"experience pipe: unknown record kind {kind}")


def _stats(w: ExperienceWriter, asm: Assembler, losses: LossCounter) -> str:
    return json.dumps({
        "decisions": w.written_decisions, "outcomes": w.written_outcomes,
        "dropped": w.dropped, "write_errors": w.write_errors, "unmatched": asm.unmatched,
        "files": [str(f) for f in w.files], **losses.snapshot(),
    })  # fmt: skip


def periods(flush_interval_s: float) -> tuple[float, float]:
    """(assembly period, writer flush interval) in s. Events are assembled in batches
    (the numpy encoding of columnar frames costs a fixed ~0.2 ms per batch, so larger
    batches are cheaper per frame) and the writer commits what was assembled; the two
    add up to ``flush_interval_s``, so a crash of server and log together still loses
    at most one flush interval (plus the ≤ 20 ms the server had not shipped yet)."""
    assemble = min(MAX_ASSEMBLE_S, flush_interval_s / 4)
    return assemble, flush_interval_s - assemble


def serve(fd: int, out: Any, config: ExperienceLogConfig, path: Path, window: int) -> None:
    """Read records from ``fd`` until EOF; commit everything; report on ``out``."""
    current: list[Path] = [path]
    losses = LossCounter(lambda: current[0])
    writer_log = logging.getLogger(writer_module.__name__)
    writer_log.addHandler(losses)
    try:
        _serve(fd, out, config, path, window, losses, current)
    finally:
        writer_log.removeHandler(losses)


def _serve(
    fd: int,
    out: Any,
    config: ExperienceLogConfig,
    path: Path,
    window: int,
    losses: LossCounter,
    current: list[Path],
) -> None:
    asm = Assembler(window, config, Path(config.dir))
    assemble_s, commit_s = periods(config.flush_interval_s)
    writer = ExperienceWriter(
        path,
        flush_interval_s=commit_s,
        max_queue=1 << 16,
        max_file_bytes=int(config.max_file_mb * 1e6),
        max_file_age_s=config.max_file_age_s,
        writer_name=f"tamiyo-server experience process pid {os.getpid()}",
        prepare=lambda batch: [r for item in batch for r in item],  # type: ignore[attr-defined]
    )
    buf = bytearray()
    chunk_buf = bytearray(1 << 20)  # os.read would allocate (mmap) 1 MB per call
    chunk_view = memoryview(chunk_buf)
    events: list[object] = []
    next_ship = next_stats = time.monotonic()

    def ship() -> None:
        asm.current = current[0] = writer.current_path
        if events:
            records = asm.prepare(events)
            while writer.queued > 2:  # slow disk: stop reading; the pipe, then the
                time.sleep(0.01)  # server's bounded buffer fill up (and it drops)
            writer.offer(records)
            events.clear()

    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, next_ship - time.monotonic()))
        n_read = os.readv(fd, [chunk_buf]) if ready else -1
        eof = n_read == 0
        if n_read > 0:
            buf += chunk_view[:n_read]
        view, o = memoryview(buf), 0
        while len(buf) - o >= HEADER.size:
            kind, klen, ts, plen = HEADER.unpack_from(view, o)
            end = o + HEADER.size + klen + plen
            if end > len(buf):
                break
            key = bytes(view[o + HEADER.size : o + HEADER.size + klen]).decode()
            if kind == FLUSH:
                ship()
                writer.flush()
                out.write(f"ACK {key} {_stats(writer, asm, losses)}\n")
                out.flush()
            else:
                events.append(_event(kind, key, ts, bytes(view[o + HEADER.size + klen : end])))
            o = end
        view.release()
        del buf[:o]
        now = time.monotonic()
        if eof or now >= next_ship or len(events) > 4096:
            ship()
            next_ship = now + assemble_s
        if now >= next_stats:
            with contextlib.suppress(BrokenPipeError):
                out.write(f"STATS {_stats(writer, asm, losses)}\n")
                out.flush()
            next_stats = now + config.flush_interval_s
        if eof:  # the server closed the pipe (or died)
            break
    writer.close()
    with contextlib.suppress(BrokenPipeError):  # the server may be gone: nobody to tell
        out.write(f"STATS {_stats(writer, asm, losses)}\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tamiyo_server.experience_proc")
    p.add_argument("--config", required=True, help="ExperienceLogConfig as JSON")
    p.add_argument("--path", required=True, help="first store file")
    p.add_argument("--window", type=int, required=True)
    a = p.parse_args(argv)
    # stderr is the server's: say which process speaks (lastResort would print bare text)
    logging.basicConfig(level=logging.WARNING, format="experience process: %(message)s")
    config = ExperienceLogConfig(**json.loads(a.config))
    _yield_cpu_to_serving()  # background work: decisions win the CPU
    # Nothing here makes reference cycles worth scanning for: keep the objects made at
    # import out of every collection, and collect young objects less often (measured
    # ~5 % of this process's CPU in gc_collect_main at the default threshold of 700).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    serve(sys.stdin.fileno(), sys.stdout, config, Path(a.path), a.window)


if __name__ == "__main__":
    main()
