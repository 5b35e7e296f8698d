"""The asyncio client against the real server: decisions, outcomes, errors, restarts,
token and TLS. Everything runs over real sockets on port 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from tamiyo.config import ClientConfig
from tamiyo.v1 import health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.client import ClientError, ReceivedDecision, TamiyoClient
from tamiyo_client.security import ClientSecurity

from .conftest import Pki, ServerFactory
from .hosts import make_host, train_step


def config(port: int, **over: object) -> ClientConfig:
    return replace(
        ClientConfig(),
        target=f"127.0.0.1:{port}",
        connect_timeout_s=2.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        **over,  # type: ignore[arg-type]
    )


async def until(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


SHED = pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED


class Asker:
    """Ask for a decision and wait for the answer to *that* frame. Under load the real
    server may shed a frame instead (an explicit RESOURCE_EXHAUSTED notice naming its
    request id); then the next step asks again. Other errors are kept in ``errors``."""

    def __init__(self, client: TamiyoClient) -> None:
        self.client = client
        self.stream = client.decisions()
        self.shed: set[str] = set()
        self.errors: list[pb.StreamError] = []
        client.add_error_callback(self._on_error)

    def _on_error(self, err: pb.StreamError) -> None:
        if err.code == SHED:
            self.shed.add(err.frame_request_id)
        else:
            self.errors.append(err)

    async def answer(
        self, frame: pb.TelemetryFrame, timeout_s: float = 10.0
    ) -> ReceivedDecision | pb.StreamError | None:
        """The decision for ``frame`` (already sent), the error refusing it, or None if
        it was shed."""
        deadline = time.monotonic() + timeout_s
        while frame.request_id not in self.shed:
            assert time.monotonic() < deadline, f"no answer to {frame.request_id}"
            refused = [e for e in self.errors if e.frame_request_id == frame.request_id]
            if refused:
                return refused[0]
            try:
                got = await asyncio.wait_for(anext(self.stream), 0.05)
            except TimeoutError:
                continue
            if got.decision.frame_request_id == frame.request_id:
                return got
        return None

    async def ask(
        self, make: Callable[[int], pb.TelemetryFrame], step: int, tries: int = 20
    ) -> ReceivedDecision:
        """Send ``make(step)`` (a frame asking for a decision) until one is answered."""
        got = await self.ask_any(make, step, tries)
        assert isinstance(got, ReceivedDecision), got
        return got

    async def ask_any(
        self, make: Callable[[int], pb.TelemetryFrame], step: int, tries: int = 20
    ) -> ReceivedDecision | pb.StreamError:
        """Like ``ask`` but a refusal (StreamError other than shed) is an answer too."""
        for n in range(tries):
            frame = make(step + n)
            self.client.send_frame(frame)
            if (got := await self.answer(frame)) is not None:
                return got
            await asyncio.sleep(1.3)  # the shed's pushback: frames before it ends do not ask
        raise AssertionError(f"all {tries} frames were shed")


async def test_decisions_by_iterator_and_callback_and_outcomes(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    by_callback: list[ReceivedDecision] = []
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        client.add_callback(by_callback.append)
        asker = Asker(client)
        assert await client.wait_connected(5)
        assert client.session_id
        got: list[ReceivedDecision] = []
        step = 0
        for _ in range(5):
            train_step(model, opt)
            d = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), step)
            step = d.decision.frame_step + 1
            got.append(d)
        assert all(g.decision.frame_request_id for g in got)  # ids assigned, echoed
        assert all(g.latency_ms is not None and g.latency_ms > 0 for g in got)
        assert all(g.connection == 1 and g.session_id == client.session_id for g in got)
        answered = {g.decision.decision_id for g in got}
        assert answered <= {g.decision.decision_id for g in by_callback}  # same, by callback
        for g in got:
            client.report_outcome(host.outcome(host.apply(g.decision), reward=0.0))
        await until(lambda: client.stats.outcomes_sent == 5)
        # a frame round trip after the outcomes proves they were read without error
        await asker.ask(lambda k: host.frame(k, 0, want_decision=True), step)
        assert asker.errors == []
        assert client.stats.stream_errors == 0, list(client.stream_errors)
        assert client.stats.latency_percentile(50) is not None
        # every frame carried the client's clock (TelemetryFrame.client_clock_us)
        stamped = srv.metrics.registry.get_sample_value("tamiyo_transit_wait_seconds_count")
        assert stamped is not None
        assert stamped >= 6
        stream = asker.stream
    with pytest.raises(StopAsyncIteration):  # closing the client ends the iterator
        await asyncio.wait_for(anext(stream), 1)


async def test_reconnects_and_resumes_after_server_restart(make_server: ServerFactory) -> None:
    srv = await make_server()
    port = srv.port
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = config(port, frame_buffer=4)
    async with TamiyoClient(host.session_open(), cfg) as client:
        asker = Asker(client)
        assert await client.wait_connected(5)
        first_session = client.session_id
        train_step(model, opt)
        d1 = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), 0)
        assert d1.connection == 1
        start = d1.decision.frame_step + 1

        await srv.stop()  # the server goes away (it sends SessionClosing first)
        await until(lambda: not client.connected)
        last = None
        for step in range(start, start + 40):  # training goes on while it is down
            train_step(model, opt)
            last = host.frame(step, 0, want_decision=step % 10 == 0)
            client.send_frame(last)
        assert last is not None
        assert client.pending() <= cfg.frame_buffer  # bounded: coalesced, not queued
        assert client.frames_coalesced >= 40 - cfg.frame_buffer
        # reconnect attempts fail while it is down (after the server's 1 s closing hint)
        await until(lambda: client.stats.connect_failures >= 2)

        srv2 = await make_server(port=port)  # back on the same address
        await until(lambda: client.stats.sessions == 2)
        assert client.session_id != first_session  # SessionOpen was sent again
        assert len(srv2.servicer.streams) == 1 if srv2.servicer else False
        # The frames buffered while it was down go out after SessionOpen.
        await until(lambda: client.stats.frames_sent >= 2)
        train_step(model, opt)
        nxt = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), start + 40)
        assert nxt.connection == 2
        assert nxt.decision.frame_step >= start + 40
        assert asker.errors == []
        assert client.stats.stream_errors == 0, list(client.stream_errors)


async def test_server_shutdown_answers_every_frame_the_client_sent(
    make_server: ServerFactory,
) -> None:
    """On SessionClosing the client half-closes, so the server knows every frame has
    arrived: each frame it wrote is answered (a decision, a shed notice or UNAVAILABLE)
    and the stream ends cleanly, not cut at the end of the server's grace."""
    srv = await make_server(grace_s=30.0)
    _, host = make_host()
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        assert await client.wait_connected(5)
        stopping: asyncio.Task[None] | None = None
        for step in range(400):
            client.send_frame(host.frame(step, 0, want_decision=True))
            await asyncio.sleep(0.002)
            if step == 100:
                stopping = asyncio.create_task(srv.stop())
        assert stopping is not None
        await asyncio.wait_for(stopping, 10.0)  # well within the 30 s grace: not cut
        await until(lambda: not client.connected)
        s = client.stats
        assert s.frames_sent > 100
        assert s.frames_sent == s.decisions + s.stream_errors + s.frames_shed
        assert client.last_error == "stream ended by the server"


async def test_bad_frame_gets_in_stream_error_and_stream_goes_on(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        asker = Asker(client)
        assert await client.wait_connected(5)

        def bad(step: int) -> pb.TelemetryFrame:
            sig = health_pb2.HealthSignal(layer_id="no-such-layer", step=step, total_seeds=0)
            return pb.TelemetryFrame(step=step, want_decision=True, signals=[sig])

        err = await asker.ask_any(bad, 0)
        assert isinstance(err, pb.StreamError), err
        assert "no-such-layer" in err.message
        assert "no-such-layer" in client.last_error  # refusals are not silent there
        train_step(model, opt)
        ok = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), err.frame_step + 1)
        assert ok.decision.frame_step > err.frame_step
        assert client.stats.sessions == 1  # same stream throughout


async def test_update_session_resends_topology(make_server: ServerFactory) -> None:
    srv = await make_server()
    _, host = make_host()  # layers "0", "2", "4"
    _, other = make_host(width=16, depth=4)  # layers "0", "2", "4", "6"
    opt = torch.optim.SGD(other.model.parameters(), lr=0.01)
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        asker = Asker(client)
        assert await client.wait_connected(5)

        def trained_frame(k: int) -> pb.TelemetryFrame:
            # train first: a frame whose layers did not run carries no signals (and a
            # shed frame's retry must still name layer "6")
            train_step(other.model, opt)
            return other.frame(k, 0, want_decision=True)

        err = await asker.ask_any(trained_frame, 0)
        assert isinstance(err, pb.StreamError), err  # layer "6" is unknown to the first topology
        assert "6" in err.field + err.message
        client.update_session(other.session_open())
        await until(lambda: client.stats.sessions == 2)
        d = await asker.ask(trained_frame, err.frame_step + 1)
        assert d.decision.frame_step > err.frame_step
        assert len(asker.errors) == 1  # the new topology knows layer "6"


async def test_wrong_token_stops_client_without_hurting_training(
    make_server: ServerFactory,
) -> None:
    srv = await make_server(auth_token="s3cret-token")
    model, host = make_host()
    bad = TamiyoClient(host.session_open(), config(srv.port), ClientSecurity(token="wrong-token"))
    async with bad:
        stream = bad.decisions()
        # QA 16 L1: wait_connected said so only at its timeout (make demo: 60 s); the
        # client knew at once that it would never connect
        t0 = time.monotonic()
        assert not await bad.wait_connected(30.0)
        assert time.monotonic() - t0 < 30.0 / 4
        assert "UNAUTHENTICATED" in bad.fatal_error
        with pytest.raises(ClientError, match="UNAUTHENTICATED"):
            await asyncio.wait_for(anext(stream), 5)
        assert bad.stopped
        bad.send_frame(host.frame(0, 0, want_decision=True))  # still never raises
    good = TamiyoClient(host.session_open(), config(srv.port), ClientSecurity(token="s3cret-token"))
    async with good:
        asker = Asker(good)
        assert await good.wait_connected(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        train_step(model, opt)
        d = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), 0)
        assert d.decision.decision_id


async def test_tls_and_mtls(make_server: ServerFactory, pki: Pki) -> None:
    srv = await make_server(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mtls = ClientSecurity.from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    async with TamiyoClient(host.session_open(), config(srv.port), mtls) as client:
        asker = Asker(client)
        assert await client.wait_connected(5)
        train_step(model, opt)
        d = await asker.ask(lambda k: host.frame(k, 0, want_decision=True), 0)
        assert d.decision.decision_id
    # TLS without a client certificate: the server refuses the handshake; the client
    # keeps retrying (a network-level failure), reports why, and never connects.
    no_cert = ClientSecurity.from_files(ca=pki.ca)
    async with TamiyoClient(host.session_open(), config(srv.port), no_cert) as client:
        await until(lambda: client.stats.connect_failures >= 1, 5)
        assert not client.connected
        assert "TRANSIENT_FAILURE" in client.last_error, client.last_error
        assert "TLS" in client.last_error  # names the likely cause (was "TimeoutError: ")


async def test_the_load_generator_reaches_an_mtls_server_with_a_token(
    make_server: ServerFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator load-tests a replica as it is deployed (mTLS and a token), with the
    same flags as ``tamiyo-demo``; before, loadgen had a token and no TLS."""
    import random

    from tamiyo_client import loadgen
    from tamiyo_client.security import security_from_args

    srv = await make_server(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
        auth_token="load-test-token",
    )
    monkeypatch.setenv("TAMIYO_TOKEN", "load-test-token")
    flags = ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    a = loadgen.build_parser().parse_args([f"--target=localhost:{srv.port}", *flags])
    hosts = [loadgen.make_host(random.Random(0), i, 4, 8, "columns") for i in range(2)]
    plan = loadgen.Plan("closed", 2, 0.0, 0.2, 0.5, 1.0)
    st = await loadgen.run(a.target, hosts, plan, security_from_args(a))
    summary = loadgen.summarize(st, plan, hosts)
    assert summary["decisions_per_s"] > 0, summary
    assert summary["errors"] == 0, summary
    assert summary["lost"] == 0, summary


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--cert", "c.pem"], "--cert and --key go together"),
        (["--ca", "/nonexistent/ca.pem"], "--ca /nonexistent/ca.pem: no such file"),
    ],
)
def test_the_tools_name_a_bad_security_flag(flags: list[str], says: str) -> None:
    """tamiyo-loadgen / tamiyo-demo stop with one line naming the flag, not a traceback
    or a dataclass field name."""
    from tamiyo_client import loadgen
    from tamiyo_client.security import security_from_args

    a = loadgen.build_parser().parse_args(flags)
    with pytest.raises(SystemExit, match=says):
        security_from_args(a)


def test_security_settings_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        ClientSecurity(tls=True, certificate_chain=b"x")
    with pytest.raises(ValueError, match="tls=False"):
        ClientSecurity(root_certificates=b"x")
    with pytest.raises(ValueError, match="line breaks"):
        ClientSecurity(token="a\nb")
    for bad in ("s3cret\t", "tök3n"):  # QA L2: gRPC refused these forever, as retryable
        with pytest.raises(ValueError, match="header value cannot carry"):
            ClientSecurity(token=bad)
    assert ClientSecurity(token="t").metadata() == (("authorization", "Bearer t"),)
    assert ClientSecurity.from_files(ca=pki.ca).tls
    shown = repr(
        ClientSecurity(tls=True, certificate_chain=b"CERT", private_key=b"KEY", token="s3")
    )
    assert "KEY" not in shown
    assert "s3" not in shown
    assert "CERT" not in shown


async def test_server_decision_changes_model_and_next_frames_report_it(
    make_server: ServerFactory,
) -> None:
    """End to end with the real server: a model whose `hidden` block is dead, a 1 ms
    budget so the server's rules-only fallback answers (deterministic: the lowest-health
    layer under the health threshold gets a kernel), the decision applied to the real
    model, and the following frames carry the new seed state."""
    from tamiyo.config import DemoConfig
    from tamiyo.v1 import decision_pb2
    from tamiyo_client.demo_task import TeacherTask, attach, damage, make_student
    from tamiyo_client.host import extend_optimizer
    from tamiyo_client.kasmina import TRAINING

    srv = await make_server()
    cfg = DemoConfig()
    task = TeacherTask(cfg)
    host = attach(make_student(cfg), cfg)
    model = host.model
    damage(model, cfg)  # the demo's fault, here from the first step
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = torch.Generator().manual_seed(0)

    def step() -> None:
        x, y = task.batch(data, 64)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    async with TamiyoClient(
        host.session_open(), config(srv.port, decision_deadline_ms=1)
    ) as client:
        asker = Asker(client)
        assert await client.wait_connected(5)
        frames: dict[int, pb.TelemetryFrame] = {}

        def make(k: int) -> pb.TelemetryFrame:
            step()
            frames[k] = host.frame(k, 0, want_decision=True)
            return frames[k]

        got = await asker.ask(make, 0)
        d = got.decision
        health = {s.layer_id: s.health_score for s in frames[d.frame_step].signals}
        assert health["hidden"] < 0.1  # the dead block is reported as such
        assert d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL, d
        assert health[d.target_layer_id] == min(health.values())
        n_params = sum(p.numel() for p in model.parameters())
        result = host.apply(d)
        assert result.applied, result.detail
        extend_optimizer(opt, result.new_parameters)
        assert sum(p.numel() for p in model.parameters()) > n_params
        client.report_outcome(host.outcome(result))
        answer = await asker.ask(make, d.frame_step + 1)  # the server takes the new state
        nxt = {s.layer_id: s for s in frames[answer.decision.frame_step].signals}
        assert nxt[d.target_layer_id].active_seeds == 1
        assert nxt[d.target_layer_id].adaptation_count == 1
        assert nxt[d.target_layer_id].seed_states[d.seed_index] == TRAINING
        assert asker.errors == []
        assert client.stats.stream_errors == 0, list(client.stream_errors)
