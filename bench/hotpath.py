"""Per-stage cost of the serving hot path, in process (no gRPC), in µs.

Why: the serving bench says *that* Tamiyo is slower than the echo server; this part says
*where* the time goes. For hosts of ``loadgen`` graphs (32 layers) at 1 and 64 streams,
with frames in either signal form (``signal_columns``, what clients send, and the readable
``signals`` messages), it times per frame the stages the event loop runs (decode,
ingest = validate and record in the window, as ``Session.ingest`` does it: the native
path for a full columnar frame, otherwise decode + checks + window update; snapshot,
rules + proto build, serialize) and, per batch, the
batch stages (on the event loop on CPU, on an inference thread on CUDA)
(featurize_many, engine.infer). Medians over iterations after a warm-up; process CPU time
per iteration is reported too (the box is shared, wall time includes preemption).
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from bench import BenchOptions
from bench.report import environment, print_table, write_json

PART = "hotpath"
ORDER = 45
EVENT_LOOP = ("decode", "ingest", "snapshot", "rules_build", "serialize")
INFERENCE = ("featurize_batch", "infer_batch")


def measure(layers: int, streams: int, iters: int, form: str = "columns") -> dict[str, Any]:
    """Median µs per stage (per frame for event-loop stages, per batch for the rest).
    ``form``: the frames' signal form (``loadgen.SIGNAL_FORMS``)."""
    from tamiyo.config import ServerConfig
    from tamiyo.policy.builtin import load_policy
    from tamiyo.policy.engine import InferenceEngine
    from tamiyo.policy.features import featurize_many
    from tamiyo.policy.rules import DecisionRules
    from tamiyo.v1 import tamiyo_service_pb2 as pb
    from tamiyo_client.loadgen import make_host
    from tamiyo_server.pipeline import _build
    from tamiyo_server.session import FrameRef, Session
    from tamiyo_server.validation import validate_session_open

    cfg = ServerConfig()
    rng = random.Random(0)
    hosts = [make_host(rng, i, layers, layers, form) for i in range(streams)]
    sessions = []
    for h in hosts:
        op = pb.StreamTelemetryRequest.FromString(h.open_bytes).session_open
        info = validate_session_open(op, cfg.limits)
        sessions.append(Session.open(op, info, DecisionRules(cfg.rules), 0.01, cfg.limits))
    policy = load_policy(None)
    engine = InferenceEngine(policy.model, "cpu", version=policy.version)
    t: dict[str, list[int]] = {k: [] for k in EVENT_LOOP + INFERENCE}
    ns = time.perf_counter_ns
    cpu = 0.0
    for it in range(iters):
        c0 = time.process_time()
        snaps = []
        for s, h in zip(sessions, hosts, strict=True):
            t0 = ns()
            fr = pb.StreamTelemetryRequest.FromString(h.frame_bytes).frame
            fr.step = it + 1
            t1 = ns()
            s.ingest(fr, cfg.limits)
            t2 = ns()
            snaps.append(s.snapshot(fr))
            t3 = ns()
            t["decode"].append(t1 - t0)
            t["ingest"].append(t2 - t1)
            t["snapshot"].append(t3 - t2)
        t0 = ns()
        graphs = featurize_many(snaps)
        t1 = ns()
        outs = engine.infer(graphs)
        t2 = ns()
        t["featurize_batch"].append(t1 - t0)
        t["infer_batch"].append(t2 - t1)
        for s, snap, g, o in zip(sessions, snaps, graphs, outs, strict=True):
            t0 = ns()
            rd = s.rules.decide(o, g, s.rule_state, snap.step, snap.epoch)
            msg = _build(rd, g, o, "v", FrameRef(snap.step, 0, "", 0.0))
            t1 = ns()
            pb.StreamTelemetryResponse(decision=msg).SerializeToString()
            t2 = ns()
            t["rules_build"].append(t1 - t0)
            t["serialize"].append(t2 - t1)
        if it >= iters // 5:
            cpu += time.process_time() - c0
    row: dict[str, Any] = {"layers": layers, "streams": streams, "form": form}
    for k, v in t.items():
        row[f"{k}_us"] = round(float(np.median(np.array(v[len(v) // 5 :]))) / 1000.0, 1)
    row["event_loop_per_frame_us"] = round(sum(row[f"{k}_us"] for k in EVENT_LOOP), 1)
    row["cpu_per_iter_us"] = round(cpu / (iters - iters // 5) * 1e6, 1)
    return row


def run(opts: BenchOptions) -> None:
    from tamiyo.policy.engine import configure_threads
    from tamiyo_client.loadgen import SIGNAL_FORMS

    configure_threads(opts.threads)
    iters = 60 if opts.quick else 300
    rows = [
        measure(32, n, iters if n == 1 else iters // 5, form)
        for form in SIGNAL_FORMS
        for n in (1, 64)
    ]
    env = environment()
    for r in rows:
        r["env"] = env
    cols = [("form", "signals"), ("streams", "streams"), ("layers", "layers")]
    cols += [(f"{k}_us", k) for k in EVENT_LOOP + INFERENCE]
    cols += [("event_loop_per_frame_us", "loop/frame"), ("cpu_per_iter_us", "cpu/iter")]
    print_table("hot path: median µs per frame (event loop) / per batch (inference)", rows, cols)
    print(f"  (load average: {env.get('load_avg_1min')}; 2 cores shared by all)")
    print(f"  wrote {write_json(opts.out_dir, PART, rows)}")
