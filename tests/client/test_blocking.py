"""The blocking front end from a plain (synchronous) training loop, against a real server
running on its own thread: poll/get/iterate decisions, outcomes, restart."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from tamiyo.config import ClientConfig
from tamiyo_client.blocking import BlockingTamiyoClient, DecisionInbox
from tamiyo_client.client import ReceivedDecision
from tamiyo_server.policy_holder import ServedPolicy

from .conftest import ServerThread
from .hosts import make_host, train_step


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
        train_step(model, opt)
        client.send_frame(host.frame(0, 0, want_decision=True))
        first = client.get_decision(timeout_s=5)
        assert first is not None
        assert first.decision.frame_step == 0
        client.report_outcome(host.outcome(host.apply(first.decision)))
        assert client.poll_decisions() == []  # nothing else pending; returns at once

        server.stop()
        assert client.wait_for(lambda: not client.connected, 10)
        for step in range(1, 30):  # the loop keeps going while the server is down
            train_step(model, opt)
            client.send_frame(host.frame(step, 0, want_decision=step == 29))
        assert client.poll_decisions() == []
        server.start(port=port)
        assert client.wait_for(lambda: client.stats.sessions == 2, 15)
        got = list(client.decisions(timeout_s=2))  # iterate until 2 s pass without one
        assert [g.decision.frame_step for g in got][-1:] == [29]
        assert got[-1].connection == 2
        assert client.stats.outcomes_sent == 1
        assert client.stats.stream_errors == 0
    assert [d.decision.decision_id for d in by_callback] == [
        d.decision.decision_id for d in [first, *got]
    ]
    assert not client.client.connected


def test_inbox_is_bounded_and_drops_oldest() -> None:
    inbox = DecisionInbox(2)
    items = [ReceivedDecision(decision=None, latency_ms=None, session_id=str(i), connection=1)  # type: ignore[arg-type]
             for i in range(3)]  # fmt: skip
    for item in items:
        inbox.put(item)
    assert inbox.dropped == 1
    assert [i.session_id for i in inbox.drain()] == ["1", "2"]
    assert inbox.get(timeout_s=0.01) is None
