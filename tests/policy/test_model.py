"""The network's structural guarantees: per-graph softmax, permutation equivariance,
batch == alone, GCN propagation == torch_geometric GCNConv."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.nn import GCNConv

from tamiyo.policy.batch import collate
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import GCNLayer, PolicyConfig, TamiyoPolicy, per_graph_log_softmax
from tamiyo.policy.synthetic import random_graphs
from tamiyo.policy.topology import normalized_adjacency


@pytest.fixture
def model() -> TamiyoPolicy:
    torch.manual_seed(7)
    m = TamiyoPolicy(PolicyConfig(hidden=32, kernel_hidden=16, head_hidden=32))
    # Random biases so that a wrong normalisation or pooling cannot hide behind zeros.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return m.eval()


def _permute(g: GraphTensors, perm: np.ndarray) -> GraphTensors:
    """The same graph with node i of the result = node perm[i] of ``g``."""
    inv = np.argsort(perm)
    ei = g.adj.edge_index
    adj = normalized_adjacency(g.num_nodes, inv[ei])
    return g._replace(
        x=g.x[perm],
        target_mask=g.target_mask[perm],
        health=g.health[perm],
        free_seed=g.free_seed[perm],
        adj=adj,
        layer_ids=tuple(g.layer_ids[i] for i in perm),
    )


def test_probabilities_sum_to_one_within_each_graph(model: TamiyoPolicy) -> None:
    graphs = random_graphs(1, [1, 5, 17, 40, 3])
    batch = collate(graphs)
    with torch.no_grad():
        out = model(batch)
        pair_lp, noop_lp = per_graph_log_softmax(out.pair_logits, out.noop_logit, batch.node_batch)
    per_graph = torch.zeros(len(graphs), dtype=torch.float64).index_add(
        0, batch.node_batch, pair_lp.exp().sum(1).double()
    )
    total = per_graph + noop_lp.exp().double()
    torch.testing.assert_close(
        total, torch.ones(len(graphs), dtype=torch.float64), atol=1e-6, rtol=0
    )
    # Invalid targets get exactly zero probability.
    invalid = ~batch.target_mask
    assert bool((pair_lp[invalid] == float("-inf")).all())
    # Single graph: the seed's defect gave 1.0 to "the" layer; here layers differ.
    assert pair_lp[batch.ptr_list[3] : batch.ptr_list[4]].exp().sum(1).std() > 0


def test_batch_equals_each_graph_alone(model: TamiyoPolicy) -> None:
    graphs = random_graphs(2, [12, 3, 30, 1, 8], k=4)
    graphs[1] = graphs[1]._replace(
        kernel_x=graphs[1].kernel_x[:2], kernel_ids=graphs[1].kernel_ids[:2]
    )
    batch = collate(graphs)
    with torch.no_grad():
        out = model(batch)
        lp, nlp = per_graph_log_softmax(out.pair_logits, out.noop_logit, batch.node_batch)
        for i, g in enumerate(graphs):
            single = collate([g])
            o1 = model(single)
            lp1, nlp1 = per_graph_log_softmax(o1.pair_logits, o1.noop_logit, single.node_batch)
            a, b = batch.ptr_list[i], batch.ptr_list[i + 1]
            k = g.num_kernels
            torch.testing.assert_close(lp[a:b, :k], lp1[:, :k], atol=1e-5, rtol=1e-5)
            assert bool((lp[a:b, k:] == float("-inf")).all())
            torch.testing.assert_close(nlp[i], nlp1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.value[i], o1.value[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                out.urgency_logit[i], o1.urgency_logit[0], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_node_permutation_permutes_outputs(model: TamiyoPolicy, seed: int) -> None:
    g = random_graphs(seed, [25])[0]
    perm = np.random.default_rng(seed).permutation(g.num_nodes)
    with torch.no_grad():
        o = model(collate([g]))
        op = model(collate([_permute(g, perm)]))
    torch.testing.assert_close(
        op.pair_logits, o.pair_logits[torch.from_numpy(perm)], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(op.noop_logit, o.noop_logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(op.value, o.value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("n", [1, 2, 9, 60, 150])
def test_gcn_layer_matches_torch_geometric_gcnconv(
    model: TamiyoPolicy, n: int, dense: bool
) -> None:
    """Our propagation (sparse CSR, or dense Â) == GCNConv on the same graph."""
    g = random_graphs(n, [n])[0]
    conv = model.convs[0]
    assert isinstance(conv, GCNLayer)
    ref = GCNConv(conv.weight.shape[1], conv.weight.shape[0])
    adj = collate([g]).adj
    with torch.no_grad():
        ref.lin.weight.copy_(conv.weight)
        ref.bias.copy_(conv.bias)
        h = torch.randn(n, conv.weight.shape[1])
        ours = conv(h, adj.to_dense() if dense else adj)
        theirs = ref(h, torch.from_numpy(g.adj.edge_index.copy()))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_log_softmax_is_differentiable_and_masked(model: TamiyoPolicy) -> None:
    model.train()
    batch = collate(random_graphs(9, [6, 4]))
    out = model(batch)
    lp, nlp = per_graph_log_softmax(out.pair_logits, out.noop_logit, batch.node_batch)
    valid = torch.isfinite(lp)
    loss = -(lp[valid].sum() + nlp.sum())
    torch.autograd.backward([loss])
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads if gr is not None)


def test_gcn_batched_matches_gcnconv_on_pyg_batch(model: TamiyoPolicy) -> None:
    """A whole flat batch through one layer == GCNConv on the PyG-style batch."""
    graphs = random_graphs(12, [7, 3, 12])
    batch = collate(graphs)
    conv = model.convs[1]
    assert isinstance(conv, GCNLayer)
    ref = GCNConv(conv.weight.shape[1], conv.weight.shape[0])
    offsets = np.cumsum([0] + [g.num_nodes for g in graphs])[:-1]
    ei = np.concatenate([g.adj.edge_index + o for g, o in zip(graphs, offsets, strict=True)], 1)
    with torch.no_grad():
        ref.lin.weight.copy_(conv.weight)
        ref.bias.copy_(conv.bias)
        h = torch.randn(batch.num_nodes, conv.weight.shape[1])
        ours = conv(h, batch.adj)
        theirs = ref(h, torch.from_numpy(ei))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_are_the_checkpoint_format(model: TamiyoPolicy) -> None:
    """Checkpoints written before the flat layout must still load: same parameter names."""
    keys = set(model.state_dict())
    assert keys == {
        *(f"encoder.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
        *(f"convs.{i}.{w}" for i in range(3) for w in ("weight", "bias")),
        "node_head.weight",
        "node_head.bias",
        *(f"kernel_encoder.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
        *(f"graph_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
    }
