"""Hypothesis strategies for well-formed Tamiyo messages, and hostile mutations of them.

Why "valid, then mutate": a purely random message fails the first check of the
validator and never reaches the deeper ones (signals against the topology, the policy
itself). Starting from a message that is valid by construction and applying zero to a
few hostile edits reaches every check, and gives a strong oracle for free: an
unmutated message must be *served*, not refused. ``mutate`` walks the protobuf
descriptors, so a field added to the contracts is fuzzed without touching this file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb

FD = FieldDescriptor
MAX_LAYERS = 12

HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, -1.0, -1e-6, 1.0000001, 2.0, 3.0e38, -3.0e38)
HOSTILE_STRINGS = ("", "x" * 129, "y" * 70_000, "a\x00b", "line\nbreak", "\x7f", "é🚀" * 40)
HOSTILE_INT64 = (-1, -(2**63), 2**63 - 1, -5)
HOSTILE_UINT32 = (2**32 - 1, 2**31, 65, 513, 4097, 0)
HOSTILE_UINT64 = (2**64 - 1, 2**63, 0)
HOSTILE_ENUMS = (99, -3, 0, 2**31 - 1)
BLOWUP = (600, 1100, 5000)  # repeated-field sizes beyond the default limits


def _rid(rng: random.Random, i: int) -> str:
    """Unique printable id: plain ("L3"), or with punctuation and non-ASCII letters."""
    if rng.random() < 0.5:
        return f"L{i}"
    extra = "".join(rng.choice(_ID_CHARS) for _ in range(rng.randint(1, 12)))
    return f"{extra}#{i}"


_ID_CHARS = "abcXYZ019._-/:@[]éßλж中🙂"


def topology(rng: random.Random, n: int) -> graph_pb2.Topology:
    """``n`` layers with unique ids; edges in range, no self loops or repeats."""
    layers = [
        graph_pb2.LayerSpec(
            layer_id=_rid(rng, i),
            layer_type=cast(Any, rng.randint(1, 7)),
            input_size=rng.randint(1, 8192),
            output_size=rng.randint(1, 8192),
            parameter_count=rng.randint(0, 10**9),
            seed_count=rng.randint(0, 4),
        )
        for i in range(n)
    ]
    pairs = [(s, t) for s in range(n) for t in range(n) if s != t]
    chosen = rng.sample(pairs, min(len(pairs), rng.randint(0, 2 * n)))
    return graph_pb2.Topology(
        layers=layers, edges=[graph_pb2.Edge(source=s, target=t) for s, t in chosen]
    )


def kernels(rng: random.Random, k: int) -> list[graph_pb2.KernelSpec]:
    return [
        graph_pb2.KernelSpec(kernel_id=_rid(rng, i), parameter_count=rng.randint(0, 10**6))
        for i in range(k)
    ]


def signal(rng: random.Random, layer: graph_pb2.LayerSpec, step: int) -> health_pb2.HealthSignal:
    """A signal valid for ``layer`` at ``step`` (ranges as documented in health.proto)."""
    total = rng.choice((0, layer.seed_count))
    u = rng.random

    def g() -> float:
        return rng.expovariate(1.0) * 10.0

    return health_pb2.HealthSignal(
        layer_id=layer.layer_id,
        step=step,
        epoch=rng.randint(0, 1000),
        timestamp_s=rng.uniform(0.0, 4e9),
        health_score=u(),
        avg_execution_time_ms=g(),
        error_count=rng.choice((0, 0, 1, 2**32 - 1)),
        active_seeds=rng.randint(0, max(total, layer.seed_count)),
        total_seeds=total,
        activation_variance=g(),
        dead_neuron_ratio=u(),
        avg_correlation=u(),
        gradient_norm=g(),
        latency_variance=g(),
        memory_utilization=u(),
        seed_states=cast(Any, [rng.randint(1, 5) for _ in range(total)] if u() < 0.5 else []),
        adaptation_count=rng.randint(0, 1000),
    )


def frame_signals(
    rng: random.Random, topo: graph_pb2.Topology, step: int
) -> list[health_pb2.HealthSignal]:
    """At most one signal per layer, for a random subset of layers."""
    chosen = [lay for lay in topo.layers if rng.random() < 0.7]
    return [signal(rng, layer, step) for layer in chosen]


_seeds = st.integers(0, 2**32 - 1)
_sizes = st.integers(1, MAX_LAYERS)


@st.composite
def decide_requests(draw: st.DrawFn) -> pb.DecideRequest:
    """A valid DecideRequest: topology, kernels, per-layer histories oldest first.

    Hypothesis draws the sizes (so it can shrink them) and a seed; the values come from
    ``random.Random(seed)``, which is ~50× cheaper than drawing every float."""
    n, k, history = draw(_sizes), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    rng = random.Random(draw(_seeds))
    topo = topology(rng, n)
    step = rng.randint(0, 10**6)
    signals: list[health_pb2.HealthSignal] = []
    for h in range(history):
        signals += frame_signals(rng, topo, step + h)
    return pb.DecideRequest(
        state=graph_pb2.ModelGraphState(
            topology=topo,
            signals=signals,
            kernels=kernels(rng, k),
            step=step + history,  # (no signal is newer than its state)
            epoch=rng.randint(0, 100),
        ),
        budget=pb.SessionBudget(
            max_adaptations_per_epoch=rng.randint(0, 10),
            decision_deadline_ms=rng.choice((0, 5, 10, 50)),
            layer_cooldown_steps=rng.randint(0, 100),
        ),
        request_id=rng.choice(("", "q1", "tag-é")),
    )


@st.composite
def session_opens(draw: st.DrawFn) -> pb.SessionOpen:
    n, k = draw(_sizes), draw(st.integers(0, 3))
    rng = random.Random(draw(_seeds))
    return pb.SessionOpen(
        host_id=_rid(rng, 0),
        model_id=rng.choice(("", "m", "model-λ")),
        topology=topology(rng, n),
        kernels=kernels(rng, k),
        budget=pb.SessionBudget(
            max_adaptations_per_epoch=rng.randint(0, 10),
            decision_deadline_ms=rng.choice((0, 10, 50)),
        ),
    )


# ------------------------------------------------------------------------ mutation
Draw = Callable[[st.SearchStrategy[Any]], Any]  # st.DrawFn or DataObject.draw


@dataclass(frozen=True)
class _Site:
    parent: Message
    field: Any  # FieldDescriptor (python or upb implementation)
    path: str


def _sites(msg: Message, path: str, protect: frozenset[str]) -> list[_Site]:
    out: list[_Site] = []
    for fd in msg.DESCRIPTOR.fields:
        if fd.name in protect:
            continue
        p = f"{path}.{fd.name}" if path else fd.name
        out.append(_Site(msg, fd, p))
        if fd.type != FD.TYPE_MESSAGE:
            continue
        value: Any = getattr(msg, fd.name)
        if _is_repeated(fd):
            for i, child in enumerate(value):
                out += _sites(child, f"{p}[{i}]", protect)
        elif msg.HasField(fd.name):
            out += _sites(value, p, protect)
    return out


def _is_repeated(fd: Any) -> bool:
    return bool(fd.is_repeated) if hasattr(fd, "is_repeated") else fd.label == FD.LABEL_REPEATED


def _hostile_scalar(draw: Draw, fd: Any) -> object:
    t = fd.type
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return draw(st.sampled_from(HOSTILE_FLOATS))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return draw(st.sampled_from(HOSTILE_INT64))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):  # fixed32: the columnar signal counts
        return draw(st.sampled_from(HOSTILE_UINT32))
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return draw(st.sampled_from(HOSTILE_UINT64))
    if t == FD.TYPE_ENUM:
        return draw(st.sampled_from(HOSTILE_ENUMS))
    if t == FD.TYPE_STRING:
        return draw(st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40)))
    if t == FD.TYPE_BOOL:
        return draw(st.booleans())
    return draw(st.integers(-(2**31), 2**31 - 1))


def mutate(draw: Draw, msg: Message, protect: frozenset[str] = frozenset()) -> str:
    """Apply one hostile edit somewhere in ``msg`` (in place); returns what was done."""
    sites = _sites(msg, "", protect)
    if not sites:
        return "nothing to mutate"
    site = draw(st.sampled_from(sites))
    parent, fd = site.parent, site.field
    value: Any = getattr(parent, fd.name)
    if _is_repeated(fd):
        op = draw(st.sampled_from(("duplicate", "clear", "blowup", "hostile_element")))
        if op == "clear" or (op != "blowup" and len(value) == 0 and op == "duplicate"):
            parent.ClearField(fd.name)
            return f"{site.path}: cleared"
        if op == "blowup":
            n = draw(st.sampled_from(BLOWUP))
            if fd.type == FD.TYPE_MESSAGE:
                proto = value[0] if len(value) else fd.message_type._concrete_class()
                value.extend([proto] * n)
            else:
                value.extend([_hostile_scalar(draw, fd)] * n)  # enums, numbers, strings
            return f"{site.path}: +{n} elements"
        if len(value) == 0:
            if fd.type == FD.TYPE_MESSAGE:
                value.add()
            else:
                value.append(_hostile_scalar(draw, fd))
            return f"{site.path}: added a default element"
        i = draw(st.integers(0, len(value) - 1))
        if op == "duplicate" or fd.type == FD.TYPE_MESSAGE:
            if fd.type == FD.TYPE_MESSAGE:
                value.add().CopyFrom(value[i])
            else:
                value.append(value[i])
            return f"{site.path}[{i}]: duplicated"
        value[i] = _hostile_scalar(draw, fd)
        return f"{site.path}[{i}]: hostile element {value[i]!r}"
    if fd.type == FD.TYPE_MESSAGE:
        parent.ClearField(fd.name)
        return f"{site.path}: cleared"
    new = _hostile_scalar(draw, fd)
    try:
        setattr(parent, fd.name, new)
    except (ValueError, TypeError):  # e.g. an enum value protobuf refuses to hold
        setattr(parent, fd.name, 0 if fd.type != FD.TYPE_STRING else "")
    return f"{site.path} = {str(getattr(parent, fd.name))[:40]!r}"


def mutations(draw: Draw, msg: Message, protect: frozenset[str] = frozenset()) -> list[str]:
    """Zero (5 times in 9) to three hostile edits."""
    k = draw(st.sampled_from((0, 0, 0, 0, 0, 1, 1, 2, 3)))
    return [mutate(draw, msg, protect) for _ in range(k)]
