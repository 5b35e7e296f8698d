"""The README's multi-rank recipe, run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from
``test_ddp.py``: decisions applied on every rank, DDP rebuilt whenever
``host.params_version`` changes. On the way a kernel fossilizes, and a second kernel
fails on rank 1's data only. Each rank writes what it ended with to ``<out>/rank<r>.json``.

Not collected by pytest (no ``test_`` prefix): a script the test starts.
"""

from __future__ import annotations

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

STEPS = 32
# Kernel 0: loaded at step 2, fossilized at 12. Kernel 1: loaded at 14, fails on rank 1
# from step 16, culled on both ranks at the next count read (every 4 forwards), before
# it would fossilize (24).
CONFIG = KasminaConfig(
    num_seeds=2, sample_every=4, fossilize_after_steps=10, cull_check_every=4, replicated_ranks=True
)


def _decision(seed: int, kernel: str) -> decision_pb2.AdaptationDecision:
    return decision_pb2.AdaptationDecision(
        decision_id=f"d{seed}",
        action=decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL,
        target_layer_id="2",
        seed_index=seed,
        kernel_id=kernel,
    )


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))  # a mismatch fails fast
    rank = dist.get_rank()
    warnings.simplefilter("error")  # a DistributedAdaptationWarning would be a failure
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 1))
    host = KasminaHost.attach(model, lambda n, m: n == "2", host_id="h", config=CONFIG)
    layer = host.layers["2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ddp, wrapped_at, rewraps = DistributedDataParallel(model), host.params_version, 0
    data = torch.Generator().manual_seed(rank)  # each rank its own batches
    for step in range(STEPS):
        # What rank 0's client would have polled, broadcast to every rank.
        got = [[_decision(0, "residual_mlp_r16")] if step == 2 else []]
        if step == 14:
            got = [[_decision(1, "residual_lowrank_r4")]]
        dist.broadcast_object_list(got, src=0)
        for decision in got[0]:
            result = host.apply(decision, synchronized=True)
            assert result.applied, result.detail
            extend_optimizer(opt, result.new_parameters)
        if host.params_version != wrapped_at:  # loaded, fossilized or culled
            ddp = DistributedDataParallel(model)
            wrapped_at, rewraps = host.params_version, rewraps + 1
        if step == 16 and rank == 1:  # kernel 1 fails on this rank's data only
            with torch.no_grad():
                for p in layer.seed_kernels["1"].parameters():
                    p.fill_(math.inf)
        x = torch.randn(8, 4, generator=data)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "states": [int(s) for s in layer.seed_states],
                "kernels": sorted(layer.seed_kernels),
                "rewraps": rewraps,
                "finite": bool(torch.isfinite(flat).all()),
                "weights": flat.tolist(),
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
