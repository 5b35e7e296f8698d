"""collate: padded layout, flat view, kernel padding and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamiyo.policy.batch import collate
from tamiyo.policy.features import featurize, snapshot_from_state
from tamiyo.policy.synthetic import random_graphs

from .conftest import make_state


def test_flat_layout() -> None:
    graphs = random_graphs(3, [4, 1, 6], k=2)
    graphs.append(featurize(snapshot_from_state(make_state(2, kernels=()), 4)))
    b = collate(graphs)
    assert (b.num_graphs, b.num_nodes, b.k_max) == (4, 13, 2)
    assert b.ptr_list == [0, 4, 5, 11, 13]
    assert b.k_list == [2, 2, 2, 0]
    assert b.node_batch.tolist() == [0] * 4 + [1] + [2] * 6 + [3] * 2
    np.testing.assert_array_equal(b.x.numpy(), np.concatenate([g.x for g in graphs]))
    assert b.counts.tolist() == [4, 1, 6, 2]
    assert b.kernel_x.shape == (4, 2, 2)
    assert bool((b.kernel_x[3] == 0).all())
    assert b.pair_invalid.shape == (13, 2)
    assert b.pair_invalid[11:].all()  # no kernels offered → nothing valid
    np.testing.assert_array_equal(
        (~b.pair_invalid).any(1).numpy(), np.concatenate([g.target_mask for g in graphs])
    )


def test_adjacency_is_block_diagonal() -> None:
    graphs = random_graphs(5, [7, 1, 12, 3])
    b = collate(graphs)
    dense = b.adj.to_dense().numpy()
    want = np.zeros((23, 23), np.float32)
    for g, lo in zip(graphs, b.ptr_list, strict=False):
        want[lo : lo + g.num_nodes, lo : lo + g.num_nodes] = g.adj.dense()
    np.testing.assert_array_equal(dense, want)
    assert b.adj.crow_indices().dtype == torch.int32


def test_no_kernel_anywhere_pads_one_invalid_column() -> None:
    g = featurize(snapshot_from_state(make_state(3, kernels=()), 4))
    b = collate([g, g])
    assert b.k_max == 1
    assert b.k_list == [0, 0]
    assert b.kernel_x.shape == (2, 1, 2)
    assert bool(b.pair_invalid.all())


def test_empty_batch_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([])
