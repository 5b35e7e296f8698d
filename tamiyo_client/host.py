"""A host model as Tamiyo sees it: its KasminaLayers, topology, kernels and decisions.

``KasminaHost`` is the glue a training loop uses between the model and the client:
``session_open()`` for the client, ``frame_data()`` (or ``frame()``, the same as a
protobuf message) each reporting step, ``apply()`` for each
decision that arrives (between steps, on the training thread), then ``outcome()``. In a
data-parallel job also ``sync_seeds()`` once per step on every rank (``process_group``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.frame_data import FrameData, SignalForm
from tamiyo_client.kasmina import KasminaLayer, SeedError, multi_rank, warn_unsynchronized
from tamiyo_client.kernels import DEFAULT_KERNELS, get_kernel, kernel_specs
from tamiyo_client.topology import Selector, derive_topology, wrap_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.algorithms.join import Join, Joinable

    from tamiyo_client.seed_sync import SeedEvent, SeedSync


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
    new_parameter_names: list[str] = field(default_factory=list)

    @property
    def new_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for each new parameter, named as ``model.named_parameters()``
        names them (``<layer_id>.seed_kernels.<seed>.<name>``): what ``extend_optimizer``
        needs for an optimizer built from ``named_parameters()``, whose groups carry
        ``param_names``, so its state_dict names the kernel's parameters."""
        return list(zip(self.new_parameter_names, self.new_parameters, strict=True))


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau

# Scheduler attributes that hold one entry per param group (LambdaLR's lr_lambdas,
# CyclicLR's max_lrs, ReduceLROnPlateau's min_lrs, ...): a new group needs its own entry,
# or the scheduler's next step fails (zip(..., strict=True)) or skips the group.
_PER_GROUP = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
)
# The learning rates a group or a scheduler keeps for a group besides ``lr``: an ``lr``
# override scales them too, or the next scheduler step recomputes ``lr`` from the host's
# values and the override is lost (OneCycleLR rebuilds it from max_lr / min_lr).
_GROUP_LRS = ("initial_lr", "max_lr", "min_lr")
_SCHEDULER_LRS = ("base_lrs", "min_lrs", "max_lrs")

Named = tuple[str, nn.Parameter]


def extend_optimizer(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter] | Sequence[Named],
    scheduler: Scheduler | Sequence[Scheduler] | None = None,
    *,
    like: int = 0,
    **group: Any,
) -> None:
    """Make ``optimizer`` train a newly germinated kernel, consistently with its schedule.

    Adds one param group whose hyper-parameters are a copy of ``param_groups[like]``
    as they are now: the current (scheduled) ``lr``, and what schedulers keep in a group
    (``initial_lr``, OneCycleLR's ``max_lr`` / ``min_lr``, momentum or betas, weight decay,
    ...), then ``group``'s overrides. Why: a group built from the optimizer's defaults
    lacks the keys a scheduler built earlier put into every group (OneCycleLR:
    ``KeyError: 'max_lr'`` at the next ``step()``) and trains at the initial lr, not the
    decayed one. Tensor values (a capturable Adam's ``lr``) are copied, not shared: an
    in-place update of one group's ``lr`` would otherwise change both.

    An ``lr=`` override is the kernel group's lr now, and every other learning rate kept
    for the group (``initial_lr``, ``max_lr``, ``min_lr``, the schedulers' ``base_lrs``,
    ``max_lrs``, ``min_lrs``) is scaled by ``lr / param_groups[like]["lr"]``, so the kernel
    follows the host's schedule at that ratio; why: a scheduler recomputes ``lr`` from those
    values at its next step, and an override of ``lr`` alone would be lost then
    (OneCycleLR) or jump (LambdaLR). When the host's lr is 0 the override is the group's
    base lr (``initial_lr``) instead. Keys given explicitly are never scaled.

    Every scheduler of the optimizer gets a matching per-group entry (``base_lrs``,
    LambdaLR's ``lr_lambdas``, ...; copied from entry ``like``), so the new group
    follows the same schedule: pass them as ``scheduler`` (one, or a sequence; the
    children of SequentialLR / ChainedScheduler are included). When ``scheduler`` is None,
    the schedulers that reference ``optimizer`` are found by the garbage collector's
    referrer scan (a few ms; adaptations are rare), so a loop that does not pass them
    still does not crash.

    ``params`` may be ``(name, parameter)`` pairs (``ApplyResult.new_named_parameters``),
    as for an optimizer built from ``model.named_parameters()``: torch refuses to mix
    groups with and without ``param_names``, so bare parameters added to such an
    optimizer are named ``tamiyo.group<g>.<i>``.

    Raises ValueError for LBFGS, which supports a single param group (its next
    ``step()`` would fail): rebuild it from ``model.parameters()`` after an adaptation."""
    fresh = [p for p in params if (p[1] if isinstance(p, tuple) else p).requires_grad]
    if not fresh:
        return
    groups = optimizer.param_groups
    n = len(groups)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "extend_optimizer: LBFGS supports only one param group, so it cannot train a "
            "new kernel in a group of its own; rebuild the optimizer from "
            "model.parameters() (kernels included) after an adaptation"
        )
    if not 0 <= like < n:
        raise IndexError(f"extend_optimizer: like={like} but the optimizer has {n} groups")
    host = groups[like]
    new = {k: _copy(v) for k, v in host.items() if k not in ("params", "param_names")}
    ratio = _lr_ratio(host, group)
    if ratio is not None:
        for key in _GROUP_LRS:
            if key in new and key not in group:
                new[key] = new[key] * ratio
    elif "lr" in group and "initial_lr" in new and "initial_lr" not in group:
        new["initial_lr"] = _copy(group["lr"])
    new.update({k: _copy(v) for k, v in group.items()})
    if isinstance(host.get("lr"), torch.Tensor) and not isinstance(new["lr"], torch.Tensor):
        new["lr"] = torch.as_tensor(new["lr"]).to(host["lr"])  # the optimizer's own type
    named = [
        p if isinstance(p, tuple) else (f"tamiyo.group{n}.{i}", p) for i, p in enumerate(fresh)
    ]
    entries: list[Any] = named if "param_names" in host else [p for _, p in named]
    schedulers = _schedulers_of(optimizer) if scheduler is None else _flatten(scheduler)
    optimizer.add_param_group({"params": entries, **new})
    for sched in schedulers:
        for attr in _PER_GROUP:
            values = getattr(sched, attr, None)
            if not isinstance(values, list) or len(values) != n:
                continue  # not per group, or already extended
            if attr == "base_lrs" and "initial_lr" in new:
                values.append(_copy(new["initial_lr"]))
            elif attr == "_last_lr":
                values.append(_copy(new.get("lr", values[like])))
            elif ratio is not None and attr in _SCHEDULER_LRS:
                values.append(values[like] * ratio)
            elif attr == "base_lrs" and "lr" in group:
                values.append(_copy(group["lr"]))
            else:
                values.append(_copy(values[like]))


def _copy(value: Any) -> Any:
    """``value`` with its tensors copied (also inside a tuple such as Adam's betas), so
    the new group shares no tensor with the group it copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _lr_ratio(host: dict[str, Any], group: dict[str, Any]) -> float | None:
    """``group["lr"] / host["lr"]`` (see extend_optimizer), or None without an ``lr``
    override or when the host's lr is 0 (no ratio)."""
    if "lr" not in group or "lr" not in host:
        return None
    base = float(host["lr"])
    return float(group["lr"]) / base if base else None


def _flatten(scheduler: Scheduler | Sequence[Scheduler]) -> list[Scheduler]:
    """The schedulers given, with the children of SequentialLR / ChainedScheduler, once
    each (each keeps its own per-group lists)."""
    todo = list(scheduler) if isinstance(scheduler, Sequence) else [scheduler]
    seen: dict[int, Scheduler] = {}
    while todo:
        s = todo.pop()
        if id(s) not in seen:
            seen[id(s)] = s
            todo.extend(getattr(s, "_schedulers", []))
    return list(seen.values())


def _schedulers_of(optimizer: torch.optim.Optimizer) -> list[Scheduler]:
    """The live schedulers whose ``optimizer`` is ``optimizer`` (see extend_optimizer)."""
    found: list[Scheduler] = []
    for ref in gc.get_referrers(optimizer):
        owners = [ref]
        if isinstance(ref, dict):  # an instance __dict__ (Python versions without inline
            owners = gc.get_referrers(ref)  # attribute values): its owner holds it
        found.extend(
            o
            for o in owners
            if isinstance(o, Scheduler) and getattr(o, "optimizer", None) is optimizer
        )
    return _flatten(found) if found else []


class KasminaHost:
    """The KasminaLayers of one model plus what Tamiyo needs to know about them.

    ``process_group``: this model is a data-parallel replica over that group (the DP
    group; ``torch.distributed.group.WORLD`` for plain DDP): every rank of it holds the
    same wrapped layers and applies the same decisions. Then its seeds are culled, aged
    and fossilized only by ``sync_seeds()``, which every rank calls once per step, with
    one all-reduce over the group every ``sync_every``-th call (README, "Multi-rank
    training"). None (the default, and what ``group.WORLD`` is without an initialised
    group): each process culls and ages its own seeds in ``forward``, as a lone process
    does (pipeline stages, or layers on some ranks only, with no replica to agree with)."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, KasminaLayer],
        *,
        host_id: str,
        model_id: str = "",
        kernel_ids: Sequence[str] = DEFAULT_KERNELS,
        process_group: ProcessGroup | None = None,
        sync_every: int = 1,
    ) -> None:
        if not layers:
            raise ValueError("KasminaHost needs at least one KasminaLayer")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
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
        self._sync: SeedSync | None = None
        if process_group is not None:
            from tamiyo_client.seed_sync import SeedSync  # (torch.distributed's Join)

            self._sync = SeedSync(list(layers.values()), process_group, sync_every)

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
        layer_types: Mapping[str, graph_pb2.LayerType.ValueType] | None = None,
        process_group: ProcessGroup | None = None,
        sync_every: int = 1,
    ) -> KasminaHost:
        """Wrap the layers ``select`` picks (see ``wrap_layers``; ``layer_types``
        overrides the type of some, e.g. a pre-LN block as LAYER_TYPE_LINEAR so it gets
        seeds) and describe the model. ``process_group``, ``sync_every``: see the class."""
        layers = wrap_layers(model, select, config, layer_types)
        return cls(
            model,
            layers,
            host_id=host_id,
            model_id=model_id,
            kernel_ids=kernel_ids,
            process_group=process_group,
            sync_every=sync_every,
        )

    def sync_seeds(self) -> list[SeedEvent]:
        """Agree this step's seed changes with the other ranks of ``process_group``: a
        kernel whose output was non-finite on any rank's data since the last sync is
        culled on every rank, and seeds age by the most training forwards any rank ran
        (then fossilize, at the same call on every rank). Returns what was culled or
        fossilized. One all-reduce (MAX) of ``Σ layers (1 + 2·num_seeds)`` ints every
        ``sync_every``-th call, and on CUDA one device-to-host read of it.

        Call it on every rank once per training step, after the step's backward (and
        ``opt.step()``), then re-wrap DDP if ``params_version`` changed (README,
        "Multi-rank training"): every rank must call it equally often, whatever it ran
        (a rank that skipped a layer still calls it; under ``join()`` a rank out of
        inputs takes part in the others' calls). A no-op returning [] without a
        ``process_group`` (a lone process runs the same loop)."""
        return [] if self._sync is None else self._sync.step()

    def join(self, *joinables: Joinable, **kwargs: Any) -> Join:
        """``torch.distributed.algorithms.Join([*joinables, <this host's sync>],
        **kwargs)``: uneven inputs, as ``ddp.join()`` but with ``sync_seeds()`` shadowed
        too (``with host.join(ddp): ...``). The sync goes last: a rank out of inputs runs
        the joinables' hooks in this order, once per iteration of the others, who run
        DDP's collectives (forward, backward) before ``sync_seeds()``. Without a
        ``process_group``, just the joinables given."""
        from torch.distributed.algorithms.join import Join

        extra = [] if self._sync is None else [self._sync]
        return Join([*joinables, *extra], **kwargs)

    @property
    def params_version(self) -> int:
        """Changes whenever the model's trainable kernel parameters do: a kernel loaded
        (``apply``), fossilized, culled or restored from a checkpoint. A multi-rank job
        rebuilds its ``DistributedDataParallel`` when it changes (README, "Multi-rank
        training"): with a ``process_group`` every rank sees the same value at the same
        step (seeds change only in ``apply`` and ``sync_seeds``)."""
        return sum(layer.params_version for layer in self.layers.values())

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

    def apply(
        self, decision: decision_pb2.AdaptationDecision, *, synchronized: bool = False
    ) -> ApplyResult:
        """Carry out one decision. NO_OP is trivially applied; LOAD_KERNEL germinates the
        seed it names. Never raises for a bad decision: the result says why not.

        ``synchronized``: this decision is applied on every rank of a data-parallel job,
        which re-wraps DDP afterwards (README, "Multi-rank training"). Without it, a
        LOAD_KERNEL in a multi-rank job, or into a model that is (or holds) a DDP / FSDP
        module, warns (``DistributedAdaptationWarning``): DDP would not synchronise the
        kernel and the ranks would diverge silently."""
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
        if not synchronized and (why := self._distributed()):
            warn_unsynchronized(f"apply({decision.decision_id!r})", why)
            synchronized = True  # warned once, here
        try:
            params = layer.germinate(
                decision.seed_index, decision.kernel_id, synchronized=synchronized
            )
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
            [
                f"{layer.layer_id}.seed_kernels.{decision.seed_index}.{name}"
                for name, _ in layer.seed_kernels[str(decision.seed_index)].named_parameters()
            ],
        )
        self.applied.append(result)
        return result

    def _distributed(self) -> str:
        """Why a germination here may not reach every rank ("" when it will)."""
        if ranks := multi_rank():
            return f"this process is {ranks}"
        wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel,)
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

            wrappers += (FSDPModule, FullyShardedDataParallel)
        for m in self.model.modules():
            if isinstance(m, wrappers):
                return f"the model holds a {type(m).__name__}"
        return ""

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
