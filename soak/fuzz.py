"""Hypothesis fuzzers for Decide and StreamTelemetry against a real server, with oracles.

Each runner builds a ``@given`` test at call time with the requested example count, so
``make test`` runs a few dozen examples and ``make soak`` tens of thousands through the
same code. The oracles say what "a clear error, nothing lost" means:

- ``Decide``: a valid request gets a decision whose numbers are finite and in range and
  whose target is a layer and kernel of the request; a bad one gets ``INVALID_ARGUMENT``
  whose message starts with the offending field path (``state.signals[2].health_score:``).
  Any other code (INTERNAL, UNKNOWN, UNAVAILABLE) or a timeout fails.
- ``StreamTelemetry``: after each fuzzed message a sentinel (an empty request, always
  answered with one error) is sent, so every synchronous answer is attributed to its
  message. A SessionOpen gets exactly one SessionAccepted or error; every frame that asked
  for a decision gets exactly one answer (decision, or an error quoting its request id);
  a valid message is never refused; the stream ends with status OK when the client
  half-closes. A ``StreamError`` must name its field and start its message with it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soak.harness import StreamCall
from soak.messages import decide_requests, frame_signals, mutations, session_opens
from tamiyo.config import Limits
from tamiyo.signal_columns import columns_from_signals
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc

ANSWER_TIMEOUT_S = 10.0
_FIELD_RE = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*$")
SENTINEL = pb.StreamTelemetryRequest()
Code = pb.StreamErrorCode


@dataclass
class FuzzStats:
    """What a fuzz run sent and what came back (for the soak report)."""

    examples: int = 0
    messages: int = 0
    mutated: int = 0
    columnar: int = 0  # frames sent with TelemetryFrame.signal_columns
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)  # non-strict runs only

    def merge(self, other: FuzzStats) -> None:
        self.examples += other.examples
        self.messages += other.messages
        self.mutated += other.mutated
        self.columnar += other.columnar
        self.outcomes.update(other.outcomes)
        self.violations.update(other.violations)


MAX_MESSAGE_BYTES = Limits().max_message_bytes  # gRPC's receive limit on the server


def _require(condition: object, why: object = "") -> None:
    """An oracle check that survives ``python -O`` (unlike ``assert``)."""
    if not condition:
        raise AssertionError(str(why))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def check_field_message(field_path: str, message: str) -> None:
    """A refusal names the field: ``field`` is a path and the message starts with it."""
    _require(field_path, f"error without a field: {message!r}")
    _require(_FIELD_RE.match(field_path), f"field {field_path!r} is not a field path")
    head = message.split(":", 1)[0]
    _require(
        ":" in message and _FIELD_RE.match(head),
        (f"message {message!r} does not start with a field path (field {field_path!r})"),
    )


def check_decision(d: decision_pb2.AdaptationDecision, state: graph_pb2.ModelGraphState) -> None:
    """Invariants of any decision for ``state`` (degraded or not)."""
    layer_ids = {lay.layer_id: lay for lay in state.topology.layers}
    kernel_ids = {k.kernel_id for k in state.kernels}
    _require(d.decision_id and d.policy_version, d)
    _require(d.rule != decision_pb2.DECISION_RULE_UNSPECIFIED, d)
    for name in ("confidence", "urgency", "value_estimate", "propensity"):
        _require(math.isfinite(getattr(d, name)), (name, d))
    _require(0.0 <= d.confidence <= 1.0 and 0.0 <= d.urgency <= 1.0, d)
    _require(0.0 < d.propensity <= 1.0 or d.degraded, d)
    if d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL:
        _require(d.target_layer_id in layer_ids, d.target_layer_id)
        _require(d.kernel_id in kernel_ids, d.kernel_id)
        _require(d.seed_index < layer_ids[d.target_layer_id].seed_count, d)
    else:
        _require(d.action == decision_pb2.ADAPTATION_ACTION_NO_OP, d)
        _require(not d.target_layer_id and not d.kernel_id, d)
    if d.layer_scores:
        _require(
            [s.layer_id for s in d.layer_scores] == list(layer_ids), "scores in topology order"
        )
        probs = [s.target_probability for s in d.layer_scores]
        # float32 softmax: a lone layer may score 1 + 1 ulp; more is a defect.
        _require(all(math.isfinite(p) and 0.0 <= p <= 1.0 + 1e-6 for p in probs), probs)
        total = sum(probs)
        _require(total == 0.0 or abs(total - 1.0) < 1e-3, f"scores sum to {total}")


def decide_once(
    stub: pb_grpc.TamiyoServiceStub,
    req: pb.DecideRequest,
    mutated: bool,
    stats: FuzzStats,
    strict: bool = True,
) -> None:
    stats.messages += 1
    try:
        resp = stub.Decide(req, timeout=ANSWER_TIMEOUT_S)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        stats.outcomes[f"decide:{code.name}"] += 1
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            _require(mutated, f"a valid request was refused: {details}")
            check_field_message(details.split(":", 1)[0], details)
            return
        _require(code == grpc.StatusCode.RESOURCE_EXHAUSTED and details, (code, details))
        return
    stats.outcomes["decide:OK"] += 1
    try:
        check_decision(resp.decision, req.state)
    except AssertionError as e:
        if strict:
            raise
        # Soak mode: a wrong number in a served decision is counted (by kind) and the
        # run goes on, so one defect does not stop the other 9,999 examples.
        stats.violations[re.sub(r"-?\d[\d.e+-]*", "#", str(e))[:160]] += 1
    _require(resp.decision.frame_request_id == req.request_id)


def run_decide_fuzz(
    target: str, examples: int, stats: FuzzStats | None = None, strict: bool = True
) -> FuzzStats:
    """``examples`` hostile DecideRequests; raises AssertionError on the first violation
    (hypothesis then shrinks it to a minimal request). ``stats`` is filled as it goes.
    ``strict=False``: wrong numbers in a served decision are counted, not raised (status
    codes and refusals stay strict)."""
    stats = FuzzStats() if stats is None else stats
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TamiyoServiceStub(channel)

        @fuzz_settings(examples)
        @given(req=decide_requests(), data=st.data())
        def one(req: pb.DecideRequest, data: st.DataObject) -> None:
            stats.examples += 1
            done = mutations(data.draw, req)
            stats.mutated += bool(done)
            decide_once(stub, req, bool(done), stats, strict)

        one()
    return stats


# ---------------------------------------------------------------------- streams
@dataclass
class _StreamState:
    call: StreamCall
    stats: FuzzStats
    topo: graph_pb2.Topology | None = None  # of the session in force
    generation: int = 0  # sessions accepted so far on this stream
    frame_generation: dict[str, int] = field(default_factory=dict)  # request_id -> session
    last_step: int = -1
    step: int = 0
    decision_ids: list[str] = field(default_factory=list)
    wanted: dict[str, int] = field(default_factory=dict)  # request_id -> answers so far
    silent: set[str] = field(default_factory=set)  # valid frames that must get no answer
    refused: set[str] = field(default_factory=set)  # frames answered INVALID_ARGUMENT


def _tag_of(resp: pb.StreamTelemetryResponse) -> str:
    kind = resp.WhichOneof("message")
    if kind == "decision":
        return resp.decision.frame_request_id
    if kind == "error":
        return resp.error.frame_request_id
    return ""


def _is_sentinel_answer(resp: pb.StreamTelemetryResponse) -> bool:
    return resp.WhichOneof("message") == "error" and resp.error.field == "message"


def _absorb_tagged(s: _StreamState, resp: pb.StreamTelemetryResponse) -> None:
    """An answer that quotes a frame: check it and count it against that frame."""
    tag = _tag_of(resp)
    _require(tag not in s.silent, f"a valid frame without want_decision was answered: {resp}")
    _require(tag in s.wanted, f"answer for an unknown frame {tag!r}: {resp}")
    s.wanted[tag] += 1
    _require(s.wanted[tag] == 1, f"frame {tag!r} answered twice")
    if resp.WhichOneof("message") == "decision":
        if s.frame_generation.get(tag) == s.generation:  # the session still in force
            s.decision_ids.append(resp.decision.decision_id)
        s.stats.outcomes["stream:decision"] += 1
    else:
        _check_error(resp.error, s.stats)
        if resp.error.code == Code.STREAM_ERROR_CODE_INVALID_ARGUMENT:
            s.refused.add(tag)


def _check_error(err: pb.StreamError, stats: FuzzStats) -> None:
    stats.outcomes[f"stream:{Code.Name(err.code)}"] += 1
    _require(
        err.code
        in (
            Code.STREAM_ERROR_CODE_INVALID_ARGUMENT,
            Code.STREAM_ERROR_CODE_NOT_FOUND,
            Code.STREAM_ERROR_CODE_FAILED_PRECONDITION,
            Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED,
        ),
        f"unexpected in-stream error {err}",
    )
    if err.code != Code.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED:
        check_field_message(err.field, err.message)
    else:  # the explicit overload answers: a newer frame replaced it, or load shedding
        _require("superseded" in err.message or err.message.startswith("shed:"), err)


class _TransportRefusedError(Exception):
    """The stream was ended by gRPC itself: a request over the message size limit."""


def _exchange(s: _StreamState, req: pb.StreamTelemetryRequest) -> list[pb.StreamTelemetryResponse]:
    """Send ``req`` + the sentinel; return the untagged answers that came before the
    sentinel's (the synchronous answers to ``req``), absorbing tagged ones.

    A request over gRPC's message limit (a "blowup" mutation can make 40 MB) never
    reaches the server's code: the transport ends the stream with RESOURCE_EXHAUSTED
    naming the size, which is the designed answer; the example ends there."""
    if req.ByteSize() > MAX_MESSAGE_BYTES:
        s.call.send(req)
        try:
            while s.call.recv(ANSWER_TIMEOUT_S) is not None:
                pass
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = (e.details() if hasattr(e, "details") else "") or ""
            _require(
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details,
                f"an oversized request ended the stream with {code}: {details}",
            )
            s.stats.outcomes["stream:oversized"] += 1
            raise _TransportRefusedError from None
        raise AssertionError("an oversized request did not end the stream")
    s.call.send(req)
    s.call.send(SENTINEL)
    s.stats.messages += 2
    sync: list[pb.StreamTelemetryResponse] = []
    while True:
        resp = s.call.recv(ANSWER_TIMEOUT_S)
        if resp is None:
            raise AssertionError("stream ended early")
        if _is_sentinel_answer(resp):
            return sync
        if _tag_of(resp):
            _absorb_tagged(s, resp)
        else:
            sync.append(resp)


def _open_op(s: _StreamState, data: st.DataObject) -> None:
    msg = data.draw(session_opens())
    req = pb.StreamTelemetryRequest(session_open=msg)
    done = mutations(data.draw, req.session_open)
    s.stats.mutated += bool(done)
    (answer,) = _exchange(s, req)
    if answer.WhichOneof("message") == "session_accepted":
        s.topo = graph_pb2.Topology()
        s.topo.CopyFrom(req.session_open.topology)
        s.last_step = -1
        s.generation += 1
        s.decision_ids.clear()
        s.stats.outcomes["stream:accepted"] += 1
        return
    _require(answer.WhichOneof("message") == "error", answer)
    _require(done, f"a valid SessionOpen was refused: {answer.error}")
    _check_error(answer.error, s.stats)


def _frame_op(s: _StreamState, data: st.DataObject) -> None:
    s.step = min(max(s.step, s.last_step) + data.draw(st.integers(0, 3)), 2**63 - 1)
    tag = f"r{len(s.wanted) + len(s.silent)}"
    want = data.draw(st.booleans())
    topo = s.topo if s.topo is not None else graph_pb2.Topology()
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    signals = frame_signals(rng, topo, s.step) if topo.layers else []
    req = pb.StreamTelemetryRequest(
        frame=pb.TelemetryFrame(
            step=s.step, epoch=0, signals=signals, want_decision=want, request_id=tag
        )
    )
    columnar: bool = data.draw(st.booleans())
    if signals and columnar:  # the same signals in the columnar form
        del req.frame.signals[:]
        req.frame.signal_columns.CopyFrom(columns_from_signals(signals))
        s.stats.columnar += 1
    done = mutations(data.draw, req.frame, protect=frozenset({"request_id", "want_decision"}))
    if data.draw(st.integers(0, 9)) == 0:  # hostile request id, still unique
        tag = req.frame.request_id = tag + data.draw(st.sampled_from(("x" * 100, "\x00", "\n")))
        done.append("request_id")
    s.stats.mutated += bool(done)
    wanted = want or bool(done) or s.topo is None  # a bad frame is answered either way,
    if wanted:  # as is every frame before SessionOpen
        s.wanted[tag] = 0
    s.frame_generation[tag] = s.generation
    sync = _exchange(s, req)
    if s.topo is None:  # FAILED_PRECONDITION, naming the frame as every frame error does
        _require(not sync, f"untagged answer to a frame before SessionOpen: {sync}")
        _require(s.wanted.pop(tag) == 1, f"frame {tag!r} before SessionOpen not answered")
        return
    _require(not sync, f"untagged answer to a frame: {sync}")
    if tag not in s.refused:  # validation errors arrive before the sentinel
        s.last_step = max(s.last_step, req.frame.step)
        if not want:
            s.wanted.pop(tag, None)
            s.silent.add(tag)
    else:
        _require(done, "a valid frame was refused")


def _outcome_op(s: _StreamState, data: st.DataObject) -> None:
    # Draws must not depend on timing (which decisions have arrived yet), or hypothesis
    # cannot replay an example: draw everything, then choose.
    want_known, index = data.draw(st.booleans()), data.draw(st.integers(0, 2**16))
    random_id = data.draw(st.text(max_size=20))
    known = want_known and bool(s.decision_ids)
    did = s.decision_ids[index % len(s.decision_ids)] if known else random_id
    reward = data.draw(st.one_of(st.none(), st.floats(-10, 10, width=32)))
    msg = pb.DecisionOutcome(decision_id=did, applied=data.draw(st.booleans()))
    if reward is not None:
        msg.reward = reward
    req = pb.StreamTelemetryRequest(outcome=msg)
    done = mutations(data.draw, req.outcome)
    s.stats.mutated += bool(done)
    sync = _exchange(s, req)
    _require(len(sync) <= 1, sync)
    if sync:
        _require(sync[0].WhichOneof("message") == "error", sync)
        _check_error(sync[0].error, s.stats)
        _require(done or not known or s.topo is None, f"a valid outcome was refused: {sync}")


_OPS: dict[str, Callable[[_StreamState, st.DataObject], None]] = {
    "open": _open_op,
    "frame": _frame_op,
    "outcome": _outcome_op,
}


def _finish(s: _StreamState, early: bool) -> None:
    """Every frame that wanted an answer gets one, then the stream ends with OK.
    ``early``: half-close at once and read to the end (answers still owed must all come
    before the server ends the stream); else wait for them, then half-close."""
    if early:
        s.call.half_close()
        empty = False  # the server may end with an empty response (tamiyo_server.stream)
        while (resp := s.call.recv(ANSWER_TIMEOUT_S)) is not None:
            _require(not empty, f"an answer after the empty response: {resp}")
            if resp.WhichOneof("message") is None:
                empty = True
                continue
            _require(_tag_of(resp), f"unexpected untagged answer {resp}")
            _absorb_tagged(s, resp)
        unanswered = [tag for tag, n in s.wanted.items() if n == 0]
        _require(not unanswered, f"stream ended OK without answering frames {unanswered}")
        _require(s.call.status is None, f"stream did not end OK: {s.call.status}")
        return
    while any(v == 0 for v in s.wanted.values()):
        resp = s.call.recv(ANSWER_TIMEOUT_S)
        if resp is None:
            raise AssertionError(f"stream ended with unanswered frames {s.wanted}")
        _require(_tag_of(resp), f"unexpected untagged answer {resp}")
        _absorb_tagged(s, resp)
    s.call.close()
    _require(s.call.status is None, f"stream did not end OK: {s.call.status}")


def run_stream_fuzz(target: str, examples: int, stats: FuzzStats | None = None) -> FuzzStats:
    """``examples`` streams, each a random sequence of (mutated) messages."""
    stats = FuzzStats() if stats is None else stats
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TamiyoServiceStub(channel)

        @fuzz_settings(examples)
        @given(
            first=st.sampled_from(("open", "open", "open", "frame", "outcome")),
            rest=st.lists(
                st.sampled_from(("frame", "frame", "frame", "open", "outcome")), max_size=7
            ),
            early=st.booleans(),
            data=st.data(),
        )
        def one(first: str, rest: list[str], early: bool, data: st.DataObject) -> None:
            stats.examples += 1
            ops = [first, *rest]
            s = _StreamState(StreamCall(stub), stats)
            try:
                for op in ops:
                    _OPS[op](s, data)
                _finish(s, early)
            except _TransportRefusedError:
                pass  # (see _exchange)
            finally:
                s.call.cancel()

        one()
    return stats
