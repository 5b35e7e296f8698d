"""The README's multi-rank recipe, run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from
``test_ddp.py``: decisions applied on every rank, seeds synced at each step's end
(``host.sync_seeds()`` over the data-parallel group), DDP rebuilt whenever
``host.params_version`` changes. On the way a kernel fossilizes, and a second kernel
fails on rank 1's data only. Each rank writes what it ended with to ``<out>/rank<r>.json``.

The README's code block is made of lines of this file (``test_ddp.py`` checks it).
Not collected by pytest (no ``test_`` prefix): a script the test starts.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client.host import KasminaHost, extend_optimizer
from tamiyo_client.received import ReceivedDecision

STEPS = 32
# Kernel 0: loaded at step 2, fossilized at the sync of step 11 (its 10th training
# forward). Kernel 1: loaded at 14, fails on rank 1 from step 16, culled on both ranks
# at that step's sync, before it would fossilize (23).
CONFIG = KasminaConfig(num_seeds=2, sample_every=4, fossilize_after_steps=10)
LOADS = {2: (0, "residual_mlp_r16"), 14: (1, "residual_lowrank_r4")}


class ScriptedClient:
    """Rank 0's client, standing in for ``BlockingTamiyoClient``: the decisions a server
    would have sent, one poll per step."""

    def __init__(self) -> None:
        self.step = 0

    def poll_decisions(self) -> list[ReceivedDecision]:
        self.step += 1
        if (load := LOADS.get(self.step - 1)) is None:
            return []
        seed, kernel = load
        decision = decision_pb2.AdaptationDecision(
            decision_id=f"d{seed}",
            action=decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL,
            target_layer_id="2",
            seed_index=seed,
            kernel_id=kernel,
        )
        return [ReceivedDecision(decision, None, "s", 1)]


def select(name: str, module: nn.Module) -> bool:
    return name == "2"


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))  # a mismatch fails fast
    rank = dist.get_rank()
    warnings.simplefilter("error")  # a DistributedAdaptationWarning would be a failure
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 1))
    client = ScriptedClient() if rank == 0 else None
    dp = dist.group.WORLD  # the data-parallel group (with pipeline or tensor parallelism: yours)
    host = KasminaHost.attach(model, select, host_id="h", config=CONFIG, process_group=dp)
    layer = host.layers["2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = nn.MSELoss()
    ddp, wrapped_at = DistributedDataParallel(model), host.params_version
    rewraps, events = 0, []
    data = torch.Generator().manual_seed(rank)  # each rank its own batches
    for step in range(STEPS):
        got = [client.poll_decisions() if client else []]  # one client, on rank 0
        dist.broadcast_object_list(got, group_src=0, group=dp)  # the same decisions, in order
        for r in got[0]:
            extend_optimizer(opt, host.apply(r.decision, synchronized=True).new_parameters, sched)
        if host.params_version != wrapped_at:  # a kernel loaded, fossilized or culled
            ddp = DistributedDataParallel(model)  # (device_ids=[local_rank] on GPUs)
            wrapped_at = host.params_version
            rewraps += 1
        if step == 16 and rank == 1:  # kernel 1 fails on this rank's data only
            with torch.no_grad():
                for p in layer.seed_kernels["1"].parameters():
                    p.fill_(math.inf)
        x, y = torch.randn(8, 4, generator=data), torch.randn(8, 1, generator=data)
        loss_fn(ddp(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        changes = host.sync_seeds()  # culls and fossilizations, agreed over dp
        events += [[step, e.layer_id, e.seed_index, int(e.state)] for e in changes]
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "states": [int(s) for s in layer.seed_states],
                "kernels": sorted(layer.seed_kernels),
                "rewraps": rewraps,
                "events": events,
                "finite": bool(torch.isfinite(flat).all()),
                "weights": flat.tolist(),
            }
        )
    )
    del ddp
    _shut_down()


def _shut_down() -> None:
    """Free every DDP (old re-wraps sit in reference cycles) while the group is alive,
    then destroy it: a DDP collected after ``destroy_process_group`` hung a rank's exit
    now and then (about 1 run in 8 on the 2-core CI box; found while writing this)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
