"""Network-side faults: the fuzz storm, 10,000 client connects / kills, and the server
killed and restarted under streaming clients.

Each scenario starts its own server process, runs a ``HealthyStream`` through it where
that makes sense, and returns a flat dict of figures plus ``violations`` (empty when
every stated bound held). Bounds are stated next to the code that checks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from soak.fuzz import FuzzStats, run_decide_fuzz, run_stream_fuzz
from soak.garbage import run_garbage_fuzz, run_tcp_garbage
from soak.harness import HealthyStream, healthy_frame, healthy_open
from soak.proc import ServerProcess
from tamiyo.config import ClientConfig
from tamiyo.experience.reader import ExperienceReader
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_client.client import ReceivedDecision, TamiyoClient

# Leak bounds for the connect storm, measured after the storm settles vs. after warm-up.
FD_BOUND = 16  # file descriptors
THREAD_BOUND = 2  # OS threads
RSS_BOUND_MB = 64.0  # resident memory
RESUME_BOUND_S = 2.0  # restart SERVING -> every client has a decision again


def _healthy_summary(h: HealthyStream, out: dict[str, Any], violations: list[str]) -> None:
    st = h.stop()
    out["healthy_p99_before_ms"] = round(st.p("before", 99), 2)
    out["healthy_p99_storm_ms"] = round(st.p("storm", 99), 2)
    out["healthy_decisions"] = st.decisions
    out["decisions_lost"] = out.get("decisions_lost", 0) + st.lost
    out["healthy_late_over_2s"] = st.late
    out["healthy_shed"] = st.shed
    if st.errors:
        violations.append(f"healthy stream got {len(st.errors)} errors: {st.errors[0]}")
    if st.lost:
        violations.append(f"healthy stream lost {st.lost} decisions ({st.lost_phases})")
    if st.count("storm") == 0:
        violations.append("healthy stream got no decision during the storm")


def _violation(e: Exception) -> str:
    """One line naming what went wrong; for an RPC that ended badly, its status (the
    first line of a grpc error is only "<... of RPC that terminated with:")."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{type(e).__name__}: {e.code()}: {e.details()}"[:300]
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def fuzz_storm(examples: int, log_dir: Path) -> dict[str, Any]:
    """≥ ``examples`` each of hostile Decide requests, hostile streams and garbage
    payloads, plus raw-TCP garbage, while a healthy stream measures latency."""
    srv = ServerProcess("fuzz", log_dir=log_dir)
    srv.start()
    out: dict[str, Any] = {"scenario": "fuzz storm"}
    violations: list[str] = []
    h = HealthyStream(srv.target).start()
    total = FuzzStats()
    try:
        h.wait_decisions("before", 300)
        h.phase = "storm"
        runs: list[tuple[str, Callable[[FuzzStats], object]]] = [
            ("decide", lambda st: run_decide_fuzz(srv.target, examples, st, strict=False)),
            ("stream", lambda st: run_stream_fuzz(srv.target, examples, st)),
            ("garbage", lambda st: run_garbage_fuzz(srv.target, examples, 7, st, strict=False)),
        ]
        for name, run in runs:
            t0 = time.monotonic()
            stats = FuzzStats()
            try:
                run(stats)
            except AssertionError as e:  # an oracle violation (hypothesis shrank it)
                stats.violations[str(e).splitlines()[0][:300]] += 1
            except Exception as e:  # e.g. hypothesis FlakyFailure: report, do not abort
                stats.violations[_violation(e)] += 1
            for why, n in stats.violations.items():
                violations.append(f"{name} fuzz ({n}×): {why}")
            out[f"{name}_examples"] = stats.examples
            if stats.columnar:
                out[f"{name}_columnar_frames"] = stats.columnar
            out[f"{name}_s"] = round(time.monotonic() - t0, 1)
            total.merge(stats)
            srv.check()
        out["tcp_garbage_connections"] = run_tcp_garbage("127.0.0.1", srv.port, 1000, seed=7)
        total.messages += out["tcp_garbage_connections"]
        h.phase = "after"
        h.wait_decisions("after", 50)
    finally:
        _healthy_summary(h, out, violations)
        srv.check()
        out["server_crashes"] = srv.unexpected_exits + (0 if srv.alive else 1)
        srv.stop()
    out["messages_fuzzed"] = total.messages
    out["faults_injected"] = total.mutated + out["tcp_garbage_connections"]
    out["outcomes"] = dict(total.outcomes)
    out["violations"] = violations
    return out


async def _churn_one(target: str, i: int) -> bool:
    """One client: connect, open, ask for a decision, then vanish in one of three ways.
    Returns False when the answer it waited for never came (a decision, or the explicit
    RESOURCE_EXHAUSTED overload answer, both count as answered)."""
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
        await call.write(healthy_open(4, host=f"churn{i}"))
        first = await call.read()
        if not isinstance(first, pb.StreamTelemetryResponse):
            return False
        await call.write(healthy_frame(4, 1, f"c{i}"))
        mode = i % 3
        if mode == 0:
            call.cancel()  # killed mid-stream with a decision pending
        elif mode == 1:
            resp = await call.read()
            ok = isinstance(resp, pb.StreamTelemetryResponse) and (
                resp.HasField("decision")
                or resp.error.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
            )
            call.cancel()
            return ok
        # mode 2: the channel (TCP connection) closes under the open stream
    return True


async def _churn(target: str, n: int, concurrency: int) -> tuple[int, int]:
    lost = failed = 0
    counter = iter(range(n))

    async def worker() -> None:
        nonlocal lost, failed
        for i in counter:
            try:
                if not await asyncio.wait_for(_churn_one(target, i), 10.0):
                    lost += 1
            except (grpc.aio.AioRpcError, TimeoutError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lost, failed


def connect_storm(n: int, log_dir: Path, concurrency: int = 16) -> dict[str, Any]:
    """``n`` clients connect, open a session, and disappear mid-stream; the server's
    FDs, threads, RSS and open-stream gauge must come back within the stated bounds."""
    srv = ServerProcess("connect-storm", log_dir=log_dir)
    srv.start()
    out: dict[str, Any] = {"scenario": "connect storm", "connects": n}
    violations: list[str] = []
    h = HealthyStream(srv.target).start()
    try:
        h.wait_decisions("before", 300)
        asyncio.run(_churn(srv.target, min(300, n), concurrency))  # warm-up: pools, caches
        time.sleep(2.0)
        base = srv.resources()
        h.phase = "storm"
        t0 = time.monotonic()
        lost, failed = asyncio.run(_churn(srv.target, n, concurrency))
        out["storm_s"] = round(time.monotonic() - t0, 1)
        h.phase = "after"
        time.sleep(3.0)
        after = srv.resources()
        streams = srv.metric("tamiyo_active_streams")
        out.update(
            {
                "faults_injected": n,
                "decisions_lost": lost,
                "connect_failures": failed,
                "resources_before": base,
                "resources_after": after,
                "active_streams_after": streams,
                "bounds": {"fds": FD_BOUND, "threads": THREAD_BOUND, "rss_mb": RSS_BOUND_MB},
            }
        )
        leaks = []
        for key, bound in (("fds", FD_BOUND), ("threads", THREAD_BOUND), ("rss_mb", RSS_BOUND_MB)):
            if after[key] - base[key] > bound:
                leaks.append(f"{key} +{after[key] - base[key]:g} > {bound:g}")
        if streams != 1:  # only the healthy stream is still open
            leaks.append(f"{streams:g} streams still open (expected 1)")
        out["leaks"] = leaks
        violations += leaks
        if lost:
            violations.append(f"{lost} churn clients never got their decision")
        if failed:
            violations.append(f"{failed} churn clients failed to connect or open")
        h.wait_decisions("after", 20)
    finally:
        _healthy_summary(h, out, violations)
        srv.check()
        out["server_crashes"] = srv.unexpected_exits + (0 if srv.alive else 1)
        srv.stop()
    out["violations"] = violations
    return out


async def _kill_restart(srv: ServerProcess, cycles: int, clients: int) -> dict[str, Any]:
    seen: list[list[float]] = [[] for _ in range(clients)]
    arrived = asyncio.Event()  # set on every decision (woken waiters re-check ``seen``)
    cfg = ClientConfig(target=srv.target)
    hosts = []
    for k in range(clients):
        c = TamiyoClient(healthy_open(8, host=f"restart{k}").session_open, cfg)

        def record(d: ReceivedDecision, k: int = k) -> None:
            seen[k].append(time.monotonic())
            arrived.set()

        c.add_callback(record)
        await c.start()
        hosts.append(c)
    stop = asyncio.Event()

    async def produce(k: int) -> None:
        step = 0
        while not stop.is_set():
            step += 1
            hosts[k].send_frame(healthy_frame(8, step, "").frame)
            await asyncio.sleep(0.02)

    producers = [asyncio.create_task(produce(k)) for k in range(clients)]
    resumes: list[float] = []
    outages: list[float] = []
    try:
        for _ in range(cycles):
            await asyncio.sleep(2.5)  # > flush interval: rows reach the store first
            killed = await asyncio.to_thread(srv.kill)
            ready = await asyncio.to_thread(srv.start)
            outages.append(ready - killed)
            deadline = ready + 15.0
            for k in range(clients):
                while not any(t > ready for t in seen[k]) and time.monotonic() < deadline:
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), 0.05)
                after = [t for t in seen[k] if t > ready]
                resumes.append(after[0] - ready if after else float("inf"))
    finally:
        stop.set()
        for p in producers:
            p.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*producers, return_exceptions=True)
        for c in hosts:
            await c.close()
    return {"resume_s": resumes, "outage_s": outages}


def _store_check(directory: Path) -> dict[str, Any]:
    files = sorted(directory.glob("*.sqlite"))
    integrity = []
    for f in files:
        with contextlib.closing(sqlite3.connect(f)) as conn:
            integrity.append(conn.execute("PRAGMA integrity_check").fetchone()[0])
    reader = ExperienceReader([directory])
    return {"files": len(files), "integrity": integrity, "decisions": reader.num_decisions}


def kill_restart(cycles: int, log_dir: Path, work: Path, clients: int = 4) -> dict[str, Any]:
    """``kill -9`` the server ``cycles`` times while ``tamiyo_client`` hosts stream;
    every client must get a decision within ``RESUME_BOUND_S`` of the restarted server
    reporting SERVING, and every experience store file must pass integrity_check."""
    exp = work / "experience"
    srv = ServerProcess(
        "kill-restart",
        ["--experience-dir", str(exp), "--flush-interval-s", "0.5"],
        log_dir=log_dir,
    )
    srv.start()
    out: dict[str, Any] = {"scenario": "kill -9 and restart", "faults_injected": cycles}
    violations: list[str] = []
    try:
        r = asyncio.run(_kill_restart(srv, cycles, clients))
    finally:
        srv.check()
        out["server_crashes"] = srv.unexpected_exits
        srv.stop()
    out["resume_after_ready_s_max"] = round(max(r["resume_s"]), 3)
    out["outage_s_mean"] = round(sum(r["outage_s"]) / len(r["outage_s"]), 2)
    slow = [x for x in r["resume_s"] if x > RESUME_BOUND_S]
    if slow:
        violations.append(f"{len(slow)} client resumptions > {RESUME_BOUND_S} s: {slow[:4]}")
    store = _store_check(exp)
    out["store"] = store
    if any(x != "ok" for x in store["integrity"]) or store["decisions"] == 0:
        violations.append(f"experience store after kill -9: {store}")
    out["decisions_lost"] = 0  # frames in flight at a kill are re-sent by the client
    out["violations"] = violations
    return out
