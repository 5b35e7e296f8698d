"""The finiteness guard of a seed's kernel: its output joins the layer's only if all of
it is finite, and a failed forward is flagged so that the seed is culled.

Why a module of its own: on CUDA the guard must not read the device (a host check is a
sync and a full device-to-host copy per seed per forward), so there it masks on the
device, value and gradients, with two small autograd functions; on the CPU, where a read
is free, it branches on the host (in a lone process: see ``reads_are_free``). Both give
the same outputs, host gradients and flags, and tests hold them to it
(``tests/client/test_seeds.py`` forces the device way on CPU).
Eval and no-grad forwards take neither: ``add_masked``, a plain ``torch.where`` that
traces, exports and vmaps.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from tamiyo_client.telemetry import finite_flag


def add_masked(y: Any, kernel: nn.Module, x: torch.Tensor) -> Any:
    """``add_guarded`` for eval and no-grad forwards: ``torch.where`` on the flag, pure
    tensor ops with no host read and no custom autograd function, so a model with seeds
    still traces, exports and vmaps; nothing is counted (no training forward)."""
    out = kernel(x)
    ok = finite_flag(out)
    return on_first(y, lambda t: torch.where(ok, t + out, t))


def add_guarded(
    y: Any, kernel: nn.Module, x: torch.Tensor, *, host: bool
) -> tuple[Any, torch.Tensor]:
    """``y + kernel(x)`` (on the first element of a tuple ``y``) if that output is all
    finite, else ``y`` exactly; and the 0-d bool flag of it, on the kernel's device.
    ``host``: branch on the flag on the host (the caller's choice: ``reads_are_free``,
    in a lone process only, since there a failed kernel's gradients stay None)."""
    if host:
        out = kernel(x)
        ok = finite_flag(out)
        if bool(ok):  # a failed kernel is left out of the graph: nothing to mask or gate
            return on_first(y, partial(torch.add, other=out)), ok
        return y, ok
    out, ok = run_kernel(kernel, x)
    return on_first(y, lambda t: _MaskedAdd.apply(t, out, ok)), ok  # type: ignore[no-untyped-call]


class _MaskedAdd(torch.autograd.Function):
    """``y + out`` if the device flag ``ok`` is true, else exactly ``y``: the function of
    ``torch.where(ok, y + out, y)``, at ~45 µs instead of ~120 on CPU for [256, 512]
    (``y + out``: ~25), and a backward without two more wheres. ``nan_to_num`` because
    ``0 * NaN`` is NaN (a no-op when ``ok``: see ``finite_flag``). ``out``'s gradient is
    ``ok`` times the upstream one; ``_LateGate`` makes the kernel's own exact."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, out: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        okf = ok.to(out.dtype)
        ctx.save_for_backward(okf)
        return torch.addcmul(y, out.nan_to_num(0.0, 0.0, 0.0), okf)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        (okf,) = ctx.saved_tensors
        return g, g * okf if ctx.needs_input_grad[1] else None, None


def reads_are_free(x: torch.Tensor) -> bool:
    """Whether a value read of a tensor like ``x`` costs no device sync: on the CPU an
    op's result exists when it returns. There ``add_guarded`` branches on the host instead
    of masking: a failing kernel is left out of the graph, as cheap as no guard (the
    device mask and gradient gate cost ~+200 µs per seed per forward at [256, 512] on
    CPU), with the same outputs, host gradients and flags as the device way (a failed
    kernel's own gradients stay None instead of zeros, which is why a multi-rank job
    takes the device way: DDP waits for a gradient of every parameter it holds)."""
    return x.device.type == "cpu"


def on_first(y: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``f(y)``, or for a tuple output (``(out, attn)``) ``f`` of its first element with
    the rest passed through (a namedtuple stays one)."""
    if isinstance(y, tuple):
        items = (f(y[0]), *y[1:])
        return type(y)(*items) if hasattr(y, "_fields") else items
    return f(y)


class _LateGate(torch.autograd.Function):
    """Identity on the kernel's input and parameters; backward passes their gradients
    where ``flag[0]`` (the output's finiteness, appended after the call), else zeros.
    Why, when the masked output's gradient is already zero: a kernel with an inf weight
    turns it into ``0 * inf = NaN`` in its backward, for the layer's input (so every host
    parameter upstream) and its own parameters (which ``clip_grad_norm_`` spreads to all).
    Dynamo traces a backward before the flag exists: it raises, so dynamo runs it eagerly."""

    @staticmethod
    def forward(ctx: Any, flag: list[torch.Tensor], *tensors: torch.Tensor) -> Any:
        ctx.flag = flag
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if not ctx.flag:
            raise RuntimeError("_LateGate: backward before its flag was set")
        ok = ctx.flag[0]
        return (None, *(None if g is None else torch.where(ok, g, 0.0) for g in grads))


def run_kernel(kernel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel(x)`` and its ``finite_flag``, with no host read; the gradients into ``x``
    and the kernel's parameters go through a ``_LateGate`` (``functional_call``)."""
    grad = torch.is_grad_enabled()
    # Every name of a tied weight gets its own gate (so tie_weights=False: it costs ~60 µs).
    params = kernel.named_parameters(remove_duplicate=False) if grad else ()
    named = [(n, p) for n, p in params if p.requires_grad]
    gate_x = grad and x.requires_grad
    if not named and not gate_x:
        out: torch.Tensor = kernel(x)
        return out, finite_flag(out)
    flag: list[torch.Tensor] = []
    gate_in = [x, *(p for _, p in named)] if gate_x else [p for _, p in named]
    gated = _LateGate.apply(flag, *gate_in)  # type: ignore[no-untyped-call]
    xin = gated[0] if gate_x else x
    alias = {n: g for (n, _), g in zip(named, gated[int(gate_x) :], strict=True)}
    call = torch.func.functional_call
    out = call(kernel, alias, (xin,), tie_weights=False) if alias else kernel(xin)
    flag.append(ok := finite_flag(out))
    return out, ok
