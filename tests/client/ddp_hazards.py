"""Multi-rank jobs whose ranks do not run every wrapped layer equally often, run by
``torchrun --nproc_per_node 2`` (gloo, CPU) from ``test_ddp.py``. With the failure-count
all-reduce inside ``forward`` (review 15b, finding 1) each of them hung or aborted at the
first count read after a kernel was loaded; with the host's step-boundary sync they run,
and the ranks' seeds agree. One process group (a short timeout, so that a regression
fails fast instead of hanging CI), the scenarios one after the other:

- ``layerdrop``: ``DDP(find_unused_parameters=True)``; rank 1 skips the wrapped layer at
  some steps (LayerDrop), once at the very step where a kernel fails on rank 0's data.
- ``accumulate``: two micro-batches per step, the first under ``ddp.no_sync()``, the
  wrapped layer under activation checkpointing; a kernel fails on rank 1 only.
- ``join``: uneven inputs under ``host.join(ddp)``: rank 1 has two batches more, and in
  the first of them a kernel fails (rank 0, joined, culls it too).
- ``pipeline``: the wrapped layers differ per rank (two stages, one barrier per step for
  the activations' send/recv), each host synced over its own one-rank group.
- ``pipeline_local``: a host on rank 0 only, no process group (local culls).

Each rank writes ``{scenario: result}`` to ``<out>/rank<r>.json``. Not collected by pytest.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client.host import KasminaHost, extend_optimizer
from tamiyo_client.kasmina import DistributedAdaptationWarning
from tests.client.ddp_recipe import _shut_down

Result = dict[str, Any]


class Net(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 1)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.checkpointed:
            h = checkpoint(self.b, h, use_reentrant=False)
        elif not skip:
            h = self.b(h)
        out: torch.Tensor = self.c(h)
        return out


def load(layer: str, seed: int) -> decision_pb2.AdaptationDecision:
    return decision_pb2.AdaptationDecision(
        decision_id=f"{layer}{seed}",
        action=decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL,
        target_layer_id=layer,
        seed_index=seed,
        kernel_id="residual_mlp_r16",
    )


def break_kernel(host: KasminaHost, layer: str, seed: int) -> None:
    with torch.no_grad():
        for p in host.layers[layer].seed_kernels[str(seed)].parameters():
            p.fill_(math.inf)


class Job:
    """One scenario's model, host and bookkeeping on this rank (the README recipe)."""

    def __init__(
        self,
        layer: str,
        config: KasminaConfig,
        group: dist.ProcessGroup | None,
        *,
        ddp: dict[str, Any] | None = None,
        checkpointed: bool = False,
    ) -> None:
        torch.manual_seed(0)
        self.rank = dist.get_rank()
        self.model = Net(checkpointed)
        self.layer = layer
        self.host = KasminaHost.attach(
            self.model, lambda n, m: n == layer, host_id="h", config=config, process_group=group
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.ddp_kwargs = ddp
        self.net: nn.Module = self.model
        if ddp is not None:
            self.net = DistributedDataParallel(self.model, **ddp)
        self.wrapped_at, self.rewraps = self.host.params_version, 0
        self.events: list[list[Any]] = []
        self.steps = 0
        self.data = torch.Generator().manual_seed(self.rank)

    def begin(self, step: int, loads: dict[int, int], rewrap: bool = True) -> None:
        """Apply this step's decisions (the same on every rank); re-wrap DDP if needed."""
        if step in loads:
            result = self.host.apply(load(self.layer, loads[step]), synchronized=True)
            assert result.applied, result.detail
            extend_optimizer(self.opt, result.new_parameters)
        if rewrap and self.ddp_kwargs is not None and self.host.params_version != self.wrapped_at:
            self.net = DistributedDataParallel(self.model, **self.ddp_kwargs)
            self.wrapped_at, self.rewraps = self.host.params_version, self.rewraps + 1

    def batch(self) -> torch.Tensor:
        return torch.randn(8, 4, generator=self.data)

    def end(self, step: int) -> None:
        self.opt.step()
        self.opt.zero_grad()
        changes = self.host.sync_seeds()
        self.events += [[step, e.layer_id, e.seed_index, int(e.state)] for e in changes]
        self.steps += 1

    def result(self) -> Result:
        layer = self.host.layers[self.layer]
        flat = torch.cat([p.detach().flatten() for p in self.model.parameters() if p.requires_grad])
        return {
            "states": [int(s) for s in layer.seed_states],
            "seed_steps": list(layer.seed_steps),
            "kernels": sorted(layer.seed_kernels),
            "rewraps": self.rewraps,
            "events": self.events,
            "steps": self.steps,
            "finite": bool(torch.isfinite(flat).all()),
            "weights": flat.tolist(),
        }


def layerdrop() -> Result:
    """Kernel 0 loaded at step 1, trained 6 forwards by the most any rank ran (rank 1
    skips the layer at steps 3 and 4): fossilized at step 6 on both. Kernel 1 loaded at
    step 5 fails on rank 0 at step 7, where rank 1 skips the layer: culled on both."""
    config = KasminaConfig(num_seeds=2, sample_every=4, fossilize_after_steps=6)
    job = Job("b", config, dist.group.WORLD, ddp={"find_unused_parameters": True})
    for step in range(10):
        job.begin(step, {1: 0, 5: 1})
        if step == 7 and job.rank == 0:
            break_kernel(job.host, "b", 1)
        skip = job.rank == 1 and step in (3, 4, 7)
        job.net(job.batch(), skip=skip).pow(2).mean().backward()
        job.end(step)
    return job.result()


def accumulate() -> Result:
    """Two micro-batches per step (the first without DDP's all-reduce), the wrapped layer
    checkpointed (its forward runs again in the backward: 4 training forwards a step).
    Kernel 0 loaded at step 1 fails on rank 1 from step 3's first micro-batch."""
    config = KasminaConfig(num_seeds=2, sample_every=4, fossilize_after_steps=1000)
    job = Job("b", config, dist.group.WORLD, ddp={}, checkpointed=True)
    assert isinstance(job.net, DistributedDataParallel)
    for step in range(6):
        job.begin(step, {1: 0})
        assert isinstance(job.net, DistributedDataParallel)
        if step == 3 and job.rank == 1:
            break_kernel(job.host, "b", 0)
        with job.net.no_sync():
            job.net(job.batch()).pow(2).mean().backward()
        job.net(job.batch()).pow(2).mean().backward()
        job.end(step)
    return job.result()


def join() -> Result:
    """Kernel 0 loaded (and DDP re-wrapped) before the uneven part; rank 1 has two
    batches more, and kernel 0 fails on its data in the first of them: rank 0, joined,
    takes part in that sync and culls it too. DDP is re-wrapped after the join (the Join
    holds the DDP it was given; find_unused_parameters lets the old one run without the
    culled kernel meanwhile), and one more step runs on both ranks."""
    config = KasminaConfig(num_seeds=2, sample_every=4, fossilize_after_steps=1000)
    job = Job("b", config, dist.group.WORLD, ddp={"find_unused_parameters": True})
    for step in range(3):
        job.begin(step, {1: 0})
        job.net(job.batch()).pow(2).mean().backward()
        job.end(step)
    last = 8 if job.rank == 0 else 10
    assert isinstance(job.net, DistributedDataParallel)
    with job.host.join(job.net):
        for step in range(3, last):
            job.begin(step, {}, rewrap=False)
            if step == 8:  # (rank 1 only)
                break_kernel(job.host, "b", 0)
            job.net(job.batch()).pow(2).mean().backward()
            job.end(step)
    job.begin(10, {})  # both ranks: re-wrapped for the cull
    job.net(job.batch()).pow(2).mean().backward()
    job.end(10)
    return job.result()


def pipeline(groups: list[dist.ProcessGroup], synced: bool) -> Result:
    """Two stages: rank 0 wraps ``b``, rank 1 ``c`` (or nothing), each its own decisions;
    a barrier per step stands for the activations' send/recv. A kernel fails on rank 0."""
    rank = dist.get_rank()
    config = KasminaConfig(num_seeds=2, sample_every=4, fossilize_after_steps=5)
    if not synced and rank == 1:  # no Kasmina layer on this rank at all
        model = Net()
        for _ in range(8):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            dist.barrier()
        return {"steps": 8}
    job = Job("bc"[rank], config, groups[rank] if synced else None)
    for step in range(8):
        job.begin(step, {1: 0, 2: 1} if rank == 0 else {3: 0})
        if step == 4 and rank == 0:
            break_kernel(job.host, "b", 1)
        job.net(job.batch()).pow(2).mean().backward()
        job.end(step)
        dist.barrier()
    return job.result()


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))  # a hang fails fast
    warnings.simplefilter("error", DistributedAdaptationWarning)
    groups = [dist.new_group([0]), dist.new_group([1])]  # each rank's own "DP group"
    scenarios: dict[str, Callable[[], Result]] = {
        "layerdrop": layerdrop,
        "accumulate": accumulate,
        "join": join,
        "pipeline": lambda: pipeline(groups, synced=True),
        "pipeline_local": lambda: pipeline(groups, synced=False),
    }
    only = sys.argv[2:] or list(scenarios)
    results: dict[str, Result] = {}
    for name in only:
        results[name] = scenarios[name]()
        dist.barrier()
        print(f"rank {dist.get_rank()}: {name} done", flush=True)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    _shut_down()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
