"""Validation accepts every well-formed message and refuses each bad field by its path."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import Limits
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.validation import (
    ValidationError,
    signals_look_valid,
    validate_decide,
    validate_frame,
    validate_outcome,
    validate_session_open,
    validate_signal,
)

LIMITS = Limits()
unit = st.floats(0.0, 1.0, allow_nan=False)
pos = st.floats(0.0, 1e6, allow_nan=False)


@st.composite
def topologies(draw: st.DrawFn, max_layers: int = 12) -> graph_pb2.Topology:
    n = draw(st.integers(1, max_layers))
    layers = [
        graph_pb2.LayerSpec(
            layer_id=f"l{i}",
            layer_type=draw(st.sampled_from(graph_pb2.LayerType.values())),
            input_size=draw(st.integers(1, 4096)),
            output_size=draw(st.integers(1, 4096)),
            parameter_count=draw(st.integers(0, 10**9)),
            seed_count=draw(st.integers(0, 8)),
        )
        for i in range(n)
    ]
    pairs = draw(
        st.sets(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] != e[1]),
            max_size=3 * n,
        )
    )
    edges = [graph_pb2.Edge(source=s, target=t) for s, t in sorted(pairs)]
    return graph_pb2.Topology(layers=layers, edges=edges)


@st.composite
def signals(draw: st.DrawFn, layer: graph_pb2.LayerSpec, step: int) -> health_pb2.HealthSignal:
    total = draw(st.sampled_from([0, layer.seed_count]))
    states = draw(
        st.lists(st.sampled_from(health_pb2.SeedLifecycleState.values()), min_size=total)
        if draw(st.booleans())
        else st.just([])
    )[:total]
    if len(states) not in (0, total):
        states = []
    return health_pb2.HealthSignal(
        layer_id=layer.layer_id,
        step=step,
        epoch=draw(st.integers(0, 100)),
        timestamp_s=draw(pos),
        health_score=draw(unit),
        avg_execution_time_ms=draw(pos),
        error_count=draw(st.integers(0, 1000)),
        active_seeds=draw(st.integers(0, max(total, layer.seed_count))),
        total_seeds=total,
        activation_variance=draw(pos),
        dead_neuron_ratio=draw(unit),
        avg_correlation=draw(unit),
        gradient_norm=draw(pos),
        latency_variance=draw(pos),
        memory_utilization=draw(unit),
        seed_states=states,
        adaptation_count=draw(st.integers(0, 100)),
    )


@st.composite
def opens_and_frames(draw: st.DrawFn) -> tuple[pb.SessionOpen, pb.TelemetryFrame]:
    topo = draw(topologies())
    kernels = [graph_pb2.KernelSpec(kernel_id=f"k{i}") for i in range(draw(st.integers(0, 4)))]
    step = draw(st.integers(0, 10**6))
    chosen = draw(st.sets(st.integers(0, len(topo.layers) - 1)))
    sigs = [draw(signals(topo.layers[i], step)) for i in sorted(chosen)]
    open_ = pb.SessionOpen(host_id="h", topology=topo, kernels=kernels)
    return open_, pb.TelemetryFrame(step=step, signals=sigs, want_decision=True)


@settings(max_examples=80, deadline=None)
@given(opens_and_frames())
def test_valid_messages_pass(case: tuple[pb.SessionOpen, pb.TelemetryFrame]) -> None:
    open_, frame = case
    info = validate_session_open(open_, LIMITS)
    assert len(info.layer_index) == len(open_.topology.layers)
    validate_frame(frame, info, LIMITS, last_step=None)
    state = graph_pb2.ModelGraphState(
        topology=open_.topology, signals=frame.signals, kernels=open_.kernels, step=frame.step
    )
    validate_decide(pb.DecideRequest(state=state), LIMITS)


BAD_FLOAT_FIELDS = [
    ("health_score", 1.5),
    ("health_score", -0.1),
    ("dead_neuron_ratio", 2.0),
    ("avg_correlation", -1.0),
    ("memory_utilization", 1.01),
    ("avg_execution_time_ms", -1.0),
    ("gradient_norm", math.inf),
    ("activation_variance", math.nan),
    ("latency_variance", -math.inf),
    ("timestamp_s", math.nan),
]


@settings(max_examples=60, deadline=None)
@given(opens_and_frames(), st.sampled_from(BAD_FLOAT_FIELDS), st.data())
def test_each_bad_float_is_named(
    case: tuple[pb.SessionOpen, pb.TelemetryFrame],
    bad: tuple[str, float],
    data: st.DataObject,
) -> None:
    open_, frame = case
    if not frame.signals:
        frame.signals.append(health_pb2.HealthSignal(layer_id="l0", step=frame.step))
    i = data.draw(st.integers(0, len(frame.signals) - 1))
    name, value = bad
    setattr(frame.signals[i], name, value)
    info = validate_session_open(open_, LIMITS)
    with pytest.raises(ValidationError) as err:
        validate_frame(frame, info, LIMITS, last_step=None)
    assert err.value.field == f"frame.signals[{i}].{name}"
    assert err.value.reason == ("non_finite" if not math.isfinite(value) else "out_of_range")
    assert err.value.field in str(err.value)


def _open(n: int = 3, seeds: int = 2) -> pb.SessionOpen:
    layers = [
        graph_pb2.LayerSpec(layer_id=f"l{i}", input_size=4, output_size=4, seed_count=seeds)
        for i in range(n)
    ]
    return pb.SessionOpen(
        host_id="h",
        topology=graph_pb2.Topology(layers=layers, edges=[graph_pb2.Edge(source=0, target=1)]),
        kernels=[graph_pb2.KernelSpec(kernel_id="k")],
    )


def _refused(fn: object, *args: object) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        fn(*args)  # type: ignore[operator]
    return err.value


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda m: m.ClearField("host_id"), "session_open.host_id", "missing"),
        (lambda m: m.ClearField("topology"), "session_open.topology", "missing"),
        (
            lambda m: setattr(m.topology.layers[2], "layer_id", "l0"),
            "session_open.topology.layers[2].layer_id",
            "duplicate_id",
        ),
        (
            lambda m: setattr(m.topology.layers[1], "input_size", 0),
            "session_open.topology.layers[1].input_size",
            "out_of_range",
        ),
        (
            lambda m: setattr(m.topology.layers[0], "seed_count", 65),
            "session_open.topology.layers[0].seed_count",
            "too_large",
        ),
        (
            lambda m: setattr(m.topology.layers[0], "layer_type", 99),
            "session_open.topology.layers[0].layer_type",
            "out_of_range",
        ),
        (
            lambda m: m.topology.edges.add(source=0, target=3),
            "session_open.topology.edges[1].target",
            "bad_edge",
        ),
        (
            lambda m: m.topology.edges.add(source=2, target=2),
            "session_open.topology.edges[1]",
            "bad_edge",
        ),
        (
            lambda m: m.topology.edges.add(source=0, target=1),
            "session_open.topology.edges[1]",
            "bad_edge",
        ),
        (
            lambda m: m.kernels.add(kernel_id="k"),
            "session_open.kernels[1].kernel_id",
            "duplicate_id",
        ),
        (
            lambda m: setattr(m, "host_id", "x" * 129),
            "session_open.host_id",
            "too_large",
        ),
        (
            lambda m: setattr(m.topology.layers[1], "parameter_count", 2**64 - 1),
            "session_open.topology.layers[1].parameter_count",
            "out_of_range",
        ),
        (
            lambda m: setattr(m.kernels[0], "parameter_count", 2**63),
            "session_open.kernels[0].parameter_count",
            "out_of_range",
        ),
        (
            lambda m: setattr(m, "host_id", "a\x00b"),
            "session_open.host_id",
            "bad_id",
        ),
    ],
)
def test_bad_session_open_fields(mutate: object, field: str, reason: str) -> None:
    msg = _open()
    mutate(msg)  # type: ignore[operator]
    err = _refused(validate_session_open, msg, LIMITS)
    assert (err.field, err.reason) == (field, reason)


def test_size_limits() -> None:
    small = Limits(max_nodes_per_graph=2, max_edges_per_graph=0, max_kernels=0)
    assert _refused(validate_session_open, _open(), small).field == "session_open.topology.layers"
    ok_nodes = Limits(max_nodes_per_graph=3, max_edges_per_graph=0)
    assert _refused(validate_session_open, _open(), ok_nodes).field == "session_open.topology.edges"
    no_k = Limits(max_kernels=0)
    assert _refused(validate_session_open, _open(), no_k).field == "session_open.kernels"
    info = validate_session_open(_open(), LIMITS)
    frame = pb.TelemetryFrame(
        step=1, signals=[health_pb2.HealthSignal(layer_id=f"l{i}") for i in range(3)]
    )
    err = _refused(validate_frame, frame, info, Limits(max_signals_per_frame=2), None)
    assert (err.field, err.reason) == ("frame.signals", "too_large")


def test_bad_frame_fields() -> None:
    info = validate_session_open(_open(), LIMITS)

    def frame(**sig: object) -> pb.TelemetryFrame:
        base: dict[str, object] = {"layer_id": "l1", "total_seeds": 2}
        base.update(sig)
        return pb.TelemetryFrame(step=5, signals=[health_pb2.HealthSignal(**base)])  # type: ignore[arg-type]

    cases = [
        (frame(layer_id="nope"), "frame.signals[0].layer_id", "unknown_layer"),
        (frame(total_seeds=3), "frame.signals[0].total_seeds", "out_of_range"),
        (frame(active_seeds=3), "frame.signals[0].active_seeds", "out_of_range"),
        (frame(seed_states=[1]), "frame.signals[0].seed_states", "out_of_range"),
        (frame(seed_states=[1, 42]), "frame.signals[0].seed_states[1]", "out_of_range"),
        (frame(step=-1), "frame.signals[0].step", "out_of_range"),
    ]
    for msg, field, reason in cases:
        err = _refused(validate_frame, msg, info, LIMITS, None)
        assert (err.field, err.reason) == (field, reason), msg
    dup = frame()
    dup.signals.add(layer_id="l1")
    assert _refused(validate_frame, dup, info, LIMITS, None).field == "frame.signals[1].layer_id"
    err = _refused(validate_frame, frame(), info, LIMITS, 6)
    assert (err.field, err.reason) == ("frame.step", "step_regressed")
    clock = pb.TelemetryFrame(step=5, client_clock_us=-1)
    assert _refused(validate_frame, clock, info, LIMITS, None).field == "frame.client_clock_us"
    long_tag = pb.TelemetryFrame(step=5, request_id="r" * 65)
    assert _refused(validate_frame, long_tag, info, LIMITS, None).field == "frame.request_id"


def test_outcome_and_decide() -> None:
    err = _refused(validate_outcome, pb.DecisionOutcome(), LIMITS)
    assert err.field == "outcome.decision_id"
    err = _refused(validate_outcome, pb.DecisionOutcome(decision_id="d", reward=math.nan), LIMITS)
    assert (err.field, err.reason) == ("outcome.reward", "non_finite")
    err = _refused(validate_outcome, pb.DecisionOutcome(decision_id="d", detail="x" * 300), LIMITS)
    assert err.field == "outcome.detail"
    validate_outcome(pb.DecisionOutcome(decision_id="d", reward=-3.5), LIMITS)

    assert _refused(validate_decide, pb.DecideRequest(), LIMITS).field == "state"
    topo = _open().topology
    state = graph_pb2.ModelGraphState(
        topology=topo,
        step=3,
        signals=[
            health_pb2.HealthSignal(layer_id="l0", step=3),
            health_pb2.HealthSignal(layer_id="l0", step=2),
        ],
    )
    err = _refused(validate_decide, pb.DecideRequest(state=state), LIMITS)
    assert (err.field, err.reason) == ("state.signals[1].step", "step_regressed")
    state.signals[1].step = 4  # measured after the state's own step
    err = _refused(validate_decide, pb.DecideRequest(state=state), LIMITS)
    assert (err.field, err.reason) == ("state.signals[1].step", "out_of_range")
    assert "4 > state step 3" in str(err)
    state.step = 4
    validate_decide(pb.DecideRequest(state=state), LIMITS)
    state.step = -2
    assert _refused(validate_decide, pb.DecideRequest(state=state), LIMITS).field == "state.step"


@settings(max_examples=150, deadline=None)
@given(
    opens_and_frames(),
    st.sampled_from(
        [*BAD_FLOAT_FIELDS, ("total_seeds", 70), ("active_seeds", 9), ("step", -3), ("none", 0)]
    ),
    st.data(),
)
def test_fast_path_agrees_with_per_field_checks(
    case: tuple[pb.SessionOpen, pb.TelemetryFrame], bad: tuple[str, float], data: st.DataObject
) -> None:
    open_, frame = case
    info = validate_session_open(open_, LIMITS)
    if frame.signals and bad[0] != "none":
        i = data.draw(st.integers(0, len(frame.signals) - 1))
        setattr(frame.signals[i], bad[0], type(getattr(frame.signals[i], bad[0]))(bad[1]))
    try:
        for sig in frame.signals:
            validate_signal(sig, "s", info, LIMITS)
        slow_ok = True
    except ValidationError:
        slow_ok = False
    fast_ok = signals_look_valid(frame.signals, info, LIMITS, unique=True)
    assert fast_ok == slow_ok


@st.composite
def states_with_history(draw: st.DrawFn) -> graph_pb2.ModelGraphState:
    """Several signals per layer, steps in any order (so some regress), maybe a bad one."""
    topo = draw(topologies(max_layers=6))
    sigs: list[health_pb2.HealthSignal] = []
    for _ in range(draw(st.integers(0, 24))):
        layer = topo.layers[draw(st.integers(0, len(topo.layers) - 1))]
        sigs.append(draw(signals(layer, draw(st.integers(0, 40)))))
    bad = draw(st.booleans())
    if sigs and bad:
        name, value = draw(
            st.sampled_from([*BAD_FLOAT_FIELDS, ("total_seeds", 70), ("active_seeds", 9)])
        )
        sig = sigs[draw(st.integers(0, len(sigs) - 1))]
        setattr(sig, name, type(getattr(sig, name))(value))
    # (sometimes below a signal's step: a signal newer than its state is refused)
    return graph_pb2.ModelGraphState(topology=topo, signals=sigs, step=draw(st.integers(36, 44)))


@settings(max_examples=150, deadline=None)
@given(states_with_history())
def test_state_fast_path_agrees_with_per_field_checks(state: graph_pb2.ModelGraphState) -> None:
    """Decide's vectorised history check accepts exactly what the per-field loop accepts,
    and a refusal names the same field either way."""
    from tamiyo_server.validation import _check_state_signals

    def outcome(fn: object) -> tuple[str, str] | None:
        try:
            fn()  # type: ignore[operator]
        except ValidationError as e:
            return (e.field, e.reason)
        return None

    info = validate_session_open(pb.SessionOpen(host_id="h", topology=state.topology), LIMITS)
    fast = outcome(lambda: validate_decide(pb.DecideRequest(state=state), LIMITS))
    slow = outcome(
        lambda: _check_state_signals(state.signals, "state.signals", info, LIMITS, state.step)
    )
    assert fast == slow


@settings(max_examples=60, deadline=None)
@given(states_with_history(), st.integers(1, 6))
def test_decided_columns_give_the_same_snapshot(
    state: graph_pb2.ModelGraphState, window: int
) -> None:
    """Decide can pass validation's decoded signals to snapshot_from_state: same snapshot."""
    from tamiyo.policy.snapshot import snapshot_from_state
    from tamiyo_server.validation import validate_decide_decoded

    try:
        _, cols = validate_decide_decoded(pb.DecideRequest(state=state), LIMITS)
    except ValidationError:
        return
    assert snapshot_from_state(state, window, cols).equals(snapshot_from_state(state, window))
