"""The seed slots of a KasminaLayer: germinating, training, fossilizing, culling kernels.

A seed is a slot for an adaptation kernel (``tamiyo_client.kernels``). Its lifecycle:
DORMANT → (``germinate``) GERMINATED → (first training forward) TRAINING →
(``fossilize_after_steps`` training forwards) FOSSILIZED, when its parameters are
frozen. A kernel whose output is ever non-finite in a training forward is CULLED
(removed; the slot can be germinated again): on the CPU at once, on CUDA at the next
training forward that is a multiple of ``cull_check_every``; until then every such
output is left out (see ``_add_seeds``). The layer's output is ``base(x) + Σ
kernel_i(x)`` over active seeds whose output is finite.

In a data-parallel job (``KasminaHost(process_group=...)``, a "synced" layer) nothing of
this happens in ``forward``: failures and training forwards are only counted there, and
the host's step-boundary sync (``tamiyo_client.seed_sync``) agrees them over the group
and culls, ages and fossilizes on every rank at once (``_sync_collect`` /
``_sync_apply``), so that the ranks' seeds and parameters never differ.

Kept apart from ``tamiyo_client.kasmina`` (wrapping and measuring a module) because the
seed lifecycle, its checkpointing and its multi-rank hazard are a job of their own.
``SeedSlots`` is ``KasminaLayer``'s base class, not used alone: ``KasminaLayer.__init__``
sets the attributes declared on it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import health_pb2
from tamiyo_client import finite_guard
from tamiyo_client.finite_guard import add_guarded, add_masked
from tamiyo_client.kernels import get_kernel

if TYPE_CHECKING:
    from tamiyo_client.kasmina import _Tally
    from tamiyo_client.telemetry import WindowAccumulator

DORMANT = health_pb2.SEED_LIFECYCLE_STATE_DORMANT
GERMINATED = health_pb2.SEED_LIFECYCLE_STATE_GERMINATED
TRAINING = health_pb2.SEED_LIFECYCLE_STATE_TRAINING
FOSSILIZED = health_pb2.SEED_LIFECYCLE_STATE_FOSSILIZED
CULLED = health_pb2.SEED_LIFECYCLE_STATE_CULLED
ACTIVE_STATES = frozenset({GERMINATED, TRAINING, FOSSILIZED})


class SeedError(ValueError):
    """A decision cannot be applied to this layer (bad seed index, busy seed, ...)."""


class DistributedAdaptationWarning(UserWarning):
    """A kernel was germinated in a multi-rank job without ``synchronized=True``."""


def world_size() -> int:
    """The ranks in ``torch.distributed``'s initialised default group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def multi_rank() -> str:
    """ "rank r of w" when this process is one of several in an initialised
    ``torch.distributed`` group, else ""."""
    if world_size() > 1:
        return f"rank {torch.distributed.get_rank()} of {world_size()}"
    return ""


def warn_unsynchronized(where: str, why: str) -> None:
    """Warn that a germination may leave the ranks of a data-parallel job diverging."""
    warnings.warn(
        f"{where}: a kernel was germinated while {why}. DistributedDataParallel / FSDP "
        "wrappers built before this call do not know its parameters: they are never "
        "all-reduced and the ranks diverge silently (and ranks with their own client may "
        "get different decisions). Decide on one rank, broadcast the decision, apply it "
        "on every rank, re-wrap the model in DDP, and pass synchronized=True (README, "
        "'Multi-rank training').",
        DistributedAdaptationWarning,
        stacklevel=3,
    )


def width(t: Any) -> int:
    """Last dimension of a tensor output (the first of a tuple), -1 if there is none."""
    t = t[0] if isinstance(t, tuple) and t else t
    return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.dim() else -1


def traced(*values: Any) -> bool:
    """Whether any of ``values`` (or the first element of a tuple) is a torch.fx Proxy:
    a symbolic trace, whose widths and outputs are not real."""
    for v in values:
        v = v[0] if isinstance(v, tuple) and v else v
        if isinstance(v, torch.fx.Proxy):
            return True
    return False


class SeedSlots(nn.Module):
    """``num_seeds`` slots for residual kernels ``[..., in] -> [..., out]`` added to the
    output of ``base``; the seed half of ``KasminaLayer``."""

    # Set by KasminaLayer.__init__.
    layer_id: str
    config: KasminaConfig
    base: nn.Module
    in_features: int
    out_features: int
    num_seeds: int
    seed_kernels: nn.ModuleDict
    seed_states: list[health_pb2.SeedLifecycleState.ValueType]
    seed_kernel_ids: list[str]
    seed_steps: list[int]
    adaptation_count: int
    _acc: WindowAccumulator
    _tally: _Tally
    _widths: tuple[int, int] | None  # last training forward's (in, out)
    _cull_every: int  # max(1, config.cull_check_every)

    def _refresh_params(self) -> None:
        """The set of trainable kernel parameters changed (a kernel loaded, fossilized,
        culled or restored): keep the kernel count (read on every forward) in step with
        ``seed_kernels`` and bump ``params_version``. The parameters themselves are not
        cached: ``load_state_dict(assign=True)``, ``to_empty()`` and parametrizations
        (weight_norm, pruning) replace Parameter objects, and a stale list read gradient
        norm 0; they are walked only when a frame reads them (once per sampled window)."""
        self._tally.kernels = len(self.seed_kernels)
        self._tally.params_version += 1

    @property
    def params_version(self) -> int:
        """A count that changes whenever this layer's trainable parameters do: a kernel
        germinated, fossilized (frozen), culled, or restored from a checkpoint. Why: a
        ``DistributedDataParallel`` built before such a change expects gradients the
        model no longer makes (or misses new ones) and fails at the next step; every
        rank sees the same count at the same step, so each rebuilds it at once
        (README, "Multi-rank training"; ``KasminaHost.params_version`` sums the layers)."""
        return self._tally.params_version

    # -- forward -------------------------------------------------------------------
    def _fits(self) -> str:
        """Why a residual kernel ``[..., in] -> [..., out]`` cannot be added to this
        layer's output ("" if it can): a block that reshapes its input (Flatten, then a
        Linear) is described by its Linear's widths, but its input is not ``[..., in]``."""
        if self._widths is None:
            return ""  # (no training forward yet: _add_seeds culls an unfit kernel then)
        got = self._widths
        if min(got) < 0:
            side = "input" if got[0] < 0 else "output"
            return (
                f"layer {self.layer_id!r}: its forward's {side} is not a tensor with a last "
                "dimension, nor a tuple whose first element is one (e.g. a block that "
                "returns a dict or a ModelOutput), so a kernel cannot be added to it; "
                "wrap a submodule that returns a tensor instead"
            )
        if got != (self.in_features, self.out_features):
            return (
                f"layer {self.layer_id!r}: its forward maps [..., {got[0]}] to "
                f"[..., {got[1]}], not [..., {self.in_features}] to [..., "
                f"{self.out_features}] as it was described (e.g. a block that reshapes its "
                "input, or whose first Linear does not take the block's input), so a kernel "
                "cannot be added to it"
            )
        return ""

    def _add_seeds(self, x: Any, y: Any) -> Any:
        """``y`` plus the output of every active kernel on ``x`` (to the first element of
        a tuple output), each left out unless all finite (``finite_guard``): a diverging
        kernel never reaches the output, the loss or any gradient.

        A training forward culls the failed seeds: on the CPU at once (a read is free);
        on CUDA it adds each flag to a per-seed device counter, read every
        ``cull_check_every`` training forwards (``_reap_nonfinite``). A synced layer (a
        data-parallel replica) always counts on the device, and the failed kernel gets
        zero gradients (DDP waits for a gradient of every parameter it holds); its
        counters are read by the host's sync only, at a step boundary where every rank
        of the group calls it: a collective here, keyed to a per-rank forward count,
        hung or aborted any job whose ranks do not run each layer equally often (review
        15b: pipeline stages, LayerDrop, DDP.join). Eval and no-grad forwards are
        guarded by a plain ``torch.where`` (traceable, exportable, vmap-able; else NaN
        reaches eval outputs) and never cull: evaluating must not change the model."""
        if width(x) != self.in_features or width(y) != self.out_features:
            # germinate refuses such layers once a training forward has shown it; a
            # kernel germinated before that is culled here (never break a forward).
            if self.training and torch.is_grad_enabled() and not traced(x, y):
                self._cull_unfit(x, y)
            return y
        tally = self._tally
        if tally.fossil_grads:
            self._drop_fossil_grads()
        if not (self.training and torch.is_grad_enabled()):
            for key, kernel in self.seed_kernels.items():
                if self.seed_states[int(key)] in ACTIVE_STATES:
                    y = add_masked(y, kernel, x)
            return y
        failed: list[int] = []
        synced = tally.synced
        host = finite_guard.reads_are_free(x) and not synced  # (by module: tests)
        for key, kernel in list(self.seed_kernels.items()):
            i = int(key)
            if self.seed_states[i] not in ACTIVE_STATES:
                continue
            y, ok = add_guarded(y, kernel, x, host=host)
            if host:
                if not bool(ok):  # (read on the CPU: free)
                    failed.append(i)
            else:
                self._acc.add_pending(i, ok)
        for i in failed:
            self._acc.add_error()
            self.cull(i)
        if not synced and self._acc.pending and tally.forwards % self._cull_every == 0:
            self._reap_nonfinite()
        return y

    def _reap_nonfinite(self) -> None:
        """Cull the seeds whose output was non-finite in a training forward since the last
        call: one device-to-host copy for all of them. One error per failed kernel, as
        when the first failure culled it: health is multiplied by ``error_decay`` per
        error (key -1: failed kernels removed since, each counted once). Local: a synced
        layer's counts are settled by the host's sync instead (``_sync_apply``)."""
        for i, n in self._acc.take_pending(self.num_seeds).items():
            if n and i < 0:
                self._acc.add_error(n)
            elif n and self.seed_states[i] in ACTIVE_STATES:
                self._acc.add_error()
                self.cull(i)

    # -- the host's step-boundary sync (synced layers) ------------------------------
    @property
    def sync_width(self) -> int:
        """Ints this layer adds to the host's sync vector: [failed kernels removed,
        failures of seed 0 … n-1, training forwards of seed 0 … n-1]; 0 without seeds."""
        return 1 + 2 * self.num_seeds if self.num_seeds else 0

    def _count_trained(self) -> None:
        """After a training forward of a synced layer: count it for every seed it trained
        (aged at the next sync, by the most any rank counted), and warn once when the
        host's sync seems never to be called (no cull nor fossilization would happen)."""
        tally = self._tally
        trained = tally.trained
        for i, state in enumerate(self.seed_states):
            if state in (GERMINATED, TRAINING):
                trained[i] += 1
        tally.unsynced += 1
        if tally.unsynced == tally.sync_limit:
            warnings.warn(
                f"layer {self.layer_id!r}: {tally.unsynced} training forwards since its host "
                "last synced its seeds: call host.sync_seeds() once per step on every rank "
                "(after the backward), or its seeds are never culled nor fossilized "
                "(README, 'Multi-rank training')",
                UserWarning,
                stacklevel=4,
            )

    def _sync_collect(
        self, local: list[int], at: int, keys: list[int], counts: list[torch.Tensor]
    ) -> None:
        """This rank's part of the sync vector, from ``at`` (see ``sync_width``): the
        training forwards and unfit seeds into ``local`` (host ints), the device failure
        counters as ``(position, counter)`` into ``keys`` / ``counts`` (not read here).
        Everything counted so far is handed over and cleared."""
        n = self.num_seeds
        for key, c in self._acc.drain_pending().items():
            keys.append(at + 1 + key)
            counts.append(c)
        tally = self._tally
        for i in tally.unfit:
            local[at + 1 + i] += 1
        tally.unfit.clear()
        for i, t in enumerate(tally.trained):
            local[at + 1 + n + i] = t
            tally.trained[i] = 0
        tally.unsynced = 0

    def _sync_apply(
        self, agreed: list[int]
    ) -> list[tuple[int, health_pb2.SeedLifecycleState.ValueType]]:
        """Settle this layer's part of the reduced sync vector (the maximum over the
        ranks, so the same on every rank): cull every seed that failed on any rank, then
        age every other training seed by the most training forwards any rank ran (a rank
        that skipped the layer, LayerDrop, or was joined ages it all the same), and
        fossilize those old enough. Returns ``(seed, new state)`` for each change."""
        n = self.num_seeds
        changed: list[tuple[int, health_pb2.SeedLifecycleState.ValueType]] = []
        if agreed[0]:
            self._acc.add_error(agreed[0])
        for i in range(n):
            if agreed[1 + i] and self.seed_states[i] in ACTIVE_STATES:
                self._acc.add_error()
                self.cull(i)
                changed.append((i, CULLED))
        for i in range(n):
            trained = agreed[1 + n + i] and self.seed_states[i] in (GERMINATED, TRAINING)
            if trained and self._age(i, agreed[1 + n + i]):
                changed.append((i, FOSSILIZED))
        if self._tally.fossil_grads:
            self._drop_fossil_grads()  # (the sync follows the step: see seed_sync)
        return changed

    def _cull_unfit(self, x: Any, y: Any) -> None:
        """Cull the GERMINATED seeds of a layer whose training forward cannot take a
        kernel (its output is a dict, or its widths differ from the description), with a
        warning. Why: such a kernel never runs, yet it would age to FOSSILIZED and be
        reported as an adaptation. Only GERMINATED seeds: a TRAINING or FOSSILIZED kernel
        has been added before, and one odd forward does not make it useless."""
        tally = self._tally
        unfit = [
            i
            for i, s in enumerate(self.seed_states)
            if s == GERMINATED and not tally.trained[i] and i not in tally.unfit
        ]
        if not unfit:
            return
        if tally.synced:  # culled on every rank at the host's next sync
            tally.unfit.update(unfit)
        else:
            for i in unfit:
                self.cull(i)
        self._widths = (width(x), width(y))
        warnings.warn(
            f"{self._fits() or f'layer {self.layer_id!r} cannot take a kernel'} "
            f"(seen at its first training forward since the germination); seed(s) "
            f"{unfit} culled{' at the next host.sync_seeds()' if tally.synced else ''}",
            UserWarning,
            stacklevel=2,
        )

    def _drop_fossil_grads(self) -> None:
        """Set the gradients of fossilized kernels to None, once, at the forward after
        they fossilized (their last backward has been stepped by then). Why: an
        optimizer skips a parameter whose ``.grad`` is None, but keeps applying momentum,
        Adam moments and weight decay to one whose grad is a zero tensor, which
        ``zero_grad(set_to_none=False)`` leaves; ``requires_grad_(False)`` alone does not
        stop that, and the seed would drift while reported frozen."""
        self._tally.fossil_grads = False
        for key, kernel in self.seed_kernels.items():
            if self.seed_states[int(key)] == FOSSILIZED:
                for p in kernel.parameters():
                    p.grad = None

    def _advance_seeds(self) -> None:
        """After a training forward: germinated seeds train, long-trained ones fossilize."""
        for i, state in enumerate(self.seed_states):
            if state in (GERMINATED, TRAINING):  # this forward trained the kernel
                self._age(i, 1)

    def _age(self, i: int, forwards: int) -> bool:
        """Seed ``i`` was trained by ``forwards`` more training forwards: it is TRAINING,
        or FOSSILIZED (frozen) once old enough; returns whether it fossilized."""
        self.seed_states[i] = TRAINING
        self.seed_steps[i] += forwards
        if self.seed_steps[i] < self.config.fossilize_after_steps:
            return False
        self.seed_states[i] = FOSSILIZED
        self.seed_kernels[str(i)].requires_grad_(False)
        self._tally.fossil_grads = True
        self._refresh_params()
        return True

    # -- seeds ---------------------------------------------------------------------
    @property
    def active_seeds(self) -> int:
        return sum(1 for s in self.seed_states if s in ACTIVE_STATES)

    def free_seed(self) -> int | None:
        """Index of a seed that can take a kernel (DORMANT or CULLED), or None."""
        for i, s in enumerate(self.seed_states):
            if s in (DORMANT, CULLED):
                return i
        return None

    def germinate(
        self, seed_index: int, kernel_id: str, *, synchronized: bool = False
    ) -> list[nn.Parameter]:
        """Load kernel ``kernel_id`` into seed ``seed_index``; return its new parameters
        (add them to the optimizer, see ``tamiyo_client.host.extend_optimizer``).

        In a multi-rank ``torch.distributed`` job this warns
        (``DistributedAdaptationWarning``) unless ``synchronized``: the caller applies
        the same decision on every rank and re-wraps DDP afterwards."""
        if not 0 <= seed_index < self.num_seeds:
            raise SeedError(
                f"layer {self.layer_id!r}: seed_index {seed_index} not in [0, {self.num_seeds})"
            )
        state = self.seed_states[seed_index]
        if state not in (DORMANT, CULLED):
            name = health_pb2.SeedLifecycleState.Name(state)
            raise SeedError(f"layer {self.layer_id!r}: seed {seed_index} is busy ({name})")
        try:
            kdef = get_kernel(kernel_id)
        except KeyError as exc:
            raise SeedError(str(exc.args[0])) from None
        if why := self._fits():
            raise SeedError(why)
        if not synchronized and (ranks := multi_rank()):
            warn_unsynchronized(f"layer {self.layer_id!r}", f"this process is {ranks}")
        ref = next(self.base.parameters(), None)
        kernel = kdef.build(self.in_features, self.out_features)
        if ref is not None:
            kernel = kernel.to(device=ref.device, dtype=ref.dtype)
        self._forget(seed_index)
        self.seed_kernels[str(seed_index)] = kernel
        self.seed_states[seed_index] = GERMINATED
        self.seed_kernel_ids[seed_index] = kernel_id
        self.seed_steps[seed_index] = 0
        self.adaptation_count += 1
        params = list(kernel.parameters())
        self._refresh_params()
        return params

    def get_extra_state(self) -> dict[str, Any]:
        """Seed bookkeeping saved in ``state_dict`` (plain ints and strings), so that a
        checkpoint of an adapted model loads into a freshly built, unadapted one."""
        return {
            "seed_states": [int(s) for s in self.seed_states],
            "seed_kernel_ids": list(self.seed_kernel_ids),
            "seed_steps": list(self.seed_steps),
            "adaptation_count": self.adaptation_count,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore every slot exactly as the checkpoint saved it: its kernel, lifecycle
        state and trainability (torch loads this before the children, so the kernels'
        weights are then filled from the same state_dict). Why each case: the checkpoint
        may come from a fresh model (build the kernels it had), or be a rollback of this
        live model to its own earlier checkpoint, whose slots may since have been filled
        (remove the kernel), refilled with another kernel (rebuild it, or the weights
        do not fit) or fossilized (train it again: a TRAINING seed whose parameters stay
        frozen would be reported as training and never train). A rebuilt kernel has new
        parameters: build the optimizer again after loading (README, "Checkpoints")."""
        states = [health_pb2.SeedLifecycleState.ValueType(s) for s in state["seed_states"]]
        if len(states) != self.num_seeds:
            raise ValueError(
                f"layer {self.layer_id!r}: checkpoint has {len(states)} seeds, layer has "
                f"{self.num_seeds}"
            )
        kernel_ids = list(state["seed_kernel_ids"])
        for i in range(self.num_seeds):  # (the restored kernels start with a clean slate)
            self._forget(i)
        for i, st in enumerate(states):
            key, kid = str(i), kernel_ids[i]
            if st not in ACTIVE_STATES:
                if key in self.seed_kernels:
                    del self.seed_kernels[key]
                continue
            if key not in self.seed_kernels or self.seed_kernel_ids[i] != kid:
                kernel = get_kernel(kid).build(self.in_features, self.out_features)
                ref = next(self.base.parameters(), None)
                if ref is not None:
                    kernel = kernel.to(device=ref.device, dtype=ref.dtype)
                self.seed_kernels[key] = kernel
            self.seed_kernels[key].requires_grad_(st != FOSSILIZED)
            if st == FOSSILIZED:
                self._tally.fossil_grads = True
        self._refresh_params()
        self.seed_states = states
        self.seed_kernel_ids = kernel_ids
        self.seed_steps = list(state["seed_steps"])
        self.adaptation_count = int(state["adaptation_count"])

    def cull(self, seed_index: int) -> None:
        """Remove the kernel of a failed seed; the slot becomes CULLED (reusable)."""
        self._forget(seed_index)
        del self.seed_kernels[str(seed_index)]
        self.seed_states[seed_index] = CULLED
        self._refresh_params()

    def _forget(self, seed_index: int) -> None:
        """The seed's kernel is being removed or replaced: what was counted for it (pending
        failures, as one error under key -1; training forwards since the last sync) is
        not the next kernel's."""
        self._acc.retire_pending(seed_index)
        self._tally.trained[seed_index] = 0
        self._tally.unfit.discard(seed_index)
