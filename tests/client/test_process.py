"""The sidecar front end (``ProcessTamiyoClient``) from a plain training loop, against a
real server: decisions and outcomes, a server restart, a killed sidecar, bad values."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from tamiyo.config import ClientConfig
from tamiyo_client.frame_data import FrameData
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_client.security import ClientSecurity
from tamiyo_server.policy_holder import ServedPolicy

from .conftest import Pki, ServerThread
from .hosts import ask, make_host, train_step


@pytest.fixture
def server(served_policy: ServedPolicy) -> Iterator[ServerThread]:
    st = ServerThread(served_policy)
    yield st
    st.close()


def config(server: ServerThread) -> ClientConfig:
    assert server.server is not None
    return replace(
        ClientConfig(),
        target=f"127.0.0.1:{server.server.port}",
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )


def test_sidecar_client_decides_survives_restart_and_a_killed_sidecar(
    server: ServerThread,
) -> None:
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def make(k: int) -> FrameData:
        train_step(model, opt)
        return host.frame_data(k, 0, want_decision=True)

    with ProcessTamiyoClient(host.session_open(), config(server)) as client:
        assert client.wait_connected(20), client.last_error
        pid = client.sidecar_pid
        assert pid is not None
        assert pid != os.getpid()
        first = ask(client, make, 0)
        assert first.latency_ms is not None
        assert first.decision.frame_request_id.startswith("p")
        client.report_outcome(host.outcome(host.apply(first.decision)))
        assert client.wait_for(lambda: client.stats.outcomes_sent == 1, 5)
        assert client.poll_decisions() == []  # returns at once

        # The server goes away and comes back: the sidecar reconnects on its own.
        server.stop()
        assert client.wait_for(lambda: not client.connected, 10)
        t0 = time.perf_counter()
        for k in range(1, 31):  # the loop keeps going while it is down
            client.send_frame(make(k))
        assert time.perf_counter() - t0 < 10  # never waited for the server
        assert client.poll_decisions() == []
        server.start(port=int(client.config.target.rsplit(":", 1)[1]))
        assert client.wait_for(lambda: client.stats.sessions == 2, 20), client.last_error
        assert ask(client, make, 31).connection == 2

        # The sidecar itself dies: the next calls notice, a new one takes over.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        k = 100
        while client.restarts == 0 and time.monotonic() < deadline:
            client.send_frame(make(k))
            client.poll_decisions()
            k += 1
            time.sleep(0.05)
        assert client.restarts == 1
        assert client.sidecar_pid != pid
        assert client.wait_connected(20), client.last_error
        assert ask(client, make, k).decision.frame_step >= k
        assert client.stats.sessions >= 3  # counted across sidecars
        assert client.stats.stream_errors == 0
    assert not client.connected


def test_values_protobuf_cannot_hold_are_reported_by_the_sidecar(server: ServerThread) -> None:
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ProcessTamiyoClient(host.session_open(), config(server)) as client:
        assert client.wait_connected(20), client.last_error
        train_step(model, opt)
        bad = host.frame_data(0, 0, want_decision=True)
        bad.signals[0] = bad.signals[0]._replace(error_count=-1)  # not a uint32
        client.send_frame(bad)  # never raises into the training loop

        def make(k: int) -> FrameData:
            train_step(model, opt)
            return host.frame_data(k, 0, want_decision=True)

        assert ask(client, make, 1).decision.frame_step >= 1  # the stream goes on
        assert client.wait_for(lambda: client.stats.frames_unencodable == 1, 5)
        assert "frame at step 0 not sent" in client.last_error


def test_unknown_signal_form_is_refused_before_a_process_starts() -> None:
    _, host = make_host()
    with pytest.raises(ValueError, match="signal_form must be one of"):
        ProcessTamiyoClient(host.session_open(), replace(ClientConfig(), signal_form="xml"))


@pytest.mark.parametrize("user_setting", [None, "INFO"])
def test_grpc_core_log_lines_stay_out_of_the_training_jobs_stderr(
    server: ServerThread,
    pki: Pki,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    user_setting: str | None,
) -> None:
    """QA 16 N6: a TLS client against a plaintext server made gRPC C-core print
    ``I... Handshake failed ...`` on the job's stderr at every attempt (last_error says
    it already). The sidecar logs errors only, unless the user set GRPC_VERBOSITY."""
    if user_setting is None:
        monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    else:
        monkeypatch.setenv("GRPC_VERBOSITY", user_setting)
    _, host = make_host()
    cfg = replace(config(server), connect_timeout_s=0.5)
    client = ProcessTamiyoClient(host.session_open(), cfg, ClientSecurity.from_files(ca=pki.ca))
    client.start()
    try:
        assert client.wait_for(lambda: "TLS" in client.last_error, 10), client.last_error
    finally:
        client.close()
    err = capfd.readouterr().err
    assert ("Handshake failed" in err) == (user_setting == "INFO"), err[-2000:]
