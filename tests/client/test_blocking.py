"""The blocking front end from a plain (synchronous) training loop, against a real server
running on its own thread: poll/get/iterate decisions, outcomes, restart."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from tamiyo.config import ClientConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client import blocking
from tamiyo_client.blocking import BlockingTamiyoClient, DecisionInbox
from tamiyo_client.client import ReceivedDecision
from tamiyo_client.frame_data import FrameData, resolve_form
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_server.policy_holder import ServedPolicy

from .conftest import ServerThread
from .hosts import ask, make_host, train_step


@pytest.fixture
def server(served_policy: ServedPolicy) -> Iterator[ServerThread]:
    st = ServerThread(served_policy)
    yield st
    st.close()


def test_blocking_client_in_a_training_loop_survives_restart(server: ServerThread) -> None:
    assert server.server is not None
    port = server.server.port
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = replace(
        ClientConfig(), target=f"127.0.0.1:{port}", backoff_initial_s=0.05, backoff_max_s=0.5
    )
    by_callback: list[ReceivedDecision] = []
    client = BlockingTamiyoClient(host.session_open(), cfg, on_decision=by_callback.append)
    with client:
        assert client.wait_connected(10)

        def make(k: int) -> pb.TelemetryFrame:
            train_step(model, opt)
            return host.frame(k, 0, want_decision=True)

        first = ask(client, make, 0)
        assert first.connection == 1
        client.report_outcome(host.outcome(host.apply(first.decision)))
        assert client.poll_decisions() == []  # nothing else pending; returns at once
        # written before the stop (one still queued then is dropped: its session is gone)
        assert client.wait_for(lambda: client.stats.outcomes_sent == 1, 5)

        server.stop()
        assert client.wait_for(lambda: not client.connected, 10)
        start = first.decision.frame_step + 1
        for step in range(start, start + 30):  # the loop keeps going while it is down
            train_step(model, opt)
            client.send_frame(host.frame(step, 0, want_decision=step == start + 29))
        assert client.poll_decisions() == []
        sent_before = client.stats.frames_sent
        server.start(port=port)
        assert client.wait_for(lambda: client.stats.sessions == 2, 15)
        assert client.wait_for(lambda: client.stats.frames_sent > sent_before, 5)  # flushed
        # The flushed frame asked for a decision: let it be answered before asking again,
        # or the new frame may supersede it in the server's queue (an explicit notice,
        # counted as a stream error).
        answered = lambda: client.stats.decisions >= 2 or client.stats.frames_shed > 0  # noqa: E731
        assert client.wait_for(answered, 10)
        again = ask(client, make, start + 30)
        assert again.connection == 2
        assert client.stats.outcomes_sent == 1
        assert client.stats.stream_errors == 0
    received = {d.decision.decision_id for d in by_callback}
    assert {first.decision.decision_id, again.decision.decision_id} <= received
    assert not client.client.connected


@pytest.mark.parametrize("form", ["columns", "message", "auto"])
def test_frame_data_is_sent_in_the_configured_signal_form(server: ServerThread, form: str) -> None:
    """Frames handed over as plain values are encoded on the client's thread, in either
    form, and the real server decides on them."""
    assert server.server is not None
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = replace(ClientConfig(), target=f"127.0.0.1:{server.server.port}", signal_form=form)
    with BlockingTamiyoClient(host.session_open(), cfg) as client:
        assert client.wait_connected(10)

        def make(k: int) -> FrameData:
            train_step(model, opt)
            return host.frame_data(k, 0, want_decision=True)

        for k in range(3):
            d = ask(client, make, 10 * k)
            assert d.decision.frame_step >= 10 * k
        assert client.stats.stream_errors == 0
        assert client.stats.frames_sent >= 3
        # 3 layers: "auto" sends messages (columns only pay off from many signals)
        got = resolve_form(form, cfg.columns_min_signals, len(make(100).signals))
        assert got == ("columns" if form == "columns" else "message")


@pytest.mark.parametrize("form", ["columns", "message"])
def test_unencodable_frame_data_is_dropped_with_a_reason(server: ServerThread, form: str) -> None:
    assert server.server is not None
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = replace(ClientConfig(), target=f"127.0.0.1:{server.server.port}", signal_form=form)
    with BlockingTamiyoClient(host.session_open(), cfg) as client:
        assert client.wait_connected(10)
        train_step(model, opt)
        bad = host.frame_data(0, 0, want_decision=True)
        bad.signals[0] = bad.signals[0]._replace(error_count=-1)  # not a uint32
        client.send_frame(bad)

        def make(k: int) -> FrameData:
            train_step(model, opt)
            return host.frame_data(k, 0, want_decision=True)

        d = ask(client, make, 1)  # the stream goes on
        assert d.decision.frame_step >= 1
        assert client.stats.frames_unencodable == 1
        assert "frame at step 0 not sent" in client.last_error
        assert "error_count" in client.last_error or "-1" in client.last_error


def test_unknown_signal_form_is_refused() -> None:
    _, host = make_host()
    with pytest.raises(ValueError, match="signal_form must be one of"):
        BlockingTamiyoClient(host.session_open(), replace(ClientConfig(), signal_form="xml"))


def test_an_http_target_is_a_configuration_error() -> None:
    _, host = make_host()
    for client in (BlockingTamiyoClient, ProcessTamiyoClient):  # (the sidecar looped)
        with pytest.raises(ValueError, match="give host:port"):
            client(host.session_open(), replace(ClientConfig(), target="HTTPS://h:1"))


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("", "empty"),
        ("localhost", "no port"),
        ("127.0.0.1", "no port"),
        ("grpc://127.0.0.1:50051", "unknown scheme 'grpc'"),
        ("host:http", "not a number"),
        ("::1:50051", "bracket an IPv6"),
    ],
)
def test_an_unusable_target_is_a_configuration_error_naming_the_problem(
    target: str, why: str
) -> None:
    """QA M3: "" was accepted, wedged the client thread (close() raised TimeoutError) and
    hung the next client's start(); a missing port (gRPC uses 443) or an unknown scheme
    retried forever with a misleading last_error."""
    _, host = make_host()
    for client in (BlockingTamiyoClient, ProcessTamiyoClient):
        with pytest.raises(ValueError, match=why):
            client(host.session_open(), replace(ClientConfig(), target=target))


@pytest.mark.parametrize(
    "target", ["[::1]:50051", "dns:///localhost:50051", "unix:/tmp/t.sock", "ipv4:127.0.0.1:1"]
)
def test_grpc_target_forms_are_accepted(target: str) -> None:
    _, host = make_host()
    BlockingTamiyoClient(host.session_open(), replace(ClientConfig(), target=target))


def test_close_never_raises_into_the_training_script(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """QA M3: close() raised TimeoutError (from ``fut.result``) when the client's loop
    was stuck; it runs at a job's shutdown, so it logs instead."""
    _, host = make_host()
    cfg = replace(ClientConfig(), target="127.0.0.1:1", connect_timeout_s=0.2)
    client = BlockingTamiyoClient(host.session_open(), cfg)
    client.start()

    async def stuck(*_: float) -> None:  # (flush_timeout_s, answer_timeout_s)
        await asyncio.sleep(30)

    monkeypatch.setattr(client.client, "close", stuck)
    with caplog.at_level(logging.WARNING, logger="tamiyo_client.blocking"):
        client.close(timeout_s=0.2)  # no exception
    assert "TimeoutError" in caplog.text


def test_forking_while_a_blocking_client_runs_warns() -> None:
    """gRPC cannot fork under its own threads (a fork-based DataLoader worker crashed):
    the fork handler says what to use instead. Called directly: no fork in pytest."""
    _, host = make_host()
    cfg = replace(ClientConfig(), target="127.0.0.1:1", connect_timeout_s=0.2)
    client = BlockingTamiyoClient(host.session_open(), cfg)
    client.start()
    try:
        with pytest.warns(RuntimeWarning, match="ProcessTamiyoClient"):
            blocking._warn_at_fork()
    finally:
        client.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocking._warn_at_fork()  # closed: nothing to warn about


def test_inbox_is_bounded_and_drops_oldest() -> None:
    inbox = DecisionInbox(2)
    items = [ReceivedDecision(decision=None, latency_ms=None, session_id=str(i), connection=1)  # type: ignore[arg-type]
             for i in range(3)]  # fmt: skip
    for item in items:
        inbox.put(item)
    assert inbox.dropped == 1
    assert [i.session_id for i in inbox.drain()] == ["1", "2"]
    assert inbox.get(timeout_s=0.01) is None
