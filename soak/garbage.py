"""Bytes that are not Tamiyo messages: on a gRPC method (identity serializers), and on
the TCP port itself (not even HTTP/2).

Why: the hypothesis fuzzers only send messages protobuf can encode. A hostile or broken
peer sends anything: truncated messages, flipped bits, varints that never end, nesting
bombs, oversized payloads, random bytes in place of the HTTP/2 preface. The server must
refuse each with a status (never hang, never crash); other clients must not notice.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

import grpc

from soak.fuzz import FuzzStats, _require
from soak.harness import healthy_topology
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.wire import varint

_SERVICE = "/tamiyo.v1.TamiyoService/"
TIMEOUT_S = 10.0
# Status codes a garbage payload may get. Bytes that do not parse are refused by grpc
# itself before Tamiyo's code runs: grpc.aio answers UNKNOWN with "Error parsing message
# with type 'tamiyo.v1.DecideRequest': ..." (clear, though not INVALID_ARGUMENT), so
# UNKNOWN / INTERNAL are accepted only with a parse failure in the details. Bytes that
# happen to parse become a (mostly empty) message: INVALID_ARGUMENT or a normal answer.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_PARSE_FAILURE = ("error parsing message", "deserializ")


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def huge_decide_request(layers: int) -> bytes:
    """A serialized DecideRequest with ``layers`` layers, built without materialising
    ``layers`` protobuf objects (10⁶ layers ≈ 20 MB in ~0.1 s)."""
    one = graph_pb2.LayerSpec(
        layer_id="n", layer_type=graph_pb2.LAYER_TYPE_LINEAR, input_size=1, output_size=1
    ).SerializeToString()
    topology = field_bytes(1, one) * layers
    state = field_bytes(1, topology)
    return field_bytes(1, state)


def valid_decide_bytes() -> bytes:
    return pb.DecideRequest(
        state=graph_pb2.ModelGraphState(topology=healthy_topology(4))
    ).SerializeToString()


def nesting_bomb(depth: int) -> bytes:
    """Field 1 inside field 1 inside ... ``depth`` times (protobuf's recursion limit)."""
    payload = b""
    for _ in range(depth):
        payload = field_bytes(1, payload)
    return payload


def payloads(rng: random.Random) -> bytes:
    base = valid_decide_bytes()
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 4096))
    if kind == 1:  # one flipped byte in a valid message
        i = rng.randrange(len(base))
        return base[:i] + bytes([base[i] ^ (1 << rng.randrange(8))]) + base[i + 1 :]
    if kind == 2:  # truncated
        return base[: rng.randrange(len(base))]
    if kind == 3:  # a varint that never ends
        return b"\x08" + b"\xff" * rng.randint(10, 64)
    if kind == 4:
        return nesting_bomb(rng.choice((50, 101, 200, 1000)))
    if kind == 5:  # length prefix larger than the message
        return b"\x0a" + varint(rng.randint(10_000, 2**31)) + rng.randbytes(8)
    if kind == 6:  # unknown fields and wire types
        return bytes([rng.randrange(256) for _ in range(4)]) + base
    return base + rng.randbytes(rng.randint(1, 64))


def _classify(stats: FuzzStats, err: grpc.RpcError | None, where: str) -> None:
    code = grpc.StatusCode.OK if err is None else err.code()
    stats.outcomes[f"{where}:{code.name}"] += 1
    details = "" if err is None else (err.details() or "")
    _require(code in ALLOWED, f"{where}: garbage got {code.name}: {details}")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        _require(
            any(p in details.lower() for p in _PARSE_FAILURE),
            f"{where}: {code.name} that is not a parse failure: {details}",
        )


def run_garbage_fuzz(
    target: str,
    examples: int,
    seed: int = 0,
    stats: FuzzStats | None = None,
    strict: bool = True,
) -> FuzzStats:
    """``examples`` garbage payloads, alternating unary Decide and StreamTelemetry.
    ``strict`` raises on the first violation; otherwise violations are counted in
    ``stats.violations`` and the run goes on (the soak wants the whole count)."""
    rng = random.Random(seed)
    stats = FuzzStats() if stats is None else stats
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    with grpc.insecure_channel(target) as channel:
        decide = channel.unary_unary(
            _SERVICE + "Decide", request_serializer=ident, response_deserializer=ident
        )
        stream = channel.stream_stream(
            _SERVICE + "StreamTelemetry", request_serializer=ident, response_deserializer=ident
        )
        for i in range(examples):
            try:
                _one_garbage(i, rng, stats, decide, stream)
            except AssertionError as e:
                if strict:
                    raise
                stats.violations[str(e)[:200]] += 1
    return stats


def _one_garbage(i: int, rng: random.Random, stats: FuzzStats, decide: Any, stream: Any) -> None:
    """Even ``i``: one payload on unary Decide; odd: 1-4 payloads on one stream."""
    stats.examples += 1
    stats.mutated += 1
    if i % 2 == 0:
        stats.messages += 1
        try:
            decide(payloads(rng), timeout=TIMEOUT_S)
            _classify(stats, None, "decide")
        except grpc.RpcError as e:
            _classify(stats, e, "decide")
        return
    msgs = [payloads(rng) for _ in range(rng.randint(1, 4))]
    stats.messages += len(msgs)
    call = stream(iter(msgs), timeout=TIMEOUT_S)
    answers = 0
    try:
        for _ in call:
            answers += 1
    except grpc.RpcError as e:
        _classify(stats, e, "stream")
        return
    _classify(stats, None, "stream")
    need = answers_owed(msgs)
    _require(
        answers >= need,
        f"garbage on a stream: it ended with OK after {answers} answers to {len(msgs)} "
        f"messages that are owed at least {need} (a message was dropped silently)",
    )


def answers_owed(msgs: list[bytes]) -> int:
    """The fewest answers a stream that ends OK owes these messages: one for each that
    does not parse (an in-stream INVALID_ARGUMENT, and the stream goes on), is empty, is
    a SessionOpen (accepted or refused) or is a frame with ``want_decision`` (a
    decision, a refusal or a supersede notice). A frame without it, and an outcome, may
    be accepted silently."""
    need = 0
    for raw in msgs:
        try:
            req = pb.StreamTelemetryRequest.FromString(raw)
        except Exception:  # (DecodeError, or the recursion limit)
            need += 1
            continue
        kind = req.WhichOneof("message")
        if kind in (None, "session_open") or (kind == "frame" and req.frame.want_decision):
            need += 1
    return need


def run_tcp_garbage(host: str, port: int, examples: int, seed: int = 0) -> int:
    """Open raw TCP connections and send non-HTTP/2 bytes (or a preface then garbage);
    returns how many connections were made. The server should just close them."""
    rng = random.Random(seed)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for i in range(examples):
        with socket.create_connection((host, port), timeout=5.0) as sock:
            head = preface if i % 2 else b""
            try:
                sock.sendall(head + rng.randbytes(rng.randint(1, 2048)))
                sock.settimeout(1.0)
                sock.recv(4096)
            except (TimeoutError, ConnectionError, OSError):
                pass  # the server closed it, or said nothing: both fine
    return examples
