"""The reference KasminaLayer: wraps one ``nn.Module``, measures it, grows seeds.

Telemetry is measured around the wrapped module, whose own code is untouched:

- ``forward`` times each call (ms, host-side: on CUDA that is launch time unless the
  caller synchronises) and feeds the output into a ``WindowAccumulator`` (training mode
  only; every ``sample_every``-th training forward, counted across reporting windows, so
  a frame every step does not mean a measurement every step);
- the gradient norm is read from the parameters' ``.grad`` when a signal is collected
  after a sampled forward (see ``take_gradient_norm``).

Cost on the training thread matters (issue #8: the same step time with or without
Tamiyo). Measured on this 2-core VM, forward hooks cost tens of µs per layer per forward
(they force ``nn.Module``'s slow call path) and a gradient hook ~20 µs per parameter
per backward, so there are none: an unsampled forward costs two ``perf_counter`` calls
and a deque append, a sampled one a few numpy calls on at most ``sample_rows`` rows
(no torch ops on CPU, each of which costs ~10 µs of fixed overhead here).

The seeds (slots for adaptation kernels, their lifecycle and checkpointing) are
``tamiyo_client.seeds``, which ``KasminaLayer`` extends; what a module is (type, widths,
channel layout) is ``tamiyo_client.describe``. Their public names are re-exported here.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo_client.describe import channels_first, describe_module
from tamiyo_client.frame_data import SignalValues
from tamiyo_client.seeds import (
    ACTIVE_STATES,
    CULLED,
    DORMANT,
    FOSSILIZED,
    GERMINATED,
    TRAINING,
    DistributedAdaptationWarning,
    SeedError,
    SeedSlots,
    multi_rank,
    traced,
    warn_unsynchronized,
    width,
)
from tamiyo_client.telemetry import (
    WindowAccumulator,
    WindowStats,
    flatten_units,
    reference_health,
    squared_norm,
)

__all__ = [
    "ACTIVE_STATES",
    "CULLED",
    "DORMANT",
    "FOSSILIZED",
    "GERMINATED",
    "TRAINING",
    "DistributedAdaptationWarning",
    "KasminaLayer",
    "SeedError",
    "channels_first",
    "describe_module",
    "multi_rank",
    "warn_unsynchronized",
]

_F32_MAX = 3.0e38

_LINEAR = graph_pb2.LAYER_TYPE_LINEAR


class _Tally:
    """Per-forward counters, kept off the ``nn.Module``: its ``__setattr__`` checks for
    parameters, buffers and submodules and costs µs per assignment on the hot path."""

    __slots__ = (
        "forwards",
        "fossil_grads",
        "grad_due",
        "grad_norm",
        "health_key",
        "kernels",
        "last_health",
        "last_stats",
        "memory",
        "output_bytes",
        "params_version",
        "sync_limit",
        "synced",
        "trained",
        "unfit",
        "unsynced",
    )

    def __init__(self) -> None:
        self.forwards = 0  # training forwards since creation (drives sampling)
        self.kernels = 0  # len(seed_kernels), kept in step by _refresh_params
        self.params_version = 0  # bumped by _refresh_params: the trainable set changed
        self.fossil_grads = False  # a seed fossilized: drop its grads at the next forward
        self.output_bytes = 0  # of the latest sampled output
        self.grad_due = False  # a sampled forward ran since the gradients were read
        self.grad_norm: float | None = None  # the latest reading
        self.last_stats: WindowStats | None = None  # behind the latest signal
        self.last_health: float | None = None
        self.health_key: object = None  # what last_health was computed from
        self.memory: float | None = None  # memory_utilization as of the latest sample
        # A data-parallel replica (KasminaHost(process_group=...)): failures, ageing and
        # unfit kernels are counted here and settled by the host's sync (seed_sync).
        self.synced = False
        self.sync_limit = 0  # training forwards without a sync before it warns
        self.trained: list[int] = []  # per seed: training forwards since the last sync
        self.unfit: set[int] = set()  # seeds whose layer cannot take them (see _cull_unfit)
        self.unsynced = 0  # training forwards with seeds since the last sync


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The wrapped module's input: its first positional argument, else the first tensor
    keyword argument (``block(hidden_states=h)``), else None."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class KasminaLayer(SeedSlots):
    """``base`` plus ``num_seeds`` seed slots, reporting a ``HealthSignal`` on demand.

    Kernels are residual branches ``[..., in] -> [..., out]``, so only linear-like layers
    (LINEAR type: a Linear or a block of them) get seeds; others are measured with 0 seeds.
    """

    layer_id: str

    def __init__(
        self,
        base: nn.Module,
        layer_id: str,
        config: KasminaConfig | None = None,
        *,
        layer_type: graph_pb2.LayerType.ValueType | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        if config is not None and config.replicated_ranks:
            raise ValueError(
                "KasminaConfig.replicated_ranks (an all-reduce inside forward) was replaced "
                "by a step-boundary sync: pass process_group=<the data-parallel group> to "
                "KasminaHost.attach and call host.sync_seeds() after each step's backward "
                "(README, 'Multi-rank training')"
            )
        if not 1 <= len(layer_id) <= 128:
            raise ValueError(f"layer_id must be 1-128 chars, got {len(layer_id)}")
        if isinstance(base, KasminaLayer):
            raise ValueError(f"layer {layer_id!r}: {base.layer_id!r} is already a KasminaLayer")
        self.base = base
        self.layer_id = layer_id
        self.config = config or KasminaConfig()
        if layer_type is None or in_features is None or out_features is None:
            t, i, o = describe_module(base)
            layer_type = t if layer_type is None else layer_type
            in_features = i if in_features is None else in_features
            out_features = o if out_features is None else out_features
        self.layer_type: graph_pb2.LayerType.ValueType = layer_type
        self.in_features = in_features
        self.out_features = out_features
        self.num_seeds = self.config.num_seeds if layer_type == _LINEAR else 0
        self._channels_first = channels_first(base, layer_type)
        self.seed_kernels = nn.ModuleDict()
        self.seed_states: list[health_pb2.SeedLifecycleState.ValueType] = [DORMANT] * self.num_seeds
        self.seed_kernel_ids: list[str] = [""] * self.num_seeds
        self.seed_steps: list[int] = [0] * self.num_seeds
        self.adaptation_count = 0
        self._acc = WindowAccumulator(self.config)
        self._tally = _Tally()
        self._tally.trained = [0] * self.num_seeds
        self._sample_every = max(1, self.config.sample_every)
        self._cull_every = max(1, self.config.cull_check_every)
        self._refresh_params()
        self._widths: tuple[int, int] | None = None  # last training forward's (in, out)
        # A checkpoint of the model before it was wrapped loads as it is (see _plain_keys).
        self.register_load_state_dict_pre_hook(_plain_keys)  # type: ignore[no-untyped-call]

    # -- forward -------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = _first_tensor(args, kwargs)
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, args, kwargs)
        t0 = time.perf_counter()
        y = self.base(*args, **kwargs)
        tally = self._tally  # plain attributes only here: nn.Module lookups cost µs
        if tally.kernels:
            y = self._add_seeds(x, y)
        # A training forward is one that builds a graph: a train-mode pass under no_grad
        # (an EMA or a quick check) neither samples gradients nor ages the seeds.
        if self.training and torch.is_grad_enabled():
            self._acc.add_latency((time.perf_counter() - t0) * 1e3)
            self._account(x, y)
        return y

    def _compiled_forward(self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``forward`` as dynamo traces it. Nothing that changes every call (a clock
        reading, the forward counter) may be seen by dynamo: it specialises on Python
        values, and a ``perf_counter`` float live across a graph break put a guard
        ``t0 == <last value>`` on every resumed frame, so each step recompiled until
        ``recompile_limit``. So the seeds and the bookkeeping run in helpers dynamo does
        not trace (``torch.compiler.disable``), and compiled forwards are not timed
        (their forward-time statistics stay 0: host-side time of a compiled region would
        be mostly launch time anyway). On CUDA the seeds read nothing back from the device
        but every ``cull_check_every`` forwards (see ``SeedSlots._add_seeds``), so that
        graph break costs no sync; they stay untraced
        because their gradient gate gets its flag after it is applied, which a backward
        traced ahead of time cannot see (it refuses to be traced rather than pass NaN)."""
        y = self.base(*args, **kwargs)
        if self._tally.kernels:
            y = _add_seeds_eager(self, x, y)
        if self.training and torch.is_grad_enabled():
            _account_eager(self, x, y, untimed=True)
        return y

    def _account(self, x: Any, y: Any, untimed: bool = False) -> None:
        """After a training forward: sample it (every ``sample_every``-th), age seeds.
        ``untimed``: a compiled forward, which still counts as having run (the layer
        reports a signal for the window, not a stale one)."""
        if untimed:
            self._acc.forwards += 1
        tally = self._tally
        if tally.forwards % self._sample_every == 0:
            self._sample(y)
            if not traced(x, y):  # (a torch.fx trace tells nothing about widths)
                self._widths = (width(x), width(y))  # -1: not a tensor (see _fits)
        tally.forwards += 1
        if tally.kernels:
            if tally.synced:
                self._count_trained()
            else:
                self._advance_seeds()

    def _sample(self, output: Any) -> None:
        """A sampled training forward: its output's statistics, and its gradients later."""
        y = output[0] if isinstance(output, tuple) else output
        if not isinstance(y, torch.Tensor):
            return
        tally = self._tally
        tally.grad_due = True  # read the gradients this forward's backward leaves
        tally.output_bytes = y.numel() * y.element_size()
        self._acc.add_output(flatten_units(y.detach(), self._channels_first))

    # -- gradients -----------------------------------------------------------------
    def take_gradient_norm(self) -> float | None:
        """L2 norm over the layer's parameter gradients (``p.grad``, base and seeds) as
        they are now, read only if a sampled forward ran since the last read; otherwise
        the previous reading (at most ``sample_every`` forwards old). None when no
        gradient was there to read.

        Why read ``p.grad`` at frame time instead of hooking every backward: a Python
        hook per parameter per backward cost ~20 µs each on the training thread. In the
        usual loop (zero_grad, forward, backward, step, then the frame) ``p.grad`` holds
        the latest backward's gradient (accumulated over micro-batches, if any); build
        the frame before ``zero_grad`` if your loop zeroes right after ``step``."""
        tally = self._tally
        if tally.grad_due:
            tally.grad_due = False
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            tally.grad_norm = math.sqrt(sum(squared_norm(g) for g in grads)) if grads else None
        return tally.grad_norm

    # -- telemetry -----------------------------------------------------------------
    def layer_spec(self) -> graph_pb2.LayerSpec:
        return graph_pb2.LayerSpec(
            layer_id=self.layer_id,
            layer_type=self.layer_type,
            input_size=self.in_features,
            output_size=self.out_features,
            parameter_count=sum(p.numel() for p in self.base.parameters() if p.requires_grad),
            seed_count=self.num_seeds,
        )

    def memory_bytes(self) -> int:
        """Parameters + gradients + the latest output, in bytes."""
        total = self._tally.output_bytes
        for p in self.parameters():
            total += p.numel() * p.element_size()
            g = p.grad
            if g is not None:
                total += g.numel() * g.element_size()
        return total

    def collect_signal(self, step: int, epoch: int) -> health_pb2.HealthSignal | None:
        """The HealthSignal of the window since the previous call, or None when the
        layer ran no training forward in it (the server then sees it as stale)."""
        values = self.collect_values(step, epoch)
        return None if values is None else values.message()

    def collect_values(
        self, step: int, epoch: int, now: float | None = None
    ) -> SignalValues | None:
        """``collect_signal`` as plain values (no protobuf on the training thread);
        ``now`` = the timestamp to report (s since the epoch; default ``time.time()``)."""
        if not self._acc.has_data:
            return None
        stats = self._acc.collect()
        tally = self._tally
        sampled = tally.grad_due
        grad = self.take_gradient_norm()
        # Health depends on these only: frames without a new sample reuse it (µs each).
        key = (stats[1:4], stats.error_count, grad)
        if key != tally.health_key or tally.last_health is None:
            tally.health_key = key
            tally.last_health = reference_health(stats, grad, self.config)
        memory = tally.memory
        if sampled or memory is None:  # memory use as of the latest sampled forward
            memory = min(1.0, self.memory_bytes() / self.config.memory_budget_bytes)
            tally.memory = memory
        tally.last_stats = stats
        health = tally.last_health
        errors = stats.error_count
        if grad is not None and not math.isfinite(grad):
            # A NaN gradient reads 0 (plus an error); an infinite one reads as the
            # largest float32 (plus an error): 0 would look like vanishing gradients.
            errors += 1
            grad = None if math.isnan(grad) else _F32_MAX
        states = self.seed_states
        return SignalValues(
            self.layer_id,
            step,
            epoch,
            time.time() if now is None else now,
            health,
            stats.avg_execution_time_ms,
            errors,
            sum(1 for s in states if s in ACTIVE_STATES) if tally.kernels else 0,
            self.num_seeds,
            min(stats.activation_variance, _F32_MAX),
            stats.dead_neuron_ratio,
            stats.avg_correlation,
            min(grad or 0.0, _F32_MAX),
            min(stats.latency_variance, _F32_MAX),
            memory,
            tuple(states),
            self.adaptation_count,
        )

    @property
    def last_stats(self) -> WindowStats | None:
        """The window statistics behind the latest signal (None before the first)."""
        return self._tally.last_stats

    @property
    def last_health(self) -> float | None:
        """The health score of the latest signal (None before the first)."""
        return self._tally.last_health


# The seeds and the bookkeeping as compiled forwards call them: not traced by dynamo.
_add_seeds_eager = torch.compiler.disable(KasminaLayer._add_seeds)  # type: ignore[no-untyped-call]
_account_eager = torch.compiler.disable(KasminaLayer._account)  # type: ignore[no-untyped-call]


def _plain_keys(layer: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Load hook of a KasminaLayer: a state_dict saved before the model was wrapped names
    its parameters ``<name>.weight``, not ``<name>.base.weight``, and has no seed state.
    Rename them and take the current (unadapted) seed state, so ``load_state_dict`` of
    such a checkpoint works, strictly, instead of missing every wrapped key."""
    assert isinstance(layer, KasminaLayer)
    if prefix + "_extra_state" in state_dict:
        return  # saved wrapped
    keys = list(layer.base.state_dict())
    own = [k for k in keys if prefix + k in state_dict]
    if keys and not own:
        return  # not this layer's checkpoint: strict loading reports what is missing
    for k in own:
        state_dict[prefix + "base." + k] = state_dict.pop(prefix + k)
    state_dict[prefix + "_extra_state"] = layer.get_extra_state()
