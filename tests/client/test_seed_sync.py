"""A data-parallel host's seed sync, in one process: what a synced layer does (and does
not do) in ``forward``, and how ``sync_seeds`` settles culls and ageing. Several ranks are
simulated by several hosts whose vectors are reduced by hand (the MAX the all-reduce
takes); the real 2-process jobs are ``test_ddp.py``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client import seed_sync
from tamiyo_client.host import KasminaHost
from tamiyo_client.kasmina import (
    CULLED,
    DORMANT,
    FOSSILIZED,
    GERMINATED,
    KasminaLayer,
)
from tamiyo_client.seed_sync import SeedEvent, SeedSync

KERNEL = "residual_mlp_r16"
CONFIG = KasminaConfig(num_seeds=2, sample_every=1, fossilize_after_steps=4)


@pytest.fixture
def group() -> Iterator[dist.ProcessGroup]:
    """A real one-rank gloo group (the sync's all-reduce is then the identity)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        pg = dist.group.WORLD
        assert pg is not None
        yield pg
    finally:
        dist.destroy_process_group()


def _host(group: dist.ProcessGroup | None, **kw: Any) -> KasminaHost:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 1))
    return KasminaHost.attach(
        model, lambda n, m: n == "2", host_id="h", config=CONFIG, process_group=group, **kw
    )


def _load(host: KasminaHost, seed: int) -> None:
    decision = decision_pb2.AdaptationDecision(
        decision_id=f"d{seed}",
        action=decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL,
        target_layer_id="2",
        seed_index=seed,
        kernel_id=KERNEL,
    )
    assert host.apply(decision, synchronized=True).applied


def _break(layer: KasminaLayer, seed: int) -> None:
    with torch.no_grad():
        for p in layer.seed_kernels[str(seed)].parameters():
            p.fill_(math.inf)


def _train(host: KasminaHost, x: torch.Tensor) -> None:
    host.model(x).pow(2).mean().backward()


@pytest.fixture
def no_collectives(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make every all-reduce raise (a collective inside forward is the hazard)."""

    def arm() -> None:
        def refuse(*_a: Any, **_k: Any) -> None:
            raise AssertionError("a collective was issued")

        monkeypatch.setattr(dist, "all_reduce", refuse)

    return arm


def test_a_synced_layer_culls_nothing_in_forward_and_issues_no_collective(
    group: dist.ProcessGroup, no_collectives: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures and training forwards are counted on the device only; the failed kernel
    is masked with zero gradients (DDP waits for a gradient of every parameter it holds:
    on the CPU a lone process leaves them None). The sync culls it and reports it."""
    host = _host(group)
    layer = host.layers["2"]
    _load(host, 0)
    _break(layer, 0)
    x = torch.randn(5, 4)
    no_collectives()
    for _ in range(6):  # past cull_check_every and fossilize_after_steps
        host.model.zero_grad()
        _train(host, x)
    assert layer.seed_states == [GERMINATED, DORMANT]  # nothing settled before the sync
    assert host.params_version == 2  # (created, loaded)
    for p in layer.seed_kernels["0"].parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, torch.zeros_like(p))
    monkeypatch.undo()
    assert host.sync_seeds() == [SeedEvent("2", 0, CULLED)]
    assert layer.seed_states[0] == CULLED
    assert host.params_version == 3
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1


def test_seeds_age_at_the_sync_and_fossils_lose_their_grads_there(
    group: dist.ProcessGroup,
) -> None:
    host = _host(group)
    layer = host.layers["2"]
    _load(host, 0)
    x = torch.randn(5, 4)
    for step in range(4):
        _train(host, x)
        events = host.sync_seeds()
        assert events == ([SeedEvent("2", 0, FOSSILIZED)] if step == 3 else []), step
    assert layer.seed_states[0] == FOSSILIZED
    assert layer.seed_steps[0] == 4
    for p in layer.seed_kernels["0"].parameters():
        assert not p.requires_grad
        assert p.grad is None  # dropped at the sync, before any optimizer sees it again


def test_a_layer_that_cannot_take_its_kernel_is_culled_at_the_sync(
    group: dist.ProcessGroup,
) -> None:
    """A kernel germinated before any forward into a block that reshapes its input: a
    lone layer culls it at once; a synced one at the sync, on every rank alike."""
    layer = KasminaLayer(nn.Sequential(nn.Flatten(), nn.Linear(8, 4)), "neck")
    host = KasminaHost(layer, {"neck": layer}, host_id="h", process_group=group)
    layer.germinate(0, "residual_lowrank_r4", synchronized=True)
    with pytest.warns(UserWarning, match=r"seed\(s\) \[0\] culled at the next host.sync_seeds"):
        assert layer(torch.randn(5, 2, 4)).shape == (5, 4)
    assert layer.seed_states[0] == GERMINATED
    assert host.sync_seeds() == [SeedEvent("neck", 0, CULLED)]


def _reduce(*syncs: SeedSync) -> list[list[SeedEvent]]:
    """One sync step of several simulated ranks: gather, MAX, settle."""
    agreed = torch.stack([s.gather() for s in syncs]).amax(0).tolist()
    return [s.settle(agreed) for s in syncs]


def test_ranks_agree_whatever_each_ran_and_whichever_failed() -> None:
    """Two ranks: rank 1 skips the layer at some steps (LayerDrop), a kernel fails on
    rank 0's data only. Each seed ages by the most forwards any rank ran, and a failure
    anywhere culls everywhere: the same events, states, ages and params_version."""
    hosts = [_host(None), _host(None)]
    syncs = [SeedSync(list(h.layers.values()), group=None, every=1) for h in hosts]  # type: ignore[arg-type]
    for h in hosts:
        _load(h, 0)
        _load(h, 1)
    x = torch.randn(5, 4)
    log: list[list[list[SeedEvent]]] = []
    for step in range(5):
        for rank, h in enumerate(hosts):
            if step == 1 and rank == 0:
                _break(h.layers["2"], 1)
            if rank == 1 and step in (0, 1, 2):
                continue  # skipped the layer (its whole forward here)
            _train(h, x)
        log.append(_reduce(*syncs))
    assert all(a == b for a, b in log)
    assert [e for a, _ in log for e in a] == [
        SeedEvent("2", 1, CULLED),  # step 1, failed on rank 0 only
        SeedEvent("2", 0, FOSSILIZED),  # step 3: 4 forwards on rank 0, 1 on rank 1
    ]
    layers = [h.layers["2"] for h in hosts]
    assert layers[0].seed_states == layers[1].seed_states == [FOSSILIZED, CULLED]
    assert layers[0].seed_steps == layers[1].seed_steps
    assert hosts[0].params_version == hosts[1].params_version


def test_every_sync_reduces_even_with_nothing_pending(
    group: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank with nothing to report still takes part (a skipped collective would leave
    the others waiting), every ``sync_every``-th call; the vector's layout is fixed."""
    calls: list[list[int]] = []
    real = dist.all_reduce

    def spy(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append(t.tolist())
        return real(t, *a, **k)

    monkeypatch.setattr(dist, "all_reduce", spy)
    for every, syncs, want in ((1, 4, 4), (3, 7, 2)):
        calls.clear()
        host = _host(group, sync_every=every)
        for _ in range(syncs):
            assert host.sync_seeds() == []
        assert calls == [[0] * 5] * want  # 1 + 2 * num_seeds, all zero


def test_without_a_process_group_the_host_syncs_nothing_and_culls_locally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default (and ``group.WORLD`` without an initialised group): a lone process,
    or pipeline stages with nothing to agree: no collective ever, culls in forward."""
    assert dist.group.WORLD is None
    host = _host(dist.group.WORLD)
    layer = host.layers["2"]
    _load(host, 0)
    _break(layer, 0)
    monkeypatch.setattr(dist, "all_reduce", None)  # any call would fail
    _train(host, torch.randn(3, 4))
    assert layer.seed_states[0] == CULLED  # on the CPU, at once
    assert host.sync_seeds() == []


def test_replicated_ranks_is_refused_with_its_replacement() -> None:
    with pytest.raises(ValueError, match=r"process_group=.*host\.sync_seeds"):
        KasminaLayer(nn.Linear(4, 4), "l", KasminaConfig(replicated_ranks=True))
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        _host(None, sync_every=0)


def test_a_synced_layer_warns_once_when_its_host_never_syncs(
    group: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seed_sync, "_UNSYNCED_WARN", 3)
    host = _host(group)
    _load(host, 0)
    x = torch.randn(3, 4)
    for _ in range(2):
        _train(host, x)
    with pytest.warns(UserWarning, match="3 training forwards since its host last synced"):
        _train(host, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _train(host, x)  # once
        assert host.sync_seeds() == [SeedEvent("2", 0, FOSSILIZED)]  # (6 forwards)
        for _ in range(2):
            _train(host, x)  # (counted again from the sync)
