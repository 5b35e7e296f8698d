"""The experience log's own process: decode events from a pipe, assemble, write the store.

Why a separate process: CPython threads share one GIL. Assembling states and binding
SQLite rows is Python work; in a background *thread* it competes with the event loop and
the inference thread for the GIL, and on an oversubscribed box a background thread that
is descheduled while holding the GIL stalls serving for a whole OS time slice. Here the
server only serialises what it already has (one ``SerializeToString`` per message, C)
and writes bytes to a pipe from a thread that releases the GIL while it writes; all the
rest runs in this process, with its own interpreter.

Crash safety: if the server is killed, this process reads EOF, commits everything it
received and exits; if both are killed, at most the last ship period (≤ 50 ms) plus flush
interval is lost and the store stays consistent (SQLite WAL).

Wire format (little endian), one record per event::

    u8 kind | u16 key length | f64 ts (Unix s) | u32 payload length | key | payload

``FRAME`` payload = u64 seq + ``TelemetryFrame``; ``RESYNC`` = u64 seq + u16 len + request id
+ u32 len + ``SessionOpen`` + serialised state (may be empty); ``UNARY`` = u32 len +
``ModelGraphState`` + ``AdaptationDecision``; ``FLUSH``: key = token, answered on stdout
with ``ACK <token> <stats JSON>`` once everything before it is committed. Stats lines
``STATS <json>`` are also written once per flush interval.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience.writer import ExperienceWriter
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.experience_assembler import (
    Assembler,
    DecisionEvent,
    EndEvent,
    FrameEvent,
    OutcomeEvent,
    Resync,
    UnaryEvent,
)

HEADER = struct.Struct("<BHdI")
OPEN, FRAME, DECISION, OUTCOME, END, UNARY, RESYNC, FLUSH = range(1, 9)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_RESYNC = struct.Struct("<QHI")
SHIP_S = 0.05  # events are assembled at least this often (s)


def record(kind: int, key: str, ts_s: float, payload: bytes) -> bytes:
    k = key.encode()
    return HEADER.pack(kind, len(k), ts_s, len(payload)) + k + payload


def _event(kind: int, key: str, ts: float, p: bytes) -> object:
    if kind == FRAME:
        return FrameEvent(key, _U64.unpack_from(p)[0], pb.TelemetryFrame.FromString(p[8:]))
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


def _stats(w: ExperienceWriter, asm: Assembler) -> str:
    return json.dumps({
        "decisions": w.written_decisions, "outcomes": w.written_outcomes,
        "dropped": w.dropped, "write_errors": w.write_errors, "unmatched": asm.unmatched,
        "files": [str(f) for f in w.files],
    })  # fmt: skip


def serve(fd: int, out: Any, config: ExperienceLogConfig, path: Path, window: int) -> None:
    """Read records from ``fd`` until EOF; commit everything; report on ``out``."""
    asm = Assembler(window, config, Path(config.dir))
    writer = ExperienceWriter(
        path,
        flush_interval_s=config.flush_interval_s,
        max_queue=1 << 16,
        max_file_bytes=int(config.max_file_mb * 1e6),
        max_file_age_s=config.max_file_age_s,
        writer_name=f"tamiyo-server experience process pid {os.getpid()}",
        prepare=lambda batch: [r for item in batch for r in item],  # type: ignore[attr-defined]
    )
    buf = bytearray()
    events: list[object] = []
    next_ship = next_stats = time.monotonic()

    def ship() -> None:
        asm.current = writer.current_path
        if events:
            records = asm.prepare(events)
            while writer.queued > 2:  # slow disk: stop reading; the pipe, then the
                time.sleep(0.01)  # server's bounded buffer fill up (and it drops)
            writer.offer(records)
            events.clear()

    while True:
        ready, _, _ = select.select([fd], [], [], SHIP_S)
        chunk = os.read(fd, 1 << 20) if ready else None
        buf += chunk or b""
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
                out.write(f"ACK {key} {_stats(writer, asm)}\n")
                out.flush()
            else:
                events.append(_event(kind, key, ts, bytes(view[o + HEADER.size + klen : end])))
            o = end
        view.release()
        del buf[:o]
        now = time.monotonic()
        if chunk == b"" or now >= next_ship or len(events) > 4096:
            ship()
            next_ship = now + SHIP_S
        if now >= next_stats:
            with contextlib.suppress(BrokenPipeError):
                out.write(f"STATS {_stats(writer, asm)}\n")
                out.flush()
            next_stats = now + config.flush_interval_s
        if chunk == b"":  # EOF: the server closed the pipe (or died)
            break
    writer.close()
    with contextlib.suppress(BrokenPipeError):  # the server may be gone: nobody to tell
        out.write(f"STATS {_stats(writer, asm)}\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tamiyo_server.experience_proc")
    p.add_argument("--config", required=True, help="ExperienceLogConfig as JSON")
    p.add_argument("--path", required=True, help="first store file")
    p.add_argument("--window", type=int, required=True)
    a = p.parse_args(argv)
    config = ExperienceLogConfig(**json.loads(a.config))
    serve(sys.stdin.fileno(), sys.stdout, config, Path(a.path), a.window)


if __name__ == "__main__":
    main()
