"""Run under torchrun by ``test_grad_clip.py``: IQL and BC updates on 2 gloo ranks, each
rank on its own minibatches; every rank must end with the same weights (the actors'
per-term gradients are averaged over the ranks by ``Learner._step`` itself, since their
forward runs in DDP's ``no_sync``). Rank 0 writes ``<out>`` with what it checked."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tamiyo.config import TrainConfig
from tests.trainer.test_learning import SMALL, bandit_dataset
from trainer.algos import Learner
from trainer.loop import _ddp, make_minibatch


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, device = dist.get_rank(), torch.device("cpu")
    torch.set_num_threads(1)
    data = bandit_dataset(40)
    report = {}
    for algo in ("iql", "bc"):
        cfg = TrainConfig(algo=algo, grad_clip=1.0)
        learner = Learner(cfg, SMALL, device, wrap=partial(_ddp, device))
        start = {k: v.clone() for k, v in learner.policy.state_dict().items()}
        for step in range(3):
            idx = np.random.default_rng([rank, step]).integers(0, len(data), 8)
            mb = make_minibatch(data, idx, device, with_next=algo != "bc")
            metrics = learner.update(mb)
        mine = {name: {k: v.tolist() for k, v in m.state_dict().items()}
                for name, m in learner.named_state().items()}  # fmt: skip
        every: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        moved = any(not torch.equal(v, start[k]) for k, v in learner.policy.state_dict().items())
        norms = sorted(k for k in metrics if k.startswith("grad_norm_"))
        same = all(e == every[0] for e in every)
        report[algo] = {"replicas_equal": same, "moved": moved, "norms": norms}
    if rank == 0:
        out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
