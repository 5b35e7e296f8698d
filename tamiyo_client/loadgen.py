"""Load generator: N simulated hosts streaming telemetry frames, closed or open loop.

``python -m tamiyo_client.loadgen --target 127.0.0.1:50051 --streams 64 --mode closed``
prints one JSON object (decisions/s, client-observed p50/p99/p99.9 latency in ms, shed,
lost) on stdout. Run it in its own process so its CPU is not the server's.

Why it is built the way it is: on a 2-core box the generator must cost as little as
possible per frame, or it measures itself. Each host's frame is serialized once; per
send only a tiny suffix (step + request id) is appended — protobuf merges a repeated
embedded message field, so ``frame_bytes + suffix`` is a valid request with the new step
and tag. Responses are parsed (the tag is needed to match latency).

* closed loop: each stream sends a frame, waits for its answer, sends the next; after a
  refusal carrying pushback (``StreamError.retry_after_ms``) it waits that long first,
  as ``tamiyo_client`` does (``--ignore-pushback``: a client that re-asks at once).
* open loop: each stream sends at ``rate / streams`` per second on a fixed schedule,
  whatever the answers; latency is measured from the *scheduled* send time (no
  coordinated omission). At the end, frames without any answer after ``--drain-s``
  count as ``lost``.

Every frame carries ``client_clock_us`` (the scheduled send time in open loop, the send
time in closed loop), as ``tamiyo_client`` stamps its frames, so the server judges each
budget from when the host asked; ``--no-client-clock`` leaves it out.

Shed = degraded decisions + frames answered "superseded" or refused as overloaded
(RESOURCE_EXHAUSTED); all are explicit answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc

from tamiyo.cli_text import HelpFormatter, describe
from tamiyo.policy.snapshot import FLOAT_FIELDS
from tamiyo.signal_columns import encode_signal_columns
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.security import ClientSecurity, add_security_args, security_from_args

METHOD = "/tamiyo.v1.TamiyoService/StreamTelemetry"
STREAMS_PER_CHANNEL = 100  # separate HTTP/2 connections, as separate hosts would have
OPEN_CONCURRENCY = 64  # sessions opened at once (grpc's aio client fails larger bursts)
OPEN_TIMEOUT_S = 120.0  # a first SessionOpen refused RESOURCE_EXHAUSTED is retried after its
# pushback until this long after the run started (the server's turns of open work were full)


@dataclass
class Host:
    """One simulated host: its SessionOpen and one pre-serialized frame (bytes)."""

    host_id: str
    layers: int
    open_bytes: bytes
    frame_bytes: bytes


def make_host(
    rng: random.Random, i: int, min_layers: int, max_layers: int, form: str = "columns"
) -> Host:
    """A chain of 4-64 layers with a few skip edges, 2 kernels, one degrading layer.

    ``form``: how the frame carries its signals, ``"columns"`` (``signal_columns``, what
    real clients send; built by the shared encoder) or ``"message"`` (``signals``, the
    readable form). Both carry the same values for the same ``rng``."""
    n = rng.randint(min_layers, max_layers)
    layers = [
        graph_pb2.LayerSpec(
            layer_id=f"l{j}",
            layer_type=graph_pb2.LayerType.ValueType(rng.randint(1, 7)),
            input_size=rng.choice((64, 256, 1024)),
            output_size=rng.choice((64, 256, 1024)),
            parameter_count=rng.randint(1_000, 5_000_000),
            seed_count=rng.randint(0, 4),
        )
        for j in range(n)
    ]
    edges = {(j, j + 1) for j in range(n - 1)}
    for _ in range(n // 4):
        a = rng.randrange(0, max(n - 2, 1))
        b = min(n - 1, a + rng.randint(2, 4))
        if a != b:
            edges.add((a, b))
    topo = graph_pb2.Topology(
        layers=layers, edges=[graph_pb2.Edge(source=a, target=b) for a, b in sorted(edges)]
    )
    kernels = [graph_pb2.KernelSpec(kernel_id=f"k{j}", parameter_count=4096) for j in range(2)]
    open_req = pb.StreamTelemetryRequest(
        session_open=pb.SessionOpen(host_id=f"loadgen-{i}", topology=topo, kernels=kernels)
    )
    sick = rng.randrange(n)
    draws = [
        (
            0.3 if j == sick else rng.uniform(0.7, 1.0),
            rng.uniform(0.1, 3.0),
            rng.uniform(0.0, 2.0),
            rng.uniform(0.0, 0.5),
            rng.uniform(0.0, 1.0),
            rng.uniform(0.0, 5.0),
            rng.uniform(0.0, 0.1),
            rng.uniform(0.0, 1.0),
        )
        for j in range(n)
    ]
    values = dict(zip(_DRAWN, np.array(draws, np.float64).T, strict=True))
    ids = [lay.layer_id for lay in layers]
    seeds = np.array([lay.seed_count for lay in layers], np.int64)
    frame = pb.TelemetryFrame(want_decision=True)
    if form == "columns":
        frame.signal_columns.MergeFromString(
            encode_signal_columns(ids, step=0, timestamp_s=1.7e9, total_seeds=seeds, **values)
        )
    elif form == "message":
        for j, lid in enumerate(ids):
            frame.signals.add(
                layer_id=lid,
                timestamp_s=1.7e9,
                total_seeds=int(seeds[j]),
                **{k: float(v[j]) for k, v in values.items()},
            )
    else:
        raise ValueError(f"form: 'columns' or 'message', not {form!r}")
    req = pb.StreamTelemetryRequest(frame=frame)
    return Host(f"loadgen-{i}", n, open_req.SerializeToString(), req.SerializeToString())


_DRAWN = FLOAT_FIELDS  # one random draw per float field of HealthSignal
SIGNAL_FORMS = ("columns", "message")


def suffix(step: int, tag: str, asked_at: float | None = None) -> bytes:
    """The per-send tail of a frame: its step, tag and (``asked_at``, s on the
    generator's monotonic clock) ``client_clock_us``."""
    clock_us = 0 if asked_at is None else int(asked_at * 1e6)
    return pb.StreamTelemetryRequest(
        frame=pb.TelemetryFrame(step=step, request_id=tag, client_clock_us=clock_us)
    ).SerializeToString()


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)  # every decision
    full_latencies_ms: list[float] = field(default_factory=list)  # network (not degraded)
    sent: int = 0
    decisions: int = 0
    degraded: int = 0
    superseded: int = 0
    overloaded: int = 0  # refused at the door (RESOURCE_EXHAUSTED): explicit shed
    open_refused: int = 0  # first SessionOpens refused (server busy with opens), then retried
    errors: int = 0
    lost: int = 0
    pushback_s: float = 0.0  # closed loop: time spent honouring the server's pushback
    error_samples: list[str] = field(default_factory=list)

    def answer(self, raw: bytes, sent_at: dict[str, float], since: float) -> tuple[str, int]:
        """Classify one response; count it if the frame it answers was sent at or after
        ``since``; returns the tag of that frame ('' if none), popped from ``sent_at``,
        and the pushback it carries (ms, 0 = none)."""
        msg = pb.StreamTelemetryResponse.FromString(raw)
        kind = msg.WhichOneof("message")
        if kind == "decision":
            tag = msg.decision.frame_request_id
        elif kind == "error":
            tag = msg.error.frame_request_id
        else:
            return "", 0
        retry_ms = msg.error.retry_after_ms if kind == "error" else 0
        t = sent_at.pop(tag, None)
        if t is None or t < since:
            return tag, retry_ms
        if kind == "decision":
            self.decisions += 1
            self.degraded += msg.decision.degraded
            ms = (time.perf_counter() - t) * 1000.0
            self.latencies_ms.append(ms)
            if not msg.decision.degraded:
                self.full_latencies_ms.append(ms)
        elif "superseded" in msg.error.message:
            self.superseded += 1
        elif msg.error.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED:
            self.overloaded += 1
        else:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(msg.error.message[:200])
        return tag, retry_ms


@dataclass
class Plan:
    mode: str
    streams: int
    rate: float  # frames/s over all streams (open loop)
    warmup_s: float
    duration_s: float
    drain_s: float
    honor_pushback: bool = True
    client_clock: bool = True  # stamp TelemetryFrame.client_clock_us (as tamiyo_client does)

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter() + 0.0
        self.measure_from = self.t0 + self.warmup_s
        self.end = self.measure_from + self.duration_s


async def _open(call: Any, host: Host) -> None:
    await call.write(host.open_bytes)
    first = pb.StreamTelemetryResponse.FromString(await call.read())
    if not first.HasField("session_accepted"):
        raise RuntimeError(f"session refused: {first}")


def _pushback_ms(e: grpc.aio.AioRpcError) -> float:
    """The ``grpc-retry-pushback-ms`` trailer of a refused first SessionOpen (ms; 100
    without one): the server's turns of open work were full (``open_admission``)."""
    for key, value in cast("tuple[tuple[str, str], ...]", e.trailing_metadata() or ()):
        if key == "grpc-retry-pushback-ms":
            with contextlib.suppress(ValueError):
                return max(0.0, float(value))
    return 100.0


async def _write(call: Any, raw: bytes) -> bool:
    """Write one request; False once the call has ended (the server drained or went
    away: a generator reports that as lost frames, it does not crash)."""
    try:
        await call.write(raw)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        return False
    return True


async def closed_loop(call: Any, host: Host, plan: Plan, st: Stats, k: int) -> None:
    step = 0
    sent_at: dict[str, float] = {}
    while (now := time.perf_counter()) < plan.end:
        step += 1
        tag = f"{k}.{step}"
        sent_at[tag] = now
        frame = host.frame_bytes + suffix(step, tag, now if plan.client_clock else None)
        if not await _write(call, frame):
            return  # the server ended the stream (a drain): what it left unanswered is lost
        st.sent += now >= plan.measure_from
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            got, retry_ms = st.answer(raw, sent_at, plan.measure_from)
            if got == tag:
                break
        if retry_ms and plan.honor_pushback:
            wait_s = min(retry_ms / 1000.0, max(plan.end - time.perf_counter(), 0.0))
            st.pushback_s += wait_s
            await asyncio.sleep(wait_s)


async def open_loop(call: Any, host: Host, plan: Plan, st: Stats, k: int) -> None:
    interval = plan.streams / plan.rate
    sent_at: dict[str, float] = {}  # outstanding frames: tag -> scheduled send time
    done_sending = asyncio.Event()

    async def reader() -> None:
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            st.answer(raw, sent_at, plan.measure_from)
            if done_sending.is_set() and not sent_at:
                return

    rd = asyncio.create_task(reader())
    next_at = plan.t0 + random.random() * interval
    step = 0
    while next_at < plan.end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        step += 1
        tag = f"{k}.{step}"
        sent_at[tag] = next_at
        # stamped with the scheduled time: when the simulated host asked
        stamp = next_at if plan.client_clock else None
        if not await _write(call, host.frame_bytes + suffix(step, tag, stamp)):
            sent_at.pop(tag)
            break  # the server ended the stream (a drain)
        st.sent += next_at >= plan.measure_from
        next_at += interval
    done_sending.set()
    if sent_at:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(rd), plan.drain_s)
    st.lost += sum(1 for t in sent_at.values() if t >= plan.measure_from)
    rd.cancel()
    await asyncio.gather(rd, return_exceptions=True)


async def wait_serving(channel: grpc.aio.Channel, md: Any, timeout_s: float = 300.0) -> None:
    """Wait for health SERVING: the server binds first and warms up behind NOT_SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = await stub.Check(grpc_health_pb2.HealthCheckRequest(), timeout=2.0, metadata=md)
            if reply.status == grpc_health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return  # a server without the health service (the bench's echo server)
        if time.monotonic() > deadline:
            raise TimeoutError("server never became SERVING")
        await asyncio.sleep(0.2)


async def run(
    target: str, hosts: Sequence[Host], plan: Plan, security: ClientSecurity | None = None
) -> Stats:
    st = Stats()
    security = security or ClientSecurity()
    channels = [
        security.channel(
            target, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.channel_id", c)]
        )
        for c in range((len(hosts) + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    md = security.metadata() or None
    for ch in channels:
        await ch.channel_ready()
    await wait_serving(channels[0], md)
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    give_up = time.monotonic() + OPEN_TIMEOUT_S

    async def open_one(i: int) -> Any:
        method = channels[i // STREAMS_PER_CHANNEL].stream_stream(METHOD, None, None)
        while time.monotonic() < give_up:
            async with gate:
                call = method(None, metadata=md, wait_for_ready=True)
                try:
                    await _open(call, hosts[i])
                    return call
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    st.open_refused += 1
                    back_ms = _pushback_ms(e)
            await asyncio.sleep(back_ms / 1000.0)  # (outside the gate: others open meanwhile)
        raise RuntimeError(f"session {i}: SessionOpen refused for {OPEN_TIMEOUT_S:.0f} s (busy)")

    calls = await asyncio.gather(*(open_one(i) for i in range(len(hosts))))
    # The generator's own full garbage collections (its startup heap: grpc, protobuf,
    # numpy) stalled it for tens of ms, which the latencies it measures would include.
    gc.collect()
    gc.freeze()
    plan.__post_init__()  # the clock starts once every session is open
    loop_fn = closed_loop if plan.mode == "closed" else open_loop
    await asyncio.gather(
        *(loop_fn(c, h, plan, st, k) for k, (c, h) in enumerate(zip(calls, hosts, strict=True)))
    )
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close(None)
    return st


def summarize(st: Stats, plan: Plan, hosts: Sequence[Host]) -> dict[str, Any]:
    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(np.asarray(xs), q)), 3) if xs else None

    # Only decisions made by the network count as decisions (and set the latency
    # percentiles): a degraded (rules-only) decision or a shed notice is an explicit
    # answer, counted in ``shed``, but it is not the work asked for; counting those fast
    # answers as throughput would let a server that sheds everything look saturated.
    shed = st.degraded + st.superseded + st.overloaded
    answered = st.decisions + st.superseded + st.overloaded + st.errors
    net = st.full_latencies_ms
    return {
        "streams": plan.streams,
        "mode": plan.mode,
        "offered_per_s": round(plan.rate if plan.mode == "open" else st.sent / plan.duration_s, 1),
        "sent_per_s": round(st.sent / plan.duration_s, 1),
        "decisions_per_s": round(len(net) / plan.duration_s, 1),
        "p50_ms": pct(net, 50),
        "p99_ms": pct(net, 99),
        "p999_ms": pct(net, 99.9),
        "answered_per_s": round(answered / plan.duration_s, 1),
        "all_decisions_per_s": round(st.decisions / plan.duration_s, 1),
        "all_p99_ms": pct(st.latencies_ms, 99),
        "full_decisions_per_s": round(len(net) / plan.duration_s, 1),
        "full_p99_ms": pct(net, 99),
        "shed": shed,
        "degraded": st.degraded,
        "superseded": st.superseded,
        "overloaded": st.overloaded,
        "errors": st.errors,
        "error_samples": st.error_samples,
        "lost": st.lost,
        "pushback_pct": round(100.0 * st.pushback_s / max(plan.duration_s * plan.streams, 1e-9), 1),
        "open_refused": st.open_refused,
        "duration_s": plan.duration_s,
        "mean_layers": round(sum(h.layers for h in hosts) / max(len(hosts), 1), 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tamiyo-loadgen", description=describe(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--streams", type=int, default=16, help="concurrent sessions (hosts)")
    p.add_argument(
        "--mode",
        choices=("closed", "open"),
        default="closed",
        help="closed: each stream asks again when answered; open: --rate frames/s in all",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="open loop: frames/s in total")
    p.add_argument("--duration-s", type=float, default=5.0, help="measured time (s)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured lead-in (s)")
    p.add_argument(
        "--drain-s", type=float, default=2.0, help="wait for the last answers (s); later = lost"
    )
    p.add_argument("--min-layers", type=int, default=4, help="smallest host graph (nodes)")
    p.add_argument("--max-layers", type=int, default=64, help="largest host graph (nodes)")
    p.add_argument("--seed", type=int, default=0, help="host graphs and signals")
    add_security_args(p)
    p.add_argument(
        "--signal-form",
        choices=SIGNAL_FORMS,
        default="columns",
        help="frames carry signal_columns (default, as real clients) or signals messages",
    )
    p.add_argument(
        "--ignore-pushback",
        action="store_true",
        help="closed loop: ask again at once after a refusal (a client that ignores "
        "StreamError.retry_after_ms)",
    )
    p.add_argument(
        "--no-client-clock",
        action="store_true",
        help="leave TelemetryFrame.client_clock_us unset (the server then judges each "
        "frame's budget from its arrival)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    rng = random.Random(a.seed)
    hosts = [make_host(rng, i, a.min_layers, a.max_layers, a.signal_form) for i in range(a.streams)]
    plan = Plan(
        a.mode,
        a.streams,
        a.rate,
        a.warmup_s,
        a.duration_s,
        a.drain_s,
        not a.ignore_pushback,
        not a.no_client_clock,
    )
    st = asyncio.run(run(a.target, hosts, plan, security_from_args(a)))
    json.dump(summarize(st, plan, hosts), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
