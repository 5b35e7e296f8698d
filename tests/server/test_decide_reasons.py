"""``Decide`` says which cause of NO_VALID_TARGET it met (QA16 L2), over the wire.

The QA repro: layers with free seeds and ``"kernels": []`` answered "no layer with a
free seed". The rule engine's own cases are in ``tests/policy/test_rules.py``.
"""

from __future__ import annotations

import grpc

from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer

from . import hosts


def _request(kernels: bool, seeds: int) -> pb.DecideRequest:
    state = graph_pb2.ModelGraphState(
        topology=hosts.topology(6, seeds=seeds),
        signals=hosts.signals(6, 5) if seeds else [],
        kernels=hosts.KERNELS if kernels else [],
        step=5,
    )
    return pb.DecideRequest(state=state, request_id="r")


async def test_decide_names_the_missing_kernels_and_the_missing_seeds(
    server: TamiyoServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        no_kernels = (await stub.Decide(_request(kernels=False, seeds=2), timeout=30)).decision
        no_seeds = (await stub.Decide(_request(kernels=True, seeds=0), timeout=30)).decision
    for d in (no_kernels, no_seeds):
        assert d.action == decision_pb2.ADAPTATION_ACTION_NO_OP
        assert d.rule == decision_pb2.DECISION_RULE_NO_VALID_TARGET
    assert no_kernels.reason == "no kernels offered (SessionOpen.kernels / state.kernels is empty)"
    assert no_seeds.reason.startswith("no layer with a free seed"), no_seeds.reason
