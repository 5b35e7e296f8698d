"""End to end against a real in-process server on port 0 with the real policy network."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from dataclasses import replace
from typing import cast

import grpc
import pytest

from tamiyo.config import BatchConfig
from tamiyo.policy import fused
from tamiyo.v1 import decision_pb2, graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config

Stream = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


def channel(server: TamiyoServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


async def open_stream(stub: pb_grpc.TamiyoServiceAsyncStub, n: int = 6, **budget: int) -> Stream:
    call: Stream = stub.StreamTelemetry(None)
    await call.write(hosts.session_open(n, budget=budget))
    first = await call.read()
    assert isinstance(first, pb.StreamTelemetryResponse)
    assert first.WhichOneof("message") == "session_accepted", first
    return call


async def read(call: Stream) -> pb.StreamTelemetryResponse:
    msg = await asyncio.wait_for(call.read(), 10.0)
    assert isinstance(msg, pb.StreamTelemetryResponse), msg
    return msg


async def read_all(call: Stream) -> list[pb.StreamTelemetryResponse]:
    """Everything until the server ends the stream, less the empty response a stream may
    end with (how the server tells a half-close from a cancel: test_stream_end_code)."""
    out = []
    while isinstance(msg := await asyncio.wait_for(call.read(), 10.0), pb.StreamTelemetryResponse):
        if msg.WhichOneof("message") is not None:
            out.append(msg)
    return out


async def test_decisions_echo_the_frames_that_asked(server: TamiyoServer) -> None:
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        for step in range(1, 7):
            want = step % 2 == 0
            await call.write(hosts.frame(6, step, want=want, tag=f"r{step}"))
            if want:
                msg = await read(call)
                d = msg.decision
                assert (d.frame_step, d.frame_request_id) == (step, f"r{step}")
                assert d.decision_id
                assert d.policy_version.startswith("builtin-untrained-")
                assert d.rule != decision_pb2.DECISION_RULE_UNSPECIFIED
                assert not d.degraded
                assert [s.layer_id for s in d.layer_scores] == [f"block{i}" for i in range(6)]
                assert math.isclose(
                    sum(s.target_probability for s in d.layer_scores), 1.0, rel_tol=1e-4
                )
                assert 0 < d.server_latency_us < 10_000_000
        # Pipelined frames: every asked frame gets a decision or an explicit supersede.
        asked = {f"p{step}" for step in range(10, 40)}
        for step in range(10, 40):
            await call.write(hosts.frame(6, step, tag=f"p{step}"))
        await call.done_writing()
        answered: list[str] = []
        for msg in await read_all(call):
            if msg.WhichOneof("message") == "decision":
                answered.append(msg.decision.frame_request_id)
            else:
                assert msg.error.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
                assert "superseded" in msg.error.message
                answered.append(msg.error.frame_request_id)
        assert sorted(answered) == sorted(asked)  # each exactly once, none lost
        assert "p39" in answered
        assert await call.code() == grpc.StatusCode.OK


async def test_unary_decide_matches_the_stream(server: TamiyoServer) -> None:
    async with channel(server) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = await open_stream(stub)
        history: list[health_pb2.HealthSignal] = []
        for step in range(1, 5):
            req = hosts.frame(6, step, want=(step == 4))
            history.extend(req.frame.signals)
            await call.write(req)
        streamed = (await read(call)).decision
        await call.done_writing()
        state = graph_pb2.ModelGraphState(
            topology=hosts.topology(6), signals=history, kernels=hosts.KERNELS, step=4, epoch=0
        )
        unary = (await stub.Decide(pb.DecideRequest(state=state, request_id="u"))).decision
        assert unary.frame_request_id == "u"
        for f in ("action", "target_layer_id", "kernel_id", "seed_index", "rule", "degraded"):
            assert getattr(unary, f) == getattr(streamed, f), f
        for f in ("confidence", "urgency", "value_estimate"):
            assert getattr(unary, f) == pytest.approx(getattr(streamed, f), abs=1e-5), f
        assert [s.target_probability for s in unary.layer_scores] == pytest.approx(
            [s.target_probability for s in streamed.layer_scores], abs=1e-5
        )


async def test_bad_messages_get_errors_while_others_are_served(server: TamiyoServer) -> None:
    async with channel(server) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        healthy_count = 0
        stop = asyncio.Event()

        async def healthy() -> None:
            nonlocal healthy_count
            call = await open_stream(stub, 8)
            step = 0
            while not stop.is_set():
                step += 1
                await call.write(hosts.frame(8, step))
                assert (await read(call)).WhichOneof("message") == "decision"
                healthy_count += 1
            await call.done_writing()

        task = asyncio.create_task(healthy())
        bad: Stream = stub.StreamTelemetry(None)

        async def expect(
            req: pb.StreamTelemetryRequest, code: int, field: str, followup: bool = True
        ) -> None:
            before = healthy_count
            await bad.write(req)
            err = (await read(bad)).error
            assert (err.code, err.field) == (code, field), err
            assert field in err.message
            # the same stream still works: a good frame right after gets a decision
            if followup:
                nonlocal_step[0] += 1
                await bad.write(hosts.frame(6, nonlocal_step[0]))
                assert (await read(bad)).WhichOneof("message") == "decision"
            for _ in range(200):
                if healthy_count > before:
                    break
                await asyncio.sleep(0.01)
            assert healthy_count > before, "the healthy stream stalled"

        nonlocal_step = [100]
        inv = pb.STREAM_ERROR_CODE_INVALID_ARGUMENT
        no_session = pb.STREAM_ERROR_CODE_FAILED_PRECONDITION
        await expect(hosts.frame(6, 1), no_session, "session_open", followup=False)
        dup = hosts.session_open(6)
        dup.session_open.topology.layers[3].layer_id = "block0"
        await expect(dup, inv, "session_open.topology.layers[3].layer_id", followup=False)
        await bad.write(hosts.session_open(6))
        assert (await read(bad)).WhichOneof("message") == "session_accepted"
        nan = hosts.frame(6, 101)
        nan.frame.signals[3].health_score = math.nan
        await expect(nan, inv, "frame.signals[3].health_score")
        unknown = hosts.frame(6, 101)
        unknown.frame.signals[1].layer_id = "nope"
        await expect(unknown, inv, "frame.signals[1].layer_id")
        bad_edge = hosts.session_open(6)
        bad_edge.session_open.topology.edges.add(source=0, target=9)
        await expect(bad_edge, inv, "session_open.topology.edges[5].target")
        await expect(hosts.frame(6, 3), inv, "frame.step")  # regressed below 101
        too_many = pb.StreamTelemetryRequest(
            frame=pb.TelemetryFrame(
                step=200, signals=[health_pb2.HealthSignal(layer_id=f"x{i}") for i in range(1025)]
            )
        )
        await expect(too_many, inv, "frame.signals")
        await expect(
            pb.StreamTelemetryRequest(outcome=pb.DecisionOutcome(decision_id="d-none")),
            pb.STREAM_ERROR_CODE_NOT_FOUND,
            "outcome.decision_id",
        )
        await expect(pb.StreamTelemetryRequest(), inv, "message")
        # Unary: INVALID_ARGUMENT naming the field.
        state = graph_pb2.ModelGraphState(topology=hosts.topology(4), step=1)
        state.signals.add(layer_id="block1", health_score=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Decide(pb.DecideRequest(state=state))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "state.signals[0].health_score" in (err.value.details() or "")
        stop.set()
        await task
        await bad.done_writing()
        # The refusals are counted by reason.
        text = server.metrics.registry.get_sample_value(
            "tamiyo_rejected_inputs_total", {"reason": "non_finite"}
        )
        assert text == 1.0


async def test_outcomes_are_accepted_for_known_decisions(server: TamiyoServer) -> None:
    """An outcome for a decision the stream made reaches the experience log (the server
    keeps no copy of it)."""
    from tests.server.test_stream_contract import RecordingSink

    assert server.pipeline is not None
    sink = server.pipeline.experience = RecordingSink()
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1))
        d = (await read(call)).decision
        await call.write(
            pb.StreamTelemetryRequest(
                outcome=pb.DecisionOutcome(decision_id=d.decision_id, applied=True, reward=0.5)
            )
        )
        await call.write(hosts.frame(6, 2))
        assert (await read(call)).decision.frame_step == 2  # no error came before it
        (session_id,) = sink.opened
        assert sink.outcomes == [(session_id, d.decision_id)]
        await call.done_writing()


async def test_overload_is_answered_explicitly(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(batch=replace(BatchConfig(), max_queued=0)))
    async with channel(srv) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = await open_stream(stub)
        await call.write(hosts.frame(6, 1))
        d = (await read(call)).decision
        assert d.degraded
        assert d.rule == decision_pb2.DECISION_RULE_DEGRADED_FALLBACK
        assert "queue_full" in d.reason
        state = graph_pb2.ModelGraphState(topology=hosts.topology(6), kernels=hosts.KERNELS)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Decide(pb.DecideRequest(state=state))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # pushback in gRPC's own trailer, within the configured bounds (± jitter)
        # (the stubs type metadata items as objects; grpc.aio yields (key, value) pairs)
        trailer = cast("tuple[tuple[str, str], ...]", err.value.trailing_metadata() or ())
        pushback = [int(v) for k, v in trailer if k == "grpc-retry-pushback-ms"]
        cfg = BatchConfig()
        assert len(pushback) == 1
        assert 0.75 * cfg.min_pushback_ms <= pushback[0] <= 1.25 * cfg.max_pushback_ms
        await call.done_writing()
    assert srv.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": "queue_full"}) == 2


async def test_hopeless_deadline_gives_degraded_decision(
    server: TamiyoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1 ms deadline below the predicted inference time: shed, not silent. (The
    # prediction is pinned: the native forward of a 6-node graph is predicted well under
    # 1 ms, so on a quick loop the real one made the deadline and the test depended on
    # the machine's speed.)
    assert server.pipeline is not None
    cost = server.pipeline.batcher.cost
    monkeypatch.setattr(cost, "predict_ms", lambda nodes, graphs, safe=True: 50.0)
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch), decision_deadline_ms=1)
        await call.write(hosts.frame(6, 1, tag="late"))
        d = (await read(call)).decision
        assert (d.degraded, d.frame_request_id) == (True, "late")
        assert "shed: deadline" in d.reason
        await call.done_writing()


async def test_the_budget_in_force_is_told_within_floor_and_cap(server: TamiyoServer) -> None:
    """A requested deadline below the server's floor (which no frame could make: each
    would be shed as overloaded on an idle server) is raised to it, one above the cap is
    capped, and SessionAccepted tells the host which deadline is in force."""
    batch = server.config.batch
    wanted = {1: batch.min_deadline_ms, 0: batch.decision_deadline_ms, 25: 25}
    wanted[10**6] = batch.max_deadline_ms
    async with channel(server) as ch:
        for asked, in_force in wanted.items():
            call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
            await call.write(hosts.session_open(6, budget={"decision_deadline_ms": asked}))
            got = await read(call)
            assert got.session_accepted.decision_deadline_ms == round(in_force), asked
            await call.done_writing()
            assert await read_all(call) == []


async def test_vanished_client_leaks_no_task(server: TamiyoServer) -> None:
    await asyncio.sleep(0.1)
    baseline = len(asyncio.all_tasks())
    for _ in range(3):
        ch = channel(server)
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1))
        await call.write(hosts.frame(6, 2))
        await ch.close(grace=None)  # no half-close, no goodbye: the client just vanishes
    assert server.servicer is not None
    for _ in range(300):
        if not server.servicer.streams and len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.01)
    assert not server.servicer.streams
    assert len(asyncio.all_tasks()) <= baseline
    assert server.pipeline is not None
    assert server.pipeline.batcher.queued == 0
    assert server.metrics.registry.get_sample_value("tamiyo_active_streams") == 0


async def test_shutdown_answers_in_flight_work(make_server: ServerFactory) -> None:
    # Batches wait up to 300 ms to fill, so both requests are surely queued at shutdown.
    slow_fill = replace(
        BatchConfig(), decision_deadline_ms=3000.0, max_deadline_ms=5000.0, max_queue_delay_ms=300.0
    )
    srv = await make_server(make_config(batch=slow_fill))
    assert srv.pipeline is not None
    # ...and the batcher believes arrivals are dense (it would not wait for company
    # after a long quiet spell otherwise: see tamiyo_server.batch_queue).
    srv.pipeline.batcher.arrival_gap_s = 0.0
    async with channel(srv) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = await open_stream(stub)
        await call.write(hosts.frame(6, 1, tag="inflight"))
        unary = asyncio.ensure_future(
            stub.Decide(
                pb.DecideRequest(
                    state=graph_pb2.ModelGraphState(
                        topology=hosts.topology(6), kernels=hosts.KERNELS
                    )
                )
            )
        )
        assert srv.pipeline is not None
        for _ in range(500):
            if srv.pipeline.batcher.queued == 2:
                break
            await asyncio.sleep(0.005)
        assert srv.pipeline.batcher.queued == 2
        stopping = asyncio.create_task(srv.stop())
        got: list[str] = []
        while isinstance(msg := await read_or_eof(call), pb.StreamTelemetryResponse):
            kind = msg.WhichOneof("message")
            got.append(kind or "")
            if kind == "decision":
                assert msg.decision.frame_request_id == "inflight"
                # run through the network, not shed as "shutdown" (a 3 s budget)
                assert not msg.decision.degraded, msg.decision.reason
            if kind == "closing":  # what the protocol asks of a client (and ours does)
                await call.done_writing()
        assert "decision" in got
        assert "closing" in got
        assert await call.code() == grpc.StatusCode.OK
        decided = (await unary).decision
        assert decided.policy_version
        assert not decided.degraded, decided.reason
        await stopping
    assert srv.drained is not None
    assert (srv.drained.answered, srv.drained.shed) == (True, 0)


async def read_or_eof(call: Stream) -> object:
    return await asyncio.wait_for(call.read(), 10.0)


async def test_shutdown_answers_every_frame_sent_before_the_half_close(
    make_server: ServerFactory,
) -> None:
    """Frames still on their way when the server starts shutting down are read and
    answered (a decision, or UNAVAILABLE once closing), none dropped: the stream ends
    only when the client half-closes after SessionClosing."""
    srv = await make_server(make_config())
    async with channel(srv) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        sent: set[str] = set()
        closing = asyncio.Event()

        async def keep_sending() -> None:
            step = 1
            while not closing.is_set():
                await call.write(hosts.frame(6, step, tag=f"f{step}"))
                sent.add(f"f{step}")
                step += 1
                await asyncio.sleep(0.001)
            await call.done_writing()

        writer = asyncio.create_task(keep_sending())
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(srv.stop())
        answered: dict[str, str] = {}
        shutdown_shed: list[str] = []
        while isinstance(msg := await read_or_eof(call), pb.StreamTelemetryResponse):
            kind = msg.WhichOneof("message")
            if kind == "closing":
                closing.set()
            elif kind == "decision":
                answered[msg.decision.frame_request_id] = "decision"
                if "shed: shutdown" in msg.decision.reason:
                    shutdown_shed.append(msg.decision.frame_request_id)
            elif kind == "error":
                answered[msg.error.frame_request_id] = pb.StreamErrorCode.Name(msg.error.code)
        await writer
        assert await call.code() == grpc.StatusCode.OK
        await stopping
    assert sent
    assert set(answered) == sent  # every frame got exactly its answer
    assert "decision" in answered.values()
    assert set(answered.values()) <= {"decision", "STREAM_ERROR_CODE_UNAVAILABLE"}
    # In-flight work was run, not shed as "shutdown". (Frames every ms on one stream may
    # be shed for load on a busy box, so this checks the shutdown reason, not degraded.)
    assert not shutdown_shed, shutdown_shed
    assert srv.drained is not None
    assert srv.drained.shed == 0


async def test_shutdown_cuts_a_stream_that_never_half_closes(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(grace_s=0.5))
    async with channel(srv) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        stopping = asyncio.create_task(srv.stop())
        got = []

        async def read_until_cut() -> None:
            while True:
                msg = await read(call)
                got.append(msg.WhichOneof("message"))
                if got[-1] == "closing":  # a frame after it is refused, not dropped
                    await call.write(hosts.frame(6, 1, tag="late"))

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_until_cut()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "half-close" in (err.value.details() or "")
        assert got[:2] == ["closing", "error"]
        await stopping


async def test_metrics_endpoint(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(metrics_port=0))
    port = srv.metrics.start("127.0.0.1", 0)
    async with channel(srv) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        await stub.GetPolicyInfo(pb.GetPolicyInfoRequest())
        state = graph_pb2.ModelGraphState(topology=hosts.topology(4), kernels=hosts.KERNELS)
        await stub.Decide(pb.DecideRequest(state=state))
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    )
    forward = f"native-{fused.build_isa()}" if fused.available() else "torchscript"
    for needle in (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Decide"',
        'grpc_server_handling_seconds_bucket{grpc_method="GetPolicyInfo"',
        "tamiyo_decision_latency_seconds_bucket",
        'le="0.005"',
        "tamiyo_queue_delay_seconds_bucket",
        "tamiyo_batch_graphs_bucket",
        "tamiyo_batch_nodes_bucket",
        "tamiyo_inference_seconds_bucket",
        "tamiyo_active_streams",
        "tamiyo_policy_version_info{version=",
        # how the forward runs, e.g. native-avx2 (the fused C forward, built for AVX2)
        f'tamiyo_forward_info{{forward="{forward}"}} 1.0',
        'tamiyo_policy_reloads_total{result="failed"}',
        # exported at 0 before anything is shed or decided by that rule (alerts read 0)
        'tamiyo_shed_total{reason="late"} 0.0',
        'tamiyo_decisions_total{rule="LAYER_COOLDOWN"}',
    ):
        assert needle in body, needle


async def test_policy_info_says_builtin(server: TamiyoServer) -> None:
    async with channel(server) as ch:
        info = await pb_grpc.TamiyoServiceStub(ch).GetPolicyInfo(pb.GetPolicyInfoRequest())
    assert info.checkpoint_path == "builtin"
    assert info.version.startswith("builtin-untrained-")
    assert "untrained" in info.training_json
    assert info.parameter_count > 0
    assert info.device == "cpu"
    # the fused C forward where it was built, and which instruction set it uses
    want = f"native-{fused.build_isa()}" if fused.available() else "torchscript"
    assert info.forward == want
    assert len(info.features) > 10
    assert info.feature_schema_version
    assert info.loaded_at.seconds > 0


async def test_swamped_loop_refuses_at_the_door(
    server: TamiyoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.pipeline is not None
    assert server.pipeline.door.loop_lag_s < 1.0  # the lag monitor runs and an idle loop is on time
    monkeypatch.setattr(server.pipeline.door, "swamped", lambda budget_s: "refuse")
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1, tag="late"))
        err = (await read(call)).error
        assert err.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
        assert (err.frame_request_id, err.field) == ("late", "frame")
        assert "telemetry was dropped" in err.message
        assert err.retry_after_ms >= 0.75 * BatchConfig().min_pushback_ms  # pushback
        monkeypatch.undo()
        await call.write(hosts.frame(6, 2, tag="ok"))
        assert (await read(call)).decision.frame_request_id == "ok"
        await call.done_writing()
    assert server.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": "swamped"}) == 1


async def test_a_refused_frames_oversized_request_id_is_not_echoed_whole(
    server: TamiyoServer,
) -> None:
    async with channel(server) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1, tag="x" * 100_000))
        err = (await read(call)).error
        assert err.code == pb.STREAM_ERROR_CODE_INVALID_ARGUMENT
        assert err.field == "frame.request_id"
        assert err.frame_request_id == "x" * 256
        await call.write(hosts.frame(6, 2, tag="ok"))  # the stream goes on
        assert (await read(call)).decision.frame_request_id == "ok"
        await call.done_writing()
