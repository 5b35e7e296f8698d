"""tamiyo_client.loadgen accounting (the serving bench's numbers): only decisions made
by the network count as decisions/s; degraded decisions and shed notices are ``shed``.
(Here rather than under tests/client: the serving engineer owns loadgen.)"""

from __future__ import annotations

import random
import time

import pytest

from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.loadgen import Plan, Stats, make_host, suffix, summarize


def _decision(tag: str, degraded: bool) -> bytes:
    d = decision_pb2.AdaptationDecision(frame_request_id=tag, degraded=degraded)
    return pb.StreamTelemetryResponse(decision=d).SerializeToString()


def _shed(tag: str, message: str) -> bytes:
    err = pb.StreamError(
        code=pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED, message=message, frame_request_id=tag
    )
    return pb.StreamTelemetryResponse(error=err).SerializeToString()


def test_shed_answers_are_not_decisions() -> None:
    st = Stats()
    plan = Plan("open", 4, 100.0, 0.0, 2.0, 0.0)
    now = time.perf_counter()
    sent = {f"t{i}": now for i in range(10)}
    answers = [_decision(f"t{i}", degraded=False) for i in range(4)]
    answers += [_decision("t4", degraded=True), _decision("t5", degraded=True)]
    answers += [_shed("t6", "shed: overloaded"), _shed("t7", "frame step 1 superseded by 2")]
    for raw in answers:
        st.answer(raw, sent, since=0.0)
    st.lost = len(sent)  # t8, t9 never answered
    row = summarize(st, plan, [])
    assert row["decisions_per_s"] == 4 / 2.0  # network decisions only
    assert row["all_decisions_per_s"] == 6 / 2.0
    assert row["answered_per_s"] == 8 / 2.0
    assert row["shed"] == 4
    assert row["lost"] == 2
    assert row["p99_ms"] is not None


def test_a_sent_frame_is_the_host_frame_with_its_step_tag_and_clock() -> None:
    # frame_bytes + suffix parses as one request: protobuf merges the embedded frame,
    # so the host's signals stay and the suffix sets step, tag and client clock
    host = make_host(random.Random(0), 3, 4, 8)
    req = pb.StreamTelemetryRequest.FromString(host.frame_bytes + suffix(7, "3.7", 12.5))
    f = req.frame
    assert (f.step, f.request_id, f.client_clock_us) == (7, "3.7", 12_500_000)
    assert f.want_decision
    assert len(f.signal_columns.layer_id) == host.layers
    unstamped = pb.StreamTelemetryRequest.FromString(host.frame_bytes + suffix(8, "3.8"))
    assert unstamped.frame.client_clock_us == 0


def test_the_token_comes_from_the_environment_either_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tamiyo_client.loadgen import build_parser

    monkeypatch.delenv("TAMIYO_TOKEN", raising=False)
    monkeypatch.setenv("TAMIYO_AUTH_TOKEN", "s3cret\n")  # the server's, from a Secret file
    assert build_parser().parse_args([]).token == "s3cret"
    monkeypatch.setenv("TAMIYO_TOKEN", "mine")
    assert build_parser().parse_args([]).token == "mine"
