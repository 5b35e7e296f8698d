"""A host model as Tamiyo sees it: its KasminaLayers, topology, kernels and decisions.

``KasminaHost`` is the glue a training loop uses between the model and the client:
``session_open()`` for the client, ``frame_data()`` (or ``frame()``, the same as a
protobuf message) each reporting step, ``apply()`` for each
decision that arrives (between steps, on the training thread), then ``outcome()``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.frame_data import FrameData, SignalForm
from tamiyo_client.kasmina import KasminaLayer, SeedError
from tamiyo_client.kernels import DEFAULT_KERNELS, get_kernel, kernel_specs
from tamiyo_client.topology import Selector, derive_topology, wrap_layers


@dataclass(frozen=True)
class ApplyResult:
    """What ``KasminaHost.apply`` did with one decision."""

    decision_id: str
    applied: bool
    detail: str
    layer_id: str = ""
    seed_index: int = 0
    kernel_id: str = ""
    new_parameters: list[nn.Parameter] = field(default_factory=list)


def extend_optimizer(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], **group: Any
) -> None:
    """Make ``optimizer`` train a newly germinated kernel: adds one param group (with the
    optimizer's defaults unless overridden in ``group``, e.g. ``lr=1e-3``)."""
    fresh = [p for p in params if p.requires_grad]
    if fresh:
        optimizer.add_param_group({"params": fresh, **group})


class KasminaHost:
    """The KasminaLayers of one model plus what Tamiyo needs to know about them."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, KasminaLayer],
        *,
        host_id: str,
        model_id: str = "",
        kernel_ids: Sequence[str] = DEFAULT_KERNELS,
    ) -> None:
        if not layers:
            raise ValueError("KasminaHost needs at least one KasminaLayer")
        for kid in kernel_ids:
            get_kernel(kid)  # unknown ids fail here, not when a decision arrives
        self.model = model
        self.layers = layers
        self.host_id = host_id
        self.model_id = model_id
        self.kernel_ids = tuple(kernel_ids)
        self.topology, self.edge_method = derive_topology(model, layers)
        sizes = [(ly.in_features, ly.out_features) for ly in layers.values() if ly.num_seeds]
        self.kernels = kernel_specs(self.kernel_ids, sizes)
        self.applied: list[ApplyResult] = []

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        select: Selector,
        *,
        host_id: str,
        model_id: str = "",
        kernel_ids: Sequence[str] = DEFAULT_KERNELS,
        config: KasminaConfig | None = None,
    ) -> KasminaHost:
        """Wrap the layers ``select`` picks (see ``wrap_layers``) and describe the model."""
        layers = wrap_layers(model, select, config)
        return cls(model, layers, host_id=host_id, model_id=model_id, kernel_ids=kernel_ids)

    def session_open(self, budget: pb.SessionBudget | None = None) -> pb.SessionOpen:
        return pb.SessionOpen(
            host_id=self.host_id,
            model_id=self.model_id,
            topology=self.topology,
            kernels=self.kernels,
            budget=budget,
        )

    def frame_data(
        self, step: int, epoch: int, want_decision: bool = False, request_id: str = ""
    ) -> FrameData:
        """Collect every layer's signal for the window since the previous frame, as
        plain values: what a training loop passes to ``send_frame`` (the client builds
        the protobuf on its own thread). Layers that did not run in that window send no
        signal (the server marks them stale).

        ``step``: one global training-step counter that never decreases (not the batch
        index within an epoch): the server refuses a frame whose step is below the
        previous one. Call it after ``backward()`` and before the next ``zero_grad()``,
        or gradient norms read 0."""
        now = time.time()
        signals = [
            sig
            for layer in self.layers.values()
            if (sig := layer.collect_values(step, epoch, now)) is not None
        ]
        return FrameData(step, epoch, signals, want_decision, request_id)

    def frame(
        self,
        step: int,
        epoch: int,
        want_decision: bool = False,
        request_id: str = "",
        form: SignalForm = "message",
    ) -> pb.TelemetryFrame:
        """``frame_data(...)`` as a ``TelemetryFrame`` built here (HealthSignal messages
        by default, readable; ``form="columns"`` for HealthSignalColumns)."""
        return self.frame_data(step, epoch, want_decision, request_id).to_frame(form)

    def apply(self, decision: decision_pb2.AdaptationDecision) -> ApplyResult:
        """Carry out one decision. NO_OP is trivially applied; LOAD_KERNEL germinates the
        seed it names. Never raises for a bad decision: the result says why not."""
        did = decision.decision_id
        if decision.action == decision_pb2.ADAPTATION_ACTION_NO_OP:
            return ApplyResult(did, True, "no-op")
        if decision.action != decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL:
            name = decision_pb2.AdaptationAction.Name(decision.action)
            return ApplyResult(did, False, f"action {name} is not supported by this host")
        layer = self.layers.get(decision.target_layer_id)
        if layer is None:
            return ApplyResult(did, False, f"unknown target_layer_id {decision.target_layer_id!r}")
        if decision.kernel_id not in self.kernel_ids:
            return ApplyResult(did, False, f"kernel_id {decision.kernel_id!r} was not offered")
        try:
            params = layer.germinate(decision.seed_index, decision.kernel_id)
        except SeedError as exc:
            return ApplyResult(did, False, str(exc), layer.layer_id, decision.seed_index)
        result = ApplyResult(
            did,
            True,
            f"loaded {decision.kernel_id} into {layer.layer_id}[{decision.seed_index}]",
            layer.layer_id,
            decision.seed_index,
            decision.kernel_id,
            params,
        )
        self.applied.append(result)
        return result

    @staticmethod
    def outcome(result: ApplyResult, reward: float | None = None) -> pb.DecisionOutcome:
        """The DecisionOutcome to report for ``result`` (reward optional, host-defined)."""
        out = pb.DecisionOutcome(
            decision_id=result.decision_id, applied=result.applied, detail=result.detail[:256]
        )
        if reward is not None:
            out.reward = reward
        return out

    def topology_summary(self) -> str:
        """One line per layer for logs: id, type, widths, seeds."""
        lines = []
        for spec in self.topology.layers:
            kind = graph_pb2.LayerType.Name(spec.layer_type).removeprefix("LAYER_TYPE_")
            lines.append(
                f"{spec.layer_id}: {kind} {spec.input_size}->{spec.output_size}"
                f" params={spec.parameter_count} seeds={spec.seed_count}"
            )
        return "\n".join(lines)
