"""The client sidecar: a child process running the streaming client for a training process.

Why a process: measured in ``python -m bench --only client``, the client's thread
(protobuf encoding, grpc.aio writes and reads, event-loop wake-ups: ~0.5-0.7 ms of CPU
per frame on this VM) took the GIL from the training thread every time a torch op gave
it up, adding ~8-17 % to a 4 ms training step (up to 27 % in one CI run). In a child
process that work has its own interpreter and GIL; the training thread only packs a
frame (``tamiyo_client.pipe_records``, µs) and writes it to a pipe.

Run by ``tamiyo_client.process.ProcessTamiyoClient`` as ``python -m tamiyo_client.sidecar
BELL_FD``:
stdin carries ``INIT``, ``SESSION``, then frames, outcomes, session updates and ``CLOSE``;
stdout carries ``DECISION`` and ``STATUS`` records; logs go to stderr. On ``CLOSE`` (its
payload: the time allowed, s) or when stdin closes (the training process ended or died)
it ends the stream cleanly (flush, half-close, the server's last decisions and its OK;
``BlockingTamiyoClient.close``), passes those decisions and a final STATUS on, and exits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import fields
from typing import Any

from tamiyo.config import ClientConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client import pipe_records as rec
from tamiyo_client.blocking import BlockingTamiyoClient
from tamiyo_client.received import ReceivedDecision
from tamiyo_client.security import ClientSecurity

log = logging.getLogger("tamiyo_client.sidecar")

# The parent's view of the state (connected, session, errors) is at most STATUS_EVERY_S
# old, of the counters COUNTERS_EVERY_S: each STATUS costs the training thread a JSON
# decode (~0.1 ms with the cold caches right after a training step).
STATUS_EVERY_S = 0.02
COUNTERS_EVERY_S = 0.25
# The sidecar polls its stdin (non-blocking) every POLL_S instead of blocking in read():
# a write to a pipe with a blocked reader is a "sync" wake-up, which made Linux run the
# sidecar on the training thread's core right away (its cache, its time slice). The poll
# interval starts at POLL_S after data and doubles with each empty read up to POLL_MAX_S,
# so frames every few ms cost ~1 ms of latency and an idle sidecar few wake-ups
# (measured idle CPU: 4.4 % of a core at a fixed 1 ms).
POLL_S = 0.001
POLL_MAX_S = 0.008
# The client's close (flush, half-close, the server's last answers and OK; see
# BlockingTamiyoClient.close) gets this long at stdin's EOF (the parent is gone), and what
# the parent's CLOSE record says otherwise (its close timeout less a margin for the exit).
CLOSE_S = 4.0
_BELL = struct.Struct("<Q")
_STATE = ("connected", "session_id", "policy_version", "last_error", "fatal_error")
_BYTES = ("root_certificates", "certificate_chain", "private_key")


def init_payload(config: ClientConfig, security: ClientSecurity) -> dict[str, Any]:
    """What ``INIT`` carries: the config and security settings as JSON values."""
    sec: dict[str, Any] = {f.name: getattr(security, f.name) for f in fields(security)}
    for name in _BYTES:
        if sec[name] is not None:
            sec[name] = base64.b64encode(sec[name]).decode()
    return {"config": {f.name: getattr(config, f.name) for f in fields(config)}, "security": sec}


def from_init(payload: dict[str, Any]) -> tuple[ClientConfig, ClientSecurity]:
    sec = dict(payload["security"])
    for name in _BYTES:
        if sec[name] is not None:
            sec[name] = base64.b64decode(sec[name])
    return ClientConfig(**payload["config"]), ClientSecurity(**sec)


def status(client: BlockingTamiyoClient) -> dict[str, Any]:
    """The client's counters and state, as the parent mirrors them."""
    c = client.client
    st = c.stats
    return {
        "connected": c.connected,
        "session_id": c.session_id,
        "policy_version": c.policy_version,
        "decision_deadline_ms": c.decision_deadline_ms,
        "last_error": c.last_error,
        "fatal_error": c.fatal_error,
        "frames_coalesced": c.frames_coalesced,
        "pending": c.pending(),
        "stats": {
            f.name: getattr(st, f.name)
            for f in fields(st)
            if f.name not in ("latencies_ms", "decisions")
        },
        "inbox_dropped": client.inbox.dropped,
    }


class _Out:
    """stdout records, written by one thread at a time; after each, the doorbell (a
    shared 8-byte counter, see ``ProcessTamiyoClient``) is bumped."""

    def __init__(self, fd: int, bell: mmap.mmap | None) -> None:
        self.fd = fd
        self.bell = bell
        self.rung = 0
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            self.rung += 1
            if self.bell is not None:
                _BELL.pack_into(self.bell, 0, self.rung)


def _pump_out(client: BlockingTamiyoClient, out: _Out, stop: threading.Event) -> None:
    """Decisions as they arrive, and the status whenever it changed (every 20 ms at most).
    Blocks on the pipe if the parent stops reading; the inbox then drops the oldest."""
    try:
        _pump(client, out, stop)
    except BrokenPipeError:  # the parent is gone, and main() ends at EOF
        stop.set()
    except OSError:
        log.exception("sidecar: writing to the parent failed; decisions stop here")
        stop.set()


def _decision(r: ReceivedDecision) -> bytes:
    return rec.encode_decision(
        r.decision.SerializeToString(), r.latency_ms, r.session_id, r.connection
    )


def _pump(client: BlockingTamiyoClient, out: _Out, stop: threading.Event) -> None:
    last: dict[str, Any] = {}
    next_status = next_counters = 0.0
    while not stop.is_set():
        r = client.get_decision(STATUS_EVERY_S)
        if r is not None:
            out.write(_decision(r))
        now = time.monotonic()
        if now >= next_status:
            next_status = now + STATUS_EVERY_S
            st = status(client)
            state_changed = any(st[k] != last.get(k) for k in _STATE)
            if state_changed or (now >= next_counters and st != last):
                out.write(rec.encode_json(rec.STATUS, st))
                last = st
                next_counters = now + COUNTERS_EVERY_S


def _read_records(fd: int, reader: rec.RecordReader) -> list[tuple[int, bytes]] | None:
    """The next records on ``fd`` (non-blocking: sleeps ``POLL_S`` doubling up to
    ``POLL_MAX_S`` between empty reads); None at EOF."""
    wait = POLL_S
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(wait)
            wait = min(wait * 2, POLL_MAX_S)
            continue
        return None if not data else reader.feed(data)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Ctrl-C reaches the whole process group: the training process handles it, and this
    # sidecar ends when the parent's pipe closes (EOF), without a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bell = mmap.mmap(int(sys.argv[1]), _BELL.size) if len(sys.argv) > 1 else None
    out = _Out(os.dup(1), bell)
    os.dup2(2, 1)  # stray prints must not corrupt the record stream
    os.set_blocking(0, False)
    reader = rec.RecordReader()
    first: list[tuple[int, bytes]] = []
    while len(first) < 2:
        got = _read_records(0, reader)
        if got is None:
            return 0
        first += got
    (k1, p1), (k2, p2), rest = first[0], first[1], first[2:]
    if (k1, k2) != (rec.INIT, rec.SESSION):
        log.error("sidecar: expected INIT then SESSION, got kinds %d, %d", k1, k2)
        return 2
    config, security = from_init(json.loads(p1))
    client = BlockingTamiyoClient(pb.SessionOpen.FromString(p2), config, security)
    client.start()
    stop = threading.Event()
    pump = threading.Thread(target=_pump_out, args=(client, out, stop), daemon=True)
    pump.start()
    close_s = CLOSE_S
    try:
        pending: list[tuple[int, bytes]] | None = rest
        while pending is not None:
            for kind, payload in pending:
                if kind == rec.CLOSE:
                    close_s = close_timeout(payload)
                    return 0
                _handle(client, kind, payload, out)
            pending = _read_records(0, reader)
        return 0
    finally:
        # Half-close and wait for the server's last answers and its OK (the pump passes
        # decisions on meanwhile); what it had not taken from the inbox goes out after it.
        client.close(timeout_s=close_s)
        stop.set()
        pump.join(1.0)
        with contextlib.suppress(OSError):
            for r in client.poll_decisions():
                out.write(_decision(r))
            out.write(rec.encode_json(rec.STATUS, status(client)))


def close_timeout(payload: bytes) -> float:
    """The time ``CLOSE`` gives the client's close, in s (its payload, ASCII; ``CLOSE_S``
    when empty or unreadable)."""
    try:
        return max(0.0, float(payload)) if payload else CLOSE_S
    except ValueError:
        return CLOSE_S


def _handle(client: BlockingTamiyoClient, kind: int, payload: bytes, out: _Out) -> None:
    if kind in (rec.FRAME, rec.FRAME_JSON):
        client.send_frame(rec.decode_frame(kind, payload))
    elif kind == rec.FRAME_PB:
        client.send_frame(pb.TelemetryFrame.FromString(payload))
    elif kind == rec.OUTCOME:
        client.report_outcome(pb.DecisionOutcome.FromString(payload))
    elif kind == rec.SESSION:
        client.update_session(pb.SessionOpen.FromString(payload))
    elif kind == rec.QUERY:  # after every earlier record was handed to the client
        out.write(rec.encode_json(rec.STATUS, status(client) | {"query": int(payload)}))
    else:
        log.error("sidecar: unknown record kind %d ignored", kind)


if __name__ == "__main__":
    sys.exit(main())
