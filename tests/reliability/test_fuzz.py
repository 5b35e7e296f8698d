"""Hostile input against a real server, while a healthy host keeps streaming.

Each test starts a ``HealthyStream`` (a well-formed host asking for a decision every
5 ms) before the storm and checks afterwards that it never got an error, never lost a
decision, kept getting decisions *during* the storm, and that the server still answers
health SERVING. The fuzzers and their oracles live in ``soak.fuzz`` / ``soak.garbage``
so ``make soak`` runs the same code at ≥ 10,000 examples; here the count comes from
``TAMIYO_FUZZ_EXAMPLES`` (default 40, to keep ``make test`` fast).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from soak.fuzz import check_field_message, run_decide_fuzz, run_stream_fuzz
from soak.garbage import huge_decide_request, run_garbage_fuzz, run_tcp_garbage
from soak.harness import (
    HealthyStream,
    ServerThread,
    StreamCall,
    health_status,
    healthy_open,
    healthy_topology,
    loopback_config,
)
from tamiyo.policy.builtin import builtin_policy
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.policy_holder import serve_loaded

EXAMPLES = int(os.environ.get("TAMIYO_FUZZ_EXAMPLES", "40"))
SERVING = 1


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(loopback_config(), policy=serve_loaded(builtin_policy(), "cpu")) as srv:
        yield srv


@contextmanager
def healthy_alongside(server: ServerThread) -> Iterator[HealthyStream]:
    """Healthy stream before and during the block; checked when it ends."""
    h = HealthyStream(server.target).start()
    h.wait_decisions("before", 20)
    h.phase = "storm"
    yield h
    during = h.stats.count("storm")
    h.wait_decisions("storm", during + 5)  # still answering after the storm
    stats = h.stop()
    assert stats.errors == []
    assert stats.lost == 0
    assert stats.reconnects == 0
    assert stats.count("storm") >= 5
    assert server.alive
    assert health_status(server.target) == SERVING


def test_decide_fuzz(server: ServerThread) -> None:
    with healthy_alongside(server):
        stats = run_decide_fuzz(server.target, EXAMPLES)
    assert stats.examples >= EXAMPLES
    # Both paths were exercised: valid requests served, hostile ones refused.
    assert stats.outcomes["decide:OK"] > 0
    assert stats.outcomes["decide:INVALID_ARGUMENT"] > 0


def test_stream_fuzz(server: ServerThread) -> None:
    with healthy_alongside(server):
        stats = run_stream_fuzz(server.target, EXAMPLES)
    assert stats.examples >= EXAMPLES
    assert stats.outcomes["stream:accepted"] > 0
    assert stats.outcomes["stream:STREAM_ERROR_CODE_INVALID_ARGUMENT"] > 0


def test_garbage_bytes_on_the_wire(server: ServerThread) -> None:
    with healthy_alongside(server):
        stats = run_garbage_fuzz(server.target, EXAMPLES, seed=1)
        run_tcp_garbage("127.0.0.1", server.port, EXAMPLES, seed=1)
    assert stats.examples == EXAMPLES


def _raw_decide(server: ServerThread, payload: bytes) -> grpc.RpcError:
    ident = lambda b: b  # noqa: E731
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        decide = channel.unary_unary(
            "/tamiyo.v1.TamiyoService/Decide", request_serializer=ident, response_deserializer=ident
        )
        with pytest.raises(grpc.RpcError) as err:
            decide(payload, timeout=30)
    return err.value


def test_million_node_graph_is_refused_by_size(server: ServerThread) -> None:
    with healthy_alongside(server):
        err = _raw_decide(server, huge_decide_request(10**6))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.details() or "")


def test_graph_over_the_node_limit_names_the_field(server: ServerThread) -> None:
    limit = loopback_config().limits.max_nodes_per_graph
    err = _raw_decide(server, huge_decide_request(limit + 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith("state.topology.layers:")
    assert f"{limit + 1} layers > limit {limit}" in details


def test_oversized_stream_message_ends_only_that_stream(server: ServerThread) -> None:
    with (
        healthy_alongside(server),
        grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel,
    ):
        call = StreamCall(pb_grpc.TamiyoServiceStub(channel))
        huge = pb.StreamTelemetryRequest(
            session_open=pb.SessionOpen(
                host_id="big", model_id="x" * (5 << 20), topology=graph_pb2.Topology()
            )
        )
        call.send(huge)
        with pytest.raises(grpc.RpcError) as err:
            call.recv(30.0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_frame_before_session_open_is_refused_and_stream_goes_on(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = StreamCall(pb_grpc.TamiyoServiceStub(channel))
        call.send(pb.StreamTelemetryRequest(frame=pb.TelemetryFrame(step=1, want_decision=True)))
        resp = call.recv(10.0)
        assert resp is not None
        assert resp.error.code == pb.STREAM_ERROR_CODE_FAILED_PRECONDITION
        check_field_message(resp.error.field, resp.error.message)
        call.send(healthy_open())
        resp = call.recv(10.0)
        assert resp is not None
        assert resp.HasField("session_accepted")
        call.close()
        assert call.status is None


def test_uint64_extremes_are_refused_naming_the_field(server: ServerThread) -> None:
    """Counts near 2**64 fit the proto but not int64 arrays downstream: they must be
    refused by validation, not crash the handler (found by the Decide fuzzer)."""
    state = graph_pb2.ModelGraphState(topology=healthy_topology(3))
    state.topology.layers[1].parameter_count = 2**64 - 1
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TamiyoServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(pb.DecideRequest(state=state), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("state.topology.layers[1].parameter_count")
        call = StreamCall(stub)
        call.send(
            pb.StreamTelemetryRequest(
                session_open=pb.SessionOpen(host_id="h", topology=state.topology)
            )
        )
        resp = call.recv(10.0)
        assert resp is not None, "the stream ended without a word"
        assert resp.error.code == pb.STREAM_ERROR_CODE_INVALID_ARGUMENT
        assert resp.error.field == "session_open.topology.layers[1].parameter_count"
        call.send(healthy_open())
        resp = call.recv(10.0)
        assert resp is not None
        assert resp.HasField("session_accepted"), "the stream goes on after a bad message"
        call.close()
