"""Hot reload against a real server on port 0 with real checkpoint files in tmp dirs.

Each bad checkpoint is refused with a reason that names the problem, the old version keeps
answering, health stays SERVING, and the refusal is not retried while the files stay the
same. A good checkpoint is picked up within two polls and decisions change version.
Polls are counted by the watcher, so no test asserts a wall-clock time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tamiyo.config import ServerConfig
from tamiyo.policy.builtin import DEFAULT_CHECKPOINT_DIR
from tamiyo.policy.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    history,
    load_checkpoint,
    resolve_latest,
    save_checkpoint,
    set_latest,
)
from tamiyo.policy.engine import PolicyOutput, configure_threads
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.synthetic import random_snapshot
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import polite_load, reload
from tamiyo_server.app import TamiyoServer
from tamiyo_server.cli import parse_config
from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline
from tamiyo_server.policy_holder import PolicyHolder, serve_loaded
from tests.server import hosts
from tests.server.conftest import make_config

POLL_S = 0.1  # poll interval of the servers under test
Stream = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


def model(seed: int) -> TamiyoPolicy:
    """A distinct, deterministic policy per seed (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TamiyoPolicy(PolicyConfig())


def write(root: Path, version: str, seed: int, latest: bool = True) -> Path:
    return save_checkpoint(root, model(seed), version=version, update_latest=latest)


def decide_request(step: int = 5) -> pb.DecideRequest:
    state = graph_pb2.ModelGraphState(
        topology=hosts.topology(6), signals=hosts.signals(6, step), kernels=hosts.KERNELS, step=step
    )
    return pb.DecideRequest(state=state, request_id=f"s{step}")


class Client:
    """Decide, GetPolicyInfo and health over one channel to a running server."""

    def __init__(self, server: TamiyoServer, ch: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = pb_grpc.TamiyoServiceStub(ch)
        self.health = health_pb2_grpc.HealthStub(ch)

    @property
    def watcher(self) -> reload.CheckpointWatcher:
        assert self.server.watcher is not None
        return self.server.watcher

    @property
    def holder(self) -> PolicyHolder:
        assert self.server.pipeline is not None
        return self.server.pipeline.holder

    async def version(self) -> str:
        resp = await self.stub.Decide(decide_request(), timeout=10)
        return resp.decision.policy_version

    async def info(self) -> pb.GetPolicyInfoResponse:
        return await self.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=10)

    async def serving(self) -> bool:
        r = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    async def swapped(self) -> str:
        """The served version once the watcher has swapped a new policy in."""
        await until(lambda: self.watcher.swapped_at_poll > 0)
        return await self.version()

    async def polls(self, n: int) -> None:
        """Wait until the watcher has polled ``n`` more times."""
        target = self.watcher.polls + n
        await until(lambda: self.watcher.polls >= target)


async def until(pred: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for ``pred``; the timeout only guards against a hang, it is not a figure."""
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[ClientFactory]:
    opened: list[tuple[TamiyoServer, grpc.aio.Channel]] = []

    async def make(config: ServerConfig) -> Client:
        srv = TamiyoServer(config)
        await srv.start()
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        opened.append((srv, ch))
        return Client(srv, ch)

    yield make
    for srv, ch in opened:
        await ch.close(None)
        await srv.stop()


def watching(root: Path, **over: object) -> ServerConfig:
    return make_config(checkpoint_dir=str(root), poll_interval_s=POLL_S, **over)


# ------------------------------------------------------------------ good reloads
async def test_good_checkpoint_is_picked_up_within_two_polls(
    tmp_path: Path, connect: ClientFactory
) -> None:
    write(tmp_path, "v1", seed=1)
    c = await connect(watching(tmp_path))
    assert await c.version() == "v1"
    info = await c.info()
    assert (info.version, info.pinned, info.reloads_ok) == ("v1", False, 0)

    seen: list[str] = []
    streamed: list[str] = []
    health: list[bool] = []
    stop = asyncio.Event()
    call: Stream = c.stub.StreamTelemetry(None)
    await call.write(hosts.session_open(6))
    first = await call.read()
    assert isinstance(first, pb.StreamTelemetryResponse)
    assert first.WhichOneof("message") == "session_accepted"

    async def traffic() -> None:  # unary + stream decisions and health through the reload
        step = 0
        while not stop.is_set():
            seen.append(await c.version())
            step += 1
            await call.write(hosts.frame(6, step, tag=f"f{step}"))
            msg = await asyncio.wait_for(call.read(), 10)
            assert isinstance(msg, pb.StreamTelemetryResponse)
            assert msg.decision.frame_request_id == f"f{step}", msg  # none lost or skipped
            streamed.append(msg.decision.policy_version)
            health.append(await c.serving())

    task = asyncio.create_task(traffic())
    await until(lambda: len(seen) >= 3)
    write(tmp_path, "v2", seed=2, latest=False)
    polls_before = c.watcher.polls  # counted from the pointer move, not the slow fsyncs
    set_latest(tmp_path, "v2")
    await until(lambda: c.holder.reloads_ok == 1)
    assert c.watcher.swapped_at_poll - polls_before <= 2
    n = len(seen)
    await until(lambda: len(seen) >= n + 3)
    stop.set()
    await task

    assert all(health), "health left SERVING during the reload"
    switch = seen.index("v2")
    assert set(seen[:switch]) == {"v1"}, seen
    assert set(seen[switch:]) == {"v2"}, seen
    switch = streamed.index("v2")
    assert set(streamed[:switch]) == {"v1"}, streamed
    assert set(streamed[switch:]) == {"v2"}, streamed
    await call.done_writing()
    info = await c.info()
    assert info.version == "v2"
    assert info.checkpoint_path == str(tmp_path / "v2")
    assert (info.reloads_ok, info.reloads_failed) == (1, 0)
    assert info.loaded_at.seconds > 0
    assert info.weights_sha256 == load_checkpoint(tmp_path / "v2").manifest["weights_sha256"]
    metrics = c.server.metrics.registry.get_sample_value
    assert metrics("tamiyo_policy_reloads_total", {"result": "ok"}) == 1.0
    assert metrics("tamiyo_policy_version_info", {"version": "v2"}) == 1.0


async def test_old_policy_is_released_after_the_swap(
    tmp_path: Path, connect: ClientFactory
) -> None:
    write(tmp_path, "v1", seed=1)
    c = await connect(watching(tmp_path))
    assert c.server.pipeline is not None
    old = c.server.pipeline.holder.current
    ref = weakref.ref(old.engine.model)
    del old
    await c.version()
    write(tmp_path, "v2", seed=2)
    await until(lambda: c.watcher.swapped_at_poll > 0)
    for _ in range(3):
        assert await c.version() == "v2"
    await c.polls(1)  # the watcher drops its last reference at the next poll
    gc.collect()
    assert ref() is None, "the replaced policy is still referenced"


def test_replaced_policy_is_freed_by_refcount_alone(tmp_path: Path) -> None:
    """No reference cycle keeps a replaced policy: it is freed when the watcher drops it
    at the poll after the swap (on the watcher's thread, not in a decision), without
    waiting for (or paying) a full garbage collection on the serving process."""
    write(tmp_path, "v1", seed=1)
    write(tmp_path, "v2", seed=2, latest=False)
    holder = PolicyHolder(reload.load_served(tmp_path / "v1", "cpu", 1e9))
    watcher = reload.CheckpointWatcher(tmp_path, holder)
    served_ref = weakref.ref(holder.current)
    model_ref = weakref.ref(holder.current.engine.model)
    gc.disable()
    try:
        set_latest(tmp_path, "v2")
        assert watcher.poll_once() == "loaded"
        assert served_ref() is not None, "kept until the next poll"
        assert watcher.poll_once() == "unchanged"
        assert served_ref() is None
        assert model_ref() is None
    finally:
        gc.enable()


def test_reload_shortens_gil_turns_only_while_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reload runs Python (model build, checks) a thread that wants the GIL
    waits at most the switch interval: it is lowered for the load and restored after,
    also when the checkpoint is refused. The steps' times are recorded."""
    write(tmp_path, "v1", seed=1)
    seen: list[float] = []
    check = polite_load.check_serving

    def spying(*args: object, **kw: object) -> float:
        seen.append(sys.getswitchinterval())
        return check(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(polite_load, "check_serving", spying)
    before = sys.getswitchinterval()
    stages: dict[str, float] = {}
    reload.load_served(tmp_path / "v1", "cpu", 1e9, stages=stages)
    assert polite_load.SWITCH_INTERVAL_S is not None
    assert seen == [min(before, polite_load.SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == before
    assert set(stages) == {"load", "engine", "warmup", "waited", "cpu"}
    assert all(v > 0 for v in stages.values())
    _nan_weights(tmp_path)
    with pytest.raises(CheckpointError, match="non-finite"):
        reload.load_served(tmp_path / "bad", "cpu", 1e9)
    assert sys.getswitchinterval() == before
    # overlapping loads (two watchers in one process): the last one out restores
    with polite_load.short_gil_turns():
        with polite_load.short_gil_turns():
            pass
        assert sys.getswitchinterval() == polite_load.SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before


def test_swap_lands_between_batches_never_inside_one(tmp_path: Path) -> None:
    """A swap arriving while a batch runs: the whole batch answers with the old policy,
    the next batch with the new one."""
    old = serve_loaded(load_checkpoint(write(tmp_path, "v1", seed=1)), "cpu", warmup=False)
    new = serve_loaded(load_checkpoint(write(tmp_path, "v2", seed=2)), "cpu", warmup=False)
    holder = PolicyHolder(old)
    pipeline = DecisionPipeline(make_config(), holder, ServerMetrics())
    infer = old.engine.infer

    def swapping_infer(graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        holder.swap(new)  # as the watcher thread would, mid-batch
        return infer(graphs)

    old.engine.infer = swapping_infer  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    snaps = [random_snapshot(rng, n) for n in (4, 8, 16)]
    first = pipeline._run_batch(snaps)
    assert {e.policy.version for e in first} == {"v1"}
    second = pipeline._run_batch(snaps)
    assert {e.policy.version for e in second} == {"v2"}


# ------------------------------------------------------------------ bad checkpoints
def _truncated(root: Path) -> None:
    w = write(root, "bad", seed=3, latest=False) / WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _bad_hash(root: Path) -> None:
    w = write(root, "bad", seed=3, latest=False) / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes; same size
    w.write_bytes(bytes(data))


def _wrong_schema(root: Path) -> None:
    m = write(root, "bad", seed=3, latest=False) / MANIFEST
    manifest = json.loads(m.read_text())
    manifest["feature_schema"]["names"] = list(reversed(manifest["feature_schema"]["names"]))
    m.write_text(json.dumps(manifest))


def _nan_weights(root: Path) -> None:
    net = model(3)
    with torch.no_grad():
        next(iter(net.parameters())).view(-1)[0] = float("nan")
    save_checkpoint(root, net, version="bad", update_latest=False)


def _missing_manifest(root: Path) -> None:
    (write(root, "bad", seed=3, latest=False) / MANIFEST).unlink()


def _overflowing(root: Path) -> None:
    """Finite weights whose forward overflows: only the warm-up forward can catch it."""
    net = model(3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1e12)
    save_checkpoint(root, net, version="bad", update_latest=False)


BAD = {
    "truncated": (_truncated, "truncated"),
    "bad_hash": (_bad_hash, "sha256"),
    "wrong_feature_schema": (_wrong_schema, "feature_schema"),
    "nan_weights": (_nan_weights, "non-finite values"),
    "missing_manifest": (_missing_manifest, "manifest missing"),
    "overflowing_forward": (_overflowing, "non-finite outputs"),
}


@pytest.mark.parametrize("kind", list(BAD))
async def test_bad_checkpoint_is_refused_once_and_old_version_keeps_answering(
    tmp_path: Path, connect: ClientFactory, kind: str
) -> None:
    make_bad, reason = BAD[kind]
    write(tmp_path, "v1", seed=1)
    c = await connect(watching(tmp_path))
    make_bad(tmp_path)
    set_latest(tmp_path, "bad")
    await until(lambda: c.holder.reloads_failed == 1)
    assert c.watcher.attempts == 1
    info = await c.info()
    assert info.version == "v1"
    assert (info.reloads_ok, info.reloads_failed) == (0, 1)
    assert info.last_refused_path == str(tmp_path / "bad")
    assert reason in info.last_refused_reason, info.last_refused_reason
    # the path is in last_refused_path, not repeated in the reason (QA16 N5)
    assert str(tmp_path / "bad") not in info.last_refused_reason, info.last_refused_reason
    assert not info.last_refused_reason.startswith("checkpoint "), info.last_refused_reason
    assert info.last_refused_at.seconds > 0
    assert await c.version() == "v1"
    assert await c.serving()
    # Not retried while the files stay the same.
    await c.polls(4)
    assert c.watcher.attempts == 1
    assert (await c.info()).reloads_failed == 1
    metrics = c.server.metrics.registry.get_sample_value
    assert metrics("tamiyo_policy_reloads_total", {"result": "failed"}) == 1.0
    # A good version after it is still picked up.
    write(tmp_path, "v2", seed=2)
    assert await c.swapped() == "v2"


async def test_broken_latest_at_startup_serves_the_newest_good_version(
    tmp_path: Path, connect: ClientFactory
) -> None:
    """A replica restarting while ``latest`` is broken must still come up (else every
    replica on the shared volume crash-loops): it refuses latest and serves v2."""
    write(tmp_path, "v1", seed=1)
    write(tmp_path, "v2", seed=2)
    _bad_hash(tmp_path)
    set_latest(tmp_path, "bad")
    c = await connect(watching(tmp_path))
    assert await c.serving()
    assert await c.version() == "v2"
    info = await c.info()
    assert (info.reloads_ok, info.reloads_failed) == (0, 1)
    assert info.last_refused_path == str(tmp_path / "bad")
    assert "sha256" in info.last_refused_reason
    assert str(tmp_path / "bad") not in info.last_refused_reason  # (QA16 N5)
    await c.polls(3)
    assert c.watcher.attempts == 0  # the startup refusal is remembered
    write(tmp_path, "v3", seed=3)
    assert await c.swapped() == "v3"


async def test_broken_latest_at_startup_after_a_rollback_serves_the_rolled_back_to(
    tmp_path: Path, connect: ClientFactory
) -> None:
    """v2 was rolled back to v1 (every replica serves v1), then a broken version was
    published: the running replicas refuse it and keep v1, so a restarting one must
    serve v1 too, not v2 (the newest that verifies), or the fleet serves two policies."""
    write(tmp_path, "v1", seed=1)
    write(tmp_path, "v2", seed=2)
    set_latest(tmp_path, "v1")  # the rollback (what `reload rollback` does)
    _bad_hash(tmp_path)
    set_latest(tmp_path, "bad")
    assert history(tmp_path)[:3] == ["bad", "v1", "v2"]
    c = await connect(watching(tmp_path))
    assert await c.serving()
    assert await c.version() == "v1"
    assert (await c.info()).last_refused_path == str(tmp_path / "bad")


async def test_nothing_good_at_startup_falls_back_to_the_bundled_policy(
    tmp_path: Path, connect: ClientFactory
) -> None:
    _truncated(tmp_path)
    set_latest(tmp_path, "bad")
    c = await connect(watching(tmp_path))
    info = await c.info()
    bundled = str(DEFAULT_CHECKPOINT_DIR)  # exists once `make train` shipped a default
    assert info.checkpoint_path == "builtin" or info.checkpoint_path.startswith(bundled)
    assert "truncated" in info.last_refused_reason
    assert await c.serving()


DIRECTORY_STATES = {  # how the directory is, and what the warning must say of it
    "empty": "holds no checkpoint yet (no 'latest', no version directory)",
    "missing": "does not exist (yet; it is watched)",
    # (the QA pass read "is empty" for this one: the pointer's problem must be named)
    "dangling-latest": "holds no version: 'latest' names 'v1', which is not a version "
    "directory there",
}


@pytest.mark.parametrize("state", list(DIRECTORY_STATES))
async def test_a_directory_without_checkpoints_serves_the_bundled_default_until_one_appears(
    tmp_path: Path, connect: ClientFactory, caplog: pytest.LogCaptureFixture, state: str
) -> None:
    """The trainer has not written one yet (in Kubernetes the directory may not even
    exist yet): the bundled default, not the untrained built-in policy, and a warning
    naming the directory and saying precisely what is wrong with it."""
    root = tmp_path / "checkpoints"
    if state != "missing":
        root.mkdir()
    if state == "dangling-latest":
        (root / "latest").write_text("v1\n")
    with caplog.at_level(logging.WARNING, logger="tamiyo_server.reload"):
        c = await connect(watching(root))
    info = await c.info()
    bundled = resolve_latest(DEFAULT_CHECKPOINT_DIR)
    if bundled is not None:  # the repository ships one (`make train`)
        assert info.checkpoint_path == str(bundled)
        algo = json.loads((bundled / "manifest.json").read_text())["metrics"]["algo"]
        assert json.loads(info.training_json)["algorithm"] == algo != ""
    if state == "dangling-latest":  # the watcher reports the pointer, once
        assert "names 'v1', which is not a checkpoint directory" in info.last_refused_reason
    else:
        assert not info.HasField("last_refused_at")  # nothing refused: no 1970 timestamp
    said = [r.getMessage() for r in caplog.records if str(root) in r.getMessage()]
    assert said
    assert f"--checkpoint-dir {root} {DIRECTORY_STATES[state]}: serving" in said[0]
    write(root, "v1", seed=1)
    assert await c.swapped() == "v1"


async def test_a_missing_latest_serves_the_newest_version_that_verifies(
    tmp_path: Path, connect: ClientFactory
) -> None:
    """Versions but no ``latest`` (deleted, or naming no version): as when ``latest`` is
    refused, the newest good version, not the bundled default (review finding)."""
    write(tmp_path, "v1", seed=1, latest=False)
    write(tmp_path, "v2", seed=2, latest=False)
    _truncated(tmp_path)  # "bad", the newest, broken
    c = await connect(watching(tmp_path))
    assert await c.version() == "v2"
    assert not (await c.info()).HasField("last_refused_at")


async def test_latest_naming_no_directory_is_refused_once(
    tmp_path: Path, connect: ClientFactory
) -> None:
    write(tmp_path, "v1", seed=1)
    c = await connect(watching(tmp_path))
    (tmp_path / "latest").write_text("gone\n")
    await until(lambda: c.holder.reloads_failed == 1)
    await c.polls(3)
    info = await c.info()
    assert (info.version, info.reloads_failed) == ("v1", 1)
    assert "'gone'" in info.last_refused_reason
    assert await c.version() == "v1"


async def test_checkpoint_written_slowly_in_pieces(tmp_path: Path, connect: ClientFactory) -> None:
    """A non-atomic writer: the pointer moves first, the weights arrive in pieces. Every
    partial state is refused (the old version answers); once the bytes are complete and
    match the manifest the changed files are tried again and served."""
    root = tmp_path / "root"
    write(root, "v1", seed=1)
    scratch = write(tmp_path / "scratch", "v2", seed=2, latest=False)
    blob, manifest = (scratch / WEIGHTS).read_bytes(), (scratch / MANIFEST).read_bytes()
    c = await connect(watching(root))
    target = root / "v2"
    target.mkdir()
    (target / MANIFEST).write_bytes(manifest)
    set_latest(root, "v2")
    pieces = 4
    finished = threading.Event()

    def writer() -> None:
        """Each partial state stays until a whole poll has seen it (the watcher thread
        is niced and may be slow on a busy box; counting polls keeps this exact)."""
        step = len(blob) // pieces + 1
        with open(target / WEIGHTS, "wb") as f:
            for i in range(pieces):
                f.write(blob[i * step : (i + 1) * step])
                f.flush()
                if i == pieces - 1:
                    break
                seen_from = c.watcher.polls + 2
                end = time.monotonic() + 30
                while c.watcher.polls < seen_from and time.monotonic() < end:
                    time.sleep(0.01)
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    during: list[str] = []
    while not finished.is_set():
        during.append(await c.version())
    await asyncio.to_thread(thread.join)
    assert set(during) == {"v1"}
    assert during
    refused = (await c.info()).reloads_failed
    # Each of the pieces - 1 partial states was polled, so refused; the state before the
    # first piece (weights missing) may have been polled too.
    assert refused >= pieces - 1
    polls = c.watcher.polls
    await until(lambda: c.watcher.swapped_at_poll > 0)
    assert c.watcher.swapped_at_poll - polls <= 2
    assert await c.version() == "v2"
    info = await c.info()
    assert "v2" in info.last_refused_path
    assert "truncated" in info.last_refused_reason or "JSON" in info.last_refused_reason


# ------------------------------------------------------------------ unit checks
def test_warm_up_over_budget_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "v1", seed=1)
    assert reload.load_served(path, "cpu", budget_ms=1e9).version == "v1"
    with pytest.raises(CheckpointError, match="over the 1e-06 ms decision budget"):
        reload.load_served(path, "cpu", budget_ms=1e-6)


def test_over_budget_but_as_fast_as_the_serving_policy_is_accepted(tmp_path: Path) -> None:
    """A busy machine makes every policy slow: the budget refuses a new policy only when
    it is also markedly slower than the one already serving."""
    configure_threads(1)  # as the server does; 2 threads on 2 busy cores time spinning
    small = write(tmp_path, "small", seed=1)
    current = reload.load_served(small, "cpu", budget_ms=1e9)
    same = write(tmp_path, "same", seed=2)
    assert reload.load_served(same, "cpu", 1e-6, current).version == "same"
    with torch.random.fork_rng():
        torch.manual_seed(3)
        big = TamiyoPolicy(replace(PolicyConfig(), hidden=1024, head_hidden=1024))
    save_checkpoint(tmp_path, big, version="big", update_latest=False)
    with pytest.raises(CheckpointError, match=r"x the serving policy\), over the"):
        reload.load_served(tmp_path / "big", "cpu", 1e-6, current)


def test_watcher_rejects_a_bad_interval(tmp_path: Path) -> None:
    holder = PolicyHolder(serve_loaded(load_checkpoint(write(tmp_path, "v1", 1)), "cpu"))
    with pytest.raises(ValueError, match="poll_interval_s"):
        reload.CheckpointWatcher(tmp_path, holder, poll_interval_s=0)


# ------------------------------------------------------------------ pin and rollback
async def test_pinned_server_ignores_latest(tmp_path: Path, connect: ClientFactory) -> None:
    write(tmp_path, "v1", seed=1)
    write(tmp_path, "v2", seed=2)
    c = await connect(watching(tmp_path, pin_checkpoint="v1"))
    assert c.server.watcher is None
    info = await c.info()
    assert (info.version, info.pinned) == ("v1", True)
    write(tmp_path, "v3", seed=3)
    await asyncio.sleep(5 * POLL_S)
    assert await c.version() == "v1"


async def test_pin_to_a_bad_checkpoint_stops_startup(tmp_path: Path) -> None:
    _bad_hash(tmp_path)
    server = TamiyoServer(watching(tmp_path, pin_checkpoint=str(tmp_path / "bad")))
    with pytest.raises(CheckpointError, match="sha256"):
        await server.start()
    missing = TamiyoServer(watching(tmp_path, pin_checkpoint="nope"))
    with pytest.raises(CheckpointError, match="'nope' is neither"):
        await missing.start()
    await server.server.stop(None)
    await missing.server.stop(None)


def test_rollback_cli_skips_broken_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in (1, 2):
        write(tmp_path, f"v{i}", seed=i)
    _truncated(tmp_path)  # "bad", created after v2
    write(tmp_path, "v3", seed=3)
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path), "--dry-run"]) == 0
    assert "would move" in capsys.readouterr().out
    assert resolve_latest(tmp_path) == tmp_path / "v3"
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "v3 -> v2" in out[-1]  # "bad" is newer than v2 but broken: the operator hears so
    assert out[0].startswith("skipped bad: BROKEN: ")
    assert "truncated" in out[0]
    assert resolve_latest(tmp_path) == tmp_path / "v2"
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path)]) == 0
    assert resolve_latest(tmp_path) == tmp_path / "v1"
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path)]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path), "--to", "bad"]) == 1
    assert "truncated" in capsys.readouterr().err
    # a version that is not there at all is a typo, not a broken checkpoint
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path), "--to", "v9"]) == 1
    err = capsys.readouterr().err
    assert f"rollback failed: no version 'v9' in {tmp_path} (newest: v3, bad, v2;" in err
    assert "manifest" not in err
    assert resolve_latest(tmp_path) == tmp_path / "v1"
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path), "--to", "v3"]) == 0
    assert reload.main(["list", "--checkpoint-dir", str(tmp_path)]) == 0
    for cmd in ("list", "rollback"):  # a mistyped directory is an error, not "no versions"
        assert reload.main([cmd, "--checkpoint-dir", str(tmp_path / "typo")]) == 1
    listing = capsys.readouterr().out.splitlines()[-4:]
    assert [line[2:].split()[0] for line in listing] == ["v1", "v2", "bad", "v3"]
    assert next(line for line in listing if line.startswith("*")).split()[1] == "v3"
    # each version verified as a rollback would: the broken one says why
    assert [line[2:].split()[2] for line in listing] == ["ok", "ok", "BROKEN:", "ok"]
    assert "truncated" in listing[2]


async def test_rollback_reaches_a_running_server(tmp_path: Path, connect: ClientFactory) -> None:
    write(tmp_path, "v1", seed=1)
    write(tmp_path, "v2", seed=2)
    c = await connect(watching(tmp_path))
    assert await c.version() == "v2"
    assert reload.main(["rollback", "--checkpoint-dir", str(tmp_path)]) == 0
    assert await c.swapped() == "v1"
    assert (await c.info()).checkpoint_path == str(tmp_path / "v1")


def test_cli_flags_for_polling_and_pinning() -> None:
    assert parse_config([]).poll_interval_s == 1.0
    assert parse_config([]).pin_checkpoint == ""
    c = parse_config(
        ["--checkpoint-dir", "d", "--poll-interval-s", "0.25", "--pin-checkpoint", "v3"]
    )
    assert (c.checkpoint_dir, c.poll_interval_s, c.pin_checkpoint) == ("d", 0.25, "v3")
    with pytest.raises(SystemExit):  # (tests/server/test_cli.py checks the message)
        parse_config(["--poll-interval-s", "0"])
