"""Hostile input against a real server, while a healthy host keeps streaming.

Each test starts a ``HealthyStream`` (a well-formed host asking for a decision every
5 ms) before the storm and checks afterwards that it never got an error, never lost a
decision, kept getting decisions *during* the storm, and that the server still answers
health SERVING. The fuzzers and their oracles live in ``soak.fuzz`` / ``soak.garbage``
so ``make soak`` runs the same code at ≥ 10,000 examples; here the count comes from
``TAMIYO_FUZZ_EXAMPLES`` (default 40, to keep ``make test`` fast).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from soak.fuzz import check_decision, check_field_message, run_decide_fuzz, run_stream_fuzz
from soak.garbage import huge_decide_request, run_garbage_fuzz, run_tcp_garbage
from soak.harness import (
    HealthyStream,
    ServerThread,
    StreamCall,
    health_status,
    healthy_frame,
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


def _state() -> graph_pb2.ModelGraphState:
    """A valid 3-layer state with one signal per layer."""
    state = graph_pb2.ModelGraphState(topology=healthy_topology(3), step=5)
    state.kernels.add(kernel_id="k", parameter_count=10)
    for sig in healthy_frame(3, 5, "t").frame.signals:
        state.signals.add().CopyFrom(sig)
    return state


def _set(path: str, value: object) -> Callable[[graph_pb2.ModelGraphState], None]:
    def apply(state: graph_pb2.ModelGraphState) -> None:
        *parents, leaf = path.split(".")
        msg: Any = state
        for p in parents:
            name, _, index = p.partition("[")
            msg = getattr(msg, name)
            if index:
                msg = msg[int(index.rstrip("]"))]
        setattr(msg, leaf, value)

    return apply


def _dup_layer(state: graph_pb2.ModelGraphState) -> None:
    state.topology.layers[2].layer_id = state.topology.layers[0].layer_id


def _self_loop(state: graph_pb2.ModelGraphState) -> None:
    state.topology.edges.add(source=1, target=1)


def _dup_edge(state: graph_pb2.ModelGraphState) -> None:
    state.topology.edges.add(source=0, target=1)


HOSTILE = [
    ("nan", _set("signals[0].health_score", math.nan), "signals[0].health_score"),
    ("inf", _set("signals[1].gradient_norm", math.inf), "signals[1].gradient_norm"),
    ("negative", _set("signals[2].activation_variance", -1.0), "signals[2].activation_variance"),
    ("out of range", _set("signals[0].dead_neuron_ratio", 1.5), "signals[0].dead_neuron_ratio"),
    ("negative step", _set("signals[0].step", -3), "signals[0].step"),
    ("negative state step", _set("step", -1), "step"),
    ("huge id", _set("topology.layers[1].layer_id", "x" * 100_000), "topology.layers[1].layer_id"),
    ("control chars", _set("topology.layers[1].layer_id", "a\x00b"), "topology.layers[1].layer_id"),
    ("duplicate id", _dup_layer, "topology.layers[2].layer_id"),
    ("unknown id", _set("signals[1].layer_id", "nope"), "signals[1].layer_id"),
    ("edge out of range", _set("topology.edges[0].target", 3), "topology.edges[0].target"),
    ("edge 2**32-1", _set("topology.edges[1].source", 2**32 - 1), "topology.edges[1].source"),
    ("self loop", _self_loop, "topology.edges[2]"),
    ("duplicate edge", _dup_edge, "topology.edges[2]"),
    ("seeds > declared", _set("signals[0].total_seeds", 64), "signals[0].total_seeds"),
    (
        "unknown layer type",
        _set("topology.layers[0].layer_type", 99),
        "topology.layers[0].layer_type",
    ),
    ("zero width", _set("topology.layers[0].input_size", 0), "topology.layers[0].input_size"),
]


@pytest.mark.parametrize(("name", "mutate", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_named_hostile_input_gets_an_error_naming_its_field(
    server: ServerThread,
    name: str,
    mutate: Callable[[graph_pb2.ModelGraphState], None],
    field: str,
) -> None:
    """Decide: INVALID_ARGUMENT ``state.<field>: ...``; the same state as a stream
    (SessionOpen + one frame) gets an in-stream error, and the stream goes on."""
    state = _state()
    mutate(state)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TamiyoServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(pb.DecideRequest(state=state), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"state.{field}:")
        # The same fault on a stream: topology faults in SessionOpen, signal faults in a frame.
        call = StreamCall(stub)
        call.send(
            pb.StreamTelemetryRequest(
                session_open=pb.SessionOpen(
                    host_id="h", topology=state.topology, kernels=state.kernels
                )
            )
        )
        first = call.recv(10.0)
        assert first is not None
        if field.startswith("topology"):
            assert first.error.field == f"session_open.{field}", first
        else:
            assert first.HasField("session_accepted"), first
            frame = pb.TelemetryFrame(step=max(state.step, 0), want_decision=True, request_id="x")
            frame.signals.extend(state.signals)
            if field == "step":
                frame.step = state.step
            call.send(pb.StreamTelemetryRequest(frame=frame))
            resp = call.recv(10.0)
            assert resp is not None
            expected = "frame.step" if field == "step" else f"frame.{field}"
            assert resp.error.field == expected, resp
            assert resp.error.frame_request_id == "x"
        call.send(healthy_open())
        resp = call.recv(10.0)
        assert resp is not None
        assert resp.HasField("session_accepted"), "the stream goes on"
        call.close()
        assert call.status is None


def test_reopened_session_loses_no_decision(server: ServerThread) -> None:
    """SessionOpen A, frame (wants a decision), SessionOpen B, frame (wants one), then
    half-close: both frames are answered before the stream ends. Repeated, because the
    loss depends on A's evaluation finishing in a batch before B's (found by the soak)."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TamiyoServiceStub(channel)
        missing = []
        for trial in range(60):
            reqs = [
                healthy_open(200, host="A"),
                healthy_frame(200, 1, "a"),
                healthy_open(8, host="B"),
                healthy_frame(8, 1, "b"),
            ]
            answered = {
                r.decision.frame_request_id or r.error.frame_request_id
                for r in stub.StreamTelemetry(iter(reqs), timeout=30)
                if r.HasField("decision") or r.HasField("error")
            }
            if answered != {"a", "b"}:
                missing.append((trial, sorted(answered)))
        assert missing == []


def test_layer_scores_sum_to_one_when_noop_is_near_certain() -> None:
    """Found by the Decide fuzzer with the shipped default policy: a one-layer graph on
    which P(no-op) ≈ 1 - 2e-7 got a layer score of 0.877 (float32 cancellation in
    1 - P(no-op)). Scores of a graph must sum to 1 or all be 0 (decision.proto)."""
    state = graph_pb2.ModelGraphState(
        topology=graph_pb2.Topology(
            layers=[
                graph_pb2.LayerSpec(
                    layer_id="L0",
                    layer_type=graph_pb2.LAYER_TYPE_ATTENTION,
                    input_size=3579,
                    output_size=2282,
                    parameter_count=302621084,
                    seed_count=1,
                )
            ]
        ),
        kernels=[graph_pb2.KernelSpec(kernel_id="k", parameter_count=587007)],
        step=648406,
        epoch=12,
    )
    request = pb.DecideRequest(state=state, budget=pb.SessionBudget(decision_deadline_ms=1000))
    config = loopback_config()
    with ServerThread(config) as srv, grpc.insecure_channel(srv.target) as channel:
        decision = pb_grpc.TamiyoServiceStub(channel).Decide(request, timeout=30).decision
    assert not decision.degraded, "a 1 s deadline leaves time for the network"
    assert decision.layer_scores
    check_decision(decision, state)
