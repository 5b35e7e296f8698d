"""The serving event loop in place, without gRPC: event-loop CPU per frame.

Why: ``hotpath`` times each stage in a hot loop, which flatters it: in the running
server every Python step costs 4-5x more (caches are cold between one frame's many
steps), and the serving bench mixes in the transport and the load generator's share of
the 2 cores. Here the real ``StreamHandler``s and ``DecisionPipeline`` (policy, batcher,
featurizer, rules) serve 64 streams of ``loadgen`` hosts fed through in-memory request
iterators, open loop, in one process; the measure is the event-loop thread's CPU time
per frame. The baseline beside it, in the same run: the same streams answered by a bare
handler that writes a decision-sized message per frame (the asyncio part of the echo
server), so ``ratio`` is Tamiyo's loop cost over plain stream handling.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from bench import BenchOptions
from bench.report import environment, print_table, write_json

PART = "inplace"
ORDER = 46
STREAMS = 64


class _Sink:
    """The context a handler writes to (counts what a client would read)."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    async def write(self, msg: Any) -> None:
        self.got.append(msg)


async def _feed(q: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (x := await q.get()) is not None:
        yield x


async def _echo(requests: AsyncIterator[Any], sink: _Sink, body: bytes) -> None:
    async for req in requests:
        if req.WhichOneof("message") == "frame":
            await sink.write(body)


async def _measure(tamiyo: bool, rate: float, duration_s: float) -> dict[str, Any]:
    from tamiyo.config import ServerConfig
    from tamiyo.policy.engine import configure_threads
    from tamiyo.v1 import tamiyo_service_pb2 as pb
    from tamiyo_client.loadgen import make_host, suffix
    from tamiyo_server.metrics import ServerMetrics
    from tamiyo_server.pipeline import DecisionPipeline
    from tamiyo_server.policy_holder import PolicyHolder
    from tamiyo_server.reload import load_startup
    from tamiyo_server.stream import StreamHandler

    cfg = ServerConfig()
    configure_threads(1)
    rng = random.Random(0)
    hosts = [make_host(rng, i, 4, 64) for i in range(STREAMS)]
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in hosts]
    sink = _Sink()
    pipeline = None
    if tamiyo:
        metrics = ServerMetrics()
        served, _ = load_startup(cfg)
        pipeline = DecisionPipeline(cfg, PolicyHolder(served, metrics), metrics)
        await asyncio.to_thread(pipeline.calibrate)
        pipeline.start()
    tasks = []
    for h, q in zip(hosts, queues, strict=True):
        q.put_nowait(pb.StreamTelemetryRequest.FromString(h.open_bytes))
        if pipeline is not None:
            run = StreamHandler(pipeline).run(_feed(q), sink)
        else:  # a decision-sized answer per frame (bench.echo_server's template)
            from bench.echo_server import _decision_template

            run = _echo(_feed(q), sink, _decision_template(h.layers))
        tasks.append(asyncio.create_task(run))
    total = int(rate * duration_s)
    per_stream = total // STREAMS + 2
    parse = pb.StreamTelemetryRequest.FromString
    frames = [
        [parse(h.frame_bytes + suffix(k, f"{i}.{k}")) for k in range(per_stream)]
        for i, h in enumerate(hosts)
    ]
    gc.collect()
    gc.freeze()
    await asyncio.sleep(0.2)
    sink.got.clear()
    graphs0 = _batch_graphs(pipeline)
    t0, c0 = time.perf_counter(), time.thread_time()
    next_at = t0
    for n in range(total):
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        i = n % STREAMS
        queues[i].put_nowait(frames[i][n // STREAMS])
        next_at += 1.0 / rate
    for q in queues:
        q.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30.0)
    cpu_s = time.thread_time() - c0
    row: dict[str, Any] = {
        "server": "tamiyo" if tamiyo else "bare",
        "streams": STREAMS,
        "offered_per_s": rate,
        "frames": total,
        "loop_cpu_per_frame_us": round(cpu_s / total * 1e6, 1),
    }
    if pipeline is not None:
        decisions = [r.decision for r in sink.got if r.WhichOneof("message") == "decision"]
        lat = sorted(d.server_latency_us / 1000.0 for d in decisions)
        graphs, batches = (a - b for a, b in zip(_batch_graphs(pipeline), graphs0, strict=True))
        row |= {
            "network_share": round(sum(not d.degraded for d in decisions) / total, 3),
            "graphs_per_batch": round(graphs / max(batches, 1), 2),
            "server_p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
            "server_p99_ms": round(lat[int(len(lat) * 0.99)], 2) if lat else None,
        }
        await pipeline.stop()
    gc.unfreeze()
    return row


def _batch_graphs(pipeline: Any) -> tuple[float, float]:
    """(graphs run in batches, batches) so far, from the server's own histogram."""
    if pipeline is None:
        return 0.0, 0.0
    get = pipeline.m.registry.get_sample_value
    return get("tamiyo_batch_graphs_sum") or 0.0, get("tamiyo_batch_graphs_count") or 0.0


def run(opts: BenchOptions) -> None:
    duration = 1.5 if opts.quick else 5.0
    rows = []
    for rate in (500.0, 1500.0):
        bare = asyncio.run(_measure(False, rate, duration))
        row = asyncio.run(_measure(True, rate, duration))
        row["bare_loop_cpu_per_frame_us"] = bare["loop_cpu_per_frame_us"]
        row["ratio"] = round(row["loop_cpu_per_frame_us"] / bare["loop_cpu_per_frame_us"], 2)
        rows.append(row)
    env = environment()
    for r in rows:
        r["env"] = env
    print_table(
        f"serving event loop in place ({STREAMS} streams, no gRPC): CPU per frame",
        rows,
        [
            ("offered_per_s", "frames/s"),
            ("loop_cpu_per_frame_us", "tamiyo µs/frame"),
            ("bare_loop_cpu_per_frame_us", "bare µs/frame"),
            ("ratio", "ratio"),
            ("graphs_per_batch", "graphs/batch"),
            ("network_share", "network share"),
            ("server_p50_ms", "server p50 ms"),
            ("server_p99_ms", "server p99 ms"),
        ],
    )
    print(f"  (load average: {env.get('load_avg_1min')}; 2 cores shared by all)")
    print(f"  wrote {write_json(opts.out_dir, PART, rows)}")
