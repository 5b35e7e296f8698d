"""The asyncio client against the real server: decisions, outcomes, errors, restarts,
token and TLS. Everything runs over real sockets on port 0."""

from __future__ import annotations

import asyncio
import time
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


async def test_decisions_by_iterator_and_callback_and_outcomes(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    by_callback: list[ReceivedDecision] = []
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        client.add_callback(by_callback.append)
        stream = client.decisions()
        assert await client.wait_connected(5)
        assert client.session_id
        sent, got = [], []
        for step in range(5):
            train_step(model, opt)
            frame = host.frame(step, 0, want_decision=True)
            client.send_frame(frame)
            sent.append(frame.request_id)
            got.append(await asyncio.wait_for(anext(stream), 5))
        assert [g.decision.frame_request_id for g in got] == sent  # ids assigned, echoed
        assert [g.decision.frame_step for g in got] == list(range(5))
        assert all(g.latency_ms is not None and g.latency_ms > 0 for g in got)
        assert all(g.connection == 1 and g.session_id == client.session_id for g in got)
        assert [g.decision.decision_id for g in by_callback] == [
            g.decision.decision_id for g in got
        ]
        for g in got:
            client.report_outcome(host.outcome(host.apply(g.decision), reward=0.0))
        await until(lambda: client.stats.outcomes_sent == 5)
        # a frame round trip after the outcomes proves they were read without error
        client.send_frame(host.frame(5, 0, want_decision=True))
        await asyncio.wait_for(anext(stream), 5)
        assert client.stats.stream_errors == 0, list(client.stream_errors)
        assert client.stats.latency_percentile(50) is not None
    with pytest.raises(StopAsyncIteration):  # closing the client ends the iterator
        await asyncio.wait_for(anext(stream), 1)


async def test_reconnects_and_resumes_after_server_restart(make_server: ServerFactory) -> None:
    srv = await make_server()
    port = srv.port
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = config(port, frame_buffer=4)
    async with TamiyoClient(host.session_open(), cfg) as client:
        stream = client.decisions()
        assert await client.wait_connected(5)
        first_session = client.session_id
        train_step(model, opt)
        client.send_frame(host.frame(0, 0, want_decision=True))
        d1 = await asyncio.wait_for(anext(stream), 5)
        assert d1.connection == 1

        await srv.stop()  # the server goes away (it sends SessionClosing first)
        await until(lambda: not client.connected)
        for step in range(1, 41):  # training goes on while it is down
            train_step(model, opt)
            client.send_frame(host.frame(step, 0, want_decision=step % 10 == 0))
        assert client.pending() <= cfg.frame_buffer  # bounded: coalesced, not queued
        assert client.frames_coalesced >= 40 - cfg.frame_buffer
        # reconnect attempts fail while it is down (after the server's 1 s closing hint)
        await until(lambda: client.stats.connect_failures >= 2)

        srv2 = await make_server(port=port)  # back on the same address
        await until(lambda: client.stats.sessions == 2)
        assert client.session_id != first_session  # SessionOpen was sent again
        assert len(srv2.servicer.streams) == 1 if srv2.servicer else False
        # The buffered frames were delivered after SessionOpen: the newest step that
        # asked is answered (an older pending one may be superseded or answered first).
        resumed = await asyncio.wait_for(anext(stream), 5)
        while resumed.decision.frame_step != 40:
            assert resumed.decision.frame_step < 40
            resumed = await asyncio.wait_for(anext(stream), 5)
        assert resumed.connection == 2
        train_step(model, opt)
        client.send_frame(host.frame(41, 0, want_decision=True))
        nxt = await asyncio.wait_for(anext(stream), 5)
        assert (nxt.decision.frame_step, nxt.connection) == (41, 2)
        assert client.stats.stream_errors == 0, list(client.stream_errors)


async def test_bad_frame_gets_in_stream_error_and_stream_goes_on(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    errors: list[pb.StreamError] = []
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        client.add_error_callback(errors.append)
        stream = client.decisions()
        assert await client.wait_connected(5)
        bad = pb.TelemetryFrame(
            step=0,
            want_decision=True,
            signals=[health_pb2.HealthSignal(layer_id="no-such-layer", step=0, total_seeds=0)],
        )
        client.send_frame(bad)
        await until(lambda: bool(errors))
        assert "no-such-layer" in errors[0].message
        assert errors[0].frame_request_id == bad.request_id
        train_step(model, opt)
        client.send_frame(host.frame(1, 0, want_decision=True))
        ok = await asyncio.wait_for(anext(stream), 5)
        assert ok.decision.frame_step == 1
        assert client.stats.sessions == 1  # same stream throughout


async def test_update_session_resends_topology(make_server: ServerFactory) -> None:
    srv = await make_server()
    _, host = make_host()  # layers "0", "2", "4"
    _, other = make_host(width=16, depth=4)  # layers "0", "2", "4", "6"
    opt = torch.optim.SGD(other.model.parameters(), lr=0.01)
    errors: list[pb.StreamError] = []
    async with TamiyoClient(host.session_open(), config(srv.port)) as client:
        client.add_error_callback(errors.append)
        stream = client.decisions()
        assert await client.wait_connected(5)
        train_step(other.model, opt)
        client.send_frame(other.frame(0, 0, want_decision=True))
        await until(lambda: bool(errors))  # layer "6" is unknown to the first topology
        assert '"6"' in errors[0].message or "6" in errors[0].field + errors[0].message
        client.update_session(other.session_open())
        await until(lambda: client.stats.sessions == 2)
        train_step(other.model, opt)
        client.send_frame(other.frame(1, 0, want_decision=True))
        d = await asyncio.wait_for(anext(stream), 5)
        assert d.decision.frame_step == 1
        assert len(errors) == 1  # the new topology knows layer "6"


async def test_wrong_token_stops_client_without_hurting_training(
    make_server: ServerFactory,
) -> None:
    srv = await make_server(auth_token="s3cret-token")
    model, host = make_host()
    bad = TamiyoClient(host.session_open(), config(srv.port), ClientSecurity(token="wrong-token"))
    async with bad:
        stream = bad.decisions()
        with pytest.raises(ClientError, match="UNAUTHENTICATED"):
            await asyncio.wait_for(anext(stream), 5)
        assert bad.stopped
        bad.send_frame(host.frame(0, 0, want_decision=True))  # still never raises
    good = TamiyoClient(host.session_open(), config(srv.port), ClientSecurity(token="s3cret-token"))
    async with good:
        stream = good.decisions()
        assert await good.wait_connected(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        train_step(model, opt)
        good.send_frame(host.frame(0, 0, want_decision=True))
        assert (await asyncio.wait_for(anext(stream), 5)).decision.decision_id


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
        stream = client.decisions()
        assert await client.wait_connected(5)
        train_step(model, opt)
        client.send_frame(host.frame(0, 0, want_decision=True))
        assert (await asyncio.wait_for(anext(stream), 5)).decision.decision_id
    # TLS without a client certificate: the server refuses the handshake; the client
    # keeps retrying (a network-level failure), reports why, and never connects.
    no_cert = ClientSecurity.from_files(ca=pki.ca)
    async with TamiyoClient(host.session_open(), config(srv.port), no_cert) as client:
        await until(lambda: client.stats.connect_failures >= 1, 5)
        assert not client.connected
        assert client.last_error


def test_security_settings_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        ClientSecurity(tls=True, certificate_chain=b"x")
    with pytest.raises(ValueError, match="tls=False"):
        ClientSecurity(root_certificates=b"x")
    with pytest.raises(ValueError, match="line breaks"):
        ClientSecurity(token="a\nb")
    assert ClientSecurity(token="t").metadata() == (("authorization", "Bearer t"),)
    assert ClientSecurity.from_files(ca=pki.ca).tls


async def test_server_decision_changes_model_and_next_frames_report_it(
    make_server: ServerFactory,
) -> None:
    """End to end with the real server: a model whose `hidden` block is dead, a 1 ms
    budget so the server's rules-only fallback answers (deterministic: the lowest-health
    layer under the health threshold gets a kernel), the decision applied to the real
    model, and the following frames carry the new seed state."""
    from tamiyo.config import DemoConfig
    from tamiyo.v1 import decision_pb2
    from tamiyo_client.demo_task import TeacherTask, attach, make_student
    from tamiyo_client.host import extend_optimizer
    from tamiyo_client.kasmina import TRAINING

    srv = await make_server()
    cfg = DemoConfig()
    task = TeacherTask(cfg)
    host = attach(make_student(cfg), cfg)
    model = host.model
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
        stream = client.decisions()
        assert await client.wait_connected(5)
        step()
        first = host.frame(0, 0, want_decision=True)
        health = {s.layer_id: s.health_score for s in first.signals}
        assert health["hidden"] < 0.1  # the dead block is reported as such
        client.send_frame(first)
        d = (await asyncio.wait_for(anext(stream), 5)).decision
        assert d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL, d
        assert health[d.target_layer_id] == min(health.values())
        n_params = sum(p.numel() for p in model.parameters())
        result = host.apply(d)
        assert result.applied, result.detail
        extend_optimizer(opt, result.new_parameters)
        assert sum(p.numel() for p in model.parameters()) > n_params
        client.report_outcome(host.outcome(result))
        step()
        after = host.frame(1, 0, want_decision=True)
        nxt = {s.layer_id: s for s in after.signals}[d.target_layer_id]
        assert nxt.active_seeds == 1
        assert nxt.adaptation_count == 1
        assert nxt.seed_states[d.seed_index] == TRAINING
        client.send_frame(after)
        answer = await asyncio.wait_for(anext(stream), 5)  # the server took the new state
        assert answer.decision.frame_step == 1
        assert client.stats.stream_errors == 0, list(client.stream_errors)
